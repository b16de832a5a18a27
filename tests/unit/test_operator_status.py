"""Status reducers: every phase and failure reason, from children's state as the API server shows it."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from kubetune_api.reports import RESULT_LOG_PREFIX, TrainerResult
from kubetune_operator import status
from kubetune_operator.status import Observed, reduce_status
from tests.support.crd_schema import validate as validate_crd

NOW = "2026-11-22T10:00:00Z"
LATER = "2026-11-22T10:05:00Z"
ATTEMPT = "demo-0994bf7a"

PUBLISHED = TrainerResult.model_validate(
    {
        "outcome": "Succeeded",
        "reason": "Published",
        "model": "tiny",
        "version": {"name": "v2", "uri": "s3://r/tiny/versions/v2/", "manifestDigest": "sha256:" + "a" * 64},
        "metrics": {"eval_loss": 1.5},
        "gates": {"passed": True, "summary": "passed", "results": []},
        "resumedFromStep": 40,
    }
)


def job(
    *, active: int = 0, failed: int = 0, suspend: bool = False, condition: tuple[str, str] | None = None
) -> dict[str, Any]:
    st: dict[str, Any] = {"active": active, "failed": failed, "startTime": "2026-11-22T09:00:00Z"}
    if condition:
        st["conditions"] = [
            {"type": condition[0], "status": "True", "reason": condition[1], "message": "job says so"}
        ]
        if condition[0] == "Complete":
            st["completionTime"] = "2026-11-22T09:30:00Z"
    return {"metadata": {"name": ATTEMPT}, "spec": {"suspend": suspend}, "status": st}


def pod(
    phase: str = "Running",
    *,
    waiting: tuple[str, str] | None = None,
    terminated: dict[str, Any] | None = None,
    index: str = "0",
    conditions: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    state: dict[str, Any] = {}
    if waiting:
        state["waiting"] = {"reason": waiting[0], "message": waiting[1]}
    elif terminated is not None:
        state["terminated"] = {"finishedAt": "2026-11-22T09:29:00Z", **terminated}
    else:
        state["running"] = {"startedAt": "2026-11-22T09:01:00Z"}
    return {
        "metadata": {
            "name": f"{ATTEMPT}-{index}-abcde",
            "annotations": {status.COMPLETION_INDEX_ANNOTATION: index},
        },
        "status": {
            "phase": phase,
            "conditions": conditions or [],
            "containerStatuses": [{"name": "trainer", "state": state}],
        },
    }


def observed(
    j: dict[str, Any] | None, pods: list[dict[str, Any]], current: dict[str, Any] | None = None, **kw: Any
) -> Observed:
    return Observed(generation=4, attempt=ATTEMPT, job=j, pods=pods, status=current or {}, now=NOW, **kw)


def conditions(patch: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in patch["conditions"]}


def assert_status_schema_ok(patch: dict[str, Any]) -> None:
    """The patch, applied to a FineTuneJob, passes the generated CRD schema (what the API server checks)."""
    body = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "demo"},
        "spec": {
            "model": {"name": "tiny", "base": {"uri": "s3://models/base"}},
            "data": {"train": {"uri": "s3://data/train.jsonl"}},
            "output": {"uri": "s3://registry/models"},
        },
        "status": {k: v for k, v in patch.items() if v is not None},
    }
    assert validate_crd(body) == []


# --- phases -----------------------------------------------------------------------------------


def test_no_job_yet_is_pending() -> None:
    patch = reduce_status(observed(None, []))
    assert (patch["phase"], patch["reason"]) == ("Pending", "Creating")
    assert patch["observedGeneration"] == 4 and patch["jobName"] == ATTEMPT
    assert_status_schema_ok(patch)


def test_pods_not_started_is_pending() -> None:
    patch = reduce_status(observed(job(active=1), [pod("Pending")]))
    assert (patch["phase"], patch["reason"]) == ("Pending", "PodsPending")


def test_running_sets_initializing_until_the_trainer_reports() -> None:
    patch = reduce_status(observed(job(active=1), [pod()]))
    assert patch["phase"] == "Running" and patch["stage"] == "Initializing"
    assert conditions(patch)["Running"]["status"] == "True"
    assert_status_schema_ok(patch)
    # Once the trainer has reported a stage, the operator leaves stage (and progress) alone.
    patch = reduce_status(observed(job(active=1), [pod()], {"stage": "Training", "progress": {"step": 3}}))
    assert "stage" not in patch and "progress" not in patch


def test_suspended_and_queued() -> None:
    patch = reduce_status(observed(job(suspend=True), [], suspend_requested=True))
    assert patch["phase"] == "Suspended"
    assert conditions(patch)["Suspended"]["status"] == "True"
    patch = reduce_status(observed(job(suspend=True), [], queue_name="gpu-queue"))
    assert (patch["phase"], patch["reason"]) == ("Queued", "WaitingForAdmission")
    assert "gpu-queue" in patch["message"]
    # compat mode: no Job exists while suspended
    assert reduce_status(observed(None, [], suspend_requested=True))["phase"] == "Suspended"


def test_succeeded_carries_version_metrics_gates() -> None:
    term = {"exitCode": 0, "reason": "Completed", "message": PUBLISHED.to_termination_message()}
    patch = reduce_status(observed(job(condition=("Complete", "")), [pod("Succeeded", terminated=term)]))
    assert (patch["phase"], patch["reason"]) == ("Succeeded", "Published")
    assert patch["version"]["name"] == "v2"
    assert patch["metrics"] == {"eval_loss": 1.5}
    assert patch["gates"]["passed"] is True
    assert patch["resumedFromStep"] == 40
    assert patch["completionTime"] == "2026-11-22T09:30:00Z"
    assert conditions(patch)["Succeeded"]["status"] == "True"
    assert conditions(patch)["Failed"]["status"] == "False"
    assert_status_schema_ok(patch)


def test_result_found_in_log_fallback() -> None:
    log = "step 10 loss 1.2\n" + RESULT_LOG_PREFIX + PUBLISHED.to_termination_message() + "\nbye\n"
    assert status.parse_termination_message(log) == PUBLISHED
    assert status.parse_termination_message("Traceback ...\nValueError") is None
    assert status.parse_termination_message("") is None


# --- failure reasons --------------------------------------------------------------------------


def failed_result(reason: str, message: str) -> str:
    return TrainerResult(outcome="Failed", reason=reason, message=message).to_termination_message()  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("exit_code", "reason", "message"),
    [
        (3, "InvalidData", "train.jsonl:3: missing field output"),
        (5, "Diverged", "loss became NaN at step 12"),
    ],
)
def test_trainer_failures_fail_with_the_trainers_reason(exit_code: int, reason: str, message: str) -> None:
    term = {"exitCode": exit_code, "reason": "Error", "message": failed_result(reason, message)}
    patch = reduce_status(
        observed(job(condition=("Failed", "PodFailurePolicy")), [pod("Failed", terminated=term)])
    )
    assert (patch["phase"], patch["reason"]) == ("Failed", reason)
    assert message in patch["message"]
    assert conditions(patch)["Failed"]["reason"] == reason
    assert_status_schema_ok(patch)


def test_fail_fast_exit_is_terminal_even_before_the_job_notices() -> None:
    """v1.20 has no podFailurePolicy: the trainer's verdict stands while the Job would retry."""
    term = {"exitCode": 3, "reason": "Error", "message": failed_result("InvalidData", "bad rows")}
    patch = reduce_status(observed(job(active=1, failed=1), [pod("Failed", terminated=term), pod("Pending")]))
    assert (patch["phase"], patch["reason"]) == ("Failed", "InvalidData")


