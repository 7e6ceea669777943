"""The product path against TRL + PEFT: `effine train` as a user runs it, on the workloads users have. A script.

    export EFFINE_CACHE=/work/main/.cache
    python -m bench.product                                   # all workloads, all sides (~45 min on 2 cores)
    python -m bench.product --workloads short-chat --sides effine,trl-shipped --steps 20 --no-save   # smoke

Workloads (SmolLM2-135M-Instruct and Gemma-3-270M, LoRA r16 / alpha 32 on the seven linear projections, batch 8):

    demo              configs/smollm2-135m-lora.yaml itself (chitchat conversations, max_length 384; 12 steps here,
                      make demo's 40 in demo-as-shipped)
    short-chat        one user turn + its reply per row (<= ~64 tokens, bench/workloads.py), chat template,
                      assistant-only labels, max_length 512 (effine's default), lr 2e-4
    short-completion  the same pairs as prompt/completion text on Gemma-3-270M (262k vocabulary), completion labels

Sides, each a fresh process started from here (whole-process peak RSS from ``os.wait4``: the figure a user's
machine must have, loading and saving included):

    effine            ``python -m effine train CONFIG``: every effine default (packing, schedule, allocator, ...)
                      apart from what the workload sets; ``train.eval_every`` and ``log_every: 1`` added so that
                      the held-out curve and per-step times can be read from its metrics.jsonl (evaluation time
                      is left out of every speed figure on both sides).
    effine-unpacked   the same with ``data.packing: false``
    effine-qlora      the same with ``quant.method: nf4`` (QLoRA)
    effine-system     the same under glibc malloc (``EFFINE_ALLOCATOR=system``) instead of the default allocator
    demo-as-shipped   (demo only) exactly `make demo`'s command, nothing added: its own reported tokens/s is
                      compared with the bench's figure for the same config (the guard that bench/ times the
                      product path: within 15%)
    trl-shipped       bench/worker_trl_product.py --mode shipped: SFTTrainer's defaults (lr 2e-5, gradient
                      checkpointing, fp32 weights under bf16 autocast, no packing)
    trl-packed        --mode packed: TRL's best settings for the task on CPU (packing / padding-free, bf16 weights,
                      no checkpointing, lr 2e-4)

Both sides train on effine's tokenisation of the same rows (TRL gets ``input_ids`` + ``labels`` columns) and are
evaluated on the same held-out rows. TIME TO A GOOD MODEL: the target is the held-out loss trl-shipped reaches
after ``--steps`` steps; each other side runs until its first evaluation at or below the target (effine is sent
SIGTERM there, which it answers by checkpointing and stopping; TRL stops itself) or until it has run as many
steps; the time is from process start (imports, data, model, first steps) to that evaluation, evaluation time
left out. Results: bench/results/product-<date>.json and a section appended to bench/results/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.common import BENCH_DIR, CACHE_DIR, loadavg, parse_result
from bench.workloads import LORA_TARGETS, derived_data_file

RESULTS = BENCH_DIR / "results"
ROOT = BENCH_DIR.parent
GB = 1e9


@dataclass(frozen=True)
class Product:
    name: str
    model: str
    data: dict[str, Any]  # effine data.* keys (paths filled in by data_config)
    steps: int  # trl-shipped's steps (its final eval loss is the target); the others' step cap
    eval_every: int
    batch_size: int = 8
    lr: float = 2e-4
    base_config: str | None = None  # a configs/ file the run starts from (demo)
    train: dict[str, Any] = field(default_factory=dict)


PRODUCTS = {p.name: p for p in (
    Product("demo", "smollm2-135m-instruct", {}, steps=12, eval_every=4, lr=5e-4,
            base_config="configs/smollm2-135m-lora.yaml"),
    Product("short-chat", "smollm2-135m-instruct", {"path": "derived:short-chat", "eval_path": "derived:short-chat-eval",
                                                    "max_eval_rows": 64}, steps=60, eval_every=5),
    Product("short-completion", "gemma3-270m", {"path": "derived:short-completion",
                                                "eval_path": "derived:short-completion-eval",
                                                "format": "prompt_completion", "max_eval_rows": 64},
            steps=60, eval_every=5),
)}
SIDES = ("trl-shipped", "effine", "effine-unpacked", "effine-qlora", "effine-system", "trl-packed", "demo-as-shipped")


# -- configs and data ---------------------------------------------------------------------------------------------


def _derived(v: Any) -> Any:
    return str(derived_data_file(v.split(":", 1)[1])) if isinstance(v, str) and v.startswith("derived:") else v


def effine_config(p: Product, side: str, run_dir: Path, steps: int) -> dict[str, Any]:
    """The config the effine side runs: the workload as a user writes it (+ eval_every / log_every for the curve)."""
    if p.base_config:
        cfg = yaml.safe_load((ROOT / p.base_config).read_text())
    else:
        cfg = {"model": {"name": p.model, "dtype": "bf16"}, "data": {k: _derived(v) for k, v in p.data.items()},
               "adapter": {"method": "lora", "r": 16, "alpha": 32},
               "train": {"batch_size": p.batch_size, "lr": p.lr}, "eval": {"prompts_from_eval": 0}}
    cfg.setdefault("train", {}).update(max_steps=steps, log_every=1, eval_every=p.eval_every, **p.train)
    cfg.setdefault("output", {}).update(dir=str(run_dir), overwrite=True)
    if side == "effine-unpacked":
        cfg["data"]["packing"] = False
    if side == "effine-qlora":
        cfg["quant"] = {"method": "nf4"}
    return cfg


def trl_data_file(p: Product) -> Path:
    """effine's tokenisation of the workload's train and held-out rows, for the TRL worker (written once)."""
    from effine.config import DataConfig, load_config
    from effine.data import build_datasets
    from effine.model.loader import cache_root, load_tokenizer, resolve_model_dir

    out = CACHE_DIR / f"product-{p.name}.json"
    if out.is_file():
        return out
    if p.base_config:
        data_cfg = load_config(ROOT / p.base_config).data
    else:
        data_cfg = DataConfig(**{k: _derived(v) for k, v in p.data.items()})
    data_cfg.packing = False
    model_dir = resolve_model_dir(p.model)
    tok = load_tokenizer(model_dir)
    train, eval_, report = build_datasets(data_cfg, tok, cache_dir=cache_root(), log=lambda *_: None)
    rows = lambda xs: [{"input_ids": list(e.input_ids), "labels": list(e.labels)} for e in xs]  # noqa: E731
    workload = {"name": p.name, "r": 16, "alpha": 32.0, "targets": LORA_TARGETS, "batch_size": p.batch_size,
                "max_length": data_cfg.max_length, "lr": p.lr, "seed": 1234}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"train": rows(train), "eval": rows(eval_), "pad_id": tok.pad_token_id,
                               "meta": {"workload": workload, "model_dir": str(model_dir),
                                        "tokenizer_dir": str(model_dir), "data_report": report.to_dict()}}))
    return out


# -- running one side ---------------------------------------------------------------------------------------------


def _wait(proc: subprocess.Popen, deadline: float, watch=None) -> tuple[int, int]:
    """Wait for ``proc`` (calling ``watch()`` every 0.5 s) and return (exit status, its peak RSS in bytes)."""
    while True:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, ru.ru_maxrss * 1024
        if time.time() > deadline:
            proc.kill()
        if watch:
            watch()
        time.sleep(0.5)


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip().endswith("}")]


def run_effine(p: Product, side: str, steps: int, target: float | None, timeout: float, log) -> dict[str, Any]:
    run_dir = Path(tempfile.mkdtemp(prefix=f"bench-product-{p.name}-")) / "run"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if side == "effine-system":
        env["EFFINE_ALLOCATOR"] = "system"
    if side == "demo-as-shipped":  # make demo's command, unchanged but for where the run goes
        cmd = [sys.executable, "-m", "effine", "train", str(ROOT / p.base_config), "--set", "output.overwrite=true",
               "--set", f"output.dir={run_dir}"]
    else:
        cfg_path = run_dir.parent / "config.yaml"
        cfg_path.write_text(yaml.safe_dump(effine_config(p, side, run_dir, steps)))
        cmd = [sys.executable, "-m", "effine", "train", str(cfg_path)]
    t_spawn = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out_lines: list[str] = []
    import threading

    reader = threading.Thread(target=lambda: out_lines.extend(proc.stdout), daemon=True)
    reader.start()
    sent = []

    def watch():
        if target is None or sent:
            return
        if any(r["kind"] == "eval" and r["step"] > 0 and r["eval_loss"] <= target for r in _metrics(run_dir)):
            proc.send_signal(signal.SIGTERM)  # effine finishes the step, checkpoints and stops
            sent.append(time.time())

    rc, peak = _wait(proc, t_spawn + timeout, watch)
    reader.join(timeout=5)
    rows = _metrics(run_dir)
    if rc != 0 and not sent:
        log(f"  {side}: FAILED rc {rc}\n" + "".join(out_lines[-40:]))
        return {"side": side, "error": f"rc {rc}", "tail": "".join(out_lines[-40:])}
    return {"side": side, "rc": rc, "stopped_at_target": bool(sent), "peak_rss": peak, "t_spawn": t_spawn,
            **_effine_figures(rows, t_spawn, run_dir), "summary": _read_json(run_dir / "summary.json"),
            "log_tail": "".join(out_lines[-12:])}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _effine_figures(rows: list[dict], t_spawn: float, run_dir: Path) -> dict[str, Any]:
    start = next(r for r in rows if r["kind"] == "start")
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    eval_before = sum(r.get("seconds", 0) for r in evals if r["step"] == 0)
    curve, eval_s, step_ends = [], 0.0, []
    for r in sorted(train + [e for e in evals if e["step"] > 0], key=lambda r: r["time"]):
        if r["kind"] == "train":
            step_ends.append(r["time"] - start["time"] - eval_s)
        else:
            eval_s += r.get("seconds", 0)
            curve.append({"step": r["step"], "eval_loss": r["eval_loss"],
                          "train_s": r["time"] - start["time"] - eval_s,
                          "wall_s": r["time"] - t_spawn - eval_s - eval_before})
    first = next((e for e in evals if e["step"] == 0), None)
    if first:
        curve.insert(0, {"step": 0, "eval_loss": first["eval_loss"], "train_s": 0.0,
                         "wall_s": start["time"] - t_spawn - eval_before})
    samples = 0
    sj = run_dir / "samples.jsonl"
    if sj.is_file():
        samples = sum(len(json.loads(x)["rows"]) for x in sj.read_text().splitlines()
                      if x.strip() and json.loads(x)["applied"])
    return {"steps": train[-1]["step"] if train else 0, "tokens": train[-1]["tokens_seen"] if train else 0,
            "samples": samples,
            "train_s": step_ends[-1] if step_ends else 0.0, "step_ends_s": step_ends, "curve": curve,
            "first_step_wall_s": (train[0]["time"] - t_spawn - eval_before) if train else None,
            "rss_train_begin": start.get("rss_bytes"), "eval_s": eval_s + eval_before,
            "reported_tokens_per_s": None}


def run_trl(p: Product, side: str, steps: int, target: float | None, timeout: float, log) -> dict[str, Any]:
    data = trl_data_file(p)
    cmd = [sys.executable, "-m", "bench.worker_trl_product", "--data", str(data), "--steps", str(steps),
           "--mode", side.split("-", 1)[1], "--eval-every", str(p.eval_every), "--t-spawn", repr(time.time())]
    if target is not None:
        cmd += ["--target", repr(target)]
    t_spawn = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out: dict[str, list[str]] = {"o": [], "e": []}
    import threading

    threads = [threading.Thread(target=lambda k=k, f=f: out[k].extend(f), daemon=True)
               for k, f in (("o", proc.stdout), ("e", proc.stderr))]
    for t in threads:
        t.start()
    rc, peak = _wait(proc, t_spawn + timeout)
    for t in threads:
        t.join(timeout=5)
    res = parse_result("".join(out["o"]))
    if rc != 0 or res is None:
        log(f"  {side}: FAILED rc {rc}\n" + "".join(out["e"][-40:]))
        return {"side": side, "error": f"rc {rc}", "tail": "".join(out["e"][-40:])}
    return {**res, "side": side, "rc": rc, "peak_rss": peak, "t_spawn": t_spawn}


# -- figures ------------------------------------------------------------------------------------------------------


def time_to(curve: list[dict], target: float) -> dict[str, Any] | None:
    """The first evaluation at or below ``target`` (after step 0)."""
    for c in curve:
        if c["step"] > 0 and c["eval_loss"] <= target:
            return c
    return None


def summarise(r: dict[str, Any], target: float | None) -> dict[str, Any]:
    if "error" in r:
        return {"error": r["error"]}
    ends = r["step_ends_s"] if len(r["step_ends_s"]) == r["steps"] else []  # per-step times need log_every: 1
    steps_dt = [b - a for a, b in zip([0.0] + ends[:-1], ends)]
    s = {"steps": r["steps"], "tokens_per_s": r["tokens"] / r["train_s"] if r["train_s"] else None,
         "samples_per_s": r["samples"] / r["train_s"] if r["train_s"] else None,
         "tokens_per_step": r["tokens"] / max(r["steps"], 1), "samples_per_step": r["samples"] / max(r["steps"], 1),
         "step_s_median": statistics.median(steps_dt[1:]) if len(steps_dt) > 1 else None,
         "peak_rss_gb": r["peak_rss"] / GB,
         "peak_above_loaded_gb": (r["peak_rss"] - r["rss_train_begin"]) / GB if r.get("rss_train_begin") else None,
         "first_step_s": r["first_step_wall_s"], "final_eval_loss": r["curve"][-1]["eval_loss"] if r["curve"] else None}
    if target is not None:
        hit = time_to(r["curve"], target)
        s["time_to_target_s"] = hit["wall_s"] if hit else None
        s["steps_to_target"] = hit["step"] if hit else None
    if r.get("summary"):
        s["reported_tokens_per_s"] = r["summary"].get("tokens_per_s")
    return s


def _ratio(a, b):
    return a / b if a and b else None


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [f"## Product path vs TRL + PEFT — {result['date']}", "",
             f"`python -m bench.product {' '.join(result['argv'])}` — CPU: {m['cpu']['model']}, "
             f"{m['cpu']['affinity']} cores ({', '.join(m['cpu']['isa'])}), measured bf16 2048^3 matmul peak "
             f"{m['peak']['bf16 2048^3'] / 1e12:.2f} TFLOP/s; torch {m['torch']}, effine {m['effine']['git_head']}"
             f"{' (+edits)' if m['effine']['src_dirty'] else ''}; load average at start {m['loadavg']}. Memory = the "
             "whole process's peak RSS (os.wait4), beside the peak above the RSS with the model loaded. Time to "
             "target: from process start to the first held-out eval at or below trl-shipped's loss after its last "
             "step, evaluation time left out.", ""]
    for name, w in result["workloads"].items():
        target = w["target"]
        lines += [f"### {name} (target eval loss {target:.4f})" if target else f"### {name}", "",
                  "| side | steps | tokens/s | samples/s | tokens/step | step s | peak RSS GB | above loaded GB | "
                  "1st step s | eval loss | time to target s | speedup to target |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        base = w["sides"].get("trl-shipped", {})
        for side, s in w["sides"].items():
            if "error" in s:
                lines.append(f"| {side} | failed: {s['error']} |")
                continue
            f = lambda v, d=2: "—" if v is None else f"{v:.{d}f}"  # noqa: E731
            lines.append(f"| {side} | {s['steps']} | {f(s['tokens_per_s'], 0)} | {f(s['samples_per_s'], 1)} | "
                         f"{f(s['tokens_per_step'], 0)} | {f(s['step_s_median'], 3)} | {f(s['peak_rss_gb'])} | "
                         f"{f(s['peak_above_loaded_gb'])} | {f(s['first_step_s'], 1)} | {f(s['final_eval_loss'], 4)} | "
                         f"{f(s.get('time_to_target_s'), 1)} | "
                         f"{f(_ratio(base.get('time_to_target_s'), s.get('time_to_target_s')))} |")
        for k, v in w.get("checks", {}).items():
            lines.append(f"- {k}: {v}")
        lines.append("")
    return "\n".join(lines)


def checks(sides: dict[str, dict]) -> dict[str, str]:
    """The issue-17 goals this workload's numbers meet or miss (printed under its table)."""
    out = {}
    # (label, side, figure, over side, over figure): side's figure / the other side's, as "N.NNx"
    ratios = (
        ("time to target vs TRL shipped (goal >= 5x on short samples)", "trl-shipped", "time_to_target_s",
         "effine", "time_to_target_s"),
        ("time to target vs TRL packed (goal >= 3x on short samples)", "trl-packed", "time_to_target_s",
         "effine", "time_to_target_s"),
        # both unpacked, batch_size samples of the same rows: the per-step speed at the same kind of batches
        ("per-step speed, unpacked effine vs TRL shipped, tokens/s (goal >= 3x)", "effine-unpacked", "tokens_per_s",
         "trl-shipped", "tokens_per_s"),
        ("packing (the default) vs unpacked effine, tokens/s", "effine", "tokens_per_s", "effine-unpacked",
         "tokens_per_s"),
        ("whole-process peak RSS vs TRL shipped (goal <= 0.5x)", "effine", "peak_rss_gb", "trl-shipped",
         "peak_rss_gb"),
        ("whole-process peak RSS vs TRL packed (goal <= 0.5x)", "effine", "peak_rss_gb", "trl-packed", "peak_rss_gb"),
        ("QLoRA peak RSS vs TRL shipped (goal <= 0.35x)", "effine-qlora", "peak_rss_gb", "trl-shipped", "peak_rss_gb"),
        ("QLoRA tokens/s vs LoRA (goal >= 0.9x)", "effine-qlora", "tokens_per_s", "effine", "tokens_per_s"),
    )
    for label, a, fa, b, fb in ratios:
        r = _ratio(sides.get(a, {}).get(fa), sides.get(b, {}).get(fb))
        if r:
            out[label] = f"{r:.2f}x"
    e = sides.get("effine", {})
    d = sides.get("demo-as-shipped", {})
    r = _ratio(d.get("reported_tokens_per_s"), e.get("tokens_per_s"))
    if r:
        out["make demo's reported tokens/s / the bench's figure for the same config (guard: within 15%)"] = (
            f"{r:.3f} ({'PASS' if abs(r - 1) <= 0.15 else 'FAIL'})")
    s = sides.get("effine-system", {})
    if s and e and "error" not in s:
        out["glibc malloc vs default allocator: tokens/s, peak RSS"] = (
            f"{_ratio(s.get('tokens_per_s'), e.get('tokens_per_s')) or 0:.2f}x, "
            f"{_ratio(s.get('peak_rss_gb'), e.get('peak_rss_gb')) or 0:.2f}x")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workloads", default=",".join(PRODUCTS))
    ap.add_argument("--sides", default=",".join(SIDES))
    ap.add_argument("--steps", type=int, default=None, help="override every workload's step count (smoke tests)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per process")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    from bench.common import effine_version
    from bench.run import cpu_info, matmul_peak

    import torch

    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    machine = {"cpu": cpu_info(), "peak": matmul_peak(os.cpu_count() or 1, 576, None, quick=True),
               "torch": torch.__version__, "effine": effine_version(), "loadavg": loadavg()}
    log(f"[product] {machine['cpu']['model']}: bf16 peak {machine['peak']['bf16 2048^3'] / 1e12:.2f} TFLOP/s")
    result = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "argv": sys.argv[1:],
              "machine": machine, "workloads": {}}
    sides = [s for s in SIDES if s in args.sides.split(",")]
    for name in args.workloads.split(","):
        p = PRODUCTS[name]
        steps = args.steps or p.steps
        raw, target = {}, None
        for side in sides:
            if side == "demo-as-shipped" and not p.base_config:
                continue
            log(f"[product] {name}: {side} ...")
            t0 = time.time()
            run = run_trl if side.startswith("trl") else run_effine
            stop_at = None if side in ("trl-shipped", "demo-as-shipped") else target
            side_steps = steps
            if p.base_config and side == "effine" and not args.steps:
                # the demo's own run length, not stopped at the target (its time to the target is read from the
                # curve): the same steps as demo-as-shipped, for the guard that compares their tokens/s
                side_steps, stop_at = yaml.safe_load((ROOT / p.base_config).read_text())["train"]["max_steps"], None
            r = run(p, side, side_steps, stop_at, args.timeout, log)
            raw[side] = r
            if side == "trl-shipped" and "error" not in r and r["curve"]:
                target = r["curve"][-1]["eval_loss"]
            log(f"[product] {name}: {side} done in {time.time() - t0:.0f}s: "
                f"{json.dumps(summarise(r, target), default=str)[:400]}")
        summaries = {k: summarise(v, target) for k, v in raw.items()}
        result["workloads"][name] = {"target": target, "sides": summaries, "checks": checks(summaries), "raw": raw}
    md = markdown(result)
    print(md)
    if not args.no_save:
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d-%H%M")
        (RESULTS / f"product-{stamp}.json").write_text(json.dumps(result, indent=1, default=str))
        with (RESULTS / "README.md").open("a") as f:
            f.write("\n" + md + "\n")


if __name__ == "__main__":
    main()
