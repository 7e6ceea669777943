"""CUDA training-step benchmark: effine LoRA / QLoRA vs the usual transformers + PEFT LoRA, random-init large shapes.

    python bench/gpu_train.py --models llama-1b,mistral-7b --out bench/results/gpu.json
    python bench/gpu_train.py --tiny            # CPU smoke test of the script itself (tiny shapes)

Each variant builds the model on the device in bf16 (random init: speed and memory do not depend on the weights),
trains `--steps` steps on random token ids whose first half is masked out of the loss (a prompt share of one half),
and reports tokens/s (after `--warmup` steps), peak device memory and the loss of the first step (all variants see
the same batch, so the first-step losses must agree up to bf16 noise; QLoRA's differs by the quantization error).

Variants:
  effine-lora      effine LoRA (fp32 adapters), effine attention (SDPA / flash-attn), chunked loss (no full logits)
  peft-lora        peft.get_peft_model + model(input_ids, labels=...).loss: transformers' own loss on full logits
  effine-qlora     base linears stored NF4 (effine.quant.QuantLinear, double quant) + effine LoRA
  peft-qlora       bitsandbytes Linear4bit (NF4, double quant, bf16 compute) + PEFT LoRA: the usual QLoRA stack
  effine-*-ckpt    the same with gradient checkpointing (transformers' per-layer, non-reentrant)

effine variants also swap in effine's fused RMSNorm / gated MLP, as `effine train` does by default.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from effine.adapters import inject_lora  # noqa: E402
from effine.config import AdapterConfig  # noqa: E402
from effine.model.tiny import random_large_config, tiny_config  # noqa: E402
from effine.ops.attention import enable  # noqa: E402
from effine.ops.swap import fuse_model  # noqa: E402
from effine.train.step import backward_window  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(name: str, device: str, tiny: bool):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama", vocab_size=512) if tiny else random_large_config(name)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    return model


def _to_bnb_nf4(model, device: str) -> None:
    """The QLoRA baseline: every decoder-layer linear as a bitsandbytes Linear4bit (NF4, double quant, blocksize
    64, bf16 compute), what BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=bfloat16) builds when loading a checkpoint."""
    import bitsandbytes as bnb

    for parent in list(model.model.layers.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                  device="cpu")
            q.weight = bnb.nn.Params4bit(child.weight.data.to("cpu"), requires_grad=False, compress_statistics=True,
                                         quant_type="nf4", blocksize=64)
            if child.bias is not None:
                q.bias = torch.nn.Parameter(child.bias.data.to("cpu"), requires_grad=False)
            setattr(parent, name, q.to(device))  # quantized on the move to the device
            del child
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def batch_for(cfg, bsz: int, seq: int, device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (bsz, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq // 2] = -100
    return {"input_ids": ids.to(device), "labels": labels.to(device),
            "attention_mask": torch.ones_like(ids).to(device),
            "position_ids": torch.arange(seq).expand(bsz, seq).contiguous().to(device),
            "doc_lengths": [[seq]] * bsz}


def run_variant(variant: str, name: str, args, device: str) -> dict:
    model = build(name, device, args.tiny)
    batch = batch_for(model.config, args.batch, args.seq, device)
    if variant in ("peft-lora", "peft-qlora"):
        from peft import LoraConfig, get_peft_model

        if variant == "peft-qlora":
            _to_bnb_nf4(model, device)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0))

        def step():
            out = model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False)
            out.loss.backward()
            return float(out.loss)
    else:
        if variant.startswith("effine-qlora"):
            from effine.quant import quantize_model

            quantize_model(model, "nf4", double_quant=True)
        enable(model)
        inject_lora(model, AdapterConfig(r=16, alpha=32.0), dtype=torch.float32)
        fuse_model(model)  # what `effine train` does (model.fused_ops, on by default)
        if variant.endswith("-ckpt"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

        def step():
            loss, n = backward_window(model, [batch])
            return loss / n
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(args.warmup + args.steps):
        sync()
        t = time.perf_counter()
        losses.append(step())
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t)
    measured = sorted(times[args.warmup:])
    median = measured[len(measured) // 2]
    tokens = args.batch * args.seq
    res = {"model": name, "variant": variant, "batch": args.batch, "seq": args.seq,
           "tokens_per_s": tokens / median, "step_s_median": median, "first_loss": losses[0],
           "last_loss": losses[-1],
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None}
    model = opt = params = step = None  # free this variant before the next one is built
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="llama-1b,mistral-7b")
    ap.add_argument("--variants", default="effine-lora,peft-lora,effine-qlora")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip what would start after this many seconds")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test with tiny shapes")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if args.tiny:
        args.batch, args.seq, args.steps, args.warmup = 2, 64, 2, 1
    t0 = time.perf_counter()
    info = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__}
    print(json.dumps(info), flush=True)
    results = []
    for name in args.models.split(","):
        for variant in args.variants.split(","):
            if time.perf_counter() - t0 > args.budget_s:
                print(json.dumps({"skipped": f"{name}/{variant}", "reason": "time budget"}), flush=True)
                continue
            try:
                res = run_variant(variant, name, args, device)
            except Exception as e:  # record and go on: one failure must not cost the other numbers
                res = {"model": name, "variant": variant, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            results.append(res)
            print(json.dumps(res), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"info": info, "results": results}, indent=2))


if __name__ == "__main__":
    main()
