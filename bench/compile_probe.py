"""Does torch.compile pay on CPU for effine's training step? A script (issue 17 item 5).

    python -m bench.compile_probe CONFIG [--compile] [--steps 14] [--set key=value ...]

Builds the model as ``effine train`` does (``build_model`` + ``training_batches``: packing, rows per micro-batch),
then times ``train_step`` on the first ``--steps`` micro-batches of epoch 0. With ``--compile`` every decoder layer
is wrapped in ``torch.compile(dynamic=True)`` (inductor, CPU) first: the step times then include compilation and
recompilation (one per layer instance and per new shape class) until the graphs are warm. Prints each step's time and
the median of the steps after the fourth. Compare two runs of this script on the same machine.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()

    from effine.config import load_config
    from effine.data import batch_order, build_datasets, collate
    from effine.model.loader import cache_root, load_tokenizer, resolve_model_dir
    from effine.recipe import ModelRecipe, build_model
    from effine.train.batching import training_batches
    from effine.train.optim import build_optimizer
    from effine.train.step import train_step

    cfg = load_config(args.config, args.set)
    model_dir = resolve_model_dir(cfg.model.name)
    tok = load_tokenizer(model_dir)
    train, _, _ = build_datasets(cfg.data, tok, cache_dir=cache_root(), log=lambda *_: None)
    model = build_model(ModelRecipe.from_config(cfg), model_dir=model_dir, log=lambda *_: None)
    train, train_cfg = training_batches(cfg, train, model, print)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer, params = build_optimizer(named, cfg.train), [p for _, p in named]
    order = batch_order([len(e.input_ids) for e in train], train_cfg.batch_size, cfg.train.seed, 0)
    batches = [collate([train[j] for j in o], tok.pad_token_id) for o in order[: args.steps]]
    model.train()
    if args.compile:
        for layer in model.model.layers:
            layer.compile(dynamic=True)
    times = []
    for i, b in enumerate(batches):
        t = time.perf_counter()
        r = train_step(model, optimizer, [b], cfg.train.lr, cfg.train.max_grad_norm, params)
        times.append(time.perf_counter() - t)
        print(f"step {i}: {times[-1]:.3f} s, {r.tokens} tokens, batch {tuple(b['input_ids'].shape)}", flush=True)
    print(f"{'compiled' if args.compile else 'eager'}: total {sum(times):.1f} s, median of steps 4+ "
          f"{statistics.median(times[4:]):.3f} s")


if __name__ == "__main__":
    main()
