"""Distributed failures are classified like single-process ones (issue 16, deliverable 4).

A real 2-process torchrun (``--standalone``, CPU) under ``python -m kubetune_trainer.launch``, the
command the operator renders for multi-process jobs: a worker's permanent exit code (3 bad input)
becomes the pod's exit code, where plain torchrun exits 1 and podFailurePolicy's FailJob rule would
never match. The rule itself (FailJob on 3/4/5 of container "trainer", Ignore on DisruptionTarget)
is checked against the Kubernetes OpenAPI schema in tests/unit/test_operator_builders.py (v1.20
cannot show podFailurePolicy).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from kubetune_api.reports import EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_GATES_FAILED
from kubetune_operator.builders import FAIL_FAST_EXIT_CODES
from kubetune_trainer.launch import PERMANENT_EXIT_CODES, exit_code_for

WORKER = r"""
import os, sys, time
rank, mode = int(os.environ["RANK"]), sys.argv[1]
if mode == "bad-input" and rank == 1:
    sys.exit(3)
if mode == "crash" and rank == 0:
    sys.exit(1)
if mode == "killed" and rank == 1:
    os.kill(os.getpid(), 9)
if mode == "ok":
    sys.exit(0)
time.sleep(120)  # the healthy peer: torchrun stops it when the other worker fails
"""


def test_the_launcher_and_the_operator_agree_on_the_permanent_codes() -> None:
    assert PERMANENT_EXIT_CODES == FAIL_FAST_EXIT_CODES == (EXIT_BAD_INPUT, EXIT_GATES_FAILED, EXIT_DIVERGED)


def _f(code: int, ts: int, rank: int = 0) -> SimpleNamespace:
    return SimpleNamespace(exitcode=code, timestamp=ts, local_rank=rank)


@pytest.mark.parametrize(
    ("failures", "code"),
    [
        ({1: _f(3, 10, 1)}, 3),
        # A permanent failure anywhere wins over a peer's later (or earlier) generic error.
        ({0: _f(1, 5), 1: _f(5, 9, 1)}, 5),
        ({0: _f(4, 5), 1: _f(3, 9, 1)}, 4),
        ({0: _f(1, 5), 1: _f(-15, 9, 1)}, 1),
        ({1: _f(-9, 3, 1)}, 137),
        # The peer torchrun stopped (SIGTERM, same second) is not the cause.
        ({0: _f(-15, 3), 1: _f(-9, 3, 1)}, 137),
        ({0: _f(-15, 3)}, 143),
        ({}, 1),
    ],
)
def test_exit_code_for_worker_failures(failures: dict[int, SimpleNamespace], code: int) -> None:
    assert exit_code_for(failures) == code


def _run(launcher: list[str], tmp_path: Path, mode: str) -> subprocess.CompletedProcess[str]:
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    return subprocess.run(
        [*launcher, "--standalone", "--nnodes=1", "--nproc-per-node=2", str(worker), mode],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
        check=False,
    )


LAUNCHER = [sys.executable, "-m", "kubetune_trainer.launch"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


@pytest.mark.integration
def test_a_worker_exiting_3_makes_the_pod_exit_3_where_torchrun_exits_1(tmp_path: Path) -> None:
    plain = _run(TORCHRUN, tmp_path, "bad-input")
    assert plain.returncode == 1, plain.stderr[-2000:]
    launched = _run(LAUNCHER, tmp_path, "bad-input")
    assert launched.returncode == EXIT_BAD_INPUT, launched.stderr[-2000:]
    assert "exiting 3" in launched.stderr


@pytest.mark.integration
@pytest.mark.parametrize(("mode", "code"), [("ok", 0), ("crash", 1), ("killed", 137)])
def test_other_outcomes_keep_their_meaning(tmp_path: Path, mode: str, code: int) -> None:
    launched = _run(LAUNCHER, tmp_path, mode)
    assert launched.returncode == code, launched.stderr[-2000:]


# --- two "pods": two torchrun agents on one c10d rendezvous -----------------------------------

PEER_WORKER = r"""
import os, sys, time
import torch, torch.distributed as dist
dist.init_process_group("gloo")
rank = dist.get_rank()
ckpt, log = os.environ["CKPT"], os.environ["WORKLOG"]
start = int(open(ckpt).read()) if os.path.exists(ckpt) else 0
with open(log, "a") as f:
    f.write("rank %d start %d restart %s\n" % (rank, start, os.environ.get("TORCHELASTIC_RESTART_COUNT")))