def test_gate_failure_is_failed_but_keeps_the_published_version() -> None:
    result = PUBLISHED.model_copy(
        update={
            "outcome": "Failed",
            "reason": "GateFailed",
            "message": "eval_loss 1.5 > max 1.0",
            "gates": None,
        }
    )
    term = {"exitCode": 4, "reason": "Error", "message": result.to_termination_message()}
    patch = reduce_status(
        observed(job(condition=("Failed", "PodFailurePolicy")), [pod("Failed", terminated=term)])
    )
    assert (patch["phase"], patch["reason"]) == ("Failed", "GateFailed")
    assert patch["version"]["name"] == "v2"


def test_oom_killed_gives_a_hint() -> None:
    term = {"exitCode": 137, "reason": "OOMKilled", "message": ""}
    patch = reduce_status(
        observed(job(condition=("Failed", "BackoffLimitExceeded")), [pod("Failed", terminated=term)])
    )
    assert (patch["phase"], patch["reason"]) == ("Failed", "OOMKilled")
    assert "spec.resources.memory" in patch["message"] and "batchSize" in patch["message"]


def test_deadline_exceeded() -> None:
    patch = reduce_status(
        observed(
            job(condition=("Failed", "DeadlineExceeded")),
            [pod("Failed", terminated={"exitCode": 143, "reason": "Error"})],
        )
    )
    assert (patch["phase"], patch["reason"]) == ("Failed", "DeadlineExceeded")
    assert "activeDeadlineSeconds" in patch["message"]


