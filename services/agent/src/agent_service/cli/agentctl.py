"""agentctl: a small command-line client for ``agent.AgentService``.

It exists so that a running server can be poked at without writing code or
installing grpcurl: chat with it, check its health, and see what it serves.

Commands (global options go before the command)::

    agentctl [--target HOST:PORT] [--timeout SECONDS] [--plaintext | --tls [--ca FILE]] COMMAND
    agentctl chat [--session ID] [-m KEY=VALUE]... [--json] ["prompt"]
    agentctl health [--watch] [SERVICE]
    agentctl list
    agentctl describe [SYMBOL]

``--target`` defaults to ``$AGENTCTL_TARGET``, else ``localhost:50051``. ``chat``
with a prompt makes one StreamChat call; without one it opens a
BidirectionalChat session fed by the lines of stdin (``/quit`` or EOF ends it).
Answers go to stdout, tool calls and results are marked on their own lines,
and in-band errors and the per-answer ``[done]`` summary go to stderr, so that
stdout is just the answer text.

Exit codes:

* 0: success (for ``health``: the service is SERVING).
* 1: the call worked but the outcome is a failure: an in-band ``error`` event
  in a chat, a health status other than SERVING, an unknown ``describe``
  symbol, an unreadable ``--ca`` file.
* 2: bad command line (argparse).
* 10 + the gRPC status code number when an RPC fails (or reflection answers
  with an error), e.g. 14 (DEADLINE_EXCEEDED = 4), 15 (NOT_FOUND = 5),
  24 (UNAVAILABLE = 14). The offset keeps every status distinct from 1 and 2,
  which ``1 + code`` would not (CANCELLED = 1 would give argparse's 2).
* 130: interrupted with Ctrl-C (the call is cancelled, no traceback).
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import json
import os
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any, TextIO

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, json_format
from google.protobuf.descriptor import FieldDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from agent_service.proto import agent_pb2, agent_pb2_grpc

TARGET_ENV = "AGENTCTL_TARGET"
DEFAULT_TARGET = "localhost:50051"
# Unary-ish commands should fail fast against a dead server; chat answers can take long.
DEFAULT_TIMEOUT = 5.0
DEFAULT_SYMBOL = "agent.AgentService"
RPC_EXIT_BASE = 10
EXIT_INTERRUPTED = 130
_STDIN_FD = 0

_DIM = "\x1b[2m"
_RESET = "\x1b[0m"

_STATUS_BY_NUMBER: dict[int, Any] = {code.value[0]: code for code in grpc.StatusCode}

_SCALAR_TYPES: dict[int, str] = {
    FieldDescriptor.TYPE_DOUBLE: "double",
    FieldDescriptor.TYPE_FLOAT: "float",
    FieldDescriptor.TYPE_INT64: "int64",
    FieldDescriptor.TYPE_UINT64: "uint64",
    FieldDescriptor.TYPE_INT32: "int32",
    FieldDescriptor.TYPE_FIXED64: "fixed64",
    FieldDescriptor.TYPE_FIXED32: "fixed32",
    FieldDescriptor.TYPE_BOOL: "bool",
    FieldDescriptor.TYPE_STRING: "string",
    FieldDescriptor.TYPE_BYTES: "bytes",
    FieldDescriptor.TYPE_UINT32: "uint32",
    FieldDescriptor.TYPE_SFIXED32: "sfixed32",
    FieldDescriptor.TYPE_SFIXED64: "sfixed64",
    FieldDescriptor.TYPE_SINT32: "sint32",
    FieldDescriptor.TYPE_SINT64: "sint64",
}


class CliError(Exception):
    """A failure to report as ``error: MESSAGE`` with a given exit code, without a traceback."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# --------------------------------------------------------------------------- arguments


