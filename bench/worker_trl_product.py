"""Benchmark worker for bench/product.py: TRL ``SFTTrainer`` + PEFT LoRA as a user runs it, with a held-out eval curve.

Reads the file bench/product.py writes (effine's tokenisation of the workload: ``train`` and ``eval`` rows with
``input_ids`` and unshifted ``labels``; TRL uses a ``labels`` column as is), so both sides train on the same tokens
with the same supervised positions and are evaluated on the same held-out rows. Modes:

``shipped``  SFTTrainer's defaults apart from what is needed to run the same job: the model passed as a path (TRL
             loads it: fp32 weights under bf16 autocast), ``peft_config`` (the workload's LoRA), ``max_steps``,
             ``per_device_train_batch_size``, ``max_length``, use_cpu, no saving / reporting. TRL's defaults stay:
             lr 2e-5 with linear decay, gradient checkpointing on, a random sampler, no packing.
``packed``   TRL at its own best settings for short samples on CPU: ``packing=True`` (best-fit decreasing into rows
             of ``max_length``; TRL turns on padding-free batches, and transformers' SDPA path builds the
             per-document mask from ``position_ids``), the model loaded in bf16, gradient checkpointing off, and the
             learning rate a LoRA user sets (the workload's, 2e-4; TRL's linear decay kept).

Every ``--eval-every`` steps (and before the first) a callback measures the held-out loss with
``bench.common.heldout_loss`` (one row per forward, token mean over supervised positions) and the training time so
far, evaluation time excluded. ``--target L`` stops training at the first evaluation at or below L (the time to
a good model; the parent passes the loss TRL shipped reached). Prints one ``BENCH_RESULT {json}`` line.
"""

from __future__ import annotations

import time

T_START = time.time()

import argparse  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402

from bench.common import emit, heldout_loss, read_workload_file, rss_bytes  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--mode", choices=["shipped", "packed"], required=True)
    ap.add_argument("--eval-every", type=int, required=True)
    ap.add_argument("--target", type=float, default=None)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--t-spawn", type=float, default=None)
    args = ap.parse_args()
    t_spawn = args.t_spawn or T_START

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    import trl
    from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(args.threads)
    blob = read_workload_file(args.data)
    meta, w = blob["meta"], blob["meta"]["workload"]
    ds = Dataset.from_dict({"input_ids": [e["input_ids"] for e in blob["train"]],
                            "labels": [e["labels"] for e in blob["train"]]})
    tok = AutoTokenizer.from_pretrained(meta["tokenizer_dir"])
    if tok.pad_token_id is None:
        tok.pad_token_id = blob["pad_id"]
    lora = LoraConfig(r=w["r"], lora_alpha=w["alpha"], lora_dropout=0.0, target_modules=list(w["targets"]),
                      bias="none", task_type="CAUSAL_LM")
    kw = dict(output_dir=tempfile.mkdtemp(prefix="bench-trl-product-"), max_steps=args.steps,
              per_device_train_batch_size=w["batch_size"], use_cpu=True, max_length=w["max_length"],
              logging_steps=10, save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0,
              seed=w["seed"])
    if args.mode == "packed":
        kw.update(packing=True, learning_rate=w["lr"], gradient_checkpointing=False,
                  model_init_kwargs={"dtype": torch.bfloat16})
    sft = SFTConfig(**kw)

    class Clock(TrainerCallback):
        """Step times, tokens and documents per step, and the held-out curve with evaluation time excluded."""

        def __init__(self):
            self.begin = self.eval_s = 0.0
            self.step_ends: list[float] = []
            self.curve: list[dict] = []
            self.rss_begin = 0

        def evaluate(self, step: int, model) -> float:
            t0 = time.perf_counter()
            res = heldout_loss(model, blob["eval"], torch.bfloat16 if sft.bf16 else None)
            now = time.perf_counter()
            self.curve.append({"step": step, "eval_loss": res["loss"], "train_s": t0 - self.begin - self.eval_s,
                               "wall_s": time.time() - t_spawn - self.eval_s - (now - t0)})
            self.eval_s += now - t0
            return res["loss"]

        def on_train_begin(self, args_, state, control, model=None, **kw_):
            self.rss_begin = rss_bytes()
            self.begin = time.perf_counter()
            self.evaluate(0, model)

        def on_step_end(self, args_, state, control, model=None, **kw_):
            self.step_ends.append(time.perf_counter() - self.begin - self.eval_s)
            if state.global_step % args.eval_every == 0 or state.global_step == args.steps:
                loss = self.evaluate(state.global_step, model)
                if args.target is not None and loss <= args.target:
                    control.should_training_stop = True

    class Counting(SFTTrainer):
        """Counts the non-pad tokens and the documents of every batch (a packed row holds several)."""

        tokens: list[int] = []
        docs: list[int] = []

        def training_step(self, model, inputs, num_items_in_batch=None):
            pos = inputs.get("position_ids")
            att = inputs.get("attention_mask")
            if pos is not None and att is None:  # padding-free: one flattened row, documents start at position 0
                self.tokens.append(int(pos.numel()))
                self.docs.append(int((pos == 0).sum()))
            else:
                self.tokens.append(int(att.sum()) if att is not None else int(inputs["input_ids"].numel()))
                self.docs.append(int(inputs["input_ids"].shape[0]))
            return super().training_step(model, inputs, num_items_in_batch)

    clock = Clock()
    t_init0 = time.time()
    trainer = Counting(model=meta["model_dir"], args=sft, train_dataset=ds, processing_class=tok, peft_config=lora,
                       callbacks=[clock])
    t_init = time.time()
    trainer.train()
    ends = clock.step_ends
    emit({"side": f"trl-{args.mode}", "workload": w["name"], "threads": torch.get_num_threads(),
          "versions": {"trl": trl.__version__, "torch": torch.__version__},
          "steps": len(ends), "tokens": sum(trainer.tokens), "samples": sum(trainer.docs),
          "train_s": ends[-1] if ends else 0.0, "step_ends_s": ends, "curve": clock.curve,
          "first_step_wall_s": (t_init - t_spawn) + (ends[0] if ends else 0.0),
          "load_s": t_init - t_init0, "rss_train_begin": clock.rss_begin, "eval_s": clock.eval_s,
          "settings": {"lr": sft.learning_rate, "scheduler": str(sft.lr_scheduler_type), "packing": sft.packing,
                       "padding_free": getattr(trainer, "padding_free", None),
                       "gradient_checkpointing": sft.gradient_checkpointing, "bf16_autocast": sft.bf16,
                       "model_dtype": str(next(trainer.model.parameters()).dtype)}})


if __name__ == "__main__":
    main()
