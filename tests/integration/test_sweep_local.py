"""`kubetune run examples/sweep/finetunesweep.yaml` on the tiny demo model, as a user lives it: the
sweep is killed mid-trial and run again (no trial lost or repeated), finds the clearly better
learning rate, prunes weak trials, publishes only the winner (with every trial in its manifest and
model card, the losers' checkpoints deleted), and a third run reuses it without running anything."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from kubetune_api.reports import EXIT_BAD_INPUT, EXIT_GATES_FAILED
from tests.fixtures.trainer import kubetune_cmd, trainer_env

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "sweep" / "finetunesweep.yaml"
MODEL = "kubetune-demo/models/tiny-demo-sweep"

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _study(store: Path) -> dict[str, Any] | None:
    found = list((store / MODEL / "sweeps" / "quickstart-sweep").glob("*/study.json"))
    return json.loads(found[0].read_text()) if found else None


def test_a_sweep_survives_a_kill_finds_the_better_rate_and_publishes_only_the_winner(
    demo_store: Path, tmp_path: Path
) -> None:
    args = [
        *kubetune_cmd("run", str(EXAMPLE)),
        "--store-dir",
        str(demo_store),
        "--workdir",
        str(tmp_path / "w"),
    ]
    env = {**trainer_env(), "PYTHONPATH": str(REPO)}

    # 1. Killed while trial 3 is running (SIGKILL: no chance to tidy up).
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600
    before: dict[str, Any] | None = None
    while time.monotonic() < deadline and proc.poll() is None:
        study = _study(demo_store)
        if study and any(t["number"] == 3 and t["state"] == "running" for t in study["trials"]):
            before = study
            break
        time.sleep(0.05)
    assert before is not None, f"trial 3 never ran: {proc.poll()=}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert not (demo_store / MODEL / "versions").exists()  # trials publish nothing

    # 2. Run again: trials 0-2 are kept, trial 3 re-runs with the same values, then 4 and the winner.
    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900, check=False)
    console = again.stderr.splitlines()
    assert again.returncode == 0, "\n".join(console[-30:])
    assert not any(line.startswith("[kubetune] trial 0 (1 of 5)") for line in console)
    assert any(line.startswith("[kubetune] trial 3 (4 of 5): ") for line in console), console
    study = _study(demo_store)
    assert study is not None
    trials = study["trials"]
    assert [t["number"] for t in trials] == [0, 1, 2, 3, 4]  # none lost, none repeated
    assert [t["params"] for t in trials[:4]] == [t["params"] for t in before["trials"]]
    assert all(t["state"] in ("complete", "pruned") for t in trials)

    # The sweep found the clearly better learning rate: every complete trial at >= 1e-3 beats every
    # one at <= 1e-4 by a wide margin, and the published trial is the best of them.
    complete = [t for t in trials if t["state"] == "complete"]
    high = [t["value"] for t in complete if t["params"]["training.learningRate"] >= 1e-3]
    low = [t["value"] for t in complete if t["params"]["training.learningRate"] <= 1e-4]
    assert high and low and max(high) < min(low) - 1.0, complete
    winner = min(complete, key=lambda t: t["value"])
    assert study["winner"]["trial"] == winner["number"] and study["winner"]["version"] == "v1"
    # Pruning is visible: a trial stopped at its first evaluation, worse than the finished ones.
    pruned = [t for t in trials if t["state"] == "pruned"]
    assert pruned and all(list(t["intermediate"]) == ["10"] for t in pruned), pruned
    assert any("pruned at step 10: eval_loss" in line for line in console)

    # Only the winner is a version, with the sweep's lineage in its manifest and card.
    versions = demo_store / MODEL / "versions"
    assert sorted(p.name for p in versions.iterdir()) == ["v1"]
    manifest = json.loads((versions / "v1" / "manifest.json").read_text())
    lineage = manifest["extra"]["sweep"]
    assert lineage["winner"] == winner["number"] and [t["number"] for t in lineage["trials"]] == [
        0,
        1,
        2,
        3,
        4,
    ]
    assert manifest["metrics"]["eval_loss"] == pytest.approx(winner["value"], rel=1e-6)
    run_config = json.loads((versions / "v1" / "training" / "run-config.json").read_text())
    assert run_config["training"]["learningRate"] == winner["params"]["training.learningRate"]
    listed = {f["path"] for f in manifest["files"]}
    assert {"sweep/trials.json", "sweep/objective.png"} <= listed
    card = (versions / "v1" / "README.md").read_text()
    assert "## Sweep" in card and f"| **{winner['number']}** (this version) | complete |" in card
    assert (demo_store / "kubetune-demo/models/tiny-demo-sweep/aliases/candidate.json").exists()
    # The winner resumed from its trial's final checkpoint (nothing trained twice); then every
    # checkpoint, the losers' too, is gone.
    assert any(line.startswith("[kubetune] resumed from checkpoint at step 40") for line in console)
    # ... so no peak was measured: no plan-accuracy line from a run that trained nothing.
    assert not any(line.startswith("[kubetune] plan vs measured") for line in console)
    assert not (demo_store / MODEL / "checkpoints").exists() or not any(
        (demo_store / MODEL / "checkpoints").rglob("*")
    )

    # 3. Re-applying the unchanged sweep runs nothing.
    third = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert third.returncode == 0, third.stderr[-2000:]
    assert f"its winner, trial {winner['number']}, is tiny-demo-sweep v1" in third.stderr
    assert "stage Training" not in third.stderr
    assert sorted(p.name for p in versions.iterdir()) == ["v1"]


def test_an_invalid_sweep_is_refused_before_anything_runs(tmp_path: Path) -> None:
    bad = tmp_path / "sweep.yaml"
    text = EXAMPLE.read_text().replace("choices: [8, 16]", "choices: []")
    bad.write_text(text)
    line = text.splitlines().index("      choices: []") + 1
    proc = subprocess.run(
        [*kubetune_cmd("run", str(bad)), "--store-dir", str(tmp_path / "store")],
        env={**trainer_env(), "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr
    assert (
        f"{bad}:{line}: spec.parameters[1].choices: a choice parameter needs at least one value"
        in proc.stderr
    )
    assert not (tmp_path / "store").exists()


def test_a_sweep_against_a_real_s3_endpoint_keeps_its_study_there_and_leaks_no_secret(
    demo_store_cache: Path, tmp_path: Path, s3_bucket: tuple[str, str]
) -> None:
    import boto3
    import yaml

    from tests.fixtures.s3 import FAKE_ACCESS_KEY_ID, FAKE_SECRET_ACCESS_KEY, fake_credentials_env
    from tests.fixtures.trainer import upload_demo

    endpoint, bucket = s3_bucket
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    upload_demo(s3, bucket, demo_store_cache)
    doc = yaml.safe_load(EXAMPLE.read_text())
    spec = doc["spec"]
    spec["template"]["model"]["base"]["uri"] = f"s3://{bucket}/demo/base-models/tiny-llama-demo"
    spec["template"]["data"]["train"]["uri"] = f"s3://{bucket}/demo/datasets/quickstart/train.jsonl"
    spec["template"]["data"]["eval"]["uri"] = f"s3://{bucket}/demo/datasets/quickstart/eval.jsonl"
    spec["template"]["output"] = {"uri": f"s3://{bucket}/registry"}
    spec["template"]["storage"] = {"endpoint": endpoint, "region": "us-east-1", "addressingStyle": "path"}
    spec["template"]["training"].update({"maxSteps": 8, "evalEverySteps": 4})
    spec.update({"maxTrials": 3, "pruning": {"type": "none"}})
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    proc = subprocess.run(
        [*kubetune_cmd("run", str(path)), "--remote", "--workdir", str(tmp_path / "w")],
        env={**trainer_env(**fake_credentials_env()), "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="registry/")["Contents"]]
    (study_key,) = [k for k in keys if k.endswith("/study.json")]
    assert study_key.startswith("registry/tiny-demo-sweep/sweeps/quickstart-sweep/")
    study = json.loads(s3.get_object(Bucket=bucket, Key=study_key)["Body"].read())
    assert [t["state"] for t in study["trials"]] == ["complete"] * 3 and study["winner"]["version"] == "v1"
    assert "registry/tiny-demo-sweep/versions/v1/sweep/trials.json" in keys
    assert not [k for k in keys if "/checkpoints/" in k]  # the winner's spent, the losers' deleted
    for secret in (FAKE_SECRET_ACCESS_KEY, FAKE_ACCESS_KEY_ID):
        assert secret not in proc.stderr and secret not in proc.stdout
        for key in keys:
            assert secret.encode() not in s3.get_object(Bucket=bucket, Key=key)["Body"].read(), key


def test_a_winner_that_stopped_early_is_published_as_it_stopped_and_its_gates_are_remembered(
    demo_store: Path, tmp_path: Path
) -> None:
    # Its checkpoint says it stopped early: resumed from there, it must not train on (it did: the
    # loop looked only at the step count), or the published model would not be the trial that won.
    # A rate of 1e-12 learns nothing, so the trust gates fail it: exit 4, then and on a re-run.
    import yaml

    doc = yaml.safe_load(EXAMPLE.read_text())
    spec = doc["spec"]
    spec["template"]["training"].update(
        {"maxSteps": 40, "evalEverySteps": 2, "earlyStopping": {"patience": 2, "minDelta": 0.001}}
    )
    spec.update(
        {
            "parameters": [{"path": "training.learningRate", "type": "choice", "choices": [1e-12]}],
            "maxTrials": 1,
            "pruning": {"type": "none"},
        }
    )
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    args = [*kubetune_cmd("run", str(path)), "--store-dir", str(demo_store), "--workdir", str(tmp_path / "w")]
    env = {**trainer_env(), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == EXIT_GATES_FAILED, proc.stderr[-3000:]
    console = proc.stderr.splitlines()
    stopped = [line for line in console if line.startswith("[kubetune] early stopping at step ")]
    assert len(stopped) == 1, console  # the trial's; the winner does not train again
    step = int(stopped[0].removeprefix("[kubetune] early stopping at step ").split(":")[0])
    assert step < 40 and f"[kubetune] resumed from checkpoint at step {step}" in console
    (trial,) = _study(demo_store)["trials"]  # type: ignore[index]
    manifest = json.loads((demo_store / MODEL / "versions" / "v1" / "manifest.json").read_text())
    assert manifest["metrics"]["eval_loss"] == pytest.approx(trial["value"], rel=1e-6)
    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == EXIT_GATES_FAILED, again.stderr[-2000:]
    assert (
        "is tiny-demo-sweep v1 (s3://kubetune-demo/models/tiny-demo-sweep/versions/v1, GateFailed): nothing ran"
        in (again.stderr)
    )


def test_a_repeated_draw_takes_the_earlier_trials_result(demo_store: Path, tmp_path: Path) -> None:
    # Three draws from two values: at least one repeats, and repeats train nothing.
    import yaml

    doc = yaml.safe_load(EXAMPLE.read_text())
    spec = doc["spec"]
    spec["template"]["training"].update({"maxSteps": 8, "evalEverySteps": 4, "learningRate": 2e-3})
    spec.update(
        {
            "parameters": [{"path": "method.lora.r", "type": "choice", "choices": [8, 16]}],
            "maxTrials": 3,
            "pruning": {"type": "none"},
        }
    )
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    proc = subprocess.run(
        [*kubetune_cmd("run", str(path)), "--store-dir", str(demo_store), "--workdir", str(tmp_path / "w")],
        env={**trainer_env(), "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = _study(demo_store)["trials"]  # type: ignore[index]
    firsts = {t["params"]["method.lora.r"]: t for t in reversed(trials)}  # the earliest per value
    repeats = [t for t in trials if firsts[t["params"]["method.lora.r"]] is not t]
    assert repeats, trials
    for t in repeats:
        first = firsts[t["params"]["method.lora.r"]]
        assert t["message"] == f"same values as trial {first['number']}"
        assert (t["state"], t["value"], t["inputsDigest"]) == (
            first["state"],
            first["value"],
            first["inputsDigest"],
        )
    trained = sum(line.startswith("[kubetune] stage Training: trial") for line in proc.stderr.splitlines())
    assert trained == len(firsts)  # one training per distinct value
