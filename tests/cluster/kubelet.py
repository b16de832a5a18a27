"""A fake kubelet for :class:`tests.cluster.cluster.LocalCluster`: pods in watched namespaces run as local processes.

The test cluster has no scheduler and no kubelet, so without this harness every pod stays Pending. The
:class:`FakeKubelet` registers a Node, binds each unscheduled pod of the watched namespaces to it and
runs the pod's containers as local subprocesses, reporting pod status back the way a kubelet does, so a
Job controller, garbage collector and operator see a real lifecycle. What it does, precisely:

Scheduling
  Every Pending pod without ``spec.nodeName`` in a watched namespace is bound to the node (default
  ``kubetune-test-node``: Ready, allocatable cpu/memory/``nvidia.com/gpu``). No predicate is evaluated:
  nodeSelector, affinity, taints, priority and resource fit are ignored. A test can instead have a
  pod reported the way kube-scheduler reports one that fits no node
  (:meth:`FakeKubelet.set_unschedulable`): it stays Pending and unbound with ``PodScheduled=False``,
  reason ``Unschedulable`` and the given message (e.g. ``0/1 nodes are available: 1 Insufficient
  nvidia.com/gpu.``); once the rule is cleared the next relist (at most ~5 s) binds and runs it.

Containers
  Init containers run one after another, then the *first* app container (other app containers are
  not run and are reported as waiting). The process is ``command + args`` (``$(VAR)`` expanded like the
  kubelet does); a container without ``command`` uses ``entrypoints[image]`` when given, otherwise it
  fails with ``CreateContainerConfigError``. The working directory is a per-pod temp dir unless
  ``workingDir`` names a mounted path. stdout/stderr go to a per-pod log (:meth:`FakeKubelet.pod_log`).

Environment
  A few host variables are passed through (``PATH`` with this Python's bin directory first so
  ``python``/``torchrun`` resolve to the test virtualenv; ``PYTHONPATH``, ``OMP_NUM_THREADS``, ``LANG``...;
  see ``host_env``), then ``envFrom`` (configMapRef/secretRef with prefix), then ``env`` (``value``,
  ``valueFrom.configMapKeyRef``/``secretKeyRef``/``fieldRef``/``resourceFieldRef``). ``fieldRef``
  supports metadata.name/namespace/uid, ``metadata.labels['k']``, ``metadata.annotations['k']`` (e.g.
  ``batch.kubernetes.io/job-completion-index``), spec.nodeName, spec.serviceAccountName, status.podIP
  and status.hostIP. A missing non-optional ConfigMap/Secret leaves the pod Pending with the container
  waiting in ``CreateContainerConfigError`` and a kubelet-style message (``secret "x" not found``); the
  kubelet retries, so creating the object later lets the pod start.

Volumes and the path remapping
  Processes run on the host file system, so mounts become per-pod directories: ConfigMap, Secret,
  downwardAPI and projected volumes (configMap/secret/downwardAPI/serviceAccountToken sources) are
  written as files; ``emptyDir`` (any medium) is an empty directory; a PersistentVolumeClaim is a
  directory shared by every pod of the namespace using that claim name. **Any command/args element or
  env value that equals a container ``mountPath`` or starts with ``mountPath + "/"`` is rewritten to
  the local directory** (also the part after the first ``=`` of ``--flag=/path`` arguments). The
  ``terminationMessagePath`` (default ``/dev/termination-log``) is remapped the same way to a per-pod
  file. Paths that reach a program any other way (inside a config file, hard-coded in code) are not
  remapped and hit the host's file system: pass container paths as arguments or env values. A missing
  Secret/ConfigMap for a volume leaves the container waiting in ``ContainerCreating``.

Service account
  In v1.20 the ServiceAccount admission plugin adds the token Secret volume at
  ``/var/run/secrets/kubernetes.io/serviceaccount`` (token, ca.crt, namespace); it is materialised and
  remapped like any volume. The process also gets ``KUBERNETES_SERVICE_HOST=127.0.0.1`` and
  ``KUBERNETES_SERVICE_PORT=<apiserver port>`` (the CA's serving certificate covers 127.0.0.1), and
  ``KUBETUNE_SA_DIR`` pointing at the materialised directory, because a library such as
  ``kubernetes.config.load_incluster_config()`` reads the hard-coded path unless told otherwise.

Status
  Pending (waiting ``ErrImagePull``/``ImagePullBackOff`` for images named in
  :meth:`FakeKubelet.set_image_pull_failure`) -> Running (``startedAt``, podIP 127.0.0.1) ->
  Succeeded/Failed with the exit code (128+signal when killed), reason ``Completed``/``Error``/
  ``OOMKilled`` (:meth:`FakeKubelet.simulate_oom_kill`) and the termination message read from the
  (remapped) ``terminationMessagePath`` or, with ``FallbackToLogsOnError``, the log tail. ``OnFailure``
  and ``Always`` restart the container in place and count ``restartCount``. A pod deleted while
  running gets SIGTERM, then SIGKILL after its grace period (capped), and is then removed with grace 0,
  as the kubelet does. The pod-level ``activeDeadlineSeconds``, probes and resource limits are not
  enforced.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kubernetes.client import CoreV1Api

    from tests.cluster.cluster import LocalCluster

log = logging.getLogger(__name__)

DEFAULT_NODE_NAME = "kubetune-test-node"
SERVICE_ACCOUNT_MOUNT_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"
DEFAULT_TERMINATION_MESSAGE_PATH = "/dev/termination-log"
# A real kubelet caps the termination message at 4096 bytes (and the log fallback at 80 lines / 2048 bytes).
_MAX_TERMINATION_MESSAGE = 4096
_HOST_ENV_PASSTHROUGH = ("PYTHONPATH", "OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM", "LANG", "LC_ALL", "TZ")
_NODE_CAPACITY = {
    "cpu": "16",
    "memory": "64Gi",
    "pods": "110",
    "nvidia.com/gpu": "8",
    "ephemeral-storage": "100Gi",
}
_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")
_FIELD_SUBSCRIPT = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


class _NotReady(Exception):
    """The container cannot start yet; the pod shows ``reason``/``message`` while the kubelet retries."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass
