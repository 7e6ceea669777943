"""QLoRA (NF4 base) against bf16 LoRA end to end: held-out loss after the same steps, and training tokens/s.

Procedure (settings fixed before running): the shipped demo config ``configs/smollm2-135m-lora.yaml`` (SmolLM2-135M-
Instruct, builtin:chitchat, LoRA r=16 on all attention + MLP linears, batch 8 x 384, cosine lr 5e-4) trained
twice with ``effine.train.run.run_training`` — same data, order, seed and steps — once on the bf16 base and once
with ``quant.method=nf4`` (block 64, double quantization: the QLoRA recipe; the adapters stay fp32, compute bf16).
Both runs report the held-out loss before and after training on the same eval rows (the run's own eval split),
and the training tokens/s the loop measured. The two runs are sequential in one process; compare tokens/s only
from the same invocation.

    python -m bench.qlora_vs_lora                    # ~8 min on 2 cores; appends bench/results/qlora_vs_lora.md
    python -m bench.qlora_vs_lora --steps 4 --out /tmp/smoke   # plumbing check

The goal in issue 4: eval loss within 2% of bf16 LoRA, tokens/s >= 0.8x.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(HERE.parent / "configs" / "smollm2-135m-lora.yaml"))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--work", default="/tmp/effine-qlora-vs-lora", help="run dirs go here")
    ap.add_argument("--qset", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override for the quantized run only (e.g. quant.blocksize=32)")
    ap.add_argument("--set", dest="both", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for both runs (e.g. train.seed=7 for another seed)")
    ap.add_argument("--out", default=str(HERE / "results"), help="directory for qlora_vs_lora.{md,json}")
    ap.add_argument("--reuse-lora", action="store_true",
                    help="take the bf16 LoRA run from WORK/none if it finished with this config and step count "
                         "(its config.yaml must match apart from output.*); only the QLoRA run is trained")
    args = ap.parse_args(argv)

    import torch

    from effine.config import load_config
    from effine.train.run import run_training

    res = {}
    for name, quant in (("lora-bf16", "none"), ("qlora-nf4" + "".join(f" ({q})" for q in args.qset), "nf4")):
        cfg = load_config(args.config, [f"train.max_steps={args.steps}", f"quant.method={quant}",
                                        f"output.dir={args.work}/{quant}", "output.overwrite=true",
                                        "eval.prompts_from_eval=0"] + args.both
                          + (args.qset if quant != "none" else []))
        prev = Path(args.work) / quant
        if quant == "none" and args.reuse_lora and (prev / "summary.json").is_file():
            same = load_config(prev / "config.yaml").to_dict()
            want = cfg.to_dict()
            same.pop("output", None), want.pop("output", None)
            if same == want:
                print(f"reusing the finished bf16 LoRA run in {prev}")
                res[name] = {k: json.loads((prev / "summary.json").read_text())[k]
                             for k in ("steps", "train_seconds", "tokens_per_s", "supervised_per_s",
                                       "final_train_loss", "eval_before", "eval_after")}
                continue
        s = run_training(cfg)
        res[name] = {k: s[k] for k in ("steps", "train_seconds", "tokens_per_s", "supervised_per_s",
                                       "final_train_loss", "eval_before", "eval_after")}
    lo, q = res["lora-bf16"], res[next(k for k in res if k.startswith("qlora"))]
    rel = q["eval_after"]["eval_loss"] / lo["eval_after"]["eval_loss"] - 1
    speed = q["tokens_per_s"] / lo["tokens_per_s"]
    rep = {"date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "config": args.config, "steps": args.steps,
           "set": args.both, "qset": args.qset,
           "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
           "runs": res, "eval_loss_rel_diff": rel, "tokens_per_s_ratio": speed}
    md = [f"## QLoRA (nf4) vs bf16 LoRA — {rep['date']}", "",
          f"`{Path(args.config).name}`, {args.steps} steps each, same data/order/seed; torch {torch.__version__}, "
          f"{rep['threads']} threads, CPU. Command: `python -m bench.qlora_vs_lora --config "
          f"configs/{Path(args.config).name} --steps {args.steps}" + "".join(f" --set {q}" for q in args.both)
          + "".join(f" --qset {q}" for q in args.qset)
          + "`", "",
          "| run | eval loss before | eval loss after | train tok/s | supervised tok/s | train s |",
          "|---|---|---|---|---|---|"]
    for name, r in res.items():
        md.append(f"| {name} | {r['eval_before']['eval_loss']:.4f} | {r['eval_after']['eval_loss']:.4f} "
                  f"| {r['tokens_per_s']:.0f} | {r['supervised_per_s']:.0f} | {r['train_seconds']:.0f} |")
    md += ["", f"QLoRA eval loss after training is {rel:+.2%} relative to bf16 LoRA (goal: within 2%); "
           f"QLoRA tokens/s = {speed:.2f}x bf16 LoRA (goal >= 0.8x).", ""]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = (f"qlora_vs_lora-{Path(args.config).stem}-{args.steps}steps" + "".join(f"-{q}" for q in args.both)
            + "".join(f"-{q}" for q in args.qset))
    (out / f"{stem}.json").write_text(json.dumps(rep, indent=1))
    with open(out / "qlora_vs_lora.md", "a") as f:  # one section per run, newest last
        f.write("\n".join(md) + f"\nRaw: `bench/results/{stem}.json`\n\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
