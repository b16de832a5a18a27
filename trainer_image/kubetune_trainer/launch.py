"""``python -m kubetune_trainer.launch <torchrun arguments>``: torchrun that keeps the workers' exit codes.

torchrun (torch.distributed.run) exits 1 whenever a worker fails, whatever the worker's exit code
was, so the Job's podFailurePolicy (``FailJob`` on exit codes 3/4/5, kubetune_api.reports) could
never match a distributed job: bad data or a diverged run was retried up to ``backoffLimit``. This
launcher runs torchrun's own code in-process with the same arguments, and when the workers fail it
exits with the code that classifies the failure (:func:`exit_code_for`):

* a permanent failure on any rank (bad input 3, gates failed 4, diverged 5) wins: retrying cannot
  help, whichever rank found it; the earliest such failure is used;
* otherwise the root cause (the earliest failure that is not a peer torchrun itself stopped with
  SIGTERM): its exit code, or
  ``128 + signal`` for a worker killed by a signal (as a shell reports it, e.g. 137 for SIGKILL);
* anything that is not a worker failure (rendezvous timeout, bad arguments): torchrun's own
  behaviour (an exception, exit code 1).

With ``--max-restarts`` (rendered by the operator) a worker failure restarts the pod's workers in
place — what makes a preempted peer cost a re-rendezvous instead of a counted failure of every
surviving pod — except after a permanent exit code, which stops at once
(:func:`no_restarts_after_permanent_failures`).

The operator renders ``<launcher> --nnodes=... -m kubetune_trainer --run-config ...`` as the pod
command for multi-process jobs (operator/kubetune_operator/builders.py, settings.launcher_command).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from signal import SIGTERM
from typing import Any

#: Exit codes after which a retry cannot help (the same set as kubetune_api.reports / the operator).
PERMANENT_EXIT_CODES = (3, 4, 5)


def exit_code_for(failures: Mapping[int, Any]) -> int:
    """The pod's exit code for torchelastic ``failures`` (rank -> ProcessFailure-like with
    ``exitcode`` and ``timestamp``); see the module docstring."""
    if not failures:
        return 1
    # torchrun SIGTERMs the healthy peers once one worker fails: those are consequences, not causes
    # (and timestamps are whole seconds, so they often tie with the real cause).
    ordered = sorted(
        failures.values(),
        key=lambda f: (f.exitcode == -SIGTERM, getattr(f, "timestamp", 0), getattr(f, "local_rank", 0)),
    )
    for failure in ordered:
        if failure.exitcode in PERMANENT_EXIT_CODES:
            return int(failure.exitcode)
    code = int(ordered[0].exitcode)
    if code < 0:
        return min(128 + -code, 255)
    return code if 0 < code < 256 else 1


def no_restarts_after_permanent_failures() -> None:
    """Make torchelastic's agent stop at once when a worker exits with a permanent code.

        The operator renders ``--max-restarts``, so that a peer lost to a preemption (its pod is
        replaced by the Job, that failure ignored through ``DisruptionTarget``) makes the surviving pods
        restart their workers in place and re-rendezvous with the replacement, resuming from the
        checkpoint, instead of failing and counting against ``backoffLimit``. Restarting a worker that
        found bad input, failed gates or diverged cannot help, so after such a failure the agent's
        remaining restarts are set to 0 (``SimpleElasticAgent._invoke_run`` then stops the workers and
        returns the failure). Patches ``LocalElasticAgent._monitor_workers`` (the agent torchrun uses),
    idempotently.
    """
    from torch.distributed.elastic.agent.server.api import WorkerState
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    original = LocalElasticAgent._monitor_workers
    if getattr(original, "_kubetune_patched", False):
        return

    def monitor(self: Any, worker_group: Any) -> Any:
        result = original(self, worker_group)
        if result.state == WorkerState.FAILED and any(
            f.exitcode in PERMANENT_EXIT_CODES for f in (result.failures or {}).values()
        ):
            self._remaining_restarts = 0
        return result

    monitor._kubetune_patched = True  # type: ignore[attr-defined]
    LocalElasticAgent._monitor_workers = monitor  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> int:
    """Run torchrun with ``argv`` (default: the command line); the exit code per :func:`exit_code_for`."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(sys.argv[1:] if argv is None else argv)
    no_restarts_after_permanent_failures()
    # Workers get a TCP store of their own instead of sharing the rendezvous one: shared, a restart
    # after a lost peer timed out waiting for the new round's role info (torch 2.13,
    # tests/integration/test_launch_torchrun.py::test_a_peer_killed_mid_run_costs_a_re_rendezvous_not_a_failure).
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    try:
        run(args)
    except ChildFailedError as exc:
        code = exit_code_for(exc.failures)
        print(
            f"kubetune launcher: workers failed ({exc.get_first_failure()[1].exitcode} first); exiting {code}",
            file=sys.stderr,
        )
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
