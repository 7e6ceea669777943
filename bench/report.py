"""The benchmark report: per-side summaries of the worker results, the FLOP model behind MFU, and the markdown
section ``bench/run.py`` prints and appends to ``bench/results/README.md`` (``run.py --render FILE`` re-renders a
saved results file). See run.py's docstring for what each number means."""

from __future__ import annotations

import statistics
from typing import Any

MB = 2**20


def step_flops(shape: dict[str, Any], step: dict[str, Any]) -> float:
    t, s = step["tokens"], step["supervised"]
    attn_pairs = sum(n * (n + 1) / 2 for n in step["lengths"])
    return (4 * shape["n_matmul_layers"] * t + 6 * shape["n_lora"] * t + 4 * shape["lm_head"] * s
            + 12 * shape["layers"] * shape["d_attn"] * attn_pairs)


# -- a shared machine -------------------------------------------------------------------------------------------


def _q(xs: list[float]) -> dict[str, float] | None:
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def summarise(runs: list[dict[str, Any]], warmup: int, shape: dict[str, Any], peak_bf16: float,
              quiet: float) -> dict[str, Any]:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[0].get("error") if runs else "no runs"}
    steps = [s for r in ok for s in r["steps"] if s["step"] >= warmup and not s.get("profiled")]
    quiet_steps = [s for s in steps if s.get("foreign_cores", 0.0) < quiet]
    tok = [s["tokens"] / s["interval_s"] for s in steps]
    sup = [s["supervised"] / s["interval_s"] for s in steps]
    cpu = [s["tokens"] / s["cpu_s"] for s in steps if s.get("cpu_s")]
    util = [s["cpu_s"] / s["interval_s"] for s in steps if s.get("cpu_s")]
    mfu = [step_flops(shape, s) / s["interval_s"] / peak_bf16 for s in steps]
    delta = [(r["rss"]["peak_train_hwm"] or r["rss"]["peak_sampled"]) - r["rss"]["post_load"] for r in ok]
    peak = [max(r["rss"]["peak_train_hwm"] or 0, r["rss"]["peak_sampled"]) for r in ok]
    return {
        "runs_ok": len(ok), "runs_failed": len(runs) - len(ok), "steps_measured": len(steps),
        "tokens_per_s": _q(tok), "supervised_per_s": _q(sup),
        "quiet_steps": len(quiet_steps),
        "quiet_tokens_per_s": _q([s["tokens"] / s["interval_s"] for s in quiet_steps]),
        "quiet_supervised_per_s": _q([s["supervised"] / s["interval_s"] for s in quiet_steps]),
        "quiet_mfu": _q([step_flops(shape, s) / s["interval_s"] / peak_bf16 for s in quiet_steps]),
        "foreign_cores": _q([s.get("foreign_cores", 0.0) for s in steps]),
        "agg_tokens_per_s": sum(s["tokens"] for s in steps) / sum(s["interval_s"] for s in steps),
        "heldout_loss": _q([r["heldout"]["loss"] for r in ok if r.get("heldout")]),
        "heldout_info": next(({k: r["heldout"][k] for k in ("examples", "tokens")} for r in ok if r.get("heldout")),
                             None),
        **run_rate_summary(ok, warmup),
        "agg_supervised_per_s": sum(s["supervised"] for s in steps) / sum(s["interval_s"] for s in steps),
        "tokens_per_cpu_s": _q(cpu), "cpu_utilisation": _q(util), "mfu": _q(mfu),
        "peak_rss_delta_mb": _q([d / MB for d in delta]), "peak_rss_mb": _q([p / MB for p in peak]),
        "post_load_rss_mb": _q([r["rss"]["post_load"] / MB for r in ok]),
        "time_to_first_step_s": _q([r["time_to_first_step"]["total_s"] for r in ok]),
        "ttfs_breakdown": {k: statistics.median([r["time_to_first_step"][k] for r in ok])
                           for k in ok[0]["time_to_first_step"]},
        "losses": [[s["loss"] for s in r["steps"]] for r in ok],
        "padding_share": 1 - sum(s["tokens"] for s in steps) / max(1, sum(s["padded"] for s in steps)),
    }


def run_throughput(run: dict[str, Any], warmup: int) -> float:
    """One run's throughput: the non-pad tokens of its measured steps over their summed wall time, i.e. how fast it
    trains on this sequence of batches. Unlike the median of per-step rates it weighs each batch by its time, so a
    mix of short and long batches counts as it does in a real fine-tune."""
    st = [s for s in run["steps"] if s["step"] >= warmup and not s.get("profiled")]
    return sum(s["tokens"] for s in st) / max(1e-9, sum(s["interval_s"] for s in st))


