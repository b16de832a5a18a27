"""A fault-injecting HTTP proxy on 127.0.0.1 in front of a real S3 endpoint (the moto server).

Point a client's ``endpoint_url`` at :attr:`FaultProxy.url`: every request is forwarded verbatim
(same method, path, headers and body: SigV4 signatures stay valid because the Host header is kept)
unless a :class:`Fault` matches it. Faults are real network behaviour, not mocks:

* ``status``: answer with an S3 error document (``500 InternalError``, ``503 SlowDown``...) without
  forwarding;
* ``reset``: close the connection with a TCP RST before forwarding (the request never lands);
* ``reset_after_forward``: forward, let the store apply it, then RST instead of answering (the
  write landed but the client never hears so: a lost response);
* ``delay``: wait ``delay_s`` before forwarding (a slow endpoint; with a short client read timeout,
  a timeout);
* ``outage``: the endpoint goes away: the listening socket closes (new connections are refused)
  and every request on a kept-alive connection is reset, until :meth:`FaultProxy.restore`.

Each fault affects the first ``times`` requests that match its method and path regex. Every request
is recorded in :attr:`FaultProxy.log` as ``(method, path, outcome)``.
"""

from __future__ import annotations

import http.client
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal
from urllib.parse import urlsplit

Action = Literal["status", "reset", "reset_after_forward", "delay", "outage"]
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-connection",
}


@dataclass
class Fault:
    """Affect the first ``times`` requests whose method and path (with query) match."""

    action: Action
    path: str = ".*"
    method: str | None = None
    times: int = 1
    status: int = 500
    code: str = "InternalError"
    delay_s: float = 0.0
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        return (
            self.hits < self.times
            and (self.method is None or self.method == method)
            and re.search(self.path, path) is not None
        )


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], proxy: FaultProxy) -> None:
        self.proxy = proxy
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and 100-continue for botocore's large PUTs
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass  # the proxy's own log list is what tests read

    def _reset(self) -> None:
        # SO_LINGER 0: close() sends RST, as a crashed peer or a dropped NAT entry would.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        proxy = self.server.proxy
        method, path = self.command, self.path
        if proxy.down:
            proxy.record(method, path, "outage")
            self._reset()
            return
        fault = proxy.take_fault(method, path)
        body = self._body()
        if fault is not None and fault.action == "outage":
            proxy.record(method, path, "outage")
            proxy.go_down()
            self._reset()
            return
        if fault is not None and fault.action == "reset":
            proxy.record(method, path, "reset")
            self._reset()
            return
        if fault is not None and fault.action == "status":
            proxy.record(method, path, f"{fault.status} {fault.code}")
            doc = (
                f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{fault.code}</Code>'
                f"<Message>injected by the test proxy</Message></Error>"
            ).encode()
            self.send_response(fault.status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(doc)))
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(doc)
            return
        if fault is not None and fault.action == "delay":
            time.sleep(fault.delay_s)
        upstream = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP | {"expect"}}
            upstream.request(method, path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
        finally:
            upstream.close()
        if fault is not None and fault.action == "reset_after_forward":
            proxy.record(method, path, f"forwarded {response.status}, response lost")
            self._reset()
            return
        proxy.record(method, path, f"{response.status}" + (" (delayed)" if fault is not None else ""))
        try:
            self.send_response(response.status, response.reason)
            for key, value in response.getheaders():
                if key.lower() not in _HOP_BY_HOP | {"content-length"}:
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(data)
        except OSError:  # the client gave up (read timeout) while we were slow: expected
            self.close_connection = True

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


class FaultProxy:
    """The proxy. ``start()`` binds a free port on 127.0.0.1; ``stop()`` closes everything."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        assert parts.hostname and parts.port, upstream
        self.upstream_host, self.upstream_port = parts.hostname, parts.port
        self.faults: list[Fault] = []
        self.log: list[tuple[str, str, str]] = []
        self.down = False
        self.port = 0
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        self._server = _Server(("127.0.0.1", self.port), self)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name="fault-proxy")
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def add(self, *faults: Fault) -> None:
        with self._lock:
            self.faults.extend(faults)

    def take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.matches(method, path):
                    fault.hits += 1
                    return fault
        return None

    def record(self, method: str, path: str, outcome: str) -> None:
        with self._lock:
            self.log.append((method, path, outcome))

    def go_down(self) -> None:
        """The endpoint stops: new connections are refused, kept-alive ones reset."""
        self.down = True
        # Closing the listener from a handler thread: shutdown() waits for serve_forever, so off-thread.
        threading.Thread(target=self.stop, daemon=True).start()

    def restore(self) -> None:
        """The endpoint is back, on the same port."""
        deadline = time.monotonic() + 10
        while self._server is not None and time.monotonic() < deadline:
            time.sleep(0.05)  # let an in-flight go_down() finish closing the old listener
        self.down = False
        self.start()

    def outcomes(self, pattern: str = ".*", method: str | None = None) -> list[str]:
        """Outcomes of the recorded requests whose path matches ``pattern`` (and method)."""
        with self._lock:
            return [o for m, p, o in self.log if re.search(pattern, p) and (method is None or m == method)]
