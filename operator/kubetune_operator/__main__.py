"""``kubetune-operator``: run the FineTuneJob operator with settings from the environment.

    KUBETUNE_OPERATOR_TRAINER_IMAGE=... KUBETUNE_OPERATOR_NAMESPACES=team-a,team-b kubetune-operator

Credentials: in a pod, the ServiceAccount token; elsewhere ``KUBECONFIG`` (read by the
``kubernetes`` client, which is imported only here, after the environment is final).
"""

from __future__ import annotations

import logging
import os
import sys

from kubetune_operator.settings import OperatorSettings, SettingsError


def build_context(settings: OperatorSettings) -> object:
    """An API client for the handlers' sync calls plus fresh metrics."""
    from kubernetes import client, config

    from kubetune_operator.metrics import OperatorMetrics
    from kubetune_operator.reconcile import Context

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(client_configuration=configuration)
    # One connection per worker thread: with fewer, a burst pays a TLS handshake per call.
    configuration.connection_pool_maxsize = settings.max_workers
    return Context(settings=settings, api=client.ApiClient(configuration), metrics=OperatorMetrics())


def main(argv: list[str] | None = None) -> int:
    """Run until SIGTERM/SIGINT. Exit code 2 for unusable settings."""
    del argv  # configuration is environment-only (12-factor): one source for the chart and tests
    logging.basicConfig(
        level=os.environ.get("KUBETUNE_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        settings = OperatorSettings.from_env(os.environ)
    except SettingsError as exc:
        print(f"kubetune-operator: {exc}", file=sys.stderr)
        return 2

    import kopf

    from kubetune_operator.handlers import register

    registry = kopf.OperatorRegistry()
    register(registry, settings, lambda: build_context(settings))
    kopf.run(
        registry=registry,
        standalone=settings.standalone,
        priority=settings.priority,
        peering_name=settings.peering_name,
        clusterwide=not settings.namespaces,
        namespaces=list(settings.namespaces),
        liveness_endpoint=settings.liveness_endpoint,
        memo=kopf.Memo(),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
