"""The HTTP faces of the front door: JSON in, Server-Sent Events out (grpc_json_transcoder), and
gRPC-Web (grpc_web), both over plain HTTP/1.1 as a browser or curl speaks it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import httpx
import pytest

from agent_service.proto import agent_pb2
from tests.system.conftest import FrontDoor, front_door
from tests.system.front_door import grpc_web_frame, parse_grpc_web

WORDS = 20
DELAY_MS = 50.0


async def test_sse_events_arrive_one_by_one_as_the_model_produces_them(tmp_path: Path) -> None:
    async with front_door(tmp_path, demo_token_delay_ms=DELAY_MS, demo_reply_words=WORDS) as door:
        events: list[tuple[float, dict]] = []
        async with (
            httpx.AsyncClient(base_url=door.envoy.url, timeout=30) as client,
            client.stream("POST", "/v1/chat:stream", json={"content": "hi", "session_id": "sse"}) as response,
        ):
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.http_version == "HTTP/1.1"
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    events.append((time.monotonic(), json.loads(line.removeprefix("data: "))))

    bodies = [body for _, body in events]
    contents = [body for body in bodies if "content" in body]
    assert len(contents) == WORDS
    assert bodies[-1]["done"]["stop_reason"] == "end_turn"
    assert [int(body["sequence"]) for body in bodies] == list(range(1, len(bodies) + 1))
    assert {body["session_id"] for body in bodies} == {"sse"}
    # Streamed, not buffered: the model waits DELAY_MS before each word, so events that really
    # stream spread over at least (WORDS - 1) delays; a buffered answer arrives all at once.
    spread_s = events[-1][0] - events[0][0]
    assert spread_s >= 0.5 * (WORDS - 1) * DELAY_MS / 1000, f"all {len(events)} events within {spread_s:.3f} s"


async def test_sse_with_invalid_input_is_an_http_error_with_the_grpc_status(door: FrontDoor) -> None:
    async with httpx.AsyncClient(base_url=door.envoy.url, timeout=30) as client:
        response = await client.post("/v1/chat:stream", json={"content": ""})
    # convert_grpc_status: a trailers-only failure becomes an HTTP status and a google.rpc.Status body.
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    status = response.json()
    assert status["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert status["message"] == "content must not be empty"


@pytest.mark.parametrize(
    ("body", "message_part"),
    [
        # The transcoder writes a corrupt map entry for an object value, silently: the agent decodes it.
        ({"content": "hi", "metadata": {"a": {}}}, "not a valid agent.ChatRequest"),
        ({"content": "hi", "metadata": {"a": {"b": "c"}}}, "not a valid agent.ChatRequest"),
        # Envoy's own transcoding failures: JSON too, not text/plain.
        ({"content": 5}, "invalid value 5"),
        ({"content": "hi", "metadata": {"a": 1}}, "invalid value 1"),
    ],
    ids=["object-in-map", "nested-object-in-map", "number-for-string", "number-in-map"],
)
async def test_json_that_does_not_fit_the_contract_is_a_400_with_a_readable_json_status(
    door: FrontDoor, body: dict, message_part: str
) -> None:
    async with httpx.AsyncClient(base_url=door.envoy.url, timeout=30) as client:
        response = await client.post("/v1/chat:stream", json=body)
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    status = response.json()
    assert status["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert message_part in status["message"]


async def test_grpc_web_streams_framed_messages_and_a_trailer_frame(door: FrontDoor) -> None:
    request = agent_pb2.ChatRequest(content="what is 6*7").SerializeToString()
    async with httpx.AsyncClient(base_url=door.envoy.url, timeout=30) as client:
        response = await client.post(
            "/agent.AgentService/StreamChat",
            content=grpc_web_frame(request),
            headers={"content-type": "application/grpc-web+proto", "x-grpc-web": "1", "accept": "*/*"},
        )
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/grpc-web+proto"
    messages, trailers = parse_grpc_web(response.content)
    events = [agent_pb2.ChatResponse.FromString(message) for message in messages]
    assert [e.WhichOneof("response") for e in events][:2] == ["tool_use", "tool_result"]
    assert events[-1].WhichOneof("response") == "done"
    assert "42" in "".join(e.content.text for e in events)
    assert trailers["grpc-status"] == "0"


async def test_grpc_web_reports_a_failed_call_in_its_status(door: FrontDoor) -> None:
    request = agent_pb2.ChatRequest(content="").SerializeToString()
    async with httpx.AsyncClient(base_url=door.envoy.url, timeout=30) as client:
        response = await client.post(
            "/agent.AgentService/StreamChat",
            content=grpc_web_frame(request),
            headers={"content-type": "application/grpc-web+proto", "x-grpc-web": "1"},
        )
    messages, trailers = parse_grpc_web(response.content)
    # A trailers-only answer: the status is in the headers, or in a trailer frame.
    status = trailers.get("grpc-status", response.headers.get("grpc-status"))
    assert messages == []
    assert status == str(grpc.StatusCode.INVALID_ARGUMENT.value[0])


async def test_only_the_agent_services_are_exposed(door: FrontDoor) -> None:
    async with httpx.AsyncClient(base_url=door.envoy.url, timeout=10) as client:
        for path in ("/", "/stats/prometheus", "/v1/unknown", "/other.Service/Method"):
            response = await client.post(path, content=b"")
            assert response.status_code == 404, path
