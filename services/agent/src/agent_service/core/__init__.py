"""The transport-neutral chat core: validate → admit → lease the session → run → account.

The gRPC servicer and the AgentCore HTTP app are thin adapters over `ChatCore`;
nothing in this package knows about gRPC or HTTP.
"""

from agent_service.core.chat import ChatCall, ChatCore
from agent_service.core.errors import WIRE, ChatError, ErrorKind, Fault, WireStatus
from agent_service.core.events import Done, Failure, Reply, ReplyEvent, TextDelta, ToolCall, ToolOutcome
from agent_service.core.requests import ChatInput

__all__ = [
    "WIRE",
    "ChatCall",
    "ChatCore",
    "ChatError",
    "ChatInput",
    "Done",
    "ErrorKind",
    "Failure",
    "Fault",
    "Reply",
    "ReplyEvent",
    "TextDelta",
    "ToolCall",
    "ToolOutcome",
    "WireStatus",
]
