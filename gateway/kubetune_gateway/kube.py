"""The gateway's Kubernetes calls, all in the tenant's namespace, all within the Role in ``rbac.py``.

Objects travel as plain dicts (the REST JSON); the kubernetes client's ``ApiException`` is turned
into :class:`KubeError` with the HTTP status so the app can answer in OpenAI's format.
"""

from __future__ import annotations

import json
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from kubetune_gateway.mapping import GROUP, LABEL, LABEL_VALUE, VERSION


class KubeError(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


class Kube:
    """FineTuneJobs, ModelVersions and Events through one ApiClient (in-cluster or KUBECONFIG)."""

    def __init__(self, api_client: Any | None = None) -> None:
        if api_client is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            api_client = client.ApiClient()
        self.api_client = api_client
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ApiException as e:
            try:
                body = json.loads(e.body or "{}")
            except ValueError:
                body = {}
            raise KubeError(
                int(e.status or 500), str(body.get("reason", e.reason)), str(body.get("message", e.reason))
            ) from None

    def list_jobs(self, namespace: str) -> list[dict[str, Any]]:
        result = self._call(
            self.custom.list_namespaced_custom_object,
            GROUP,
            VERSION,
            namespace,
            "finetunejobs",
            label_selector=f"{LABEL}={LABEL_VALUE}",
        )
        return list(result.get("items", []))

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return dict(
                self._call(
                    self.custom.get_namespaced_custom_object, GROUP, VERSION, namespace, "finetunejobs", name
                )
            )
        except KubeError as e:
            if e.status == 404:
                return None
            raise

    def create_job(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        return dict(
            self._call(
                self.custom.create_namespaced_custom_object, GROUP, VERSION, namespace, "finetunejobs", body
            )
        )

    def patch_job(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        return dict(
            self._call(
                self.custom.patch_namespaced_custom_object,
                GROUP,
                VERSION,
                namespace,
                "finetunejobs",
                name,
                patch,
            )
        )

    def list_model_versions(self, namespace: str) -> list[dict[str, Any]]:
        result = self._call(
            self.custom.list_namespaced_custom_object, GROUP, VERSION, namespace, "modelversions"
        )
        return list(result.get("items", []))

    def job_events(self, namespace: str, name: str) -> list[dict[str, Any]]:
        result = self._call(
            self.core.list_namespaced_event,
            namespace,
            field_selector=f"involvedObject.name={name},involvedObject.kind=FineTuneJob",
            _preload_content=False,
        )
        return list(json.loads(result.data).get("items", []))
