"""Prometheus metrics of the operator: FineTuneJobs by phase, reconcile latency, errors.

Metrics live in a :class:`OperatorMetrics` instance with its own registry (created at start-up,
nothing at import time), so tests and a second operator in one process never collide.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

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
        self.model_versions_created = Counter(
            "kubetune_modelversions_created_total",
            "ModelVersion records created.",
            registry=self.registry,
        )
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
            else:
                self._phases[key] = phase
            counts = dict.fromkeys(PHASES, 0)
            for value in self._phases.values():
                counts[value] = counts.get(value, 0) + 1
            for value, count in counts.items():
                self.jobs_by_phase.labels(value).set(count)

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
