"""`agentctl chat` and runs: the run id, `--resume`, resuming by itself after a dropped connection, and
the busy and disconnect policies. Real agentctl processes against a real server, some through a TCP
proxy that cuts connections the way a broken network path does."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
from pathlib import Path

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent_service.proto import agent_pb2
from tests.support.agentctl import DONE_RUN_ID, ENV, GOES_ON, RUN_TIMEOUT_S, agentctl, demo_answer
from tests.support.doubles import GatedModel, SilentThenSpeakingModel
from tests.support.servers import Running, collect, make_settings, read_until_error, running_server
from tests.support.tcp_proxy import tcp_proxy

# agentctl runs as a process (a terminal, signals, timing): the system tier, one test at a time.
pytestmark = pytest.mark.system

WORDS = 60


def slow_settings(tmp_path: Path, **overrides: object) -> object:
    """Answers of WORDS words, 20 ms apart (about 1.2 s): time enough to cut one in the middle."""
    return make_settings(tmp_path / "data", demo_token_delay_ms=20, demo_reply_words=WORDS, **overrides)


async def test_the_run_id_ends_the_summary_and_resume_shows_the_rest_exactly_once(tmp_path: Path) -> None:
    async with running_server(slow_settings(tmp_path)) as server:
        call = server.stub.StreamChat(agent_pb2.ChatRequest(content="resume me", on_disconnect=agent_pb2.CONTINUE))
        seen = [await call.read() for _ in range(5)]
        call.cancel()  # the client left; the run goes on
        run_id, last = seen[-1].run_id, seen[-1].sequence

        code, whole, err = await agentctl(server.target, "chat", "--resume", run_id)
        assert code == 0, err
        assert whole == demo_answer("resume me", WORDS) + "\n"
        shown = DONE_RUN_ID.search(err)
        assert shown is not None and shown.group(1) == run_id, err

        code, rest, err = await agentctl(server.target, "chat", "--resume", f"{run_id}:{last}")
        assert code == 0, err
        shown_before = "".join(r.content.text for r in seen)
        assert shown_before + rest == whole  # the events after `last`, none again

        code, out, err = await agentctl(server.target, "chat", "--resume", "no-such-run")
        assert code == 10 + grpc.StatusCode.NOT_FOUND.value[0] and out == ""
        assert "NOT_FOUND" in err and "--resume" not in err  # no run to come back to


async def test_a_connection_that_drops_twice_mid_answer_is_resumed_and_the_answer_shown_once(
    tmp_path: Path,
) -> None:
    # 200 words, 20 ms apart (4 s): the resumed stream is still live when the second cut comes (with a
    # short answer, a slow reconnection could find the run over and get the marker and the end in one
    # replayed burst, so the second cut had nothing left to interrupt).
    words = 200
    settings = make_settings(tmp_path / "data", demo_token_delay_ms=20, demo_reply_words=words)
    async with (
        running_server(settings) as server,
        tcp_proxy("127.0.0.1", server.server.port) as proxy,
    ):
        proxy.cut_after(b"lorem", b"amet")  # after the first filler word, then again in the resumed stream
        code, out, err = await agentctl(proxy.target, "chat", "tell me more")
    assert code == 0, err
    assert proxy.cuts == 2 and proxy.connections >= 3
    assert out == demo_answer("tell me more", words) + "\n"
    match = DONE_RUN_ID.search(err)
    assert match is not None, err
    notes = re.findall(r"\[connection lost \((\w+)\); resuming run ([0-9a-f]{32})\]", err)
    # One note per outage: when the second cut comes before the resumed call showed an event (the proxy's
    # abort can drop the chunk it just forwarded), agentctl counts it as the same outage, still retrying.
    assert notes in ([("UNAVAILABLE", match.group(1))], [("UNAVAILABLE", match.group(1))] * 2), err


async def test_with_on_disconnect_cancel_a_dropped_connection_ends_the_answer(tmp_path: Path) -> None:
    async with (
        running_server(slow_settings(tmp_path)) as server,
        tcp_proxy("127.0.0.1", server.server.port) as proxy,
    ):
        proxy.cut_after(b"lorem")
        code, out, err = await agentctl(proxy.target, "chat", "--on-disconnect", "cancel", "tell me more")
    assert code == 10 + grpc.StatusCode.UNAVAILABLE.value[0], err
    assert "resuming" not in err and "--resume" not in err  # the server cancelled the run: nothing to resume
    assert out and demo_answer("tell me more", WORDS).startswith(out.rstrip("\n"))
    assert out.count("lorem") <= 1


async def test_a_deadline_leaves_the_run_going_and_says_how_to_see_the_rest(tmp_path: Path) -> None:
    async with running_server(make_settings(tmp_path, demo_token_delay_ms=20, demo_reply_words=150)) as server:
        code, first, err = await agentctl(server.target, "--timeout", "1", "chat", "a long one")
        assert code == 10 + grpc.StatusCode.DEADLINE_EXCEEDED.value[0], err
        hint = GOES_ON.search(err)
        assert hint is not None, err
        code, rest, err = await agentctl(server.target, "chat", "--resume", hint.group(2))
        assert code == 0, err
    # What the deadline cut and what --resume showed are the answer, each word once.
    assert first.rstrip("\n") + rest == demo_answer("a long one", 150) + "\n"


async def _held(server: Running, session_id: str) -> object:
    """An answer in progress on `session_id`: its first word sent, the rest held until the model's gate opens."""
    call = server.stub.StreamChat(agent_pb2.ChatRequest(content=f"{GatedModel.HOLD} on", session_id=session_id))
    assert (await call.read()).WhichOneof("response") == "content"
    return call


