"""Unit tests of agentctl's pure parts: output formatting, arguments, call metadata, lines (no network)."""

from __future__ import annotations

import io
import json

import grpc
import pytest
from grpc_health.v1 import health_pb2

from agent_service.cli import agentctl, chat, connect, exits, health, lines, render, runs
from agent_service.cli import args as args_module
from agent_service.cli.args import effective_timeout, parse_args
from agent_service.core.requests import resolve_session_id
from agent_service.proto import agent_pb2


def _content(text: str) -> agent_pb2.ChatResponse:
    return agent_pb2.ChatResponse(content=agent_pb2.ContentChunk(text=text))


def _tool_use() -> agent_pb2.ChatResponse:
    return agent_pb2.ChatResponse(
        tool_use=agent_pb2.ToolUse(tool_name="calculator", tool_id="t1", input='{"expression": "2+2"}')
    )


def _tool_result(status: str = "success", output: str = "2+2 = 4") -> agent_pb2.ChatResponse:
    return agent_pb2.ChatResponse(
        tool_result=agent_pb2.ToolResult(tool_id="t1", output=output, status=status, tool_name="calculator")
    )


def _done() -> agent_pb2.ChatResponse:
    return agent_pb2.ChatResponse(
        done=agent_pb2.Done(
            stop_reason="end_turn",
            usage=agent_pb2.Usage(input_tokens=12, output_tokens=34, total_tokens=46),
            event_count=5,
            duration_ms=123.4,
        ),
        sequence=6,
        turn=1,
    )


# --------------------------------------------------------------------------- format_event


def test_content_goes_to_stdout_verbatim() -> None:
    assert render.format_event(_content("Hel")) == ("Hel", "")
    assert render.format_event(_content("lo"), at_line_start=False) == ("lo", "")


def test_tool_use_starts_its_own_line() -> None:
    line = '[tool] calculator {"expression": "2+2"}\n'
    assert render.format_event(_tool_use(), at_line_start=False) == ("\n" + line, "")
    assert render.format_event(_tool_use(), at_line_start=True) == (line, "")


def test_tool_use_without_input_or_name() -> None:
    resp = agent_pb2.ChatResponse(tool_use=agent_pb2.ToolUse(tool_id="t9"))
    assert render.format_event(resp) == ("[tool] t9\n", "")


def test_tool_result_success_and_error() -> None:
    assert render.format_event(_tool_result()) == ("[result] calculator: 2+2 = 4\n", "")
    assert render.format_event(_tool_result("error", "division by zero"), at_line_start=False) == (
        "\n[result:error] calculator: division by zero\n",
        "",
    )


def test_tool_result_keeps_a_single_trailing_newline() -> None:
    assert render.format_event(_tool_result(output="a\nb\n")) == ("[result] calculator: a\nb\n", "")


def test_error_goes_to_stderr_after_ending_the_answer_line() -> None:
    resp = agent_pb2.ChatResponse(error=agent_pb2.Error(code="UNAVAILABLE", message="model down"))
    assert render.format_event(resp, at_line_start=False) == ("\n", "[error UNAVAILABLE] model down\n")
    assert render.format_event(resp, at_line_start=True) == ("", "[error UNAVAILABLE] model down\n")


def test_done_summary() -> None:
    expected = "[done] stop=end_turn tokens in=12 out=34 events=5 123 ms"
    assert render.format_done(_done().done) == expected
    assert render.format_event(_done(), at_line_start=False) == ("\n", expected + "\n")


def test_unset_oneof_prints_nothing() -> None:
    assert render.format_event(agent_pb2.ChatResponse(event_id="e1")) == ("", "")


def test_format_json_is_one_line_with_proto_names() -> None:
    line = render.format_json(_done())
    assert "\n" not in line
    data = json.loads(line)
    assert data["done"]["stop_reason"] == "end_turn"
    assert data["done"]["usage"]["input_tokens"] == "12"  # proto3 JSON: 64-bit integers are strings
    assert data["turn"] == 1


# --------------------------------------------------------------------------- Renderer