def test_backoff_limit_exceeded_quotes_the_last_log() -> None:
    term = {"exitCode": 1, "reason": "Error", "message": "Traceback...\nRuntimeError: NCCL timeout"}
    patch = reduce_status(
        observed(
            job(failed=4, condition=("Failed", "BackoffLimitExceeded")), [pod("Failed", terminated=term)]
        )
    )
    assert (patch["phase"], patch["reason"]) == ("Failed", "BackoffLimitExceeded")
    assert "NCCL timeout" in patch["message"] and "backoffLimit" in patch["message"]
    assert patch["restarts"] == 4


def test_image_pull_backoff_stalls() -> None:
    patch = reduce_status(
        observed(job(active=1), [pod("Pending", waiting=("ImagePullBackOff", 'Back-off pulling image "x"'))])
    )
    assert (patch["phase"], patch["reason"]) == ("Pending", "ImagePullBackOff")
    assert conditions(patch)["Stalled"]["status"] == "True"
    assert "spec.image" in patch["message"]


def test_missing_secret_stalls_with_its_name() -> None:
    patch = reduce_status(
        observed(
            job(active=1),
            [pod("Pending", waiting=("CreateContainerConfigError", 'secret "s3-creds" not found'))],
        )
    )
    assert (patch["phase"], patch["reason"]) == ("Pending", "SecretNotFound")
    assert "s3-creds" in patch["message"] and "credentialsSecret" in patch["message"]
    assert conditions(patch)["Stalled"]["reason"] == "SecretNotFound"


def test_unschedulable_stalls() -> None:
    unsched = [
        {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": "0/3 nodes: Insufficient nvidia.com/gpu",
        }
    ]
    patch = reduce_status(observed(job(active=1), [pod("Pending", conditions=unsched)]))
    assert (patch["phase"], patch["reason"]) == ("Pending", "Unschedulable")


def test_restarts_count_replaced_pods_including_evictions() -> None:
    evicted = pod("Failed", terminated={"exitCode": 143, "reason": "Error"})
    patch = reduce_status(observed(job(active=1, failed=0), [evicted, pod()]))
    assert patch["restarts"] == 1


def test_finished_job_deleted_by_ttl_keeps_its_outcome() -> None:
    before = {
        "phase": "Succeeded",
        "reason": "Published",
        "message": "published v2",
        "jobName": ATTEMPT,
        "restarts": 2,
    }
    patch = reduce_status(observed(None, [], before))
    assert (patch["phase"], patch["reason"], patch["restarts"]) == ("Succeeded", "Published", 2)


