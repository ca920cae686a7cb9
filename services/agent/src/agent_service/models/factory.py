"""Settings → one strands ``Model``, shared by every session's agent.

A strands model holds configuration and a client, not conversation state, so one
instance serves all agents; each session gets its own ``Agent`` around it.
Provider SDKs are imported lazily so a deployment only needs the one it uses.

The SDKs' own retries are off: strands retries throttled calls, bounded by the
answer's deadline (`core/provider_retry.py`); two layers multiplied into nine
provider requests and a DEADLINE_EXCEEDED where UNAVAILABLE was due.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from typing import Any

from strands.models import Model

from agent_service.models.demo import DemoModel
from agent_service.settings import Settings

# Sampling of provider `local` (SmolLM2-135M on llama-server) where the settings leave it empty:
# a low temperature keeps the small model's facts straight, and the frequency penalty ends the
# loops it otherwise falls into; a stronger repeat_penalty (1.1) cost correct answers (measured
# with the real model, see the README). llama-server reads `repeat_penalty` as an extra field of
# the request body; `frequency_penalty` is an OpenAI field.
LOCAL_TEMPERATURE = 0.2
LOCAL_REPEAT_PENALTY = 1.05
LOCAL_FREQUENCY_PENALTY = 0.4
# llama-server answers in seconds; a request hanging longer than this is a dead server.
LOCAL_REQUEST_TIMEOUT_S = 60.0

# The module each provider's class comes from (imported lazily by `build_model`).
_PROVIDER_MODULES = {
    "local": "strands.models.openai",
    "openai": "strands.models.openai",
    "bedrock": "strands.models.bedrock",
    "anthropic": "strands.models.anthropic",
    "ollama": "strands.models.ollama",
}


def preload(settings: Settings) -> None:
    """Import the provider's SDK now, without building anything.

    A supervisor calls it before forking its workers: they (and their restarts) then
    share the imported modules instead of each spending seconds importing its own. A
    missing SDK is left for `build_model` to report in the worker.
    """
    module = _PROVIDER_MODULES.get(settings.model_provider)
    if module is not None:
        with contextlib.suppress(ImportError):
            importlib.import_module(module)


def build_model(settings: Settings) -> Model:
    """Build the model the settings name, with strands' own provider classes."""
    provider = settings.model_provider
    model_id = settings.resolved_model_id()
    if provider == "demo":
        return DemoModel(
            model_id=model_id,
            token_delay_ms=settings.demo_token_delay_ms,
            reply_words=settings.demo_reply_words,
            max_tokens=settings.max_tokens,
        )
    if provider in ("local", "openai"):
        return _openai_compatible(settings, model_id)
    if provider == "bedrock":
        from strands.models.bedrock import BedrockModel

        bedrock_config: dict[str, Any] = {"model_id": model_id, "max_tokens": settings.max_tokens}
        if settings.temperature is not None:
            bedrock_config["temperature"] = settings.temperature
        from botocore.config import Config  # type: ignore[import-untyped]

        return BedrockModel(
            region_name=settings.bedrock_region or None,
            boto_client_config=Config(retries={"total_max_attempts": 1}),
            **bedrock_config,
        )
    if provider == "anthropic":
        from strands.models.anthropic import AnthropicModel

        api_key = settings.anthropic_api_key.get_secret_value() or os.environ.get("ANTHROPIC_API_KEY", "")
        anthropic_args: dict[str, Any] = {"max_retries": 0}
        if api_key:
            anthropic_args["api_key"] = api_key
        return AnthropicModel(
            client_args=anthropic_args,
            model_id=model_id,
            max_tokens=settings.max_tokens,
            params=_sampling(settings),
        )
    if provider == "ollama":
        from strands.models.ollama import OllamaModel

        ollama_config: dict[str, Any] = {"model_id": model_id, "max_tokens": settings.max_tokens}
        if settings.temperature is not None:
            ollama_config["temperature"] = settings.temperature
        return OllamaModel(settings.ollama_host, **ollama_config)
    raise ValueError(f"unknown model provider {provider!r}")  # pragma: no cover - Literal guards it


def _openai_compatible(settings: Settings, model_id: str) -> Model:
    """`local` (our llama-server) and `openai` (any OpenAI-compatible endpoint).

    strands' ``LlamaCppModel`` buffers the whole answer, so llama-server is reached
    through its OpenAI-compatible API, which streams token by token.
    """
    # The OpenAI SDK builds its chat-completions types on first use (over a second on 2 cores):
    # importing them here moves that cost from the first answer to start-up, before health SERVING.
    import openai.resources.chat  # noqa: F401
    from strands.models.openai import OpenAIModel

    params: dict[str, Any] = {"max_tokens": settings.max_tokens, **_sampling(settings)}
    if settings.frequency_penalty is not None:
        params["frequency_penalty"] = settings.frequency_penalty
    if settings.model_provider == "local":
        client_args: dict[str, Any] = {
            "base_url": settings.local_base_url.rstrip("/") + "/v1",
            "api_key": "local",
            "timeout": LOCAL_REQUEST_TIMEOUT_S,
            "max_retries": 0,
        }
        params.setdefault("temperature", LOCAL_TEMPERATURE)
        params.setdefault("frequency_penalty", LOCAL_FREQUENCY_PENALTY)
        repeat_penalty = LOCAL_REPEAT_PENALTY if settings.repeat_penalty is None else settings.repeat_penalty
        params["extra_body"] = {"repeat_penalty": repeat_penalty}
    else:
        api_key = settings.openai_api_key.get_secret_value() or os.environ.get("OPENAI_API_KEY", "")
        client_args = {"api_key": api_key or None, "max_retries": 0}
        if settings.openai_base_url:
            client_args["base_url"] = settings.openai_base_url
    return OpenAIModel(client_args=client_args, model_id=model_id, params=params)


def _sampling(settings: Settings) -> dict[str, Any]:
    return {} if settings.temperature is None else {"temperature": settings.temperature}
