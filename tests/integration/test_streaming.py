"""StreamChat and BidirectionalChat over a real server with the demo model: events, order, content."""

from __future__ import annotations

import asyncio
import json

import pytest

from agent_service.proto import agent_pb2
from tests.support.servers import Running, collect, kinds, text_of


async def test_stream_chat_streams_text_then_done(served: Running) -> None:
    responses = await collect(served.stub.StreamChat(agent_pb2.ChatRequest(content="hello there")))

    assert kinds(responses)[-1] == "done"
    assert set(kinds(responses)[:-1]) == {"content"}
    assert text_of(responses) == "This is the demo model answering: hello there"
    assert [r.sequence for r in responses] == list(range(1, len(responses) + 1))
    assert len({r.event_id for r in responses}) == len(responses)
    assert all(r.turn == 1 for r in responses)
    done = responses[-1].done
    assert done.stop_reason == "end_turn"
    assert done.event_count == len(responses) - 1
    assert done.usage.output_tokens == len(text_of(responses).split())
    assert done.usage.total_tokens == done.usage.input_tokens + done.usage.output_tokens


@pytest.mark.parametrize(
    ("prompt", "tool", "tool_input", "output_part"),
    [
        ("what is 6*7?", "calculator", {"expression": "6*7"}, "6*7 = 42"),
        ("what time is it?", "get_time", {}, ":"),
        ("how is the weather today?", "weather", {}, "sunny"),
    ],
)
async def test_tool_use_and_result_are_streamed(
    served: Running, prompt: str, tool: str, tool_input: dict[str, str], output_part: str
) -> None:
    responses = await collect(served.stub.StreamChat(agent_pb2.ChatRequest(content=prompt)))

    assert kinds(responses)[:2] == ["tool_use", "tool_result"]
    use, result = responses[0].tool_use, responses[1].tool_result
    assert use.tool_name == tool
    assert json.loads(use.input) == tool_input
    assert result.tool_id == use.tool_id
    assert result.tool_name == tool
    assert result.status == "success"
    assert output_part in result.output
    assert result.output in text_of(responses)
    assert kinds(responses)[-1] == "done"


async def test_failing_tool_is_reported_and_the_agent_goes_on(served: Running) -> None:
    responses = await collect(served.stub.StreamChat(agent_pb2.ChatRequest(content="what is 1/0")))

    result = next(r.tool_result for r in responses if r.WhichOneof("response") == "tool_result")
    assert result.status == "error"
    assert "division by zero" in result.output
    assert text_of(responses).startswith("The tool failed")
    assert responses[-1].done.stop_reason == "end_turn"


async def test_bidi_answers_three_messages_in_order_on_one_stream(served: Running) -> None:
    async def requests():  # sent at once: the client does not wait for answers
        for content in ("first message", "what is 2+2", "third message"):
            yield agent_pb2.ChatRequest(content=content)

    responses = await collect(served.stub.BidirectionalChat(requests()))

    dones = [r for r in responses if r.WhichOneof("response") == "done"]
    assert [d.turn for d in dones] == [1, 2, 3]
    assert [r.turn for r in responses] == sorted(r.turn for r in responses)
    assert [r.sequence for r in responses] == list(range(1, len(responses) + 1))
    assert text_of(r for r in responses if r.turn == 1).endswith("first message")
    assert "2+2 = 4" in text_of(r for r in responses if r.turn == 2)
    # One conversation for the stream: each turn sees the earlier ones.
    inputs = [d.done.usage.input_tokens for d in dones]
    assert inputs == sorted(inputs) and len(set(inputs)) == 3


async def test_bidi_client_sends_next_message_while_answer_streams(served: Running) -> None:
    call = served.stub.BidirectionalChat()
    await call.write(agent_pb2.ChatRequest(content="one " * 20))
    first = await call.read()
    assert first.WhichOneof("response") == "content"
    await call.write(agent_pb2.ChatRequest(content="two"))
    await call.done_writing()
    rest = await collect(call)
    assert [r.done.stop_reason for r in rest if r.WhichOneof("response") == "done"] == ["end_turn", "end_turn"]
    assert rest[-1].turn == 2


async def test_metadata_session_id_is_honoured(served: Running) -> None:
    request = agent_pb2.ChatRequest(content="hi", metadata={"session_id": "from-metadata"})
    responses = await collect(served.stub.StreamChat(request))
    assert {r.session_id for r in responses} == {"from-metadata"}


async def test_session_header_is_honoured(served: Running) -> None:
    call = served.stub.StreamChat(agent_pb2.ChatRequest(content="hi"), metadata=(("x-session-id", "from-header"),))
    responses = await collect(call)
    assert {r.session_id for r in responses} == {"from-header"}


async def test_calls_without_session_do_not_share_history(served: Running) -> None:
    first = await collect(served.stub.StreamChat(agent_pb2.ChatRequest(content="hello")))
    second = await collect(served.stub.StreamChat(agent_pb2.ChatRequest(content="hello")))
    assert first[-1].done.usage.input_tokens == second[-1].done.usage.input_tokens


async def test_concurrent_streams_interleave(tmp_path) -> None:
    """Twenty slow streams run at once: none waits for another (the seed's pool of 10 would)."""
    from tests.support.servers import make_settings, running_server

    # 100 words at 20 ms: each stream lasts 2 s, far longer than starting twenty of them, even on a busy machine.
    async with running_server(make_settings(tmp_path, demo_token_delay_ms=20, demo_reply_words=100)) as served:
        calls = [served.stub.StreamChat(agent_pb2.ChatRequest(content=f"stream {i}")) for i in range(20)]
        firsts = await asyncio.gather(*(call.read() for call in calls))
        # Every stream delivered its first word before any stream finished.
        assert all(r.WhichOneof("response") == "content" for r in firsts)
        assert served.server.admission.in_flight == 20
        rests = await asyncio.gather(*(collect(call) for call in calls))
        assert all(rest[-1].WhichOneof("response") == "done" for rest in rests)


async def test_answer_cut_at_max_tokens_ends_normally(tmp_path) -> None:
    from tests.support.servers import make_settings, running_server

    async with running_server(make_settings(tmp_path, max_tokens=5, demo_reply_words=50)) as served:
        request = agent_pb2.ChatRequest(content="tell me everything", session_id="short")
        responses = await collect(served.stub.StreamChat(request))
        assert responses[-1].done.stop_reason == "max_tokens"
        assert len(text_of(responses).split()) == 5
        again = await collect(served.stub.StreamChat(agent_pb2.ChatRequest(content="go on", session_id="short")))
        assert again[-1].done.stop_reason == "max_tokens"


async def test_waiting_text_is_coalesced_and_nothing_is_lost(tmp_path) -> None:
    """A model faster than the stream: deltas already queued leave together; the text is intact."""
    from tests.support.servers import make_settings, running_server

    prompt = "many words " * 200
    for coalesce in (True, False):
        settings = make_settings(tmp_path / str(coalesce), coalesce_text=coalesce)
        async with running_server(settings) as served:
            responses = await collect(served.stub.StreamChat(agent_pb2.ChatRequest(content=prompt)))
        assert text_of(responses) == "This is the demo model answering: " + prompt.strip()
        content_events = kinds(responses).count("content")
        words = len(text_of(responses).split())
        if coalesce:
            assert content_events < words
        else:
            assert content_events == words