def test_an_older_copy_of_the_job_never_moves_a_finished_attempt_back() -> None:
    """A Job's watch event handled after the outcome was recorded shows the Job still running (and
    its pods, read now, done): the recorded outcome stands rather than Pending/PodsPending."""
    before = {"phase": "Succeeded", "reason": "Published", "message": "published v2", "jobName": ATTEMPT}
    done = pod("Succeeded", terminated={"exitCode": 0, "reason": "Completed"})
    patch = reduce_status(observed(job(active=1), [done], before))
    assert (patch["phase"], patch["reason"], patch["message"]) == ("Succeeded", "Published", "published v2")
    # Not for another attempt's record: a new attempt's running Job is reported as running.
    other = {**before, "jobName": "demo-older"}
    assert reduce_status(observed(job(active=1), [pod()], other))["phase"] == "Running"
    # And a finished Job is read as it says (a failure found after a recorded success is reported).
    failed = job(failed=1, condition=("Failed", "BackoffLimitExceeded"))
    assert reduce_status(observed(failed, [], before))["phase"] == "Failed"


def test_invalid_spec_status_names_the_field() -> None:
    patch = status.invalid_status([("spec.output.uri", "not under an allowed prefix")], observed(None, []))
    assert (patch["phase"], patch["reason"]) == ("Failed", "InvalidSpec")
    invalid = conditions(patch)["Invalid"]
    assert invalid["status"] == "True" and invalid["message"].startswith("spec.output.uri")
    assert invalid["observedGeneration"] == 4
    assert patch["jobName"] is None


# --- conditions, transitions, purity ----------------------------------------------------------


def test_last_transition_time_moves_only_when_status_flips() -> None:
    first = reduce_status(observed(job(active=1), [pod()]))
    same = reduce_status(
        Observed(generation=4, attempt=ATTEMPT, job=job(active=1), pods=[pod()], status=first, now=LATER)
    )
    assert conditions(same)["Running"]["lastTransitionTime"] == NOW
    term = {"exitCode": 0, "reason": "Completed", "message": PUBLISHED.to_termination_message()}
    done = reduce_status(
        Observed(
            generation=4,
            attempt=ATTEMPT,
            job=job(condition=("Complete", "")),
            pods=[pod("Succeeded", terminated=term)],
            status=first,
            now=LATER,
        )
    )
    assert conditions(done)["Running"]["lastTransitionTime"] == LATER
    assert conditions(done)["Succeeded"]["lastTransitionTime"] == LATER
    assert conditions(done)["Invalid"]["lastTransitionTime"] == NOW


def test_transition_events() -> None:
    running = reduce_status(observed(job(active=1), [pod()]))
    assert status.transition({}, running) == status.Transition(
        "Normal", "Running", "Running: training pods are running"
    )
    assert status.transition(running, running) is None
    stalled = reduce_status(
        observed(
            job(active=1), [pod("Pending", waiting=("CreateContainerConfigError", 'secret "s" not found'))]
        )
    )
    event = status.transition(running, stalled)
    assert event is not None and event.type == "Warning" and event.reason == "SecretNotFound"


def test_new_attempt_clears_previous_outcome_and_merge_semantics() -> None:
    before = {
        "phase": "Succeeded",
        "reason": "Published",
        "observedGeneration": 1,
        "jobName": "demo-g1",
        "version": {"name": "v1"},
        "progress": {"step": 9},
        "completionTime": NOW,
        "conditions": [
            {"type": "Succeeded", "status": "True", "reason": "Published", "observedGeneration": 1}
        ],
    }
    obs = Observed(generation=2, attempt="demo-g2", job=None, pods=[], status=before, now=LATER)
    reset = status.new_attempt_status(obs, "abcd1234")
    after = status.merged(before, reset)
    assert "version" not in after and "progress" not in after
    assert (after["jobName"], after["attemptGeneration"], after["attemptFingerprint"]) == (
        "demo-g2",
        2,
        "abcd1234",
    )
    # Nothing claims success for generation 2: every condition is False (Fits: Unknown, not planned
    # yet) and about generation 2; the previous generation's plan is cleared.
    assert (after["phase"], after["reason"], after["observedGeneration"]) == ("Pending", "Creating", 2)
    conds = {c["type"]: c for c in after["conditions"]}
    assert conds.pop("Fits")["reason"] == "NotPlanned"
    assert all(c["status"] == "False" and c["observedGeneration"] == 2 for c in conds.values())
    assert reset["plan"] is None
    assert after["history"] == [
        {
            "generation": 1,
            "jobName": "demo-g1",
            "phase": "Succeeded",
            "reason": "Published",
            "version": "v1",
            "completionTime": NOW,
        }
    ]


