"""A small JSON HTTP server on an ephemeral loopback port, in a thread: the fake providers and identity
providers of the tests, each only a function from a request to a status and a document."""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# (method, path, request body) -> (HTTP status, the JSON document to answer)
Respond = Callable[[str, str, bytes], tuple[int, Any]]


@contextmanager
def json_http_server(respond: Respond, tls: ssl.SSLContext | None = None) -> Iterator[int]:
    """Serve `respond` on 127.0.0.1 (over TLS with `tls`) until the block ends; yields the port."""

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            status, document = respond(self.command, self.path, self.rfile.read(length) if length else b"")
            body = json.dumps(document).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            self._answer()

        def do_POST(self) -> None:
            self._answer()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_port
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
