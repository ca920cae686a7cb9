"""Demo model planning, session ids, request validation, failure classification, settings."""

from __future__ import annotations

import pytest

from agent_service.core import ChatError, ErrorKind
from agent_service.core.requests import ChatInput, RequestLimits, resolve_session_id, validate
from agent_service.core.runner import classify_failure
from agent_service.models.demo import _plan_tool_call, _reply_words
from agent_service.rpc.codec import decode_request
from agent_service.settings import DEFAULT_BEDROCK_MODEL_ID, Settings

TOOLS = {"calculator", "get_time", "weather"}


def _user(text: str):
    return [{"role": "user", "content": [{"text": text}]}]


@pytest.mark.parametrize(
    ("prompt", "plan"),
    [
        ("what time is it", ("get_time", {})),
        ("Weather in Paris?", ("weather", {})),
        ("compute (1 + 2) * 3 please", ("calculator", {"expression": "(1 + 2) * 3"})),
        ("hello", None),
        ("I have 3 cats", None),
    ],
)
def test_demo_model_plans_tools_from_the_prompt(prompt: str, plan) -> None:
    assert _plan_tool_call(_user(prompt), TOOLS) == plan


def test_demo_model_needs_the_tool_and_a_fresh_prompt() -> None:
    assert _plan_tool_call(_user("what time is it"), set()) is None
    tool_result = [{"role": "user", "content": [{"toolResult": {"toolUseId": "x", "status": "success",
                                                                "content": [{"text": "12:00"}]}}]}]  # fmt: skip
    assert _plan_tool_call(tool_result, TOOLS) is None
    assert list(_reply_words(tool_result, 0)) == ["Here", "is", "what", "the", "tool", "returned:", "12:00"]


def test_demo_reply_length_is_configurable() -> None:
    padded = _reply_words(_user("hi"), 12)
    assert len(padded) == 12
    prompt = ["This", "is", "the", "demo", "model", "answering:", "hi"]
    assert list(padded) == [*prompt, "lorem", "ipsum", "dolor", "sit", "amet"]
    assert padded[-1] == "amet" and padded[:2] == ["This", "is"]
    assert list(_reply_words(_user("one two three"), 3)) == ["This", "is", "the"]
    assert len(list(_reply_words(_user("hi"), 100))) == 100


@pytest.mark.parametrize("session_id", ["a", "A-b_c.9", "x" * 128, "_lead"])
def test_valid_session_ids(session_id: str) -> None:
    assert resolve_session_id({"session_id": session_id}) == session_id


@pytest.mark.parametrize("session_id", ["", ".", "..", "../a", "a/b", "a\\b", "x" * 129, "ü", "a b", "a\x00"])
def test_invalid_session_ids(session_id: str) -> None:
    if not session_id:
        assert resolve_session_id({"session_id": session_id}) == ""  # no id: a fresh conversation
        return
    with pytest.raises(ChatError, match="session id must be") as caught:
        resolve_session_id({"session_id": session_id})
    assert caught.value.kind is ErrorKind.INVALID_ARGUMENT


def _decoded(header: str = "", **fields) -> ChatInput:
    from agent_service.proto import agent_pb2

    decoded = decode_request(agent_pb2.ChatRequest(**fields).SerializeToString(), header)
    assert isinstance(decoded, ChatInput)
    return decoded


def test_request_validation_takes_the_field_metadata_or_header() -> None:
    limits = RequestLimits(100, 2, 10, 10)
    assert validate(_decoded(content="hi", session_id="s"), limits).session_id == "s"
    assert validate(_decoded(content="hi", metadata={"session_id": "m"}), limits).session_id == "m"
    assert validate(_decoded("h", content="hi"), limits).session_id == "h"
    with pytest.raises(ChatError, match="session_id and the x-session-id header disagree"):
        validate(_decoded("h", content="hi", session_id="s"), limits)
    with pytest.raises(ChatError, match="metadata has 3 entries"):
        validate(_decoded(content="hi", metadata={"a": "", "b": "", "c": ""}), limits)


@pytest.mark.parametrize("text", ["\udc80", "ok \ud800 then"])
def test_lone_surrogates_are_invalid_not_a_provider_failure(text: str) -> None:
    with pytest.raises(ChatError, match="not valid Unicode") as caught:
        validate(ChatInput(content=text), RequestLimits(100, 2, 10, 10))
    assert caught.value.kind is ErrorKind.INVALID_ARGUMENT


@pytest.mark.parametrize(
    "data",
    [
        b"\x0a\x02\xff\xfe",  # content = invalid UTF-8
        b"\x0a\x10hi",  # content longer than the message (truncated)
        b"\xff\xff\xff",  # not a message at all
    ],
)
def test_undecodable_requests_are_invalid_argument(data: bytes) -> None:
    decoded = decode_request(data, "")
    assert isinstance(decoded, ChatError)
    assert decoded.kind is ErrorKind.INVALID_ARGUMENT
    assert "not a valid agent.ChatRequest" in decoded.message


def test_failure_classification_follows_the_cause_chain() -> None:
    try:
        try:
            raise ConnectionRefusedError("refused")
        except ConnectionRefusedError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        error = classify_failure(outer)
    assert error.kind is ErrorKind.UNAVAILABLE
    assert "ConnectionRefusedError: refused" in error.message
    assert classify_failure(ValueError("x" * 500)).kind is ErrorKind.INTERNAL
    assert len(classify_failure(ValueError("x" * 500)).message) < 260


def test_settings_come_from_agent_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENT_MODEL_PROVIDER", "bedrock")
    monkeypatch.setenv("AGENT_GRPC_PORT", "6000")
    monkeypatch.setenv("AGENT_REFLECTION", "false")
    monkeypatch.setenv("AGENT_DEMO_TOKEN_DELAY_MS", "0")
    settings = Settings()
    assert (settings.model_provider, settings.grpc_port, settings.reflection) == ("bedrock", 6000, False)
    assert settings.demo_token_delay_ms == 0
    assert settings.resolved_model_id() == DEFAULT_BEDROCK_MODEL_ID


def test_bad_settings_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENT_MODEL_PROVIDER", "nope")
    with pytest.raises(ValueError, match="model_provider"):
        Settings()


async def test_token_pacer_keeps_a_schedule_when_wake_ups_overshoot(monkeypatch: pytest.MonkeyPatch) -> None:
    from agent_service import pacing

    clock = [100.0]

    class FakeLoop:
        def time(self) -> float:
            return clock[0]

    async def late_sleep(seconds: float) -> None:
        clock[0] += seconds + 0.003  # every wake-up is 3 ms late

    monkeypatch.setattr(pacing.asyncio, "get_running_loop", FakeLoop)
    monkeypatch.setattr(pacing.asyncio, "sleep", late_sleep)
    pacer = pacing.TokenPacer(0.020)
    for _ in range(100):
        await pacer.wait()
    assert clock[0] - 100.0 == pytest.approx(100 * 0.020 + 0.003)  # one overshoot, not a hundred