t = torch.zeros(1)
for step in range(start, int(os.environ["STEPS"])):
    if os.environ.get("MODE") == "bad-input" and rank == 1 and step == 2:
        sys.exit(3)
    dist.all_reduce(t)
    time.sleep(0.2)
    if rank == 0:  # the "checkpoint": the last completed step, written atomically
        with open(ckpt + ".tmp", "w") as f:
            f.write(str(step + 1))
        os.replace(ckpt + ".tmp", ckpt)
dist.destroy_process_group()
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Pods:
    """Each "pod" is a launcher process in its own session (killed as a whole, like a preempted pod)."""

    def __init__(self, tmp_path: Path, mode: str = "", steps: int = 30) -> None:
        self.tmp = tmp_path
        (tmp_path / "worker.py").write_text(PEER_WORKER)
        self.port = _free_port()
        self.env = {
            **__import__("os").environ,
            "CKPT": str(tmp_path / "ckpt"),
            "WORKLOG": str(tmp_path / "work.log"),
            "STEPS": str(steps),
            "MODE": mode,
            "OMP_NUM_THREADS": "1",
            "LOGLEVEL": "INFO",  # torchelastic's agent logs its restarts at INFO
        }
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, host: bool) -> subprocess.Popen[bytes]:
        argv = [
            *LAUNCHER,
            "--nnodes=2",
            "--nproc-per-node=1",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{self.port}",
            "--rdzv-id=peer-test",
            f"--rdzv-conf=is_host={'true' if host else 'false'}",
            "--max-restarts=3",
            "--monitor-interval=0.5",
            str(self.tmp / "worker.py"),
        ]
        with (self.tmp / f"{name}.log").open("wb") as out:
            proc = subprocess.Popen(
                argv, cwd=self.tmp, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def checkpoint(self) -> int:
        path = self.tmp / "ckpt"
        return int(path.read_text()) if path.exists() else 0

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL the "pod": the launcher and every process under it (torchelastic starts its
        workers in sessions of their own, so the process group alone is not enough)."""
        import contextlib
        import os
        import signal

        for pid in reversed(_descendants(proc.pid)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                self.kill(proc)


def _descendants(pid: int) -> list[int]:
    """``pid`` and all its descendants, parents first (from /proc)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            tasks = Path(f"/proc/{current}/task").iterdir()
            for task in tasks:
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


@pytest.mark.integration
def test_a_peer_killed_mid_run_costs_a_re_rendezvous_not_a_failure(tmp_path: Path) -> None:
    """Pod B is SIGKILLed mid-run (a preemption: the Job replaces it and ignores that failure through
    DisruptionTarget). Pod A's launcher does not fail: its workers restart in place (--max-restarts),
    re-rendezvous with the replacement B', resume from the checkpoint, and A exits 0."""
    import time

    pods = _Pods(tmp_path)
    try:
        a = pods.start("a", host=True)
        time.sleep(1)
        b = pods.start("b", host=False)
        deadline = time.monotonic() + 120
        while pods.checkpoint() < 5 and time.monotonic() < deadline:
            assert a.poll() is None and b.poll() is None, pods.log("a")[-2000:] + pods.log("b")[-2000:]
            time.sleep(0.2)
        killed_at = pods.checkpoint()
        assert killed_at >= 5
        pods.kill(b)
        b2 = pods.start("b2", host=False)
        assert a.wait(timeout=240) == 0, pods.log("a")[-3000:]
        assert b2.wait(timeout=60) == 0, pods.log("b2")[-3000:]
    finally:
        pods.cleanup()
    assert pods.checkpoint() == 30
    starts = [line.split() for line in (tmp_path / "work.log").read_text().splitlines()]
    resumed = [int(s[3]) for s in starts if s[5] != "0"]  # workers started by a restart of agent A
    assert resumed and min(resumed) >= killed_at, starts
    assert "will restart worker group" in pods.log("a")


@pytest.mark.integration
def test_a_permanent_exit_code_is_not_restarted_in_place(tmp_path: Path) -> None:
    """With --max-restarts, a worker exiting 3 still ends its pod at once with exit code 3 (no restart:
    retrying cannot help), so podFailurePolicy fails the Job.

    The other pod's worker loses its peer mid all-reduce and fails generically; its agent may restart
    it and then find the rendezvous closed (exit 1) — possibly in the same poll as the pod that exits 3,
    or before it. That pod is not the one under test: the Job fails through the pod that exits 3."""
    import time

    pods = _Pods(tmp_path, mode="bad-input")
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        procs["a"] = pods.start("a", host=True)
        time.sleep(1)
        procs["b"] = pods.start("b", host=False)
        deadline = time.monotonic() + 120
        codes: dict[str, int | None] = {}
        while time.monotonic() < deadline:
            codes = {name: p.poll() for name, p in procs.items()}
            if EXIT_BAD_INPUT in codes.values() or None not in codes.values():
                break
            time.sleep(0.2)
    finally:
        pods.cleanup()
    logs = {name: pods.log(name)[-2000:] for name in procs}
    permanent = [name for name, code in codes.items() if code == EXIT_BAD_INPUT]
    assert permanent, (codes, logs)
    assert "will restart worker group" not in pods.log(permanent[0])
    assert "exiting 3" in pods.log(permanent[0])


@pytest.mark.integration
def test_losing_pod_0_which_hosts_the_rendezvous_store(tmp_path: Path) -> None:
    """Pod A (``is_host``: its agent hosts the c10d rendezvous TCPStore) is SIGKILLed mid-run. The
    store goes with it, so pod B's agent cannot re-rendezvous in place: B's launcher exits non-zero
    (a failure the Job counts, unlike losing B). The Job recreates both pods; A' hosts a new store,
    B' joins it, and the workers resume from the shared checkpoint and finish (docs/reliability.md)."""
    import time

    pods = _Pods(tmp_path)
    try:
        a = pods.start("a", host=True)
        time.sleep(1)
        b = pods.start("b", host=False)
        deadline = time.monotonic() + 120
        while pods.checkpoint() < 5 and time.monotonic() < deadline:
            assert a.poll() is None and b.poll() is None, pods.log("a")[-2000:] + pods.log("b")[-2000:]
            time.sleep(0.2)
        killed_at = pods.checkpoint()
        assert killed_at >= 5
        pods.kill(a)
        started = time.monotonic()
        b_code = b.wait(timeout=240)
        b_exit_after = time.monotonic() - started
        # The Job controller replaces both failed pods.
        a2 = pods.start("a2", host=True)
        time.sleep(1)
        b2 = pods.start("b2", host=False)
        assert a2.wait(timeout=240) == 0, pods.log("a2")[-3000:]
        assert b2.wait(timeout=60) == 0, pods.log("b2")[-3000:]
    finally:
        pods.cleanup()
    print(f"pod B exited {b_code} {b_exit_after:.1f} s after pod A was killed")
    print(pods.log("b")[-2500:])
    assert b_code != 0, pods.log("b")[-3000:]
    assert pods.checkpoint() == 30
    starts = [line.split() for line in (tmp_path / "work.log").read_text().splitlines()]
    assert max(int(s[3]) for s in starts) >= killed_at, starts