def _positive_float(text: str) -> float:
    """Parse ``--timeout``: a zero or negative deadline would fail every call, so refuse it up front."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
    return value


def parse_metadata_item(text: str) -> tuple[str, str]:
    """Parse one ``-m KEY=VALUE``; the value may itself contain ``=``."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """Build the parser; ``environ`` is injectable so the ``AGENTCTL_TARGET`` default can be tested."""
    env = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(prog="agentctl", description="Command-line client for agent.AgentService.")
    parser.add_argument(
        "--target",
        default=env.get(TARGET_ENV) or DEFAULT_TARGET,
        metavar="HOST:PORT",
        help=f"server address (default: ${TARGET_ENV}, else {DEFAULT_TARGET})",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        metavar="SECONDS",
        help=f"call deadline (default: none for chat and health --watch, {DEFAULT_TIMEOUT:g} s otherwise)",
    )
    security = parser.add_mutually_exclusive_group()
    security.add_argument("--plaintext", dest="tls", action="store_false", default=False, help="no TLS (default)")
    security.add_argument("--tls", dest="tls", action="store_true", default=False, help="use TLS")
    parser.add_argument("--ca", metavar="FILE", help="PEM root certificates for --tls (default: the system's)")

    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    chat = commands.add_parser("chat", help="chat with the agent (interactive from stdin without a prompt)")
    chat.add_argument("prompt", nargs="?", help="one message for StreamChat; omit for a BidirectionalChat session")
    chat.add_argument("--session", metavar="ID", default="", help="session to continue (request.session_id)")
    chat.add_argument(
        "-m",
        "--metadata",
        type=parse_metadata_item,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="request metadata entry (repeatable)",
    )
    chat.add_argument("--json", action="store_true", help="print each response as one JSON line")

    health = commands.add_parser("health", help="grpc.health.v1 check (exit 0 only when SERVING)")
    health.add_argument("service", nargs="?", default="", help='service name (default: "", the whole server)')
    health.add_argument("--watch", action="store_true", help="stream status changes until interrupted")

    commands.add_parser("list", help="list services through server reflection")

    describe = commands.add_parser("describe", help="describe a service, method, message or enum via reflection")
    describe.add_argument("symbol", nargs="?", default=DEFAULT_SYMBOL, help=f"(default: {DEFAULT_SYMBOL})")
    return parser


def parse_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> argparse.Namespace:
    """Parse and cross-check options that argparse cannot relate by itself."""
    parser = build_parser(environ)
    args = parser.parse_args(argv)
    if args.ca is not None and not args.tls:
        parser.error("--ca requires --tls")
    return args


def effective_timeout(args: argparse.Namespace) -> float | None:
    """The deadline to use: the explicit one, else none for open-ended streams, else the fast-fail default."""
    if args.timeout is not None:
        return float(args.timeout)
    if args.command == "chat" or (args.command == "health" and args.watch):
        return None
    return DEFAULT_TIMEOUT


def build_request(content: str, session_id: str = "", metadata: Sequence[tuple[str, str]] = ()) -> Any:
    """Build a ChatRequest; later ``-m`` entries win over earlier ones with the same key."""
    return agent_pb2.ChatRequest(content=content, session_id=session_id, metadata=dict(metadata))


# --------------------------------------------------------------------------- formatting (pure)


def format_done(done: Any) -> str:
    """The one-line summary of an answer, shown on stderr so it never mixes into the answer text."""
    usage = done.usage
    return (
        f"[done] stop={done.stop_reason or '-'} tokens in={usage.input_tokens} out={usage.output_tokens}"
        f" events={done.event_count} {done.duration_ms:.0f} ms"
    )


def format_event(resp: Any, *, at_line_start: bool = True) -> tuple[str, str]:
    """Render one ChatResponse as ``(stdout text, stderr text)``.

    ``at_line_start`` says whether stdout currently ends with a newline: tool
    lines, errors and summaries must start on a line of their own, but a
    blank line is not wanted when the answer text already ended one.
    """
    newline = "" if at_line_start else "\n"
    kind = resp.WhichOneof("response")
    if kind == "content":
        return resp.content.text, ""
    if kind == "tool_use":
        use = resp.tool_use
        name = use.tool_name or use.tool_id or "?"
        line = f"[tool] {name} {use.input}" if use.input else f"[tool] {name}"
        return f"{newline}{line}\n", ""
    if kind == "tool_result":
        result = resp.tool_result
        name = result.tool_name or result.tool_id or "?"
        mark = "[result]" if result.status in ("", "success") else "[result:error]"
        output = result.output if result.output.endswith("\n") else result.output + "\n"
        return f"{newline}{mark} {name}: {output}", ""
    if kind == "error":
        return newline, f"[error {resp.error.code or 'UNKNOWN'}] {resp.error.message}\n"
    if kind == "done":
        return newline, format_done(resp.done) + "\n"
    return "", ""  # a oneof member newer than this client: nothing to show


def format_json(resp: Any) -> str:
    """One response as a single JSON line (proto field names, the proto3 JSON mapping otherwise)."""
    return json.dumps(json_format.MessageToDict(resp, preserving_proto_field_name=True), ensure_ascii=False)


def status_name(status: int) -> str:
    """Name of a grpc.health.v1 serving status, tolerating values newer than this client."""
    try:
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(status))
    except ValueError:
        return f"UNKNOWN_STATUS({status})"


def health_exit_code(status: int) -> int:
    """0 only for SERVING, so ``agentctl health && ...`` gates on real readiness."""
    return 0 if status == health_pb2.HealthCheckResponse.SERVING else 1


def rpc_exit_code(code: Any) -> int:
    """Exit code for a failed RPC (see the module docstring)."""
    try:
        return RPC_EXIT_BASE + int(code.value[0])
    except (AttributeError, IndexError, TypeError, ValueError):
        return 1


def format_rpc_error(err: Any) -> str:
    """``error: STATUS_NAME: details`` for a grpc.aio.AioRpcError."""
    code = err.code()
    name = getattr(code, "name", str(code))
    details = err.details()
    return f"error: {name}: {details}" if details else f"error: {name}"


def field_type(field: Any) -> str:
    """A field's type as written in a .proto file (``repeated agent.X``, ``map<string, string>``, ...)."""
    message = field.message_type
    if message is not None and message.GetOptions().map_entry:
        key, value = message.fields_by_name["key"], message.fields_by_name["value"]
        return f"map<{field_type(key)}, {field_type(value)}>"
    if field.type in (FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_GROUP):
        base = str(message.full_name)
    elif field.type == FieldDescriptor.TYPE_ENUM:
        base = str(field.enum_type.full_name)
    else:
        base = _SCALAR_TYPES.get(field.type, f"type{field.type}")
    return f"repeated {base}" if field.is_repeated else base


