"""The integration tier's Kubernetes: a real v1.20 control plane plus the fake kubelet behave like a cluster.

Each test asserts what an operator (or a user with kubectl) would see: API responses and status codes,
Job and pod status, objects appearing and disappearing.
"""

from __future__ import annotations

import json
import signal
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
from kubernetes import client
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from tests.cluster.cluster import LocalCluster
from tests.cluster.kubelet import FakeKubelet

pytestmark = pytest.mark.integration

T = TypeVar("T")


def wait_for(probe: Callable[[], T | None], timeout: float, what: str) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def job(name: str, script: str, *, backoff_limit: int = 0, **container: Any) -> dict[str, Any]:
    """A batch/v1 Job whose single pod runs ``python -c script``."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": backoff_limit,
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "main",
                            "image": "kubetune/test:1",
                            "command": ["python", "-c", script],
                            **container,
                        }
                    ],
                },
            },
        },
    }


def job_pod(core: client.CoreV1Api, namespace: str, job_name: str) -> client.V1Pod | None:
    pods = core.list_namespaced_pod(namespace, label_selector=f"job-name={job_name}").items
    return pods[0] if pods else None


def terminated(pod: client.V1Pod | None) -> Any:
    """The first container's terminated state, or None while it has not terminated."""
    if pod is None or not pod.status.container_statuses:
        return None
    return pod.status.container_statuses[0].state.terminated


@pytest.fixture
def namespace(kube_cluster: LocalCluster, kube_namespace: str) -> str:
    # Pods are rejected until the namespace's default ServiceAccount has its token (v1.20 admission).
    kube_cluster.service_account_token(kube_namespace, "default")
    return kube_namespace


def test_crd_with_status_subresource_is_established_and_validated(
    kube_api: ApiClient, namespace: str
) -> None:
    group = f"h{uuid.uuid4().hex[:8]}.kubetune.test"
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"widgets.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "required": ["replicas"],
                                    "properties": {"replicas": {"type": "integer", "minimum": 1}},
                                },
                                "status": {"type": "object", "properties": {"phase": {"type": "string"}}},
                            },
                        }
                    },
                }
            ],
        },
    }
    extensions = client.ApiextensionsV1Api(kube_api)
    extensions.create_custom_resource_definition(crd)
    try:

        def established() -> bool:
            conditions = (
                extensions.read_custom_resource_definition(f"widgets.{group}").status.conditions or []
            )
            return any(c.type == "Established" and c.status == "True" for c in conditions)

        wait_for(established, 30, "the CRD to become Established")
        objects = client.CustomObjectsApi(kube_api)

        def widget(replicas: object) -> dict[str, Any]:
            return {
                "apiVersion": f"{group}/v1",
                "kind": "Widget",
                "metadata": {"name": "w"},
                "spec": {"replicas": replicas},
            }

        with pytest.raises(ApiException) as rejected:
            objects.create_namespaced_custom_object(group, "v1", namespace, "widgets", widget(0))
        assert rejected.value.status == 422
        assert "spec.replicas" in json.loads(rejected.value.body)["message"]

        created = objects.create_namespaced_custom_object(group, "v1", namespace, "widgets", widget(2))
        # With the status subresource, status written through the main resource is dropped...
        created["status"] = {"phase": "Ignored"}
        updated = objects.replace_namespaced_custom_object(group, "v1", namespace, "widgets", "w", created)
        assert "status" not in updated
        # ...and /status is where it is written.
        objects.patch_namespaced_custom_object_status(
            group, "v1", namespace, "widgets", "w", {"status": {"phase": "Ready"}}
        )
        assert objects.get_namespaced_custom_object(group, "v1", namespace, "widgets", "w")["status"] == {
            "phase": "Ready"
        }
    finally:
        extensions.delete_custom_resource_definition(f"widgets.{group}")