def test_renderer_tracks_line_state_and_errors() -> None:
    out, err = io.StringIO(), io.StringIO()
    renderer = render.Renderer(out, err)
    for resp in (_content("Let me compute."), _tool_use(), _tool_result(), _content("It is 4."), _done()):
        renderer.show(resp)
    assert out.getvalue() == (
        'Let me compute.\n[tool] calculator {"expression": "2+2"}\n[result] calculator: 2+2 = 4\nIt is 4.\n'
    )
    assert err.getvalue().startswith("[done] stop=end_turn")
    assert not renderer.saw_error
    renderer.show(agent_pb2.ChatResponse(error=agent_pb2.Error(code="INTERNAL", message="boom")))
    assert renderer.saw_error
    assert err.getvalue().endswith("[error INTERNAL] boom\n")


def test_renderer_dims_the_summary_only_with_color() -> None:
    out, err = io.StringIO(), io.StringIO()
    render.Renderer(out, err, color=True).show(_done())
    assert err.getvalue().startswith("\x1b[2m[done]") and err.getvalue().endswith("\x1b[0m\n")


def test_renderer_json_mode() -> None:
    out, err = io.StringIO(), io.StringIO()
    renderer = render.Renderer(out, err, as_json=True)
    renderer.show(_content("hi"))
    renderer.show(agent_pb2.ChatResponse(error=agent_pb2.Error(code="INTERNAL", message="boom")))
    lines = out.getvalue().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"content": {"text": "hi"}},
        {"error": {"code": "INTERNAL", "message": "boom"}},
    ]
    assert err.getvalue() == ""
    assert renderer.saw_error


# --------------------------------------------------------------------------- status and errors


def test_health_status_names_and_exit_codes() -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    assert health.status_name(serving) == "SERVING"
    assert health.status_name(not_serving) == "NOT_SERVING"
    assert health.status_name(99) == "UNKNOWN_STATUS(99)"
    assert health.health_exit_code(serving) == 0
    assert health.health_exit_code(not_serving) == 1


def test_rpc_exit_codes_are_distinct_from_generic_and_usage() -> None:
    assert exits.rpc_exit_code(grpc.StatusCode.UNAVAILABLE) == 24
    assert exits.rpc_exit_code(grpc.StatusCode.CANCELLED) == 11
    assert exits.rpc_exit_code(None) == 1


class _FakeRpcError:
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "failed to connect to all addresses"


def test_format_rpc_error() -> None:
    assert render.format_rpc_error(_FakeRpcError()) == "error: UNAVAILABLE: failed to connect to all addresses"


# --------------------------------------------------------------------------- arguments


def test_defaults() -> None:
    args = parse_args(["health"], environ={})
    assert args.target == "localhost:50051"
    assert args.tls is False and args.ca is None
    assert args.service == "" and args.token == ""
    assert effective_timeout(args) == 5.0


def test_target_and_token_from_environment_and_flags() -> None:
    env = {"AGENTCTL_TARGET": "agent:9000", "AGENTCTL_TOKEN": "from-env"}
    args = parse_args(["health"], environ=env)
    assert (args.target, args.token) == ("agent:9000", "from-env")
    args = parse_args(["--target", "h:1", "--token", "from-flag", "health"], environ=env)
    assert (args.target, args.token) == ("h:1", "from-flag")


def test_chat_options() -> None:
    args = parse_args(
        ["--timeout", "30", "chat", "--session", "s-1", "-m", "a=1", "--metadata", "b=x=y", "--json", "hello"],
        environ={},
    )
    assert (args.command, args.prompt, args.session, args.json) == ("chat", "hello", "s-1", True)
    assert args.metadata == [("a", "1"), ("b", "x=y")]
    assert effective_timeout(args) == 30.0
    request = chat.build_request(args.prompt, args.session, args.metadata)
    assert request.content == "hello" and request.session_id == "s-1"
    assert dict(request.metadata) == {"a": "1", "b": "x=y"}


def test_chat_without_prompt_has_no_deadline() -> None:
    args = parse_args(["chat"], environ={})
    assert args.prompt is None and args.metadata == [] and args.session == ""
    assert effective_timeout(args) is None


def test_health_watch_has_no_default_deadline() -> None:
    args = parse_args(["health", "--watch", "agent.AgentService"], environ={})
    assert args.watch and args.service == "agent.AgentService"
    assert effective_timeout(args) is None


def test_tls_options() -> None:
    args = parse_args(["--tls", "--ca", "ca.pem", "health"], environ={})
    assert args.tls and args.ca == "ca.pem"
    assert parse_args(["--plaintext", "health"], environ={}).tls is False


