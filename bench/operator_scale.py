"""Operator at scale: N FineTuneJobs applied at once against a real kube-apiserver.

    .venv/bin/python -m bench.operator_scale                      # 200 jobs, 1 repeat (~3-5 min here)
    .venv/bin/python -m bench.operator_scale --jobs 5 --idle-seconds 5 --reflect 2   # smoke

The bench starts its own control plane (``tests/cluster``: etcd + kube-apiserver v1.20.2 +
kube-controller-manager, binaries from ``tests/cluster/build-kube.sh``), installs the generated
CRDs and the operator's ClusterRoles, and per repeat a fresh namespace with the operator's
ServiceAccount bound to exactly ``rbac.yaml``. The operator runs as its own process
(``python -m kubetune_operator``, the integration tests' environment: standalone, v1.20 compat)
with the **production** resync interval from ``settings.py`` unless ``--resync-seconds`` says
otherwise. There is no kubelet: pods stay Pending, which is all the create path needs.

Per repeat:

1. **Warm-up**: one FineTuneJob, waited for until its Job exists (the operator is then watching;
   it stays in the namespace and is not counted in the latencies).
2. **Burst**: ``--jobs`` FineTuneJobs created by ``--creators`` client threads as fast as the API
   server takes them. Creation time = client clock right after the create call returned.
   Two watches opened before the burst (admin token, raw JSON events) time what the operator did:
   *create -> children* = the ADDED event of the FineTuneJob's batch/v1 Job (the operator creates it
   last, after ServiceAccount, Role, RoleBinding, Service and ConfigMap); *create -> status seen* =
   the first FineTuneJob event whose status carries ``observedGeneration``. Afterwards every
   FineTuneJob's children are listed and counted by ownerReference (all six kinds must be there).
3. **Idle CPU**: once the Job controller has made every Job's pod and the operator's own metrics
   show no reconcile or child-event handler run for 5 s (its backlog is worked off), the operator's utime+stime (``/proc/<pid>/stat``) over ``--idle-seconds`` (default: one full
   resync period, at least 30 s), as % of one core. Its periodic timer (one per FineTuneJob, every
   ``resync_seconds``) is what runs then.
4. **Status reflection**: for ``--reflect`` of the jobs, one at a time, the child Job's status is
   patched (admin, ``/status`` subresource) with a ``Failed`` condition (reason
   ``BackoffLimitExceeded``), which the operator's reducer maps to FineTuneJob phase ``Failed``;
   latency = patch sent -> FineTuneJob watch event with that phase. The operator watches its Jobs
   (``kopf.on.event`` on batch/v1 Jobs with its managed-by label), so this is the event-driven
   path; a value near ``resync_seconds`` would mean the event was missed and the timer caught it.
5. **Peak RSS**: the operator's VmHWM at the end; its handler timings from its own /metrics.
6. **API requests per FineTuneJob**: from the API server's own audit log (the cluster runs with
   ``audit=True``), the operator ServiceAccount's requests from the burst's start until the operator
   was quiet (step 3), by verb and resource, watches excluded (``bench/_audit.py``).
7. **The box's limit** (unless ``--no-limit``): in a fresh namespace, the same burst of FineTuneJobs
   and, per FineTuneJob, the same six children (rendered by the operator's builders beforehand),
   one status patch and one Event, sent by a bare client with the operator's token and worker count
   (:func:`bare_client_burst`). The operator's burst wall over that wall is its distance from what
   this API server can do.

Targets (issue 8, item 6; issue 19, item 4): create -> children p50 <= 1 s and p99 <= 10 s, peak
RSS <= 300 MB (MB = 10^6 bytes), idle CPU ~0, taken here as <= 2% of one core; burst wall <= 1.2x
the bare client's; requests per FineTuneJob <= its 6 children + one status patch + one Event. The control plane and the
operator share this machine's cores with the bench (and with whatever else runs): the load
average at start is printed with the results.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import _audit
from bench._common import REPO_ROOT, format_machine, format_table, machine_info, median, verdict

GROUP, VERSION, PLURAL = "kubetune.io", "v1alpha1", "finetunejobs"
MANAGED_SELECTOR = "app.kubernetes.io/managed-by=kubetune-operator"
CHILD_KINDS = ("ServiceAccount", "Role", "RoleBinding", "Service", "ConfigMap", "Job")
BUILD_SCRIPT = REPO_ROOT / "tests" / "cluster" / "build-kube.sh"
OPERATOR_SA = "kubetune-operator"
MB = 1_000_000

TARGET_P50_S = 1.0
TARGET_P99_S = 10.0
TARGET_OVER_LIMIT = 1.2  # operator burst wall / the bare client's wall for the same objects
#: What the operator must send per FineTuneJob: its six children, one status patch, one Event.
MINIMUM_REQUESTS_PER_JOB = len(CHILD_KINDS) + 2
TARGET_RSS_MB = 300.0
TARGET_IDLE_CPU_PCT = 2.0  # "~0": at most 2% of one core


# --- small helpers ----------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of a non-empty sequence; raises ValueError if empty.

    Nearest rank, not interpolation: with 200 samples p99 is the 198th smallest, a value that
    was actually observed.
    """
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n*q/100), at least 1
    return float(ordered[int(rank) - 1])


