"""Ctrl-C at a prompt always interrupts it, however the SIGINT and readline's wait happen to line up.

CPython's ``input()`` with readline waits for a key in ``select()`` and looks at
signals only when that ``select()`` fails with EINTR. A SIGINT that arrives just
before it blocks (while readline echoes a key or draws the prompt; on a loaded
machine that window is wide) is only noted by Python's C-level handler, and
``select()`` then sleeps until the next key: the Ctrl-C seems lost and the prompt
dead. (A SIGINT that the kernel hands to one of grpc's threads does the same.)

`PromptInterrupts` closes the gap. While the main thread is in ``input()``,
Python's signal handler also writes the signal's number to a pipe
(``signal.set_wakeup_fd``), and a thread reading that pipe pokes the main thread
with SIGURG until ``input()`` has returned or a poke was handled. A poke ends
readline's ``select()`` with EINTR, and Python runs the pending handlers in signal
order: SIGINT's notes the interrupt, then SIGURG's raises KeyboardInterrupt. A poke
handled with no SIGINT noted (one already handled) changes nothing: readline goes
back to waiting.

Why the SIGINT handler only takes a note: after a KeyboardInterrupt, ``input()``
checks signals once more with that exception set, and a Python handler run then
fails with SystemError. Raising from the last handler of the pass (SIGURG's), after
making both handlers C's ``default_int_handler`` for the rest of that ``input()``,
leaves nothing a Python function could be called for at that point.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType, TracebackType
from typing import Any

POKE_SIGNAL = signal.SIGURG
POKE_INTERVAL_S = 0.02
# A poke is repeated until input() returns; this bounds it in case it never does.
MAX_POKES = 250
_STOP = b"\x00"  # no signal has the number 0


class PromptInterrupts:
    """Makes a SIGINT interrupt ``input()`` reliably; enter it in the main thread, wrap each ``input()`` in
    `waiting`. Outside the main thread (where signals cannot be handled) it does nothing.

    The state shared with the watching thread is plain attributes, not locks: a signal
    handler may raise in the main thread at any point, and must never leave a lock held.
    """

    def __init__(self) -> None:
        self._active = False
        self._read_fd = -1
        self._write_fd = -1
        self._thread: threading.Thread | None = None
        self._main_ident = threading.main_thread().ident
        self._previous_poke: Any = None
        self._inside = False  # the main thread is in input()
        self._sigint = False  # a SIGINT came during this input() and was not raised yet
        self._poked = False  # a poke was handled without raising

    def __enter__(self) -> PromptInterrupts:
        if threading.current_thread() is not threading.main_thread():
            return self
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)  # required by set_wakeup_fd
        self._previous_poke = signal.signal(POKE_SIGNAL, self._on_poke)
        self._thread = threading.Thread(target=self._watch, name="agentctl-sigint", daemon=True)
        self._thread.start()
        self._active = True
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._active:
            return
        self._active = False
        with contextlib.suppress(OSError):
            os.write(self._write_fd, _STOP)
        if self._thread is not None:
            self._thread.join(timeout=1.0)
        # No more pokes now: SIGURG can go back to its default (ignored).
        _retrying(lambda: signal.signal(POKE_SIGNAL, self._previous_poke))
        for fd in (self._read_fd, self._write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """Around one ``input()`` call: a SIGINT meanwhile interrupts it (KeyboardInterrupt)."""
        if not self._active:
            yield
            return
        # Marked inside before our SIGINT handler is installed: a SIGINT it notes is then always poked for
        # (the watcher ignores one that comes while not inside). Everything after this is undone by leave().
        previous_sigint = signal.getsignal(signal.SIGINT)
        previous_wakeup: int | None = None
        self._sigint = False
        self._inside = True

        def leave() -> bool:
            """Put everything back; True when a SIGINT came that was not raised yet."""
            self._inside = False
            interrupted = _retrying(lambda: signal.signal(signal.SIGINT, previous_sigint))
            interrupted |= _retrying(lambda: signal.signal(POKE_SIGNAL, self._on_poke))
            if previous_wakeup is not None:
                signal.set_wakeup_fd(previous_wakeup)
            pending, self._sigint = self._sigint, False
            return interrupted or pending

        try:
            previous_wakeup = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
            # signal.signal() runs pending handlers first: a Ctrl-C typed ahead raises here, and leave() runs.
            signal.signal(signal.SIGINT, self._on_sigint)
            yield
        except BaseException:
            leave()  # a KeyboardInterrupt is already on its way: another one is the same Ctrl-C
            raise
        if leave():
            raise KeyboardInterrupt  # Ctrl-C came as input() returned: it still counts

    def _on_sigint(self, _signum: int, _frame: FrameType | None) -> None:
        """Note the SIGINT; the poke that follows raises it (see the module docstring)."""
        self._sigint = True

    def _on_poke(self, _signum: int, _frame: FrameType | None) -> None:
        """Runs after SIGINT's handler when both are pending: raise the Ctrl-C noted during input()."""
        if self._inside and self._sigint:
            self._sigint = False
            self._inside = False  # the watcher stops poking now, not when leave() runs
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(POKE_SIGNAL, signal.default_int_handler)
            raise KeyboardInterrupt
        self._poked = True

    def _watch(self) -> None:
        """The pipe's reader: after a SIGINT, poke the main thread until it has left ``input()``."""
        while True:
            try:
                data = os.read(self._read_fd, 64)
            except OSError:
                return
            if not data or _STOP in data:
                return
            if signal.SIGINT in data:
                self._poke_until_left()

    def _poke_until_left(self) -> None:
        if self._main_ident is None:
            return
        for _ in range(MAX_POKES):
            if not self._inside:
                return
            self._poked = False
            try:
                signal.pthread_kill(self._main_ident, POKE_SIGNAL)
            except (OSError, ValueError):
                return
            time.sleep(POKE_INTERVAL_S)
            if self._poked or not self._inside:
                return


def _retrying(action: Callable[[], object]) -> bool:
    """Run ``action`` (setting a signal handler), again if a pending handler raised KeyboardInterrupt first
    (``signal.signal`` runs pending handlers before it changes one); True if one did."""
    interrupted = False
    for _ in range(3):
        try:
            action()
        except KeyboardInterrupt:
            interrupted = True
            continue
        break
    return interrupted
