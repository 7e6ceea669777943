"""Benchmark: attention forward+backward memory vs sequence length on CPU (eager vs SDPA vs the packed path).

Not a test. B=1, 8 heads, head dim 64, bf16, causal. Each (impl, T) point runs in a fresh subprocess (after a
small warm-up); we report the peak RSS (``ru_maxrss``) minus the RSS right before the call and minus the inputs
(q, k, v and the upstream gradient), i.e. the attention's own working memory, plus wall time of one
forward+backward. ``--device cuda`` measures ``torch.cuda.max_memory_allocated`` instead (after a full-size
warm-up). Eager materialises S and P (8 * T^2 fp32 each), so it grows ~4x per doubling of T; SDPA's
CPU flash kernel keeps O and the logsumexp only, so it grows ~2x (linear).

    python -m bench.attention_memory                 # T in 1024 2048 4096 8192
    python -m bench.attention_memory --lengths 1024 2048 --docs 4 --json out.json

impls: eager (fp32 reference, explicit mask), sdpa (is_causal=True, no mask), packed (the row holds --docs
documents; SDPA runs once per document), packed-mask (same documents through one SDPA call with a block-diagonal
mask: what a generic masked implementation does).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

IMPLS = ("eager", "sdpa", "packed", "packed-mask")


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


def _worker(impl: str, T: int, heads: int, dim: int, docs: int, device: str) -> dict:
    import torch

    from effine.ops import attention as A

    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def inputs(T):
        torch.manual_seed(0)
        mk = lambda: torch.randn(1, heads, T, dim, dtype=torch.bfloat16, device=device)  # noqa: E731
        return mk().requires_grad_(), mk().requires_grad_(), mk().requires_grad_(), mk()

    def run(T):
        q, k, v, up = inputs(T)
        cu = torch.tensor([round(i * T / docs) for i in range(docs + 1)], dtype=torch.int32)
        if impl == "eager":
            out = A.attention(q, k, v, backend="eager")
        elif impl == "sdpa":
            out = A.attention(q, k, v, backend="sdpa")
        elif impl == "packed":
            out = A.attention(q, k, v, backend="sdpa", cu_seqlens=cu)
        else:  # packed-mask: same documents, one SDPA call with an explicit (T, T) block-diagonal causal mask
            keep = A._structural_mask(1, T, T, True, None, cu, q.device)
            out = A.attention(q, k, v, backend="sdpa", causal=False, mask=keep)
        (out * up).sum().backward()
        sync()

    # Warm-up (thread pools, kernel selection). On CPU at a small size, since ru_maxrss cannot be reset; on CUDA
    # at full size, then the peak counter is reset.
    run(T if cuda else min(T, 256))
    if cuda:
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_kib() * 1024
    t0 = time.perf_counter()
    run(T)
    elapsed = time.perf_counter() - t0
    # inputs (4 x H*T*d bf16) are allocated inside run(), so subtract them to leave the attention's own memory
    inputs_bytes = 4 * heads * T * dim * 2
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "impl": impl,
        "T": T,
        "device": device,
        "docs": docs if impl.startswith("packed") else 1,
        "time_s": round(elapsed, 4),
        "peak_delta_mib": round((peak - base - inputs_bytes) / 2**20, 1),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--docs", type=int, default=4)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--json", default=None)
    ap.add_argument("--_worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._worker:
        impl, T = args._worker
        print("RESULT " + json.dumps(_worker(impl, int(T), args.heads, args.dim, args.docs, args.device)))
        return

    limit = 0.85 * _mem_available_bytes() if args.device == "cpu" else 64 * 2**30
    rows = []
    what = "peak RSS delta MiB" if args.device == "cpu" else "peak CUDA alloc MiB"
    print(f"{'impl':12s} {'T':>6s} {'time s':>8s} {what:>20s}")
    for impl in args.impls.split(","):
        for T in args.lengths:
            # eager keeps ~5 fp32 (H, T, T) buffers alive at its peak (scores, probs, their grads, the mask)
            est = 5 * args.heads * T * T * 4 if impl == "eager" else 64 * 2**20
            if est > limit:
                print(f"{impl:12s} {T:6d} skipped: needs ~{est / 2**30:.1f} GiB")
                rows.append({"impl": impl, "T": T, "skipped": True})
                continue
            cmd = [sys.executable, "-m", "bench.attention_memory", "--heads", str(args.heads), "--dim", str(args.dim),
                   "--docs", str(args.docs), "--device", args.device, "--_worker", impl, str(T)]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode != 0 or not line:
                print(f"{impl:12s} {T:6d} FAILED rc={out.returncode}: {out.stderr[-300:]}")
                continue
            res = json.loads(line[0][len("RESULT ") :])
            rows.append(res)
            print(f"{impl:12s} {T:6d} {res['time_s']:8.3f} {res['peak_delta_mib']:20.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