def latency_summary(values: Sequence[float]) -> dict[str, float | int | None]:
    """n, p50, p99 and max of ``values`` (seconds); None fields when there are none."""
    if not values:
        return {"n": 0, "p50": None, "p99": None, "max": None}
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "max": max(values),
    }


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` in seconds (``/proc/<pid>/stat``); raises OSError when it is gone."""
    text = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may contain spaces; everything after its ')' is space-separated.
    fields = text.rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of stat(5)
    return ticks / os.sysconf("SC_CLK_TCK")


def child_cpu_seconds(operator_pid: int) -> dict[str, float]:
    """utime+stime of each direct child of this process by name (etcd, kube-apiserver, ..., operator).

    The control plane and the operator are this bench's children, so this finds them without
    reaching into LocalCluster; processes that are gone are skipped.
    """
    me = os.getpid()
    out: dict[str, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) != me:  # field 4: ppid
                continue
            name = "operator" if int(entry.name) == operator_pid else (entry / "comm").read_text().strip()
            out[name] = out.get(name, 0.0) + proc_cpu_seconds(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return out


def proc_status_bytes(pid: int, key: str) -> int:
    """A ``kB`` field of ``/proc/<pid>/status`` (VmHWM, VmRSS) in bytes; raises KeyError when absent."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(f"{key} not in /proc/{pid}/status")


def kube_bin_dir() -> Path:
    """The cached control-plane binaries (build-kube.sh is a no-op printing the directory once built).

    The same call as the ``kube_bin_dir`` test fixture, without pytest. Raises RuntimeError when the
    script fails (a cold build takes ~11 minutes on 2 cores and is done by the script itself).
    """
    result = subprocess.run(["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, text=True, check=False)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise RuntimeError(
            f"{BUILD_SCRIPT} failed (exit {result.returncode}); its stderr names the build log"
        )
    return Path(lines[-1])


def wait_until(what: str, probe: Callable[[], Any], timeout: float, interval: float = 0.2) -> Any:
    """Poll ``probe`` until truthy; raise TimeoutError naming ``what`` and the last value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


# --- cluster set-up ---------------------------------------------------------------------------


def install_crds_and_roles(cluster: Any) -> None:
    """The generated CRDs (waited for until Established) and the operator's ClusterRoles.

    The same steps as the ``crds_installed`` test fixture (replicated: that one is a pytest fixture).
    """
    import yaml
    from kubernetes import client

    from kubetune_operator import rbac

    with cluster.api_client() as api:
        ext = client.ApiextensionsV1Api(api)
        for path in sorted((REPO_ROOT / "crds").glob("*.yaml")):
            ext.create_custom_resource_definition(yaml.safe_load(path.read_text()))

        def established(name: str) -> bool:
            conditions = ext.read_custom_resource_definition(name).status.conditions or []
            return any(c.type == "Established" and c.status == "True" for c in conditions)

        for name in (f"{PLURAL}.{GROUP}", f"modelversions.{GROUP}"):
            wait_until(f"CRD {name} Established", functools.partial(established, name), timeout=60)
        rbac_api = client.RbacAuthorizationV1Api(api)
        for role in rbac.operator_cluster_roles():
            rbac_api.create_cluster_role(role)


def operator_namespace(cluster: Any, namespace: str) -> Path:
    """Create ``namespace`` with the operator's ServiceAccount bound to rbac.yaml; return its kubeconfig."""
    from kubernetes import client, utils

    from kubetune_operator import rbac

    with cluster.api_client() as admin:
        core = client.CoreV1Api(admin)
        core.create_namespace({"metadata": {"name": namespace}})
        core.create_namespaced_service_account(namespace, {"metadata": {"name": OPERATOR_SA}})
        for binding in rbac.operator_bindings(namespace, OPERATOR_SA, [namespace]):
            utils.create_from_dict(admin, binding)
    token = cluster.service_account_token(namespace, OPERATOR_SA, timeout=60)
    path: Path = cluster.kubeconfig_for_token(token, name=f"operator-{namespace}")
    return path


def start_operator(
    kubeconfig: Path,
    namespace: str,
    log: Path,
    resync_seconds: float | None,
    metrics_port: int,
    extra_env: Mapping[str, str] | None = None,
) -> Any:
    """``python -m kubetune_operator`` as the integration tests run it, but with production resync.

    Reuses :class:`tests.fixtures.operator.OperatorProcess` (same environment: standalone, v1.20
    compat, least-privilege kubeconfig) and replaces its 3 s test resync with ``resync_seconds``
    or, when None, the default of ``OperatorSettings``; ``extra_env`` adds or overrides settings.
    """
    from tests.fixtures.operator import OperatorProcess

    proc = OperatorProcess(
        kubeconfig,
        namespace,
        log,
        {
            "KUBETUNE_OPERATOR_METRICS_PORT": str(metrics_port),
            "KUBETUNE_OPERATOR_METRICS_ADDRESS": "127.0.0.1",
        },
    )
    proc.env.pop("KUBETUNE_OPERATOR_RESYNC_SECONDS", None)
    if resync_seconds is not None:
        proc.env["KUBETUNE_OPERATOR_RESYNC_SECONDS"] = str(resync_seconds)
    proc.env.update(extra_env or {})
    proc.start()
    return proc


def handler_timings(metrics_port: int) -> dict[str, dict[str, float]]:
    """Per-handler run count and mean/total seconds from the operator's /metrics ({} if unreachable)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "kubetune_reconcile_duration_seconds":
            continue
        for sample in family.samples:
            handler = sample.labels.get("handler", "?")
            if sample.name.endswith("_count"):
                out.setdefault(handler, {})["count"] = sample.value
            elif sample.name.endswith("_sum"):
                out.setdefault(handler, {})["total_s"] = sample.value
    for stats in out.values():
        stats["mean_s"] = stats.get("total_s", 0.0) / stats["count"] if stats.get("count") else 0.0
    return out


# --- watching ---------------------------------------------------------------------------------


class Watcher(threading.Thread):
    """Follows one list endpoint's watch (raw JSON, no model deserialisation) and calls ``on_event``.

    Each event is handed over with the monotonic time it arrived. Re-opens the watch from the last
    resourceVersion when the server ends it; :meth:`stop` ends it within ``chunk_s`` seconds.
    """

    def __init__(
        self,
        list_call: Callable[..., Any],
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        on_event: Callable[[str, dict[str, Any], float], None],
        chunk_s: int = 5,
    ) -> None:
        super().__init__(daemon=True)
        self._list = list_call
        self._args = list(args)
        self._kwargs = dict(kwargs)
        self._on_event = on_event
        self._chunk_s = chunk_s
        self._stopping = threading.Event()
        self.ready = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        from kubernetes import watch

        try:
            initial = self._list(*self._args, **self._kwargs, _preload_content=False)
            rv = json.loads(initial.data)["metadata"]["resourceVersion"]
            self.ready.set()
            while not self._stopping.is_set():
                w = watch.Watch()
                for event in w.stream(
                    self._list,
                    *self._args,
                    **self._kwargs,
                    resource_version=rv,
                    timeout_seconds=self._chunk_s,
                    deserialize=False,
                ):
                    now = time.monotonic()
                    obj = event["object"]
                    if event["type"] == "ERROR":
                        raise RuntimeError(f"watch error: {obj}")
                    rv = obj["metadata"]["resourceVersion"]
                    self._on_event(event["type"], obj, now)
                    if self._stopping.is_set():
                        break
        except BaseException as exc:  # reported by the main thread, which owns the run
            self.error = exc
            self.ready.set()

    def stop(self) -> None:
        """Ask the thread to end (it does at the next event or watch chunk end)."""
        self._stopping.set()


@dataclass
class Timeline:
    """Arrival times of what the watches saw, keyed by FineTuneJob uid / name. Thread-safe."""

    job_added: dict[str, float] = field(default_factory=dict)  # FTJ uid -> Job ADDED
    status_seen: dict[str, float] = field(
        default_factory=dict
    )  # FTJ name -> first status with observedGeneration
    phase_events: dict[str, list[tuple[float, str]]] = field(default_factory=dict)  # name -> (t, phase)
    child_events: list[tuple[float, str]] = field(default_factory=list)  # (t, "Job MODIFIED") ...
    # Re-entrant: wait_for's predicates call the public readers, which take the lock again.
    lock: threading.RLock = field(default_factory=threading.RLock)
    changed: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self.changed = threading.Condition(self.lock)

    def on_job(self, kind: str, obj: dict[str, Any], now: float) -> None:
        with self.lock:
            self.child_events.append((now, f"Job {kind}"))
            if kind != "ADDED":
                return
            for ref in obj["metadata"].get("ownerReferences") or []:
                if ref.get("kind") == "FineTuneJob":
                    self.job_added.setdefault(ref["uid"], now)
            self.changed.notify_all()

    def on_pod(self, kind: str, obj: dict[str, Any], now: float) -> None:
        del obj
        with self.lock:
            self.child_events.append((now, f"Pod {kind}"))

    def child_events_between(self, start: float, end: float) -> dict[str, int]:
        """Watch events of the operator's Jobs and pods that arrived in [start, end), by kind and type."""
        with self.lock:
            out: dict[str, int] = {}
            for t, what in self.child_events:
                if start <= t < end:
                    out[what] = out.get(what, 0) + 1
            return out

    def on_ftj(self, kind: str, obj: dict[str, Any], now: float) -> None:
        del kind
        name = obj["metadata"]["name"]
        st = obj.get("status") or {}
        with self.lock:
            if st.get("observedGeneration") is not None:
                self.status_seen.setdefault(name, now)
            if st.get("phase"):
                events = self.phase_events.setdefault(name, [])
                if not events or events[-1][1] != st["phase"]:
                    events.append((now, st["phase"]))
            self.changed.notify_all()

    def wait_for(self, what: str, done: Callable[[], bool], timeout: float) -> None:
        """Block until ``done()`` (called under the lock) is true; TimeoutError naming ``what``."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while not done():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
                self.changed.wait(min(left, 1.0))

    def reached(self, name: str, phase: str, since: float) -> bool:
        """Whether ``name`` showed ``phase`` at or after ``since``."""
        return self.phase_at_or_after(name, phase, since) is not None

    def phase_at_or_after(self, name: str, phase: str, since: float) -> float | None:
        with self.lock:
            return next((t for t, p in self.phase_events.get(name, []) if p == phase and t >= since), None)


# --- one repeat -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunOptions:
    """What one repeat does (see the module docstring)."""

    jobs: int
    creators: int
    reflect: int
    idle_seconds: float | None
    resync_seconds: float | None
    timeout_s: float
    operator_env: Mapping[str, str] = field(default_factory=dict)


def _progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _ftj_body(name: str) -> dict[str, Any]:
    from tests.fixtures.operator import finetunejob

    return finetunejob(name, f"bench-{name}")


def _count_children(admin: Any, namespace: str) -> dict[str, dict[str, int]]:
    """FineTuneJob uid -> {kind: number of objects of that kind it owns} for the child kinds."""
    from kubernetes import client

    core = client.CoreV1Api(admin)
    rbac = client.RbacAuthorizationV1Api(admin)
    batch = client.BatchV1Api(admin)
    lists: dict[str, Callable[..., Any]] = {
        "ServiceAccount": core.list_namespaced_service_account,
        "Role": rbac.list_namespaced_role,
        "RoleBinding": rbac.list_namespaced_role_binding,
        "Service": core.list_namespaced_service,
        "ConfigMap": core.list_namespaced_config_map,
        "Job": batch.list_namespaced_job,
    }
    owned: dict[str, dict[str, int]] = {}
    for kind, list_call in lists.items():
        raw = json.loads(list_call(namespace, _preload_content=False).data)
        for item in raw["items"]:
            for ref in item["metadata"].get("ownerReferences") or []:
                if ref.get("kind") == "FineTuneJob":
                    per = owned.setdefault(ref["uid"], dict.fromkeys(CHILD_KINDS, 0))
                    per[kind] += 1
    return owned


def _create_all(
    cluster: Any,
    namespace: str,
    names: Sequence[str],
    creators: int,
    on_created: Callable[[str, str], None] | None = None,
) -> dict[str, tuple[str, float]]:
    """Create the FineTuneJobs from ``creators`` threads; name -> (uid, monotonic time the create returned).

    ``on_created(name, uid)`` is called in the creating thread right after each create returned."""
    from kubernetes import client

    local = threading.local()
    clients: list[Any] = []
    lock = threading.Lock()

    def api() -> Any:
        if not hasattr(local, "custom"):
            admin = cluster.api_client()
            with lock:
                clients.append(admin)
            local.custom = client.CustomObjectsApi(admin)
        return local.custom

    def create(name: str) -> tuple[str, str, float]:
        created = api().create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, _ftj_body(name))
        returned = time.monotonic()
        if on_created is not None:
            on_created(name, created["metadata"]["uid"])
        return name, created["metadata"]["uid"], returned

    try:
        with ThreadPoolExecutor(max_workers=creators, thread_name_prefix="creator") as pool:
            results = list(pool.map(create, names))
    finally:
        for admin in clients:
            admin.close()
    return {name: (uid, t) for name, uid, t in results}


def run_once(cluster: Any, opts: RunOptions, work: Path, index: int) -> dict[str, Any]:
    """One repeat in a fresh namespace with a fresh operator; returns its measurements."""
    from kubernetes import client

    from kubetune_operator.settings import OperatorSettings
    from tests.cluster.cluster import free_port

    namespace = f"bench-{index}-{uuid.uuid4().hex[:6]}"
    resync = (
        opts.resync_seconds
        if opts.resync_seconds is not None
        else float(
            opts.operator_env.get("KUBETUNE_OPERATOR_RESYNC_SECONDS", OperatorSettings().resync_seconds)
        )
    )
    idle_window = opts.idle_seconds if opts.idle_seconds is not None else max(30.0, resync)
    kubeconfig = operator_namespace(cluster, namespace)
    log = work / f"operator-{index}.log"
    metrics_port = free_port()
    operator = start_operator(
        kubeconfig, namespace, log, opts.resync_seconds, metrics_port, opts.operator_env
    )
    pid = operator.proc.pid
    admin = cluster.api_client()
    timeline = Timeline()
    watchers: list[Watcher] = []
    try:
        batch = client.BatchV1Api(admin)
        custom = client.CustomObjectsApi(admin)
        core = client.CoreV1Api(admin)
        watchers = [
            Watcher(
                batch.list_namespaced_job, [namespace], {"label_selector": MANAGED_SELECTOR}, timeline.on_job
            ),
            Watcher(
                custom.list_namespaced_custom_object, [GROUP, VERSION, namespace, PLURAL], {}, timeline.on_ftj
            ),
            # Only counted: what reaches the operator's job-changed/pod-changed handlers while "idle".
            Watcher(
                core.list_namespaced_pod, [namespace], {"label_selector": MANAGED_SELECTOR}, timeline.on_pod
            ),
        ]
        for w in watchers:
            w.start()
        for w in watchers:
            w.ready.wait(60)
            if w.error is not None:
                raise RuntimeError(f"watch failed to start: {w.error}")

        # Warm-up: the operator is up and watching once it made this one's Job.
        warm = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, _ftj_body("warmup"))
        try:
            timeline.wait_for(
                "the warm-up FineTuneJob's Job",
                lambda: warm["metadata"]["uid"] in timeline.job_added,
                timeout=120,
            )
        except TimeoutError as exc:
            raise TimeoutError(
                f"{exc}; operator log {log}:\n{log.read_text(errors='replace')[-3000:]}"
            ) from None
        # ... and has finished with it (its Job's first update included), so the burst's request
        # count and CPU hold the burst's jobs only.
        _wait_quiet(metrics_port, quiet_s=2.0, limit_s=60.0)
        cpu_before_burst = proc_cpu_seconds(pid)
        procs_before = child_cpu_seconds(pid)

        names = [f"ftj-{i:04d}" for i in range(opts.jobs)]
        burst_since = datetime.datetime.now(datetime.UTC)
        burst_start = time.monotonic()
        created = _create_all(cluster, namespace, names, opts.creators)
        create_wall = time.monotonic() - burst_start
        uids = {uid for uid, _ in created.values()}
        print(
            f"[bench] repeat {index + 1}: created {len(created)} FineTuneJobs in {create_wall:.1f} s",
            file=sys.stderr,
            flush=True,
        )
        missing_note = ""
        try:
            timeline.wait_for(
                "every FineTuneJob's Job and status",
                lambda: uids <= timeline.job_added.keys() and set(names) <= timeline.status_seen.keys(),
                timeout=opts.timeout_s,
            )
        except TimeoutError as exc:
            # Reported with what did arrive; the verdicts then say MISS.
            with timeline.lock:
                got_jobs = len(uids & timeline.job_added.keys())
                got_status = len(set(names) & timeline.status_seen.keys())
            missing_note = f"{exc}: {got_jobs}/{len(uids)} Jobs seen, {got_status}/{len(names)} statuses seen"
        all_done = time.monotonic()
        cpu_burst = proc_cpu_seconds(pid) - cpu_before_burst
        procs_after = child_cpu_seconds(pid)
        burst_cpu_pct = {
            name: 100.0 * (procs_after[name] - procs_before.get(name, 0.0)) / (all_done - burst_start)
            for name in procs_after
        }

        to_children = [
            timeline.job_added[uid] - t for uid, t in created.values() if uid in timeline.job_added
        ]
        to_status = [timeline.status_seen[n] - created[n][1] for n in names if n in timeline.status_seen]
        _progress(
            f"repeat {index + 1}: children and statuses after {all_done - burst_start:.1f} s {missing_note}"
        )
        children = _count_children(admin, namespace)
        complete = sum(1 for uid in uids if all(children.get(uid, {}).get(k, 0) >= 1 for k in CHILD_KINDS))

        # Idle: wait for the Job controller to have made every pod (their events reach the operator too).
        def pods_made() -> bool:
            pods = json.loads(
                core.list_namespaced_pod(
                    namespace, label_selector=MANAGED_SELECTOR, _preload_content=False
                ).data
            )["items"]
            return len(pods) >= len(uids) + 1

        try:
            wait_until("a pod for every Job", pods_made, timeout=120, interval=1.0)
        except TimeoutError as exc:
            print(f"[bench] warning: {exc}", file=sys.stderr, flush=True)
        # "Idle" starts when the operator has worked through its backlog of child events: no
        # reconcile or child handler run finished for 5 s (its own metrics). Only the timer runs then.
        settle_start = time.monotonic()
        _wait_quiet(metrics_port, quiet_s=5.0, limit_s=300.0)
        settle_s = time.monotonic() - settle_start
        # Every request the operator made for the burst, from the API server's own audit log: from
        # the first create until it went quiet (its later refreshes for the Job controller's updates
        # and the new pods included; watches not: one long request each, not per object).
        quiet_at = datetime.datetime.now(datetime.UTC)
        requests = _audit.requests_of(
            cluster.audit_events(), _audit.service_account_user(namespace, OPERATOR_SA), burst_since, quiet_at
        )
        _progress(
            f"repeat {index + 1}: operator quiet after {settle_s:.0f} s; idle CPU for {idle_window:g} s"
        )
        runs0 = handler_timings(metrics_port)
        cpu0, t0 = proc_cpu_seconds(pid), time.monotonic()
        time.sleep(idle_window)
        idle_cpu_s = proc_cpu_seconds(pid) - cpu0
        t1 = time.monotonic()
        idle_cpu_pct = 100.0 * idle_cpu_s / (t1 - t0)
        idle_child_events = timeline.child_events_between(t0, t1)
        runs1 = handler_timings(metrics_port)
        idle_runs = {
            h: int(runs1[h].get("count", 0) - runs0.get(h, {}).get("count", 0))
            for h in runs1
            if runs1[h].get("count", 0) > runs0.get(h, {}).get("count", 0)
        }

        _progress(f"repeat {index + 1}: idle CPU {idle_cpu_pct:.2f}% of a core; timing status reflection")
        # Reflection, one at a time: Job status -> FineTuneJob status.
        reflect_names = (
            [names[i * len(names) // opts.reflect] for i in range(opts.reflect)] if opts.reflect else []
        )
        reflect: list[float] = []
        reinjected = 0
        for name in reflect_names:
            job_name = timeline_job_name(batch, namespace, created[name][0])
            if job_name is None:
                continue
            patched = _inject_job_failure(batch, namespace, job_name)
            deadline = patched + max(60.0, 3 * resync)
            while time.monotonic() < deadline:
                try:
                    timeline.wait_for(
                        f"{name} phase Failed",
                        functools.partial(timeline.reached, name, "Failed", patched),
                        5.0,
                    )
                    break
                except TimeoutError:
                    # The v1.20 Job controller re-reads the Job and rewrites its whole status; an
                    # in-flight sync can drop the injected condition. Re-inject and time from then.
                    if not _job_failed(batch, namespace, job_name):
                        reinjected += 1
                        patched = _inject_job_failure(batch, namespace, job_name)
            seen = timeline.phase_at_or_after(name, "Failed", patched)
            if seen is not None:
                reflect.append(seen - patched)

        peak_rss = proc_status_bytes(pid, "VmHWM")
        rss_now = proc_status_bytes(pid, "VmRSS")
        timings = handler_timings(metrics_port)
        control_plane_rss = cluster.process_rss_bytes()
    finally:
        for w in watchers:
            w.stop()
        operator.stop()
        admin.close()
    for w in watchers:
        w.join(timeout=15)
    return {
        "namespace": namespace,
        "jobs": opts.jobs,
        "creators": opts.creators,
        "resync_seconds": resync,
        "operator_env": dict(opts.operator_env),
        "create_wall_s": create_wall,
        "create_rate_per_s": opts.jobs / create_wall if create_wall > 0 else None,
        "burst_wall_s": all_done - burst_start,
        "incomplete": missing_note or None,
        "create_to_children_s": latency_summary(to_children),
        "create_to_status_s": latency_summary(to_status),
        "children_complete": complete,
        "children_per_kind": {
            k: sum(1 for uid in uids if children.get(uid, {}).get(k, 0) >= 1) for k in CHILD_KINDS
        },
        "operator_cpu_burst_s": cpu_burst,
        "operator_requests": dict(requests),
        "operator_requests_per_job": _audit.per_job(requests, opts.jobs),
        "requests_window": [burst_since.isoformat(), quiet_at.isoformat()],
        "idle_window_s": idle_window,
        "idle_cpu_pct": idle_cpu_pct,
        "settle_s": settle_s,
        "idle_handler_runs": idle_runs,
        "idle_child_events": idle_child_events,
        # What one handler run costs at idle: with only resync running, idle CPU ~ N * this / resync.
        "idle_cpu_ms_per_handler_run": 1000.0 * idle_cpu_s / sum(idle_runs.values()) if idle_runs else None,
        "burst_cpu_pct_of_core": burst_cpu_pct,
        "reflect_s": latency_summary(reflect),
        "reflect_attempted": len(reflect_names),
        "reflect_reinjected": reinjected,
        "peak_rss_bytes": peak_rss,
        "rss_end_bytes": rss_now,
        "handler_timings": timings,
        "control_plane_rss_bytes": control_plane_rss,
        "samples": {
            "create_to_children_s": sorted(to_children),
            "create_to_status_s": sorted(to_status),
            "reflect_s": reflect,
        },
        "operator_log": log.name,  # a file of the run's temporary work directory (printed as logs:)
    }


# --- the box's limit: the same objects from a bare client ---------------------------------------


def bare_client_burst(cluster: Any, opts: RunOptions, work: Path, index: int) -> dict[str, Any]:
    """The physical limit of this API server for the operator's work: the same burst of FineTuneJobs
    (``opts.creators`` threads) and, per FineTuneJob, the same six children, one status patch and
    one Event, sent by a plain client with the operator's token, connection pool and worker count
    (``OperatorSettings.max_workers``) — no kopf, no watches, no validation, no status reduction.
    The children are rendered by the operator's builders before the clock starts (only the owner's
    uid is filled in afterwards). Wall = burst start -> last request answered."""
    import copy

    from kubernetes import client

    from kubetune_operator import reconcile
    from kubetune_operator.settings import OperatorSettings
    from kubetune_operator.validation import validate_job
    from tests.fixtures.operator import OperatorProcess

    namespace = f"bare-{index}-{uuid.uuid4().hex[:6]}"
    kubeconfig = operator_namespace(cluster, namespace)
    # The operator's own settings (the environment its process gets), so the children are the same.
    env = OperatorProcess(kubeconfig, namespace, work / "unused.log", {}).env
    env.pop("KUBETUNE_OPERATOR_RESYNC_SECONDS", None)
    env.update(opts.operator_env)
    settings = OperatorSettings.from_env(env)
    names = [f"ftj-{i:04d}" for i in range(opts.jobs)]
    templates: dict[str, list[dict[str, Any]]] = {}
    for name in names:
        body = _ftj_body(name)
        body["metadata"].update(namespace=namespace, uid="00000000-0000-0000-0000-000000000000", generation=1)
        templates[name] = reconcile.desired_children(validate_job(body, settings), settings)
    configuration = client.Configuration()
    from kubernetes import config as kube_config

    kube_config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
    configuration.connection_pool_maxsize = settings.max_workers
    api = client.ApiClient(configuration)
    custom = client.CustomObjectsApi(api)
    core = client.CoreV1Api(api)
    creators = reconcile.child_creators(api)  # the same create calls the operator makes
    since = datetime.datetime.now(datetime.UTC)

    def children(name: str, uid: str) -> None:
        for template in templates[name]:
            obj = copy.deepcopy(template)
            for ref in obj["metadata"].get("ownerReferences") or []:
                ref["uid"] = uid
            creators[obj["kind"]][0](namespace, obj, _preload_content=False)
        custom.patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
            {
                "status": {
                    "observedGeneration": 1,
                    "phase": "Pending",
                    "jobName": templates[name][-1]["metadata"]["name"],
                }
            },
            _preload_content=False,
        )
        core.create_namespaced_event(
            namespace,
            {
                "metadata": {"generateName": f"{name}."},
                "involvedObject": {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": "FineTuneJob",
                    "name": name,
                    "namespace": namespace,
                    "uid": uid,
                },
                "reason": "Created",
                "message": "created its children",
                "type": "Normal",
                "source": {"component": "bare-client"},
            },
            _preload_content=False,
        )

    try:
        start = time.monotonic()
        with ThreadPoolExecutor(max_workers=settings.max_workers, thread_name_prefix="bare") as workers:
            futures: list[Any] = []
            _create_all(
                cluster,
                namespace,
                names,
                opts.creators,
                on_created=lambda name, uid: futures.append(workers.submit(children, name, uid)),
            )
            for future in list(futures):
                future.result()
        wall = time.monotonic() - start
    finally:
        api.close()
    until = datetime.datetime.now(datetime.UTC)
    user = _audit.service_account_user(namespace, OPERATOR_SA)
    counts = _audit.requests_of(cluster.audit_events(), user, since, until)
    return {
        "namespace": namespace,
        "jobs": opts.jobs,
        "workers": settings.max_workers,
        "wall_s": wall,
        "requests": dict(counts),
        "requests_per_job": _audit.per_job(counts, opts.jobs),
    }


def _wait_quiet(metrics_port: int, *, quiet_s: float, limit_s: float) -> None:
    """Until no reconcile or child handler run finished for ``quiet_s`` (the operator's own metrics),
    or ``limit_s`` passed."""
    started = time.monotonic()

    def event_work() -> float:
        timings = handler_timings(metrics_port)
        return sum(timings.get(h, {}).get("count", 0.0) for h in ("reconcile", "child"))

    last, stable_since = event_work(), time.monotonic()
    while time.monotonic() - stable_since < quiet_s and time.monotonic() - started < limit_s:
        time.sleep(min(1.0, quiet_s / 4))
        now_count = event_work()
        if now_count != last:
            last, stable_since = now_count, time.monotonic()


def _inject_job_failure(batch: Any, namespace: str, job_name: str) -> float:
    """Give the Job a Failed condition through /status; returns the monotonic time the patch was sent.

    Sent, not returned: the operator can react and its FineTuneJob event reach our watch thread
    before this thread gets the patch's response back, so "returned" would miss fast reflections.
    The latency therefore includes the patch's own round trip (an upper bound).
    """
    sent = time.monotonic()
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    condition = {
        "type": "Failed",
        "status": "True",
        "reason": "BackoffLimitExceeded",
        "message": "bench: injected failure",
        "lastProbeTime": now,
        "lastTransitionTime": now,
    }
    batch.patch_namespaced_job_status(
        job_name, namespace, {"status": {"failed": 1, "conditions": [condition]}}
    )
    return sent


def _job_failed(batch: Any, namespace: str, job_name: str) -> bool:
    raw = json.loads(batch.read_namespaced_job_status(job_name, namespace, _preload_content=False).data)
    return any(
        c.get("type") == "Failed" and c.get("status") == "True"
        for c in raw.get("status", {}).get("conditions") or []
    )


def timeline_job_name(batch: Any, namespace: str, ftj_uid: str) -> str | None:
    """Name of the batch/v1 Job owned by the FineTuneJob with ``ftj_uid`` (None when there is none)."""
    raw = json.loads(
        batch.list_namespaced_job(namespace, label_selector=MANAGED_SELECTOR, _preload_content=False).data
    )
    for item in raw["items"]:
        if any(ref.get("uid") == ftj_uid for ref in item["metadata"].get("ownerReferences") or []):
            return str(item["metadata"]["name"])
    return None


# --- reporting --------------------------------------------------------------------------------


def _med(runs: Iterable[Mapping[str, Any]], get: Callable[[Mapping[str, Any]], float | None]) -> float | None:
    vals = [v for r in runs if (v := get(r)) is not None]
    return median(vals) if vals else None


def summarize(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Medians over repeats of each figure, with a PASS/MISS verdict per target.

    A repeat where some job never got its children counts as a MISS for the latency targets,
    whatever its percentiles of the jobs that did.
    """
    complete = all(r["children_complete"] == r["jobs"] and not r["incomplete"] for r in runs)
    p50 = _med(runs, lambda r: r["create_to_children_s"]["p50"])
    p99 = _med(runs, lambda r: r["create_to_children_s"]["p99"])
    rss = _med(runs, lambda r: r["peak_rss_bytes"] / MB)
    idle = _med(runs, lambda r: r["idle_cpu_pct"])
    targets = {
        "create_to_children_p50_s": {
            "value": p50,
            "target": f"<= {TARGET_P50_S:g} s",
            "verdict": verdict(p50, TARGET_P50_S, higher_is_better=False) if complete else "MISS",
        },
        "create_to_children_p99_s": {
            "value": p99,
            "target": f"<= {TARGET_P99_S:g} s",
            "verdict": verdict(p99, TARGET_P99_S, higher_is_better=False) if complete else "MISS",
        },
        "peak_rss_mb": {
            "value": rss,
            "target": f"<= {TARGET_RSS_MB:g} MB",
            "verdict": verdict(rss, TARGET_RSS_MB, higher_is_better=False),
        },
        "idle_cpu_pct_of_core": {
            "value": idle,
            "target": f"<= {TARGET_IDLE_CPU_PCT:g}% (~0)",
            "verdict": verdict(idle, TARGET_IDLE_CPU_PCT, higher_is_better=False),
        },
    }
    limited = [r for r in runs if r.get("burst_wall_over_limit") is not None]
    if limited:
        ratio = _med(limited, lambda r: r["burst_wall_over_limit"])
        targets["burst_wall_over_bare_client"] = {
            "value": ratio,
            "target": f"<= {TARGET_OVER_LIMIT:g}x",
            "verdict": verdict(ratio, TARGET_OVER_LIMIT, higher_is_better=False),
        }
    per_job = _med(
        runs,
        lambda r: sum(r["operator_requests_per_job"].values()) if "operator_requests_per_job" in r else None,
    )
    if per_job is not None:
        targets["operator_requests_per_job"] = {
            "value": per_job,
            "target": f"<= {MINIMUM_REQUESTS_PER_JOB} (6 children + status patch + Event)",
            "verdict": verdict(per_job, MINIMUM_REQUESTS_PER_JOB, higher_is_better=False),
        }
    return {"all_children_created": complete, "targets": targets}


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def print_report(
    info: Mapping[str, Any],
    load: tuple[float, float, float],
    runs: Sequence[Mapping[str, Any]],
    summary: Mapping[str, Any],
) -> None:
    """The tables: per-repeat latencies and resources, then the targets."""
    print(format_machine(info))
    first = runs[0]
    print(
        f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {first['jobs']} FineTuneJobs per repeat "
        f"from {first['creators']} creator threads (+1 warm-up); operator resync {first['resync_seconds']:g} s; "
        f"kube-apiserver v1.20.2 + etcd + controller-manager on this machine"
    )
    if first["operator_env"]:
        print("operator settings changed: " + " ".join(f"{k}={v}" for k, v in first["operator_env"].items()))
    rows = []
    for i, r in enumerate(runs, 1):
        for label, key in (
            ("create -> children", "create_to_children_s"),
            ("create -> status seen", "create_to_status_s"),
            ("child status -> FTJ status", "reflect_s"),
        ):
            st = r[key]
            rows.append([i, label, st["n"], _s(st["p50"]), _s(st["p99"]), _s(st["max"])])
    print(format_table(["repeat", "latency (s)", "n", "p50", "p99", "max"], rows))
    print()
    rows = [
        [
            i,
            f"{r['children_complete']}/{r['jobs']}",
            f"{r['create_rate_per_s']:.1f}" if r["create_rate_per_s"] else "-",
            f"{r['burst_wall_s']:.1f}",
            f"{r['operator_cpu_burst_s']:.1f}",
            f"{r['peak_rss_bytes'] / MB:.1f}",
            f"{r['idle_cpu_pct']:.2f}% over {r['idle_window_s']:g} s",
        ]
        for i, r in enumerate(runs, 1)
    ]
    print(
        format_table(
            [
                "repeat",
                "all 6 children",
                "creates/s",
                "burst wall s",
                "operator CPU s (burst)",
                "peak RSS MB",
                "idle CPU (1 core)",
            ],
            rows,
        )
    )
    for i, r in enumerate(runs, 1):
        if r["reflect_s"]["n"] < r["reflect_attempted"] or r.get("reflect_reinjected"):
            print(
                f"repeat {i}: status reflection {r['reflect_s']['n']}/{r['reflect_attempted']} seen; "
                f"{r.get('reflect_reinjected', 0)} injected failures re-applied after the Job controller dropped them"
            )
        if r["incomplete"]:
            print(f"repeat {i}: {r['incomplete']}")
        if r["handler_timings"]:
            parts = [
                f"{h} {t['count']:.0f} runs, mean {t['mean_s'] * 1000:.0f} ms"
                for h, t in sorted(r["handler_timings"].items())
            ]
            print(f"repeat {i} operator handlers: " + "; ".join(parts))
        cpu = ", ".join(
            f"{n} {v:.0f}%" for n, v in sorted(r["burst_cpu_pct_of_core"].items(), key=lambda kv: -kv[1])
        )
        print(f"repeat {i} CPU during the burst (% of one core, {info['nproc']} cores): {cpu}")
        if r["idle_cpu_ms_per_handler_run"] is not None:
            counts = ", ".join(f"{h} {n}" for h, n in sorted(r["idle_handler_runs"].items()))
            print(
                f"repeat {i} idle window: handler runs {counts}; "
                f"{r['idle_cpu_ms_per_handler_run']:.1f} ms operator CPU per run; child watch events "
                + (", ".join(f"{k} {v}" for k, v in sorted(r["idle_child_events"].items())) or "none")
            )
    for i, r in enumerate(runs, 1):
        bare = r.get("bare_client")
        if bare is not None:
            print(
                f"repeat {i}: the same {bare['jobs']} FineTuneJobs and their objects from a bare client "
                f"({bare['workers']} workers): {bare['wall_s']:.1f} s; operator burst wall / that = "
                f"{r['burst_wall_over_limit']:.2f}x"
            )
        ops = r.get("operator_requests_per_job") or {}
        keys = list(ops) + [k for k in (bare or {}).get("requests_per_job", {}) if k not in ops]
        rows = [
            [
                k,
                f"{ops.get(k, 0):.2f}",
                f"{(bare or {}).get('requests_per_job', {}).get(k, 0):.2f}" if bare else "-",
            ]
            for k in keys
        ]
        rows.append(
            [
                "total",
                f"{sum(ops.values()):.2f}",
                f"{sum(bare['requests_per_job'].values()):.2f}" if bare else "-",
            ]
        )
        print(f"repeat {i}: API requests per FineTuneJob (kube-apiserver audit log, watches excluded)")
        print(format_table(["request", "operator", "bare client"], rows))
    print()
    print(
        format_table(
            ["target", "median", "goal", "verdict"],
            [[k, _s(v["value"]), v["target"], v["verdict"]] for k, v in summary["targets"].items()],
        )
    )


def plot(runs: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Cumulative distribution of create -> children and create -> status seen, one line per repeat."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, r in enumerate(runs, 1):
        for key, label in (
            ("create_to_children_s", "create -> children"),
            ("create_to_status_s", "create -> status"),
        ):
            xs = r["samples"][key]
            if xs:
                ax.step(
                    xs,
                    [(k + 1) / len(xs) for k in range(len(xs))],
                    where="post",
                    label=f"{label} (repeat {i})",
                )
    ax.axvline(TARGET_P50_S, color="grey", linestyle=":", linewidth=1)
    ax.axvline(TARGET_P99_S, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("seconds after the FineTuneJob create returned")
    ax.set_ylabel(f"fraction of {runs[0]['jobs']} FineTuneJobs")
    ax.set_title("kubetune operator: FineTuneJobs applied at once")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    del frame
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Entry point; prints the tables (JSON with --json, a CDF plot with --plot). Exit 0 even on MISS."""
    p = argparse.ArgumentParser(prog="python -m bench.operator_scale", description=__doc__.split("\n")[0])
    p.add_argument("--jobs", type=int, default=200, help="FineTuneJobs applied at once per repeat")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--creators", type=int, default=8, help="client threads creating the FineTuneJobs")
    p.add_argument(
        "--reflect", type=int, default=20, help="jobs whose child status change is timed (one at a time)"
    )
    p.add_argument(
        "--idle-seconds",
        type=float,
        default=None,
        help="idle CPU window (default: the resync interval, at least 30 s)",
    )
    p.add_argument(
        "--resync-seconds",
        type=float,
        default=None,
        help="operator resync interval (default: OperatorSettings' production default)",
    )
    p.add_argument(
        "--operator-env",
        action="append",
        default=[],
        metavar="KUBETUNE_OPERATOR_X=VALUE",
        help="extra operator setting, repeatable (e.g. KUBETUNE_OPERATOR_MAX_WORKERS=32), to try a tuning",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for every job's children")
    p.add_argument(
        "--no-limit",
        action="store_true",
        help="skip the bare-client run of the same objects (the box's limit)",
    )
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None)
    a = p.parse_args(argv)
    if a.jobs < 1 or a.repeats < 1 or a.creators < 1:
        p.error("--jobs, --repeats and --creators must be >= 1")
    reflect = min(a.reflect, a.jobs)
    extra_env = dict(item.split("=", 1) for item in a.operator_env if "=" in item)
    if len(extra_env) != len(a.operator_env) or not all(
        k.startswith("KUBETUNE_OPERATOR_") for k in extra_env
    ):
        p.error("--operator-env takes KUBETUNE_OPERATOR_<SETTING>=<value>")

    from tests.cluster.cluster import LocalCluster

    # SIGTERM (a timeout, a CI cancel) unwinds like Ctrl-C, so the control plane and the operator
    # are stopped by their PIDs instead of being left running.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    load = os.getloadavg()
    info = machine_info()
    work = Path(tempfile.mkdtemp(prefix="kubetune-bench-operator-"))
    cluster = LocalCluster(kube_bin_dir(), log_dir=work / "cluster-logs", audit=True)
    runs: list[dict[str, Any]] = []
    with cluster:
        install_crds_and_roles(cluster)
        opts = RunOptions(a.jobs, a.creators, reflect, a.idle_seconds, a.resync_seconds, a.timeout, extra_env)
        for rep in range(a.repeats):
            run = run_once(cluster, opts, work, rep)
            if not a.no_limit:
                _progress(f"repeat {rep + 1}: the same objects from a bare client (the box's limit)")
                run["bare_client"] = bare_client_burst(cluster, opts, work, rep)
                run["burst_wall_over_limit"] = run["burst_wall_s"] / run["bare_client"]["wall_s"]
            runs.append(run)
    summary = summarize(runs)
    print_report(info, load, runs, summary)
    print(f"logs: {work}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(
            json.dumps(
                {
                    "machine": info,
                    "load_average_at_start": list(load),
                    "command": sys.argv,
                    "summary": summary,
                    "runs": runs,
                },
                indent=2,
            )
        )
    if a.plot:
        plot(runs, a.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
