"""Bad input, limits, busy sessions, deadlines, cancellation and provider failures: clear statuses, no leaks."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import grpc
import pytest

from agent_service.core.history import interrupted_text
from agent_service.proto import agent_pb2
from tests.support.doubles import FailingModel, HangingModel
from tests.support.servers import (
    Running,
    collect,
    kinds,
    make_settings,
    read_until_error,
    running_server,
    session_of,
    text_of,
)


async def _status_of(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(call)
    return caught.value


async def _until(condition, timeout_s: float = 5.0) -> None:
    """Wait for a server-side condition that follows a client-visible event."""
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 - polls server state that has no event to wait on
            await asyncio.sleep(0.01)


def _roles_alternate(messages) -> bool:
    roles = [m["role"] for m in messages]
    return all(a != b for a, b in itertools.pairwise(roles))


@pytest.mark.parametrize(
    ("request_kwargs", "message_part"),
    [
        ({"content": ""}, "content must not be empty"),
        ({"content": "   \n"}, "content must not be empty"),
        ({"content": "x" * 33_000}, "the limit is 32000"),
        ({"content": "hi", "metadata": {f"k{i}": "v" for i in range(17)}}, "metadata has 17 entries"),
        ({"content": "hi", "metadata": {"k" * 65: "v"}}, "metadata keys must have"),
        ({"content": "hi", "metadata": {"k": "v" * 1025}}, "the limit is 1024"),
        ({"content": "hi", "session_id": "../etc/passwd"}, "session id must be"),
        ({"content": "hi", "session_id": "a/b"}, "session id must be"),
        ({"content": "hi", "session_id": ".hidden"}, "session id must be"),
        ({"content": "hi", "session_id": "s" * 129}, "session id must be"),
        ({"content": "hi", "session_id": "white space"}, "session id must be"),
        ({"content": "hi", "metadata": {"session_id": "../x"}}, "session id must be"),
        ({"content": "hi", "session_id": "a", "metadata": {"session_id": "b"}}, "disagree"),
    ],
)
async def test_bad_input_is_invalid_argument(served: Running, request_kwargs, message_part: str) -> None:
    error = await _status_of(served.stub.StreamChat(agent_pb2.ChatRequest(**request_kwargs)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message_part in (error.details() or "")
    assert served.server.admission.in_flight == 0


async def test_session_header_conflicting_with_the_field_is_invalid(served: Running) -> None:
    call = served.stub.StreamChat(
        agent_pb2.ChatRequest(content="hi", session_id="a"), metadata=(("x-session-id", "b"),)
    )
    error = await _status_of(call)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "session_id and the x-session-id header disagree" in (error.details() or "")


async def test_bidi_bad_message_gets_error_event_and_stream_goes_on(served: Running) -> None:
    async def requests():
        yield agent_pb2.ChatRequest(content="")
        yield agent_pb2.ChatRequest(content="fine", session_id="../../x")
        yield agent_pb2.ChatRequest(content="good")

    responses = await collect(served.stub.BidirectionalChat(requests()))
    errors = [r for r in responses if r.WhichOneof("response") == "error"]
    assert [(e.turn, e.error.code) for e in errors] == [(1, "INVALID_ARGUMENT"), (2, "INVALID_ARGUMENT")]
    assert responses[-1].WhichOneof("response") == "done"
    assert responses[-1].turn == 3


async def test_message_over_the_size_limit_is_refused(tmp_path: Path) -> None:
    async with running_server(make_settings(tmp_path, max_message_bytes=4096)) as served:
        error = await _status_of(served.stub.StreamChat(agent_pb2.ChatRequest(content="x" * 5000)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_admission_limit_refuses_at_once_then_recovers(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, max_concurrent_streams=2, demo_token_delay_ms=20, demo_reply_words=15)
    async with running_server(settings) as served:
        slow = [served.stub.StreamChat(agent_pb2.ChatRequest(content="slow")) for _ in range(2)]
        for call in slow:
            await call.read()  # both admitted and streaming
        error = await _status_of(served.stub.StreamChat(agent_pb2.ChatRequest(content="one too many")))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit of 2 concurrent streams" in (error.details() or "")
        for call in slow:
            await collect(call)
        await _until(lambda: served.server.admission.in_flight == 0)
        responses = await collect(served.stub.StreamChat(agent_pb2.ChatRequest(content="now there is room")))
        assert kinds(responses)[-1] == "done"


async def test_second_call_on_busy_session_is_aborted(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, demo_token_delay_ms=20, demo_reply_words=15)
    async with running_server(settings) as served:
        first = served.stub.StreamChat(agent_pb2.ChatRequest(content="long answer", session_id="shared"))
        await first.read()
        error = await _status_of(served.stub.StreamChat(agent_pb2.ChatRequest(content="me too", session_id="shared")))
        assert error.code() == grpc.StatusCode.ABORTED
        assert "busy" in (error.details() or "")
        assert kinds(await collect(first))[-1] == "done"
        after = await collect(served.stub.StreamChat(agent_pb2.ChatRequest(content="my turn", session_id="shared")))
        assert kinds(after)[-1] == "done"


async def test_deadline_cancels_the_agent_and_session_stays_usable(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, demo_token_delay_ms=20, demo_reply_words=200)
    async with running_server(settings) as served:
        request = agent_pb2.ChatRequest(content="a long story", session_id="deadline")
        error = await _status_of(served.stub.StreamChat(request, timeout=0.3))
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await _until(lambda: served.server.runner.settling == 0)
        agent = session_of(served, "deadline").agent
        assert agent is not None and _roles_alternate(agent.messages)
        responses = await collect(served.stub.StreamChat(agent_pb2.ChatRequest(content="again", session_id="deadline")))
        assert kinds(responses)[-1] == "done"


async def test_hung_model_cannot_hold_a_stream_past_the_server_maximum(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, max_stream_duration_s=0.3, cancel_grace_s=0.2)
    async with running_server(settings, model=HangingModel()) as served:
        request = agent_pb2.ChatRequest(content="hello", session_id="hung")
        async with asyncio.timeout(10):  # bounds the test only: the client sets no deadline
            error = await _status_of(served.stub.StreamChat(request))
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert error.details() == "the answer did not complete within the server's maximum stream duration"
        await _until(lambda: served.server.runner.settling == 0)
        agent = session_of(served, "hung").agent
        assert agent is not None
        assert agent.messages[-1]["content"][0]["text"] == interrupted_text("thinking ", "the answer ran out of time")
        assert _roles_alternate(agent.messages)
        # The abandoned turn is closed; the next call on the session is answered (the model answers now).
        responses = await collect(served.stub.StreamChat(agent_pb2.ChatRequest(content="again", session_id="hung")))
        assert kinds(responses)[-1] == "done"


async def test_hung_model_error_event_precedes_the_status(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, max_stream_duration_s=0.2, cancel_grace_s=0.1)
    async with running_server(settings, model=HangingModel()) as served:
        seen, _ = await read_until_error(served.stub.StreamChat(agent_pb2.ChatRequest(content="hello")))
        assert kinds(seen) == ["content", "error"]
        assert seen[-1].error.code == "DEADLINE_EXCEEDED"


async def test_client_cancel_stops_the_agent(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, demo_token_delay_ms=20, demo_reply_words=200)
    async with running_server(settings) as served:
        call = served.stub.StreamChat(agent_pb2.ChatRequest(content="go on", session_id="cancelled"))
        await call.read()
        call.cancel()
        assert await call.code() == grpc.StatusCode.CANCELLED
        await _until(lambda: served.server.runner.settling == 0 and served.server.admission.in_flight == 0)
        session = session_of(served, "cancelled")
        assert not session.busy
        assert session.agent is not None and _roles_alternate(session.agent.messages)
        assert session.agent.messages[-1]["role"] == "assistant"
        responses = await collect(served.stub.StreamChat(agent_pb2.ChatRequest(content="hi", session_id="cancelled")))
        assert kinds(responses)[-1] == "done"


@pytest.mark.parametrize(
    ("error", "code", "detail_part"),
    [
        (ConnectionError("connection refused by 10.0.0.1"), grpc.StatusCode.UNAVAILABLE, "model provider unavailable"),
        (RuntimeError("boom"), grpc.StatusCode.INTERNAL, "model provider failed: RuntimeError: boom"),
    ],
)
async def test_provider_failure_mid_stream(tmp_path: Path, error, code, detail_part: str) -> None:
    async with running_server(make_settings(tmp_path), model=FailingModel(error)) as served:
        call = served.stub.StreamChat(agent_pb2.ChatRequest(content="hello", session_id="failing"))
        seen, error = await read_until_error(call)
        assert error.code() == code
        assert detail_part in (error.details() or "")
        assert "Traceback" not in (error.details() or "")
        assert set(kinds(seen[:-1])) == {"content"} and kinds(seen)[-1] == "error"
        assert text_of(seen) == "word0 word1 word2 "  # everything sent before the failure arrives
        assert seen[-1].error.code == code.name
        await _until(lambda: served.server.admission.in_flight == 0 and served.server.runner.settling == 0)
        assert not session_of(served, "failing").busy


async def test_no_tasks_leak_after_many_calls(served: Running) -> None:
    await collect(served.stub.StreamChat(agent_pb2.ChatRequest(content="warm up")))
    before = len(asyncio.all_tasks())
    for index in range(20):
        call = served.stub.StreamChat(agent_pb2.ChatRequest(content=f"call {index}", session_id=f"s{index % 3}"))
        await collect(call)
    # The run log's writer flushes in a task of its own every 50 ms: counted only when it is idle again.
    await _until(lambda: served.server.runner.settling == 0 and served.server.core.runs.writer.idle)
    assert len(asyncio.all_tasks()) <= before


async def test_unreachable_provider_is_unavailable(tmp_path: Path) -> None:
    """A real OpenAI-compatible client aimed at a closed loopback port."""
    from tests.support.servers import free_port

    settings = make_settings(tmp_path, model_provider="openai", openai_base_url=f"http://127.0.0.1:{free_port()}/v1",
                             openai_api_key="unused")  # fmt: skip
    async with running_server(settings) as served:
        seen, error = await read_until_error(served.stub.StreamChat(agent_pb2.ChatRequest(content="hello")))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "model provider unavailable" in (error.details() or "")
    assert kinds(seen) == ["error"]
