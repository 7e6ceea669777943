"""Benchmark: full-logits reference vs chunked linear cross-entropy (forward + backward), time and peak RSS.

Not a test. Each (config, impl) point runs in a fresh subprocess so that ``ru_maxrss`` (the process's peak resident
set) measures that point alone; we report the peak minus the resident set right before the loss call (inputs and
the torch runtime are already resident then, so the delta is the loss's own working memory).

    python -m bench.loss_bench                      # N=4096 tokens, half labelled, bf16, V in {49152, 262144}
    python -m bench.loss_bench --frozen-weight      # LoRA case: lm_head frozen, no dL/dW
    python -m bench.loss_bench --json out.json
    python -m bench.loss_bench --device cuda --reps 5   # torch.cuda.max_memory_allocated instead of RSS

A point whose rough estimate exceeds the memory limit (default: 85% of MemAvailable) is skipped, not run: the
reference at V=262144 needs ~4 (N, V) fp32 buffers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

CONFIGS = [  # (name, vocab, hidden)
    ("smollm2-like V=49152 H=576", 49152, 576),
    ("gemma3-like V=262144 H=640", 262144, 640),
]


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _mem_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _worker(impl: str, vocab: int, hidden: int, n: int, frozen: bool, reps: int, device: str) -> dict:
    import torch

    from effine.ops.loss import linear_cross_entropy

    cuda = device == "cuda"
    torch.manual_seed(0)
    h = torch.randn(n, hidden, dtype=torch.bfloat16, device=device, requires_grad=True)
    w = (torch.randn(vocab, hidden, device=device) * 0.02).to(torch.bfloat16).requires_grad_(not frozen)
    y = torch.randint(0, vocab, (n,), device=device)
    y[torch.randperm(n)[: n // 2]] = -100  # half of the positions carry a label

    def step():
        h.grad = None
        w.grad = None
        loss, cnt = linear_cross_entropy(h, w, y, impl=impl)
        (loss / cnt).backward()
        return loss.item()  # .item() also synchronises CUDA

    if cuda:
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_kib() * 1024
    t0 = time.perf_counter()
    loss = step()  # first call: includes allocator warm-up, sets the peak
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    if cuda:
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "impl": impl,
        "vocab": vocab,
        "hidden": hidden,
        "n_tokens": n,
        "frozen_weight": frozen,
        "device": device,
        "threads": torch.get_num_threads(),
        "loss": loss,
        "first_s": round(first, 3),
        "time_s": round(min(times) if times else first, 3),
        "peak_delta_mib": round((peak - base) / 2**20, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--frozen-weight", action="store_true")
    ap.add_argument("--impls", default="reference,chunked")
    ap.add_argument("--mem-limit-gb", type=float, default=None)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--json", default=None)
    ap.add_argument("--_worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._worker:
        impl, vocab, hidden, frozen = args._worker
        res = _worker(impl, int(vocab), int(hidden), args.n, frozen == "1", args.reps, args.device)
        print("RESULT " + json.dumps(res))
        return

    if args.mem_limit_gb:
        limit = args.mem_limit_gb * 2**30
    else:
        limit = 0.85 * _mem_available_bytes() if args.device == "cpu" else 60 * 2**30
    rows = []
    for name, vocab, hidden in CONFIGS:
        for impl in args.impls.split(","):
            # rough working-set estimate: reference ~4 fp32 (N, V) buffers; chunked ~ grad_w fp32 + a few chunks
            est = 4 * args.n * vocab * 4 if impl == "reference" else 3 * vocab * hidden * 4 + 3 * 2**28
            if est > limit:
                skip = f"needs ~{est / 2**30:.1f} GiB"
                rows.append({"impl": impl, "vocab": vocab, "hidden": hidden, "skipped": skip})
                print(f"{name:32s} {impl:10s} skipped (needs ~{est / 2**30:.1f} GiB > limit {limit / 2**30:.1f})")
                continue
            cmd = [sys.executable, "-m", "bench.loss_bench", "--n", str(args.n), "--reps", str(args.reps), "--device", args.device,
                   "--_worker", impl, str(vocab), str(hidden), "1" if args.frozen_weight else "0"]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode != 0 or not line:
                rows.append({"impl": impl, "vocab": vocab, "hidden": hidden, "error": out.stderr[-500:]})
                print(f"{name:32s} {impl:10s} FAILED rc={out.returncode}: {out.stderr[-300:]}")
                continue
            res = json.loads(line[0][len("RESULT ") :])
            rows.append(res)
            what = "peak RSS delta" if args.device == "cpu" else "peak CUDA alloc delta"
            print(
                f"{name:32s} {impl:10s} time {res['time_s']:7.3f} s (first {res['first_s']:.3f})"
                f"  {what} {res['peak_delta_mib']:9.1f} MiB  loss {res['loss']:.2f}"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