@pytest.mark.parametrize(
    "argv",
    [
        [],  # no command
        ["--ca", "ca.pem", "health"],  # --ca without --tls
        ["--tls", "--plaintext", "health"],
        ["--timeout", "0", "health"],
        ["--timeout", "soon", "health"],
        ["--token", "two words", "health"],
        ["chat", "-m", "novalue", "hi"],
        ["chat", "-m", "=v", "hi"],
        ["chat", "--session", "caf\u00e9", "hi"],  # not sendable as the x-session-id header
        ["list"],  # grpcurl's job now
        ["describe"],
        ["bogus"],
    ],
)
def test_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(argv, environ={})
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_a_bad_token_from_the_environment_is_a_usage_error_that_does_not_echo_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(["health"], environ={"AGENTCTL_TOKEN": "secret\nvalue"})
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "AGENTCTL_TOKEN" in err and "secret" not in err


def test_main_returns_usage_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    assert agentctl.main(["bogus"]) == 2
    assert agentctl.main(["--help"]) == 0
    assert "chat" in capsys.readouterr().out


# --------------------------------------------------------------------------- calls and sessions


def test_call_metadata_carries_the_token_and_the_session() -> None:
    assert connect.call_metadata() == ()
    assert connect.call_metadata("t0k", "s-1") == (("authorization", "Bearer t0k"), ("x-session-id", "s-1"))
    args = parse_args(["--token", "t0k", "--timeout", "3", "health"], environ={})
    assert connect.call_options(args) == connect.CallOptions(3.0, (("authorization", "Bearer t0k"),))


def test_new_session_ids_are_fresh_and_valid_for_the_service() -> None:
    first, second = chat.new_session_id(), chat.new_session_id()
    assert first != second
    assert first.startswith("agentctl-") and len(first) == len("agentctl-") + 16
    assert resolve_session_id({"session_id": first}) == first


def test_history_path_follows_xdg() -> None:
    assert lines.history_path({"XDG_STATE_HOME": "/state", "HOME": "/home/u"}).as_posix() == "/state/agentctl/history"
    default = "/home/u/.local/state/agentctl/history"
    assert lines.history_path({"HOME": "/home/u"}).as_posix() == default
    assert lines.history_path({"XDG_STATE_HOME": "relative", "HOME": "/home/u"}).as_posix() == default


def test_clean_text_replaces_undecodable_bytes() -> None:
    assert lines.clean_text("plain é") == "plain é"
    assert "\ufffd" in lines.clean_text(b"bad \xff".decode("utf-8", "surrogateescape"))
    chat.build_request(lines.clean_text("\udcff"))  # protobuf accepts the result


def test_piped_lines() -> None:
    source = lines.PipedLines(io.BytesIO(b"first\r\nsecond \xff\n\nlast"))
    with source:
        assert [source.read() for _ in range(5)] == ["first", "second \ufffd", "", "last", None]
    assert lines.PipedLines(None).read() is None


# --------------------------------------------------------------------------- notes


def test_notes_and_errors_start_on_a_new_line_on_stderr() -> None:
    out, err = io.StringIO(), io.StringIO()
    renderer = render.Renderer(out, err)
    renderer.show(_content("partial"))
    renderer.note("[cancelled]")
    renderer.error("error: UNAVAILABLE")
    assert out.getvalue() == "partial\n"
    assert err.getvalue() == "[cancelled]\nerror: UNAVAILABLE\n"
    colored = render.Renderer(io.StringIO(), err := io.StringIO(), color=True)
    colored.note("[cancelled]")
    colored.error("error: UNAVAILABLE")
    assert err.getvalue() == "\x1b[2m[cancelled]\x1b[0m\nerror: UNAVAILABLE\n"


# --------------------------------------------------------------------------- runs


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_done_summary_ends_with_the_run_id() -> None:
    resp = _done()
    resp.run_id = "0123abcd"
    expected = "[done] stop=end_turn tokens in=12 out=34 events=5 123 ms run=0123abcd"
    assert render.format_event(resp) == ("", expected + "\n")


def test_heartbeats_print_nothing() -> None:
    beat = agent_pb2.ChatResponse(heartbeat=agent_pb2.Heartbeat(sequence=3), sequence=3)
    assert render.format_event(beat) == ("", "")


