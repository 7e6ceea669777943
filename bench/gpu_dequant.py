"""CUDA micro-benchmark: 4-bit (NF4, double quant) dequantization to bf16, the ATen reference chain vs the Triton
kernel of effine.quant.nf4_triton, on Llama/Mistral weight shapes. Also checks that both give identical bits.

    python -m bench.gpu_dequant [--repeats 50] [--out results.json]

Time: median of ``--repeats`` CUDA-event-timed calls after 5 warm-ups. "GB/s" counts the bytes the kernel must
touch at least (packed codes + absmax state read, bf16 written), so it is comparable to the card's bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch


from effine.quant.nf4 import dequantize_nf4, quantize_nf4  # noqa: E402
from effine.quant.nf4_triton import dequantize_4bit_triton  # noqa: E402

SHAPES = [(2048, 2048), (8192, 2048), (4096, 4096), (14336, 4096), (4096, 14336)]


def _time(fn, repeats: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    rows = []
    for shape in SHAPES:
        w = (torch.randn(shape, device="cuda") * 0.02).to(torch.bfloat16)
        st = quantize_nf4(w, blocksize=64, double_quant=True)
        os.environ["EFFINE_TRITON"] = "0"
        ref = dequantize_nf4(st, torch.bfloat16)
        t_ref = _time(lambda: dequantize_nf4(st, torch.bfloat16), args.repeats)
        os.environ["EFFINE_TRITON"] = "1"
        got = dequantize_4bit_triton(st, torch.bfloat16)
        t_tri = _time(lambda: dequantize_4bit_triton(st, torch.bfloat16), args.repeats)
        moved = st.nbytes() + w.numel() * 2
        row = {"shape": list(shape), "identical": bool(torch.equal(ref, got)), "reference_us": t_ref * 1e6,
               "triton_us": t_tri * 1e6, "speedup": t_ref / t_tri, "triton_GBps": moved / t_tri / 1e9}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                              "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
