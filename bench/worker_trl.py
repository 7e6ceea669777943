"""Benchmark worker: the baseline, TRL ``SFTTrainer`` + PEFT LoRA, on the same pre-tokenised workload file.

Run by bench/run.py in its own process; prints one ``BENCH_RESULT {json}`` line. Two modes:

``matched``  everything that can be set to effine's settings is:
             * the model is loaded by us in bf16 (``AutoModelForCausalLM.from_pretrained(dtype=bfloat16,
               attn_implementation="sdpa")``) and wrapped with ``peft.get_peft_model`` (r, alpha, dropout 0, the same
               seven target suffixes; PEFT keeps the adapters in fp32: ``autocast_adapter_dtype=True``); every
               ``lora_A`` is overwritten with the same deterministic init effine uses (B = 0 on both sides);
             * the dataset is pre-tokenised: ``input_ids`` + ``labels`` columns from the workload file (TRL 1.16
               uses a ``labels`` column as is, so the supervised positions are identical), rows laid out in the
               fixed batch order; ``train_sampling_strategy="sequential"``, ``shuffle_dataset=False`` and
               ``per_device_train_batch_size=B``, so batch k of TRL is batch k of effine;
             * SFTConfig: bf16=True, use_cpu=True, lr 2e-4, ``lr_scheduler_type="constant"``, warmup 0,
               weight decay 0, max_grad_norm 1.0, packing False, padding_free False, gradient_checkpointing False,
               max_length = the workload's, logging every step, no saving, no reporting, no eval.
``shipped``  SFTTrainer's defaults apart from what is needed to run the same job: the model is passed as a path
             (so TRL loads it itself: fp32 weights by TRL's default, ``bf16=True`` autocast by SFTConfig's default),
             ``peft_config`` with the same LoRA config, the same pre-tokenised rows, ``max_steps``,
             ``per_device_train_batch_size``, ``max_length`` (so nothing is truncated differently), use_cpu,
             no saving/reporting. Everything else is TRL's default: gradient checkpointing ON, lr 2e-5 with a
             linear decay, a random sampler (so batches differ from effine's: more padding per batch).

``--quant nf4`` (QLoRA, matched mode only): the model is loaded with ``BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=bfloat16)`` (bitsandbytes'
CPU backend here), i.e. the QLoRA recipe; ``prepare_model_for_kbit_training`` is NOT called because it would turn
on gradient checkpointing and upcast the norms to fp32, which the matched effine side does not do.

Instrumentation: a ``TrainerCallback`` timestamps ``on_train_begin`` and every ``on_step_end`` (per-step interval =
between consecutive step ends, which includes the dataloader fetch and the trainer's per-step bookkeeping, as
effine's interval includes its collate); the trainer subclass only records each step's loss and batch.
"""

from __future__ import annotations

import time

T_START = time.time()

import argparse  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402

