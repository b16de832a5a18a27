"""A FineTuneSweep on a cluster, as the operator plans it (kubetune_operator.sweeps, pure): trials
recorded before their FineTuneJobs exist, restarts that neither lose nor repeat one, pruning by
deleting the child, the winner as one more child with the lineage, and invalid sweeps named.

The API server's side (child FineTuneJobs really created, pods on the fake kubelet, an operator
restart) is tests/integration/test_sweep_cluster.py."""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import pytest

from kubetune_api import names
from kubetune_operator import sweeps
from kubetune_operator.validation import SpecInvalid, parse_sweep

NOW = "2026-12-06T12:00:00Z"
QUEUE = "kueue.x-k8s.io/queue-name"


def _body(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "template": {
            "model": {"name": "m", "base": {"uri": "s3://bucket/base"}},
            "data": {"train": {"uri": "s3://bucket/train.jsonl"}},
            "training": {"evalEverySteps": 5, "maxSteps": 20},
            "output": {"uri": "s3://bucket/models"},
        },
        "parameters": [{"path": "training.learningRate", "type": "logUniform", "low": 1e-5, "high": 1e-2}],
        "maxTrials": 4,
        "parallelism": 2,
        "sampler": {"type": "tpe", "seed": 3, "startupTrials": 2},
        "pruning": {"type": "median", "startupTrials": 1},
    }
    base.update(spec)
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneSweep",
        "metadata": {
            "name": "s",
            "namespace": "team",
            "uid": "uid-s",
            "generation": 1,
            "labels": {QUEUE: "team-a"},
        },
        "spec": base,
    }


