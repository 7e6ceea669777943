"""Throughput and memory per process: 1 process vs N processes (torchrun, DDP and FSDP2), same global batch.

    python bench/distributed.py                      # CPU (gloo): 1 vs 2 processes, LoRA and full, small Llama
    python bench/distributed.py --nproc 4 --steps 20 --method lora --hidden 512 --layers 8
    python bench/distributed.py --device cuda --nproc 2   # one machine with 2 GPUs (nccl)

Every configuration trains the same random-initialised Llama-shaped model on the same synthetic data with the
same global batch (``--global-batch`` samples x ``--seq`` tokens per optimizer step), through effine's own loop
(:func:`effine.train.loop.train_loop`) and the same wrapping ``effine train`` uses. Reported per configuration:
tokens/s over the timed steps (after ``--warmup`` steps) and each rank's peak RSS (CPU) or peak CUDA memory.
On a CPU, N processes share the same cores: the interesting numbers are the memory per rank (FSDP divides the
model state) and the communication overhead, not a speed-up. Results: bench/results/distributed_cpu.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> None:
    import torch

    from effine.adapters import inject_lora
    from effine.config import AdapterConfig, TrainConfig
    from effine.data import Example
    from effine.model.tiny import tiny_config
    from effine.train.distributed import init_distributed, shutdown, wrap_model
    from effine.train.loop import train_loop
    from effine.train.optim import build_optimizer
    from transformers import AutoModelForCausalLM

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = TrainConfig(batch_size=args.global_batch // world, max_steps=args.warmup + args.steps, lr=1e-4,
                      warmup_steps=0, log_every=1, parallel=args.parallel if world > 1 else "none",
                      threads=args.threads)
    device = torch.device(args.device)
    dist = init_distributed(cfg, device)
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // dist.local_world))
    conf = tiny_config("llama", hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=8,
                       num_key_value_heads=4, intermediate_size=4 * args.hidden, vocab_size=args.vocab,
                       max_position_embeddings=args.seq)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(conf, attn_implementation="sdpa").to(dist.device)
    if args.method == "lora":
        inject_lora(model, AdapterConfig(r=16, alpha=32), dtype=torch.float32)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    wrap_model(model, dist, cfg, log=lambda _: None)
    optimizer = build_optimizer([(n, p) for n, p in model.named_parameters() if p.requires_grad], cfg)
    g = torch.Generator().manual_seed(1)
    n_samples = args.global_batch * (args.warmup + args.steps)
    data = [Example(ids := torch.randint(3, args.vocab, (args.seq,), generator=g).tolist(), [-100] + ids[1:], str(i))
            for i in range(n_samples)]
    times: list[float] = []

    class Clock:  # the loop's metrics sink: one row per step, stamped when it arrives
        def write(self, kind: str, **row) -> None:
            times.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        train_loop(model, optimizer, data, cfg, 0, Path(tmp), Clock(), None, None, log=lambda _: None, dist=dist)
    timed = times[args.warmup - 1:] if args.warmup else times
    seconds = timed[-1] - timed[0]
    peak = (torch.cuda.max_memory_allocated(dist.device) if dist.device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    rows = [{"rank": dist.rank, "peak_bytes": peak}]
    tokens = args.global_batch * args.seq * (len(timed) - 1)
    if dist.world > 1:
        import torch.distributed as tdist

        gathered: list = [None] * dist.world
        tdist.all_gather_object(gathered, rows[0])
        rows = gathered
    if dist.is_main:
        Path(args.out).write_text(json.dumps({"tokens_per_s": tokens / seconds, "seconds": seconds, "ranks": rows}))
    shutdown(dist)


def run_one(args: argparse.Namespace, nproc: int, parallel: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                 if k not in ("nproc", "worker", "out", "parallel", "threads") and v is not None]
        flags += ["--worker", f"--out={out}", f"--parallel={parallel}"] + ([f"--threads={args.threads}"]
                                                                          if args.threads else [])
        launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                        f"--nproc-per-node={nproc}"]
        env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        subprocess.run(launcher + [str(Path(__file__).resolve()), *flags], check=True, env=env, timeout=1800)
        return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--method", choices=["lora", "full", "both"], default="both")
    p.add_argument("--device", default="cpu")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads per process (default: cores / processes)")
    p.add_argument("--parallel", default="ddp")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    methods = ["lora", "full"] if args.method == "both" else [args.method]
    lines = [f"model: Llama-shaped, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; global batch "
             f"{args.global_batch} x {args.seq} tokens; {args.steps} timed steps on {args.device}", "",
             "| method | processes | parallel | tokens/s | peak memory per rank (MiB) |", "|---|---|---|---|---|"]
    for method in methods:
        args.method = method
        for nproc, parallel in [(1, "none"), (args.nproc, "ddp"), (args.nproc, "fsdp")]:
            res = run_one(args, nproc, parallel)
            mem = ", ".join(f"{r['peak_bytes'] / 2**20:.0f}" for r in res["ranks"])
            lines.append(f"| {method} | {nproc} | {parallel} | {res['tokens_per_s']:.0f} | {mem} |")
            print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