def test_job_runs_for_real_with_env_and_mounts(
    kube_api: ApiClient, namespace: str, fake_kubelet: FakeKubelet
) -> None:
    core = client.CoreV1Api(kube_api)
    core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "settings"}, "data": {"greeting": "hello"}}
    )
    # The container reads a mounted ConfigMap file, an env var from the ConfigMap and the downward API, and
    # reports them through its termination message, exactly as a real container would. Container paths
    # reach it as arguments, which is what the fake kubelet remaps to the pod's directories.
    script = (
        "import os, sys; "
        "text = open(sys.argv[1]).read(); "
        "open(sys.argv[2], 'w').write(f\"{text} {os.environ['GREETING']} {os.environ['POD_NAME']}\")"
    )
    manifest = job(
        "ok",
        script,
        env=[
            {"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "greeting"}}},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        ],
        volumeMounts=[{"name": "settings", "mountPath": "/etc/settings"}],
        args=["/etc/settings/greeting", "/dev/termination-log"],
    )
    manifest["spec"]["template"]["spec"]["volumes"] = [
        {"name": "settings", "configMap": {"name": "settings"}}
    ]
    batch = client.BatchV1Api(kube_api)
    batch.create_namespaced_job(namespace, manifest)

    succeeded = wait_for(
        lambda: (batch.read_namespaced_job_status("ok", namespace).status.succeeded or 0) == 1,
        60,
        "Job ok to report succeeded=1",
    )
    assert succeeded
    pod = job_pod(core, namespace, "ok")
    assert pod is not None
    state = terminated(pod)
    assert (state.exit_code, state.reason) == (0, "Completed")
    assert state.message == f"hello hello {pod.metadata.name}"
    assert pod.spec.node_name == fake_kubelet.node_name
    assert pod.status.phase == "Succeeded"


def test_failing_job_with_backoff_limit_zero_fails(
    kube_api: ApiClient, namespace: str, fake_kubelet: FakeKubelet
) -> None:
    batch = client.BatchV1Api(kube_api)
    batch.create_namespaced_job(
        namespace, job("bad", "import sys; print('bad input', file=sys.stderr); sys.exit(3)", backoff_limit=0)
    )

    def failed_condition() -> Any:
        conditions = batch.read_namespaced_job_status("bad", namespace).status.conditions or []
        return next((c for c in conditions if c.type == "Failed" and c.status == "True"), None)

    condition = wait_for(failed_condition, 60, "Job bad to get a Failed condition")
    assert condition.reason == "BackoffLimitExceeded"
    pod = job_pod(client.CoreV1Api(kube_api), namespace, "bad")
    assert pod is not None and pod.status.phase == "Failed"
    assert (terminated(pod).exit_code, terminated(pod).reason) == (3, "Error")
    assert "bad input" in fake_kubelet.pod_log(namespace, pod.metadata.name)


def test_killed_pod_is_replaced_by_the_job_controller(
    kube_api: ApiClient, namespace: str, fake_kubelet: FakeKubelet
) -> None:
    batch = client.BatchV1Api(kube_api)
    batch.create_namespaced_job(namespace, job("retry", "import time; time.sleep(600)", backoff_limit=1))
    first = fake_kubelet.wait_for_process(namespace, labels={"job-name": "retry"}, timeout=60)
    fake_kubelet.kill_pod(namespace, first.name, signal.SIGKILL)
    assert first.wait(timeout=10) == -signal.SIGKILL
    second = fake_kubelet.wait_for_process(namespace, labels={"job-name": "retry"}, timeout=60)
    assert second.name != first.name
    core = client.CoreV1Api(kube_api)
    killed = core.read_namespaced_pod(first.name, namespace)
    assert killed.status.phase == "Failed"
    assert terminated(killed).exit_code == 137
    fake_kubelet.simulate_oom_kill(namespace, second.name)

    def oom_killed() -> Any:
        state = terminated(core.read_namespaced_pod(second.name, namespace))
        return state if state is not None and state.reason == "OOMKilled" else None

    assert wait_for(oom_killed, 30, "the second pod to be OOMKilled").exit_code == 137


def test_missing_secret_and_image_pull_failure_keep_the_pod_waiting(
    kube_api: ApiClient, namespace: str, fake_kubelet: FakeKubelet
) -> None:
    core = client.CoreV1Api(kube_api)
    fake_kubelet.set_image_pull_failure("kubetune/missing:1")
    core.create_namespaced_pod(
        namespace,
        {
            "metadata": {"name": "no-image"},
            "spec": {
                "restartPolicy": "Never",
                "containers": [
                    {"name": "main", "image": "kubetune/missing:1", "command": ["python", "-c", "pass"]}
                ],
            },
        },
    )
    core.create_namespaced_pod(
        namespace,
        {
            "metadata": {"name": "no-secret"},
            "spec": {
                "restartPolicy": "Never",
                "containers": [
                    {
                        "name": "main",
                        "image": "kubetune/test:1",
                        "command": [
                            "python",
                            "-c",
                            "import os, sys; open(sys.argv[1], 'w').write(os.environ['KEY'])",
                            "/dev/termination-log",
                        ],
                        "env": [
                            {"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "access"}}}
                        ],
                    }
                ],
            },
        },
    )

    def waiting(name: str, reason: str) -> Any:
        def probe() -> Any:
            statuses = core.read_namespaced_pod(name, namespace).status.container_statuses or []
            state = statuses[0].state.waiting if statuses else None
            return state if state is not None and state.reason == reason else None

        return probe

    pulling = wait_for(waiting("no-image", "ImagePullBackOff"), 30, "pod no-image to show ImagePullBackOff")
    assert "kubetune/missing:1" in pulling.message
    config = wait_for(
        waiting("no-secret", "CreateContainerConfigError"), 30, "pod no-secret to wait for its Secret"
    )
    assert config.message == 'secret "s3" not found'
    assert core.read_namespaced_pod("no-secret", namespace).status.phase == "Pending"

    # Once the Secret exists the kubelet's retry starts the container.
    core.create_namespaced_secret(
        namespace, {"metadata": {"name": "s3"}, "stringData": {"access": "AKIA-test"}}
    )
    done = wait_for(
        lambda: terminated(core.read_namespaced_pod("no-secret", namespace)), 30, "pod no-secret to run"
    )
    assert (done.exit_code, done.message) == (0, "AKIA-test")
    fake_kubelet.clear_image_pull_failure("kubetune/missing:1")


def test_owner_reference_garbage_collection(kube_api: ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(kube_api)
    owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}})
    core.create_namespaced_config_map(
        namespace,
        {
            "metadata": {
                "name": "child",
                "ownerReferences": [
                    {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}
                ],
            }
        },
    )
    core.delete_namespaced_config_map("owner", namespace)

    def child_gone() -> bool:
        try:
            core.read_namespaced_config_map("child", namespace)
        except ApiException as exc:
            return exc.status == 404
        return False

    wait_for(child_gone, 60, "the garbage collector to delete the child ConfigMap")


def test_service_account_token_is_limited_by_rbac(
    kube_cluster: LocalCluster, kube_api: ApiClient, namespace: str, fake_kubelet: FakeKubelet
) -> None:
    core = client.CoreV1Api(kube_api)
    rbac = client.RbacAuthorizationV1Api(kube_api)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "reader"}})
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "visible"}, "data": {"k": "v"}})
    rbac.create_namespaced_role(
        namespace,
        {
            "metadata": {"name": "read-visible"},
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["configmaps"],
                    "resourceNames": ["visible"],
                    "verbs": ["get"],
                }
            ],
        },
    )
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "reader"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read-visible"},
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
        },
    )
    token = kube_cluster.service_account_token(namespace, "reader")
    with kube_cluster.api_client(kube_cluster.kubeconfig_for_token(token)) as limited:
        limited_core = client.CoreV1Api(limited)
        assert limited_core.read_namespaced_config_map("visible", namespace).data == {"k": "v"}
        with pytest.raises(ApiException) as forbidden:
            limited_core.list_namespaced_secret(namespace)
        assert forbidden.value.status == 403

    # The same identity from inside a pod: the mounted token and CA reach the apiserver over TLS.
    script = (
        "import json, os, ssl, sys, urllib.request\n"
        "sa = os.environ['KUBETUNE_SA_DIR']\n"
        "url = 'https://%s:%s/api/v1/namespaces/%s/configmaps/visible' % (os.environ['KUBERNETES_SERVICE_HOST'], "
        "os.environ['KUBERNETES_SERVICE_PORT'], open(sa + '/namespace').read())\n"
        "req = urllib.request.Request(url, headers={'Authorization': 'Bearer ' + open(sa + '/token').read()})\n"
        "ctx = ssl.create_default_context(cafile=sa + '/ca.crt')\n"
        "data = json.load(urllib.request.urlopen(req, context=ctx))['data']\n"
        "open(sys.argv[1], 'w').write(data['k'])\n"
    )
    core.create_namespaced_pod(
        namespace,
        {
            "metadata": {"name": "in-cluster"},
            "spec": {
                "serviceAccountName": "reader",
                "restartPolicy": "Never",
                "containers": [
                    {
                        "name": "main",
                        "image": "kubetune/test:1",
                        "command": [sys.executable, "-c", script, "/dev/termination-log"],
                    }
                ],
            },
        },
    )
    state = wait_for(
        lambda: terminated(core.read_namespaced_pod("in-cluster", namespace)), 60, "pod in-cluster"
    )
    assert (state.exit_code, state.message) == (0, "v"), fake_kubelet.pod_log(namespace, "in-cluster")
