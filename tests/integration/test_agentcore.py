"""The AgentCore Runtime face over real HTTP: /ping, streamed /invocations, /ws, sessions, refusals, limits.

The app runs under uvicorn on an ephemeral loopback port in a thread, as the
`agent-agentcore` console script runs it (one test runs that script as a process).
Streams are read exactly the way the seed notebook reads AgentCore's answer:
botocore's `StreamingBody.iter_lines(chunk_size=1)` over the HTTP body, keeping
`data: ` lines.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import AsyncIterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from botocore.response import StreamingBody

from agent_service.agentcore.app import AgentCoreFace
from agent_service.models.demo import DemoModel
from tests.support.doubles import FailingModel, HangingModel
from tests.support.servers import free_port, make_settings

SESSION_HEADER = "X-Amzn-Bedrock-AgentCore-Runtime-Session-Id"


@dataclass
class Served:
    face: AgentCoreFace
    url: str
    data_dir: Path


@contextmanager
def serving(face: AgentCoreFace) -> Iterator[str]:
    """Serve the face's app with uvicorn on an ephemeral loopback port in a thread; yields its URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(face.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="agentcore-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        assert not thread.is_alive(), "uvicorn did not stop"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    data_dir = tmp_path_factory.mktemp("agentcore")
    # 5 ms per demo word: short prompts answer at once, a 300-word prompt streams for about 1.5 s.
    face = AgentCoreFace(make_settings(data_dir, demo_token_delay_ms=5, shutdown_grace_s=1))
    with serving(face) as url:
        yield Served(face, url, data_dir)


def invoke(url: str, payload: Any, session_id: str | None = None) -> dict[str, Any]:
    """POST /invocations and shape the answer like boto3's `invoke_agent_runtime` response."""
    headers = {"Content-Type": "application/json"}
    if session_id is not None:
        headers[SESSION_HEADER] = session_id
    request = urllib.request.Request(f"{url}/invocations", data=json.dumps(payload).encode(), headers=headers)
    response = urllib.request.urlopen(request, timeout=30)
    return {"contentType": response.headers["Content-Type"], "response": StreamingBody(response, None)}


def seed_client_loop(boto3_response: dict[str, Any]) -> tuple[list[str], str]:
    """The seed notebook's streaming loop, verbatim but for `print`/`display`: (chunks, full response)."""
    assert "text/event-stream" in boto3_response.get("contentType", "")
    content = []
    for line in boto3_response["response"].iter_lines(chunk_size=1):
        if line:
            line = line.decode("utf-8")
            if line.startswith("data: "):
                data = line[6:].replace('"', "")  # Remove "data: " prefix
                content.append(data.replace('"', ""))
    full_response = " ".join(content)
    return content, full_response


def read_events(boto3_response: dict[str, Any]) -> list[Any]:
    """The same stream, each `data:` line decoded as the JSON value it is."""
    assert "text/event-stream" in boto3_response["contentType"]
    lines = boto3_response["response"].iter_lines(chunk_size=1)
    return [json.loads(line[6:]) for line in lines if line.startswith(b"data: ")]


def typed(url: str, prompt: str, session_id: str | None = None, **payload: Any) -> list[dict[str, Any]]:
    """An answer in the `events` shape."""
    return read_events(invoke(url, {"prompt": prompt, "stream": "events", **payload}, session_id=session_id))


def stored_messages(data_dir: Path, session: str) -> list[Any]:
    """The messages of a session in the files store's snapshot."""
    (snapshot,) = (data_dir / "anonymous" / "session" / session).rglob("snapshot_latest.json")
    return list(json.loads(snapshot.read_text())["data"]["messages"])


def ping(url: str) -> str:
    reply = httpx.get(f"{url}/ping", timeout=5)
    assert reply.status_code == 200
    return str(reply.json()["status"])


def new_session() -> str:
    return f"agentcore-{uuid.uuid4()}"  # AgentCore session ids are 33+ characters


def wait_until(condition: Any, timeout_s: float, message: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.02)


def test_ping_is_healthy_when_idle(served: Served) -> None:
    assert ping(served.url) == "Healthy"


