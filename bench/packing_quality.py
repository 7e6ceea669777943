"""Does packing (data.packing: auto, the default) keep quality? Same data, same epochs, packed vs unpacked. A script.

    python -m bench.packing_quality                       # short-chat, 1,000 samples, 1 epoch (~5 min on 2 cores)
    python -m bench.packing_quality --workload short-completion --limit 800

Each side is a real ``effine train`` run (bench/product.py's workload config, ``max_steps`` unset so that
``train.epochs`` decides): ``data.packing: auto`` (packed rows; ``train.batch_size`` still counts samples, so a step
takes the rows of about that many samples) against ``data.packing: false``. Reported: optimizer steps, training
seconds, tokens/s, and the held-out eval loss after the epoch(s), with the CPU and its measured bf16 peak. Appends to
bench/results/packing_quality.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from bench.common import BENCH_DIR
from bench.product import PRODUCTS, ROOT, effine_config


def run(workload: str, packing, limit: int, epochs: float) -> dict:
    p = PRODUCTS[workload]
    run_dir = Path(tempfile.mkdtemp(prefix=f"bench-packq-{workload}-")) / "run"
    cfg = effine_config(p, "effine", run_dir, steps=1)
    cfg["train"].pop("max_steps")
    cfg["train"].update(epochs=epochs, eval_every=None, log_every=10)
    cfg["data"].update(packing=packing, limit=limit)
    path = run_dir.parent / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "effine", "train", str(path)], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        raise SystemExit(f"effine train failed ({packing=}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    s = json.loads((run_dir / "summary.json").read_text())
    return {"packing": packing, "steps": s["steps"], "train_s": s["train_seconds"], "tokens_per_s": s["tokens_per_s"],
            "eval_before": s["eval_before"]["eval_loss"], "eval_after": s["eval_after"]["eval_loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", default="short-chat", choices=sorted(PRODUCTS))
    ap.add_argument("--limit", type=int, default=1000, help="training samples (data.limit)")
    ap.add_argument("--epochs", type=float, default=1.0)
    args = ap.parse_args()
    from bench.run import cpu_info, matmul_peak

    cpu, peak = cpu_info(), matmul_peak(os.cpu_count() or 1, 576, None, quick=True)["bf16 2048^3"]
    rows = [run(args.workload, packing, args.limit, args.epochs) for packing in ("auto", False)]
    packed, plain = rows
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"## {args.workload}: {args.limit} samples, {args.epochs:g} epoch(s) — {when}", "",
             f"`python -m bench.packing_quality {' '.join(sys.argv[1:])}` — CPU: {cpu['model']}, {cpu['affinity']} "
             f"cores, bf16 2048^3 matmul peak {peak / 1e12:.2f} TFLOP/s", "",
             "| data.packing | steps | train s | tokens/s | eval loss before | eval loss after |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['packing']} | {r['steps']} | {r['train_s']:.0f} | {r['tokens_per_s']:.0f} | "
                     f"{r['eval_before']:.4f} | {r['eval_after']:.4f} |")
    lines += ["", f"Packed vs unpacked: training time {packed['train_s'] / plain['train_s']:.2f}x, eval loss after "
              f"{packed['eval_after'] - plain['eval_after']:+.4f} ({'no worse' if packed['eval_after'] <= plain['eval_after'] + 0.005 else 'WORSE'} "
              "within 0.005).", ""]
    md = "\n".join(lines)
    print(md)
    out = BENCH_DIR / "results" / "packing_quality.md"
    if not out.exists():
        out.write_text("# Packing and quality: same data, same epochs (bench/packing_quality.py)\n\n")
    with out.open("a") as f:
        f.write(md + "\n")


if __name__ == "__main__":
    main()
