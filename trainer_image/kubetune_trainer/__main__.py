"""``python -m kubetune_trainer --run-config FILE``: the trainer pod's entry point (one per rank)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from kubetune_api.runconfig import RunConfig


def main(argv: list[str] | None = None) -> int:
    """Run the pipeline for the RunConfig in ``--run-config``; exit code per kubetune_api.reports."""
    parser = argparse.ArgumentParser(prog="python -m kubetune_trainer", description=__doc__)
    parser.add_argument(
        "--run-config",
        type=Path,
        default=os.environ.get("KUBETUNE_RUN_CONFIG"),
        help="RunConfig JSON (the job's ConfigMap); default $KUBETUNE_RUN_CONFIG",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(os.environ.get("KUBETUNE_WORKDIR", "/tmp/kubetune")),
        help="scratch space for inputs, checkpoints and staging (an emptyDir in pods)",
    )
    parser.add_argument(
        "--termination-message-path",
        default=os.environ.get("KUBETUNE_TERMINATION_MESSAGE_PATH"),
        help="where to write the final TrainerResult (overrides the RunConfig; the pod's terminationMessagePath)",
    )
    args = parser.parse_args(argv)
    if args.run_config is None:
        parser.error("--run-config (or KUBETUNE_RUN_CONFIG) is required")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # After parsing and logging setup: --help answers without the ~10 s of torch, transformers and
    # peft imports (measured), and what those libraries log on import goes through this format.
    from kubetune_trainer.pipeline import run

    rc = RunConfig.from_json(args.run_config.read_text())
    if args.termination_message_path:
        reporting = rc.reporting.model_copy(
            update={"termination_message_path": args.termination_message_path}
        )
        rc = rc.model_copy(update={"reporting": reporting})
    outcome = run(rc, workdir=args.workdir)
    return outcome.exit_code


if __name__ == "__main__":
    sys.exit(main())
