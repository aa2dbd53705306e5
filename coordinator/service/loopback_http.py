"""A tiny HTTP server on loopback for the coordinator's helpers that Flower and nginx call.

The app registry (the SuperLink's Flower Hub) and the Fleet gate (nginx's ``auth_request``)
each answer a couple of requests from processes on this host. The standard library's threading
server is enough for that traffic and adds no dependency; it binds 127.0.0.1 on an ephemeral
port and never anything else.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024

# (method, path, headers, body) -> (status, content type, body)
Answer = Callable[[str, str, Mapping[str, str], bytes], tuple[int, str, bytes]]


class LoopbackHTTP:
    """Serves ``answer`` on 127.0.0.1 (ephemeral port) in a daemon thread."""

    def __init__(self, answer: Answer, name: str) -> None:
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                log.debug(name + ": " + format, *args)

            def _serve(self) -> None:
                try:
                    length = int(self.headers.get("Content-Length", "0"))
                except ValueError:
                    length = -1
                body = self.rfile.read(length) if 0 < length <= MAX_BODY else b""
                headers = {k.lower(): v for k, v in self.headers.items()}
                status, kind, content = answer(self.command, self.path, headers, body)
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_POST = _serve

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True, name=name)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        name = host.decode() if isinstance(host, bytes) else host
        return f"http://{name}:{port}"

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def start(self) -> LoopbackHTTP:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