def run_rate_summary(ok: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """``run_tokens_per_s`` (median [min, max] over the runs) and ``run_rates`` (repeat index -> throughput)."""
    rates = [run_throughput(r, warmup) for r in ok]
    return {"run_tokens_per_s": _q(rates),
            "run_rates": {str(r.get("repeat", i)): x for i, (r, x) in enumerate(zip(ok, rates))}}


def numerator_side(name: str) -> str:
    """The effine side a baseline row is divided into: effine on the same kind of base (trl-matched-nf4 ->
    effine-nf4, any other -> effine)."""
    return "effine" if name.count("-") < 2 else f"effine-{name.rsplit('-', 1)[1]}"


def paired_run_ratios(num: dict[str, Any], den: dict[str, Any]) -> dict[str, Any] | None:
    """effine ÷ baseline run throughput per repeat: the two runs of a repeat ran next to each other in time (order
    ABC CBA ...), so a slow drift of the machine touches both. None when no repeat has both."""
    a, b = num.get("run_rates") or {}, den.get("run_rates") or {}
    ratios = [a[k] / b[k] for k in sorted(a) if k in b and b[k] > 0]
    return {**_q(ratios), "all": ratios} if ratios else None


def choose_headline(summ: dict[str, Any], min_quiet: int = 3) -> None:
    """Per side: the quiet steps (others used < --quiet cores) when it has at least ``min_quiet`` of them, else all
    its steps (marked contended). A ratio is only printed between two sides on the same basis."""
    for x in summ.values():
        if "error" in x:
            continue
        q = x.get("quiet_steps", 0) >= min_quiet
        x["headline"] = "quiet" if q else "all (contended)"
        x["head_tokens_per_s"] = x["quiet_tokens_per_s"] if q else x["tokens_per_s"]
        x["head_supervised_per_s"] = x["quiet_supervised_per_s"] if q else x["supervised_per_s"]
        x["head_mfu"] = x["quiet_mfu"] if q else x["mfu"]


def parity(a: list[float], b: list[float]) -> dict[str, Any] | None:
    n = min(len(a), len(b))
    if not n:
        return None
    d = [abs(x - y) for x, y in zip(a[:n], b[:n])]
    return {"max_abs_diff": max(d), "step0_abs_diff": d[0], "mean_abs_diff": sum(d) / n, "steps": n}


# -- report -----------------------------------------------------------------------------------------------------


def _fmt_q(q: dict[str, float] | None, fmt: str = "{:.0f}") -> str:
    if not q:
        return "—"
    return f"{fmt.format(q['median'])} [{fmt.format(q['min'])}–{fmt.format(q['max'])}]"


def markdown(rep: dict[str, Any]) -> str:
    mp = rep["matmul_peak"]
    mp.setdefault("all", [mp["start"], mp["end"]])
    mp.setdefault("best", {k: max(p.get(k, 0.0) for p in mp["all"]) for k in mp["start"] if k != "foreign_cores"})
    mp["start"].setdefault("foreign_cores", None)
    fc0 = mp["start"]["foreign_cores"]
    m, sides = rep["machine"], rep["sides"]
    eff = sides.get("effine", {})
    peak = rep["matmul_peak_used"]
    la = rep["loadavg"]
    choose_headline(sides)
    for name, s in sides.items():  # results files written before run throughput was reported: derive it
        ok = [r for r in rep.get("runs", {}).get(name, []) if "error" not in r]
        if "error" not in s and "run_rates" not in s and ok:
            s.update(run_rate_summary(ok, rep["warmup"]))
    head = eff.get("headline", "all steps")
    lines = [f"## {rep['workload']} — {rep['date']}", "",
             f"Device: {m['cpu']['model']} (family {m['cpu']['family']}, {m['cpu']['cores']} cores, "
             f"{'/'.join(m['cpu']['isa'])}), {m['mem_gb']:.0f} GB RAM; torch {m['torch']}, transformers "
             f"{m['transformers']}, peft {m['peft']}, trl {m['trl']}; {rep['threads']} threads per run. "
             f"Load average (1/5/15 min): {' / '.join(f'{x:.2f}' for x in la['start'])} at start, "
             f"{' / '.join(f'{x:.2f}' for x in la['end'])} at end. The machine is shared: each step records how "
             f"many cores other processes kept busy meanwhile (/proc/stat minus the worker's own CPU time); a step "
             f"with fewer than {rep['quiet_threshold_cores']} is 'quiet'. The first three columns use each side's quiet "
             f"steps when it has at least 3 (else all its steps, marked contended; effine: {head}); an effine ÷ side "
             f"ratio is printed only when both sides are on the same basis.",
             "",
             f"Workload: {rep['settings']['notes']}; max_length {rep['settings']['max_length']}, batch "
             f"{rep['settings']['batch_size']}, {rep['steps']} measured steps after {rep['warmup']} warm-up, "
             f"{rep['repeats']} repeats; {rep['data']['tokens_per_step']:.0f} non-pad tokens/step on average, "
             f"{rep['data']['supervised_share']:.0%} supervised. LoRA r={rep['settings']['r']} "
             f"alpha={rep['settings']['alpha']:g} on {', '.join(rep['settings']['targets'])}; AdamW lr "
             f"{rep['settings']['lr']:g} constant (matched). Command: `{rep['command']}`",
             "",
             f"Matmul peak, best of {len(rep['matmul_peak']['all'])} measurements in this run (before the first "
             f"run, before every run, after the last): bf16 2048^3 {peak / 1e9:.0f} GFLOP/s (the MFU denominator; "
             f"the first measurement gave {mp['start']['bf16 2048^3'] / 1e9:.0f}"
             + (f" with others using {fc0:.2f} cores" if fc0 is not None else "")
             + f"); fp32 2048^3 {mp['best']['fp32 2048^3'] / 1e9:.0f} GFLOP/s; bf16 at the model's hidden size: "
             + ", ".join(f"{k[5:]} {v / 1e9:.0f}" for k, v in rep['matmul_peak']['best'].items()
                         if k.startswith("bf16") and "2048^3" not in k) + " GFLOP/s.",
             "",
             "| side | non-pad tok/s median [min–max] | supervised tok/s | effine ÷ side | all-steps tok/s "
             "(others' cores) | tok/CPU-s | effine ÷ side (CPU-s) | peak RSS − post-load (MB) | peak RSS (MB) "
             "| time to 1st step (s) | loss max abs diff vs effine | MFU |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in sides.items():
        if "error" in s:
            lines.append(f"| {name} | failed: {s['error']} ||||||||||| ")
            continue
        num_name = numerator_side(name)
        num = sides.get(num_name, {})
        own = name.startswith("effine")
        if own or not num.get("head_tokens_per_s"):
            ratio = "—"
        elif num["headline"] != s["headline"]:
            ratio = "n/a (one side contended)"
        else:
            ratio = f"**{num['head_tokens_per_s']['median'] / s['head_tokens_per_s']['median']:.2f}×**"
        ratio_cpu = "—" if own or not num.get("tokens_per_cpu_s") else \
            f"{num['tokens_per_cpu_s']['median'] / s['tokens_per_cpu_s']['median']:.2f}×"
        par = rep["parity"].get(name)
        par_s = "—" if name == "effine" else (f"{par['max_abs_diff']:.4f}" if par else "n/a")
        if name == "trl-shipped" and par:
            par_s += " (other batches/lr)"
        lines.append(
            f"| {name} | {_fmt_q(s['head_tokens_per_s'])} ({s['headline']}, n={s['head_tokens_per_s']['n']}) "
            f"| {_fmt_q(s['head_supervised_per_s'])} | {ratio} "
            f"| {_fmt_q(s['tokens_per_s'])} ({s['foreign_cores']['median']:.2f}) "
            f"| {_fmt_q(s['tokens_per_cpu_s'])} | {ratio_cpu} | {_fmt_q(s['peak_rss_delta_mb'])} "
            f"| {_fmt_q(s['peak_rss_mb'])} | {_fmt_q(s['time_to_first_step_s'], '{:.1f}')} | {par_s} "
            f"| {_fmt_q(s['head_mfu'], '{:.1%}')} |")
    lines += ["", "Run throughput (each run's measured tokens over its measured wall time: how fast it trains on "
              "this sequence of batches; median [min–max] over repeats) and effine ÷ side per repeat pair:", ""]
    for name, s in sides.items():
        if "error" in s or not s.get("run_tokens_per_s"):
            continue
        num_name = numerator_side(name)
        pr = None if name.startswith("effine") else paired_run_ratios(sides.get(num_name, {}), s)
        lines.append(f"- {name}: {_fmt_q(s['run_tokens_per_s'])} tok/s"
                     + (f"; {num_name} ÷ {name}: **{pr['median']:.2f}×** (per repeat: "
                        + ", ".join(f"{x:.2f}×" for x in pr["all"]) + ")" if pr else ""))
    ev = {n: s for n, s in sides.items() if "error" not in s and s.get("heldout_loss")}
    if ev:
        info = next(iter(ev.values()))["heldout_info"]
        parts = []
        for name, s in ev.items():
            num_name = numerator_side(name)
            d = ("" if name.startswith("effine") or num_name not in ev else
                 f" ({num_name} − {name}: {ev[num_name]['heldout_loss']['median'] - s['heldout_loss']['median']:+.4f})")
            parts.append(f"{name} {s['heldout_loss']['median']:.4f}{d}")
        lines += ["", f"Held-out eval loss after the {rep['warmup'] + rep['steps']} training steps ({info['examples']} "
                  f"examples no batch uses, {info['tokens']} labelled tokens; the same evaluation code on every side, "
                  f"bench/common.heldout_loss; median over repeats): " + "; ".join(parts) + "."]
    lines += [""]
    q = next((n for n in sides if n.startswith("effine-")), None)
    if q and "error" not in sides[q] and "error" not in eff:
        qs = sides[q]
        sp = qs["head_tokens_per_s"]["median"] / eff["head_tokens_per_s"]["median"]
        mem = qs["peak_rss_delta_mb"]["median"] / eff["peak_rss_delta_mb"]["median"]
        tot = qs["peak_rss_mb"]["median"] / eff["peak_rss_mb"]["median"]
        lines.append(f"QLoRA ({q} vs effine bf16 LoRA, same batches): tokens/s {sp:.2f}×, peak RSS {tot:.2f}× "
                     f"(increase above post-load {mem:.2f}×)" + (" — the bases were measured on different bases "
                     "(quiet vs contended)" if qs["headline"] != eff["headline"] else "") + ".")
        tq = sides.get(f"trl-matched-{q.split('-', 1)[1]}")
        if tq and "error" not in tq:
            lines.append(f"QLoRA vs TRL + PEFT + bitsandbytes ({q.split('-', 1)[1]}, matched): tokens/s "
                         f"{qs['head_tokens_per_s']['median'] / tq['head_tokens_per_s']['median']:.2f}×, peak RSS "
                         f"{qs['peak_rss_mb']['median'] / tq['peak_rss_mb']['median']:.2f}×, peak RSS increase "
                         f"{qs['peak_rss_delta_mb']['median'] / tq['peak_rss_delta_mb']['median']:.2f}×.")
    if rep.get("parity_effine_repeat") is not None:
        lines.append(f"effine run-to-run loss difference (repeat 1 vs 2, same batches): max "
                     f"{rep['parity_effine_repeat']:.2e}.")
    for name, p in rep["parity"].items():
        if p:
            lines.append(f"{name}: same batches as the file: {p.get('same_batches')}; step-0 loss diff "
                         f"{p['step0_abs_diff']:.4f}, mean {p['mean_abs_diff']:.4f} over {p['steps']} steps.")
    ver = rep.get("effine_versions")
    if ver:
        lines.append("effine code: " + "; ".join(f"git {v['git_head']}{' + uncommitted edits' if v['src_dirty'] else ''}"
                                                 f" (src digest {v['src_digest']})" for v in ver if v)
                     + (" — **effine's source changed between runs: the effine rows mix versions**"
                        if len(ver) > 1 else "") + ".")
    lines += ["", "Not matched / caveats: " + " ".join(rep["caveats"]), ""]
    return "\n".join(lines)


CAVEATS = [
    "Same tokens, labels, batches and batch order on effine and TRL matched (checked per step against the file),",
    "same LoRA targets and trainable parameter count, same deterministic lora_A init (B = 0), same AdamW",
    "hyper-parameters, clip 1.0, constant lr. Numerical differences that remain in 'matched':",
    "(1) TRL runs under bf16 autocast (SFTConfig bf16=True), so PEFT's fp32 adapter matmuls run in bf16; effine",
    "keeps fp32 adapter weights and computes the adapter matmuls in bf16 too; (2) TRL passes an attention_mask (SDPA with an explicit",
    "mask), effine relies on right padding + causal attention (no mask); (3) the losses differ in kernels: TRL's",
    "fused LM head (also computing entropy and top-1 for its metrics) vs effine's chunked CE; (4) optimizer:",
    "TRL's default adamw_torch_fused vs effine's fused AdamW (the same kernel; effine's own parameter groups). 'shipped' keeps TRL's defaults:",
    "fp32 weights (TRL loads the model itself) under bf16 autocast, gradient checkpointing on, lr 2e-5 linear",
    "decay, random sampler (different batches, so its losses are not comparable and its batches carry more padding);",
    "it is given the same pre-tokenised input_ids+labels (TRL's own tokenisation of the raw chat would train on all",
    "tokens unless assistant_only_loss=True). effine trains under jemalloc (no purging) when it finds the library, as",
    "`effine train` does; TRL runs under glibc malloc, as users run it, except 'trl-jemalloc': the matched settings",
    "under the same jemalloc and MALLOC_CONF, to show how much of the difference is the heap allocator.",
]