from bench.common import (RssSampler, batch_stats, cpu_snapshot, emit, foreign_cores, heldout_loss,  # noqa: E402
                    hwm_bytes, loadavg, lora_a_init, maxrss_bytes, read_workload_file, reset_peak, rss_bytes)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--mode", choices=["matched", "shipped"], default="matched")
    ap.add_argument("--quant", choices=["none", "nf4"], default="none", help="nf4: bitsandbytes 4-bit base (QLoRA)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--t-spawn", type=float, default=None)
    args = ap.parse_args()
    t_spawn = args.t_spawn or T_START

    import torch
    import transformers
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    import trl
    from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(args.threads)
    t_import = time.time()

    blob = read_workload_file(args.data)
    meta, w = blob["meta"], blob["meta"]["workload"]
    if w["packing"]:
        raise SystemExit("worker_trl: packed workload files are effine-only (TRL's packing needs padding-free "
                         "FlashAttention); run the baseline without --packing")
    batches = blob["batches"][: args.steps]
    if len(batches) < args.steps:
        raise SystemExit(f"data file holds {len(blob['batches'])} batches, {args.steps} steps asked")
    ex = blob["examples"]
    order = [i for b in batches for i in b]  # rows in batch order: sequential sampler + batch B == the same batches
    ds = Dataset.from_dict({"input_ids": [ex[i]["input_ids"] for i in order],
                            "labels": [ex[i]["labels"] for i in order]})
    tok = AutoTokenizer.from_pretrained(meta["tokenizer_dir"])
    tok.pad_token_id = blob["pad_id"] if tok.convert_ids_to_tokens(blob["pad_id"]) else tok.pad_token_id
    t_data = time.time()

    lora = LoraConfig(r=w["r"], lora_alpha=w["alpha"], lora_dropout=w["dropout"], target_modules=list(w["targets"]),
                      bias="none", task_type="CAUSAL_LM")
    common_kw = dict(output_dir=tempfile.mkdtemp(prefix="bench-trl-"), max_steps=args.steps,
                     per_device_train_batch_size=w["batch_size"], use_cpu=True, max_length=w["max_length"],
                     logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
                     dataloader_num_workers=0, seed=w["seed"])
    if args.mode == "matched":
        qkw = {}
        if args.quant == "nf4":
            from transformers import BitsAndBytesConfig

            qkw["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(meta["model_dir"], dtype=torch.bfloat16,
                                                     attn_implementation="sdpa", use_safetensors=True, **qkw)
        model = get_peft_model(model, lora)
        sft = SFTConfig(**common_kw, bf16=True, learning_rate=w["lr"], lr_scheduler_type="constant", warmup_steps=0,
                        weight_decay=w["weight_decay"], max_grad_norm=w["max_grad_norm"], packing=False,
                        padding_free=False, gradient_checkpointing=False, shuffle_dataset=False,
                        train_sampling_strategy="sequential", eval_strategy="no")
        model_arg, peft_arg = model, None
    else:
        if args.quant != "none":
            raise SystemExit("worker_trl: --quant is only implemented for --mode matched")
        sft = SFTConfig(**common_kw)
        model_arg, peft_arg = meta["model_dir"], lora
    t_model = time.time()

    class Clock(TrainerCallback):
        def __init__(self):
            self.begin = None
            self.ends: list[float] = []
            self.cpu: list[float] = []
            self.snaps: list[tuple[float, float]] = []

        def on_train_begin(self, args, state, control, **kw):
            self.begin = time.perf_counter()
            self.cpu0 = time.process_time()
            self.snap0 = cpu_snapshot()

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())
            self.cpu.append(time.process_time())
            self.snaps.append(cpu_snapshot())

    class BenchSFT(SFTTrainer):
        """SFTTrainer with two lines of bookkeeping: the loss training_step returns and the batch it saw."""

        bench_losses: list[float] = []
        bench_batches: list[dict] = []
        bench_compute: list[float] = []

        def training_step(self, model, inputs, num_items_in_batch=None):
            ids, lab, att = inputs["input_ids"], inputs["labels"], inputs.get("attention_mask")
            t0 = time.perf_counter()
            loss = super().training_step(model, inputs, num_items_in_batch)
            self.bench_compute.append(time.perf_counter() - t0)
            n = att.sum(1).tolist() if att is not None else [ids.shape[1]] * ids.shape[0]
            rows = [ids[r, : n[r]].tolist() for r in range(ids.shape[0])]
            labs = [lab[r, : n[r]].tolist() for r in range(ids.shape[0])]
            self.bench_batches.append(batch_stats(rows, labs) | {"first_ids": [r[:4] for r in rows]})
            self.bench_losses.append(float(loss))
            return loss

    clock = Clock()
    trainer = BenchSFT(model=model_arg, args=sft, train_dataset=ds, processing_class=tok, peft_config=peft_arg,
                       callbacks=[clock])
    pm = trainer.model
    n_lora = 0
    with torch.no_grad():  # identical adapter init on both sides (PEFT starts B at 0 too)
        for name, mod in pm.named_modules():
            if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
                path = name.removeprefix("base_model.model.")
                a = mod.lora_A["default"].weight
                a.copy_(lora_a_init(path, a.shape[0], a.shape[1], w["seed"]).to(a.dtype))
                n_lora += 1
    n_trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    dtypes = sorted({str(p.dtype) for p in pm.parameters() if p.requires_grad})
    base_dtypes = sorted({str(p.dtype) for p in pm.parameters() if not p.requires_grad})
    t_init = time.time()

    gc_rss = rss_bytes()
    reset_ok = reset_peak()
    rss_post_load = rss_bytes()
    sampler = RssSampler().start()
    load0 = loadavg()
    t_train_call = time.perf_counter()
    trainer.train()
    t_train_end = time.perf_counter()
    sampler.stop()
    peak_hwm, peak_maxrss = (hwm_bytes() if reset_ok else None), maxrss_bytes()  # before the held-out eval
    heldout = None
    if blob.get("heldout"):  # the eval loss after training, by the same code on both sides (common.heldout_loss)
        heldout = heldout_loss(trainer.model, [blob["examples"][i] for i in blob["heldout"]],
                               torch.bfloat16 if getattr(sft, "bf16", False) else None)  # as it trained

    ends = clock.ends
    prev = [clock.begin] + ends[:-1]
    cpu_prev = [clock.cpu0] + clock.cpu[:-1]
    snap_prev = [clock.snap0] + clock.snaps[:-1]
    steps = []
    for i, (a, b) in enumerate(zip(prev, ends)):
        st = dict(trainer.bench_batches[i])
        first = st.pop("first_ids")
        steps.append({"step": i, "interval_s": b - a, "compute_s": trainer.bench_compute[i],
                      "cpu_s": clock.cpu[i] - cpu_prev[i],
                      "foreign_cores": foreign_cores(snap_prev[i], clock.snaps[i], b - a),
                      "loss": trainer.bench_losses[i], **st, "first_ids": first})
    # Did TRL see exactly the fixed batches? Compare each batch's rows with the file.
    same_batches = all(
        [ex[j]["input_ids"][:4] for j in b] == s["first_ids"]
        and s["tokens"] == sum(len(ex[j]["input_ids"]) for j in b)
        and s["supervised"] == sum(sum(1 for y in ex[j]["labels"][1:] if y != -100) for j in b)
        for b, s in zip(batches, steps))
    for s in steps:
        s.pop("first_ids")
    opt = trainer.optimizer
    inner = getattr(opt, "optimizer", opt)
    g0 = inner.param_groups[0]
    opt_desc = (f"{type(inner).__name__} fused={g0.get('fused')} foreach={g0.get('foreach')} lr={g0['lr']} "
                f"betas={g0['betas']} eps={g0['eps']} weight_decay(groups)={[g['weight_decay'] for g in inner.param_groups]}")
    emit({
        "side": "trl", "mode": args.mode, "quant": args.quant, "workload": w["name"], "threads": torch.get_num_threads(),
        "torch": torch.__version__, "versions": {"trl": trl.__version__, "transformers": transformers.__version__,
                                                 "peft": __import__("peft").__version__},
        "steps": steps, "same_batches_as_file": same_batches,
        "time_to_first_step": {"import_s": t_import - t_spawn, "data_s": t_data - t_import,
                               "load_s": (t_model - t_data) + (t_init - t_model),
                               "trainer_init_s": t_init - t_model,
                               "train_setup_s": clock.begin - t_train_call,
                               "first_step_s": steps[0]["interval_s"],
                               "total_s": (t_init - t_spawn) + (ends[0] - t_train_call)},
        "train_wall_s": t_train_end - t_train_call,
        "rss": {"post_load": rss_post_load, "pre_reset": gc_rss, "peak_reset_ok": reset_ok,
                "peak_train_hwm": peak_hwm, "peak_sampled": sampler.max,
                "ru_maxrss": peak_maxrss, "trace": sampler.samples},
        "heldout": heldout,
        "loadavg": {"start": load0, "end": loadavg()},
        "trainable": n_trainable, "lora_modules": n_lora,
        "settings": {"quant": args.quant, "trainable_dtypes": dtypes, "base_dtypes": base_dtypes, "bf16_autocast": sft.bf16,
                     "gradient_checkpointing": sft.gradient_checkpointing, "lr": sft.learning_rate,
                     "lr_scheduler": str(sft.lr_scheduler_type), "warmup_steps": sft.warmup_steps,
                     "sampler": str(sft.train_sampling_strategy), "optim": str(sft.optim), "optimizer": opt_desc,
                     "max_grad_norm": sft.max_grad_norm, "weight_decay": sft.weight_decay,
                     "padding_free": sft.padding_free, "packing": sft.packing,
                     "attn_implementation": getattr(pm.config, "_attn_implementation", None),
                     "loss": "TRL fused LM head (log_probs + entropy + is_top1 on supervised rows)"},
    })


if __name__ == "__main__":
    main()
