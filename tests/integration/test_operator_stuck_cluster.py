"""Every stuck state says why (issue 16, deliverable 3), on the real v1.20 API server.

A Job the API server refuses (422), a Job an object-count ResourceQuota refuses (403), pods a
``pods`` ResourceQuota keeps the Job controller from creating (its ``FailedCreate`` Events): each is
``Stalled=True`` with a reason and the API server's own message, a Warning Event, retried with
back-off (no hot loop: a bounded number of attempts in the operator log), and it recovers on its own
when the cause goes. Unschedulable pods and image pull errors need a scheduler / a real kubelet; the
reducers for them are covered in tests/unit/test_operator_status.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.fixtures.operator import GROUP, VERSION, Api, OperatorProcess, finetunejob, wait_for
from tests.integration.test_operator_cluster import STUB_COMMAND

pytestmark = pytest.mark.integration


def _stalled(api: Api, name: str, reason: str) -> dict[str, Any] | None:
    cond = api.condition(name, "Stalled") or {}
    return cond if cond.get("status") == "True" and cond.get("reason") == reason else None


def _warnings(api: Api, name: str, reason: str) -> list[Any]:
    return [e for e in api.events(name) if e.reason == reason and e.type == "Warning"]


def _quota(api: Api, name: str, hard: dict[str, str]) -> None:
    api.core.create_namespaced_resource_quota(api.ns, {"metadata": {"name": name}, "spec": {"hard": hard}})

    def enforced() -> bool:
        used = api.core.read_namespaced_resource_quota(name, api.ns).status.hard
        return bool(used)

    wait_for(f"ResourceQuota {name} in force", enforced, 30)


def test_a_job_the_api_server_refuses_is_stalled_with_its_message_and_recovers_on_a_fix(
    api: Api, operator_factory: Callable[..., OperatorProcess]
) -> None:
    op = operator_factory(STUB_COMMAND)
    bad_affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "Bogus"}]}]
            }
        }
    }
    api.create_ftj(finetunejob("refused", "tiny-refused", resources={"affinity": bad_affinity}))
    cond = wait_for("Stalled/ChildRejected", lambda: _stalled(api, "refused", "ChildRejected"), 60, op.log)
    assert "422" in cond["message"] and "Bogus" in cond["message"], cond
    assert cond["observedGeneration"] == 1
    st = api.status("refused")
    assert (st["phase"], st["reason"]) == ("Pending", "ChildRejected")
    events = wait_for("Warning ChildRejected", lambda: _warnings(api, "refused", "ChildRejected"), 30)
    assert "Bogus" in events[0].message
    time.sleep(6)
    # Back-off, not a hot loop: a handful of tries (5 s, 10 s, ...), one Event for the same message.
    tries = op.log.read_text().count("the API server refused to create Job")
    assert 1 <= tries <= 6, tries
    assert len(_warnings(api, "refused", "ChildRejected")) == 1
    assert api.jobs("refused") == []

    api.custom.patch_namespaced_custom_object(
        GROUP, VERSION, api.ns, "finetunejobs", "refused", {"spec": {"resources": {"affinity": None}}}
    )
    wait_for("Succeeded after the fix", lambda: api.status("refused").get("phase") == "Succeeded", 90, op.log)
    stalled = api.condition("refused", "Stalled")
    assert stalled is not None and stalled["status"] == "False" and stalled["observedGeneration"] == 2


def test_an_object_count_quota_on_jobs_is_stalled_and_recovers_when_lifted(
    api: Api, operator_factory: Callable[..., OperatorProcess]
) -> None:
    _quota(api, "no-jobs", {"count/jobs.batch": "0"})
    op = operator_factory(STUB_COMMAND)
    api.create_ftj(finetunejob("counted", "tiny-counted"))
    cond = wait_for("Stalled/QuotaExceeded", lambda: _stalled(api, "counted", "QuotaExceeded"), 60, op.log)
    assert "403" in cond["message"] and "exceeded quota" in cond["message"] and "no-jobs" in cond["message"]
    wait_for("Warning QuotaExceeded", lambda: _warnings(api, "counted", "QuotaExceeded"), 30)
    api.core.delete_namespaced_resource_quota("no-jobs", api.ns)
    wait_for(
        "Succeeded once the quota is gone",
        lambda: api.status("counted").get("phase") == "Succeeded",
        120,
        op.log,
    )
    assert (api.condition("counted", "Stalled") or {}).get("status") == "False"


def test_a_pod_quota_seen_only_in_failed_create_events_is_stalled_and_recovers(
    api: Api, operator_factory: Callable[..., OperatorProcess]
) -> None:
    _quota(api, "no-pods", {"pods": "0"})
    op = operator_factory(STUB_COMMAND)
    api.create_ftj(finetunejob("podless", "tiny-podless"))
    cond = wait_for("Stalled/QuotaExceeded", lambda: _stalled(api, "podless", "QuotaExceeded"), 90, op.log)
    assert "exceeded quota" in cond["message"] and "no-pods" in cond["message"], cond
    assert len(api.jobs("podless")) == 1  # the Job exists; the Job controller cannot create its pod
    wait_for("Warning QuotaExceeded", lambda: _warnings(api, "podless", "QuotaExceeded"), 30)
    api.core.delete_namespaced_resource_quota("no-pods", api.ns)
    wait_for(
        "Succeeded once the quota is gone",
        lambda: api.status("podless").get("phase") == "Succeeded",
        180,
        op.log,
    )
    assert (api.condition("podless", "Stalled") or {}).get("status") == "False"


def test_an_image_pull_error_is_stalled_and_recovers_when_the_image_can_be_pulled(
    api: Api, operator_factory: Callable[..., OperatorProcess], fake_kubelet: Any
) -> None:
    image = f"registry.example.com/kubetune/trainer:{api.ns}"
    fake_kubelet.set_image_pull_failure(image)
    try:
        op = operator_factory(STUB_COMMAND, KUBETUNE_OPERATOR_ALLOWED_IMAGES="registry.example.com/kubetune/")
        api.create_ftj(finetunejob("pull", "tiny-pull", image=image))
        cond = wait_for(
            "Stalled/ImagePullBackOff", lambda: _stalled(api, "pull", "ImagePullBackOff"), 90, op.log
        )
        assert image in cond["message"] or "pull" in cond["message"], cond
        wait_for("Warning ImagePullBackOff", lambda: _warnings(api, "pull", "ImagePullBackOff"), 30)
    finally:
        fake_kubelet.clear_image_pull_failure(image)
    wait_for(
        "Succeeded once the image pulls", lambda: api.status("pull").get("phase") == "Succeeded", 120, op.log
    )
    assert (api.condition("pull", "Stalled") or {}).get("status") == "False"
