"""Counting API requests from a kube-apiserver audit log (``tests/cluster``'s ``LocalCluster(audit=True)``).

Pure functions over the audit events (``audit.k8s.io/v1`` ``Event`` objects, one per request at
``ResponseComplete``): which requests a user made in a time window, by verb and resource. Watches
are left out: one long-running request each, not per object.
"""

from __future__ import annotations

import datetime
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any


def service_account_user(namespace: str, name: str) -> str:
    """The username the API server gives a ServiceAccount token."""
    return f"system:serviceaccount:{namespace}:{name}"


def _received(event: Mapping[str, Any]) -> datetime.datetime:
    return datetime.datetime.fromisoformat(str(event["requestReceivedTimestamp"]).replace("Z", "+00:00"))


def request_key(event: Mapping[str, Any]) -> str:
    """``'<verb> <resource>[/<subresource>]'``, e.g. ``'patch finetunejobs/status'``."""
    ref = event.get("objectRef") or {}
    resource = str(ref.get("resource") or event.get("requestURI", "?"))
    if ref.get("subresource"):
        resource += f"/{ref['subresource']}"
    return f"{event.get('verb', '?')} {resource}"


def requests_of(
    events: Iterable[Mapping[str, Any]],
    user: str,
    since: datetime.datetime,
    until: datetime.datetime | None = None,
) -> Counter[str]:
    """Requests by ``user`` received in ``[since, until)``, counted by :func:`request_key` (no watches)."""
    counts: Counter[str] = Counter()
    for event in events:
        if (event.get("user") or {}).get("username") != user or event.get("verb") == "watch":
            continue
        if event.get("stage") not in (None, "ResponseComplete", "Panic"):
            continue
        at = _received(event)
        if at < since or (until is not None and at >= until):
            continue
        counts[request_key(event)] += 1
    return counts


def per_job(counts: Mapping[str, int], jobs: int) -> dict[str, float]:
    """``counts`` divided by the number of FineTuneJobs, largest first."""
    return {k: v / jobs for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))}