def format_method(method: Any) -> str:
    """``rpc Name(stream? Input) returns (stream? Output)``."""
    request = ("stream " if method.client_streaming else "") + method.input_type.full_name
    response = ("stream " if method.server_streaming else "") + method.output_type.full_name
    return f"rpc {method.name}({request}) returns ({response})"


def describe_service(service: Any) -> str:
    """A service and its methods, one per line."""
    lines = [f"service {service.full_name}"]
    lines += [f"  {format_method(method)}" for method in service.methods]
    return "\n".join(lines)


def describe_message(message: Any) -> str:
    """A message and its fields as ``name = number type``, noting real (non-synthetic) oneofs."""
    lines = [f"message {message.full_name}"]
    for field in message.fields:
        line = f"  {field.name} = {field.number} {field_type(field)}"
        oneof = field.containing_oneof
        # proto3 `optional` makes a synthetic one-field oneof named "_<field>": not worth showing.
        if oneof is not None and not (len(oneof.fields) == 1 and oneof.name == f"_{field.name}"):
            line += f" (oneof {oneof.name})"
        lines.append(line)
    return "\n".join(lines)


def describe_enum(enum: Any) -> str:
    """An enum and its values as ``NAME = number``."""
    lines = [f"enum {enum.full_name}"]
    lines += [f"  {value.name} = {value.number}" for value in enum.values]
    return "\n".join(lines)


def missing_dependencies(files: Mapping[str, Any]) -> list[str]:
    """Imported files not fetched yet: reflection servers need not send transitive imports."""
    return sorted({dep for proto in files.values() for dep in proto.dependency if dep not in files})


def build_pool(files: Mapping[str, Any]) -> Any:
    """A fresh DescriptorPool holding ``files`` (FileDescriptorProtos by name), imports added first.

    A fresh pool, not the default one: this module's own agent_pb2 is already
    registered there and the server's version of the file may differ.
    """
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(name: str) -> None:
        if name in added:
            return
        added.add(name)
        proto = files[name]
        for dep in proto.dependency:
            if dep not in files:
                raise CliError(f"the server did not provide {dep!r}, imported by {name!r}")
            add(dep)
        pool.Add(proto)

    for name in files:
        add(name)
    return pool


