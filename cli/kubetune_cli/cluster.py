"""``kubetune submit|status|logs|cluster-versions``: FineTuneJobs on a Kubernetes cluster.

:func:`add_commands` adds the four commands to the ``kubetune`` parser; each sets ``func``
(``args.func(args) -> int``, the exit code):

    kubetune submit job.yaml [-n NS]            # validate locally (file:line: field), then create/update
    kubetune status NAME [-n NS] [--watch]      # phase, stage, live progress, version, message
    kubetune logs NAME [-n NS] [-f] [--rank N]  # the trainer pod's log (rank 0 by default)
    kubetune cluster-versions [-n NS | -A] [--model NAME]   # ModelVersion objects (the catalogue)

Credentials: ``--kubeconfig`` / ``--context``, else ``KUBECONFIG`` or ``~/.kube/config``, else the
in-cluster ServiceAccount. The ``kubernetes`` client is imported only when one of these commands
runs: the trainer image does not need it. Exit codes: 0 ok; 1 the job failed (``status`` on a
Failed job; ``status --watch`` that ended in Failed); 2 usage, validation or API errors (the
message names the file, field or object).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TextIO

from kubetune_api.loader import SpecError, load_finetunejob

# The kubernetes client is imported inside the commands that talk to a cluster: it is ~0.6 s, twice
# the rest of a `kubetune` start (python -X importtime), and registry commands never need it.
if TYPE_CHECKING:
    from kubernetes.client import ApiClient

GROUP = "kubetune.io"
VERSION = "v1alpha1"
FTJ_PLURAL = "finetunejobs"
MV_PLURAL = "modelversions"
TERMINAL = ("Succeeded", "Failed")
#: Set by the Job controller on every pod of an Indexed Job (the torchrun node rank).
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class ClusterError(RuntimeError):
    """An API call failed or an object is missing; the message says which and why."""


# --- pure formatting --------------------------------------------------------------------------


def status_line(obj: Mapping[str, Any]) -> str:
    """One line for a FineTuneJob: phase, stage, progress, loss, ETA, version, reason/message."""
    status = obj.get("status") or {}
    name = obj.get("metadata", {}).get("name", "?")
    phase = status.get("phase") or "Unknown"
    parts = [f"{name}: {phase}"]
    stage = status.get("stage") or (status.get("progress") or {}).get("stage")
    if stage and phase == "Running":
        parts.append(stage)
    progress = status.get("progress") or {}
    if progress.get("summary"):
        parts.append(progress["summary"])
    if progress.get("loss") is not None:
        parts.append(f"loss {progress['loss']:.4g}")
    if progress.get("tokensPerSecond"):
        parts.append(f"{progress['tokensPerSecond']:.0f} tok/s")
    if progress.get("etaSeconds") is not None and phase == "Running":
        parts.append(f"ETA {_duration(progress['etaSeconds'])}")
    version = status.get("version") or {}
    if version.get("name"):
        parts.append(f"version {version['name']}" + (" (reused)" if version.get("reused") else ""))
    gates = status.get("gates") or {}
    if gates.get("summary"):
        parts.append(f"gates {gates['summary']}")
    reason, message = status.get("reason"), status.get("message")
    if phase not in ("Running",) and (reason or message):
        parts.append(": ".join(p for p in (reason, message) if p))
    return ", ".join(parts)


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def versions_table(items: Iterable[Mapping[str, Any]], all_namespaces: bool) -> list[list[str]]:
    """Rows (with a header row) for ModelVersion objects, sorted by model then version number."""

    def key(obj: Mapping[str, Any]) -> tuple[str, str, int]:
        spec = obj.get("spec", {})
        number = str(spec.get("version", "v0"))[1:]
        return (
            obj["metadata"].get("namespace", ""),
            spec.get("model", ""),
            int(number) if number.isdigit() else 0,
        )

    header = ["MODEL", "VERSION", "BASE", "METRIC", "GATES", "URI"]
    if all_namespaces:
        header.insert(0, "NAMESPACE")
    rows = [header]
    for obj in sorted(items, key=key):
        spec = obj.get("spec", {})
        row = [
            spec.get("model", ""),
            spec.get("version", ""),
            spec.get("base", ""),
            spec.get("keyMetric") or "-",
            (spec.get("gates") or {}).get("summary") or "-",
            spec.get("uri", ""),
        ]
        if all_namespaces:
            row.insert(0, obj["metadata"].get("namespace", ""))
        rows.append(row)
    return rows


def format_table(rows: list[list[str]]) -> str:
    """Left-aligned columns separated by three spaces, like kubectl get."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "   ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


