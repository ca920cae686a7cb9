"""When an answer (or a call) must end, and whose limit that is."""

from __future__ import annotations

from dataclasses import dataclass

from agent_service.core.errors import ChatError, ErrorKind, Fault


@dataclass(frozen=True, slots=True)
class Deadline:
    """When the answer must end (event-loop time), and whose limit that is."""

    at: float
    fault: Fault = Fault.CLIENT  # SERVER: the server's own cap, not the client's deadline

    def exceeded(self) -> ChatError:
        return ChatError(
            ErrorKind.DEADLINE_EXCEEDED,
            "the answer did not complete within the deadline"
            if self.fault is Fault.CLIENT
            else "the answer did not complete within the server's maximum stream duration",
            self.fault,
        )
