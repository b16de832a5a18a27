"""Object storage: kubetune's S3Store vs ``aws s3 cp --recursive`` on a loopback S3 endpoint.

    .venv/bin/python -m bench.storage                    # ~1 GiB model folder (4 shards + small files), 3 repeats
    .venv/bin/python -m bench.storage --size-mb 16 --repeats 1   # smoke

The endpoint is moto's S3 server on 127.0.0.1 (a real S3 HTTP endpoint; the same server the
integration tests use), started and stopped by this bench. The folder looks like a sharded
Hugging Face checkpoint: ``--shards`` safetensors-sized files of random bytes plus config and
tokenizer files. Each repeat uploads and downloads it with both tools, in alternating order, to
fresh prefixes and fresh local folders; ratios are taken pair by pair within a repeat, medians
reported. Downloads are checked byte for byte against the source (sizes and sha256).

Reference rates measured in the same run: a raw TCP stream over loopback (the wire's ceiling)
and one plain HTTP GET of the largest shard from the endpoint (the server's single-stream
ceiling). ``aws`` runs with its defaults (10 concurrent requests, 8 MiB multipart threshold and
chunks), fake credentials and ``--endpoint-url``; kubetune's S3Store with its defaults
(8 concurrent transfers, 16 MiB multipart threshold/parts).
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from bench._common import format_machine, format_table, machine_info, median, verdict

FAKE_ENV = {
    "AWS_ACCESS_KEY_ID": "kubetune-bench-fake-access-key",
    "AWS_SECRET_ACCESS_KEY": "kubetune-bench-fake-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}
TARGET_RATIO = 1.0
MB = 1_000_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MotoServer:
    """moto's S3 server on loopback, stopped by its PID."""

    def __init__(self, log: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = log
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> MotoServer:
        with open(self._log, "wb") as out:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **FAKE_ENV},
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"moto server exited: {self._log.read_text(errors='replace')[-2000:]}")
            try:
                urllib.request.urlopen(self.url + "/moto-api/", timeout=1).close()
                return self
            except urllib.error.HTTPError:
                return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"moto server at {self.url} did not come up")

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


def make_model_folder(root: Path, *, total_mb: int, shards: int) -> dict[str, Any]:
    """A sharded-checkpoint-like folder of random bytes; returns sizes and sha256 per file."""
    root.mkdir(parents=True, exist_ok=True)
    files: dict[str, Any] = {}
    shard_bytes = max(1, total_mb * MB // shards)
    chunk = 4 * 1024 * 1024
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        digest = hashlib.sha256()
        with open(root / name, "wb") as fh:
            left = shard_bytes
            while left:
                block = os.urandom(min(chunk, left))
                fh.write(block)
                digest.update(block)
                left -= len(block)
        files[name] = {"size": shard_bytes, "sha256": digest.hexdigest()}
    small = {
        "config.json": json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 2048}),
        "generation_config.json": json.dumps({"eos_token_id": 2}),
        "model.safetensors.index.json": json.dumps({"weight_map": {f"w{i}": n for i, n in enumerate(files)}}),
        "tokenizer.json": json.dumps({"model": {"vocab": {f"t{i}": i for i in range(20000)}}}),
        "tokenizer_config.json": json.dumps({"model_max_length": 4096}),
    }
    for name, text in small.items():
        data = text.encode()
        (root / name).write_bytes(data)
        files[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return files


def _verify(dest: Path, expected: dict[str, Any]) -> None:
    for name, meta in expected.items():
        path = dest / name
        if not path.is_file() or path.stat().st_size != meta["size"]:
            raise RuntimeError(f"download incomplete: {path}")
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(4 * 1024 * 1024), b""):
                h.update(block)
        if h.hexdigest() != meta["sha256"]:
            raise RuntimeError(f"download corrupt: {path}")


