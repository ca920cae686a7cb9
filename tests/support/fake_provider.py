"""A fake OpenAI-compatible provider on an ephemeral loopback port that answers every call with one status.

It records the requests it receives, so tests can count provider calls (retries)
and see what history was sent.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class FakeProvider:
    url: str
    requests: list[dict[str, Any]] = field(default_factory=list)


@contextmanager
def failing_provider(status: int, message: str = "slow down") -> Iterator[FakeProvider]:
    """Serve `/v1/chat/completions` answering `status` with an OpenAI-style error body."""
    received: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            received.append(json.loads(self.rfile.read(length) or b"{}"))
            body = json.dumps({"error": {"message": message, "type": "rate_limit_error", "code": None}}).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield FakeProvider(f"http://127.0.0.1:{server.server_port}/v1", received)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
