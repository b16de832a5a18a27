"""The operator's per-FineTuneJob series: what the chart's dashboard and alerts read.

Exercised through the status shapes the reducers write (phase, reason, conditions) and the trainer
writes (progress.updatedAt); the real scrape by a real Prometheus is tests/integration/test_observability.py.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from kubetune_operator.metrics import OperatorMetrics

NS, NAME = "team-a", "assistant"


def _value(m: OperatorMetrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def _stalled(reason: str) -> dict[str, Any]:
    return {"type": "Stalled", "status": "True", "reason": reason}


def test_a_failure_is_counted_once_per_transition_by_reason() -> None:
    m = OperatorMetrics()
    running = {"phase": "Running"}
    failed = {"phase": "Failed", "reason": "GateFailed"}
    m.observe_status(NS, NAME, running, failed)
    # The same stored Failed status refreshed again (resync, a child event, a restarted operator).
    m.observe_status(NS, NAME, failed, failed)
    m.observe_status(NS, "other", {}, {"phase": "Failed", "reason": "InvalidSpec"})
    assert _value(m, "kubetune_finetunejob_failures_total", namespace=NS, reason="GateFailed") == 1
    assert _value(m, "kubetune_finetunejob_failures_total", namespace=NS, reason="InvalidSpec") == 1


def test_stalled_carries_its_reason_and_clears() -> None:
    m = OperatorMetrics()
    pending = {"phase": "Pending", "conditions": [_stalled("ImagePullBackOff")]}
    m.observe_status(NS, NAME, {}, pending)
    assert (
        _value(m, "kubetune_finetunejob_stalled", namespace=NS, finetunejob=NAME, reason="ImagePullBackOff")
        == 1
    )
    pending["conditions"] = [_stalled("Unschedulable")]
    m.observe_status(NS, NAME, {}, pending)
    labels = {"namespace": NS, "finetunejob": NAME}
    assert _value(m, "kubetune_finetunejob_stalled", **labels, reason="ImagePullBackOff") is None
    assert _value(m, "kubetune_finetunejob_stalled", **labels, reason="Unschedulable") == 1
    m.observe_status(
        NS, NAME, {}, {"phase": "Running", "conditions": [{"type": "Stalled", "status": "False"}]}
    )
    assert _value(m, "kubetune_finetunejob_stalled", **labels, reason="Unschedulable") is None
    assert _value(m, "kubetune_finetunejob_stalled", **labels, reason="NotStalled") == 0


def test_progress_timestamp_only_while_running_and_forgotten_on_delete() -> None:
    m = OperatorMetrics()
    labels = {"namespace": NS, "finetunejob": NAME}
    stamp = "2026-11-22T10:00:00Z"
    running = {"phase": "Running", "progress": {"percent": 30.0, "updatedAt": stamp}}
    m.observe_phase(NS, NAME, "Running")
    m.observe_status(NS, NAME, {}, running)
    expected = datetime(2026, 11, 22, 10, 0, tzinfo=UTC).timestamp()
    assert _value(m, "kubetune_finetunejob_progress_updated_timestamp_seconds", **labels) == expected
    assert _value(m, "kubetune_finetunejob_progress_percent", **labels) == 30.0
    m.observe_status(NS, NAME, running, {"phase": "Succeeded", "progress": running["progress"]})
    assert _value(m, "kubetune_finetunejob_progress_updated_timestamp_seconds", **labels) is None
    m.observe_status(NS, NAME, {}, {**running, "conditions": [_stalled("Unschedulable")]})
    m.observe_phase(NS, NAME, None)
    text = m.registry.collect()
    per_job = [s for metric in text for s in metric.samples if s.labels.get("finetunejob") == NAME]
    assert per_job == []


def test_an_unreadable_progress_stamp_is_no_series() -> None:
    m = OperatorMetrics()
    m.observe_status(NS, NAME, {}, {"phase": "Running", "progress": {"updatedAt": "yesterday"}})
    labels = {"namespace": NS, "finetunejob": NAME}
    assert _value(m, "kubetune_finetunejob_progress_updated_timestamp_seconds", **labels) is None
