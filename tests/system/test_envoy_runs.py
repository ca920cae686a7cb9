"""Resumable runs through Envoy: every SSE event carries `id: <run_id>:<sequence>`, `Last-Event-ID` on
`GET /v1/runs/{run_id}/events` resumes after it (a client dropped mid-answer gets the rest exactly
once), and heartbeats keep a silent answer alive through an Envoy whose idle timeout is shorter
than the silence, on gRPC, gRPC-Web and SSE."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from agent_service.proto import agent_pb2, agent_pb2_grpc
from tests.support.doubles import SilentThenSpeakingModel
from tests.support.servers import collect, make_settings, running_server
from tests.system.conftest import FrontDoor, front_door
from tests.system.front_door import grpc_web_frame, parse_grpc_web, render_config, running_envoy

WORDS, DELAY_MS = 30, 60.0
ANSWER_EVENTS = WORDS + 1  # one text event per word (at this pace), then done


def sse_events(text: str) -> list[tuple[str | None, dict[str, Any]]]:
    """(id, data) of each event of an SSE body."""
    events = []
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "data" in fields:
            events.append((fields.get("id"), json.loads(fields["data"])))
    return events


async def read_sse_until(response: httpx.Response, count: int) -> str:
    """The raw SSE text of at least `count` whole events of a streaming response (a partial one is left out)."""
    text = ""
    async for piece in response.aiter_text():
        text += piece
        if text.count("\n\n") >= count:
            return text[: text.rindex("\n\n") + 2]
    raise AssertionError(f"the stream ended after {text.count(chr(10) * 2)} events")


@pytest.fixture
async def slow_door(tmp_path: Path) -> Any:
    async with front_door(tmp_path, demo_token_delay_ms=DELAY_MS, demo_reply_words=WORDS, coalesce_text=False) as door:
        yield door


async def test_every_sse_event_has_its_run_and_sequence_as_id(slow_door: FrontDoor) -> None:
    async with (
        httpx.AsyncClient(base_url=slow_door.envoy.url, timeout=30) as client,
        client.stream("POST", "/v1/chat:stream", json={"content": "hi"}) as response,
    ):
        run_id = response.headers["x-run-id"]
        events = sse_events((await response.aread()).decode())
    assert len(events) == ANSWER_EVENTS and "done" in events[-1][1]
    assert [event_id for event_id, _ in events] == [f"{run_id}:{data['sequence']}" for _, data in events]
    assert [int(data["sequence"]) for _, data in events] == list(range(1, ANSWER_EVENTS + 1))


async def test_an_sse_client_dropped_mid_answer_resumes_with_last_event_id_and_gets_the_rest_once(
    slow_door: FrontDoor,
) -> None:
    request = {"content": "tell me a story", "session_id": "dropped", "on_disconnect": "CONTINUE"}
    async with httpx.AsyncClient(base_url=slow_door.envoy.url, timeout=30) as client:
        async with client.stream("POST", "/v1/chat:stream", json=request) as response:
            before = sse_events(await read_sse_until(response, 8))
        # The connection is gone mid-answer; the run goes on (on_disconnect=CONTINUE).
        last_id = before[-1][0]
        assert last_id is not None
        resumed = await client.get(f"/v1/runs/{last_id.split(':')[0]}/events", headers={"last-event-id": last_id})
    assert resumed.status_code == 200, resumed.text
    after = sse_events(resumed.text)
    sequences = [int(data["sequence"]) for _, data in before + after]
    assert sequences == list(range(1, ANSWER_EVENTS + 1)), "each event exactly once, in order"
    assert "done" in after[-1][1]
    whole = "".join(data["content"]["text"] for _, data in before + after if "content" in data)
    assert len(whole.split()) == WORDS and whole.startswith("This is the demo model answering")


async def test_a_grpc_client_dropped_mid_answer_resumes_over_sse(slow_door: FrontDoor) -> None:
    """The run id comes first (the x-run-id header); the rest arrives once over the JSON door."""
    request = agent_pb2.ChatRequest(content="tell me a story", on_disconnect=agent_pb2.CONTINUE)
    call = slow_door.stub.StreamChat(request, timeout=30)
    run_id = dict(await call.initial_metadata())["x-run-id"]
    before = [await call.read() for _ in range(5)]
    call.cancel()
    async with httpx.AsyncClient(base_url=slow_door.envoy.url, timeout=30) as client:
        resumed = await client.get(f"/v1/runs/{run_id}/events", headers={"last-event-id": f"{run_id}:5"})
    assert resumed.status_code == 200, resumed.text
    after = sse_events(resumed.text)
    assert [r.sequence for r in before] + [int(data["sequence"]) for _, data in after] == list(
        range(1, ANSWER_EVENTS + 1)
    )
    assert all(event_id == f"{run_id}:{data['sequence']}" for event_id, data in after)


async def test_last_event_id_overrides_the_query_and_other_responses_pass_untouched(slow_door: FrontDoor) -> None:
    """`?after_sequence=` alone resumes too; the header wins over it (a browser's EventSource keeps its
    URL and sends the header on reconnection); a JSON error answer gets no `id:` line."""
    async with httpx.AsyncClient(base_url=slow_door.envoy.url, timeout=30) as client:
        answer = await client.post("/v1/chat:stream", json={"content": "hi"})
        run_id = answer.headers["x-run-id"]
        events = f"/v1/runs/{run_id}/events"
        by_query = await client.get(events, params={"after_sequence": 25})
        by_header = await client.get(events, params={"after_sequence": 3}, headers={"last-event-id": f"{run_id}:28"})
        unknown = await client.get("/v1/runs/no-such-run/events", headers={"last-event-id": "no-such-run:4"})
    assert [int(data["sequence"]) for _, data in sse_events(by_query.text)] == list(range(26, ANSWER_EVENTS + 1))
    assert [event_id for event_id, _ in sse_events(by_header.text)] == [
        f"{run_id}:{sequence}" for sequence in range(29, ANSWER_EVENTS + 1)
    ]
    assert unknown.status_code == 404 and unknown.headers["content-type"] == "application/json"
    assert unknown.json()["code"] == 5, unknown.text  # the service's NOT_FOUND, as the transcoder wrote it


@pytest.mark.parametrize(
    ("last_event_id", "message"),
    [("not-an-id", "must be <run_id>:<sequence>"), ("another-run:3", "another run than the path")],
)
async def test_a_last_event_id_of_another_shape_or_run_is_a_400(
    door: FrontDoor, last_event_id: str, message: str
) -> None:
    async with httpx.AsyncClient(base_url=door.envoy.url, timeout=30) as client:
        response = await client.get("/v1/runs/some-run/events", headers={"last-event-id": last_event_id})
    assert response.status_code == 400
    assert response.json()["code"] == 3 and message in response.json()["message"]


SILENCE_S = 20.0
ONE_OF = {field.name for field in agent_pb2.ChatResponse.DESCRIPTOR.oneofs_by_name["response"].fields}
IDLE_TIMEOUT = "10s"


async def _grpc_answer(target: str) -> list[str]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        responses = await collect(stub.StreamChat(agent_pb2.ChatRequest(content="think hard"), timeout=60))
    return [str(r.WhichOneof("response")) for r in responses]


async def _grpc_web_answer(url: str) -> list[str]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        response = await client.post(
            "/agent.AgentService/StreamChat",
            content=grpc_web_frame(agent_pb2.ChatRequest(content="think hard").SerializeToString()),
            headers={"content-type": "application/grpc-web+proto", "x-grpc-web": "1"},
        )
    messages, trailers = parse_grpc_web(response.content)
    kinds = [str(agent_pb2.ChatResponse.FromString(m).WhichOneof("response")) for m in messages]
    return [*kinds, f"grpc-status {trailers.get('grpc-status')}"]


async def _sse_answer(url: str) -> list[str]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        response = await client.post("/v1/chat:stream", json={"content": "think hard"})
    events = sse_events(response.text)
    # Heartbeats carry the id of the run's last event too: a reconnection after one loses nothing.
    assert all(event_id == f"{data['run_id']}:{data['sequence']}" for event_id, data in events), response.text
    return [next(key for key in data if key in ONE_OF) for _, data in events]


async def _outcome(answer: Any) -> tuple[list[str] | str, float]:
    started = time.monotonic()
    try:
        return await answer, time.monotonic() - started
    except (grpc.aio.AioRpcError, httpx.HTTPError, AssertionError) as error:
        return f"{type(error).__name__}: {error}", time.monotonic() - started


@pytest.mark.long_stream
async def test_heartbeats_keep_a_silent_answer_alive_through_a_shorter_idle_timeout(tmp_path: Path) -> None:
    """A model silent for 20 s behind an Envoy that resets streams idle for 10 s: with heartbeats every
    3 s all three doors get the whole answer; the same Envoy cuts all three for a server that sends none."""
    model = SilentThenSpeakingModel(SILENCE_S)
    with_beats = make_settings(tmp_path / "a", heartbeat_s=3.0, max_stream_duration_s=60)
    without = make_settings(tmp_path / "b", heartbeat_s=300.0, max_stream_duration_s=60)
    async with running_server(with_beats, model=model) as beating, running_server(without, model=model) as silent:
        (tmp_path / "ea").mkdir()
        (tmp_path / "eb").mkdir()
        configs = [
            render_config(
                tmp_path / name / "envoy.yaml",
                ENVOY_AGENT_PORT=str(agent.server.port),
                ENVOY_STREAM_IDLE_TIMEOUT=IDLE_TIMEOUT,
            )
            for name, agent in (("ea", beating), ("eb", silent))
        ]
        async with (
            running_envoy(configs[0], tmp_path / "ea") as envoy,
            running_envoy(configs[1], tmp_path / "eb") as bare,
        ):
            outcomes = await asyncio.gather(
                *(
                    _outcome(answer)
                    for front in (envoy, bare)
                    for answer in (_grpc_answer(front.target), _grpc_web_answer(front.url), _sse_answer(front.url))
                )
            )
    doors = ("gRPC", "gRPC-Web", "SSE")
    for door, (kinds, took) in zip(doors * 2, outcomes, strict=True):
        print(f"{door} {took:.1f} s {kinds}")
    for kinds, took in outcomes[:3]:
        assert isinstance(kinds, list), kinds
        assert kinds.count("heartbeat") >= 5 and "content" in kinds, kinds
        assert "done" in kinds and took >= SILENCE_S
    assert outcomes[1][0][-1] == "grpc-status 0"
    for cut, took in outcomes[3:]:  # Envoy's idle timeout cut each of them
        assert "done" not in cut and 10 <= took < SILENCE_S, (cut, took)
