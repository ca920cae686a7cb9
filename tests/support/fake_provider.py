"""Fake OpenAI-compatible providers on ephemeral loopback ports, recording what they are sent.

`failing_provider` answers every call with one error status (throttling, failures);
`streaming_provider` streams answers word by word, so tests can see the history the
model receives on every turn, stop a server mid-answer, or fail a chosen call.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.support.json_http import json_http_server


@dataclass
class FakeProvider:
    url: str
    requests: list[dict[str, Any]] = field(default_factory=list)


@contextmanager
def failing_provider(status: int, message: str = "slow down") -> Iterator[FakeProvider]:
    """Serve `/v1/chat/completions` answering `status` with an OpenAI-style error body."""
    received: list[dict[str, Any]] = []

    def respond(method: str, path: str, body: bytes) -> tuple[int, Any]:
        received.append(json.loads(body or b"{}"))
        return status, {"error": {"message": message, "type": "rate_limit_error", "code": None}}

    with json_http_server(respond) as port:
        yield FakeProvider(f"http://127.0.0.1:{port}/v1", received)


@dataclass
class StreamingProvider(FakeProvider):
    """See `streaming_provider`; `fail_next` makes the next calls answer HTTP 500."""

    fail_next: int = 0

    def histories(self) -> list[list[tuple[str, str]]]:
        """Each request's conversation as (role, text) pairs, the system prompt left out."""
        return [
            [(m["role"], _text(m.get("content"))) for m in request["messages"] if m["role"] != "system"]
            for request in self.requests
        ]


@contextmanager
def streaming_provider(words: int = 5, delay_s: float = 0.0) -> Iterator[StreamingProvider]:
    """An OpenAI-compatible chat completions server that streams `words` words per answer, recording each request.

    The answer is `reply-<n> w1 w2 ...`, one word every `delay_s` (the n-th request of the run).
    """
    provider = StreamingProvider(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            provider.requests.append(json.loads(self.rfile.read(length) or b"{}"))
            number = len(provider.requests)
            if provider.fail_next > 0:
                provider.fail_next -= 1
                body = json.dumps({"error": {"message": "the model crashed", "type": "server_error"}}).encode()
                self.send_response(500)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.end_headers()
            chunk = {"id": f"c{number}", "object": "chat.completion.chunk", "created": 0, "model": "fake"}
            self._event({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]})
            for index, word in enumerate([f"reply-{number}"] + [f"w{i}" for i in range(1, words)]):
                if delay_s and index:
                    time.sleep(delay_s)
                text = word if index == words - 1 else word + " "
                self._event({**chunk, "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]})
            self._event({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
            usage = {"prompt_tokens": 10, "completion_tokens": words, "total_tokens": 10 + words}
            self._event({**chunk, "choices": [], "usage": usage})
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()

        def _event(self, data: dict[str, Any]) -> None:
            self.wfile.write(b"data: " + json.dumps(data).encode() + b"\n\n")
            self.wfile.flush()

        def handle(self) -> None:
            with contextlib.suppress(ConnectionError):  # the caller went away mid-answer (a killed replica)
                super().handle()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    provider.url = f"http://127.0.0.1:{server.server_port}/v1"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield provider
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content or [] if isinstance(part, dict))
