"""Unit tests of agentctl's pure parts: output formatting, descriptors and argument parsing (no network)."""

from __future__ import annotations

import io
import json

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2

from agent_service.cli import agentctl
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
    assert agentctl.format_event(_content("Hel")) == ("Hel", "")
    assert agentctl.format_event(_content("lo"), at_line_start=False) == ("lo", "")


def test_tool_use_starts_its_own_line() -> None:
    line = '[tool] calculator {"expression": "2+2"}\n'
    assert agentctl.format_event(_tool_use(), at_line_start=False) == ("\n" + line, "")
    assert agentctl.format_event(_tool_use(), at_line_start=True) == (line, "")


def test_tool_use_without_input_or_name() -> None:
    resp = agent_pb2.ChatResponse(tool_use=agent_pb2.ToolUse(tool_id="t9"))
    assert agentctl.format_event(resp) == ("[tool] t9\n", "")


def test_tool_result_success_and_error() -> None:
    assert agentctl.format_event(_tool_result()) == ("[result] calculator: 2+2 = 4\n", "")
    assert agentctl.format_event(_tool_result("error", "division by zero"), at_line_start=False) == (
        "\n[result:error] calculator: division by zero\n",
        "",
    )


def test_tool_result_keeps_a_single_trailing_newline() -> None:
    assert agentctl.format_event(_tool_result(output="a\nb\n")) == ("[result] calculator: a\nb\n", "")


def test_error_goes_to_stderr_after_ending_the_answer_line() -> None:
    resp = agent_pb2.ChatResponse(error=agent_pb2.Error(code="UNAVAILABLE", message="model down"))
    assert agentctl.format_event(resp, at_line_start=False) == ("\n", "[error UNAVAILABLE] model down\n")
    assert agentctl.format_event(resp, at_line_start=True) == ("", "[error UNAVAILABLE] model down\n")


def test_done_summary() -> None:
    expected = "[done] stop=end_turn tokens in=12 out=34 events=5 123 ms"
    assert agentctl.format_done(_done().done) == expected
    assert agentctl.format_event(_done(), at_line_start=False) == ("\n", expected + "\n")


def test_unset_oneof_prints_nothing() -> None:
    assert agentctl.format_event(agent_pb2.ChatResponse(event_id="e1")) == ("", "")


def test_format_json_is_one_line_with_proto_names() -> None:
    line = agentctl.format_json(_done())
    assert "\n" not in line
    data = json.loads(line)
    assert data["done"]["stop_reason"] == "end_turn"
    assert data["done"]["usage"]["input_tokens"] == "12"  # proto3 JSON: 64-bit integers are strings
    assert data["turn"] == 1


# --------------------------------------------------------------------------- Renderer


def test_renderer_tracks_line_state_and_errors() -> None:
    out, err = io.StringIO(), io.StringIO()
    renderer = agentctl.Renderer(out, err)
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
    agentctl.Renderer(out, err, color=True).show(_done())
    assert err.getvalue().startswith("\x1b[2m[done]") and err.getvalue().endswith("\x1b[0m\n")


def test_renderer_json_mode() -> None:
    out, err = io.StringIO(), io.StringIO()
    renderer = agentctl.Renderer(out, err, as_json=True)
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
    assert agentctl.status_name(serving) == "SERVING"
    assert agentctl.status_name(not_serving) == "NOT_SERVING"
    assert agentctl.status_name(99) == "UNKNOWN_STATUS(99)"
    assert agentctl.health_exit_code(serving) == 0
    assert agentctl.health_exit_code(not_serving) == 1


def test_rpc_exit_codes_are_distinct_from_generic_and_usage() -> None:
    assert agentctl.rpc_exit_code(grpc.StatusCode.UNAVAILABLE) == 24
    assert agentctl.rpc_exit_code(grpc.StatusCode.CANCELLED) == 11
    assert agentctl.rpc_exit_code(None) == 1


class _FakeRpcError:
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "failed to connect to all addresses"


def test_format_rpc_error() -> None:
    assert agentctl.format_rpc_error(_FakeRpcError()) == "error: UNAVAILABLE: failed to connect to all addresses"


# --------------------------------------------------------------------------- descriptors


def test_describe_service() -> None:
    service = agent_pb2.DESCRIPTOR.services_by_name["AgentService"]
    assert agentctl.describe_service(service) == (
        "service agent.AgentService\n"
        "  rpc StreamChat(agent.ChatRequest) returns (stream agent.ChatResponse)\n"
        "  rpc BidirectionalChat(stream agent.ChatRequest) returns (stream agent.ChatResponse)"
    )


def test_describe_message_fields() -> None:
    assert agentctl.describe_message(agent_pb2.ChatRequest.DESCRIPTOR) == (
        "message agent.ChatRequest\n  content = 1 string\n  metadata = 2 map<string, string>\n  session_id = 3 string"
    )
    described = agentctl.describe_message(agent_pb2.ChatResponse.DESCRIPTOR)
    assert "  done = 6 agent.Done (oneof response)" in described
    assert "  sequence = 7 uint64\n" in described


def _file_proto(descriptor: object) -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    descriptor.CopyToProto(proto)  # type: ignore[attr-defined]
    return proto