async def _chat_streams_in_flight(server: Running) -> int:
    url = f"http://127.0.0.1:{server.server.metrics_endpoint.port}/metrics"
    async with httpx.AsyncClient() as client:
        text = (await client.get(url)).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "agent_streams_in_flight" and sample.labels.get("method") == "StreamChat":
                return int(sample.value)
    return 0


async def test_a_busy_session_is_refused_waited_for_or_interrupted_as_asked(tmp_path: Path) -> None:
    model = GatedModel()  # the held answers last as long as the test needs, however slowly agentctl starts
    async with running_server(make_settings(tmp_path / "data"), model=model) as server:
        running = await _held(server, "busy-1")
        code, out, err = await agentctl(server.target, "chat", "--session", "busy-1", "second")
        assert code == 10 + grpc.StatusCode.ABORTED.value[0] and out == "", err  # a prompt's default: reject

        waiting = asyncio.ensure_future(
            agentctl(server.target, "chat", "--session", "busy-1", "--if-busy", "enqueue", "second")
        )
        async with asyncio.timeout(RUN_TIMEOUT_S):  # the enqueued call reached the server, the session still busy
            while await _chat_streams_in_flight(server) < 2:
                assert not waiting.done(), waiting.result()
                await asyncio.sleep(0.05)
        model.gate.set()
        assert [r.WhichOneof("response") for r in await collect(running)][-1] == "done"  # it ran to its end first
        code, out, err = await waiting
        assert code == 0, err
        assert out == demo_answer("second") + "\n"

        model.gate.clear()
        running = await _held(server, "busy-1")
        code, out, err = await agentctl(server.target, "chat", "--session", "busy-1", "--if-busy", "interrupt", "third")
        assert code == 0, err
        assert out == demo_answer("third") + "\n"
        ended, error = await read_until_error(running)
        assert error.code() == grpc.StatusCode.ABORTED
        assert "interrupted by a newer message" in ended[-1].error.message


async def test_heartbeats_are_never_shown_live_or_resumed(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, heartbeat_s=0.2)
    async with running_server(settings, model=SilentThenSpeakingModel(silence_s=1.0, token_delay_ms=0)) as server:
        code, out, err = await agentctl(server.target, "chat", "think hard")
        assert code == 0, err
        assert out == demo_answer("think hard") + "\n"
        run = DONE_RUN_ID.search(err)
        assert run is not None, err
        code, out, err = await agentctl(server.target, "chat", "--json", "--resume", run.group(1))
        assert code == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert [e["sequence"] for e in events] == [str(n) for n in range(1, len(events) + 1)]  # each once, in order
    assert not [e for e in events if "heartbeat" in e] and "done" in events[-1]


async def test_ctrl_c_on_a_prompt_says_how_to_see_the_rest_which_is_shown_once(tmp_path: Path) -> None:
    async with running_server(make_settings(tmp_path, demo_token_delay_ms=20, demo_reply_words=150)) as server:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent_service.cli.agentctl", "--target", server.target, "chat", "go on",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=ENV,
        )  # fmt: skip
        assert process.stdout is not None
        try:
            first = await asyncio.wait_for(process.stdout.readuntil(b"lorem"), timeout=30)
            process.send_signal(signal.SIGINT)  # what Ctrl-C sends
            rest_of_stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        assert process.returncode == 130, stderr
        hint = GOES_ON.search(stderr.decode())
        assert hint is not None, stderr
        code, rest, err = await agentctl(server.target, "chat", "--resume", hint.group(2))
        assert code == 0, err
    shown = (first + rest_of_stdout).decode()
    assert shown.rstrip("\n") + rest == demo_answer("go on", 150) + "\n"
