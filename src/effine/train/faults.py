"""Fault injection for tests: make this process fail at a named point, so that crash safety can be proven.

A TEST HOOK, not a feature: set ``EFFINE_FAULT`` only to test effine itself. Unset (the normal case) every
:func:`fault` call is one dictionary lookup.

    EFFINE_FAULT=POINT:N[:ACTION][,POINT:N[:ACTION]...]

fires ACTION the N-th time (1-based, counted per process) this process reaches POINT. Actions:

    kill     SIGKILL this process (default): nothing runs after it, no handler, no cleanup
    term     send SIGTERM to this process      int      send SIGINT to this process (a Ctrl-C)
    enospc   raise OSError(ENOSPC) as a full disk would, from the write in progress
    oom      raise MemoryError, as running out of memory would

Points (where they are in the code):

    load:data  load:model                  run.py, before building the data / loading the model
    step:start                             loop.py, before a window's micro-batches are drawn
    step:backward                          step.py, after the window's backward, before the optimizer update
    step:logged                            loop.py, after a step's metrics row is written
    save:start  save:file  save:manifest   checkpoint.py: staging dir made / after each file is written and
    save:rename  save:renamed                fsynced / manifest written / before and after the commit rename
    save:rotate                            checkpoint.py, an old checkpoint moved to trash, before it is deleted
    outputs:start                          run.py, training done and checkpointed, before the final eval/outputs
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from collections import Counter

ENV = "EFFINE_FAULT"
ACTIONS = ("kill", "term", "int", "enospc", "oom")
_hits: Counter = Counter()
_parsed: dict[str, dict[str, list[tuple[int, str]]]] = {}


def parse(spec: str) -> dict[str, list[tuple[int, str]]]:
    """``"save:file:3,step:start:2:term"`` -> ``{"save:file": [(3, "kill")], "step:start": [(2, "term")]}``."""
    plan: dict[str, list[tuple[int, str]]] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        parts = item.split(":")
        action = parts.pop() if parts[-1] in ACTIONS else "kill"
        if len(parts) < 2 or not parts[-1].isdigit():
            raise ValueError(f"{ENV}={spec!r}: expected POINT:N[:ACTION] items, got {item!r}")
        plan.setdefault(":".join(parts[:-1]), []).append((int(parts[-1]), action))
    return plan


def fault(point: str) -> None:
    """Fire the fault planned for the current hit of ``point``, if any (see the module docstring)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    plan = _parsed.get(spec) or _parsed.setdefault(spec, parse(spec))
    if point not in plan:
        return
    _hits[point] += 1
    for n, action in plan[point]:
        if n == _hits[point]:
            print(f"[{ENV}] {action} at {point} (hit {n})", file=sys.stderr, flush=True)
            if action == "enospc":
                raise OSError(errno.ENOSPC, f"No space left on device ({ENV} at {point})")
            if action == "oom":
                raise MemoryError(f"out of memory ({ENV} at {point})")
            os.kill(os.getpid(), {"kill": signal.SIGKILL, "term": signal.SIGTERM, "int": signal.SIGINT}[action])