def loopback_tcp_rate(total_mb: int) -> float:
    """MB/s of one TCP stream over 127.0.0.1 (sender and receiver in this process, two threads)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    received = 0

    def sink() -> None:
        nonlocal received
        conn, _ = server.accept()
        with conn:
            while chunk := conn.recv(1 << 20):
                received += len(chunk)

    t = threading.Thread(target=sink)
    t.start()
    block = b"\0" * (1 << 20)
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as c:
        for _ in range(total_mb):
            c.sendall(block)
    t.join()
    server.close()
    return received / MB / (time.monotonic() - started)


def http_get_rate(client: Any, bucket: str, key: str) -> float:
    """MB/s of one plain HTTP GET of an object (a presigned URL: no per-request signing, one stream)."""
    url = urllib.parse.urlsplit(
        client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=600)
    )
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port or 80, timeout=300)
    started = time.monotonic()
    conn.request("GET", f"{url.path}?{url.query}")
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"GET {key}: HTTP {resp.status}")
    n = 0
    while chunk := resp.read(1 << 20):
        n += len(chunk)
    conn.close()
    return n / MB / (time.monotonic() - started)


def _aws_cmd() -> list[str]:
    # The aws CLI installed with the dev extra, beside this interpreter, wins over any on PATH.
    exe = shutil.which("aws", path=str(Path(sys.executable).parent)) or shutil.which("aws")
    if exe is None:
        raise RuntimeError("the aws CLI is not on PATH (pip install awscli, or the system package)")
    return [exe]


def aws_copy(src: str, dst: str, endpoint: str) -> float:
    """Seconds for ``aws s3 cp --recursive SRC DST`` with defaults."""
    env = {**os.environ, **FAKE_ENV}
    started = time.monotonic()
    subprocess.run(
        [*_aws_cmd(), "s3", "cp", "--recursive", "--only-show-errors", "--endpoint-url", endpoint, src, dst],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    """Entry point; prints the table (and writes JSON with --json)."""
    p = argparse.ArgumentParser(prog="python -m bench.storage", description=__doc__.split("\n")[0])
    p.add_argument("--size-mb", type=int, default=1024, help="total folder size in MB (10^6 bytes)")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    os.environ.update(FAKE_ENV)  # boto3 in this process reads credentials from the environment
    import boto3

    from kubetune_registry.storage import S3Store, StoreSettings

    tmp = Path(tempfile.mkdtemp(prefix="kubetune-bench-storage-"))
    try:
        src = tmp / "model"
        files = make_model_folder(src, total_mb=a.size_mb, shards=a.shards)
        total = sum(f["size"] for f in files.values())
        with MotoServer(tmp / "moto.log") as server:
            bucket = f"bench-{uuid.uuid4().hex[:12]}"
            settings = StoreSettings(endpoint=server.url, region="us-east-1", addressing_style="path")
            client = boto3.session.Session().client("s3", endpoint_url=server.url, region_name="us-east-1")
            client.create_bucket(Bucket=bucket)
            store = S3Store(bucket, settings)
            tcp = loopback_tcp_rate(min(1024, max(64, a.size_mb)))
            runs: list[dict[str, float]] = []
            for rep in range(a.repeats):
                row: dict[str, float] = {}
                order = ("kubetune", "aws") if rep % 2 == 0 else ("aws", "kubetune")
                for tool in order:
                    prefix = f"{tool}-{rep}"
                    dest = tmp / f"down-{tool}-{rep}"
                    if tool == "kubetune":
                        t = time.monotonic()
                        store.upload_dir(src, prefix)
                        row["kubetune_up"] = time.monotonic() - t
                        t = time.monotonic()
                        store.download_dir(prefix, dest)
                        row["kubetune_down"] = time.monotonic() - t
                    else:
                        row["aws_up"] = aws_copy(str(src), f"s3://{bucket}/{prefix}/", server.url)
                        row["aws_down"] = aws_copy(f"s3://{bucket}/{prefix}/", str(dest), server.url)
                    _verify(dest, files)
                    shutil.rmtree(dest)
                    if tool == order[0] and rep == 0:
                        shard = next(n for n in files if n.endswith(".safetensors"))
                        row["http_get_mb_s"] = http_get_rate(client, bucket, f"{prefix}/{shard}")
                    store.delete_prefix(prefix + "/")  # moto keeps objects in memory
                runs.append(row)
                print(
                    f"[bench] repeat {rep + 1}/{a.repeats}: "
                    + ", ".join(f"{k}={v:.2f}" for k, v in row.items()),
                    file=sys.stderr,
                    flush=True,
                )
        http_get = runs[0]["http_get_mb_s"]
        table = []
        ratios: dict[str, Any] = {}
        for direction in ("up", "down"):
            k = median(total / MB / r[f"kubetune_{direction}"] for r in runs)
            w = median(total / MB / r[f"aws_{direction}"] for r in runs)
            pairs = [r[f"aws_{direction}"] / r[f"kubetune_{direction}"] for r in runs]
            ratio = median(pairs)
            ratios[direction] = {"ratio": ratio, "per_repeat": pairs, "verdict": verdict(ratio, TARGET_RATIO)}
            name = "upload" if direction == "up" else "download"
            table.append([name, "kubetune S3Store", k, f"{100 * k / tcp:.1f}%", f"{100 * k / http_get:.0f}%"])
            table.append(
                [name, "aws s3 cp --recursive", w, f"{100 * w / tcp:.1f}%", f"{100 * w / http_get:.0f}%"]
            )
        print(format_machine(machine_info()))
        print(
            f"folder: {len(files)} files, {total / MB:.0f} MB ({a.shards} shards); {a.repeats} repeats; "
            f"raw loopback TCP {tcp:,.0f} MB/s; single HTTP GET from the endpoint {http_get:,.0f} MB/s"
        )
        print(format_table(["direction", "tool", "MB/s (median)", "of TCP", "of 1 GET"], table))
        print()
        print(
            format_table(
                ["direction", "kubetune / aws", "per repeat", "target", "verdict"],
                [
                    [
                        d,
                        f"{r['ratio']:.2f}x",
                        " ".join(f"{x:.2f}" for x in r["per_repeat"]),
                        f">= {TARGET_RATIO}x",
                        r["verdict"],
                    ]
                    for d, r in ratios.items()
                ],
            )
        )
        if a.json:
            a.json.parent.mkdir(parents=True, exist_ok=True)
            a.json.write_text(
                json.dumps(
                    {
                        "machine": machine_info(),
                        "bytes": total,
                        "files": len(files),
                        "tcp_mb_s": tcp,
                        "http_get_mb_s": http_get,
                        "runs": runs,
                        "ratios": ratios,
                    },
                    indent=2,
                )
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
