"""A fault-injecting HTTP proxy on loopback, in front of an S3 server (moto), for the fault tests.

Each HTTP method counts its requests; `faults[method][n]` names what happens to the n-th one:

    "503"   reply 503 SlowDown (S3's throttling answer) without asking the server
    "drop"  close the connection without any reply (a connection reset)
    "cut"   read half of the request body, then close the connection (an upload cut mid-way)
    "slow"  wait `slow_s` seconds, then forward (a slow response, under the client's timeout)

Everything else is forwarded as it is. `injected` records what was done, so a test can check that
every planned fault was met; faults are finite, so a client that retries always gets through.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections import Counter
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_SLOWDOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class FaultyProxy:
    def __init__(self, upstream: tuple[str, int], faults: Mapping[str, Mapping[int, str]], slow_s: float = 1.5):
        self.upstream, self.faults, self.slow_s = upstream, {m: dict(f) for m, f in faults.items()}, slow_s
        self.seen: Counter[str] = Counter()
        self.injected: list[tuple[str, int, str, str]] = []  # (method, n, fault, path)
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FaultyProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    def fault_for(self, method: str, path: str) -> str | None:
        with self.lock:
            self.seen[method] += 1
            fault = self.faults.get(method, {}).get(self.seen[method])
            if fault:
                self.injected.append((method, self.seen[method], fault, path))
            return fault

    def kinds(self) -> set[str]:
        return {fault for _, _, fault, _ in self.injected}


def _handler(proxy: FaultyProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def _body(self, limit: int | None = None) -> bytes:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                data = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        self.rfile.readline()
                        return data
                    data += self.rfile.read(size)
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length if limit is None else min(limit, length))

        def _serve(self) -> None:
            fault = proxy.fault_for(self.command, self.path)
            if fault == "cut":
                self._body(limit=int(self.headers.get("Content-Length") or 0) // 2)
                self.close_connection = True
                return
            body = self._body()
            if fault == "drop":
                self.close_connection = True
                return
            if fault == "503":
                self.send_response(503, "Slow Down")
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(_SLOWDOWN)))
                self.end_headers()
                self.wfile.write(_SLOWDOWN)
                return
            if fault == "slow":
                time.sleep(proxy.slow_s)
            upstream = http.client.HTTPConnection(*proxy.upstream, timeout=60)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                headers["Content-Length"] = str(len(body))
                upstream.request(self.command, self.path, body=body, headers=headers)
                reply = upstream.getresponse()
                data = reply.read()
                self.send_response(reply.status, reply.reason)
                for key, value in reply.getheaders():
                    if key.lower() not in _HOP and key.lower() != "content-length":
                        self.send_header(key, value)
                length = reply.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length or "0")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
            finally:
                upstream.close()

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _serve

    return Handler
