"""What a caller asks for, independent of the door it came through, and the rules it must meet.

Adapters decode their wire format into a `ChatInput`; `validate` is the one place
that decides whether it can be served, so an invalid request gets the same
readable INVALID_ARGUMENT message on every door.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from agent_service.core.errors import ChatError, ErrorKind
from agent_service.settings import Settings

SESSION_ID_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
SESSION_ID_RULE = "session id must be 1-128 characters of letters, digits, '.', '_' or '-', not starting with '.'"


@dataclass(frozen=True, slots=True)
class ChatInput:
    """One request as decoded by an adapter.

    `session_sources` maps where the adapter looked for a session id (a field, a
    metadata entry, a header, named as the caller would recognise them) to what it
    found there ("" for nothing).
    """

    content: str
    metadata: Mapping[str, str] = field(default_factory=dict)
    session_sources: Mapping[str, str] = field(default_factory=dict)


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


def invalid(message: str) -> ChatError:
    return ChatError(ErrorKind.INVALID_ARGUMENT, message)


def validate(request: ChatInput, limits: RequestLimits) -> ValidRequest:
    """The request as the core serves it, or ChatError(INVALID_ARGUMENT) saying what is wrong.

    Text must be real Unicode: JSON can carry lone surrogates (`"\\udc80"`) that no
    model provider can encode, and they would fail the call half-way as INTERNAL.
    """
    content = request.content
    if not content.strip():
        raise invalid("content must not be empty")
    if len(content) > limits.max_content_chars:
        raise invalid(f"content has {len(content)} characters; the limit is {limits.max_content_chars}")
    _require_unicode("content", content)
    metadata = request.metadata
    if len(metadata) > limits.max_metadata_entries:
        raise invalid(f"metadata has {len(metadata)} entries; the limit is {limits.max_metadata_entries}")
    for key, value in metadata.items():
        if not key or len(key) > limits.max_metadata_key_chars:
            raise invalid(f"metadata keys must have 1-{limits.max_metadata_key_chars} characters; got {len(key)}")
        if len(value) > limits.max_metadata_value_chars:
            raise invalid(
                f"metadata value of {key!r} has {len(value)} characters; the limit is {limits.max_metadata_value_chars}"
            )
        _require_unicode("metadata", key)
        _require_unicode("metadata", value)
    return ValidRequest(content=content, session_id=resolve_session_id(request.session_sources))


def resolve_session_id(sources: Mapping[str, str]) -> str:
    """The one session id the request names, or "" for none.

    Every door takes the id from several places; those that are present must agree,
    and the id must be safe as a key and a directory name.
    """
    given = {name: value for name, value in sources.items() if value}
    if len(set(given.values())) > 1:
        raise invalid(f"{' and '.join(given)} disagree; send one session id")
    session_id = next(iter(given.values()), "")
    if session_id and not SESSION_ID_PATTERN.fullmatch(session_id):
        raise invalid(SESSION_ID_RULE)
    return session_id


def _require_unicode(what: str, text: str) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid(f"{what} is not valid Unicode text (it contains a lone surrogate)") from None
