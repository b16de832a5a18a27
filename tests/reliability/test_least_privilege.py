"""Issue #12: least privilege, checked with real tokens against the real API server (v1.20, RBAC on).

The operator runs under a ServiceAccount bound to exactly operator/kubetune_operator/rbac.yaml and
creates a per-job trainer ServiceAccount + Role for each FineTuneJob. With those two tokens we try,
for real, what each account needs and what it must never do.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import pytest

from tests.cluster.cluster import LocalCluster
from tests.fixtures.operator import GROUP, VERSION, Api, OperatorProcess, wait_for

pytestmark = pytest.mark.integration
SLEEPER = [sys.executable, "-c", "import time; time.sleep(300)"]  # TEST DOUBLE: a trainer that idles


def job(name: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"name": name, "base": {"uri": "s3://models/base/tiny"}},
            "data": {"train": {"uri": "s3://data/train.jsonl"}},
            "distributed": {"gpusPerNode": 0},
            "output": {"uri": "s3://registry/models"},
        },
    }


def status_of(call: Callable[[], Any]) -> int:
    from kubernetes.client.exceptions import ApiException

    try:
        call()
    except ApiException as exc:
        return int(exc.status)
    return 200


def client_for(cluster: LocalCluster, namespace: str, account: str) -> Any:
    from kubernetes import config

    token = cluster.service_account_token(namespace, account)
    path = cluster.kubeconfig_for_token(token, name=f"{account}-{namespace}")
    return config.new_client_from_config(config_file=str(path))


def test_operator_and_trainer_tokens_can_do_exactly_their_job(
    kube_cluster: LocalCluster, api: Api, operator_factory: Callable[..., OperatorProcess]
) -> None:
    from kubernetes import client

    op = operator_factory(trainer_command=SLEEPER)
    api.core.create_namespaced_secret(api.ns, {"metadata": {"name": "s3-creds"}, "stringData": {"k": "v"}})
    for name in ("alpha", "beta"):
        api.create_ftj(job(name))
    for name in ("alpha", "beta"):
        wait_for(f"{name} Job", functools.partial(api.jobs, name), timeout=90, log=op.log)
    ns = api.ns
    exec_body = {"command": ["sh"]}

    with client_for(kube_cluster, ns, "alpha-trainer") as trainer:
        custom, core = client.CustomObjectsApi(trainer), client.CoreV1Api(trainer)
        patch = {"status": {"progress": {"step": 1, "totalSteps": 2, "summary": "1/2"}}}
        assert (
            status_of(
                lambda: custom.patch_namespaced_custom_object_status(
                    GROUP, VERSION, ns, "finetunejobs", "alpha", patch
                )
            )
            == 200
        )
        forbidden = {
            "patch another job's status": lambda: custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, ns, "finetunejobs", "beta", patch
            ),
            "patch its own spec": lambda: custom.patch_namespaced_custom_object(
                GROUP, VERSION, ns, "finetunejobs", "alpha", {"spec": {"image": "evil"}}
            ),
            "list FineTuneJobs": lambda: custom.list_namespaced_custom_object(
                GROUP, VERSION, ns, "finetunejobs"
            ),
            "read a Secret": lambda: core.read_namespaced_secret("s3-creds", ns),
            "list Secrets": lambda: core.list_namespaced_secret(ns),
            "list pods": lambda: core.list_namespaced_pod(ns),
            "create a pod": lambda: core.create_namespaced_pod(
                ns, {"metadata": {"name": "x"}, "spec": {"containers": [{"name": "x", "image": "x"}]}}
            ),
        }
        got = {what: status_of(call) for what, call in forbidden.items()}
        assert got == dict.fromkeys(forbidden, 403), got

    with client_for(kube_cluster, ns, "kubetune-operator") as operator:
        custom, core = client.CustomObjectsApi(operator), client.CoreV1Api(operator)
        batch = client.BatchV1Api(operator)
        assert (
            status_of(lambda: custom.list_namespaced_custom_object(GROUP, VERSION, ns, "finetunejobs")) == 200
        )
        assert status_of(lambda: batch.list_namespaced_job(ns)) == 200
        pod = core.list_namespaced_pod(ns).items[0].metadata.name
        forbidden = {
            "read a Secret": lambda: core.read_namespaced_secret("s3-creds", ns),
            "list Secrets": lambda: core.list_namespaced_secret(ns),
            "exec into a pod": lambda: operator.call_api(
                f"/api/v1/namespaces/{ns}/pods/{pod}/exec",
                "POST",
                query_params=[("command", "sh")],
                body=exec_body,
                auth_settings=["BearerToken"],
                _preload_content=False,
            ),
            "read Secrets in kube-system": lambda: core.list_namespaced_secret("kube-system"),
            "touch FineTuneJobs of another namespace": lambda: custom.list_namespaced_custom_object(
                GROUP, VERSION, "default", "finetunejobs"
            ),
        }
        got = {what: status_of(call) for what, call in forbidden.items()}
        assert got == dict.fromkeys(forbidden, 403), got