class Cluster:
    """The sweep's status and its children, as the API server would keep them between reconciles."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        self.status: dict[str, Any] = {}
        self.children: dict[str, dict[str, Any]] = {}
        self.events: list[tuple[str, str, str]] = []
        self.created: list[str] = []

    def name(self, suffix: str) -> str:
        """A child's name: ``<sweep>-<study>-<suffix>``, the study the spec's digest."""
        return f"s-{parse_sweep(self.body).digest()[:6]}-{suffix}"

    def step(self, *, write_children: bool = True) -> sweeps.SweepPlan:
        sweep = parse_sweep(self.body)
        out = sweeps.plan(
            sweep, self.body["metadata"], copy.deepcopy(self.status), copy.deepcopy(self.children), NOW
        )
        self.status = out.status
        if write_children:  # an operator killed between the status write and the creates skips this
            for child in out.create:
                assert child["metadata"]["name"] not in self.children, "a trial was created twice"
                self.children[child["metadata"]["name"]] = {**copy.deepcopy(child), "status": {}}
                self.children[child["metadata"]["name"]]["metadata"]["generation"] = 1
                self.created.append(child["metadata"]["name"])
            for name in out.delete:
                self.children.pop(name, None)
        self.events += out.events
        return out

    def lr(self, name: str) -> float:
        return float(self.children[name]["spec"]["training"]["learningRate"])

    def report(self, name: str, step: int, loss: float) -> None:
        child = self.children[name]
        number = int(child["metadata"]["labels"][sweeps.LABEL_TRIAL])
        trial = child["status"].setdefault("trial", {"number": number, "intermediate": {}})
        trial["intermediate"][str(step)] = loss
        trial["inputsDigest"] = f"digest-{number}"

    def finish(
        self, name: str, loss: float | None, *, phase: str = "Succeeded", reason: str = "TrialComplete"
    ) -> None:
        st = self.children[name]["status"]
        st.update(phase=phase, reason=reason, message="done", observedGeneration=1)
        if loss is not None:
            st["metrics"] = {"eval_loss": loss}


def _loss(lr: float) -> float:
    """A landscape with one clearly best learning rate, 1e-3."""
    return 1.0 + abs(math.log10(lr) + 3.0)


def test_trials_are_recorded_then_created_as_owned_children_up_to_the_parallelism() -> None:
    c = Cluster(_body())
    out = c.step()
    assert [t["number"] for t in c.status["trials"]] == [0, 1]
    assert all(t["state"] == "running" for t in c.status["trials"])
    assert c.created == [c.name("t0"), c.name("t1")]
    assert (c.status["phase"], c.status["reason"], c.status["done"]) == ("Running", "Searching", "0/4")
    child = c.children[c.name("t0")]
    meta = child["metadata"]
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneSweep",
            "name": "s",
            "uid": "uid-s",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert meta["labels"][QUEUE] == "team-a"  # Kueue admits each trial from the sweep's queue
    assert meta["labels"][names.LABEL_SWEEP] == "s"
    trial = json.loads(meta["annotations"][names.ANNOTATION_SWEEP_TRIAL])
    assert trial == {"number": 0, "objective": "eval_loss", "sweep": "s"}
    assert (
        child["spec"]["training"]["learningRate"] == c.status["trials"][0]["params"]["training.learningRate"]
    )
    assert [e[1] for e in out.events] == ["TrialStarted", "TrialStarted"]
    # Nothing changed: the next reconcile creates nothing and records nothing new.
    again = c.step()
    assert again.create == [] and again.delete == [] and len(c.status["trials"]) == 2


def test_a_restart_between_the_record_and_the_create_creates_the_recorded_trial_once() -> None:
    c = Cluster(_body())
    c.step(write_children=False)  # the status was written, the operator died before creating
    recorded = copy.deepcopy(c.status["trials"])
    assert c.children == {}
    out = c.step()
    assert [ch["metadata"]["name"] for ch in out.create] == [c.name("t0"), c.name("t1")]
    assert c.status["trials"] == recorded  # the same trials, the same values: none drawn again
    assert c.lr(c.name("t0")) == recorded[0]["params"]["training.learningRate"]


def test_a_weak_trial_is_pruned_by_deleting_its_job_and_the_best_one_is_published_once() -> None:
    c = Cluster(_body())
    c.step()
    for step in (5, 10, 15, 20):
        c.report(c.name("t0"), step, _loss(c.lr(c.name("t0"))) + 1.0 / step)
    c.finish(c.name("t0"), _loss(c.lr(c.name("t0"))))
    c.step()  # t0 complete, t2 started
    assert c.status["trials"][0]["state"] == "complete"
    assert c.status["trials"][0]["inputsDigest"] == "digest-0"
    # t1 reports a loss far above t0's at the same step: pruned, its FineTuneJob deleted.
    c.report(c.name("t1"), 5, 50.0)
    out = c.step()
    assert c.name("t1") in out.delete and c.name("t1") not in c.children
    t1 = c.status["trials"][1]
    assert t1["state"] == "pruned" and "step 5" in t1["message"]
    assert c.status["pruned"] == 1
    assert ("Normal", "TrialPruned") in [(e[0], e[1]) for e in c.events]
    # The rest run to the end.
    while c.status["phase"] == "Running" and not c.status.get("winnerJob"):
        for name, child in list(c.children.items()):
            if not child["status"].get("phase"):
                c.finish(name, _loss(c.lr(name)))
        c.step()
    complete = [t for t in c.status["trials"] if t["state"] == "complete"]
    best = min(complete, key=lambda t: t["value"])
    assert c.status["bestTrial"] == best["number"]
    assert c.status["winnerJob"] == c.name("winner") and c.status["reason"] == "PublishingWinner"
    assert c.created.count(c.name("winner")) == 1
    winner = c.children[c.name("winner")]
    assert winner["spec"]["training"]["learningRate"] == best["params"]["training.learningRate"]
    assert winner["metadata"]["labels"][QUEUE] == "team-a"
    assert names.ANNOTATION_SWEEP_TRIAL not in winner["metadata"]["annotations"]  # it publishes
    story = json.loads(winner["metadata"]["annotations"][names.ANNOTATION_SWEEP_LINEAGE])
    assert story["winner"] == best["number"]
    assert [t["number"] for t in story["trials"]] == [0, 1, 2, 3]
    assert {t["state"] for t in story["trials"]} == {"complete", "pruned"}
    # The winner publishes: the sweep is Succeeded with its version, and stays so.
    c.children[c.name("winner")]["status"] = {
        "phase": "Succeeded",
        "reason": "Published",
        "message": "published v1",
        "observedGeneration": 1,
        "version": {"number": 1, "uri": "s3://bucket/models/m/v1"},
    }
    c.step()
    assert (c.status["phase"], c.status["reason"]) == ("Succeeded", "Published")
    assert c.status["version"]["number"] == 1
    assert c.status["conditions"][0]["type"] == "Complete" and c.status["conditions"][0]["status"] == "True"
    after = c.step()
    assert after.create == [] and after.delete == [] and c.created.count(c.name("winner")) == 1


def test_an_input_failure_stops_the_sweep_and_no_winner_is_published() -> None:
    c = Cluster(_body())
    c.step()
    c.finish(c.name("t0"), None, phase="Failed", reason="FetchFailed")
    out = c.step()
    assert (c.status["phase"], c.status["reason"]) == ("Failed", "InputsFailed")
    assert "FetchFailed" in c.status["message"]
    assert out.create == [] and c.name("winner") not in c.children
    assert c.status["conditions"][0]["status"] == "True"
    assert c.step().create == []  # and nothing starts later


def test_every_trial_failed_is_a_failed_sweep_with_nothing_published() -> None:
    c = Cluster(_body(maxTrials=2))
    c.step()
    c.finish(c.name("t0"), None, phase="Failed", reason="Diverged")
    c.finish(c.name("t1"), None, phase="Failed", reason="Diverged")
    c.step()
    assert (c.status["phase"], c.status["reason"]) == ("Failed", "NoTrialCompleted")
    assert c.name("winner") not in c.children and c.status["failed"] == 2


def test_a_changed_spec_is_a_new_study_and_the_old_trials_are_deleted() -> None:
    c = Cluster(_body())
    c.step()
    old = dict(c.children)
    c.body["spec"]["maxTrials"] = 3
    c.body["metadata"]["generation"] = 2
    out = c.step()
    assert set(out.delete) == set(old)
    assert ("Normal", "StudyRestarted") in [(e[0], e[1]) for e in out.events]
    assert [t["number"] for t in c.status["trials"]] == [0, 1]  # the new study's own trials
    assert set(c.children).isdisjoint(old)  # named by the new study: no clash with the old ones
    assert c.status["observedGeneration"] == 2 and c.status["done"] == "0/3"


def test_a_child_being_deleted_is_gone_for_the_plan_and_its_trial_is_created_again() -> None:
    c = Cluster(_body())
    c.step()
    # Someone deleted trial 0's FineTuneJob while it ran: its finalizer still holds it.
    c.children[c.name("t0")]["metadata"]["deletionTimestamp"] = NOW
    out = c.step(write_children=False)
    assert [ch["metadata"]["name"] for ch in out.create] == [c.name("t0")]  # recreated (409 until gone)
    assert out.delete == []  # not deleted twice
    assert c.status["trials"][0]["state"] == "running"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (
            {"parameters": [{"path": "training.learnRate", "type": "uniform", "low": 0.1, "high": 0.2}]},
            "spec.parameters[0].path",
        ),
        ({"parameters": [{"path": "method.lora.r", "type": "choice", "choices": []}]}, "spec.parameters[0]"),
        (
            {"parameters": [{"path": "training.learningRate", "type": "uniform", "low": 0.2, "high": 0.1}]},
            "spec.parameters[0]",
        ),
        ({"maxTrials": 0}, "spec.maxTrials"),
    ],
)
def test_an_invalid_sweep_is_refused_with_its_field_named(change: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecInvalid) as err:
        parse_sweep(_body(**change))
    assert field in str(err.value)
    status = sweeps.invalid_status(str(err.value), 1, {}, NOW)
    assert (status["phase"], status["reason"]) == ("Failed", "InvalidSpec")
    assert field in status["message"]


def test_a_lost_delete_of_a_pruned_trial_is_sent_again() -> None:
    c = Cluster(_body())
    c.step()
    c.finish(c.name("t0"), 1.0)
    c.report(c.name("t0"), 5, 1.0)
    c.step()
    c.report(c.name("t1"), 5, 50.0)
    out = c.step(write_children=False)  # recorded pruned; the operator died before the delete
    assert c.name("t1") in out.delete and c.status["trials"][1]["state"] == "pruned"
    again = c.step()
    assert c.name("t1") in again.delete and c.name("t1") not in c.children


def test_an_input_failure_stops_the_trials_still_running() -> None:
    c = Cluster(_body())
    c.step()  # t0 and t1 run at once
    c.finish(c.name("t0"), None, phase="Failed", reason="InvalidData")
    out = c.step()
    assert c.name("t1") in out.delete and c.name("t1") not in c.children
    assert c.status["trials"][1]["state"] == "failed" and "stopped" in c.status["trials"][1]["message"]
    assert c.status["running"] == 0 and c.status["reason"] == "InputsFailed"


def test_children_carry_kopfs_marker_so_the_lineage_is_not_stored_twice() -> None:
    c = Cluster(_body())
    c.step()
    assert c.children[c.name("t0")]["metadata"]["annotations"]["kubetune.io/kopf-managed"] == "yes"


def test_the_lineage_of_a_huge_sweep_fits_an_annotation_and_keeps_every_digest() -> None:
    from kubetune_api.sweep import TrialStatus

    sweep = parse_sweep(_body(maxTrials=1000))
    records = [
        TrialStatus(
            number=n,
            params={"training.learningRate": 1e-4 + n * 1e-7},
            state="complete",
            value=2.0 + (n % 97) / 100,
            intermediate={s: 3.0 for s in range(0, 2000, 5)},
            inputs_digest=f"{n:064x}",
            message="x" * 200,
            job_name=f"s-abcdef-t{n}",
        )
        for n in range(1000)
    ]
    winner = records[97]
    text = sweeps.lineage_text(sweep, records, winner)
    assert len(text.encode()) <= sweeps.LINEAGE_MAX_BYTES
    story = json.loads(text)
    assert story["winner"] == 97 and story["omitted"]
    assert [t["number"] for t in story["trials"]] == list(range(1000))
    assert all(t["inputsDigest"] == f"{t['number']:064x}" for t in story["trials"])  # checkpoints found
    assert story["trials"][97]["params"] == winner.params and story["trials"][97]["value"] == winner.value
    small = json.loads(sweeps.lineage_text(sweep, records[:3], records[0]))
    assert "omitted" not in small and small["trials"][0]["intermediate"]  # a small sweep keeps all


def test_the_template_is_held_to_the_guard_rails_as_each_trial_would_be() -> None:
    from kubetune_operator.settings import OperatorSettings
    from kubetune_operator.validation import validate_sweep

    locked = OperatorSettings(allowed_output_prefixes=("s3://bucket/models",))
    body = _body()
    body["spec"]["template"]["output"] = {"uri": "s3://elsewhere/models"}
    with pytest.raises(SpecInvalid) as err:
        validate_sweep(body, locked)
    assert err.value.field == "spec.template.output.uri", err.value
    assert validate_sweep(_body(), locked).spec.max_trials == 4
