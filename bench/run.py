"""effine vs the usual baseline (TRL SFTTrainer + PEFT LoRA) on CPU, at matched settings. A script, not a test.

    export EFFINE_CACHE=/work/main/.cache
    python bench/run.py --workloads smollm2-chat-512 --steps 10 --warmup 3 --repeats 2 --mode matched,shipped
    python bench/run.py --workloads smollm2-chat-512 --steps 2 --warmup 1 --repeats 1 --mode matched   # smoke
    python bench/run.py --workloads smollm2-chat-512 --profile-only                    # one profiled effine step

What happens, per workload:

1. The data is pre-tokenised once with effine's pipeline into bench/cache/<workload>-<key>.json (see
   workloads.py): the examples and a fixed list of warmup+steps batches. Both sides train on those batches.
2. The matmul peak is measured in this process, with the workers' thread count: ``torch.mm`` of 2048^3 and of
   (2048 x d) @ (d x d) and (2048 x d) @ (d x intermediate) at the model's hidden size d, bf16 and fp32, best of 5
   after warm-up, at the start and again at the end of the workload (the machine may be shared: both are kept).
   Baseline modes (--mode): matched (the workload's settings), shipped (TRL's defaults), jemalloc (matched, but
   under the heap allocator effine uses: TRL's per-step multi-hundred-MB temporaries are page-faulted in again
   on every step under glibc malloc; this side shows how much of effine's lead is the allocator).
3. Runs, each a fresh process (so the peak RSS is the run's own): repeat r runs effine, TRL matched, TRL shipped,
   and the next repeat runs them in the reverse order (ABC CBA ...), so a slow drift of the machine's load hits
   both sides alike. Workers print one JSON line (per-step wall time, CPU time, loss, tokens, RSS).
4. Report: steps < warmup are dropped; the remaining steps of all repeats give, per side,
     run tokens/s      per run: non-pad tokens of its measured steps / their summed wall time (how fast the run
                       trains on this sequence of batches; each batch weighs by its time, as in a real fine-tune);
                       median and [min, max] over repeats, and effine / baseline per repeat pair (the two runs of
                       a repeat ran next to each other). The speed goals are read from this paired ratio.
     tokens/s          non-pad tokens of the step / the step's wall interval: median and [min, max] over steps
     supervised/s      tokens that carry a label (labels[1:] != -100) / interval
     agg tokens/s      sum of tokens / sum of intervals (post-warm-up)
     tokens/cpu-s      tokens / process CPU seconds: less sensitive to other processes on a shared machine
     peak RSS delta    VmHWM after training minus the RSS right after load (the kernel peak is reset at that point
                       via /proc/self/clear_refs, so a load transient does not count), median over repeats
     time to 1st step  process spawn -> end of step 0 (import, data, load, first step), median over repeats
     loss parity       per-step loss of effine vs TRL matched (same batches, same adapter init), max |diff|
     MFU               model FLOP/s / measured bf16 2048^3 matmul peak (median over steps)
   and the ratios effine / baseline. Results: bench/results/<date>-<workload>.json and a section appended to
   bench/results/README.md.

FLOP model (useful work only: padding and the masked upper triangle are not counted, so both sides get the same
numerator for the same batch). Per step, with T = non-pad tokens, S = supervised positions, rows of length n_r:

    base linears (frozen, in the decoder layers; embedding lookup excluded):  4 * N_mm * T
        forward 2*N_mm per token, backward only the input gradient 2*N_mm (no weight gradient: frozen)
    LoRA (trainable):                                                         6 * N_lora * T
        forward 2, input gradient 2, weight gradient 2
    lm_head (frozen, V x d), only where a loss is computed:                  4 * V * d * S
    attention scores + weighted sum, causal:                                  3 * 4 * L * d_attn * sum_r n_r(n_r+1)/2
        forward per layer and token at position t: QK^T 2*t*d_attn + PV 2*t*d_attn; backward ~ 2x forward
        (d_attn = heads * head_dim; Gemma-3's sliding window does not bind at T <= 512 and is ignored)

Norms, activations, RoPE, softmax, the optimizer and the CE softmax are not counted (a few % at these sizes).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workloads as W  # noqa: E402
from common import BENCH_DIR, cpu_snapshot, loadavg, parse_result  # noqa: E402
from report import CAVEATS, choose_headline, markdown, parity, summarise  # noqa: E402

RESULTS = BENCH_DIR / "results"
MB = 2**20


# -- machine ----------------------------------------------------------------------------------------------------


def cpu_info() -> dict[str, Any]:
    info: dict[str, str] = {}
    try:
        for line in open("/proc/cpuinfo"):
            key, _, val = line.partition(":")
            key = key.strip()
            if key in ("model name", "cpu family", "model", "flags") and key not in info:
                info[key] = val.strip()
    except OSError:
        pass
    flags = info.get("flags", "").split()
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile") if f in flags]
    return {"model": info.get("model name", "?"), "family": info.get("cpu family", "?"),
            "model_id": info.get("model", "?"), "cores": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
            "isa": isa, "machine": platform.machine(), "kernel": platform.release()}


def mem_total_gb() -> float:
    for line in open("/proc/meminfo"):
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def matmul_peak(threads: int, hidden: int, intermediate: int | None, quick: bool = False) -> dict[str, Any]:
    """Best-of-5 FLOP/s of torch.mm at a few shapes, bf16 and fp32 (``quick``: bf16 2048^3 only), plus how many
    cores other processes used meanwhile (``foreign_cores``)."""
    import torch

    torch.set_num_threads(threads)
    shapes = {"2048^3": (2048, 2048, 2048), f"2048x{hidden}x{hidden}": (2048, hidden, hidden)}
    if intermediate:
        shapes[f"2048x{hidden}x{intermediate}"] = (2048, hidden, intermediate)
    out: dict[str, Any] = {}
    a0, t_begin = cpu_snapshot(), time.perf_counter()
    for dtype, tag in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        if quick and tag == "fp32":
            break
        for name, (m, k, n) in shapes.items():
            if quick and name != "2048^3":
                continue
            a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
            for _ in range(2):
                torch.mm(a, b)
            best = float("inf")
            for _ in range(5):
                t0 = time.perf_counter()
                torch.mm(a, b)
                best = min(best, time.perf_counter() - t0)
            out[f"{tag} {name}"] = 2 * m * k * n / best
    a1 = cpu_snapshot()
    out["foreign_cores"] = max(0.0, ((a1[0] - a0[0]) - (a1[1] - a0[1])) / (time.perf_counter() - t_begin))
    return out


# -- FLOPs ------------------------------------------------------------------------------------------------------


def foreign_now(window: float = 2.0) -> float:
    """Cores kept busy by other processes over the next ``window`` seconds (this process sleeps meanwhile)."""
    a = cpu_snapshot()
    time.sleep(window)
    b = cpu_snapshot()
    return max(0.0, ((b[0] - a[0]) - (b[1] - a[1])) / window)


def wait_quiet(threshold: float, max_wait: float, log=print) -> dict[str, float]:
    """Wait (up to ``max_wait`` s) until other processes use less than ``threshold`` cores; return what was seen."""
    t0 = time.time()
    busy = foreign_now()
    announced = False
    while busy >= threshold and time.time() - t0 < max_wait:
        if not announced:
            log(f"    waiting for a quiet machine (others use {busy:.2f} cores; threshold {threshold}) ...")
            announced = True
        time.sleep(3)
        busy = foreign_now()
    return {"waited_s": time.time() - t0, "foreign_cores_at_start": busy}


# -- running workers --------------------------------------------------------------------------------------------


def run_worker(kind: str, data: Path, steps: int, threads: int, timeout: int, extra: list[str] | None = None,
               log=print) -> dict[str, Any]:
    # kind: effine | effine-<quant> | trl-<mode> | trl-<mode>-<quant>
    parts = kind.split("-")
    script = BENCH_DIR / ("worker_effine.py" if parts[0] == "effine" else "worker_trl.py")
    cmd = [sys.executable, str(script), "--data", str(data), "--steps", str(steps), "--threads", str(threads),
           "--t-spawn", repr(time.time())]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    if parts[0] != "effine":
        # "jemalloc": TRL at the matched settings, run under the allocator effine itself uses (same library, same
        # MALLOC_CONF), so the comparison shows how much of the difference is the heap allocator.
        cmd += ["--mode", "matched" if parts[1] == "jemalloc" else parts[1]]
        if parts[1] == "jemalloc":
            sys.path.insert(0, str(BENCH_DIR.parent / "src"))
            from effine.system import allocator

            lib = allocator.find_jemalloc()
            if lib is None:
                return {"error": "no libjemalloc.so.2 found (effine fetches one into its cache: "
                                 "python -c 'from effine.system import allocator; allocator.fetch()')"}
            env["LD_PRELOAD"] = f"{lib}:{env['LD_PRELOAD']}" if env.get("LD_PRELOAD") else str(lib)
            env["MALLOC_CONF"] = allocator.JEMALLOC_CONF
    quant = parts[-1] if len(parts) == (2 if parts[0] == "effine" else 3) else None
    if quant:
        cmd += ["--quant", quant]
    cmd += extra or []
    t0 = time.time()
    la = loadavg()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        log(f"  {kind}: TIMEOUT after {timeout}s")
        return {"error": f"timeout after {timeout}s", "stderr_tail": (e.stderr or b"")[-3000:].decode("utf-8", "replace")
                if isinstance(e.stderr, bytes) else str(e.stderr)[-3000:]}
    res = parse_result(p.stdout)
    if p.returncode != 0 or res is None:
        log(f"  {kind}: FAILED (rc {p.returncode})\n{p.stderr[-3000:]}")
        return {"error": f"rc {p.returncode}", "stderr_tail": p.stderr[-5000:]}
    res["wall_s"] = time.time() - t0
    res["loadavg_before"] = la
    if res.get("profile"):
        res["stderr_profile"] = True
    return res


def run_workload(name: str, args, log=print) -> dict[str, Any]:
    import peft
    import torch
    import transformers

    w = W.get(name, packing=args.packing)
    n_batches = args.warmup + args.steps
    data = W.prepare(w, n_batches, log=lambda m: log("  " + m))
    blob = json.loads(data.read_text())
    cfgj = json.loads((Path(blob["meta"]["model_dir"]) / "config.json").read_text())
    cfgj = cfgj.get("text_config", cfgj)
    hidden, inter = cfgj["hidden_size"], cfgj.get("intermediate_size")
    modes = [m for m in args.mode.split(",") if m]
    if args.packing and modes:
        log("  --packing: the baseline is skipped (TRL packing needs padding-free FlashAttention on CPU)")
        modes = []
    sides = ["effine"] + [f"trl-{m}" for m in modes]
    if args.quant:  # QLoRA sides: effine on a quantized base, and the matched baseline with bitsandbytes
        sides += [f"effine-{args.quant}"] + [f"trl-{m}-{args.quant}" for m in modes if m == "matched"]
    la0 = loadavg()
    log(f"  matmul peak ({args.threads} threads) ...")
    peak0 = matmul_peak(args.threads, hidden, inter)
    log("  " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peak0.items() if k != "foreign_cores")
        + f" (others used {peak0['foreign_cores']:.2f} cores)")
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
    peaks: list[dict[str, float]] = [peak0]
    for r in range(args.repeats):
        order = sides if r % 2 == 0 else sides[::-1]
        for side in order:
            q = wait_quiet(args.quiet, args.max_wait, log=log) if args.max_wait > 0 else {}
            log(f"  repeat {r + 1}/{args.repeats}: {side} (load {loadavg()[0]:.2f}, others use "
                f"{q.get('foreign_cores_at_start', float('nan')):.2f} cores) ...")
            peaks.append(matmul_peak(args.threads, hidden, inter, quick=True))  # another chance at a quiet moment
            res = run_worker(side, data, n_batches, args.threads, args.timeout, log=log)
            res["repeat"], res["quiet_wait"] = r, q
            runs[side].append(res)
            if "error" not in res:
                st = [s for s in res["steps"] if s["step"] >= args.warmup]
                rate = sum(s["tokens"] for s in st) / max(1e-9, sum(s["interval_s"] for s in st))
                fc = statistics.median([s.get("foreign_cores", 0.0) for s in st]) if st else 0.0
                log(f"    {rate:.0f} tok/s post-warm-up (others used {fc:.2f} cores, median), peak RSS "
                    f"{(res['rss']['peak_train_hwm'] or res['rss']['peak_sampled']) / MB:.0f} MB "
                    f"(post-load {res['rss']['post_load'] / MB:.0f} MB), losses "
                    + " ".join(f"{x['loss']:.3f}" for x in res["steps"]))
    peak1 = matmul_peak(args.threads, hidden, inter)
    la1 = loadavg()
    peaks.append(peak1)
    # The peak is a property of the machine, contention only lowers it: use the best of every measurement.
    peak_used = max(p["bf16 2048^3"] for p in peaks)
    eff_ok = [x for x in runs["effine"] if "error" not in x]
    shape = eff_ok[0]["model"] if eff_ok else None
    summ = {s: summarise(rs, args.warmup, shape, peak_used, args.quiet) if shape else {"error": "effine failed"}
            for s, rs in runs.items()}
    choose_headline(summ)
    par: dict[str, Any] = {}
    if eff_ok:
        base = [s["loss"] for s in eff_ok[0]["steps"]]
        for s in sides[1:]:
            ok = [x for x in runs[s] if "error" not in x]
            ref = base  # quantized baselines are compared with effine on the same quantized base
            if args.quant and s.endswith(f"-{args.quant}") and not s.startswith("effine"):
                eq = [x for x in runs.get(f"effine-{args.quant}", []) if "error" not in x]
                ref = [st["loss"] for st in eq[0]["steps"]] if eq else []
            if ok and ref:
                par[s] = parity(ref, [st["loss"] for st in ok[0]["steps"]])
                par[s]["same_batches"] = ok[0].get("same_batches_as_file")
    rep_par = None
    if len(eff_ok) > 1:
        rep_par = parity([s["loss"] for s in eff_ok[0]["steps"]], [s["loss"] for s in eff_ok[1]["steps"]])["max_abs_diff"]
    trl_ok = next((x for s in sides[1:] for x in runs[s] if "error" not in x), None)
    versions = sorted({json.dumps(x.get("effine_version"), sort_keys=True) for x in eff_ok})
    if len(versions) > 1:
        log(f"  WARNING: effine's source changed between runs ({len(versions)} versions): {versions}")
    steps_all = [blob["examples"][i] for b in blob["batches"] for i in b]
    rep = {
        "workload": name, "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "command": args.command,
        "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "threads": args.threads,
        "settings": w.to_dict(), "data_file": str(data),
        "data": {"tokens_per_step": len(steps_all) and sum(len(e["input_ids"]) for e in steps_all) / n_batches,
                 "supervised_share": blob["meta"]["supervised_share"], "report": blob["meta"]["data_report"]},
        "machine": {"cpu": cpu_info(), "mem_gb": mem_total_gb(), "torch": torch.__version__,
                    "transformers": transformers.__version__, "peft": peft.__version__,
                    "trl": (trl_ok or {}).get("versions", {}).get("trl", "not run"), "python": platform.python_version()},
        "loadavg": {"start": la0, "end": la1},
        "matmul_peak": {"start": peak0, "end": peak1, "all": peaks,
                        "best": {k: max(p.get(k, 0.0) for p in peaks) for k in peak0 if k != "foreign_cores"}},
        "matmul_peak_used": peak_used,
        "flop_model": shape, "sides": summ, "quiet_threshold_cores": args.quiet,
        "effine_versions": [json.loads(v) for v in versions], "parity": par, "parity_effine_repeat": rep_par,
        "caveats": CAVEATS, "runs": runs,
    }
    if args.profile:
        log("  profiling one effine step (separate run, not in the numbers above) ...")
        pr = run_worker("effine", data, args.warmup + 1, args.threads, args.timeout,
                        extra=["--profile", str(args.warmup)], log=log)
        rep["profile"] = pr.get("profile") or pr.get("error")
        if pr.get("profile"):
            log(pr["profile"])
    return rep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", nargs="+", default=["smollm2-chat-512"], choices=list(W.WORKLOADS))
    ap.add_argument("--steps", type=int, default=10, help="measured steps per run (after warm-up)")
    ap.add_argument("--warmup", type=int, default=3, help="steps run first and not measured")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--mode", default="matched,shipped",
                    help="baseline modes, comma-separated: matched, shipped, jemalloc (matched settings under the "
                         "heap allocator effine uses), or '' (none)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--quant", default=None, choices=["nf4"],
                    help="also run QLoRA: effine on an nf4 base and (with matched) TRL + PEFT + bitsandbytes nf4")
    ap.add_argument("--packing", action="store_true", help="effine trains on packed rows (baseline skipped)")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per worker process")
    ap.add_argument("--profile", action="store_true", help="also profile one effine step (torch.profiler)")
    ap.add_argument("--profile-only", action="store_true", help="only profile one effine step; no measurement")
    ap.add_argument("--no-save", action="store_true", help="print only; do not write bench/results")
    ap.add_argument("--quiet", type=float, default=0.3,
                    help="a step is 'quiet' when other processes kept fewer than this many cores busy during it")
    ap.add_argument("--max-wait", type=float, default=900,
                    help="before each run, wait up to this many seconds for other processes to go below --quiet "
                         "cores (0: never wait)")
    ap.add_argument("--render", metavar="JSON", help="print the markdown section of a saved results file and exit")
    args = ap.parse_args()
    if args.render:
        print(markdown(json.loads(Path(args.render).read_text())))
        return
    args.command = "python bench/run.py " + " ".join(sys.argv[1:])
    if not os.environ.get("EFFINE_CACHE"):
        print("note: EFFINE_CACHE is unset; effine's cache defaults to ~/.cache/effine", file=sys.stderr)
    for name in args.workloads:
        print(f"[bench] {name}", flush=True)
        if args.profile_only:
            w = W.get(name, packing=args.packing)
            data = W.prepare(w, args.warmup + 1, log=lambda m: print("  " + m))
            pr = run_worker("effine", data, args.warmup + 1, args.threads, args.timeout,
                            extra=["--profile", str(args.warmup)])
            print(pr.get("profile") or pr)
            continue
        rep = run_workload(name, args, log=lambda m: print(m, flush=True))
        md = markdown(rep)
        print("\n" + md, flush=True)
        if args.no_save:
            continue
        RESULTS.mkdir(parents=True, exist_ok=True)
        stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M")
        out = RESULTS / f"{stamp}-{name}.json"
        out.write_text(json.dumps(rep, indent=1))
        readme = RESULTS / "README.md"
        if not readme.exists():
            readme.write_text("# effine benchmark results\n\nAppended by `bench/run.py` (see its docstring for the "
                              "method and the FLOP model). Ratios are effine ÷ baseline on the median non-pad "
                              "tokens/s of post-warm-up steps (and, next to it, on tokens per CPU-second).\n\n")
        with readme.open("a") as f:
            f.write(md + f"\nRaw: `{out.relative_to(BENCH_DIR.parent)}`\n\n")
        print(f"[bench] wrote {out} and appended {readme}", flush=True)


if __name__ == "__main__":
    main()
