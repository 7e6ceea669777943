"""Which linear layers does 4-bit quantization hurt most? Held-out loss with all but one group quantized.

For a shipped config (its model, data and eval split), the base model's held-out loss is measured in bf16
(``L_bf16``) and with every quantizable linear quantized to ``--method`` (``L_all``, QLoRA's base). Then, for each
group of linears (one projection type across all layers, ``--by type``; or one decoder layer, ``--by layer``), the
loss with every linear *but that group* quantized (``L_-g``). The table reports, per group, the share of the
quantization gap it accounts for, ``(L_all - L_-g) / (L_all - L_bf16)``, next to its share of the quantized
weights: a group whose gap share is far above its weight share is a candidate for ``quant.skip_modules``.
The weights are round-tripped (quantize then dequantize) in place, so each measurement is exactly what a
QuantLinear of that method computes; no training is involved.

    python bench/quant_sensitivity.py --config configs/smollm2-135m-lora.yaml           # ~2 min on 2 cores
    python bench/quant_sensitivity.py --config configs/gemma3-270m-lora.yaml --by type,layer

Appends a section to bench/results/quant_sensitivity.md and writes a JSON file next to it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(HERE.parent / "configs" / "smollm2-135m-lora.yaml"))
    ap.add_argument("--method", default="nf4", choices=["nf4", "fp4", "int4", "int8"])
    ap.add_argument("--blocksize", type=int, default=64, help="nf4/fp4 block size (int4/int8: group size)")
    ap.add_argument("--by", default="type", help="comma list of groupings: type, layer")
    ap.add_argument("--eval-batches", type=int, default=8, help="eval batches per measurement")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)

    import torch

    from effine.adapters.lora import base_weight, lora_modules
    from effine.config import load_config
    from effine.data import build_datasets
    from effine.eval.evaluate import evaluate
    from effine.model.loader import cache_root, load_tokenizer, resolve_model_dir
    from effine.quant import QuantLinear
    from effine.recipe import ModelRecipe, build_model

    cfg = load_config(args.config, ["quant.method=none", f"eval.max_batches={args.eval_batches}"])
    model_dir = resolve_model_dir(cfg.model.name, cfg.model.cache_dir, cfg.model.revision)
    tok = load_tokenizer(model_dir)
    _, eval_set, _ = build_datasets(cfg.data, tok, cache_dir=cache_root(cfg.model.cache_dir), log=lambda *a: None)
    model = build_model(ModelRecipe.from_config(cfg), model_dir=model_dir)  # the training model: fused ops, LoRA wrappers (B = 0)
    model.eval()
    bs = cfg.eval.batch_size or cfg.train.batch_size

    def loss() -> float:
        return evaluate(model, eval_set, bs, tok.pad_token_id, cfg.eval.max_batches)["eval_loss"]

    mods = {n: m.base for n, m in lora_modules(model).items()}
    orig = {n: m.weight.detach().clone() for n, m in mods.items()}
    kw = {"blocksize": args.blocksize} if args.method in ("nf4", "fp4") else {"group_size": args.blocksize}
    rounded = {}
    for n, m in mods.items():  # what a QuantLinear of this method computes with, in the model's dtype
        rounded[n] = base_weight(QuantLinear.from_linear(m, method=args.method, **kw)).to(orig[n].dtype)

    def quantize_all_but(group: set[str]) -> None:
        with torch.no_grad():
            for n, m in mods.items():
                m.weight.copy_(orig[n] if n in group else rounded[n])

    torch.set_num_threads(cfg.train.threads or torch.get_num_threads())
    quantize_all_but(set(mods))
    l_ref = loss()
    quantize_all_but(set())
    l_all = loss()
    gap = l_all - l_ref
    print(f"bf16 {l_ref:.4f}  all {args.method} {l_all:.4f} ({l_all / l_ref - 1:+.2%})", flush=True)
    total_w = sum(w.numel() for w in orig.values())
    groups: dict[str, set[str]] = {}
    for n in mods:
        layer = re.search(r"layers\.(\d+)\.", n)
        if "type" in args.by:
            groups.setdefault(f"{n.rsplit('.', 1)[-1]} (all layers)", set()).add(n)
        if "layer" in args.by and layer:
            groups.setdefault(f"layer {int(layer.group(1)):02d}", set()).add(n)
    rows = []
    for g, names in groups.items():
        quantize_all_but(names)
        lg = loss()
        share_w = sum(orig[n].numel() for n in names) / total_w
        share_gap = (l_all - lg) / gap if gap else float("nan")
        rows.append({"group": g, "loss": lg, "gap_share": share_gap, "weight_share": share_w})
        print(f"{g:28s} kept: loss {lg:.4f}, {share_gap:6.1%} of the gap, {share_w:5.1%} of the weights", flush=True)
    rows.sort(key=lambda r: -r["gap_share"] / max(r["weight_share"], 1e-9))

    date = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    name = Path(args.config).stem
    rep = {"date": date, "config": args.config, "method": args.method, "blocksize": args.blocksize,
           "eval_batches": args.eval_batches, "loss_bf16": l_ref, "loss_all_quantized": l_all, "groups": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"quant_sensitivity-{name}-{args.method}.json").write_text(json.dumps(rep, indent=1))
    md = [f"## {name}: {args.method} (block {args.blocksize}) sensitivity — {date}", "",
          f"Held-out loss ({args.eval_batches} eval batches): bf16 {l_ref:.4f}, every linear {args.method} "
          f"{l_all:.4f} ({l_all / l_ref - 1:+.2%}). Command: `python bench/quant_sensitivity.py --config "
          f"configs/{Path(args.config).name} --method {args.method} --by {args.by}`", "",
          "| group kept in bf16 | loss | share of the gap | share of the weights | ratio |", "|---|---|---|---|---|"]
    md += [f"| {r['group']} | {r['loss']:.4f} | {r['gap_share']:.1%} | {r['weight_share']:.1%} | "
           f"{r['gap_share'] / max(r['weight_share'], 1e-9):.1f} |" for r in rows]
    with open(out / "quant_sensitivity.md", "a") as f:
        f.write("\n".join(md) + "\n\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent / "src"))
    raise SystemExit(main())