def test_history_records_each_generation_once_and_supersession() -> None:
    running = {"phase": "Running", "observedGeneration": 1, "jobName": "demo-g1"}
    obs = Observed(generation=2, attempt="demo-g2", job=None, pods=[], status=running, now=LATER)
    history = status.new_attempt_status(obs)["history"]
    assert history == [
        {"generation": 1, "jobName": "demo-g1", "phase": "Superseded", "reason": "NewGeneration"}
    ]
    done = {**running, "phase": "Failed", "history": history}
    again = status.with_history(done["history"], status.history_entry(1, "demo-g1", "Failed", "X"))
    assert [h["phase"] for h in again] == ["Failed"]
    many: list = []
    for n in range(1, 30):
        many = status.with_history(many, status.history_entry(n, f"demo-g{n}", "Succeeded"))
    assert len(many) == status.HISTORY_LIMIT and many[-1]["generation"] == 29


def test_succeeded_attempt_records_its_version_in_history() -> None:
    message = PUBLISHED.to_termination_message()
    patch = reduce_status(
        observed(
            job(condition=("Complete", "")),
            [pod("Succeeded", terminated={"exitCode": 0, "message": message})],
        )
    )
    assert patch["history"][-1]["version"] == "v2" and patch["history"][-1]["phase"] == "Succeeded"


