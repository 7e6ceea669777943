"""Benchmark worker: effine LoRA training on the fixed batches of a pre-tokenised workload file.

Run by bench/run.py in its own process; prints one ``BENCH_RESULT {json}`` line. What it runs is effine's own
path: the model from ``effine.recipe.build_model`` (bf16 base, effine's attention backend, fp32 LoRA, fused ops),
``effine.train.optim.build_optimizer`` (AdamW), and per step ``effine.train.step.train_step``, the function the
training loop calls (chunked loss on supervised positions only, global grad-norm clip, AdamW step, zero grads).
``train_loop`` itself is not called because it draws its own batch order; here each step collates the next fixed
batch with ``effine.data.collate``.

    python bench/worker_effine.py --data bench/cache/smollm2-chat-512-XXXX.json --steps 13 [--threads 2]
    python bench/worker_effine.py ... --profile 5   # torch.profiler table of step 5 (self CPU time) on stderr
"""

from __future__ import annotations

import time

T_START = time.time()  # before any heavy import: import time is part of the time to first step

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (RssSampler, batch_stats, cpu_snapshot, effine_version, emit, foreign_cores,  # noqa: E402
                    heldout_loss, hwm_bytes, loadavg, lora_a_init, maxrss_bytes, read_workload_file, reset_peak,
                    rss_bytes)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--t-spawn", type=float, default=None, help="time.time() when the parent spawned us")
    ap.add_argument("--profile", type=int, default=None, help="profile this step (0-based) with torch.profiler")
    ap.add_argument("--attn", default="auto", help="effine model.attn (auto = effine's default; sdpa, eager)")
    ap.add_argument("--loss-impl", default="chunked")
    ap.add_argument("--quant", default="none", help="effine quant.method for the frozen base (nf4 = QLoRA)")
    args = ap.parse_args()
    t_spawn = args.t_spawn or T_START
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from effine.system import allocator

    allocator.ensure()  # as `effine train` does: re-executes under jemalloc when one is found (EFFINE_ALLOCATOR)

    import torch

    from effine.adapters import count_parameters, lora_modules
    from effine.config import AdapterConfig, Config, DataConfig, ModelConfig, QuantConfig, TrainConfig
    from effine.data import Example, PackedRow, collate
    from effine.train.optim import build_optimizer
    from effine.train.step import train_step
    from effine.recipe import ModelRecipe, build_model

    torch.set_num_threads(args.threads)
    version = effine_version()
    t_import = time.time()

    # -- data (the fixed batches) --------------------------------------------------------------------------------
    blob = read_workload_file(args.data)
    meta, w = blob["meta"], blob["meta"]["workload"]
    items = []
    for i, e in enumerate(blob["examples"]):
        if "doc_lengths" in e:
            items.append(PackedRow(e["input_ids"], e["labels"], e["position_ids"], e["doc_lengths"]))
        else:
            items.append(Example(e["input_ids"], e["labels"], f"bench:{i}"))
    batches = blob["batches"][: args.steps]
    if len(batches) < args.steps:
        raise SystemExit(f"data file holds {len(blob['batches'])} batches, {args.steps} steps asked")
    pad_id = blob["pad_id"]
    t_data = time.time()

    # -- model: effine's own build_model -----------------------------------------------------------------------
    torch.manual_seed(w["seed"])
    cfg = Config(model=ModelConfig(name=meta["model_dir"], dtype="bf16", attn=args.attn, gradient_checkpointing=False),
                 data=DataConfig(max_length=w["max_length"], packing=w["packing"]),
                 adapter=AdapterConfig(method="lora", r=w["r"], alpha=w["alpha"], dropout=w["dropout"],
                                       target_modules=list(w["targets"])),
                 quant=QuantConfig(method=args.quant),
                 train=TrainConfig(batch_size=w["batch_size"], lr=w["lr"], weight_decay=w["weight_decay"],
                                   warmup_steps=0, schedule="constant", max_grad_norm=w["max_grad_norm"],
                                   loss_impl=args.loss_impl, threads=args.threads))
    logs: list[str] = []
    model = build_model(ModelRecipe.from_config(cfg), model_dir=Path(meta["model_dir"]), log=logs.append)
    mods = lora_modules(model)
    with torch.no_grad():  # identical adapter init on both sides (B = 0 already)
        for name, m in mods.items():
            m.lora_A.weight.copy_(lora_a_init(name, m.r, m.in_features, w["seed"]))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = build_optimizer(trainable, cfg.train)
    params = [p for _, p in trainable]
    n_trainable, n_total = count_parameters(model)
    model.train()
    t_load = time.time()

    # model shape for the FLOP model in run.py (matmul weights inside the decoder layers, lm_head, attention dims)
    c = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    n_mm = sum(m.in_features * m.out_features for m in mods.values())
    lin_other = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n
                 and not n.endswith(("lora_A", "lora_B", ".base"))]
    n_mm += sum(m.weight.numel() for m in lin_other)
    head = model.get_output_embeddings()
    shape = {"n_matmul_layers": n_mm, "n_lora": n_trainable, "n_total": n_total,
             "lm_head": head.weight.numel(), "vocab": head.weight.shape[0], "hidden": c.hidden_size,
             "layers": c.num_hidden_layers, "d_attn": c.num_attention_heads * head_dim,
             "intermediate": getattr(c, "intermediate_size", None), "lora_modules": len(mods),
             "sliding_window": getattr(c, "sliding_window", None)}

    gc_rss = rss_bytes()
    reset_ok = reset_peak()
    rss_post_load = rss_bytes()
    sampler = RssSampler().start()
    load0 = loadavg()

    # -- the training steps --------------------------------------------------------------------------------------
    steps = []
    t_prev = time.perf_counter()
    c_prev = time.process_time()
    snap_prev = cpu_snapshot()
    t_train0 = t_prev
    t_first_step_end = None
    prof_table = None
    for i, b in enumerate(batches):
        rows = [items[j] for j in b]
        prof = None
        if args.profile is not None and i == args.profile:
            from torch.profiler import ProfilerActivity, profile
            prof = profile(activities=[ProfilerActivity.CPU], record_shapes=False)
            prof.__enter__()
        t0 = time.perf_counter()
        batch = collate(rows, pad_id)
        ta = time.perf_counter()
        # effine's one training step (as the loop runs it); constant lr, no warmup
        res = train_step(model, optimizer, [batch], cfg.train.lr, cfg.train.max_grad_norm, params, cfg.train.loss_impl)
        loss_sum, n_sup, grad_norm = res.loss_sum, res.supervised, res.grad_norm
        t1 = time.perf_counter()
        phases = {"collate": ta - t0, **res.phases}
        if prof is not None:
            prof.__exit__(None, None, None)
            prof_table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
            print(prof_table, file=sys.stderr, flush=True)
        st = batch_stats([r.input_ids for r in rows], [r.labels for r in rows])
        assert st["supervised"] == n_sup, (st, n_sup)
        c1 = time.process_time()
        snap = cpu_snapshot()
        steps.append({"step": i, "interval_s": t1 - t_prev, "compute_s": t1 - t0, "cpu_s": c1 - c_prev,
                      "foreign_cores": foreign_cores(snap_prev, snap, t1 - t_prev),
                      "loss": loss_sum / max(n_sup, 1), "grad_norm": grad_norm, **st, "phases": phases,
                      "profiled": prof is not None})
        t_prev, c_prev, snap_prev = t1, c1, snap
        if t_first_step_end is None:
            t_first_step_end = time.time()
    sampler.stop()
    peak_hwm, peak_maxrss = (hwm_bytes() if reset_ok else None), maxrss_bytes()  # before the held-out eval
    heldout = None
    if blob.get("heldout"):  # the eval loss after training, by the same code on both sides (common.heldout_loss)
        heldout = heldout_loss(model, [blob["examples"][i] for i in blob["heldout"]], None)

    emit({
        "side": "effine" if args.quant == "none" else f"effine-{args.quant}", "mode": "effine", "workload": w["name"], "threads": torch.get_num_threads(),
        "effine_version": version,
        "torch": torch.__version__, "steps": steps,
        "time_to_first_step": {"import_s": t_import - t_spawn, "data_s": t_data - t_import, "load_s": t_load - t_data,
                               "first_step_s": steps[0]["interval_s"], "total_s": t_first_step_end - t_spawn},
        "train_wall_s": time.perf_counter() - t_train0,
        "rss": {"post_load": rss_post_load, "pre_reset": gc_rss, "peak_reset_ok": reset_ok,
                "peak_train_hwm": peak_hwm, "peak_sampled": sampler.max,
                "ru_maxrss": peak_maxrss, "trace": sampler.samples},
        "heldout": heldout,
        "loadavg": {"start": load0, "end": loadavg()},
        "model": shape, "trainable": n_trainable,
        "settings": {"allocator": allocator.describe(), "dtype": ("bf16 base" if args.quant == "none" else f"{args.quant} base (effine QuantLinear, "
                               "bf16 compute)") + ", fp32 LoRA weights (compute: bf16 base and adapter matmuls)",
                     "attention": f"{model.config._attn_implementation} (effine backend {args.attn})",
                     "optimizer": f"torch.optim.AdamW {'fused' if optimizer.defaults.get('fused') else 'foreach'}, lr {cfg.train.lr}, constant, wd {cfg.train.weight_decay}",
                     "grad_clip": cfg.train.max_grad_norm, "loss": f"effine {cfg.train.loss_impl} CE on supervised rows",
                     "log": logs},
        "profile": prof_table,
    })


if __name__ == "__main__":
    main()
