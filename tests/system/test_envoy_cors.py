"""CORS in a real browser: a page on another origin (its own HTTP server, another port) streams an answer
through Envoy with a bearer token, over the JSON/SSE door and gRPC-Web, reading the headers Envoy
exposes; a page on an origin not in ENVOY_CORS_ORIGINS is refused by the browser itself.
Debian's Chromium driven by Playwright (as tests/system/test_chat_page.py does)."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import async_playwright

from tests.support.tokens import Issuer
from tests.system.test_chat_page import CHROMIUM_FLAGS, WAIT_MS
from tests.system.test_envoy_identity import secured_door

WORDS, DELAY_MS = 20, 30.0

# Runs in the foreign page: one SSE call and one gRPC-Web call to Envoy with the token, by fetch().
CALLS = """async ([envoy, token]) => {
  const auth = { authorization: `Bearer ${token}` };
  const sse = await fetch(`${envoy}/v1/chat:stream`, {
    method: "POST",
    headers: { "content-type": "application/json", ...auth },
    body: JSON.stringify({ content: "tell me something", session_id: "cors" }),
  });
  const reader = sse.body.getReader();
  const decoder = new TextDecoder();
  let text = "";
  const arrivals = [];
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    text += decoder.decode(value, { stream: true });
    arrivals.push(performance.now());
  }
  const events = text.split("\\n").filter((line) => line.startsWith("data: ")).map((line) => JSON.parse(line.slice(6)));

  const question = new TextEncoder().encode("what is 6*7");  // ChatRequest{content}: field 1, one length byte
  const frame = new Uint8Array(7 + question.length);
  new DataView(frame.buffer).setUint32(1, 2 + question.length);
  frame[5] = 0x0a;
  frame[6] = question.length;
  frame.set(question, 7);
  const web = await fetch(`${envoy}/agent.AgentService/StreamChat`, {
    method: "POST",
    headers: { "content-type": "application/grpc-web+proto", "x-grpc-web": "1", ...auth },
    body: frame,
  });
  const bytes = new Uint8Array(await web.arrayBuffer());
  let offset = 0, messages = 0, trailer = "";
  while (offset < bytes.length) {
    const length = new DataView(bytes.buffer, offset + 1, 4).getUint32(0);
    if (bytes[offset] & 0x80) trailer = new TextDecoder().decode(bytes.slice(offset + 5, offset + 5 + length));
    else messages += 1;
    offset += 5 + length;
  }
  return {
    sseStatus: sse.status, runId: sse.headers.get("x-run-id"), events, spreadMs: arrivals.at(-1) - arrivals[0],
    webStatus: web.status, messages, trailer,
  };
}"""

REFUSED = """async ([envoy, token]) => {
  try {
    await fetch(`${envoy}/v1/chat:stream`, {
      method: "POST", headers: { "content-type": "application/json", authorization: `Bearer ${token}` },
      body: JSON.stringify({ content: "hi" }),
    });
    return "answered";
  } catch (error) {
    return `${error.name}: ${error.message}`;
  }
}"""


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def static_site(directory: Path) -> Iterator[str]:
    """An HTTP server for `directory` on 127.0.0.1 (an origin of its own); yields its origin."""
    (directory / "index.html").write_text("<!doctype html><title>another site</title><p>another site</p>\n")
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


async def test_a_page_on_an_allowed_origin_streams_through_envoy_and_another_origin_is_refused(tmp_path: Path) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("Debian's chromium is not installed: run `make system-tools`")
    issuer = Issuer()
    token = issuer.token(sub="browser-user")
    (tmp_path / "allowed").mkdir()
    (tmp_path / "other").mkdir()
    with static_site(tmp_path / "allowed") as allowed, static_site(tmp_path / "other") as other:
        async with (
            secured_door(
                tmp_path,
                issuer,
                {"demo_token_delay_ms": DELAY_MS, "demo_reply_words": WORDS},
                ENVOY_CORS_ORIGINS=allowed,
            ) as door,
            async_playwright() as playwright,
        ):
            browser = await playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS, timeout=WAIT_MS)
            try:
                page = await browser.new_page()
                page.set_default_timeout(WAIT_MS)
                await page.goto(allowed + "/")
                result: dict[str, Any] = await page.evaluate(CALLS, [door.envoy.url, token])
                await page.goto(other + "/")
                refused = await page.evaluate(REFUSED, [door.envoy.url, token])
            finally:
                await browser.close()
            entries = await door.envoy.access_log(lambda found: len(agent_calls(found)) >= 2)

    assert result["sseStatus"] == 200
    events = result["events"]
    assert events[-1]["done"]["stop_reason"] == "end_turn"
    assert len("".join(event["content"]["text"] for event in events if "content" in event).split()) == WORDS
    # Streamed: the words arrived over their delays, not all at once at the end.
    assert result["spreadMs"] >= 0.5 * (WORDS - 1) * DELAY_MS, result["spreadMs"]
    assert result["runId"] and {event["run_id"] for event in events} == {result["runId"]}, "x-run-id is exposed"
    assert (result["webStatus"], result["trailer"].split("\r\n")[0]) == (200, "grpc-status:0"), result
    assert result["messages"] >= 3  # tool use, tool result, text..., done
    assert refused.startswith("TypeError"), refused  # the browser refused Envoy's answer to the other origin
    preflights = [e for e in entries if e["method"] == "OPTIONS"]
    assert preflights and all(e["upstream_host"] is None for e in preflights), "a preflight was forwarded"
    assert [(e["path"], e["principal"], e["grpc_status"]) for e in agent_calls(entries)] == [
        ("/v1/chat:stream", "browser-user", "OK"),
        ("/agent.AgentService/StreamChat", "browser-user", "OK"),
    ]


def agent_calls(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in entries if e["method"] == "POST" and not e["path"].startswith("/grpc.health")]
