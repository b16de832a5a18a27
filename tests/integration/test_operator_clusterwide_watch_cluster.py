"""Cluster-wide mode's child watches are label-filtered by the API server (issue 16, deliverable 5).

The operator runs cluster-wide (``KUBETUNE_OPERATOR_NAMESPACES`` empty, ClusterRoleBindings) and
talks to the real v1.20 API server through a recording HTTP proxy in this test, which sees every
request the operator makes and every watch event the server streams back to it. A burst of
unrelated Jobs and pods in another namespace must not reach the operator at all (not merely be
dropped by kopf's client-side ``labels=`` filter), while its own FineTuneJob's Job and pods still
drive the status to Succeeded.
"""

from __future__ import annotations

import http.client
import http.server
import json
import ssl
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from kubetune_operator import rbac
from tests.cluster.cluster import LocalCluster
from tests.fixtures.operator import Api, OperatorProcess, finetunejob, wait_for
from tests.integration.test_operator_cluster import STUB_COMMAND

pytestmark = pytest.mark.integration

_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class RecordingProxy:
    """Plain HTTP on 127.0.0.1 -> HTTPS to the API server; records request targets and watch events."""

    def __init__(self, upstream_port: int, ca_file: Path) -> None:
        self.requests: list[str] = []
        self.watch_events: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        ssl_ctx = ssl.create_default_context(cafile=str(ca_file))
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                with proxy._lock:
                    proxy.requests.append(f"{self.command} {self.path}")
                upstream = http.client.HTTPSConnection(
                    "127.0.0.1", upstream_port, context=ssl_ctx, timeout=600
                )
                headers = {
                    k: v for k, v in self.headers.items() if k.lower() not in _HOP and k.lower() != "host"
                }
                upstream.request(self.command, self.path, body=body, headers=headers)
                resp = upstream.getresponse()
                self.send_response(resp.status, resp.reason)
                for key, value in resp.getheaders():
                    if key.lower() not in _HOP and key.lower() != "content-length":
                        self.send_header(key, value)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                watching = "watch=" in self.path
                pending = b""
                try:
                    while True:
                        chunk = resp.read1(65536)
                        if not chunk:
                            break
                        if watching:
                            pending += chunk
                            *lines, pending = pending.split(b"\n")
                            for line in lines:
                                proxy._record_event(self.path, line)
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
                    self.wfile.flush()
                except (OSError, ValueError, http.client.HTTPException):
                    self.close_connection = True
                finally:
                    upstream.close()

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name="recording-proxy", daemon=True)

    def _record_event(self, path: str, line: bytes) -> None:
        try:
            event = json.loads(line)
        except ValueError:
            return
        with self._lock:
            self.watch_events.append((path, event))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def events_for(self, plural: str) -> list[dict[str, Any]]:
        with self._lock:
            return [e for path, e in self.watch_events if urlsplit(path).path.endswith(f"/{plural}")]

    def watch_selectors(self, plural: str) -> list[str]:
        with self._lock:
            targets = [r.split(" ", 1)[1] for r in self.requests]
        out = []
        for target in targets:
            parts = urlsplit(target)
            query = parse_qs(parts.query)
            if parts.path.endswith(f"/{plural}") and query.get("watch") == ["true"]:
                out.append(",".join(query.get("labelSelector", [""])))
        return out


@pytest.fixture
def clusterwide_operator(
    kube_cluster: LocalCluster, api: Api, crds_installed: None, fake_kubelet: Any, tmp_path: Path
) -> Iterator[tuple[OperatorProcess, RecordingProxy]]:
    from kubernetes import utils

    sa = "kubetune-operator-cw"
    api.core.create_namespaced_service_account(api.ns, {"metadata": {"name": sa}})
    bindings = rbac.operator_bindings(api.ns, sa, [])
    for binding in bindings:
        utils.create_from_dict(api.core.api_client, binding)
    token = kube_cluster.service_account_token(api.ns, sa)
    proxy = RecordingProxy(kube_cluster.port, kube_cluster.ca_cert)
    proxy.start()
    kubeconfig = tmp_path / "proxied.kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "proxy", "cluster": {"server": f"http://127.0.0.1:{proxy.port}"}}],
                "users": [{"name": "op", "user": {"token": token}}],
                "contexts": [{"name": "op", "context": {"cluster": "proxy", "user": "op"}}],
                "current-context": "op",
            }
        )
    )
    op = OperatorProcess(
        kubeconfig, api.ns, tmp_path / "operator.log", {"KUBETUNE_OPERATOR_NAMESPACES": ""}, STUB_COMMAND
    )
    op.start()
    try:
        yield op, proxy
    finally:
        op.stop()
        proxy.stop()
        for binding in bindings:
            api.rbac.delete_cluster_role_binding(binding["metadata"]["name"])


