"""Request validation: bad input becomes one readable INVALID_ARGUMENT message."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from agent_service.proto import agent_pb2
from agent_service.sessions import InvalidSessionIdError, validate_session_id
from agent_service.settings import Settings

SESSION_METADATA_KEY = "session_id"
# gRPC metadata header carrying the session id; Envoy hashes on it to keep a session on one replica.
SESSION_HEADER = "x-session-id"


class InvalidRequestError(ValueError):
    """The request cannot be served as sent; the message says why."""


@dataclass(frozen=True, slots=True)
class ValidRequest:
    content: str
    session_id: str  # "" for a fresh, unpersisted conversation


@dataclass(frozen=True, slots=True)
class RequestLimits:
    max_content_chars: int
    max_metadata_entries: int
    max_metadata_key_chars: int
    max_metadata_value_chars: int

    @classmethod
    def from_settings(cls, settings: Settings) -> RequestLimits:
        return cls(
            max_content_chars=settings.max_content_chars,
            max_metadata_entries=settings.max_metadata_entries,
            max_metadata_key_chars=settings.max_metadata_key_chars,
            max_metadata_value_chars=settings.max_metadata_value_chars,
        )


def validate_request(
    request: agent_pb2.ChatRequest, limits: RequestLimits, header_session_id: str = ""
) -> ValidRequest:
    """Check a ChatRequest against the limits.

    The session id may come from the `session_id` field, `metadata["session_id"]` (seed
    clients) or the call's `x-session-id` header (for load-balancer affinity); sources
    that are present must agree.
    """
    content = request.content
    if not content.strip():
        raise InvalidRequestError("content must not be empty")
    if len(content) > limits.max_content_chars:
        raise InvalidRequestError(f"content has {len(content)} characters; the limit is {limits.max_content_chars}")
    metadata = request.metadata
    if len(metadata) > limits.max_metadata_entries:
        raise InvalidRequestError(f"metadata has {len(metadata)} entries; the limit is {limits.max_metadata_entries}")
    for key, value in metadata.items():
        if not key or len(key) > limits.max_metadata_key_chars:
            raise InvalidRequestError(
                f"metadata keys must have 1-{limits.max_metadata_key_chars} characters; got {len(key)}"
            )
        if len(value) > limits.max_metadata_value_chars:
            raise InvalidRequestError(
                f"metadata value of {key!r} has {len(value)} characters; the limit is {limits.max_metadata_value_chars}"
            )
    session_id = resolve_session_id(
        {
            "session_id": request.session_id,
            f"metadata[{SESSION_METADATA_KEY!r}]": metadata.get(SESSION_METADATA_KEY, ""),
            f"the {SESSION_HEADER} header": header_session_id,
        }
    )
    return ValidRequest(content=content, session_id=session_id)


def resolve_session_id(sources: Mapping[str, str]) -> str:
    """The one session id the request names, or "" for none; `sources` maps where it was looked for to what was found.

    Every door (gRPC, AgentCore HTTP) takes the id from several places; those that are
    present must agree, and the id must be safe as a directory name.
    """
    given = {name: value for name, value in sources.items() if value}
    if len(set(given.values())) > 1:
        raise InvalidRequestError(f"{' and '.join(given)} disagree; send one session id")
    session_id = next(iter(given.values()), "")
    if session_id:
        try:
            validate_session_id(session_id)
        except InvalidSessionIdError as exc:
            raise InvalidRequestError(str(exc)) from exc
    return session_id


def header_session_id(invocation_metadata: object) -> str:
    """The `x-session-id` header of a call, or ""."""
    for key, value in invocation_metadata or ():  # type: ignore[attr-defined]
        if key == SESSION_HEADER:
            return str(value)
    return ""
