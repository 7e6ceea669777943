"""Benchmark: `effine plan`'s predicted peak memory vs the measured peak RSS of real training steps (CPU).

Not a test. For SmolLM2-135M and Gemma-3-270M, LoRA (bf16 base) and QLoRA (nf4), batch 4 x 512 and 8 x 256, with
and without gradient checkpointing: ``plan_memory(cfg)`` against ``measure_peak(cfg)`` (``prepare_model`` + a few
training steps of random, fully supervised token ids in a subprocess). Both are peak RSS *above the process
baseline* (the RSS after importing torch, transformers and effine): the prediction is ``plan.above_baseline``.

``--live`` also measures with ``MALLOC_MMAP_THRESHOLD_=65536``: glibc then serves every tensor with its own mmap and
returns it on free, so RSS follows the live bytes; it is compared with the plan without its allocator term. The gap
between the two measurements is glibc's heap retention, which the plan's allocator term models.

    python bench/memory_plan.py                           # all 16 cases, ~30-40 min on 2 cores
    python bench/memory_plan.py --models smollm2-135m-instruct --shapes 2x256 --steps 2 --live
    python bench/memory_plan.py --out bench/results/memory_plan.md --json bench/results/memory_plan.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

MODELS = ("smollm2-135m-instruct", "gemma3-270m")
METHODS = ("lora", "nf4")
SHAPES = ("4x512", "8x256")
LIVE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "EFFINE_ALLOCATOR": "system"}  # glibc, every tensor its own mmap


def make_config(model: str, method: str, shape: str, ckpt: bool):
    from effine.config import Config

    cfg = Config()
    B, T = (int(x) for x in shape.split("x"))
    cfg.model.name, cfg.model.dtype, cfg.model.gradient_checkpointing = model, "bf16", ckpt
    cfg.quant.method = "none" if method == "lora" else method
    cfg.train.batch_size, cfg.data.max_length = B, T
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--ckpt", nargs="+", default=["off", "on"], choices=["off", "on"])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--live", action="store_true", help="also measure with MALLOC_MMAP_THRESHOLD_ (live bytes)")
    ap.add_argument("--out", default=None, help="write the markdown table here")
    ap.add_argument("--json", default=None, help="write the raw rows here (after every case)")
    ap.add_argument("--resume", action="store_true", help="reuse the cases already in --json")
    args = ap.parse_args()

    from effine.plan.measure import measure_peak
    from effine.plan.memory import GiB, plan_memory

    rows = []
    done: dict[tuple, dict] = {}
    if args.json and args.resume and Path(args.json).is_file():  # keep the cases an interrupted run finished
        done = {(r["model"], r["method"], r["shape"], r["ckpt"]): r for r in json.loads(Path(args.json).read_text())}
    for model in args.models:
        for method in args.methods:
            for shape in args.shapes:
                for ck in args.ckpt:
                    key = (model, "lora" if method == "lora" else f"qlora-{method}", shape, ck)
                    if key in done:
                        rows.append(done[key])
                        continue
                    cfg = make_config(model, method, shape, ck == "on")
                    plan = plan_memory(cfg)
                    t0 = time.time()
                    m = measure_peak(cfg, steps=args.steps)
                    row = {"model": model, "method": "lora" if method == "lora" else f"qlora-{method}",
                           "shape": shape, "ckpt": ck, "plan": plan.to_dict(), "measured": m,
                           "pred": plan.above_baseline, "meas": m["peak"],
                           "err": 100 * (plan.above_baseline - m["peak"]) / m["peak"]}
                    if args.live:
                        live = measure_peak(cfg, steps=args.steps, env=LIVE_ENV)
                        pred_live = plan.above_baseline - plan.allocator
                        if plan.device == "cpu" and plan.runtime + plan.load_peak > plan.train_total:
                            pred_live = plan.above_baseline
                        row.update(live=live, pred_live=pred_live,
                                   err_live=100 * (pred_live - live["peak"]) / live["peak"])
                    rows.append(row)
                    print(f"{model:22s} {row['method']:10s} {shape:6s} ckpt {ck:3s} pred {plan.above_baseline / GiB:6.2f}"
                          f" meas {m['peak'] / GiB:6.2f} GiB ({row['err']:+5.1f}%)  load {m['load_peak'] / GiB:.2f} "
                          f"train {m['train_peak'] / GiB:.2f}"
                          + (f" | live pred {row['pred_live'] / GiB:.2f} meas {row['live']['peak'] / GiB:.2f} "
                             f"({row['err_live']:+.1f}%)" if args.live else "")
                          + f"  [{time.time() - t0:.0f}s]", flush=True)
                    if args.json:  # after every case: a long run that dies keeps what it measured
                        Path(args.json).write_text(json.dumps(rows, indent=1))
    md = format_table(rows, args)
    print(md)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(md)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def format_table(rows: list[dict], args) -> str:
    import torch
    import transformers

    G = 2**30
    live = any("live" in r for r in rows)
    head = ("| model | method | B x T | ckpt | predicted GiB | measured GiB | error | peak phase (plan) | "
            "measured load / train GiB |" + (" live pred / meas GiB | live error |" if live else ""))
    sep = "|" + "---|" * (head.count("|") - 1)
    lines = ["# effine plan: predicted vs measured peak memory (CPU)", "",
             f"{datetime.date.today()}, {platform.machine()}, torch {torch.__version__}, transformers "
             f"{transformers.__version__}, {args.steps} steps per case, bf16 base, LoRA r=16 on all linears (fp32 "
             "adapters), random fully-supervised token ids.", "",
             "Peak RSS above the process baseline (RSS after importing torch, transformers and effine). "
             "measured = max(load, train), VmHWM (reset with /proc/self/clear_refs between the load and the steps)."
             + (" live = the same run with MALLOC_MMAP_THRESHOLD_=65536 (RSS follows live bytes), predicted by the "
                "plan without its allocator term." if live else ""), "", head, sep]
    errs = []
    for r in rows:
        p, m = r["plan"], r["measured"]
        errs.append(abs(r["err"]))
        line = (f"| {r['model']} | {r['method']} | {r['shape'].replace('x', ' x ')} | {r['ckpt']} | {r['pred'] / G:.2f} | "
                f"{r['meas'] / G:.2f} | {r['err']:+.1f}% | {p['peak_phase'] if p['largest'] != 'load' else 'load'} | "
                f"{m['load_peak'] / G:.2f} / {m['train_peak'] / G:.2f} |")
        if live:
            line += f" {r['pred_live'] / G:.2f} / {r['live']['peak'] / G:.2f} | {r['err_live']:+.1f}% |"
        lines.append(line)
    lines += ["", f"Mean absolute error {sum(errs) / len(errs):.1f}%, worst {max(errs):.1f}% over {len(errs)} cases."]
    if live:
        le = [abs(r["err_live"]) for r in rows]
        lines.append(f"Live (allocator-neutral) mean absolute error {sum(le) / len(le):.1f}%, worst {max(le):.1f}%.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
