"""Every provider setting builds strands' own model class, configured from settings (no network)."""

from __future__ import annotations

import pytest

from agent_service.models import build_model
from agent_service.models.demo import DemoModel
from agent_service.settings import Settings


@pytest.mark.parametrize(
    ("provider", "class_name", "model_id"),
    [
        ("demo", "DemoModel", "demo"),
        ("local", "OpenAIModel", "smollm2-135m-instruct"),
        ("openai", "OpenAIModel", "gpt-4o-mini"),
        ("bedrock", "BedrockModel", "us.anthropic.claude-3-7-sonnet-20250219-v1:0"),
        ("anthropic", "AnthropicModel", "claude-3-7-sonnet-latest"),
        ("ollama", "OllamaModel", "llama3.2"),
    ],
)
def test_each_provider_builds_its_strands_model(
    provider: str, class_name: str, model_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-west-2")
    model = build_model(Settings(model_provider=provider, openai_api_key="test", anthropic_api_key="test"))
    assert type(model).__name__ == class_name
    assert model.get_config()["model_id"] == model_id


def test_local_provider_streams_through_the_openai_api_of_llama_server() -> None:
    model = build_model(Settings(model_provider="local", local_base_url="http://127.0.0.1:9999/"))
    assert model.client_args["base_url"] == "http://127.0.0.1:9999/v1"  # type: ignore[attr-defined]


def test_demo_settings_reach_the_model() -> None:
    model = build_model(Settings(model_provider="demo", demo_token_delay_ms=0, demo_reply_words=7))
    assert isinstance(model, DemoModel)
    assert model.get_config()["token_delay_ms"] == 0 and model.get_config()["reply_words"] == 7
