"""Helpers shared by the benchmark runner and both workers (no torch import at module level).

* memory: resident set now, the peak since a reset (``/proc/self/clear_refs`` + ``VmHWM``), and a sampler thread;
* a deterministic LoRA ``A`` initialisation keyed by module path, so effine and PEFT start from identical adapters;
* reading the pre-tokenised workload file;
* the result line protocol (one ``BENCH_RESULT {json}`` line on stdout).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import threading
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
CACHE_DIR = BENCH_DIR / "cache"  # pre-tokenised workloads, derived JSONL data, the random model (git-ignored)
RESULT_PREFIX = "BENCH_RESULT "
PAGE = os.sysconf("SC_PAGE_SIZE")


# -- memory -----------------------------------------------------------------------------------------------------


def rss_bytes() -> int:
    """Current resident set of this process (from /proc/self/statm: cheap enough to sample every few ms)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def hwm_bytes() -> int:
    """Peak resident set (VmHWM) since process start or the last :func:`reset_peak`."""
    return _status_kib("VmHWM") * 1024


def maxrss_bytes() -> int:
    """``getrusage(RUSAGE_SELF).ru_maxrss`` (KiB on Linux) in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs).

    After this, VmHWM (and ru_maxrss, as long as no thread has exited) is the peak of what follows only, so the
    training peak is not hidden by a larger transient during model loading. Returns False where not permitted.
    """
    from effine.system.heap import reset_peak_rss  # imported here: workers time their own heavy imports

    return reset_peak_rss()


class RssSampler:
    """A daemon thread that samples the RSS every ``interval`` seconds: (t, rss) pairs and the running max."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self.max = 0
        self._stop = threading.Event()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "RssSampler":
        self._thread.start()
        return self

    def _run(self) -> None:
        last_kept = -1.0
        while not self._stop.is_set():
            r = rss_bytes()
            t = time.perf_counter() - self._t0
            self.max = max(self.max, r)
            if t - last_kept >= 0.25:  # keep a 4 Hz trace for the JSON; the max uses every sample
                self.samples.append((round(t, 3), r))
                last_kept = t
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1)


CLK = os.sysconf("SC_CLK_TCK")


def cpu_snapshot() -> tuple[float, float]:
    """(CPU-seconds used by the whole machine, CPU-seconds used by this process) so far.

    The machine total is user+nice+system+irq+softirq+steal from /proc/stat (idle and iowait excluded). Between two
    snapshots, (machine - own) / wall is how many cores OTHER processes kept busy: the contention during a step.
    """
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    busy = sum(v[:8]) - v[3] - v[4]
    return busy / CLK, time.process_time()


def foreign_cores(a: tuple[float, float], b: tuple[float, float], wall: float) -> float:
    return max(0.0, ((b[0] - a[0]) - (b[1] - a[1])) / max(wall, 1e-9))


def loadavg() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


# -- deterministic LoRA init ------------------------------------------------------------------------------------


def lora_a_init(module_path: str, r: int, in_features: int, seed: int = 0):
    """LoRA ``A`` (r, in) for one module: kaiming-uniform(a=sqrt(5)) bounds, drawn from a generator seeded by the
    module path. Both workers overwrite their adapters' A with this, so both sides start bit-identical (B = 0)."""
    import math

    import torch

    digest = hashlib.sha256(f"{seed}:{module_path}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform(a=sqrt(5)) on (r, in): gain*sqrt(3/fan_in) = 1/sqrt(in)
    return (torch.rand(r, in_features, generator=g, dtype=torch.float32) * 2 - 1) * bound


# -- data file --------------------------------------------------------------------------------------------------


def effine_version() -> dict[str, Any]:
    """Which effine ran: git HEAD of the checkout and a digest of every src/effine/*.py as it is on disk now (the
    tree may hold uncommitted edits; two runs with different digests ran different effine code)."""
    import subprocess

    import effine

    root = Path(effine.__file__).resolve().parent
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(p.read_bytes())
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", str(root)],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        head, dirty = "?", ""
    return {"git_head": head, "src_dirty": bool(dirty), "src_digest": h.hexdigest()[:16]}


def read_workload_file(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def emit(result: dict[str, Any]) -> None:
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def parse_result(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    return None


def batch_stats(batch_rows: list[list[int]], labels_rows: list[list[int]]) -> dict[str, int]:
    """Non-pad tokens, supervised tokens (labels[1:] != -100, the positions that are predicted) and padded width."""
    width = max(len(r) for r in batch_rows)
    return {"tokens": sum(len(r) for r in batch_rows), "lengths": [len(r) for r in batch_rows],
            "supervised": sum(sum(1 for y in lab[1:] if y != -100) for lab in labels_rows),
            "width": width, "padded": width * len(batch_rows)}


def heldout_loss(model, examples: list[dict[str, Any]], autocast_dtype=None) -> dict[str, Any]:
    """Token-mean next-token cross-entropy of ``model`` on held-out examples: the same code on both sides.

    One example per forward (no padding, no mask), the model's own logits, fp32 log-softmax here; position t
    predicts labels[t + 1] (unshifted labels, -100 = no loss), as in training. ``autocast_dtype``: run the forward
    under CPU autocast (TRL's matched mode trains under bf16 autocast and is evaluated the same way).
    """
    import contextlib

    import torch

    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            for e in examples:
                ids = torch.tensor([e["input_ids"]])
                lab = torch.tensor(e["labels"][1:])
                keep = lab != -100
                if not bool(keep.any()):
                    continue
                ctx = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
                with ctx:
                    logits = model(input_ids=ids).logits[0, :-1]
                lp = torch.log_softmax(logits[keep].float(), dim=-1)
                total += float(-lp.gather(1, lab[keep].view(-1, 1)).sum())
                n += int(keep.sum())
    finally:
        model.train(was_training)
    return {"loss": total / max(n, 1), "tokens": n, "examples": len(examples), "seconds": time.perf_counter() - t0}
