"""A real MLflow tracking server (PyPI ``mlflow``, sqlite backend) on 127.0.0.1 for tests.

The server lives in its own cached virtualenv (tests/support/build-mlflow-server.sh says why); it
runs as a subprocess with a temporary sqlite database and artifact directory, and is stopped by its
PID (its process group: the server forks uvicorn workers).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from tests.cluster.cluster import free_port

BUILD_SCRIPT = Path(__file__).resolve().parent / "build-mlflow-server.sh"


class MlflowServerError(RuntimeError):
    """The server could not be built or did not start; the message names its log."""


def mlflow_server_python() -> Path:
    """The server virtualenv's python (built and cached on first use)."""
    result = subprocess.run(["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, text=True, check=False)
    if result.returncode != 0 or not result.stdout.strip():
        raise MlflowServerError(f"{BUILD_SCRIPT} failed with exit code {result.returncode}")
    return Path(result.stdout.strip().splitlines()[-1])


class MlflowServer:
    def __init__(self, python: Path, workdir: Path) -> None:
        self.python = python
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "mlflow-server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120.0) -> None:
        artifacts = self.workdir / "artifacts"
        artifacts.mkdir(parents=True, exist_ok=True)
        cmd = [
            str(self.python),
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.workdir / 'mlflow.db'}",
            "--artifacts-destination",
            artifacts.as_uri(),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        # No job runner (huey consumers: a dozen busy processes) — tracking and the model registry
        # need none, and on 2 shared cores they slow everything else down.
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=self.workdir
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise MlflowServerError(f"mlflow server exited ({self.proc.returncode}); log: {self.log}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:  # refused, reset or a read timed out while it starts (URLError is one)
                pass
            time.sleep(0.5)
        self.stop()  # never leave a half-started server behind
        raise MlflowServerError(f"mlflow server not ready after {timeout:.0f} s; log: {self.log}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        # Its own session (start_new_session): the group is the server and the workers it forked.
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
