"""Micro-benchmark: NF4 dequantization and QuantLinear forward+backward vs a bf16 nn.Linear (CPU, bf16 compute).

Run:  python -m bench.quant_dequant [--tokens 256] [--repeats 15] [--threads N]

For each weight shape (out_features, in_features) it reports the median wall time of
  * dequantize: NF4 (double quant) -> bf16 dense weight,
  * fwd+bwd: y = layer(x); y.backward(g) with x requiring grad and the weight frozen (the QLoRA situation:
    only dL/dx is needed), for a bf16 nn.Linear and for QuantLinear nf4 / int4 / int8 (group 128).
The ratio column is time / time(bf16 nn.Linear). Timings are noisy on shared machines: the repeats of the
different layers are interleaved so that load spikes hit all of them alike; the load average is printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn as nn

from effine.quant import QuantLinear, dequantize_nf4, quantize_nf4


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(shapes, tokens: int, repeats: int) -> list[tuple]:
    rows = []
    for out_f, in_f in shapes:
        torch.manual_seed(0)
        lin = nn.Linear(in_f, out_f, bias=False).to(torch.bfloat16).requires_grad_(False)
        state = quantize_nf4(lin.weight, blocksize=64, double_quant=True)
        layers = {"bf16 nn.Linear": lin}
        for method in ("nf4", "int4", "int8"):
            layers[f"QuantLinear {method}"] = QuantLinear.from_linear(
                lin, method=method, group_size=128, compute_dtype=torch.bfloat16
            )
        x = torch.randn(tokens, in_f, dtype=torch.bfloat16)
        g = torch.randn(tokens, out_f, dtype=torch.bfloat16)

        def fwd_bwd(layer):
            xi = x.detach().requires_grad_()
            layer(xi).backward(g)

        jobs = {"dequant nf4 (dq)": lambda: dequantize_nf4(state, torch.bfloat16)}
        for name, layer in layers.items():
            jobs[f"fwd+bwd {name}"] = (lambda layer=layer: fwd_bwd(layer))
        for name, layer in layers.items():
            if name != "bf16 nn.Linear":
                jobs[f"dequant {name.split()[-1]} (module)"] = layer.dequantize
        times: dict[str, list[float]] = {k: [] for k in jobs}
        for fn in jobs.values():  # warm-up
            fn()
        for _ in range(repeats):  # interleaved repeats
            for k, fn in jobs.items():
                times[k].append(_time(fn))
        base = statistics.median(times["fwd+bwd bf16 nn.Linear"])
        for k, ts in times.items():
            med = statistics.median(ts)
            ratio = f"{med / base:5.2f}x" if k.startswith("fwd+bwd") else ""
            rows.append((f"{out_f}x{in_f}", k, med * 1e3, ratio))
        nb = layers["QuantLinear nf4"].nbytes()
        rows.append((f"{out_f}x{in_f}", "storage nf4 / bf16 bytes", nb / (out_f * in_f * 2), ""))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=256, help="rows of x (batch * sequence)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, tokens {args.tokens}, "
          f"repeats {args.repeats} (median), load avg {load:.2f}")
    rows = run([(2048, 2048), (576, 1536)], args.tokens, args.repeats)
    print(f"{'weight':>10} | {'what':<34} | {'ms / value':>10} | {'vs bf16':>7}")
    print("-" * 72)
    for shape, what, val, ratio in rows:
        unit = f"{val:10.3f}" if "storage" in what else f"{val:10.2f}"
        print(f"{shape:>10} | {what:<34} | {unit} | {ratio:>7}")


if __name__ == "__main__":
    main()
