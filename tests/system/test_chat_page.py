"""The chat page (deploy/web) in a real browser: Debian's Chromium driven by Playwright, through a real
Envoy (the one template) in front of a real agent server (demo model, 20 ms per word).

One server, Envoy and browser serve the module; every test gets a fresh browser context (empty
localStorage). Screenshots of a conversation go to $CHAT_PAGE_ARTIFACTS, or the test's tmp dir;
their paths are printed (`-s` shows them).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page, Request, async_playwright

from agent_service.proto import agent_pb2
from tests.support.servers import collect, kinds
from tests.system.conftest import FrontDoor, front_door

pytestmark = pytest.mark.asyncio(loop_scope="module")

# Flags that work on these machines (root, no GPU, no network but loopback); Playwright adds --headless.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 15_000
WORD_DELAY_MS = 20

# Records, in the page, each time the last answer's text grows: [{t: ms since page start, n: characters}],
# and when the click that stops a call happened.
RECORD_GROWTH = """() => {
  const log = document.getElementById("log");
  const answerLength = () => {
    const answer = log.querySelector(":scope > li:last-child .answer");
    if (!answer) return 0;
    return Array.from(answer.querySelectorAll(".text"), (node) => node.textContent.length).reduce((a, b) => a + b, 0);
  };
  window.growth = [];
  window.stopClickedAt = null;
  new MutationObserver(() => {
    const n = answerLength();
    const last = window.growth.at(-1);
    if (n !== (last ? last.n : 0)) window.growth.push({ t: performance.now(), n });
  }).observe(log, { childList: true, subtree: true, characterData: true });
  document.getElementById("stop").addEventListener("click", () => { window.stopClickedAt = performance.now(); },
    { capture: true });
}"""


@dataclass
class Chat:
    door: FrontDoor
    page: Page
    artifacts: Path

    @property
    def last_turn(self) -> Any:
        return self.page.locator("#log > li.turn").last

    async def ask(self, question: str) -> None:
        """Type a question and press Enter, as a person would."""
        await self.page.locator("#message").fill(question)
        await self.page.locator("#message").press("Enter")

    async def answered(self) -> None:
        """The last answer has ended (successfully or not)."""
        await self.last_turn.locator('.answer[aria-busy="false"]').wait_for(timeout=WAIT_MS)

    async def growth(self) -> list[dict[str, float]]:
        samples: list[dict[str, float]] = await self.page.evaluate("() => window.growth")
        return samples

    async def screenshot(self, name: str) -> Path:
        path = self.artifacts / name
        await self.page.screenshot(path=str(path))
        print(f"chat page screenshot: {path}")
        return path


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[FrontDoor, Browser]]:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("Debian's chromium is not installed: run `make system-tools`")
    tmp = tmp_path_factory.mktemp("chat-page")
    async with front_door(tmp, demo_token_delay_ms=WORD_DELAY_MS) as door, async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS, timeout=WAIT_MS)
        try:
            yield door, browser
        finally:
            await browser.close()


@pytest_asyncio.fixture(loop_scope="module")
async def chat(stack: tuple[FrontDoor, Browser], tmp_path: Path) -> AsyncIterator[Chat]:
    door, browser = stack
    context = await browser.new_context(viewport={"width": 960, "height": 720}, device_scale_factor=1)
    page = await context.new_page()
    page.set_default_timeout(WAIT_MS)
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    foreign: list[str] = []
    page.on("request", lambda r: None if r.url.startswith(door.envoy.url + "/") else foreign.append(r.url))
    await page.goto(door.envoy.url + "/")
    await page.locator('html[data-ready="true"]').wait_for(state="attached")
    await page.evaluate(RECORD_GROWTH)
    artifacts = Path(os.environ.get("CHAT_PAGE_ARTIFACTS") or tmp_path)
    artifacts.mkdir(parents=True, exist_ok=True)
    try:
        yield Chat(door, page, artifacts)
    finally:
        await context.close()
    # Cancelled calls show up as a failed fetch in the console; everything else is a defect.
    assert [p for p in problems if "agent.AgentService/StreamChat" not in p] == []
    assert foreign == [], "the page fetched something from another origin"


async def test_envoy_serves_the_page_with_its_types_and_a_strict_policy(
    stack: tuple[FrontDoor, Browser],
) -> None:
    door, _ = stack
    async with httpx.AsyncClient(base_url=door.envoy.url, timeout=10) as client:
        page = await client.get("/")
        script = await client.get("/chat.js")
        style = await client.get("/chat.css")
        other = await client.get("/index.html")
        head = await client.head("/")
        post = await client.post("/", content=b"")
    assert page.status_code == script.status_code == style.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert script.headers["content-type"] == "text/javascript; charset=utf-8"
    assert style.headers["content-type"] == "text/css; charset=utf-8"
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy and "connect-src 'self'" in policy
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
    assert {r.headers["x-content-type-options"] for r in (page, script, style)} == {"nosniff"}
    repo_web = Path(__file__).resolve().parents[2] / "deploy" / "web"
    assert page.content == (repo_web / "index.html").read_bytes()
    assert script.content == (repo_web / "dist" / "chat.js").read_bytes()
    assert head.status_code == 200 and head.headers["content-type"] == "text/html; charset=utf-8"
    assert other.status_code == post.status_code == 404  # only the page's own paths, only to GET and HEAD


async def test_enter_streams_the_answer_word_by_word(chat: Chat) -> None:
    question = "please describe " + " ".join(f"item{i}" for i in range(40))
    started = time.monotonic()
    await chat.ask(question)
    await chat.answered()
    elapsed_s = time.monotonic() - started
    answer = chat.last_turn.locator(".answer .text")
    expected = f"This is the demo model answering: {question}"
    assert await answer.inner_text() == expected
    await chat.last_turn.locator(".answer .done").wait_for()
    assert "tokens" in await chat.last_turn.locator(".done").inner_text()
    # 46 words at 20 ms: about 0.9 s. Rendered all at once, there would be one or two growth steps.
    growth = await chat.growth()
    assert growth[-1]["n"] == len(expected)
    distinct_times = {round(sample["t"]) for sample in growth}
    assert len(growth) >= 10 and len(distinct_times) >= 10, growth
    spread_ms = growth[-1]["t"] - growth[0]["t"]
    assert spread_ms >= 0.5 * 46 * WORD_DELAY_MS, f"the text arrived within {spread_ms:.0f} ms: {growth}"
    assert all(b["n"] > a["n"] and b["t"] >= a["t"] for a, b in itertools.pairwise(growth))
    assert elapsed_s < 10
    assert await chat.page.locator("#message").evaluate("node => node === document.activeElement")


async def test_a_tool_call_renders_inline_and_the_session_is_remembered(chat: Chat) -> None:
    page = chat.page
    await page.locator("#new-session").click()
    session_id = await page.locator("#session").input_value()
    assert session_id.startswith("chat-")
    await chat.ask("hello, I have a question about arithmetic")
    await chat.answered()

    sent: list[Request] = []
    page.on("request", lambda r: sent.append(r) if r.url.endswith("/agent.AgentService/StreamChat") else None)
    await chat.ask("what is 6*7?")
    await chat.answered()
    tool = chat.last_turn.locator('.tool[data-tool-name="calculator"]')
    assert await tool.get_attribute("data-status") == "success"
    assert await tool.locator(".tool-input").inner_text() == '{"expression":"6*7"}'
    assert await tool.locator(".tool-output").inner_text() == "6*7 = 42"
    assert "42" in await chat.last_turn.locator(".answer .text").inner_text()
    # The tool card comes before the text that uses its result.
    order = await chat.last_turn.locator(".answer > .tool, .answer > .text").evaluate_all(
        "nodes => nodes.map((n) => n.className)"
    )
    assert order == ["tool", "text"]

    (request,) = sent
    headers = await request.all_headers()
    assert headers["x-session-id"] == session_id
    assert headers["content-type"].startswith("application/grpc-web")
    assert "authorization" not in headers  # no token set

    await chat.screenshot("chat.png")
    # A narrow window: no sideways scrolling, the input at the bottom, the conversation above it.
    await page.set_viewport_size({"width": 360, "height": 740})
    assert await page.evaluate("() => document.documentElement.scrollWidth") <= 360
    composer = await page.locator("#composer").bounding_box()
    conversation = await page.locator("#conversation").bounding_box()
    assert composer is not None and conversation is not None
    assert conversation["y"] + conversation["height"] <= composer["y"] <= 740 - composer["height"]
    assert composer["y"] + composer["height"] > 740 - 80
    await chat.screenshot("chat-narrow.png")

    # The session is in the recent list and its transcript comes back after a reload.
    await page.reload()
    await page.locator('html[data-ready="true"]').wait_for(state="attached")
    assert await page.locator("#session").input_value() == session_id
    assert await page.locator("#recent option", has_text=session_id).count() == 1
    assert await page.locator("#log > li.turn").count() == 2
    assert await page.locator('.tool[data-tool-name="calculator"] .tool-output').inner_text() == "6*7 = 42"


async def test_stop_cancels_the_call_and_frees_the_session(chat: Chat) -> None:
    page = chat.page
    session_id = "stop-me"
    await page.locator("#session").fill(session_id)
    await page.locator("#session").press("Tab")
    # About 300 words at 20 ms: a 6 s answer.
    await chat.ask("tell me everything: " + " ".join(f"word{i}" for i in range(300)))
    await page.wait_for_function(
        "() => window.growth.length > 0 && window.growth.at(-1).n > 120", timeout=WAIT_MS, polling="raf"
    )
    await page.locator("#stop").click()
    stopped = time.monotonic()
    await chat.last_turn.locator(".answer .stopped").wait_for()
    await chat.answered()
    assert "CANCELLED" in await chat.last_turn.locator(".stopped").inner_text()
    assert await page.locator("#status").inner_text() == "Stopped"
    assert await page.locator("#send").is_visible() and not await page.locator("#stop").is_visible()

    # The server saw the cancel: the session takes a new call long before the 6 s answer would have ended.
    responses = await _when_not_busy(chat.door, session_id, since=stopped, within_s=3)
    assert kinds(responses)[-1] == "done"

    # Nothing was drawn after the click, though the call was still sending when it was stopped.
    growth = await chat.growth()
    clicked_at = await page.evaluate("() => window.stopClickedAt")
    assert clicked_at is not None
    assert [s for s in growth if s["t"] > clicked_at] == []
    shown = len(await chat.last_turn.locator(".answer .text").inner_text())
    assert 120 < shown < 1000
    await chat.screenshot("chat-stopped.png")
    await chat.ask("and now?")
    await chat.answered()
    assert await chat.last_turn.locator(".answer .done").count() == 1


async def _when_not_busy(
    door: FrontDoor, session_id: str, since: float, within_s: float
) -> list[agent_pb2.ChatResponse]:
    """A short answer in the session, asked directly of the agent until it is no longer busy (ABORTED)."""
    while True:
        call = door.agent.stub.StreamChat(agent_pb2.ChatRequest(content="still there?", session_id=session_id))
        try:
            return await collect(call)
        except grpc.aio.AioRpcError as error:
            failure = error
        assert failure.code() == grpc.StatusCode.ABORTED, failure
        assert time.monotonic() - since < within_s, "the session stayed busy after stop"
        await asyncio.sleep(0.05)


async def test_an_error_shows_its_status_name(chat: Chat) -> None:
    page = chat.page
    await page.locator("#session").fill("../x")
    await page.locator("#session").press("Tab")
    await chat.ask("hello")
    await chat.answered()
    error = chat.last_turn.locator(".answer .error")
    assert await error.get_attribute("role") == "alert"
    assert await error.locator(".code").inner_text() == "INVALID_ARGUMENT"
    assert "session" in (await error.locator(".message").inner_text()).lower()
    assert await page.locator("#status").inner_text() == "Failed: INVALID_ARGUMENT"
    assert await page.locator("#recent option", has_text="../x").count() == 0
    await chat.screenshot("chat-error.png")


async def test_the_bearer_token_is_sent_once_set(chat: Chat) -> None:
    page = chat.page
    await page.locator("#settings summary").click()
    await page.locator("#token").fill("not-a-real-token")
    await page.locator("#token").press("Enter")
    async with page.expect_request("**/agent.AgentService/StreamChat") as request_info:
        await chat.ask("hello")
    request = await request_info.value
    assert (await request.all_headers())["authorization"] == "Bearer not-a-real-token"
    await chat.answered()
    # Kept in this browser: a reload still sends it.
    await page.reload()
    await page.locator('html[data-ready="true"]').wait_for(state="attached")
    async with page.expect_request("**/agent.AgentService/StreamChat") as request_info:
        await chat.ask("hello again")
    assert (await (await request_info.value).all_headers())["authorization"] == "Bearer not-a-real-token"
    await chat.answered()