def test_the_seed_notebooks_loop_prints_only_the_answer(served: Served) -> None:
    chunks, full_response = seed_client_loop(invoke(served.url, {"prompt": "How much is 2+1"}))
    # The default `text` shape: every data line is a piece of the answer, nothing else.
    assert "".join(chunks) == "Here is what the tool returned: 2+1 = 3"
    assert not any("{" in chunk for chunk in chunks)
    assert full_response.replace("  ", " ").startswith("Here is what")


def test_typed_event_shapes(served: Served) -> None:
    events = typed(served.url, "what is 6*7?")
    tool_use, tool_result, *text, done = events
    run_id = tool_use["run_id"]
    assert run_id and {event["run_id"] for event in events} == {run_id}
    assert tool_use == {
        "type": "tool_use",
        "tool_use_id": tool_use["tool_use_id"],
        "name": "calculator",
        "input": {"expression": "6*7"},
        "sequence": 1,
        "run_id": run_id,
    }
    assert tool_result == {
        "type": "tool_result",
        "tool_use_id": tool_use["tool_use_id"],
        "name": "calculator",
        "status": "success",
        "output": "6*7 = 42",
        "sequence": 2,
        "run_id": run_id,
    }
    assert all(event["type"] == "text" for event in text)
    assert "".join(event["text"] for event in text) == "Here is what the tool returned: 6*7 = 42"
    assert done["type"] == "done" and done["stop_reason"] == "end_turn"
    assert [event["sequence"] for event in events] == list(range(1, len(events) + 1))
    assert done["event_count"] == len(events) - 1 and done["session_id"] == ""  # events before done, as on gRPC
    assert done["usage"]["output_tokens"] > 0 and done["duration_ms"] >= 0


def test_a_dropped_answer_resumes_with_last_event_id(served: Served) -> None:
    """Every event has an SSE id; a client that lost the stream asks again with Last-Event-ID."""
    body = {"prompt": "w " * 300, "stream": "events", "on_disconnect": "continue"}
    ids: list[str] = []
    with httpx.stream("POST", f"{served.url}/invocations", json=body, timeout=30) as response:
        run_id = response.headers["x-run-id"]
        for line in response.iter_lines():
            if line.startswith("id: "):
                ids.append(line[4:])
            if len(ids) == 5:
                break  # the connection drops
    assert ids[-1] == f"{run_id}:5"
    resumed = httpx.post(f"{served.url}/invocations", json={"stream": "events"}, headers={"Last-Event-ID": ids[-1]},
                         timeout=30)  # fmt: skip
    events = [json.loads(line[6:]) for line in resumed.text.splitlines() if line.startswith("data: ")]
    assert [event["sequence"] for event in events] == list(range(6, 6 + len(events)))
    assert events[-1]["type"] == "done"
    payload_form = httpx.post(f"{served.url}/invocations", json={"run_id": run_id, "after_sequence": 5}, timeout=30)
    text = "".join(json.loads(line[6:]) for line in payload_form.text.splitlines() if line.startswith("data: "))
    assert text == "".join(event.get("text", "") for event in events)


