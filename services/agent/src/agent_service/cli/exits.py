"""agentctl's exit codes, and the exception that ends a command with one of them.

* 0: success (``health``: SERVING; an interactive chat left with Ctrl-D, ``/quit``
  or Ctrl-C twice at an empty prompt).
* 1: the call worked but the outcome is a failure: an in-band ``error`` event, a run
  that ended before its answer was complete, a health status other than SERVING, an
  unreadable ``--ca`` file.
* 2: bad command line (argparse).
* 10 + the gRPC status code number when an RPC fails, e.g. 14 (DEADLINE_EXCEEDED = 4),
  24 (UNAVAILABLE = 14). The offset keeps every status distinct from 1 and 2, which
  ``1 + code`` would not (CANCELLED = 1 would give argparse's 2).
* 130: interrupted with Ctrl-C outside an interactive chat (the call is cancelled; an
  answer asked with ``--on-disconnect continue`` goes on at the server, see ``chat.py``).
"""

from __future__ import annotations

from typing import Any

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
RPC_EXIT_BASE = 10
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """A failure to report as ``error: MESSAGE`` with a given exit code, without a traceback."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def rpc_exit_code(code: Any) -> int:
    """Exit code for an RPC that failed with the grpc.StatusCode ``code``."""
    try:
        return RPC_EXIT_BASE + int(code.value[0])
    except (AttributeError, IndexError, TypeError, ValueError):
        return EXIT_FAILURE