def test_clusterwide_watches_are_label_filtered_on_the_api_server(
    api: Api,
    kube_api: Any,
    kube_cluster: LocalCluster,
    clusterwide_operator: tuple[OperatorProcess, RecordingProxy],
) -> None:
    from kubernetes import client

    op, proxy = clusterwide_operator
    wait_for(
        "the operator's cluster-wide pod and Job watches",
        lambda: proxy.watch_selectors("pods") and proxy.watch_selectors("jobs"),
        60,
        op.log,
    )
    for plural in ("pods", "jobs"):
        selectors = proxy.watch_selectors(plural)
        # Cluster-wide (/api/v1/pods, /apis/batch/v1/jobs), each with the server-side selector.
        assert all("app.kubernetes.io/managed-by=kubetune-operator" in s for s in selectors), (
            plural,
            selectors,
        )
    targets = [r for r in proxy.requests if "watch=true" in r]
    assert any(t.split("?")[0].endswith(" /api/v1/pods") for t in targets), targets
    assert any(t.split("?")[0].endswith(" /apis/batch/v1/jobs") for t in targets), targets

    other = f"t-other-{uuid.uuid4().hex[:8]}"
    core, batch = client.CoreV1Api(kube_api), client.BatchV1Api(kube_api)
    core.create_namespace({"metadata": {"name": other}})
    try:
        # Until its token exists, v1.20 refuses pods of the namespace ("No API token found for
        # service account \"default\"", HTTP 500 with Retry-After).
        kube_cluster.service_account_token(other, "default")
        for i in range(10):
            batch.create_namespaced_job(
                other,
                {
                    "metadata": {"name": f"unrelated-{i}", "labels": {"app": "unrelated"}},
                    "spec": {
                        "backoffLimit": 0,
                        "template": {
                            "spec": {
                                "restartPolicy": "Never",
                                "containers": [{"name": "c", "image": "busybox", "command": ["true"]}],
                            }
                        },
                    },
                },
            )
            core.create_namespaced_pod(
                other,
                {
                    "metadata": {"name": f"unrelated-pod-{i}"},
                    "spec": {
                        "restartPolicy": "Never",
                        "containers": [{"name": "c", "image": "busybox", "command": ["true"]}],
                    },
                },
            )
        api.create_ftj(finetunejob("cw", "tiny-cw"))
        wait_for("Succeeded cluster-wide", lambda: api.status("cw").get("phase") == "Succeeded", 120, op.log)

        def unrelated_done() -> bool:
            jobs = batch.list_namespaced_job(other).items
            return len(jobs) == 10 and all((j.status.succeeded or 0) == 1 for j in jobs)

        wait_for("the unrelated Jobs ran", unrelated_done, 120)
    finally:
        core.delete_namespace(other)

    pod_events = proxy.events_for("pods")
    job_events = proxy.events_for("jobs")
    seen_ns = {
        (e.get("object") or {}).get("metadata", {}).get("namespace") for e in [*pod_events, *job_events]
    }
    assert other not in seen_ns, "unrelated objects reached the operator"
    # Its own children did come through the same watches and drove the status.
    ours = [e for e in pod_events if (e.get("object") or {}).get("metadata", {}).get("namespace") == api.ns]
    assert ours, pod_events[:3]
    assert any(
        (e.get("object") or {}).get("metadata", {}).get("labels", {}).get("kubetune.io/finetunejob") == "cw"
        for e in job_events
    )