def test_ping_is_busy_while_an_answer_streams(served: Served) -> None:
    with httpx.Client(timeout=30) as client:
        body = {"prompt": "word " * 300, "stream": "events"}
        with client.stream("POST", f"{served.url}/invocations", json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            assert ping(served.url) == "HealthyBusy"
            assert served.face.in_flight == 1
            last = [line for line in lines if line.startswith("data: ")][-1]
    assert json.loads(last[6:])["type"] == "done"
    wait_until(lambda: ping(served.url) == "Healthy", 5, "still HealthyBusy after the answer ended")


def test_session_continues_via_the_header(served: Served) -> None:
    session = new_session()
    first = typed(served.url, "remember the number 42", session_id=session)
    second = typed(served.url, "what was it", session_id=session)
    fresh = typed(served.url, "what was it", session_id=new_session())
    assert first[-1]["session_id"] == second[-1]["session_id"] == session
    # The second answer's model call saw the first exchange; a fresh session's did not.
    assert second[-1]["usage"]["input_tokens"] > fresh[-1]["usage"]["input_tokens"]
    assert len(stored_messages(served.data_dir, session)) == 4
    # The payload may name the session too; it must then agree with the header.
    third = typed(served.url, "again", session_id=session)
    assert third[-1]["session_id"] == session


@pytest.mark.parametrize(
    ("body", "headers", "message"),
    [
        (b"{not json", {}, "the body is not valid JSON"),
        (b"\xff\xfe", {}, "not UTF-8"),
        (b'["a list"]', {}, "must be a JSON object"),
        (b'{"text": "no prompt"}', {}, '"prompt" must be a non-empty string'),
        (b'{"prompt": "   "}', {}, "content must not be empty"),
        (b'{"prompt": 42}', {}, '"prompt" must be a non-empty string'),
        (b'{"prompt": "\\udc80"}', {}, "not valid Unicode"),
        (b'{"prompt": "hi", "stream": "xml"}', {}, '"stream" must be one of text, events'),
        (b'{"prompt": "hi"}', {SESSION_HEADER: "../etc"}, "session id must be"),
        (b'{"prompt": "hi", "session_id": "a-1"}', {SESSION_HEADER: "b-2"}, "disagree"),
        (b"[" * 100_000 + b"]" * 100_000, {}, "nested deeper than 32 levels"),
        (b'{"prompt": "hi", "x": ' + b"[" * 40 + b"]" * 40 + b"}", {}, "nested deeper than 32 levels"),
    ],
    ids=[
        "bad-json",
        "not-utf8",
        "not-an-object",
        "no-prompt",
        "blank-prompt",
        "prompt-not-text",
        "lone-surrogate",
        "bad-stream-shape",
        "bad-session",
        "two-sessions",
        "deep-100k",
        "deep-40",
    ],
)
def test_bad_requests_get_400_with_a_readable_error(
    served: Served, body: bytes, headers: dict[str, str], message: str
) -> None:
    reply = httpx.post(f"{served.url}/invocations", content=body, headers=headers, timeout=10)
    assert reply.status_code == 400
    assert reply.headers["content-type"] == "application/json"
    assert reply.json()["code"] == "INVALID_ARGUMENT"
    assert message in reply.json()["error"]
    assert "Traceback" not in reply.text


def test_strings_that_look_nested_are_not_depth(served: Served) -> None:
    """Brackets inside strings (and escaped quotes) are text, not nesting."""
    events = typed(served.url, 'say "[[[[" ' + "[" * 100 + ' \\" {')
    assert events[-1]["type"] == "done"


def test_an_oversized_body_gets_413_without_being_read(tmp_path: Path) -> None:
    face = AgentCoreFace(make_settings(tmp_path, max_message_bytes=4096))
    with serving(face) as url:
        declared = httpx.post(f"{url}/invocations", content=b"x" * 5000, timeout=10)
        assert declared.status_code == 413
        assert declared.json()["code"] == "RESOURCE_EXHAUSTED" and "4096 bytes" in declared.json()["error"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is counted while reading
            for _ in range(100):
                yield b"y" * 1024

        streamed = httpx.post(f"{url}/invocations", content=chunks(), timeout=10)
        assert streamed.status_code == 413
        assert face.in_flight == 0


def test_a_busy_session_is_refused_with_409(served: Served) -> None:
    session = new_session()
    with httpx.Client(timeout=30) as client:
        headers = {SESSION_HEADER: session}
        long_answer = {"prompt": "word " * 200}
        with client.stream("POST", f"{served.url}/invocations", json=long_answer, headers=headers) as busy:
            lines = busy.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            refused = client.post(f"{served.url}/invocations", json={"prompt": "me too"}, headers=headers)
            assert refused.status_code == 409
            assert refused.json()["code"] == "ABORTED" and "busy" in refused.json()["error"]
            for _ in lines:
                pass
    answered = typed(served.url, "now it is free", session_id=session)
    assert answered[-1]["type"] == "done"


def test_a_client_that_leaves_mid_answer_frees_its_slot_and_session(served: Served) -> None:
    session = new_session()
    headers = {SESSION_HEADER: session}
    # 1000 words at 5 ms: an answer of about 5 s, left after its first event.
    with httpx.stream("POST", f"{served.url}/invocations", json={"prompt": "w " * 1000}, headers=headers) as r:
        assert next(line for line in r.iter_lines() if line.startswith("data: "))
    wait_until(lambda: not served.face.in_flight and ping(served.url) == "Healthy", 1.5, "the slot is still held")
    # The next caller of the session waits for the cancelled run to wind down instead of being refused.
    events = typed(served.url, "hello", session_id=session)
    assert events[-1]["type"] == "done"


@pytest.mark.system  # the console script as a process
def test_console_script_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    env = dict(
        os.environ,
        AGENT_MODEL_PROVIDER="demo",
        AGENT_AGENTCORE_HOST="127.0.0.1",
        AGENT_AGENTCORE_PORT=str(port),
        AGENT_METRICS_HOST="127.0.0.1",
        AGENT_METRICS_PORT="0",
        AGENT_DATA_DIR=str(tmp_path),
        AGENT_SHUTDOWN_GRACE_S="2",
    )
    script = Path(sys.executable).parent / "agent-agentcore"
    process = subprocess.Popen([str(script)], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, "agent-agentcore exited"
            assert time.monotonic() < deadline, "agent-agentcore did not answer /ping"
            try:
                if ping(url) == "Healthy":
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        chunks, _ = seed_client_loop(invoke(url, {"prompt": "what is the weather?"}, session_id=new_session()))
        assert "".join(chunks) == "Here is what the tool returned: sunny"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


class SlowStartModel(DemoModel):
    """The demo model with a long time to first token."""

    def __init__(self, delay_s: float, **config: Any) -> None:
        super().__init__(**config)
        self.delay_s = delay_s

    async def stream(self, *args: Any, **kwargs: Any) -> AsyncIterable[Any]:
        await asyncio.sleep(self.delay_s)
        async for event in super().stream(*args, **kwargs):
            yield event


@pytest.mark.parametrize(
    ("error", "code"),
    [(ConnectionError("refused"), "UNAVAILABLE"), (RuntimeError("boom"), "INTERNAL")],
    ids=["unavailable", "internal"],
)
def test_a_failing_provider_ends_the_stream_with_an_error_event(tmp_path: Path, error: Exception, code: str) -> None:
    face = AgentCoreFace(make_settings(tmp_path), model=FailingModel(error, words_before_failure=2))
    with serving(face) as url:
        events = read_events(invoke(url, {"prompt": "hello"}))
        assert "".join(event for event in events if isinstance(event, str)) == "word0 word1 "
        assert events[-1]["type"] == "error" and events[-1]["code"] == code
        assert type(error).__name__ in events[-1]["error"]
        assert ping(url) == "Healthy"


def test_an_answer_past_its_deadline_ends_with_deadline_exceeded(tmp_path: Path) -> None:
    face = AgentCoreFace(make_settings(tmp_path, max_stream_duration_s=0.5), model=HangingModel())
    with serving(face) as url:
        started = time.monotonic()
        events = read_events(invoke(url, {"prompt": "hello"}, session_id=new_session()))
        assert events[0] == "thinking "
        assert events[-1] == {
            "type": "error",
            "code": "DEADLINE_EXCEEDED",
            "error": "the answer did not complete within the server's maximum stream duration",
        }
        assert 0.4 < time.monotonic() - started < 5


def test_a_client_that_leaves_before_the_first_event_frees_its_slot(tmp_path: Path) -> None:
    """The answer is still waiting for the first event when the client goes: nothing must leak."""
    face = AgentCoreFace(make_settings(tmp_path), model=SlowStartModel(1.0))
    with serving(face) as url:
        session = new_session()
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/invocations", json={"prompt": "hi"}, headers={SESSION_HEADER: session}, timeout=0.3)
        wait_until(lambda: not face.in_flight and ping(url) == "Healthy", 0.6, "the abandoned answer holds its slot")
        events = typed(url, "again", session_id=session)
        assert events[-1]["type"] == "done"


def test_the_same_metrics_as_the_grpc_path(served: Served) -> None:
    """The AgentCore process exports the gRPC service's metric families (method "AgentCore/invocations")."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    read_events(invoke(served.url, {"prompt": "what is 4*4"}))
    assert served.face.metrics is not None
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(generate_latest(served.face.metrics.registry).decode())
        for sample in family.samples
    }
    method = (("code", "OK"), ("fault", "none"), ("method", "AgentCore/invocations"))
    assert samples[("agent_streams_finished_total", method)] >= 1
    assert samples[("agent_tool_calls_total", (("outcome", "success"), ("tool", "calculator")))] >= 1
    ttfc = ("agent_stream_time_to_first_chunk_seconds_count", (("method", "AgentCore/invocations"), ("model", "demo")))
    assert samples[ttfc] >= 1


async def _ws_answer(socket: Any) -> list[dict[str, Any]]:
    """Frames of one answer, up to its done or error event."""
    events = []
    while True:
        event = json.loads(await asyncio.wait_for(socket.recv(), 10))
        events.append(event)
        if event["type"] in ("done", "error"):
            return events


async def test_websocket_converses_over_the_same_core(served: Served) -> None:
    from websockets.asyncio.client import connect

    session = new_session()
    ws_url = served.url.replace("http://", "ws://") + "/ws"
    async with connect(ws_url, additional_headers={SESSION_HEADER: session}) as socket:
        await socket.send(json.dumps({"prompt": "what is 6*7?"}))
        first = await _ws_answer(socket)
        assert [event["type"] for event in first[:2]] == ["tool_use", "tool_result"]
        assert first[-1]["type"] == "done" and first[-1]["session_id"] == session
        await socket.send("{not json")
        refused = await _ws_answer(socket)
        assert refused == [{"type": "error", "code": "INVALID_ARGUMENT", "error": refused[0]["error"],
                            "sequence": first[-1]["sequence"] + 1, "turn": 2}]  # fmt: skip
        await socket.send(json.dumps({"prompt": "and again"}))
        third = await _ws_answer(socket)
        assert third[-1]["type"] == "done" and third[-1]["turn"] == 3
    # The conversation was persisted under the session: its history holds both answers.
    assert len(stored_messages(served.data_dir, session)) >= 6
    wait_until(lambda: served.face.in_flight == 0, 5, "the websocket's slot is still held")


def test_done_event_count_and_refusal_order_agree_with_grpc(tmp_path: Path) -> None:
    """The two doors share one core: the same answer has the same counts, the same bad request the same status."""
    import grpc

    from agent_service.proto import agent_pb2, agent_pb2_grpc
    from tests.support.servers import running_server

    settings = make_settings(tmp_path, max_concurrent_streams=1, demo_token_delay_ms=20, demo_reply_words=100)
    face = AgentCoreFace(settings)

    async def grpc_side() -> tuple[int, int, grpc.StatusCode]:
        async with running_server(settings) as grpc_served:
            responses = [r async for r in grpc_served.stub.StreamChat(agent_pb2.ChatRequest(content="what is 6*7?"))]
            hold = grpc_served.stub.StreamChat(agent_pb2.ChatRequest(content="hold the only slot"))
            await hold.read()
            stub = agent_pb2_grpc.AgentServiceStub(grpc_served.channel)
            try:
                async for _ in stub.StreamChat(agent_pb2.ChatRequest(content="")):
                    pass
                code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as error:
                code = error.code()
            hold.cancel()
            return responses[-1].done.event_count, len(responses) - 1, code

    done_count, events_before_done, grpc_code = asyncio.run(grpc_side())
    with serving(face) as url:
        events = typed(url, "what is 6*7?")
        client = httpx.Client(timeout=30)
        with client, client.stream("POST", f"{url}/invocations", json={"prompt": "hold the only slot"}) as held:
            assert next(line for line in held.iter_lines() if line.startswith("data: "))
            refused = client.post(f"{url}/invocations", json={"prompt": ""})
    assert done_count == events_before_done == events[-1]["event_count"] == len(events) - 1
    assert grpc_code == grpc.StatusCode.INVALID_ARGUMENT  # validated before admission, on both doors
    assert refused.status_code == 400 and refused.json()["code"] == "INVALID_ARGUMENT"
