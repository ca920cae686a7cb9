"""Provider `local` (SmolLM2-135M) gets defaults that suit a 135M model; what is set explicitly wins,
and other providers keep the general defaults."""

from __future__ import annotations

import pytest

from agent_service.models import build_model
from agent_service.models.factory import LOCAL_FREQUENCY_PENALTY, LOCAL_REPEAT_PENALTY, LOCAL_TEMPERATURE
from agent_service.settings import DEFAULT_SYSTEM_PROMPT, LOCAL_SYSTEM_PROMPT, PROVIDER_DEFAULTS, Settings


@pytest.fixture(autouse=True)
def _no_agent_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AGENT_MODEL_PROVIDER", "AGENT_MAX_TOKENS", "AGENT_SYSTEM_PROMPT", "AGENT_MAX_STREAM_DURATION_S"):
        monkeypatch.delenv(name, raising=False)


def test_local_is_the_default_provider_and_brings_its_own_defaults() -> None:
    settings = Settings()
    assert settings.model_provider == "local"
    assert (settings.system_prompt, settings.max_tokens, settings.max_stream_duration_s) == (
        LOCAL_SYSTEM_PROMPT,
        256,
        30.0,
    )
    assert settings.max_stream_duration_s < 60, "a looping answer must not run for a minute"
    assert len(LOCAL_SYSTEM_PROMPT) < len(DEFAULT_SYSTEM_PROMPT)


@pytest.mark.parametrize("provider", ["demo", "openai", "bedrock", "anthropic", "ollama"])
def test_other_providers_keep_the_general_defaults(provider: str) -> None:
    settings = Settings(model_provider=provider)
    for name, field in Settings.model_fields.items():
        if name != "model_provider":
            assert getattr(settings, name) == field.default, name
    assert set(PROVIDER_DEFAULTS) == {"local"}


def test_what_is_set_explicitly_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENT_MAX_TOKENS", "77")
    monkeypatch.setenv("AGENT_SYSTEM_PROMPT", "Be terse.")
    settings = Settings()
    assert (settings.max_tokens, settings.system_prompt, settings.max_stream_duration_s) == (77, "Be terse.", 30.0)
    assert Settings(max_stream_duration_s=5).max_stream_duration_s == 5


def test_the_local_model_samples_with_penalties_llama_server_reads() -> None:
    config = build_model(Settings()).get_config()
    assert config["params"] == {
        "max_tokens": 256,
        "temperature": LOCAL_TEMPERATURE,
        "frequency_penalty": LOCAL_FREQUENCY_PENALTY,
        "extra_body": {"repeat_penalty": LOCAL_REPEAT_PENALTY},  # a llama-server field: sent in the body
    }
    tuned = build_model(Settings(temperature=0.7, repeat_penalty=1.3, frequency_penalty=0.0)).get_config()
    assert tuned["params"] == {
        "max_tokens": 256,
        "temperature": 0.7,
        "frequency_penalty": 0.0,
        "extra_body": {"repeat_penalty": 1.3},
    }


def test_openai_gets_only_what_is_set() -> None:
    plain = build_model(Settings(model_provider="openai", openai_api_key="test")).get_config()
    assert plain["params"] == {"max_tokens": 1024}
    tuned = build_model(Settings(model_provider="openai", openai_api_key="test", frequency_penalty=0.5)).get_config()
    assert tuned["params"] == {"max_tokens": 1024, "frequency_penalty": 0.5}