def describe_symbol(pool: Any, symbol: str) -> str:
    """Describe whatever ``symbol`` names in ``pool``; KeyError when it names nothing describable."""
    finders: list[tuple[Callable[[str], Any], Callable[[Any], str]]] = [
        (pool.FindServiceByName, describe_service),
        (pool.FindMessageTypeByName, describe_message),
        (pool.FindEnumTypeByName, describe_enum),
        (pool.FindMethodByName, format_method),
    ]
    for find, describe in finders:
        try:
            found = find(symbol)
        except KeyError:
            continue
        return describe(found)
    raise KeyError(symbol)


# --------------------------------------------------------------------------- output


class Renderer:
    """Writes chat responses to stdout/stderr, keeping track of the line state and of in-band errors."""

    def __init__(self, out: TextIO, err: TextIO, *, as_json: bool = False, color: bool = False) -> None:
        self.out = out
        self.err = err
        self.as_json = as_json
        self.color = color
        self.at_line_start = True
        self.saw_error = False
        self.prompting = False  # a prompt is on stderr, waiting for the user's line

    def show(self, resp: Any) -> None:
        """Print one response; stdout is flushed first so that both streams interleave correctly."""
        kind = resp.WhichOneof("response")
        if kind == "error":
            self.saw_error = True
        if self.as_json:
            self._write_out(format_json(resp) + "\n")
            return
        text_out, text_err = format_event(resp, at_line_start=self.at_line_start)
        self._write_out(text_out)
        if text_err:
            if kind == "done" and self.color:
                text_err = _DIM + text_err.removesuffix("\n") + _RESET + "\n"
            self.err.write(text_err)
            self.err.flush()

    def line(self, text: str) -> None:
        """Print a whole line on stdout (health, list, describe)."""
        self._write_out(text + "\n")

    def end_line(self) -> None:
        """Terminate a partial answer line, so that a following message on stderr starts on its own line."""
        self._write_out("" if self.at_line_start else "\n")

    def prompt(self, text: str) -> None:
        """Show the interactive prompt (on stderr, keeping stdout for answers only)."""
        self.end_line()
        self.err.write(text)
        self.err.flush()
        self.prompting = True

    def prompt_answered(self, *, eof: bool = False) -> None:
        """The user ended the prompt's line, by Enter (echoed by the terminal) or by Ctrl-D (not echoed)."""
        if self.prompting and eof:
            self.err.write("\n")
            self.err.flush()
        self.prompting = False

    def error(self, message: str) -> None:
        """Print ``message`` on stderr, on a line of its own."""
        self.end_line()
        self.prompt_answered(eof=True)
        self.err.write(message + "\n")
        self.err.flush()

    def _write_out(self, text: str) -> None:
        if not text:
            return
        self.out.write(text)
        self.out.flush()
        self.at_line_start = text.endswith("\n")


# --------------------------------------------------------------------------- commands


