"""Prometheus metrics of the operator: FineTuneJobs by phase, reconcile latency, errors, and per
FineTuneJob series for alerting (stalled, failures by reason, the trainer's last progress report).

The chart's Grafana dashboard and PrometheusRule (charts/kubetune/dashboards, templates/prometheusrule.yaml)
query these names; tests/integration/test_observability.py proves every query returns series from a
real Prometheus scraping a real operator. Metrics live in a :class:`OperatorMetrics` instance with its own registry (created at start-up,
nothing at import time), so tests and a second operator in one process never collide.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

PHASES = ("Pending", "Queued", "Suspended", "Running", "Succeeded", "Failed")


class OperatorMetrics:
    """The operator's metrics. Thread-safe: handlers run in kopf's thread pool."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.jobs_by_phase = Gauge(
            "kubetune_finetunejobs",
            "FineTuneJobs this operator serves, by phase.",
            ["phase"],
            registry=self.registry,
        )
        self.reconcile_seconds = Histogram(
            "kubetune_reconcile_duration_seconds",
            "Time spent in one handler run.",
            ["handler"],
            registry=self.registry,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.reconcile_errors = Counter(
            "kubetune_reconcile_errors_total",
            "Handler runs that raised, by handler and error kind (permanent, temporary, unexpected).",
            ["handler", "kind"],
            registry=self.registry,
        )
        self.status_conflicts = Counter(
            "kubetune_status_conflicts_total",
            "Status writes refused because the FineTuneJob changed since it was read (409); each is "
            "read again and the status worked out anew.",
            registry=self.registry,
        )
        self.model_versions_created = Counter(
            "kubetune_modelversions_created_total",
            "ModelVersion records created.",
            registry=self.registry,
        )
        # Per-FineTuneJob series (labels: namespace, finetunejob): bounded by the jobs that exist,
        # removed when a job is deleted.
        self.job_stalled = Gauge(
            "kubetune_finetunejob_stalled",
            "1 while a FineTuneJob's Stalled condition is True (reason: ImagePullBackOff, Unschedulable, ...).",
            ["namespace", "finetunejob", "reason"],
            registry=self.registry,
        )
        self.job_failures = Counter(
            "kubetune_finetunejob_failures_total",
            "FineTuneJobs that entered phase Failed, by reason (counted once per transition, as stored "
            "in the object's status, so a restarted operator does not count old failures again).",
            ["namespace", "reason"],
            registry=self.registry,
        )
        self.job_progress_percent = Gauge(
            "kubetune_finetunejob_progress_percent",
            "Training progress of a running FineTuneJob (status.progress.percent).",
            ["namespace", "finetunejob"],
            registry=self.registry,
        )
        self.job_progress_updated = Gauge(
            "kubetune_finetunejob_progress_updated_timestamp_seconds",
            "When the trainer of a running FineTuneJob last reported progress (status.progress.updatedAt, "
            "Unix seconds); only while the job is Running.",
            ["namespace", "finetunejob"],
            registry=self.registry,
        )
        self._stalled: dict[tuple[str, str], str] = {}
        self._phases: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()
        for phase in PHASES:
            self.jobs_by_phase.labels(phase).set(0)

    def observe_phase(self, namespace: str, name: str, phase: str | None) -> None:
        """Record the current phase of one FineTuneJob (None: it is gone)."""
        with self._lock:
            key = (namespace, name)
            if phase is None:
                self._phases.pop(key, None)
                self._forget_job(key)
            else:
                self._phases[key] = phase
            counts = dict.fromkeys(PHASES, 0)
            for value in self._phases.values():
                counts[value] = counts.get(value, 0) + 1
            for value, count in counts.items():
                self.jobs_by_phase.labels(value).set(count)

    def observe_status(
        self, namespace: str, name: str, before: Mapping[str, Any], after: Mapping[str, Any]
    ) -> None:
        """Per-job series from one status refresh: ``before`` is the status as stored, ``after`` the
        status once the operator's patch is applied. Counts a failure when ``after`` enters Failed."""
        key = (namespace, name)
        phase = after.get("phase")
        with self._lock:
            if phase == "Failed" and before.get("phase") != "Failed":
                self.job_failures.labels(namespace, str(after.get("reason") or "Unknown")).inc()
            stalled = next(
                (
                    str(c.get("reason") or "Stalled")
                    for c in after.get("conditions") or []
                    if c.get("type") == "Stalled" and c.get("status") == "True"
                ),
                None,
            )
            label = stalled or "NotStalled"
            previous = self._stalled.get(key)
            if previous is not None and previous != label:
                self._remove(self.job_stalled, namespace, name, previous)
            self._stalled[key] = label
            self.job_stalled.labels(namespace, name, label).set(1 if stalled else 0)
            progress = after.get("progress") or {}
            updated = _unix_seconds(progress.get("updatedAt"))
            if phase == "Running" and updated is not None:
                self.job_progress_updated.labels(namespace, name).set(updated)
                self.job_progress_percent.labels(namespace, name).set(float(progress.get("percent") or 0))
            else:
                self._remove(self.job_progress_updated, namespace, name)
                self._remove(self.job_progress_percent, namespace, name)

    def _forget_job(self, key: tuple[str, str]) -> None:
        namespace, name = key
        label = self._stalled.pop(key, None)
        if label is not None:
            self._remove(self.job_stalled, namespace, name, label)
        self._remove(self.job_progress_updated, namespace, name)
        self._remove(self.job_progress_percent, namespace, name)

    @staticmethod
    def _remove(metric: Any, *labels: str) -> None:
        with suppress(KeyError):  # never set: nothing to remove
            metric.remove(*labels)

    @contextmanager
    def timed(self, handler: str) -> Iterator[None]:
        """Time a handler run and count its failures by kind."""
        import kopf

        start = time.perf_counter()
        try:
            yield
        except kopf.PermanentError:
            self.reconcile_errors.labels(handler, "permanent").inc()
            raise
        except kopf.TemporaryError:
            self.reconcile_errors.labels(handler, "temporary").inc()
            raise
        except Exception:
            self.reconcile_errors.labels(handler, "unexpected").inc()
            raise
        finally:
            self.reconcile_seconds.labels(handler).observe(time.perf_counter() - start)

    def serve(self, port: int, address: str) -> None:
        """Expose ``/metrics`` on ``address:port`` (a daemon thread)."""
        start_http_server(port, addr=address, registry=self.registry)


def _unix_seconds(stamp: Any) -> float | None:
    """RFC 3339 (``2026-11-22T10:00:00Z``) -> Unix seconds; None for a missing or unreadable stamp."""
    if not isinstance(stamp, str) or not stamp:
        return None
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
