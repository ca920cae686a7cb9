"""Runs that outlive a connection: run ids, ResumeStream from any replica, disconnect and busy policies,
heartbeats; on both stores (files, and Debian's redis-server on an ephemeral port)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog

from agent_service.core.run_log import RunLogWriter, RunRecord
from agent_service.proto import agent_pb2
from agent_service.store.file_runs import FileRunLog
from tests.support.doubles import SilentThenSpeakingModel
from tests.support.fake_provider import StreamingProvider, streaming_provider
from tests.support.servers import collect, kinds, make_settings, read_until_error, running_server
from tests.support.tokens import AUDIENCE, ISSUER, Issuer


@pytest.fixture
def slow_provider() -> Iterator[StreamingProvider]:
    with streaming_provider(words=60, delay_s=0.02) as provider:  # answers of about 1.2 s
        yield provider


def settings_for(tmp_path: Path, store: str, provider: StreamingProvider, **overrides: Any) -> Any:
    values = {"session_store": store, "model_provider": "openai", "openai_base_url": provider.url,
              "openai_api_key": "unused"}  # fmt: skip
    return make_settings(tmp_path / "data", **{**values, **overrides})


def request(content: str, session_id: str = "conv", **fields: Any) -> agent_pb2.ChatRequest:
    return agent_pb2.ChatRequest(content=content, session_id=session_id, **fields)


async def read_some(call: Any, words: int) -> list[agent_pb2.ChatResponse]:
    responses: list[agent_pb2.ChatResponse] = []
    while sum(len(r.content.text.split()) for r in responses) < words:
        responses.append(await call.read())
    return responses


def contiguous(responses: list[agent_pb2.ChatResponse]) -> bool:
    sequences = [r.sequence for r in responses if r.WhichOneof("response") != "heartbeat"]
    return all(b == a + 1 for a, b in itertools.pairwise(sequences))


async def test_every_event_names_its_run_and_the_run_id_comes_before_the_first_token(
    store_url: str, tmp_path: Path, slow_provider: StreamingProvider
) -> None:
    async with running_server(settings_for(tmp_path, store_url, slow_provider)) as server:
        call = server.stub.StreamChat(request("hello"))
        metadata = dict(await call.initial_metadata())
        responses = await collect(call)
    run_id = metadata["x-run-id"]
    assert run_id and {r.run_id for r in responses} == {run_id}
    assert kinds(responses)[-1] == "done"


async def test_a_dropped_stream_resumes_exactly_once_on_another_replica(
    store_url: str, tmp_path: Path, slow_provider: StreamingProvider
) -> None:
    settings = settings_for(tmp_path, store_url, slow_provider)
    async with running_server(settings) as first, running_server(settings) as second:
        call = first.stub.StreamChat(request("tell me everything", on_disconnect=agent_pb2.CONTINUE))
        seen = await read_some(call, 10)
        call.cancel()  # the connection drops
        run_id, last = seen[-1].run_id, seen[-1].sequence
        rest = await collect(second.stub.ResumeStream(agent_pb2.ResumeRequest(run_id=run_id, after_sequence=last)))
        again = await collect(first.stub.ResumeStream(agent_pb2.ResumeRequest(run_id=run_id, after_sequence=last)))
    events = seen + rest
    assert contiguous(events) and events[0].sequence == 1
    assert kinds(rest)[-1] == "done" and rest[0].sequence == last + 1
    assert [r.SerializeToString() for r in again] == [r.SerializeToString() for r in rest]  # the same, again
    answer = "".join(r.content.text for r in events)
    assert answer.startswith("reply-1 w1 w2") and answer.endswith("w59")
    assert slow_provider.requests  # one model call, not two: resuming never re-runs the answer
    assert len(slow_provider.requests) == 1


async def test_continue_finishes_the_answer_after_the_client_left_and_keeps_it(
    store_url: str, tmp_path: Path, slow_provider: StreamingProvider
) -> None:
    async with running_server(settings_for(tmp_path, store_url, slow_provider)) as server:
        call = server.stub.StreamChat(request("long answer", on_disconnect=agent_pb2.CONTINUE))
        await read_some(call, 3)
        call.cancel()
        await collect(server.stub.StreamChat(request("and then?", if_busy=agent_pb2.ENQUEUE), timeout=30))
    follow_up = slow_provider.histories()[-1]
    assert [role for role, _ in follow_up] == ["user", "assistant", "user"]
    assert follow_up[1][1].endswith("w59")  # the whole first answer, not a cut one


async def test_cancel_still_cancels(store_url: str, tmp_path: Path, slow_provider: StreamingProvider) -> None:
    async with running_server(settings_for(tmp_path, store_url, slow_provider)) as server:
        call = server.stub.StreamChat(request("long answer"))
        seen = await read_some(call, 3)
        call.cancel()
        await collect(server.stub.StreamChat(request("hm?", if_busy=agent_pb2.ENQUEUE), timeout=30))
    partial = slow_provider.histories()[-1][1][1]
    assert partial.endswith("[interrupted: the request was cancelled]")
    assert "w59" not in partial and partial.startswith("".join(r.content.text for r in seen).strip())


async def test_enqueue_answers_both_messages_in_order(
    store_url: str, tmp_path: Path, slow_provider: StreamingProvider
) -> None:
    async with running_server(settings_for(tmp_path, store_url, slow_provider)) as server:
        first = server.stub.StreamChat(request("first"))
        await first.read()
        second = server.stub.StreamChat(request("second", if_busy=agent_pb2.ENQUEUE), timeout=30)
        assert kinds(await collect(first))[-1] == "done"
        assert kinds(await collect(second))[-1] == "done"
    second_history = slow_provider.histories()[-1]
    assert [text for role, text in second_history if role == "user"] == ["first", "second"]
    assert second_history[1][1].endswith("w59")


async def test_enqueue_is_bounded(tmp_path: Path, slow_provider: StreamingProvider) -> None:
    settings = settings_for(tmp_path, "files", slow_provider, max_queued_per_session=1)
    async with running_server(settings) as server:
        first = server.stub.StreamChat(request("first"))
        await first.read()
        waiting = server.stub.StreamChat(request("second", if_busy=agent_pb2.ENQUEUE), timeout=30)
        await asyncio.sleep(0.2)  # the scenario: the second request is in line before the third arrives
        _, error = await read_until_error(server.stub.StreamChat(request("third", if_busy=agent_pb2.ENQUEUE)))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert kinds(await collect(waiting))[-1] == "done"
        await collect(first)


async def test_interrupt_ends_the_running_answer_and_answers_the_new_message(
    store_url: str, tmp_path: Path, slow_provider: StreamingProvider
) -> None:
    settings = settings_for(tmp_path, store_url, slow_provider)
    async with running_server(settings) as first_replica, running_server(settings) as second_replica:
        running = first_replica.stub.StreamChat(request("a long story"))
        seen = await read_some(running, 5)
        interrupting = second_replica.stub.StreamChat(
            request("stop, new topic", if_busy=agent_pb2.INTERRUPT), timeout=30
        )
        ended, error = await read_until_error(running)
        assert error.code() == grpc.StatusCode.ABORTED
        assert kinds(ended)[-1] == "error" and "interrupted by a newer message" in ended[-1].error.message
        assert kinds(await collect(interrupting))[-1] == "done"
    history = slow_provider.histories()[-1]
    assert [text for role, text in history if role == "user"] == ["a long story", "stop, new topic"]
    partial = history[1][1]
    assert partial.startswith("".join(r.content.text for r in seen).strip())
    assert partial.endswith("[interrupted: interrupted by a newer message]")


async def test_an_unknown_or_expired_run_is_not_found(tmp_path: Path, slow_provider: StreamingProvider) -> None:
    settings = settings_for(tmp_path, "files", slow_provider, run_retention_s=0.5)
    async with running_server(settings) as server:
        _, error = await read_until_error(server.stub.ResumeStream(agent_pb2.ResumeRequest(run_id="nope")))
        assert error.code() == grpc.StatusCode.NOT_FOUND
        call = server.stub.StreamChat(request("hi"))
        run_id = (await collect(call))[0].run_id
        assert kinds(await collect(server.stub.ResumeStream(agent_pb2.ResumeRequest(run_id=run_id))))[-1] == "done"
        await asyncio.sleep(1.0)  # the scenario: the retention passes
        _, error = await read_until_error(server.stub.ResumeStream(agent_pb2.ResumeRequest(run_id=run_id)))
        assert error.code() == grpc.StatusCode.NOT_FOUND


async def test_another_principal_cannot_resume_a_run(tmp_path: Path, slow_provider: StreamingProvider) -> None:
    issuer = Issuer()
    jwks = issuer.write_jwks(tmp_path / "jwks.json")
    settings = settings_for(tmp_path, "files", slow_provider, auth=True, jwks_file=jwks, jwt_issuer=ISSUER,
                            jwt_audiences=AUDIENCE)  # fmt: skip
    alice = (("authorization", f"Bearer {issuer.token(sub='alice')}"),)
    mallory = (("authorization", f"Bearer {issuer.token(sub='mallory')}"),)
    async with running_server(settings) as server:
        responses = await collect(server.stub.StreamChat(request("secret"), metadata=alice))
        resume = agent_pb2.ResumeRequest(run_id=responses[0].run_id)
        _, error = await read_until_error(server.stub.ResumeStream(resume, metadata=mallory))
        assert error.code() == grpc.StatusCode.NOT_FOUND
        mine = await collect(server.stub.ResumeStream(resume, metadata=alice))
        assert [r.SerializeToString() for r in mine] == [r.SerializeToString() for r in responses]


async def test_a_silent_run_sends_heartbeats_live_and_when_resumed(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, heartbeat_s=0.3, demo_token_delay_ms=0)
    async with running_server(settings, model=SilentThenSpeakingModel(silence_s=1.5)) as server:
        live = await collect(server.stub.StreamChat(request("think hard")))
        beats = [r for r in live if r.WhichOneof("response") == "heartbeat"]
        assert len(beats) >= 3
        assert all(b.heartbeat.sequence == b.sequence for b in beats)
        assert kinds(live)[-1] == "done" and contiguous(live)
        slow = server.stub.StreamChat(request("think again", on_disconnect=agent_pb2.CONTINUE))
        first = await slow.initial_metadata()
        slow.cancel()
        resumed = await collect(server.stub.ResumeStream(agent_pb2.ResumeRequest(run_id=dict(first)["x-run-id"])))
        assert "heartbeat" in kinds(resumed) and kinds(resumed)[-1] == "done"


class SlowToStart:
    """A run log whose `start` waits for `gate`: a store slower than the client who saw the run's id."""

    def __init__(self, inner: FileRunLog) -> None:
        self.inner = inner
        self.gate = asyncio.Event()

    async def start(self, run_id: str, owner: str, ttl_s: float) -> None:
        await self.gate.wait()
        await self.inner.start(run_id, owner, ttl_s)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_a_run_is_known_to_its_writer_before_the_store_has_it(tmp_path: Path) -> None:
    log = SlowToStart(FileRunLog(tmp_path))
    writer = RunLogWriter(log, ttl_s=60, retention_s=60, logger=structlog.get_logger())
    record = RunRecord("r1", "alice")
    writer.open(record)
    await asyncio.sleep(0.05)
    assert await log.inner.owner("r1") is None  # not written yet: a resume asks the writer first
    assert writer.owner("r1") == "alice"
    writer.close(record)
    log.gate.set()
    await writer.aclose(timeout_s=5)
    assert writer.owner("r1") is None  # ended and written: the store answers from now on
    assert await log.inner.owner("r1") == "alice"
    await log.inner.aclose()


async def test_bidi_turns_are_runs_too(tmp_path: Path) -> None:
    async with running_server(make_settings(tmp_path)) as server:

        async def two() -> AsyncIterator[agent_pb2.ChatRequest]:
            yield request("one", session_id="")
            yield request("two", session_id="")

        responses = await collect(server.stub.BidirectionalChat(two()))
        runs = {r.turn: r.run_id for r in responses}
        assert len(set(runs.values())) == 2 and contiguous(responses)
        replay = await collect(server.stub.ResumeStream(agent_pb2.ResumeRequest(run_id=runs[2])))
        assert [r.SerializeToString() for r in replay] == [r.SerializeToString() for r in responses if r.turn == 2]
