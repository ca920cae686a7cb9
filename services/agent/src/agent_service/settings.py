"""The service's one settings object, read from `AGENT_*` environment variables.

Read once at start-up and passed down; nothing else in the package reads the
environment (OpenTelemetry's standard `OTEL_*` variables excepted).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Provider = Literal["demo", "local", "openai", "bedrock", "anthropic", "ollama"]

DEFAULT_BEDROCK_MODEL_ID = "us.anthropic.claude-3-7-sonnet-20250219-v1:0"
DEFAULT_SYSTEM_PROMPT = (
    "You're a helpful assistant. You can do simple math calculations, tell the weather, and provide the current time."
)
# The prompt SmolLM2 was tuned with, plus a request for brevity: the 135M model keeps its facts
# straight with it and drifts with longer or tool-centred prompts (measured, see the README).
LOCAL_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face. Answer briefly."

# Defaults that depend on the provider, used for settings not given (by argument or environment).
# `local` runs a 135M model on the CPU: short answers, and a deadline under a minute, so an
# answer that loops ends soon (a client's own deadline still wins when it is shorter).
PROVIDER_DEFAULTS: dict[str, dict[str, Any]] = {
    "local": {"system_prompt": LOCAL_SYSTEM_PROMPT, "max_tokens": 256, "max_stream_duration_s": 30.0},
}


class Settings(BaseSettings):
    """Every knob of the agent service. Field docs are the README's settings table."""

    model_config = SettingsConfigDict(env_prefix="AGENT_", extra="ignore", frozen=True)

    # --- model -------------------------------------------------------------
    model_provider: Provider = Field(
        "local", description="Model provider: demo, local, openai, bedrock, anthropic, ollama."
    )
    model_id: str = Field("", description="Model id for the provider; empty picks the provider's default.")
    system_prompt: str = Field(DEFAULT_SYSTEM_PROMPT, description="System prompt of every agent.")
    max_tokens: int = Field(1024, ge=1, description="Maximum output tokens per model call.")
    temperature: float | None = Field(
        None, ge=0, le=2, description="Sampling temperature; empty keeps the provider's default."
    )
    repeat_penalty: float | None = Field(
        None,
        gt=0,
        description="llama-server's repeat_penalty (provider `local`; 1 is none); empty: the provider's default.",
    )
    frequency_penalty: float | None = Field(
        None, ge=-2, le=2, description="Frequency penalty (providers `local`, `openai`); empty: the provider's default."
    )
    local_base_url: str = Field(
        "http://127.0.0.1:8081", description="Base URL of the local llama-server (provider `local`)."
    )
    openai_base_url: str = Field(
        "", description="Base URL of an OpenAI-compatible API (provider `openai`); empty for OpenAI itself."
    )
    openai_api_key: SecretStr = Field(
        SecretStr(""), description="API key for provider `openai` (falls back to OPENAI_API_KEY)."
    )
    anthropic_api_key: SecretStr = Field(
        SecretStr(""), description="API key for provider `anthropic` (falls back to ANTHROPIC_API_KEY)."
    )
    ollama_host: str = Field("http://127.0.0.1:11434", description="Ollama server address (provider `ollama`).")
    bedrock_region: str = Field("", description="AWS region for provider `bedrock`; empty uses the AWS default chain.")
    demo_token_delay_ms: float = Field(
        20.0, ge=0, description="Delay per streamed word of the demo model, in ms (0 allowed)."
    )
    demo_reply_words: int = Field(
        0, ge=0, description="Pad or cut demo text replies to exactly this many words (0: natural length)."
    )

    # --- network -----------------------------------------------------------
    grpc_host: str = Field("[::]", description="Interface the gRPC server binds (all interfaces by default).")
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 picks a free one).")
    workers: int = Field(
        1,
        ge=0,
        description="Worker processes serving the gRPC port together (0: one per usable CPU core; 1: one process).",
    )
    reflection: bool = Field(True, description="Serve gRPC server reflection.")
    max_message_bytes: int = Field(1 << 20, ge=1024, description="Largest gRPC message accepted or sent, in bytes.")
    agentcore_host: str = Field(
        "0.0.0.0", description="Interface the AgentCore Runtime face (`agent-agentcore`) binds."
    )
    agentcore_port: int = Field(
        8080, ge=0, le=65535, description="HTTP port of the AgentCore Runtime face (AgentCore Runtime expects 8080)."
    )

    # --- limits ------------------------------------------------------------
    max_concurrent_streams: int = Field(
        1000, ge=1, description="Streams served at once; more fail with RESOURCE_EXHAUSTED."
    )
    max_streams_per_principal: int = Field(
        100, ge=1, description="Streams one caller may hold at once (per principal; per address when anonymous)."
    )
    max_content_chars: int = Field(32_000, ge=1, description="Longest accepted `content`, in characters.")
    max_metadata_entries: int = Field(16, ge=0, description="Most entries accepted in a request's `metadata` map.")
    max_metadata_key_chars: int = Field(64, ge=1, description="Longest accepted metadata key.")
    max_metadata_value_chars: int = Field(1024, ge=1, description="Longest accepted metadata value.")
    bidi_read_ahead: int = Field(8, ge=1, description="Requests of a bidi stream read ahead of the answer in progress.")
    bidi_idle_s: float = Field(
        300.0, gt=0, description="A bidi stream with no request for this long (and no answer in progress) is ended."
    )
    max_json_depth: int = Field(
        32, ge=2, description="Deepest JSON nesting accepted by the HTTP doors (checked before parsing)."
    )
    provider_max_attempts: int = Field(
        3, ge=1, description="Model calls per step when the provider throttles (1: no retry); never past the deadline."
    )
    provider_retry_delay_s: int = Field(
        1, ge=0, description="Back-off before the first retry of a throttled model call, in s; doubles each retry."
    )

    coalesce_text: bool = Field(
        True, description="Send text deltas that are already waiting as one event (no added delay; fewer messages)."
    )

    # --- time --------------------------------------------------------------
    max_stream_duration_s: float = Field(
        300.0, gt=0, description="Longest a call may run, whatever deadline the client sets (the server's cap)."
    )
    deadline_margin_ms: float = Field(
        50.0,
        ge=0,
        description="End an answer this long before the client's deadline, so its DEADLINE_EXCEEDED beats a proxy's.",
    )
    cancel_grace_s: float = Field(
        2.0, ge=0, description="Time a cancelled agent gets to stop cleanly before it is abandoned."
    )
    shutdown_grace_s: float = Field(
        20.0, ge=0, description="Time in-flight streams get to finish on SIGTERM before they are cancelled."
    )

    # --- identity ----------------------------------------------------------
    auth: bool = Field(
        False, description="Require a bearer token (JWT) on every agent call; the principal is its `sub`."
    )
    jwt_issuer: str = Field("", description="Required `iss` of tokens (empty: any issuer).")
    jwt_audiences: str = Field("", description="Accepted `aud` values, comma-separated (empty: not checked).")
    jwks_file: Path | None = Field(None, description="JWKS file with the token signing keys (re-read when it changes).")
    jwks_uri: str = Field("", description="JWKS URL with the token signing keys (fetched and refreshed in background).")
    jwks_refresh_s: float = Field(300.0, gt=0, description="How often the JWKS is refreshed.")

    # --- sessions ----------------------------------------------------------
    session_store: str = Field(
        "files",
        description="Where conversations live: `files` (under AGENT_DATA_DIR; one machine) or a redis[s]:// URL.",
    )
    session_lease_s: float = Field(
        10.0,
        gt=0,
        description="Redis store: a crashed replica's hold on a session expires after this long (renewed while alive).",
    )
    data_dir: Path = Field(Path("agent-data"), description="Directory of the files store (session histories, locks).")
    max_sessions: int = Field(
        1000, ge=1, description="Session agents kept in memory (least recently used evicted first)."
    )
    max_queued_per_session: int = Field(
        4, ge=0, description="Requests that may wait for a busy session (if_busy=ENQUEUE); more: RESOURCE_EXHAUSTED."
    )
    run_retention_s: float = Field(
        600.0, ge=0, description="How long a run's events are kept after it ends, for ResumeStream (0: not kept)."
    )
    heartbeat_s: float = Field(
        15.0,
        gt=0,
        description="A stream silent this long gets a heartbeat event (or an SSE comment), proxies see life.",
    )
    session_idle_s: float = Field(
        900.0,
        gt=0,
        description="Idle time after which a session's agent leaves memory (its history stays in the store).",
    )

    # --- telemetry ---------------------------------------------------------
    metrics_enabled: bool = Field(True, description="Serve Prometheus metrics.")
    metrics_host: str = Field("0.0.0.0", description="Interface of the metrics HTTP server.")
    metrics_port: int = Field(
        9464, ge=0, le=65535, description="Port of the metrics HTTP server (`/metrics`; 0 picks a free one)."
    )
    trace_content: bool = Field(
        False,
        description="Record prompts and answers on spans (off: redacted). Tracing follows the `OTEL_*` variables.",
    )

    # --- logs --------------------------------------------------------------
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    log_format: Literal["auto", "json", "console"] = Field(
        "auto", description="auto: console on a terminal, JSON otherwise."
    )

    @model_validator(mode="before")
    @classmethod
    def _provider_defaults(cls, data: Any) -> Any:
        """Fill in PROVIDER_DEFAULTS of the chosen provider for the settings not given."""
        if not isinstance(data, dict):
            return data
        provider = data.get("model_provider", cls.model_fields["model_provider"].default)
        return {**PROVIDER_DEFAULTS.get(str(provider), {}), **data}

    @model_validator(mode="after")
    def _auth_needs_keys(self) -> Settings:
        if self.auth and not (self.jwks_file or self.jwks_uri):
            raise ValueError("AGENT_AUTH=on needs AGENT_JWKS_FILE or AGENT_JWKS_URI (the token signing keys)")
        if self.jwks_file and self.jwks_uri:
            raise ValueError("set AGENT_JWKS_FILE or AGENT_JWKS_URI, not both")
        if self.session_store != "files" and not self.session_store.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("AGENT_SESSION_STORE must be `files` or a redis://, rediss:// or unix:// URL")
        return self

    def resolved_workers(self) -> int:
        """The number of gRPC worker processes: `workers`, or one per usable CPU core when it is 0."""
        return self.workers or usable_cores()

    def resolved_model_id(self) -> str:
        """The model id actually used, after provider defaults."""
        if self.model_id:
            return self.model_id
        return {
            "demo": "demo",
            "local": "smollm2-135m-instruct",
            "openai": "gpt-4o-mini",
            "bedrock": DEFAULT_BEDROCK_MODEL_ID,
            "anthropic": "claude-3-7-sonnet-latest",
            "ollama": "llama3.2",
        }[self.model_provider]


def usable_cores() -> int:
    """CPU cores this process may use: its CPU affinity, capped by a cgroup CPU quota (a container's `cpus`).

    `os.cpu_count()` alone counts the host's cores, so a container limited to two
    would start a worker per host core.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota()
    return max(1, min(cores, math.ceil(quota)) if quota else cores)


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The cgroup's CPU quota in cores (v2 `cpu.max`, else v1 `cpu.cfs_quota_us`); None when unlimited or unknown."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None
