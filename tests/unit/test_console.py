"""`kubetune run`'s quiet console, with a TEST DOUBLE of the trainer's pipeline that makes every kind
of noise the real stack makes (a Python warning, a library logger, an exporter's print to stdout, a C
extension writing to fd 2, the pod-log machine lines) between kubetune's own lines.

The CLI runs as its own process (file descriptors 1 and 2 are redirected for real); the double is
found first on PYTHONPATH, every other trainer module is the real one. The real quickstart path is
tests/integration/test_quickstart_console.py.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

import kubetune_trainer
from kubetune_cli.console import ConsoleFilter

REPO = Path(__file__).resolve().parents[2]
NOISY_PIPELINE = r"""
import logging, os, sys, warnings
from dataclasses import dataclass

@dataclass
class RunOutcome:
    result: object = None
    exit_code: int = 0

def run(rc, *, workdir):
    print("[kubetune] stage Training", file=sys.stderr, flush=True)
    warnings.warn("torch.utils._pytree._register_pytree_node is deprecated", FutureWarning)
    logging.getLogger("transformers.modeling_utils").warning("Some weights were not initialized")
    print("[torch.onnx] Obtain model graph for `LlamaForCausalLM` with `torch.export.export`...")
    os.write(2, b"Failed to load /site-packages/torchao/_C_cutlass_90a.abi3.so\n")
    logging.getLogger("kubetune_trainer.evaluate").warning("the eval set has 3 records")
    print("KUBETUNE_PROGRESS {\"step\": 1}", file=sys.stderr, flush=True)
    print("[kubetune] eval: accuracy=1", file=sys.stderr, flush=True)
    return RunOutcome()
"""
NOISE = [
    "_register_pytree_node is deprecated",
    "Some weights were not initialized",
    "[torch.onnx] Obtain model graph",
    "_C_cutlass_90a.abi3.so",
    "KUBETUNE_PROGRESS",
]


def _run(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    fake = tmp_path / "fake"
    pkg = fake / "kubetune_trainer"
    pkg.mkdir(parents=True, exist_ok=True)
    real = Path(kubetune_trainer.__file__).parent
    # The double's package: its pipeline first, every other module from the real trainer.
    (pkg / "__init__.py").write_text(f"__path__ = [{str(pkg)!r}, {str(real)!r}]\n__version__ = 'test'\n")
    (pkg / "pipeline.py").write_text(NOISY_PIPELINE)
    workdir = tmp_path / "work"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), str(REPO)])}
    cmd = [
        sys.executable,
        "-m",
        "kubetune_cli.main",
        "run",
        str(REPO / "examples/quickstart/finetunejob.yaml"),
    ]
    cmd += ["--store-dir", str(tmp_path / "store"), "--workdir", str(workdir), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
    return proc, workdir


def test_only_kubetunes_lines_reach_the_console(tmp_path: Path) -> None:
    proc, workdir = _run(tmp_path)
    assert proc.returncode == 0, proc.stderr
    console = (proc.stdout + proc.stderr).splitlines()
    assert console and all(line.startswith("[kubetune]") for line in console if line.strip()), console
    assert "[kubetune] stage Training" in console and "[kubetune] eval: accuracy=1" in console
    # kubetune's own logger warnings stay visible.
    assert "[kubetune] warning: the eval set has 3 records" in console
    log = workdir / "console.log"
    assert [line for line in console if str(log) in line] == [
        f"[kubetune] third-party output and warnings: {log} (--verbose shows them here)"
    ]
    text = log.read_text()
    for noise in NOISE:
        assert noise in text
        assert noise not in proc.stdout + proc.stderr


def test_verbose_brings_the_third_party_output_back(tmp_path: Path) -> None:
    proc, workdir = _run(tmp_path, "--verbose")
    assert proc.returncode == 0, proc.stderr
    both = proc.stdout + proc.stderr
    for noise in NOISE:
        assert noise in both
    assert not (workdir / "console.log").exists()


class _Sink:
    def __init__(self, tty: bool = False) -> None:
        self.parts: list[str] = []
        self.tty = tty

    def write(self, text: str) -> int:
        self.parts.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return self.tty

    @property
    def text(self) -> str:
        return "".join(self.parts)


@pytest.mark.parametrize("tty", [True, False])
def test_kubetunes_progress_bar_redraws_in_place_other_bars_go_to_the_log(tty: bool) -> None:
    console, log = _Sink(tty), _Sink()
    stream = ConsoleFilter(console, log)  # type: ignore[arg-type]
    assert stream.isatty() is tty
    stream.write("\rtraining:  10%|#         | 1/10 [00:01<00:09]")
    stream.write("\rtraining:  20%|##        | 2/10 [00:02<00:08]")
    stream.write("\rMap:  50%|#####     | 5/10")
    stream.write("\rMap: 100%|##########| 10/10\n")
    stream.write("[kubetune] step 2/10 (20%)\n[kubetune] stage Eval")
    stream.write("uating\n")
    stream.close_out()
    assert console.parts[:2] == [
        "\rtraining:  10%|#         | 1/10 [00:01<00:09]",
        "\rtraining:  20%|##        | 2/10 [00:02<00:08]",
    ]
    assert "Map:" not in console.text and "Map: 100%" in log.text
    assert console.text.endswith("[kubetune] step 2/10 (20%)\n[kubetune] stage Evaluating\n")


def test_a_stage_entered_twice_is_announced_once() -> None:
    import io

    from kubetune_trainer.reporting import Reporter

    out = io.StringIO()
    rep = Reporter(stream=out)
    rep.stage("PreparingData")  # loading the tokenizer
    rep.stage("PreparingData")  # preparing the data
    rep.stage("PreparingData", "stage 2/2: final")  # a labelled entry still shows
    rep.stage("Training")
    assert out.getvalue().splitlines() == [
        "[kubetune] stage PreparingData",
        "[kubetune] stage PreparingData: stage 2/2: final",
        "[kubetune] stage Training",
    ]


def test_a_multi_line_kubetune_message_reaches_the_console_whole() -> None:
    """The FAILED line of bad data lists the file:line errors on the lines after it (one print)."""
    console, log = io.StringIO(), io.StringIO()
    stream = ConsoleFilter(console, log)
    print("third-party chatter", file=stream)
    print(
        "[kubetune] FAILED (InvalidData): 2 invalid records; first errors:\n  s3://b/train.jsonl:2: not JSON\n  s3://b/train.jsonl:4: empty output",
        file=stream,
    )
    print("  indented third-party line", file=stream)
    stream.close_out()
    assert "s3://b/train.jsonl:2: not JSON" in console.getvalue()
    assert "s3://b/train.jsonl:4: empty output" in console.getvalue()
    assert "third-party" not in console.getvalue() and "indented third-party line" in log.getvalue()
