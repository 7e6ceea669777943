"""Run ``effine`` commands as real child processes, cheaply: forked from a server that has imported effine.

Each call is its own OS process (own pid, own signal handlers, killed by real signals, exit status from the
kernel), running ``effine.cli.main(argv)`` exactly as ``python -m effine.cli`` does. The forkserver imports torch,
transformers and effine once (about 2 s); each child then starts in milliseconds instead of paying that again,
which is what lets the fault-injection tests afford dozens of killed-and-resumed segments.
The server never runs a tensor op (forking after OpenMP has started is not safe); children set their own threads.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

_CTX = multiprocessing.get_context("forkserver")
_CTX.set_forkserver_preload(["tests.forked_preload"])


@dataclass
class Result:
    rc: int  # exit code; -N when killed by signal N
    output: str  # stdout and stderr together
    seconds: float


def _child(argv: list[str], env: dict[str, str], log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(env)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # the forkserver ignores Ctrl-C; effine must not
    from effine.cli import main

    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def start(argv: list[str], log: Path, env: dict[str, str] | None = None) -> multiprocessing.Process:
    env = {"EFFINE_ALLOCATOR": "system", "TQDM_DISABLE": "1", **(env or {})}
    p = _CTX.Process(target=_child, args=(argv, env, str(log)))
    p.start()
    return p


def run(argv: list[str], log: Path, env: dict[str, str] | None = None, timeout: float = 120) -> Result:
    t0 = time.perf_counter()
    p = start(argv, log, env)
    p.join(timeout)
    if p.exitcode is None:
        p.kill()
        p.join()
        raise TimeoutError(f"effine {' '.join(argv)} ran over {timeout} s; log {log}:\n{log.read_text()[-3000:]}")
    return Result(p.exitcode, log.read_text(), time.perf_counter() - t0)
