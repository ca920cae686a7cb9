"""Every way a chat call can fail, and the one table that says what each failure looks like on the wire.

The core raises `ChatError`s; the gRPC and HTTP adapters turn them into statuses
with `WIRE`, so both doors answer the same failure the same way. The wire code (the
`error.code` of an event, the `code` of an HTTP error body) is the gRPC status name
on every door. `Fault` says whose doing an outcome is, so alerts page on the
server's failures and not on clients cancelling or running out of their own time.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from types import MappingProxyType


class Fault(enum.Enum):
    """Whose doing an outcome is (the `fault` label of the stream metrics)."""

    NONE = "none"
    CLIENT = "client"
    SERVER = "server"


class ErrorKind(enum.Enum):
    """Why a call (or one message of a bidi stream) failed; the value is its wire code."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    NOT_FOUND = "NOT_FOUND"
    ABORTED = "ABORTED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    CANCELLED = "CANCELLED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNAVAILABLE = "UNAVAILABLE"
    INTERNAL = "INTERNAL"

    @property
    def wire(self) -> WireStatus:
        return WIRE[self]


@dataclass(frozen=True, slots=True)
class WireStatus:
    """How one error kind is answered: gRPC status (name and number), HTTP status, default fault."""

    grpc_name: str
    grpc_number: int
    http_status: int
    fault: Fault


# The one error table. gRPC numbers are the protocol's (grpc/doc/statuscodes.md); 499 is
# the de-facto "client closed request" status.
WIRE: MappingProxyType[ErrorKind, WireStatus] = MappingProxyType(
    {
        ErrorKind.CANCELLED: WireStatus("CANCELLED", 1, 499, Fault.CLIENT),
        ErrorKind.INVALID_ARGUMENT: WireStatus("INVALID_ARGUMENT", 3, 400, Fault.CLIENT),
        ErrorKind.DEADLINE_EXCEEDED: WireStatus("DEADLINE_EXCEEDED", 4, 504, Fault.CLIENT),
        ErrorKind.NOT_FOUND: WireStatus("NOT_FOUND", 5, 404, Fault.CLIENT),
        ErrorKind.RESOURCE_EXHAUSTED: WireStatus("RESOURCE_EXHAUSTED", 8, 429, Fault.SERVER),
        ErrorKind.ABORTED: WireStatus("ABORTED", 10, 409, Fault.CLIENT),
        ErrorKind.INTERNAL: WireStatus("INTERNAL", 13, 500, Fault.SERVER),
        ErrorKind.UNAVAILABLE: WireStatus("UNAVAILABLE", 14, 503, Fault.SERVER),
        ErrorKind.UNAUTHENTICATED: WireStatus("UNAUTHENTICATED", 16, 401, Fault.CLIENT),
    }
)


class ChatError(Exception):
    """A call failed for a reason the caller may see; `message` is readable and safe to show.

    `fault` overrides the table's default where the same status has different causes
    (a deadline the server imposed is the server's doing, the client's own is not).
    """

    def __init__(self, kind: ErrorKind, message: str, fault: Fault | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.fault = fault or kind.wire.fault

    def __repr__(self) -> str:
        return f"ChatError({self.kind.value}, {self.message!r})"