# --- API access -------------------------------------------------------------------------------


def api_client(kubeconfig: str | None = None, context: str | None = None) -> ApiClient:
    """A client from ``kubeconfig``/``context``, the default kubeconfig, or the in-cluster account.

    Raises :class:`ClusterError` when none of them is usable.
    """
    from kubernetes import client, config

    try:
        return config.new_client_from_config(config_file=kubeconfig, context=context)
    except (config.ConfigException, OSError, TypeError) as exc:
        if kubeconfig is not None or context is not None:
            raise ClusterError(f"cannot use kubeconfig {kubeconfig or '(default)'}: {exc}") from None
        try:
            config.load_incluster_config()
        except config.ConfigException:
            raise ClusterError(
                "no cluster credentials: pass --kubeconfig, set KUBECONFIG, or run inside a pod"
            ) from None
        return client.ApiClient()


def _api_error(exc: Any, what: str) -> ClusterError:
    status = getattr(exc, "status", None)
    if status == 404:
        return ClusterError(f"{what}: not found")
    if status == 403:
        return ClusterError(f"{what}: forbidden (your account lacks the RBAC permission)")
    body = getattr(exc, "body", "") or ""
    with contextlib.suppress(ValueError, AttributeError):
        body = json.loads(body).get("message", body)
    return ClusterError(f"{what}: {status} {getattr(exc, 'reason', '')}: {body}".strip())


def submit(api: ApiClient, body: dict[str, Any], namespace: str) -> str:
    """Create the FineTuneJob, or replace its spec when it exists (a new generation). Returns a verb."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    custom = client.CustomObjectsApi(api)
    name = body["metadata"]["name"]
    body = {**body, "metadata": {**body["metadata"], "namespace": namespace}}
    try:
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, FTJ_PLURAL, body)
        return "created"
    except ApiException as exc:
        if exc.status != 409:
            raise _api_error(exc, f"finetunejob {namespace}/{name}") from None
    try:
        current = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, FTJ_PLURAL, name)
        if current.get("spec") == body.get("spec"):
            return "unchanged"
        # A full replace of the spec (a merge patch would keep keys the user deleted), guarded by
        # resourceVersion: a concurrent change is a 409 reported to the user, never silently lost.
        meta = current["metadata"]
        replacement = {
            **body,
            "metadata": {**body["metadata"], "resourceVersion": meta["resourceVersion"]},
        }
        custom.replace_namespaced_custom_object(GROUP, VERSION, namespace, FTJ_PLURAL, name, replacement)
        return "configured"
    except ApiException as exc:
        raise _api_error(exc, f"finetunejob {namespace}/{name}") from None


def get_finetunejob(api: ApiClient, namespace: str, name: str) -> dict[str, Any]:
    """The FineTuneJob object. Raises :class:`ClusterError` (404: not found)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    try:
        obj: dict[str, Any] = client.CustomObjectsApi(api).get_namespaced_custom_object(
            GROUP, VERSION, namespace, FTJ_PLURAL, name
        )
        return obj
    except ApiException as exc:
        raise _api_error(exc, f"finetunejob {namespace}/{name}") from None


def watch_status(
    api: ApiClient,
    namespace: str,
    name: str,
    emit: Callable[[str], None],
    *,
    timeout: float | None = None,
    poll_seconds: float = 2.0,
) -> dict[str, Any]:
    """Emit a status line whenever it changes, until the job is Succeeded or Failed.

    Uses a watch on this one object (field selector), re-established when the server ends it.
    Returns the last object seen. Raises :class:`ClusterError` on API errors and on ``timeout``.
    """
    from kubernetes import client, watch
    from kubernetes.client.exceptions import ApiException

    custom = client.CustomObjectsApi(api)
    deadline = None if timeout is None else time.monotonic() + timeout
    obj = get_finetunejob(api, namespace, name)
    last = status_line(obj)
    emit(last)
    while (obj.get("status") or {}).get("phase") not in TERMINAL:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise ClusterError(f"finetunejob {namespace}/{name}: still {last!r} after {timeout:.0f}s")
        server_timeout = max(1, int(min(remaining or 60, 60)))
        try:
            stream = watch.Watch().stream(
                custom.list_namespaced_custom_object,
                GROUP,
                VERSION,
                namespace,
                FTJ_PLURAL,
                field_selector=f"metadata.name={name}",
                resource_version=obj["metadata"].get("resourceVersion"),
                timeout_seconds=server_timeout,
            )
            for event in stream:
                if event["type"] == "DELETED":
                    raise ClusterError(f"finetunejob {namespace}/{name} was deleted")
                if event["type"] not in ("ADDED", "MODIFIED"):
                    continue
                obj = event["object"]
                line = status_line(obj)
                if line != last:
                    emit(line)
                    last = line
                if (obj.get("status") or {}).get("phase") in TERMINAL:
                    break
        except ApiException as exc:
            if exc.status != 410:  # 410 Gone: our resourceVersion is too old; re-read and go on
                raise _api_error(exc, f"watch finetunejob {namespace}/{name}") from None
            time.sleep(poll_seconds)
            obj = get_finetunejob(api, namespace, name)
    return obj