def test_pool_from_reflected_files_with_a_dependency() -> None:
    agent = _file_proto(agent_pb2.DESCRIPTOR)
    extra = descriptor_pb2.FileDescriptorProto(name="extra.proto", package="extra", dependency=[agent.name])
    extra.message_type.add(name="Wrapper").field.add(
        name="requests",
        number=1,
        label=descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
        type_name=".agent.ChatRequest",
    )
    files = {extra.name: extra}
    assert agentctl.missing_dependencies(files) == [agent.name]
    files[agent.name] = agent
    # agent.proto imports google/api/annotations.proto (and what that imports), as reflection would send.
    pending = list(agent_pb2.DESCRIPTOR.dependencies)
    while pending:
        dependency = pending.pop()
        files[dependency.name] = _file_proto(dependency)
        pending.extend(dependency.dependencies)
    assert agentctl.missing_dependencies(files) == []
    pool = agentctl.build_pool(files)  # extra.proto first: its import must still be added before it
    assert (
        agentctl.describe_symbol(pool, "extra.Wrapper")
        == "message extra.Wrapper\n  requests = 1 repeated agent.ChatRequest"
    )
    assert agentctl.describe_symbol(pool, "agent.AgentService").startswith("service agent.AgentService\n")
    assert agentctl.describe_symbol(pool, "agent.AgentService.StreamChat") == (
        "rpc StreamChat(agent.ChatRequest) returns (stream agent.ChatResponse)"
    )
    with pytest.raises(KeyError):
        agentctl.describe_symbol(pool, "agent.Nope")


def test_build_pool_reports_a_missing_import() -> None:
    lone = descriptor_pb2.FileDescriptorProto(name="lone.proto", dependency=["gone.proto"])
    with pytest.raises(agentctl.CliError, match=r"gone\.proto"):
        agentctl.build_pool({lone.name: lone})


# --------------------------------------------------------------------------- arguments


def test_defaults() -> None:
    args = agentctl.parse_args(["health"], environ={})
    assert args.target == "localhost:50051"
    assert args.tls is False and args.ca is None
    assert args.service == ""
    assert agentctl.effective_timeout(args) == 5.0


def test_target_from_environment_and_flag() -> None:
    assert agentctl.parse_args(["list"], environ={"AGENTCTL_TARGET": "agent:9000"}).target == "agent:9000"
    args = agentctl.parse_args(["--target", "h:1", "list"], environ={"AGENTCTL_TARGET": "agent:9000"})
    assert args.target == "h:1"


def test_chat_options() -> None:
    args = agentctl.parse_args(
        ["--timeout", "30", "chat", "--session", "s-1", "-m", "a=1", "--metadata", "b=x=y", "--json", "hello"],
        environ={},
    )
    assert (args.command, args.prompt, args.session, args.json) == ("chat", "hello", "s-1", True)
    assert args.metadata == [("a", "1"), ("b", "x=y")]
    assert agentctl.effective_timeout(args) == 30.0
    request = agentctl.build_request(args.prompt, args.session, args.metadata)
    assert request.content == "hello" and request.session_id == "s-1"
    assert dict(request.metadata) == {"a": "1", "b": "x=y"}


def test_chat_without_prompt_has_no_deadline() -> None:
    args = agentctl.parse_args(["chat"], environ={})
    assert args.prompt is None and args.metadata == [] and args.session == ""
    assert agentctl.effective_timeout(args) is None


def test_health_watch_has_no_default_deadline() -> None:
    args = agentctl.parse_args(["health", "--watch", "agent.AgentService"], environ={})
    assert args.watch and args.service == "agent.AgentService"
    assert agentctl.effective_timeout(args) is None


def test_describe_default_symbol() -> None:
    assert agentctl.parse_args(["describe"], environ={}).symbol == "agent.AgentService"
    assert agentctl.parse_args(["describe", "agent.Done"], environ={}).symbol == "agent.Done"


def test_tls_options() -> None:
    args = agentctl.parse_args(["--tls", "--ca", "ca.pem", "list"], environ={})
    assert args.tls and args.ca == "ca.pem"
    assert agentctl.parse_args(["--plaintext", "list"], environ={}).tls is False


@pytest.mark.parametrize(
    "argv",
    [
        [],  # no command
        ["--ca", "ca.pem", "list"],  # --ca without --tls
        ["--tls", "--plaintext", "list"],
        ["--timeout", "0", "health"],
        ["--timeout", "soon", "health"],
        ["chat", "-m", "novalue", "hi"],
        ["chat", "-m", "=v", "hi"],
        ["bogus"],
    ],
)
def test_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        agentctl.parse_args(argv, environ={})
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_main_returns_usage_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    assert agentctl.main(["bogus"]) == 2
    assert agentctl.main(["--help"]) == 0
    assert "chat" in capsys.readouterr().out


def test_messages_after_a_prompt_start_on_a_new_line() -> None:
    out, err = io.StringIO(), io.StringIO()
    renderer = agentctl.Renderer(out, err)
    renderer.prompt("you> ")
    renderer.error("error: DEADLINE_EXCEEDED: Deadline Exceeded")
    assert err.getvalue() == "you> \nerror: DEADLINE_EXCEEDED: Deadline Exceeded\n"
    renderer.prompt("you> ")
    renderer.prompt_answered()  # Enter: the terminal already echoed the newline
    renderer.show(_content("partial"))
    renderer.error("error: UNAVAILABLE")
    assert out.getvalue() == "partial\n"
    assert err.getvalue().endswith("you> error: UNAVAILABLE\n")
