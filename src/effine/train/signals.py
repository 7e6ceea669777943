"""SIGTERM and Ctrl-C: stop between optimizer steps, checkpoint, exit with 128 + the signal number.

    with StopSignals(log) as stop:       # installed for the whole run (loading included)
        ... load data and model ...      # a signal here raises Interrupted at once: nothing to save yet
        with stop.deferred():            # the training loop
            ... one optimizer step ...
            if stop.received: checkpoint, then raise Interrupted(stop.received)

Inside ``deferred()`` the first SIGTERM or SIGINT only sets ``received``: the loop finishes the step in progress,
writes a checkpoint and raises :class:`Interrupted`. A second SIGINT (Ctrl-C pressed twice) raises
``KeyboardInterrupt`` at once and nothing more is saved; a second SIGTERM is ignored (launchers often forward one
SIGTERM several times, and a grace period usually follows). The CLI exits 130 (SIGINT) or 143 (SIGTERM).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable, Iterator

NAMES = {signal.SIGINT: "SIGINT (Ctrl-C)", signal.SIGTERM: "SIGTERM"}


class Interrupted(Exception):
    """The run stopped on a signal; ``exit_code`` is 128 + the signal number (130 SIGINT, 143 SIGTERM)."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message or f"interrupted by {NAMES.get(signum, signum)}")
        self.signum = signum
        self.exit_code = 128 + signum


class StopSignals:
    def __init__(self, log: Callable[[str], None] = print):
        self.log = log
        self.received: int | None = None
        self.phase = "starting"  # what the run is doing, for the message of a signal outside the training loop
        self._deferring = False
        self._old: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            self._old = {s: signal.signal(s, self._handle) for s in NAMES}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False

    def _handle(self, signum: int, frame) -> None:
        if not self._deferring:
            self.received = signum
            raise Interrupted(signum, f"interrupted by {NAMES.get(signum, signum)} while {self.phase}")
        if self.received is None:
            self.received = signum
            self.log(f"\n[effine] {NAMES[signum]}: finishing the current optimizer step, then checkpointing "
                     "(Ctrl-C again aborts at once without saving).")
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt
