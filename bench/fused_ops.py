"""Benchmark: fused RMSNorm + gated activation (effine.ops.swap.fuse_model) vs transformers' eager modules.

Not a test. SmolLM2-135M-Instruct in bf16, LoRA r=16 on every linear of the decoder layers with fp32 adapter
parameters, effine attention (SDPA), one micro-batch of 4 x 512 random tokens with the first half of every row's
labels masked, through ``effine.train.loop.backward_window`` (the training loop's forward + backward). Each config
runs in its own subprocess; configs are interleaved over ``--rounds`` to spread machine contention. Per config:

configs: ``eager`` (transformers' modules), ``fused-norecompute`` (fused RMSNorm + gated activation only),
``fused`` (also recomputing the down projection's input instead of letting its LoRA keep it; the default).

* saved_mib   bytes autograd keeps for backward in one forward (``saved_tensors_hooks``; unique storages, model
              parameters and buffers excluded) — exact and noise-free;
* peak_mib    peak RSS of the steps minus the RSS after loading (``VmHWM`` reset via ``/proc/self/clear_refs``
              after loading where permitted, else the plain ``VmHWM``);
* step_s      median of ``--steps`` forward+backward steps after ``--warmup`` warm-up steps (grads zeroed between);
              also their minimum and the median CPU time of this process per step (with ``--threads 1`` the CPU
              time is the least contention-sensitive figure on a shared machine);
* busy        cores other processes kept busy during the timed steps (from /proc/stat; 2-core machine shared).

    python bench/fused_ops.py                       # both configs, 1 round
    python bench/fused_ops.py --rounds 2 --json out.json
    python bench/fused_ops.py --micro               # op-level fwd+bwd timings only (SmolLM2 shapes, bf16)

``--micro`` times each op alone (forward + backward, bf16, 4*512 rows, SmolLM2's hidden 576 / MLP 1536), eager
and fused alternating, median of ``--micro-repeats``: less exposed to contention than whole steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

CONFIGS = ("eager", "fused-norecompute", "fused")


def _worker(config: str, B: int, T: int, warmup: int, steps: int, seed: int, threads: int) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    from common import cpu_snapshot, foreign_cores, hwm_bytes, reset_peak, rss_bytes
    from effine.adapters import inject_lora
    from effine.config import AdapterConfig
    from effine.data import collate
    from effine.data.example import IGNORE, Example
    from effine.model.loader import load_model, resolve_model_dir
    from effine.ops.attention import enable
    from effine.ops.swap import fuse_model
    from effine.ops.model_loss import loss_sum
    from effine.train.step import backward_window
    from effine.plan.measure import saved_for_backward_bytes

    torch.manual_seed(seed)
    model = load_model(resolve_model_dir("smollm2-135m-instruct"), "bf16")
    enable(model)
    inject_lora(model, AdapterConfig(r=16), dtype=torch.float32)
    counts = fuse_model(model, recompute=config == "fused") if config.startswith("fused") else {}
    model.train()

    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    examples = []
    for i in range(B):
        ids = torch.randint(0, vocab, (T,), generator=g).tolist()
        labels = [IGNORE] * (T // 2) + ids[T // 2:]
        examples.append(Example(ids, labels, f"random:{i}"))
    batch = collate(examples, pad_id=0)

    cpu_times: list[float] = []

    def step() -> float:
        c0, t0 = time.process_time(), time.perf_counter()
        backward_window(model, [batch])
        dt = time.perf_counter() - t0
        cpu_times.append(time.process_time() - c0)
        model.zero_grad(set_to_none=True)
        return dt

    rss_load = rss_bytes()
    peak_reset = reset_peak()
    for _ in range(warmup):
        step()
    cpu_times.clear()
    c0, t0 = cpu_snapshot(), time.perf_counter()
    times = [step() for _ in range(steps)]
    busy = foreign_cores(c0, cpu_snapshot(), time.perf_counter() - t0)
    peak = hwm_bytes()

    # Saved-for-backward bytes of one forward (the loss forward of the same batch), measured last.
    saved = saved_for_backward_bytes(model, lambda: loss_sum(model, batch))
    return {
        "config": config,
        "B": B,
        "T": T,
        "swapped": counts,
        "saved_mib": round(saved / 2**20, 1),
        "saved_kib_per_token_layer": round(saved / (B * T * model.config.num_hidden_layers) / 1024, 2),
        "rss_after_load_mib": round(rss_load / 2**20, 1),
        "peak_mib": round((peak - rss_load) / 2**20, 1),
        "peak_reset": peak_reset,
        "step_s": round(statistics.median(times), 3),
        "step_times": [round(x, 3) for x in times],
        "step_min_s": round(min(times), 3),
        "cpu_s": round(statistics.median(cpu_times), 3),
        "busy_cores": round(busy, 2),
        "threads": torch.get_num_threads(),
    }


def _micro(repeats: int, rows: int = 2048, hidden: int = 576, inter: int = 1536) -> list[dict]:
    import torch

    from effine.ops.fused import gated_act, rms_norm

    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, hidden, generator=g).bfloat16().requires_grad_()
    w = torch.nn.Parameter(torch.rand(hidden, generator=g).bfloat16() + 0.5, requires_grad=False)
    gate = torch.randn(rows, inter, generator=g).bfloat16().requires_grad_()
    up = torch.randn(rows, inter, generator=g).bfloat16().requires_grad_()
    gy_n, gy_a = torch.randn(rows, hidden).bfloat16(), torch.randn(rows, inter).bfloat16()
    cases = {
        "rms_norm (llama)": (lambda f: rms_norm(x, w, 1e-5, fused=f), gy_n, (x,)),
        "rms_norm (gemma)": (lambda f: rms_norm(x, w, 1e-6, 1.0, fused=f), gy_n, (x,)),
        "gated_act silu": (lambda f: gated_act(gate, up, "silu", fused=f), gy_a, (gate, up)),
        "gated_act gelu_tanh": (lambda f: gated_act(gate, up, "gelu_tanh", fused=f), gy_a, (gate, up)),
    }
    out = []
    for name, (fn, gy, ins) in cases.items():
        times: dict[bool, list[float]] = {False: [], True: []}
        for i in range(repeats + 1):
            for fused in (False, True):
                t0 = time.perf_counter()
                y = fn(fused)
                torch.autograd.grad(y, ins, gy)
                if i:  # the first round warms up
                    times[fused].append(time.perf_counter() - t0)
        e, f = statistics.median(times[False]), statistics.median(times[True])
        out.append({"op": name, "eager_ms": round(e * 1e3, 2), "fused_ms": round(f * 1e3, 2)})
        print(f"{name:22s} eager {e * 1e3:8.2f} ms   fused {f * 1e3:8.2f} ms   ratio {f / e:5.2f}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads in the workers (0: torch's default)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--micro", action="store_true", help="op-level timings only")
    ap.add_argument("--micro-repeats", type=int, default=21)
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._worker:
        res = _worker(args._worker, args.batch, args.length, args.warmup, args.steps, args.seed, args.threads)
        print("RESULT " + json.dumps(res), flush=True)
        return

    if args.micro:
        rows = _micro(args.micro_repeats)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
        return

    rows = []
    hdr = f"{'config':18s} {'saved MiB':>10s} {'KiB/tok/layer':>14s} {'peak RSS MiB':>13s} {'step s':>8s} {'min s':>7s} {'cpu s':>7s} {'busy':>5s}"
    print(hdr)
    for _ in range(args.rounds):
        for config in args.configs.split(","):
            cmd = [sys.executable, __file__, "--batch", str(args.batch), "--length", str(args.length),
                   "--warmup", str(args.warmup), "--steps", str(args.steps), "--seed", str(args.seed),
                   "--threads", str(args.threads), "--_worker", config]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode != 0 or not line:
                print(f"{config:18s} FAILED rc={out.returncode}: {out.stderr[-600:]}")
                continue
            r = json.loads(line[0][len("RESULT "):])
            rows.append(r)
            print(f"{config:18s} {r['saved_mib']:10.1f} {r['saved_kib_per_token_layer']:14.2f} {r['peak_mib']:13.1f} "
                  f"{r['step_s']:8.2f} {r['step_min_s']:7.2f} {r['cpu_s']:7.2f} {r['busy_cores']:5.2f}   {r['step_times']} {r['swapped']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