class _StdinLines:
    """Lines of stdin, read by a daemon thread and handed to the event loop through a queue.

    A daemon thread rather than ``run_in_executor``: the default executor is
    joined at shutdown, so Ctrl-C at the prompt would hang until the next
    Enter. ``os.read`` rather than ``sys.stdin``: a daemon thread blocked
    inside ``sys.stdin`` holds its buffer lock, which interpreter shutdown
    may need. And a thread rather than ``connect_read_pipe``: that would make
    a terminal non-blocking for stdout as well, and refuses regular files.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int = _STDIN_FD) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()
        threading.Thread(target=self._pump, args=(fd,), name="agentctl-stdin", daemon=True).start()

    async def readline(self) -> str | None:
        """The next line without its line ending, or None at EOF."""
        return await self._queue.get()

    def _pump(self, fd: int) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending = ""
        try:
            while chunk := os.read(fd, 65536):
                pending += decoder.decode(chunk)
                *lines, pending = pending.split("\n")
                for line in lines:
                    self._emit(line.removesuffix("\r"))
            pending += decoder.decode(b"", final=True)
            if pending:
                self._emit(pending.removesuffix("\r"))
        except OSError:
            pass  # a closed or unreadable stdin is just an empty one
        finally:
            self._emit(None)

    def _emit(self, line: str | None) -> None:
        with suppress(RuntimeError):  # the loop is closed: nobody is listening any more
            self._loop.call_soon_threadsafe(self._queue.put_nowait, line)


class _Turns:
    """Counts sent requests and finished answers, so the interactive prompt waits for the answer."""

    def __init__(self) -> None:
        self.sent = 0
        self.answered = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def send(self) -> None:
        self.sent += 1
        self.idle.clear()

    def finish(self, turn: int) -> None:
        # `turn` numbers requests from 1; a server that leaves it unset finishes the latest one.
        self.answered = max(self.answered, turn or self.sent)
        if self.answered >= self.sent:
            self.idle.set()


def _session_header(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    """`x-session-id` call metadata, so a load balancer (Envoy) can keep the session on one replica."""
    return (("x-session-id", args.session),) if args.session else ()


def _agent_stub(channel: Any) -> Any:
    """The AgentService stub; the generated grpc module has no type annotations."""
    return agent_pb2_grpc.AgentServiceStub(channel)  # type: ignore[no-untyped-call, unused-ignore]


async def _chat_once(channel: Any, args: argparse.Namespace, out: Renderer) -> int:
    """One StreamChat call: the answer to ``args.prompt``."""
    stub = _agent_stub(channel)
    request = build_request(args.prompt, args.session, args.metadata)
    call = stub.StreamChat(request, timeout=effective_timeout(args), metadata=_session_header(args))
    try:
        async for resp in call:
            out.show(resp)
    except asyncio.CancelledError:
        call.cancel()
        raise
    out.end_line()
    return 1 if out.saw_error else 0


async def _chat_session(channel: Any, args: argparse.Namespace, out: Renderer) -> int:
    """A BidirectionalChat session fed by stdin, one request per non-empty line."""
    interactive = os.isatty(_STDIN_FD)
    lines = _StdinLines(asyncio.get_running_loop())
    turns = _Turns()
    stub = _agent_stub(channel)
    call = stub.BidirectionalChat(timeout=effective_timeout(args), metadata=_session_header(args))

    async def send_lines() -> None:
        try:
            while True:
                if interactive:
                    await turns.idle.wait()
                    out.prompt("you> ")
                line = await lines.readline()
                out.prompt_answered(eof=line is None)
                if line is None or line.strip() == "/quit":
                    break
                if not line.strip():
                    continue  # the server rejects empty content; just ask again
                turns.send()
                await call.write(build_request(line, args.session, args.metadata))
            await call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            return  # the call is over; reading its responses reports why

    sender = asyncio.create_task(send_lines())
    try:
        async for resp in call:
            out.show(resp)
            if resp.WhichOneof("response") in ("done", "error"):
                turns.finish(resp.turn)
    except asyncio.CancelledError:
        call.cancel()
        raise
    finally:
        sender.cancel()  # still waiting for input if the server ended the call first
        with suppress(asyncio.CancelledError):
            await sender
    out.end_line()
    return 1 if out.saw_error else 0


async def _health(channel: Any, args: argparse.Namespace, out: Renderer) -> int:
    """Check (or Watch) the grpc.health.v1 status of ``args.service``."""
    stub = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest(service=args.service)
    timeout = effective_timeout(args)
    if not args.watch:
        resp = await stub.Check(request, timeout=timeout)
        out.line(status_name(resp.status))
        return health_exit_code(resp.status)
    status = health_pb2.HealthCheckResponse.UNKNOWN
    call = stub.Watch(request, timeout=timeout)
    try:
        async for resp in call:
            status = resp.status
            out.line(status_name(status))
    except asyncio.CancelledError:
        call.cancel()
        raise
    return health_exit_code(status)


class _Reflection:
    """Sequential request/response exchanges on one ServerReflectionInfo stream (one deadline for all)."""

    def __init__(self, channel: Any, timeout: float | None) -> None:
        self._call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(timeout=timeout)

    async def ask(self, request: Any) -> Any:
        """Send one request, return its response; reflection errors become CliError."""
        await self._call.write(request)
        resp = await self._call.read()
        if resp is grpc.aio.EOF:
            raise CliError("the server ended the reflection stream early")
        if resp.HasField("error_response"):
            code = _STATUS_BY_NUMBER.get(resp.error_response.error_code)
            name = code.name if code is not None else str(resp.error_response.error_code)
            raise CliError(f"{name}: {resp.error_response.error_message}", rpc_exit_code(code))
        return resp

    async def close(self) -> None:
        """Half-close and wait for the server to end the call cleanly."""
        with suppress(asyncio.InvalidStateError):
            await self._call.done_writing()
        await self._call.code()


async def _list(channel: Any, args: argparse.Namespace, out: Renderer) -> int:
    """Print the services the server registered for reflection, sorted."""
    reflection = _Reflection(channel, effective_timeout(args))
    resp = await reflection.ask(reflection_pb2.ServerReflectionRequest(list_services=""))
    await reflection.close()
    for name in sorted(service.name for service in resp.list_services_response.service):
        out.line(name)
    return 0


async def _describe(channel: Any, args: argparse.Namespace, out: Renderer) -> int:
    """Fetch the file defining ``args.symbol`` (and its imports) and describe the symbol."""
    reflection = _Reflection(channel, effective_timeout(args))
    files: dict[str, Any] = {}

    def collect(resp: Any) -> None:
        for blob in resp.file_descriptor_response.file_descriptor_proto:
            proto = descriptor_pb2.FileDescriptorProto.FromString(blob)
            files.setdefault(proto.name, proto)

    try:
        collect(await reflection.ask(reflection_pb2.ServerReflectionRequest(file_containing_symbol=args.symbol)))
    except CliError as not_found:
        # Some servers (grpcio-reflection among them) do not resolve method names: ask for the service.
        parent = args.symbol.rpartition(".")[0]
        if not parent:
            raise
        try:
            collect(await reflection.ask(reflection_pb2.ServerReflectionRequest(file_containing_symbol=parent)))
        except CliError:
            raise not_found from None
    while missing := missing_dependencies(files):
        for name in missing:
            collect(await reflection.ask(reflection_pb2.ServerReflectionRequest(file_by_filename=name)))
            if name not in files:
                raise CliError(f"the server did not provide {name!r}")
    await reflection.close()
    try:
        out.line(describe_symbol(build_pool(files), args.symbol))
    except KeyError:
        raise CliError(f"{args.symbol!r} is not a service, method, message or enum") from None
    return 0


_COMMANDS: dict[str, Callable[[Any, argparse.Namespace, Renderer], Any]] = {
    "health": _health,
    "list": _list,
    "describe": _describe,
}


def _channel(args: argparse.Namespace) -> Any:
    """Open the channel the global options ask for."""
    if not args.tls:
        return grpc.aio.insecure_channel(args.target)
    root = None
    if args.ca is not None:
        try:
            root = Path(args.ca).read_bytes()
        except OSError as exc:
            raise CliError(f"cannot read --ca file: {exc}") from None
    return grpc.aio.secure_channel(args.target, grpc.ssl_channel_credentials(root_certificates=root))


async def _run(args: argparse.Namespace, out: Renderer) -> int:
    """Run the chosen command, turning RPC failures into an ``error:`` line and an exit code."""
    try:
        async with _channel(args) as channel:
            if args.command == "chat":
                if args.prompt is None:
                    return await _chat_session(channel, args, out)
                return await _chat_once(channel, args, out)
            return int(await _COMMANDS[args.command](channel, args, out))
    except grpc.aio.AioRpcError as err:
        out.error(format_rpc_error(err))
        return rpc_exit_code(err.code())
    except CliError as err:
        out.error(f"error: {err}")
        return err.exit_code


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse ``argv`` and run the command; returns the process exit code."""
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # --help or a usage error: return its code instead of exiting
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    color = sys.stderr.isatty() and "NO_COLOR" not in os.environ
    out = Renderer(sys.stdout, sys.stderr, as_json=args.command == "chat" and args.json, color=color)
    try:
        return asyncio.run(_run(args, out))
    except KeyboardInterrupt:
        # asyncio.run cancelled the main task and closing the channel cancelled the call. Just leave
        # the terminal on a fresh line after its "^C" echo: the exit code says the rest.
        with suppress(OSError, ValueError):
            if out.at_line_start and out.err.isatty():
                out.err.write("\n")
            out.end_line()
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of stdout went away (`agentctl ... | head`): stop quietly, and keep Python's
        # final flush of stdout from failing again at exit.
        with suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