def trainer_pods(api: ApiClient, namespace: str, obj: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Pods of the job's current attempt (status.jobName), rank 0 first."""
    from kubernetes import client

    job_name = (obj.get("status") or {}).get("jobName")
    if not job_name:
        raise ClusterError(
            f"finetunejob {namespace}/{obj['metadata']['name']} has no training Job yet "
            f"(phase {(obj.get('status') or {}).get('phase') or 'unknown'})"
        )
    core = client.CoreV1Api(api)
    pods = core.list_namespaced_pod(namespace, label_selector=f"job-name={job_name}").to_dict()["items"]

    def rank(pod: Mapping[str, Any]) -> int:
        index = str((pod["metadata"].get("annotations") or {}).get(COMPLETION_INDEX, "0"))
        return int(index) if index.isdigit() else 0

    return sorted(pods, key=rank)


def _completion_index(pod: Mapping[str, Any]) -> int:
    index = str((pod["metadata"].get("annotations") or {}).get(COMPLETION_INDEX, "0"))
    return int(index) if index.isdigit() else 0


def pod_for_rank(pods: list[dict[str, Any]], rank: int) -> dict[str, Any] | None:
    """The pod of node rank ``rank`` (its completion index), not the ``rank``-th pod in the list: a
    retried rank has several pods (the failed ones stay until the Job goes), the newest is current."""
    candidates = [p for p in pods if _completion_index(p) == rank]
    if not candidates:
        return None

    def created(pod: Mapping[str, Any]) -> str:
        meta = pod["metadata"]
        return str(meta.get("creation_timestamp") or meta.get("creationTimestamp") or "")

    return max(candidates, key=lambda p: (created(p), p["metadata"].get("name") or ""))


# --- commands ---------------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> ApiClient:
    return api_client(args.kubeconfig, args.context)


def _fail(exc: Exception, err: TextIO) -> int:
    print(f"error: {exc}", file=err)
    return EXIT_USAGE


def cmd_submit(args: argparse.Namespace) -> int:
    try:
        job = load_finetunejob(args.file)
    except SpecError as exc:
        return _fail(exc, sys.stderr)
    body = job.model_dump(mode="json", by_alias=True, exclude_none=True, exclude={"status"})
    if not body["metadata"].get("name"):
        print(f"error: {args.file}: metadata.name is required", file=sys.stderr)
        return EXIT_USAGE
    namespace = args.namespace or body["metadata"].get("namespace") or "default"
    # Only what a user writes goes to the server: name, labels and annotations, and the spec.
    meta = {k: v for k, v in body["metadata"].items() if k in ("name", "labels", "annotations") and v}
    try:
        verb = submit(_client(args), {**body, "metadata": meta}, namespace)
    except ClusterError as exc:
        return _fail(exc, sys.stderr)
    print(f"finetunejob.kubetune.io/{meta['name']} {verb} (namespace {namespace})")
    if verb != "unchanged":
        print(f"  follow it: kubetune status {meta['name']} -n {namespace} --watch")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    namespace = args.namespace or "default"
    try:
        api = _client(args)
        if args.watch:
            obj = watch_status(
                api, namespace, args.name, lambda line: print(line, flush=True), timeout=args.timeout
            )
        else:
            obj = get_finetunejob(api, namespace, args.name)
            print(status_line(obj))
    except ClusterError as exc:
        return _fail(exc, sys.stderr)
    return EXIT_FAILED if (obj.get("status") or {}).get("phase") == "Failed" else EXIT_OK


def cmd_logs(args: argparse.Namespace) -> int:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    namespace = args.namespace or "default"
    try:
        api = _client(args)
        obj = get_finetunejob(api, namespace, args.name)
        pods = trainer_pods(api, namespace, obj)
    except ClusterError as exc:
        return _fail(exc, sys.stderr)
    if not pods:
        print(f"error: finetunejob {namespace}/{args.name}: no trainer pods yet", file=sys.stderr)
        return EXIT_USAGE
    chosen = pod_for_rank(pods, args.rank)
    if chosen is None:
        ranks = sorted({_completion_index(p) for p in pods})
        print(
            f"error: --rank {args.rank}: no pod with that completion index (ranks: "
            f"{', '.join(map(str, ranks))})",
            file=sys.stderr,
        )
        return EXIT_USAGE
    pod = chosen["metadata"]["name"]
    core = client.CoreV1Api(api)
    try:
        if args.follow:
            resp = core.read_namespaced_pod_log(pod, namespace, follow=True, _preload_content=False)
            for chunk in resp.stream():
                sys.stdout.write(chunk.decode("utf-8", errors="replace"))
                sys.stdout.flush()
        else:
            sys.stdout.write(core.read_namespaced_pod_log(pod, namespace, tail_lines=args.tail))
    except ApiException as exc:
        return _fail(_api_error(exc, f"logs of pod {namespace}/{pod}"), sys.stderr)
    return EXIT_OK


def cmd_cluster_versions(args: argparse.Namespace) -> int:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    selector = f"kubetune.io/model={args.model}" if args.model else None
    try:
        custom = client.CustomObjectsApi(_client(args))
        if args.all_namespaces:
            items = custom.list_cluster_custom_object(GROUP, VERSION, MV_PLURAL, label_selector=selector)[
                "items"
            ]
        else:
            items = custom.list_namespaced_custom_object(
                GROUP, VERSION, args.namespace or "default", MV_PLURAL, label_selector=selector
            )["items"]
    except ClusterError as exc:
        return _fail(exc, sys.stderr)
    except ApiException as exc:
        return _fail(_api_error(exc, "list modelversions"), sys.stderr)
    if not items:
        print("No ModelVersions found.")
        return EXIT_OK
    print(format_table(versions_table(items, args.all_namespaces)))
    return EXIT_OK


def _cluster_flags(parser: argparse.ArgumentParser, namespaced: bool = True) -> None:
    if namespaced:
        parser.add_argument("-n", "--namespace", default=None, help="namespace (default: default)")
    parser.add_argument(
        "--kubeconfig", default=None, help="kubeconfig file (default: KUBECONFIG or ~/.kube/config)"
    )
    parser.add_argument("--context", default=None, help="kubeconfig context")


def add_commands(subparsers: Any) -> None:
    """Add submit, status, logs and cluster-versions to the ``kubetune`` sub-command parser."""
    p = subparsers.add_parser(
        "submit", help="validate a FineTuneJob YAML and create/update it on the cluster"
    )
    p.add_argument("file", help="FineTuneJob YAML")
    _cluster_flags(p)
    p.set_defaults(func=cmd_submit)

    p = subparsers.add_parser("status", help="a FineTuneJob's phase, progress and version")
    p.add_argument("name", help="FineTuneJob name")
    p.add_argument(
        "-w", "--watch", action="store_true", help="follow progress live until Succeeded or Failed"
    )
    p.add_argument(
        "--timeout", type=float, default=None, help="with --watch: give up after this many seconds"
    )
    _cluster_flags(p)
    p.set_defaults(func=cmd_status)

    p = subparsers.add_parser("logs", help="the trainer pod's log")
    p.add_argument("name", help="FineTuneJob name")
    p.add_argument("-f", "--follow", action="store_true", help="stream the log")
    p.add_argument("--rank", type=int, default=0, help="node rank (pod index) to show (default 0)")
    p.add_argument("--tail", type=int, default=None, help="only the last N lines")
    _cluster_flags(p)
    p.set_defaults(func=cmd_logs)

    p = subparsers.add_parser("cluster-versions", help="ModelVersion objects on the cluster (the catalogue)")
    p.add_argument("--model", default=None, help="only this model")
    p.add_argument("-A", "--all-namespaces", action="store_true", help="every namespace")
    _cluster_flags(p)
    p.set_defaults(func=cmd_cluster_versions)