def test_an_aside_never_changes_stdout_but_gets_its_own_line_on_a_terminal() -> None:
    piped = render.Renderer(out := io.StringIO(), err := io.StringIO())
    piped.show(_content("half an"))
    piped.aside("[connection lost]")
    piped.show(_content(" answer"))
    assert out.getvalue() == "half an answer" and err.getvalue() == "[connection lost]\n"
    screen = render.Renderer(_Tty(), err := _Tty())
    screen.show(_content("half an"))
    screen.aside("[connection lost]")
    assert err.getvalue() == "\n[connection lost]\n"


def test_fail_counts_as_an_error() -> None:
    renderer = render.Renderer(io.StringIO(), err := io.StringIO())
    renderer.fail("[run r ended before its answer was complete]")
    assert renderer.saw_error and err.getvalue() == "[run r ended before its answer was complete]\n"


class _RpcError:
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def test_transport_failures_are_told_from_statuses_the_server_chose() -> None:
    reset = "Stream removed (RST_STREAM (Received RST_STREAM with error code 2))"
    assert runs.is_transport_failure(_RpcError(grpc.StatusCode.UNAVAILABLE, "Socket closed"))
    assert runs.is_transport_failure(_RpcError(grpc.StatusCode.INTERNAL, reset))
    assert not runs.is_transport_failure(_RpcError(grpc.StatusCode.INTERNAL, "internal error"))
    assert not runs.is_transport_failure(_RpcError(grpc.StatusCode.ABORTED, "the session is busy"))
    assert not runs.is_transport_failure(_RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))


def test_backoff_grows_and_stops_at_the_budget_or_the_deadline() -> None:
    backoff = runs.Backoff(100.0, 30.0, None, jitter=lambda: 0.5)
    delays = [backoff.next_delay(100.0) for _ in range(6)]
    assert delays == [0.2, 0.4, 0.8, 1.6, 3.0, 3.0]
    assert backoff.next_delay(129.5) == 0.5  # never past the budget
    assert backoff.next_delay(130.0) is None
    assert runs.Backoff(100.0, 30.0, 101.0, jitter=lambda: 0.5).next_delay(101.0) is None  # the deadline first


def test_resume_references() -> None:
    assert args_module.parse_run_ref("0123abcd") == ("0123abcd", 0)
    assert args_module.parse_run_ref("0123abcd:42") == ("0123abcd", 42)
    assert parse_args(["chat", "--resume", "r-1:7"], environ={}).resume == ("r-1", 7)


def test_policies_default_by_kind_of_chat_and_follow_the_flags() -> None:
    one_shot = chat.policies(parse_args(["chat", "hi"], environ={}), conversation=False)
    assert (one_shot.on_disconnect, one_shot.if_busy) == (agent_pb2.CONTINUE, agent_pb2.REJECT)
    assert one_shot.resumable
    talk = chat.policies(parse_args(["chat"], environ={}), conversation=True)
    assert talk.if_busy == agent_pb2.ENQUEUE
    chosen = chat.policies(
        parse_args(["chat", "--on-disconnect", "cancel", "--if-busy", "interrupt"], environ={}), conversation=True
    )
    assert (chosen.on_disconnect, chosen.if_busy, chosen.resumable) == (agent_pb2.CANCEL, agent_pb2.INTERRUPT, False)
    request = chat.build_request("hi", on_disconnect=chosen.on_disconnect, if_busy=chosen.if_busy)
    assert (request.on_disconnect, request.if_busy) == (agent_pb2.CANCEL, agent_pb2.INTERRUPT)


@pytest.mark.parametrize(
    "argv",
    [
        ["chat", "--resume", "r-1", "hi"],  # a run that exists takes no new prompt
        ["chat", "--resume", "r-1", "--session", "s"],
        ["chat", "--resume", "r-1", "--if-busy", "enqueue"],
        ["chat", "--resume", ":3"],
        ["chat", "--resume", "r-1:x"],
        ["chat", "--resume", "r-1:-1"],
        ["chat", "--if-busy", "maybe", "hi"],
        ["chat", "--on-disconnect", "never", "hi"],
    ],
)
def test_run_option_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(argv, environ={})
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err