@pytest.mark.parametrize(
    "case",
    [
        (job(active=1), [pod()]),
        (
            job(condition=("Failed", "BackoffLimitExceeded")),
            [pod("Failed", terminated={"exitCode": 137, "reason": "OOMKilled"})],
        ),
        (
            job(condition=("Complete", "")),
            [pod("Succeeded", terminated={"exitCode": 0, "message": PUBLISHED.to_termination_message()})],
        ),
        (job(active=1), [pod("Pending", waiting=("ImagePullBackOff", "x"))]),
    ],
)
def test_reducers_do_not_mutate_their_inputs(case: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    j, pods = case
    current = {
        "phase": "Running",
        "conditions": [{"type": "Running", "status": "True", "lastTransitionTime": NOW}],
        "progress": {"step": 1},
    }
    snapshot = json.dumps([j, pods, current], sort_keys=True)
    obs = observed(j, pods, current)
    patch = reduce_status(obs)
    status.transition(current, patch)
    status.merged(current, patch)
    status.invalid_status([("spec.x", "y")], obs)
    assert json.dumps([j, pods, current], sort_keys=True) == snapshot
    # And the output shares no mutable structure with the input.
    patch_copy = copy.deepcopy(patch)
    patch["conditions"].clear()
    assert current["conditions"] and reduce_status(obs) == patch_copy


def test_failed_create_events_on_a_podless_job_are_a_quota_stall() -> None:
    events = [
        {
            "reason": "FailedCreate",
            "lastTimestamp": "2026-11-22T09:59:00Z",
            "message": 'Error creating: pods "demo-g1-x" is forbidden: exceeded quota: q, requested: pods=1',
        }
    ]
    obs = Observed(generation=4, attempt=ATTEMPT, job=job(), pods=[], status={}, now=NOW, job_events=events)
    patch = reduce_status(obs)
    assert (patch["phase"], patch["reason"]) == ("Pending", "QuotaExceeded")
    stalled = conditions(patch)["Stalled"]
    assert stalled["status"] == "True" and "exceeded quota" in stalled["message"]
    event = status.transition({"phase": "Pending", "reason": "Creating"}, patch)
    assert event is not None and event.type == "Warning" and event.reason == "QuotaExceeded"
    other = [{**events[0], "message": 'pods "x" is forbidden: no PriorityClass with name gold was found'}]
    obs = Observed(generation=4, attempt=ATTEMPT, job=job(), pods=[], status={}, now=NOW, job_events=other)
    assert reduce_status(obs)["reason"] == "PodCreationFailed"
    # Once pods exist the old events no longer matter.
    obs = Observed(
        generation=4, attempt=ATTEMPT, job=job(active=1), pods=[pod()], status={}, now=NOW, job_events=events
    )
    assert reduce_status(obs)["phase"] == "Running"


def test_a_service_account_refusal_is_its_own_stall() -> None:
    """Both v1.20 ServiceAccount admission refusals (account gone; its token not there yet)."""
    for message in (
        'Error creating: pods "demo-g1-x" is forbidden: error looking up service account ns/demo-trainer: '
        'serviceaccount "demo-trainer" not found',
        "Error creating: No API token found for service account "
        '"ns/demo-trainer", retry after the token is automatically created and added to the service account',
    ):
        events = [{"reason": "FailedCreate", "lastTimestamp": "2026-11-22T09:59:00Z", "message": message}]
        obs = Observed(
            generation=4, attempt=ATTEMPT, job=job(), pods=[], status={}, now=NOW, job_events=events
        )
        patch = reduce_status(obs)
        assert (patch["phase"], patch["reason"]) == ("Pending", "ServiceAccountMissing")
        stalled = conditions(patch)["Stalled"]
        assert stalled["status"] == "True" and "demo-trainer" in stalled["message"]
        event = status.transition({"phase": "Pending", "reason": "Creating"}, patch)
        assert event is not None and event.type == "Warning" and event.reason == "ServiceAccountMissing"


def test_a_refused_child_stays_stalled_until_the_retry_creates_it() -> None:
    obs = Observed(generation=2, attempt=ATTEMPT, job=None, pods=[], status={"jobName": ATTEMPT}, now=NOW)
    rejected = status.rejected_status(obs, "ChildRejected", "Job x is invalid: spec.template.spec.affinity")
    assert conditions(rejected)["Stalled"]["status"] == "True"
    assert conditions(rejected)["Stalled"]["observedGeneration"] == 2
    after = status.merged({"jobName": ATTEMPT}, rejected)
    # A resync in the meantime (no Job yet) keeps saying why, instead of flipping back to Creating.
    again = reduce_status(Observed(generation=2, attempt=ATTEMPT, job=None, pods=[], status=after, now=LATER))
    assert (again["reason"], conditions(again)["Stalled"]["status"]) == ("ChildRejected", "True")
    assert status.transition(after, again) is None
    assert_status_schema_ok(rejected)


@pytest.mark.parametrize(
    ("plan", "status", "reason"),
    [
        (None, "Unknown", "NotPlanned"),
        ({"generation": 3, "fits": True, "summary": "old"}, "Unknown", "NotPlanned"),  # another generation
        ({"generation": 4, "fits": True, "summary": "estimated peak 1 GiB of 8 GiB: fits"}, "True", "Fits"),
        (
            {"generation": 4, "fits": False, "summary": "estimated peak 9 GiB: WILL NOT FIT"},
            "False",
            "WillNotFit",
        ),
        ({"generation": 4, "summary": "no memory bound"}, "Unknown", "NoMemoryBound"),
    ],
)
def test_fits_condition_follows_the_plan_of_this_generation(
    plan: dict[str, Any] | None, status: str, reason: str
) -> None:
    current = {"plan": plan} if plan is not None else {}
    patch = reduce_status(observed(job(active=1), [pod()], current=current))
    fits = next(c for c in patch["conditions"] if c["type"] == "Fits")
    assert (fits["status"], fits["reason"], fits["observedGeneration"]) == (status, reason, 4)
    if plan is not None and plan.get("generation") == 4:
        assert fits["message"] == plan["summary"]
