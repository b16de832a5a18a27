"""A console a person can read during ``kubetune run``: kubetune's lines only.

:func:`quiet_console` routes everything else a run writes — third-party warnings (``warnings``),
library loggers (transformers, DeepSpeed, torch), ``print`` from exporters, progress bars other than
kubetune's own, and what C extensions write to file descriptors 1 and 2 — into ``console.log`` in
the run's work directory, whose path is printed once. What stays on the console:

* lines that start with ``[kubetune]`` (the trainer's reporter and the CLI's summary);
* kubetune's training progress bar (tqdm, desc ``training``) when the console is a terminal;
* warnings and errors of kubetune's own loggers (``kubetune_*``), as ``[kubetune] warning: ...``.

The machine lines for pod logs (``KUBETUNE_PROGRESS``/``KUBETUNE_RESULT``) go to the log file too.
``--verbose`` (no quiet console) shows everything, as a pod's log does.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TextIO

LOG_NAME = "console.log"
#: Console lines kept: kubetune's own (also after tqdm's carriage return).
_KEEP = re.compile(r"^\r*(\[kubetune\]|training:)")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class ConsoleFilter(io.TextIOBase):
    """A text stream that sends kubetune's lines to ``console`` and everything else to ``log``.

    Lines are routed whole; a progress bar's carriage-return updates (no newline) are routed as
    they come so that the bar redraws in place."""

    def __init__(self, console: TextIO, log: IO[str]) -> None:
        self.console = console
        self.log = log
        self._pending = ""
        # True while the lines being routed belong to one write() that began a kubetune line: a
        # multi-line message (e.g. "[kubetune] FAILED ...: first errors:\n  file:2: ...") stays whole.
        self._kubetune_message = False

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        # tqdm and the reporter ask: the answer is the real console's.
        return self.console.isatty()

    def fileno(self) -> int:
        return self.console.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.console, "encoding", None) or "utf-8"

    def write(self, text: str) -> int:
        if not self._pending:
            self._kubetune_message = bool(_KEEP.match(_ANSI.sub("", text)))
        self._pending += text
        while True:
            newline = self._pending.find("\n")
            if newline >= 0:
                line, self._pending = self._pending[: newline + 1], self._pending[newline + 1 :]
                self._route(line)
                if not self._pending:
                    self._kubetune_message = False
                continue
            if "\r" in self._pending and _KEEP.match(_ANSI.sub("", self._pending)):
                # A bar redraw without a newline: show it now.
                line, self._pending = self._pending, ""
                self._route(line)
            break
        return len(text)

    def _route(self, chunk: str) -> None:
        plain = _ANSI.sub("", chunk)
        if self._kubetune_message or _KEEP.match(plain) or (plain.strip("\r\n ") == "" and "\r" in plain):
            self.console.write(chunk)
            self.console.flush()
        else:
            self.log.write(chunk)

    def flush(self) -> None:
        # Only whole lines (and bar redraws) are routed; a partial line waits for its newline.
        self.console.flush()
        self.log.flush()

    def close_out(self) -> None:
        if self._pending:
            self._route(self._pending)
            self._pending = ""
        self.flush()


class _KubetuneConsoleHandler(logging.Handler):
    """kubetune's own warnings and errors, one line each on the console (tracebacks in the log)."""

    def __init__(self, console: TextIO, log_path: Path) -> None:
        super().__init__(level=logging.WARNING)
        self.console = console
        self.log_path = log_path

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            where = f" (details in {self.log_path})" if record.exc_info else ""
            self.console.write(f"[kubetune] {record.levelname.lower()}: {message}{where}\n")
            self.console.flush()
        except Exception:
            self.handleError(record)


@contextmanager
def quiet_console(workdir: Path) -> Iterator[Path]:
    """Within the block only kubetune's lines reach the console; the rest goes to ``workdir/console.log``
    (its path printed once on entry). Restores stdout, stderr, file descriptors 1/2 and logging on exit."""
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / LOG_NAME
    sys.stdout.flush()
    sys.stderr.flush()
    log_file = open(log_path, "a", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115
    # The real console, kept on duplicated descriptors; 1 and 2 then point at the log file, so what
    # C extensions and child processes write lands there too.
    saved_out, saved_err = os.dup(1), os.dup(2)
    console_out = os.fdopen(os.dup(saved_out), "w", buffering=1, encoding="utf-8", errors="replace")
    console_err = os.fdopen(os.dup(saved_err), "w", buffering=1, encoding="utf-8", errors="replace")
    console_err.write(f"[kubetune] third-party output and warnings: {log_path} (--verbose shows them here)\n")
    console_err.flush()
    os.dup2(log_file.fileno(), 1)
    os.dup2(log_file.fileno(), 2)
    old_stdout, old_stderr = sys.stdout, sys.stderr
    out_filter, err_filter = ConsoleFilter(console_out, log_file), ConsoleFilter(console_err, log_file)
    sys.stdout, sys.stderr = out_filter, err_filter

    root = logging.getLogger()
    old_level, old_handlers = root.level, list(root.handlers)
    file_handler = logging.StreamHandler(log_file)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.handlers = [file_handler]
    root.setLevel(logging.INFO)
    ours = [logging.getLogger(name) for name in ("kubetune_trainer", "kubetune_registry", "kubetune_cli")]
    console_handler = _KubetuneConsoleHandler(console_err, log_path)
    for logger in ours:
        logger.addHandler(console_handler)
    logging.captureWarnings(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")  # each distinct warning once, into the log
            yield log_path
    finally:
        logging.captureWarnings(False)
        for logger in ours:
            logger.removeHandler(console_handler)
        root.handlers, root.level = old_handlers, old_level
        out_filter.close_out()
        err_filter.close_out()
        sys.stdout, sys.stderr = old_stdout, old_stderr
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        for fd in (saved_out, saved_err):
            os.close(fd)
        console_out.close()
        console_err.close()
        log_file.close()