class PodProcess:
    """A container process the fake kubelet started. ``returncode`` is None while it runs."""

    namespace: str
    name: str
    uid: str
    container: str
    argv: list[str]
    env: dict[str, str]
    pid: int
    root: Path
    """Per-pod directory holding ``work/`` (cwd), ``volumes/``, ``container.log`` and ``termination-log``."""
    workdir: Path
    log_path: Path
    sa_dir: Path | None
    labels: dict[str, str] = field(default_factory=dict)
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def returncode(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the process to exit; its raw return code (negative signal number when killed).

        Raises ``subprocess.TimeoutExpired`` when it is still running after ``timeout`` seconds.
        """
        assert self.popen is not None
        return self.popen.wait(timeout=timeout)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class FakeKubelet:
    """Plays the kubelet for pods in ``namespaces`` (None: every namespace except kube-*).

    Start with :meth:`start` (or use as a context manager); :meth:`stop` kills every process it started
    (by PID/process group, SIGTERM then SIGKILL) and removes the per-pod directories. See the module
    docstring for the exact behaviour and its limits.
    """

    def __init__(
        self,
        cluster: LocalCluster,
        namespaces: Iterable[str] | None = None,
        *,
        node_name: str = DEFAULT_NODE_NAME,
        node_labels: Mapping[str, str] | None = None,
        entrypoints: Mapping[str, Sequence[str]] | None = None,
        host_env: Mapping[str, str] | None = None,
        root_dir: Path | None = None,
        restart_backoff: float = 1.0,
        max_grace_seconds: float = 10.0,
    ) -> None:
        self.cluster = cluster
        self.node_name = node_name
        self._namespaces: set[str] | None = set(namespaces) if namespaces is not None else None
        self._node_labels = dict(node_labels or {})
        self._entrypoints = {image: list(cmd) for image, cmd in (entrypoints or {}).items()}
        self._host_env = dict(host_env) if host_env is not None else _default_host_env()
        self._own_root = root_dir is None
        self.root = root_dir or Path(tempfile.mkdtemp(prefix="kubetune-kubelet-"))
        self._restart_backoff = restart_backoff
        self._max_grace = max_grace_seconds
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._workers: dict[str, _PodWorker] = {}
        self._processes: list[PodProcess] = []
        self._image_pull_failures: set[str] = set()
        self._oom_marks: set[tuple[str, str]] = set()
        # (namespace, labels the pod must carry, scheduler message) and the uids already reported.
        self._unschedulable: list[tuple[str, dict[str, str], str]] = []
        self._reported_unschedulable: dict[str, str] = {}
        self._api: Any = None

    # ------------------------------------------------------------------------------------- public API
    def start(self) -> None:
        """Register the node and start watching pods (background threads)."""
        from kubernetes import client

        self._api = self.cluster.api_client()
        self._register_node(client.CoreV1Api(self._api))
        for target, name in (
            (self._watch_loop, "fake-kubelet-watch"),
            (self._heartbeat_loop, "fake-kubelet-node"),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop watching, kill every process still running (SIGTERM, 3 s, SIGKILL) and clean up. Idempotent."""
        self._stop.set()
        with self._lock:
            running = [p for p in self._processes if p.returncode is None]
            self._lock.notify_all()
        for proc in running:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 3
        for proc in running:
            assert proc.popen is not None
            try:
                proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.popen.wait(timeout=10)
        for thread in self._threads:
            thread.join(timeout=15)
        with self._lock:
            workers = list(self._workers.values())
        for worker in workers:
            worker.join(timeout=15)
        if self._api is not None:
            self._api.close()
            self._api = None
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> FakeKubelet:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add_namespace(self, namespace: str) -> None:
        """Also play the kubelet for pods in ``namespace`` (no-op when watching every namespace)."""
        if self._namespaces is not None:
            self._namespaces.add(namespace)

    def set_image_pull_failure(self, image: str) -> None:
        """Pods using ``image`` stay Pending, waiting in ``ErrImagePull`` then ``ImagePullBackOff``."""
        with self._lock:
            self._image_pull_failures.add(image)

    def clear_image_pull_failure(self, image: str) -> None:
        """Let pods using ``image`` start again (the kubelet's next pull "succeeds")."""
        with self._lock:
            self._image_pull_failures.discard(image)

    def set_unschedulable(
        self,
        namespace: str,
        message: str = "0/1 nodes are available: 1 Insufficient nvidia.com/gpu.",
        *,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        """Report unbound Pending pods of ``namespace`` carrying ``labels`` as kube-scheduler would.

        They stay Pending and unbound with ``PodScheduled=False``, reason ``Unschedulable`` and
        ``message`` (plus a ``FailedScheduling`` Warning Event on the pod) until
        :meth:`clear_unschedulable`.
        """
        with self._lock:
            self._unschedulable.append((namespace, dict(labels or {}), message))

    def clear_unschedulable(self, namespace: str) -> None:
        """Drop the rules for ``namespace``: its pending pods are bound and run at the next relist."""
        with self._lock:
            self._unschedulable = [rule for rule in self._unschedulable if rule[0] != namespace]

    def simulate_oom_kill(self, namespace: str, name: str) -> None:
        """SIGKILL the pod's running container and report it as ``OOMKilled`` (exit code 137)."""
        with self._lock:
            self._oom_marks.add((namespace, name))
        self.kill_pod(namespace, name, signal.SIGKILL)

    def kill_pod(self, namespace: str, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the running container's process group; raises KeyError if none is running."""
        proc = self._running(namespace, name)
        if proc is None:
            raise KeyError(f"no running process for pod {namespace}/{name}")
        _signal_group(proc, sig)

    def wait_for_process(
        self,
        namespace: str,
        name: str | None = None,
        *,
        labels: Mapping[str, str] | None = None,
        timeout: float = 60.0,
    ) -> PodProcess:
        """Wait until a container process runs for a pod matching ``name`` (exact) and/or ``labels``.

        Returns the running :class:`PodProcess`; raises ``TimeoutError`` naming the pod otherwise.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for proc in reversed(self._processes):
                    if (
                        proc.namespace == namespace
                        and (name is None or proc.name == name)
                        and all(proc.labels.get(k) == v for k, v in (labels or {}).items())
                        and proc.returncode is None
                    ):
                        return proc
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stop.is_set():
                    raise TimeoutError(
                        f"no process started for pod {namespace}/{name or '*'} (labels {dict(labels or {})}) "
                        f"within {timeout:.0f} s"
                    )
                self._lock.wait(timeout=min(remaining, 0.5))

    def processes(self) -> list[PodProcess]:
        """Every container process started so far, oldest first (running and exited)."""
        with self._lock:
            return list(self._processes)

    def pod_log(self, namespace: str, name: str) -> str:
        """The combined stdout/stderr of the pod's most recent container process ('' if none)."""
        with self._lock:
            matches = [p for p in self._processes if p.namespace == namespace and p.name == name]
        if not matches:
            return ""
        return matches[-1].log_path.read_text(errors="replace") if matches[-1].log_path.exists() else ""

    # -------------------------------------------------------------------------------------- internals
    def _running(self, namespace: str, name: str) -> PodProcess | None:
        with self._lock:
            for proc in reversed(self._processes):
                if proc.namespace == namespace and proc.name == name and proc.returncode is None:
                    return proc
        return None

    def _watches(self, namespace: str) -> bool:
        if self._namespaces is None:
            return not namespace.startswith("kube-")
        return namespace in self._namespaces

    def _register_node(self, core: CoreV1Api) -> None:
        from kubernetes.client.exceptions import ApiException

        labels = {
            "kubernetes.io/hostname": self.node_name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            **self._node_labels,
        }
        body = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": self.node_name, "labels": labels}}
        try:
            core.create_node(body)
        except ApiException as exc:
            if exc.status != 409:
                raise
            core.patch_node(self.node_name, {"metadata": {"labels": labels}})
        core.patch_node_status(self.node_name, self._node_status())

    def _node_status(self) -> dict[str, Any]:
        now = _now()
        return {
            "status": {
                "capacity": _NODE_CAPACITY,
                "allocatable": _NODE_CAPACITY,
                "addresses": [
                    {"type": "InternalIP", "address": "127.0.0.1"},
                    {"type": "Hostname", "address": self.node_name},
                ],
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "KubeletReady",
                        "message": "kubelet is posting ready status (kubetune fake kubelet)",
                        "lastHeartbeatTime": now,
                        "lastTransitionTime": now,
                    }
                ],
                "nodeInfo": {
                    "kubeletVersion": "v1.20.2",
                    "kubeProxyVersion": "v1.20.2",
                    "operatingSystem": "linux",
                    "architecture": "amd64",
                    "containerRuntimeVersion": "fake://kubetune",
                    "osImage": "kubetune fake kubelet",
                    "kernelVersion": os.uname().release,
                    "machineID": "",
                    "systemUUID": "",
                    "bootID": "",
                },
            }
        }

    def _heartbeat_loop(self) -> None:
        """Keep the node Ready: the node lifecycle controller taints a silent node and evicts its pods."""
        from kubernetes import client

        core = client.CoreV1Api(self._api)
        while not self._stop.wait(10):
            try:
                core.patch_node_status(
                    self.node_name,
                    {
                        "status": {
                            "conditions": [{"type": "Ready", "status": "True", "lastHeartbeatTime": _now()}]
                        }
                    },
                )
            except Exception:
                log.exception("fake kubelet: node heartbeat failed")

    def _watch_loop(self) -> None:
        from kubernetes import client, watch

        api = self.cluster.api_client()
        core = client.CoreV1Api(api)
        try:
            while not self._stop.is_set():
                try:
                    listing = core.list_pod_for_all_namespaces()
                    for pod in listing.items:
                        self._on_pod(api.sanitize_for_serialization(pod), deleted=False)
                    stream = watch.Watch().stream(
                        core.list_pod_for_all_namespaces,
                        resource_version=listing.metadata.resource_version,
                        # Short watches keep stop() responsive; each relist also repairs a missed event.
                        timeout_seconds=5,
                    )
                    for event in stream:
                        if self._stop.is_set():
                            break
                        obj = api.sanitize_for_serialization(event["object"])
                        if isinstance(obj, dict) and obj.get("kind", "Pod") == "Pod":
                            self._on_pod(obj, deleted=event["type"] == "DELETED")
                except Exception:
                    if not self._stop.is_set():
                        log.exception("fake kubelet: pod watch failed; relisting")
                        self._stop.wait(0.5)
        finally:
            api.close()

    def _on_pod(self, pod: dict[str, Any], *, deleted: bool) -> None:
        meta = pod.get("metadata") or {}
        namespace, uid = meta.get("namespace", ""), meta.get("uid", "")
        if not self._watches(namespace):
            return
        node = (pod.get("spec") or {}).get("nodeName")
        if node and node != self.node_name:
            return
        orphan = False
        unschedulable: str | None = None
        with self._lock:
            worker = self._workers.get(uid)
            if deleted or meta.get("deletionTimestamp"):
                if worker is not None and worker.is_alive():
                    worker.request_delete(already_gone=deleted)
                else:
                    # Bound here but nobody runs it (finished, or a previous FakeKubelet): without a kubelet
                    # confirming, a graceful deletion would never complete and its namespace never go away.
                    orphan = not deleted and node == self.node_name
            # Only Pending pods are adopted: a Running pod bound here by an earlier FakeKubelet lost its
            # process with that harness and must not be run a second time.
            elif (
                worker is None
                and (pod.get("status") or {}).get("phase") == "Pending"
                and not self._stop.is_set()
                and not node
                and (unschedulable := self._unschedulable_message(pod)) is not None
            ):
                if self._reported_unschedulable.get(uid) == unschedulable:
                    unschedulable = None
                else:
                    self._reported_unschedulable[uid] = unschedulable
            elif (
                worker is None
                and (pod.get("status") or {}).get("phase") == "Pending"
                and not self._stop.is_set()
            ):
                worker = _PodWorker(self, pod)
                self._workers[uid] = worker
                worker.start()
        if orphan:
            self._delete_now(namespace, meta.get("name", ""), uid)
        if unschedulable is not None:
            self._report_unschedulable(namespace, meta.get("name", ""), uid, unschedulable)

    def _unschedulable_message(self, pod: dict[str, Any]) -> str | None:
        """The scheduler message of the first rule ``pod`` matches (caller holds the lock)."""
        meta = pod.get("metadata") or {}
        labels = meta.get("labels") or {}
        for namespace, want, message in self._unschedulable:
            if meta.get("namespace") == namespace and all(labels.get(k) == v for k, v in want.items()):
                return message
        return None

    def _report_unschedulable(self, namespace: str, name: str, uid: str, message: str) -> None:
        """What kube-scheduler writes for a pod that fits no node: the condition and a FailedScheduling Event."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        core = client.CoreV1Api(self._api)
        now = _now()
        condition = {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": message,
            "lastProbeTime": None,
            "lastTransitionTime": now,
        }
        try:
            core.patch_namespaced_pod_status(name, namespace, {"status": {"conditions": [condition]}})
            core.create_namespaced_event(
                namespace,
                {
                    "metadata": {"generateName": f"{name}."},
                    "involvedObject": {"kind": "Pod", "namespace": namespace, "name": name, "uid": uid},
                    "type": "Warning",
                    "reason": "FailedScheduling",
                    "message": message,
                    "source": {"component": "default-scheduler"},
                    "firstTimestamp": now,
                    "lastTimestamp": now,
                    "count": 1,
                },
            )
        except ApiException as exc:
            if exc.status != 404:
                log.exception("fake kubelet: reporting pod %s/%s unschedulable", namespace, name)

    def _delete_now(self, namespace: str, name: str, uid: str) -> None:
        """Delete a pod with grace 0 (what the kubelet does once its containers are gone); 404 is fine."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        try:
            client.CoreV1Api(self._api).delete_namespaced_pod(
                name,
                namespace,
                body={"gracePeriodSeconds": 0, "preconditions": {"uid": uid}},
                grace_period_seconds=0,
            )
        except ApiException as exc:
            if exc.status not in (404, 409):
                raise

    def _record_process(self, proc: PodProcess) -> None:
        with self._lock:
            self._processes.append(proc)
            self._lock.notify_all()

    def _take_oom_mark(self, namespace: str, name: str) -> bool:
        with self._lock:
            if (namespace, name) in self._oom_marks:
                self._oom_marks.discard((namespace, name))
                return True
        return False

    def _image_fails(self, image: str) -> bool:
        with self._lock:
            return image in self._image_pull_failures


class _PodWorker(threading.Thread):
    """Runs one pod from binding to a terminal phase (or deletion) on its own thread."""

    def __init__(self, kubelet: FakeKubelet, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"fake-kubelet-{meta['namespace']}-{meta['name']}", daemon=True)
        self.kubelet = kubelet
        self.pod = pod
        self.namespace: str = meta["namespace"]
        self.pod_name: str = meta["name"]
        self.uid: str = meta["uid"]
        self.spec: dict[str, Any] = pod.get("spec") or {}
        self.root = kubelet.root / "pods" / self.uid
        self._deleting = threading.Event()
        self._gone = threading.Event()
        self._current: PodProcess | None = None
        self._last_waiting: tuple[str, str] | None = None
        self._start_time = _now()
        self._core: Any = None

    # -- control from the watch thread
    def request_delete(self, *, already_gone: bool) -> None:
        if already_gone:
            self._gone.set()
        if not self._deleting.is_set():
            self._deleting.set()
            current = self._current
            if current is not None and current.returncode is None:
                _signal_group(current, signal.SIGTERM)

    def _stopping(self) -> bool:
        return self.kubelet._stop.is_set() or self._deleting.is_set()

    # -- main
    def run(self) -> None:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        self._core = client.CoreV1Api(self.kubelet._api)
        try:
            if not self.spec.get("nodeName"):
                self._bind()
            self._run_pod()
        except ApiException as exc:
            if exc.status != 404 and not self.kubelet._stop.is_set():
                log.exception("fake kubelet: pod %s/%s", self.namespace, self.pod_name)
        except Exception:
            if not self.kubelet._stop.is_set():
                log.exception("fake kubelet: pod %s/%s", self.namespace, self.pod_name)
        finally:
            if self._deleting.is_set() and not self._gone.is_set() and not self.kubelet._stop.is_set():
                try:
                    self._finish_deletion()
                except Exception:
                    log.exception("fake kubelet: deleting pod %s/%s", self.namespace, self.pod_name)

    def _bind(self) -> None:
        body = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": self.pod_name},
            "target": {"apiVersion": "v1", "kind": "Node", "name": self.kubelet.node_name},
        }
        # _preload_content=False: the generated client cannot deserialise the Binding it gets back.
        self._core.create_namespaced_pod_binding(self.pod_name, self.namespace, body, _preload_content=False)
        self.spec["nodeName"] = self.kubelet.node_name

    def _finish_deletion(self) -> None:
        self.kubelet._delete_now(self.namespace, self.pod_name, self.uid)

    def _run_pod(self) -> None:
        restart_policy = self.spec.get("restartPolicy", "Always")
        containers = self.spec.get("containers") or []
        init_containers = self.spec.get("initContainers") or []
        init_statuses: list[dict[str, Any]] = []
        for init in init_containers:
            while True:
                outcome = self._run_container(init, init=True, init_statuses=init_statuses)
                if outcome is None:
                    return
                status, exit_code = outcome
                if exit_code == 0:
                    init_statuses.append(status)
                    break
                if restart_policy == "Never":
                    self._patch_status(
                        phase="Failed",
                        container_statuses=self._others(containers),
                        init_statuses=[*init_statuses, status],
                    )
                    return
                self._stop_wait(self.kubelet._restart_backoff)
        restarts = 0
        while True:
            outcome = self._run_container(containers[0], restarts=restarts, init_statuses=init_statuses)
            if outcome is None:
                return
            status, exit_code = outcome
            if self.kubelet._stop.is_set():
                # The harness is shutting down (often with the cluster): nothing more to report.
                return
            restart = restart_policy == "Always" or (restart_policy == "OnFailure" and exit_code != 0)
            if not restart or self._stopping():
                phase = "Succeeded" if exit_code == 0 else "Failed"
                self._patch_status(
                    phase=phase,
                    container_statuses=[status, *self._others(containers[1:])],
                    init_statuses=init_statuses,
                )
                return
            restarts += 1
            status["lastState"], status["state"] = (
                status["state"],
                {"waiting": {"reason": "CrashLoopBackOff"}},
            )
            status["restartCount"] = restarts
            self._patch_status(phase="Running", container_statuses=[status], init_statuses=init_statuses)
            self._stop_wait(self.kubelet._restart_backoff)

    def _stop_wait(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self._stopping():
            time.sleep(0.05)

    @staticmethod
    def _others(containers: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Statuses for app containers this harness does not run."""
        return [
            {
                "name": c["name"],
                "image": c.get("image", ""),
                "imageID": "",
                "ready": False,
                "restartCount": 0,
                "state": {"waiting": {"reason": "NotRunByFakeKubelet"}},
            }
            for c in containers
        ]

    def _wait_status(self, container: dict[str, Any], reason: str, message: str, *, init: bool) -> None:
        if self._last_waiting == (reason, message):
            return
        self._last_waiting = (reason, message)
        status = {
            "name": container["name"],
            "image": container.get("image", ""),
            "imageID": "",
            "ready": False,
            "restartCount": 0,
            "state": {"waiting": {"reason": reason, "message": message}},
        }
        if init:
            self._patch_status(phase="Pending", container_statuses=[], init_statuses=[status])
        else:
            self._patch_status(phase="Pending", container_statuses=[status], init_statuses=None)

    def _run_container(
        self,
        container: dict[str, Any],
        *,
        init: bool = False,
        restarts: int = 0,
        init_statuses: list[dict[str, Any]],
    ) -> tuple[dict[str, Any], int] | None:
        """Run one container to completion; (its terminated status, exit code), or None when stopping."""
        image = container.get("image", "")
        while True:
            if self._stopping():
                return None
            if self.kubelet._image_fails(image):
                self._wait_status(
                    container, "ErrImagePull", f'rpc error: pulling image "{image}" failed', init=init
                )
                self._stop_wait(0.3)
                self._wait_status(
                    container, "ImagePullBackOff", f'Back-off pulling image "{image}"', init=init
                )
                self._stop_wait(0.5)
                continue
            try:
                launch = _Launch(self, container)
                break
            except _NotReady as not_ready:
                self._wait_status(container, not_ready.reason, not_ready.message, init=init)
                self._stop_wait(1.0)
        self._last_waiting = None
        started_at = _now()
        container_id = ""
        base_status: dict[str, Any] = {
            "name": container["name"],
            "image": image,
            "imageID": f"fake://{image}",
            "restartCount": restarts,
        }
        try:
            proc = launch.spawn()
        except OSError as exc:
            # What a runtime reports when the executable is missing or not executable.
            status = {
                **base_status,
                "ready": False,
                "started": False,
                "state": {
                    "terminated": {
                        "exitCode": 128,
                        "reason": "StartError",
                        "message": f"failed to start container process: {exc}",
                        "startedAt": started_at,
                        "finishedAt": _now(),
                    }
                },
            }
            return status, 128
        self._current = proc
        self.kubelet._record_process(proc)
        container_id = f"fake://{proc.pid}"
        running = {
            **base_status,
            "containerID": container_id,
            "ready": not init,
            "started": True,
            "state": {"running": {"startedAt": started_at}},
        }
        if init:
            self._patch_status(
                phase="Pending", container_statuses=[], init_statuses=[*init_statuses, running]
            )
        else:
            self._patch_status(phase="Running", container_statuses=[running], init_statuses=init_statuses)
        assert proc.popen is not None
        if self._deleting.is_set():
            _signal_group(proc, signal.SIGTERM)
        # Wait for the process; a deletion request turns into SIGTERM and, after the grace period, SIGKILL.
        while True:
            try:
                proc.popen.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if self._deleting.is_set():
                    grace = float(self.spec.get("terminationGracePeriodSeconds", 30))
                    try:
                        proc.popen.wait(timeout=min(grace, self.kubelet._max_grace))
                    except subprocess.TimeoutExpired:
                        _signal_group(proc, signal.SIGKILL)
                        proc.popen.wait()
                    break
        self._current = None
        raw = proc.popen.returncode
        exit_code = 128 - raw if raw < 0 else raw
        oom = self.kubelet._take_oom_mark(self.namespace, self.pod_name)
        reason = "OOMKilled" if oom else ("Completed" if exit_code == 0 else "Error")
        terminated: dict[str, Any] = {
            "exitCode": exit_code,
            "reason": reason,
            "startedAt": started_at,
            "finishedAt": _now(),
            "containerID": container_id,
        }
        message = launch.termination_message(failed=exit_code != 0)
        if message:
            terminated["message"] = message
        status = {
            **base_status,
            "containerID": container_id,
            "ready": False,
            "started": False,
            "state": {"terminated": terminated},
        }
        return status, exit_code

    def _patch_status(
        self,
        *,
        phase: str,
        container_statuses: list[dict[str, Any]],
        init_statuses: list[dict[str, Any]] | None,
    ) -> None:
        from kubernetes.client.exceptions import ApiException

        now = _now()
        ready = "True" if phase == "Running" and all(s.get("ready") for s in container_statuses) else "False"
        initialized = "True" if phase != "Pending" or init_statuses is None else "False"
        status: dict[str, Any] = {
            "phase": phase,
            "hostIP": "127.0.0.1",
            "podIP": "127.0.0.1",
            "podIPs": [{"ip": "127.0.0.1"}],
            "startTime": self._start_time,
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
                {"type": "Initialized", "status": initialized, "lastTransitionTime": now},
                {"type": "ContainersReady", "status": ready, "lastTransitionTime": now},
                {"type": "Ready", "status": ready, "lastTransitionTime": now},
            ],
        }
        if container_statuses:
            status["containerStatuses"] = container_statuses
        if init_statuses:
            status["initContainerStatuses"] = init_statuses
        try:
            self._core.patch_namespaced_pod_status(self.pod_name, self.namespace, {"status": status})
        except ApiException as exc:
            # Deleted under us (the Job controller or a test removed it): nothing left to report to.
            if exc.status == 404:
                self._gone.set()
                self._deleting.set()
                return
            raise


class _Launch:
    """Everything needed to start one container: resolved env, materialised volumes, remapped argv."""

    def __init__(self, worker: _PodWorker, container: dict[str, Any]) -> None:
        self.worker = worker
        self.container = container
        kubelet = worker.kubelet
        self.root = worker.root
        self.volumes_dir = self.root / "volumes"
        self.workdir = self.root / "work"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.termination_log = self.root / f"termination-log-{container['name']}"
        self.log_path = self.root / f"{container['name']}.log"
        self.mounts = self._materialise_mounts()
        self.mounts.append(
            (
                container.get("terminationMessagePath") or DEFAULT_TERMINATION_MESSAGE_PATH,
                self.termination_log,
            )
        )
        # Longest mount path first, so /data/cache wins over /data.
        self.mounts.sort(key=lambda item: len(item[0]), reverse=True)
        self.sa_dir = next((local for path, local in self.mounts if path == SERVICE_ACCOUNT_MOUNT_PATH), None)

        env: dict[str, str] = dict(kubelet._host_env)
        env["HOME"] = str(self.workdir)
        env["HOSTNAME"] = worker.pod_name
        env["KUBERNETES_SERVICE_HOST"] = "127.0.0.1"
        env["KUBERNETES_SERVICE_PORT"] = str(kubelet.cluster.port)
        env["KUBERNETES_SERVICE_PORT_HTTPS"] = str(kubelet.cluster.port)
        if self.sa_dir is not None:
            env["KUBETUNE_SA_DIR"] = str(self.sa_dir)
        pod_env = self._resolve_env()
        env.update({key: self.remap(value) for key, value in pod_env.items()})
        self.env = env

        command = list(container.get("command") or [])
        if not command:
            image = container.get("image", "")
            command = list(kubelet._entrypoints.get(image, []))
            if not command:
                raise _NotReady(
                    "CreateContainerConfigError",
                    f'container "{container["name"]}" has no command and no entrypoint is configured for image '
                    f'"{image}" (FakeKubelet(entrypoints=...))',
                )
        argv = [_expand(part, pod_env) for part in [*command, *(container.get("args") or [])]]
        # argv[0] is a program on this host (a test's interpreter may itself live under /tmp, which a
        # pod mounts as an emptyDir): only the arguments are container paths.
        self.argv = [argv[0], *(self.remap(part) for part in argv[1:])] if argv else []
        working_dir = container.get("workingDir")
        self.cwd = (
            Path(self.remap(working_dir))
            if working_dir and self.remap(working_dir) != working_dir
            else self.workdir
        )

    # -- paths
    def remap(self, value: str) -> str:
        """Rewrite a container path (or the value of a ``--flag=path`` argument) to its local directory."""
        mapped = self._remap_path(value)
        if mapped != value:
            return mapped
        flag, sep, rest = value.partition("=")
        if sep and flag.startswith("-"):
            mapped_rest = self._remap_path(rest)
            if mapped_rest != rest:
                return f"{flag}={mapped_rest}"
        return value

    def _remap_path(self, value: str) -> str:
        for mount_path, local in self.mounts:
            mount_path = mount_path.rstrip("/")
            if mount_path and (value == mount_path or value.startswith(mount_path + "/")):
                return str(local) + value[len(mount_path) :]
        return value

    # -- API reads
    def _read(
        self, kind: str, name: str, optional: bool, *, for_volume: str | None = None
    ) -> dict[str, bytes] | None:
        """Data of a ConfigMap or Secret as bytes; None if optional and missing; _NotReady otherwise."""
        from kubernetes.client.exceptions import ApiException

        core = self.worker._core
        namespace = self.worker.namespace
        try:
            if kind == "secret":
                secret = core.read_namespaced_secret(name, namespace)
                return {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}
            config_map = core.read_namespaced_config_map(name, namespace)
            data = {k: v.encode() for k, v in (config_map.data or {}).items()}
            for key, value in (config_map.binary_data or {}).items():
                data[key] = base64.b64decode(value)
            return data
        except ApiException as exc:
            if exc.status != 404:
                raise
            if optional:
                return None
            label = "secret" if kind == "secret" else "configmap"
            if for_volume is not None:
                raise _NotReady(
                    "ContainerCreating",
                    f'MountVolume.SetUp failed for volume "{for_volume}" : {label} "{name}" not found',
                ) from None
            raise _NotReady("CreateContainerConfigError", f'{label} "{name}" not found') from None

    def _field(self, path: str) -> str:
        pod = self.worker.pod
        meta = pod.get("metadata") or {}
        match = _FIELD_SUBSCRIPT.match(path)
        if match:
            return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
        values = {
            "metadata.name": meta.get("name", ""),
            "metadata.namespace": meta.get("namespace", ""),
            "metadata.uid": meta.get("uid", ""),
            "spec.nodeName": self.worker.kubelet.node_name,
            "spec.serviceAccountName": self.worker.spec.get("serviceAccountName", ""),
            "status.podIP": "127.0.0.1",
            "status.podIPs": "127.0.0.1",
            "status.hostIP": "127.0.0.1",
        }
        if path in ("metadata.labels", "metadata.annotations"):
            items = sorted((meta.get(path.split(".")[1]) or {}).items())
            return "\n".join(f'{k}="{v}"' for k, v in items)
        if path not in values:
            raise _NotReady("CreateContainerConfigError", f"unsupported fieldRef fieldPath {path!r}")
        return str(values[path])

    def _resource(self, ref: dict[str, Any]) -> str:
        from kubernetes.utils import parse_quantity

        resource = ref["resource"]
        container_name = ref.get("containerName") or self.container["name"]
        container = next(
            (c for c in self.worker.spec.get("containers") or [] if c["name"] == container_name),
            self.container,
        )
        kind, _, name = resource.partition(".")
        quantity = ((container.get("resources") or {}).get(kind) or {}).get(name)
        if quantity is None:
            # The kubelet substitutes node allocatable for an unset limit (and 0 for an unset request).
            quantity = _NODE_CAPACITY.get(name, "0") if kind == "limits" else "0"
        divisor = parse_quantity(ref.get("divisor") or "1")
        return str(math.ceil(parse_quantity(quantity) / divisor))

    # -- env
    def _resolve_env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for source in self.container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            for kind, key in (("configmap", "configMapRef"), ("secret", "secretRef")):
                ref = source.get(key)
                if ref:
                    data = self._read(kind, ref["name"], bool(ref.get("optional")))
                    env.update({prefix + k: v.decode(errors="replace") for k, v in (data or {}).items()})
        for var in self.container.get("env") or []:
            name = var["name"]
            if "valueFrom" not in var or var["valueFrom"] is None:
                env[name] = _expand(var.get("value") or "", env)
                continue
            source = var["valueFrom"]
            if source.get("fieldRef"):
                env[name] = self._field(source["fieldRef"]["fieldPath"])
            elif source.get("resourceFieldRef"):
                env[name] = self._resource(source["resourceFieldRef"])
            else:
                for kind, key in (("configmap", "configMapKeyRef"), ("secret", "secretKeyRef")):
                    ref = source.get(key)
                    if not ref:
                        continue
                    optional = bool(ref.get("optional"))
                    data = self._read(kind, ref["name"], optional)
                    if data is None:
                        break
                    if ref["key"] not in data:
                        if optional:
                            break
                        raise _NotReady(
                            "CreateContainerConfigError",
                            f"couldn't find key {ref['key']} in {'Secret' if kind == 'secret' else 'ConfigMap'} "
                            f"{self.worker.namespace}/{ref['name']}",
                        )
                    env[name] = data[ref["key"]].decode(errors="replace")
        return env

    # -- volumes
    def _materialise_mounts(self) -> list[tuple[str, Path]]:
        volumes = {v["name"]: v for v in self.worker.spec.get("volumes") or []}
        mounts: list[tuple[str, Path]] = []
        for mount in self.container.get("volumeMounts") or []:
            volume = volumes.get(mount["name"])
            if volume is None:
                raise _NotReady(
                    "CreateContainerConfigError", f'volume "{mount["name"]}" is not defined in the pod'
                )
            local = self._materialise_volume(volume)
            if mount.get("subPath"):
                local = local / mount["subPath"]
            mounts.append((mount["mountPath"], local))
        return mounts

    def _materialise_volume(self, volume: dict[str, Any]) -> Path:
        name = volume["name"]
        target = self.volumes_dir / name
        if volume.get("persistentVolumeClaim"):
            claim = volume["persistentVolumeClaim"]["claimName"]
            shared = self.worker.kubelet.root / "claims" / self.worker.namespace / claim
            shared.mkdir(parents=True, exist_ok=True)
            return shared
        if volume.get("emptyDir") is not None:
            target.mkdir(parents=True, exist_ok=True)
            return target
        files: dict[str, tuple[bytes, int | None]] = {}
        if volume.get("configMap") or volume.get("secret"):
            files = self._volume_files(volume, name)
        elif volume.get("downwardAPI"):
            files = self._downward_files(volume["downwardAPI"])
        elif volume.get("projected"):
            for source in volume["projected"].get("sources") or []:
                if source.get("serviceAccountToken"):
                    token = source["serviceAccountToken"]
                    files[token["path"]] = (self._request_token(token).encode(), None)
                elif source.get("downwardAPI"):
                    files.update(self._downward_files(source["downwardAPI"]))
                else:
                    files.update(self._volume_files(source, name))
        else:
            kinds = sorted(k for k in volume if k != "name" and volume[k] is not None)
            raise _NotReady("CreateContainerConfigError", f'volume "{name}": unsupported volume type {kinds}')
        # Rewritten on every (re)start, like the kubelet refreshes ConfigMap/Secret volumes.
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for rel, (content, mode) in files.items():
            path = target / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
            if mode is not None:
                path.chmod(mode)
        return target

    def _volume_files(self, source: dict[str, Any], volume_name: str) -> dict[str, tuple[bytes, int | None]]:
        kind = "secret" if source.get("secret") else "configmap"
        ref = source.get("secret") or source.get("configMap") or {}
        name = str(ref.get("secretName") or ref.get("name") or "")
        data = self._read(kind, name, bool(ref.get("optional")), for_volume=volume_name) or {}
        items = ref.get("items")
        if not items:
            return {key: (value, ref.get("defaultMode")) for key, value in data.items()}
        files: dict[str, tuple[bytes, int | None]] = {}
        for item in items:
            if item["key"] not in data:
                raise _NotReady(
                    "ContainerCreating",
                    f'MountVolume.SetUp failed for volume "{volume_name}" : key "{item["key"]}" not found in {name}',
                )
            files[item["path"]] = (data[item["key"]], item.get("mode") or ref.get("defaultMode"))
        return files

    def _downward_files(self, source: dict[str, Any]) -> dict[str, tuple[bytes, int | None]]:
        files: dict[str, tuple[bytes, int | None]] = {}
        for item in source.get("items") or []:
            if item.get("fieldRef"):
                files[item["path"]] = (self._field(item["fieldRef"]["fieldPath"]).encode(), item.get("mode"))
            elif item.get("resourceFieldRef"):
                files[item["path"]] = (self._resource(item["resourceFieldRef"]).encode(), item.get("mode"))
        return files

    def _request_token(self, source: dict[str, Any]) -> str:
        """A bound token for the pod's ServiceAccount through the TokenRequest API, as the kubelet gets one."""
        body: dict[str, Any] = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "expirationSeconds": source.get("expirationSeconds") or 3600,
                "boundObjectRef": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": self.worker.pod_name,
                    "uid": self.worker.uid,
                },
            },
        }
        if source.get("audience"):
            body["spec"]["audiences"] = [source["audience"]]
        account = self.worker.spec.get("serviceAccountName") or "default"
        response = self.worker._core.create_namespaced_service_account_token(
            account, self.worker.namespace, body
        )
        return str(response.status.token)

    # -- process
    def spawn(self) -> PodProcess:
        """Start the process (new session, so signals reach its children too); raises OSError if it cannot."""
        self.termination_log.write_bytes(b"")
        with self.log_path.open("ab") as log_file:
            popen = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        worker = self.worker
        return PodProcess(
            namespace=worker.namespace,
            name=worker.pod_name,
            uid=worker.uid,
            container=self.container["name"],
            argv=self.argv,
            env=self.env,
            pid=popen.pid,
            root=self.root,
            workdir=self.workdir,
            log_path=self.log_path,
            sa_dir=self.sa_dir,
            labels=dict((worker.pod.get("metadata") or {}).get("labels") or {}),
            popen=popen,
        )

    def termination_message(self, *, failed: bool) -> str:
        try:
            message = self.termination_log.read_bytes()[:_MAX_TERMINATION_MESSAGE].decode(errors="replace")
        except OSError:
            message = ""
        if (
            not message
            and failed
            and self.container.get("terminationMessagePolicy") == "FallbackToLogsOnError"
        ):
            try:
                lines = self.log_path.read_text(errors="replace").splitlines()[-80:]
            except OSError:
                lines = []
            message = "\n".join(lines)[-2048:]
        return message


def _expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: known variables are substituted, ``$$`` escapes, unknown stay as-is."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _VAR_REF.sub(replace, value)


def _default_host_env() -> dict[str, str]:
    """PATH with this interpreter's bin dir first, plus the variables in ``_HOST_ENV_PASSTHROUGH``."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", os.defpath)])
    env = {"PATH": path}
    env.update({key: os.environ[key] for key in _HOST_ENV_PASSTHROUGH if key in os.environ})
    return env


def _signal_group(proc: PodProcess, sig: int) -> None:
    """Signal the process group the container's process leads (it was started in its own session)."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
