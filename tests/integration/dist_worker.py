"""Multi-process training scenarios on tiny models, shared by the test (one process, the reference) and torchrun.

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m tests.integration.dist_worker all OUT [CKPT]

runs every scenario of ``SCENARIOS`` on 2 ranks with micro-batch ``B`` and writes, from rank 0, ``OUT/NAME.pt``:
``{"losses": per-step global loss, "weights": trainable weights gathered in full}``. The test runs the same
scenario in one process with micro-batch ``2 * B`` and compares. Mode ``one`` runs one scenario (the two-node
test), mode ``endless`` trains until a signal or a dead rank stops it (the kill tests).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from effine.adapters import inject_lora
from effine.config import AdapterConfig, TrainConfig
from effine.data import Example
from effine.model.tiny import tiny_model
from effine.train.dist_checkpoint import load_any_checkpoint
from effine.train.distributed import Dist, init_distributed, shutdown, unshard_on_main, wrap_model
from effine.train.loop import train_loop
from effine.train.optim import build_optimizer
from tests.conftest import token_examples

B = 2  # micro-batch per rank; the one-process reference uses 2 * B
N_EXAMPLES = 21  # 21 / 4 per global micro-batch: each epoch ends on a 1-sample batch (rank 1 gets the dummy row)

# (name, family, method, parallel); resume scenarios are handled separately.
SCENARIOS = [(f"{p}-{m}-{a}", a, m, p) for p in ("ddp", "fsdp") for m in ("lora", "full")
             for a in ("llama", "qwen2", "gemma")] + [(f"fsdp-qlora-{a}", a, "qlora", "fsdp")
                                                      for a in ("llama", "qwen2", "gemma")] + [
    ("fsdp-offload-lora-llama", "llama", "lora", "fsdp-offload")]  # train.fsdp_cpu_offload (on a CPU: a no-op move)


def examples(n: int = N_EXAMPLES, seed: int = 0) -> list[Example]:
    return token_examples(n, seed)


class Rows:
    """A MetricsLog that keeps rows in memory."""

    def __init__(self):
        self.rows: list[dict] = []

    def write(self, kind: str, **values) -> None:
        self.rows.append({"kind": kind, **values})


def train_config(world: int, parallel: str, steps: int, save_every: int | None = None) -> TrainConfig:
    return TrainConfig(batch_size=B * 2 // world, grad_accum=2, max_steps=steps, lr=1e-3, warmup_steps=0,
                       schedule="constant", log_every=1, seed=3, parallel=parallel.removesuffix("-offload"),
                       save_every=save_every, fsdp_cpu_offload=parallel.endswith("-offload"))


def build(family: str, method: str) -> torch.nn.Module:
    model = tiny_model(family, seed=0)
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if method == "qlora":
        from effine.quant import quantize_model

        quantize_model(model, "nf4", blocksize=64, double_quant=True)
    torch.manual_seed(0)  # LoRA A is drawn from the global RNG: the same on every rank
    inject_lora(model, AdapterConfig(r=4, alpha=8), dtype=torch.float32)
    return model


def run(family: str, method: str, dist: Dist, cfg: TrainConfig, run_dir: Path, resume_from: Path | None = None
        ) -> dict | None:
    """Train; on rank 0 return per-step losses and the full trainable weights (None on other ranks)."""
    model = build(family, method)
    wrap_model(model, dist, cfg, log=lambda _: None)
    optimizer = build_optimizer([(n, p) for n, p in model.named_parameters() if p.requires_grad], cfg)
    state = None
    if resume_from is not None:
        state = load_any_checkpoint(resume_from, model, optimizer, dist, cfg.batch_size * dist.world)
    rows = Rows()
    train_loop(model, optimizer, examples(), cfg, 0, run_dir, rows, state, None, log=lambda _: None, dist=dist)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    sharded = sorted(n for n, p in model.named_parameters() if type(p).__name__ == "DTensor" and p.dtype == torch.uint8)
    # as run_training does: FSDP gathers into a freshly built model on rank 0 (the one evaluated and saved)
    model = unshard_on_main(model, dist, lambda: build(family, method), leave=False)
    if not dist.is_main:
        return None
    full = dict(model.named_parameters())
    losses = [r["loss"] for r in rows.rows if r["kind"] == "train"]  # (metrics also carry start / eval rows)
    return {"losses": losses, "weights": {n: full[n].detach() for n in sorted(trainable)},
            "sharded_uint8": sharded}


def main(mode: str, out: Path, single_ckpt: Path | None) -> None:
    dist = init_distributed(TrainConfig(parallel="ddp"), torch.device("cpu"))
    torch.set_num_threads(1)
    (out / f"pid-{dist.rank}").write_text(str(os.getpid()))
    try:
        if mode == "all":
            all_scenarios(dist, out, single_ckpt)
        elif mode == "one":  # the multi-node test: one scenario
            dist.parallel = "fsdp"
            res = run("llama", "lora", dist, train_config(dist.world, "fsdp", 3), out / "one")
            if dist.is_main:
                torch.save(res, out / "one.pt")
        elif mode == "endless":  # the kill tests: checkpoints every 2 steps until a signal or a dead rank stops it
            dist.parallel = "fsdp"
            run("llama", "lora", dist, train_config(dist.world, "fsdp", 10**6, save_every=2), out / "endless")
    finally:
        shutdown(dist)


def all_scenarios(dist: Dist, out: Path, single_ckpt: Path | None) -> None:
    for name, family, method, parallel in SCENARIOS:
        dist.parallel, dist.wrapped = parallel.removesuffix("-offload"), None
        res = run(family, method, dist, train_config(dist.world, parallel, 3), out / name)
        if dist.is_main:
            torch.save(res, out / f"{name}.pt")
    # Resume across world sizes. 2 -> 1: save at step 2 on 2 ranks and keep going to 4 (the test resumes the
    # step-2 checkpoint in one process). 1 -> 2: resume the one-process checkpoint the test wrote.
    for parallel in ("ddp", "fsdp"):
        dist.parallel, dist.wrapped = parallel, None
        res = run("llama", "lora", dist, train_config(dist.world, parallel, 4, save_every=2), out / f"save2-{parallel}")
        if dist.is_main:
            torch.save(res, out / f"save2-{parallel}.pt")
    if single_ckpt is not None:
        dist.parallel, dist.wrapped = "fsdp", None
        res = run("llama", "lora", dist, train_config(dist.world, "fsdp", 4), out / "resume1", single_ckpt)
        if dist.is_main:
            torch.save(res, out / "resume1-fsdp.pt")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]) if len(sys.argv) > 3 else None)
