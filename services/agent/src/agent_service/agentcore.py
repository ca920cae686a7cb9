"""The AgentCore Runtime face: the same agent over HTTP, the way Amazon Bedrock AgentCore Runtime calls it.

`agent-agentcore` serves the bedrock-agentcore SDK's `BedrockAgentCoreApp` on
`AGENT_AGENTCORE_HOST:AGENT_AGENTCORE_PORT` (8080, which the Runtime expects):

- ``POST /invocations`` with ``{"prompt": "...", "session_id": "..."}`` (``session_id``
  optional) answers ``text/event-stream``: one ``data:`` line per event, JSON-encoded.
  Text deltas are plain JSON strings (``data: "Hello"``), so the seed's client loop,
  which reads ``data:`` lines and prints them, shows the answer. Everything else is
  a JSON object with a ``type``:

  - ``{"type": "tool_use", "tool_use_id", "name", "input": {...}}``
  - ``{"type": "tool_result", "tool_use_id", "name", "status": "success"|"error", "output"}``
  - ``{"type": "done", "stop_reason", "usage": {"input_tokens", "output_tokens", "total_tokens"},
    "event_count", "duration_ms", "session_id"}`` — the last event of a complete answer
  - ``{"type": "error", "code": "DEADLINE_EXCEEDED"|"UNAVAILABLE"|"INTERNAL", "error": "..."}`` —
    the last event of a failed answer (the gRPC path's status names)

  Refused before any event, as ``application/json`` ``{"error", "code"}``: bad input
  (400, ``INVALID_ARGUMENT``), the session busy with another request (409,
  ``ABORTED``), the stream limit reached (429, ``RESOURCE_EXHAUSTED``).
- ``GET /ping`` answers ``{"status": "HealthyBusy"}`` while any answer streams, else
  ``"Healthy"``: the Runtime keeps a busy session's microVM alive.

The session id comes from the ``X-Amzn-Bedrock-AgentCore-Runtime-Session-Id`` header
(the SDK's ``context.session_id``) or the payload's ``session_id``; with one, the
conversation is persisted under ``AGENT_DATA_DIR`` exactly like a gRPC session.

Threading: the SDK answers ``/ping`` on uvicorn's event loop and runs async handlers,
and the async generators they return, on one worker thread's event loop of its own.
The session registry, the runner (and its tasks and timers), the admission counter
and the model (whose HTTP client binds to a loop) are created lazily by the first
invocation, inside that worker loop, and only ever used from it; a guard refuses any
other loop. ``/ping`` only reads the in-flight counter, an int. A client that
disconnects cancels its answer at once (`DisconnectWatchMiddleware`), also while the
handler still waits for the first event, so no run, session or stream slot outlives it.

It is the gRPC service's machinery (settings, model factory, sessions, runner, events,
admission, call logging), not a copy: only the transport differs. One process serves one
face; both keep session histories in the same on-disk format.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import grpc
import structlog
from bedrock_agentcore.runtime import BedrockAgentCoreApp, PingStatus, RequestContext
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from strands.models import Model

from agent_service import __version__
from agent_service.admission import Admission, AdmissionRejectedError
from agent_service.calls import Call
from agent_service.events import AgentEvent, Finished, TextDelta, ToolCall, ToolOutcome
from agent_service.logs import configure_logging
from agent_service.models import build_model
from agent_service.runner import AgentRunner, RunError
from agent_service.sessions import AgentFactory, SessionBusyError, SessionRegistry
from agent_service.settings import Settings
from agent_service.telemetry import tracing
from agent_service.telemetry.metrics import REJECT_ADMISSION, REJECT_BUSY, REJECT_INVALID, Metrics
from agent_service.validation import InvalidRequestError, resolve_session_id

METHOD = "AgentCore/invocations"


class InvalidInvocationError(ValueError):
    """The payload cannot be served as sent; the message says why."""


@dataclass(frozen=True, slots=True)
class Invocation:
    prompt: str
    session_id: str  # "" for a fresh, unpersisted conversation


def parse_invocation(payload: Any, header_session_id: str | None, max_prompt_chars: int) -> Invocation:
    """Check an /invocations payload: a JSON object with a non-empty string `prompt`."""
    if not isinstance(payload, Mapping):
        raise InvalidInvocationError('the body must be a JSON object such as {"prompt": "hello"}')
    prompt = payload.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidInvocationError('"prompt" must be a non-empty string')
    if len(prompt) > max_prompt_chars:
        raise InvalidInvocationError(f'"prompt" has {len(prompt)} characters; the limit is {max_prompt_chars}')
    body_session = payload.get("session_id", "")
    if not isinstance(body_session, str):
        raise InvalidInvocationError('"session_id" must be a string')
    try:
        session_id = resolve_session_id({'"session_id"': body_session, "the session header": header_session_id or ""})
    except InvalidRequestError as exc:
        raise InvalidInvocationError(str(exc)) from exc
    return Invocation(prompt=prompt, session_id=session_id)


def event_payload(event: AgentEvent) -> str | dict[str, Any]:
    """One agent event as the JSON value of its SSE `data:` line (text deltas stay plain strings)."""
    if isinstance(event, TextDelta):
        return event.text
    if isinstance(event, ToolCall):
        return {"type": "tool_use", "tool_use_id": event.tool_id, "name": event.name, "input": _json(event.input_json)}
    if isinstance(event, ToolOutcome):
        return {
            "type": "tool_result",
            "tool_use_id": event.tool_id,
            "name": event.name,
            "status": event.status,
            "output": event.output,
        }
    usage = event.usage
    return {
        "type": "done",
        "stop_reason": event.stop_reason,
        "usage": {
            "input_tokens": usage.input_tokens,
            "output_tokens": usage.output_tokens,
            "total_tokens": usage.total_tokens,
        },
    }


def error_payload(code: str, message: str) -> dict[str, str]:
    return {"type": "error", "code": code, "error": message}


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


class ClientWatch:
    """Tells the answer's task when the HTTP client went away (thread-safe: set on uvicorn's loop)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._gone = False
        self._callbacks: list[Callable[[], None]] = []

    def on_gone(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if not self._gone:
                self._callbacks.append(callback)
                return
        callback()

    def gone(self) -> None:
        with self._lock:
            self._gone, callbacks, self._callbacks = True, self._callbacks, []
        for callback in callbacks:
            callback()


_CLIENT: contextvars.ContextVar[ClientWatch | None] = contextvars.ContextVar("agentcore_client", default=None)


class DisconnectWatchMiddleware:
    """ASGI middleware: notices the client's `http.disconnect` on /invocations.

    The SDK streams through a bounded queue and a thread, and tears the answer down
    only when its generator is garbage-collected, which can take seconds; a run
    nobody reads would hold its session and stream slot (and keep the model busy)
    that long. The watch travels to the handler in a context variable (the SDK copies
    the request's context onto its worker loop) and cancels the answer at once.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") != "/invocations":
            await self.app(scope, receive, send)
            return
        watch = ClientWatch()

        async def watched_receive() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect":
                watch.gone()
            return message

        token = _CLIENT.set(watch)
        try:
            await self.app(scope, watched_receive, send)
        finally:
            _CLIENT.reset(token)


class _Core:
    """Everything bound to the SDK's worker loop: model, sessions, runner, admission, evictor."""

    def __init__(self, settings: Settings, model: Model | None, metrics: Metrics | None) -> None:
        self.loop = asyncio.get_running_loop()
        self.registry = SessionRegistry(AgentFactory(settings, model or build_model(settings)), settings)
        self.runner = AgentRunner(self.registry, settings.cancel_grace_s, settings.coalesce_text)
        self.admission = Admission(settings.max_concurrent_streams)
        if metrics is not None:
            metrics.sessions_active.set_function(lambda: len(self.registry))
        interval = max(1.0, min(60.0, settings.session_idle_s / 4))
        self.evictor = self.loop.create_task(self.registry.evict_idle_forever(interval))

    async def aclose(self, grace_s: float, cancel_grace_s: float) -> None:
        """Let answers in flight finish (bounded), wind down cancelled runs, stop the evictor."""
        await self.admission.wait_idle(timeout_s=grace_s)
        await self.runner.aclose(cancel_grace_s * 2 + 1)
        self.evictor.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.evictor


class _Answer:
    """One invocation's answer: its run, its admission slot, its log line; cleaned up exactly once.

    `stream()` is what the SDK iterates, on its producer task. The clean-up (close the run,
    give back the slot, log the end) happens when the stream ends, or, if the client left
    before the SDK ever started the stream, as soon as the disconnect is noticed.
    """

    def __init__(self, core: _Core, call: Call, events: AsyncIterator[AgentEvent], session_id: str) -> None:
        self.core = core
        self.call = call
        self.session_id = session_id
        self._events = events
        self._first: AgentEvent | RunError | None = None
        self._started = time.perf_counter()
        self._task: asyncio.Task[Any] | None = None
        self._streaming = False
        self._client_gone = False
        self._closed = False

    async def peek(self) -> None:
        """Wait for the first event (raises SessionBusyError when the session is in use)."""
        try:
            self._first = await anext(self._events)
        except StopAsyncIteration:
            self._first = None
        except RunError as exc:
            self._first = exc

    async def close(self) -> None:
        """Close the run (which releases the session), give back the slot, log the end."""
        if self._closed:
            return
        self._closed = True
        aclose = getattr(self._events, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()
        self.core.admission.leave()
        self.call.finish()

    def client_gone(self) -> None:
        """The HTTP client disconnected (runs on the worker loop)."""
        if self._closed:
            return
        self._client_gone = True
        self.call.status = grpc.StatusCode.CANCELLED
        if self._streaming and self._task is not None:
            # Only while the generator runs: once it has returned, the SDK's task must be
            # left to hand its end marker over.
            self._task.cancel()
        elif self._task is None:
            self.core.loop.create_task(self.close())

    async def stream(self) -> AsyncIterator[Any]:
        """Yield the SSE payloads of the answer.

        When the client goes away the SDK's producer task (the one iterating this) is
        cancelled at once (the SDK does it too, but only once the stream is garbage-
        collected) and the generator then *returns*, so that the SDK hands its end marker
        to its consumer thread, which may be blocked waiting for the next chunk.
        """
        if self._closed:
            return
        self._task = asyncio.current_task()
        self._streaming = True
        call = self.call
        count = 0
        pending = self._first
        try:
            while pending is not None:
                if isinstance(pending, RunError):
                    call.status = grpc.StatusCode[pending.kind.value]
                    call.sent()
                    yield error_payload(pending.kind.value, pending.message)
                    return
                count += 1
                data = event_payload(pending)
                if isinstance(pending, Finished) and isinstance(data, dict):
                    data["event_count"] = count
                    data["duration_ms"] = round((time.perf_counter() - self._started) * 1000, 3)
                    data["session_id"] = self.session_id
                call.sent(pending)
                yield data
                try:
                    pending = await anext(self._events)
                except StopAsyncIteration:
                    pending = None
                except RunError as exc:
                    pending = exc
        except asyncio.CancelledError:
            call.status = grpc.StatusCode.CANCELLED
            if not self._client_gone or self._task is None:
                raise
            self._task.uncancel()  # our own cancellation: end the stream normally
        except GeneratorExit:
            call.status = grpc.StatusCode.CANCELLED  # the SDK closed the stream: the client went away
            raise
        except Exception:
            call.log.exception("call.failed")
            call.status = grpc.StatusCode.INTERNAL
            yield error_payload("INTERNAL", "internal error")
        finally:
            self._streaming = False
            await self.close()


class AgentCoreFace:
    """The BedrockAgentCoreApp serving the agent; `app` is the ASGI application."""

    def __init__(self, settings: Settings, model: Model | None = None) -> None:
        self.settings = settings
        self.log = structlog.get_logger("agent_service.agentcore")
        self._model = model
        self._core: _Core | None = None
        # The same metric families as the gRPC service (method "Invocations"); served by `main`.
        self.metrics: Metrics | None = None
        if settings.metrics_enabled:
            self.metrics = Metrics(settings.resolved_model_id(), __version__, settings.model_provider)
            self.metrics.streams_limit.set(settings.max_concurrent_streams)
        self.app = BedrockAgentCoreApp(lifespan=self._lifespan, middleware=[Middleware(DisconnectWatchMiddleware)])
        self.app.logger.setLevel(logging.WARNING)  # call.start / call.end are the invocation's log lines
        self.app.entrypoint(self.invoke)
        self.app.ping(self.ping)

    @property
    def in_flight(self) -> int:
        """Answers streaming right now (read from any thread)."""
        core = self._core
        return core.admission.in_flight if core is not None else 0

    def ping(self) -> PingStatus:
        """`/ping`: HealthyBusy while any answer streams, so the Runtime does not reclaim the session."""
        return PingStatus.HEALTHY_BUSY if self.in_flight else PingStatus.HEALTHY

    async def invoke(self, payload: Any, context: RequestContext) -> Response | AsyncIterator[Any]:
        """`/invocations`: validate and admit, then return the answer's event stream (or a JSON refusal)."""
        core = self._core_on_this_loop()
        method_metrics = self.metrics.for_method(METHOD) if self.metrics is not None else None
        call = Call(self.log, METHOD, _peer(context), method_metrics, self.settings.resolved_model_id())
        try:
            invocation = parse_invocation(payload, context.session_id, self.settings.max_content_chars)
        except InvalidInvocationError as exc:
            return _refuse(call, grpc.StatusCode.INVALID_ARGUMENT, REJECT_INVALID, str(exc), 400)
        call.bind_session(invocation.session_id)
        try:
            core.admission.enter()
        except AdmissionRejectedError as exc:
            return _refuse(call, grpc.StatusCode.RESOURCE_EXHAUSTED, REJECT_ADMISSION, str(exc), 429)
        target = invocation.session_id or core.registry.ephemeral()
        deadline = core.loop.time() + self.settings.max_stream_duration_s
        answer = _Answer(core, call, core.runner.run(target, invocation.prompt, deadline), invocation.session_id)
        # The first event is awaited here, so a busy session is refused with a status
        # instead of a 200 stream that only carries an error.
        try:
            await answer.peek()
        except SessionBusyError as exc:
            call.status = grpc.StatusCode.ABORTED
            call.rejected(REJECT_BUSY)
            await answer.close()
            return JSONResponse({"error": str(exc), "code": call.status.name}, status_code=409)
        except BaseException:
            answer.call.status = grpc.StatusCode.CANCELLED
            await answer.close()
            raise
        client = _CLIENT.get()
        if client is not None:
            client.on_gone(partial(_call_soon_threadsafe, core.loop, answer.client_gone))
        return answer.stream()

    def _core_on_this_loop(self) -> _Core:
        loop = asyncio.get_running_loop()
        if self._core is None:
            self._core = _Core(self.settings, self._model, self.metrics)
            self.log.info(
                "agentcore.ready",
                provider=self.settings.model_provider,
                model=self.settings.resolved_model_id(),
            )
        elif self._core.loop is not loop:
            raise RuntimeError(
                "the agent runner belongs to the SDK's worker event loop; it cannot be used from another"
            )
        return self._core

    @contextlib.asynccontextmanager
    async def _lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        """On shutdown (after uvicorn's own graceful wait) wind the runner down on its loop."""
        yield
        core = self._core
        if core is None or core.loop.is_closed():
            return
        future = asyncio.run_coroutine_threadsafe(
            core.aclose(self.settings.shutdown_grace_s, self.settings.cancel_grace_s), core.loop
        )
        with contextlib.suppress(Exception):
            await asyncio.wrap_future(future)
        self.log.info("agentcore.stop")


def _refuse(call: Call, code: grpc.StatusCode, reason: str, message: str, http_status: int) -> JSONResponse:
    call.status = code
    call.rejected(reason)
    call.finish()
    return JSONResponse({"error": message, "code": code.name}, status_code=http_status)


def _call_soon_threadsafe(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nothing left to do
        loop.call_soon_threadsafe(callback)


def _peer(context: RequestContext) -> str:
    request = context.request
    client = getattr(request, "client", None)
    return f"{client.host}:{client.port}" if client is not None else ""


def main() -> None:
    """The `agent-agentcore` console script: the AgentCore Runtime HTTP face on port 8080."""
    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)
    tracing.record_content(settings.trace_content)
    provider = tracing.configure_tracing() if tracing.tracing_requested(os.environ) else None
    face = AgentCoreFace(settings)
    endpoint = face.metrics.serve(settings.metrics_host, settings.metrics_port) if face.metrics else None
    face.log.info(
        "agentcore.start",
        address=f"{settings.agentcore_host}:{settings.agentcore_port}",
        provider=settings.model_provider,
    )
    # uvicorn drains on SIGTERM/SIGINT, then restores the previous handlers and re-raises the
    # signal; with these no-op handlers in place a drained server exits 0, like `agent-service`.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _signum, _frame: None)
    try:
        face.app.run(
            port=settings.agentcore_port,
            host=settings.agentcore_host,
            timeout_graceful_shutdown=max(1, round(settings.shutdown_grace_s)),
        )
    finally:
        if endpoint is not None:
            endpoint.close()
        if provider is not None:
            provider.shutdown()  # flushes spans still batched


if __name__ == "__main__":
    main()
