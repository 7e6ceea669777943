"""THE training loop. One file, read top to bottom.

    for each optimizer step:
        take `grad_accum` micro-batches (the data order is a pure function of (seed, epoch), so the loop position
                                          (epoch, micro-batch index) is all that resume needs)
        N = supervised tokens in the whole window
        for each micro-batch:  (loss_sum(micro) / N).backward()      # == mean loss of the big batch
        clip the global grad norm, set the scheduled lr, AdamW step, zero grads
        log (loss, lr, grad norm, tokens/s), evaluate and checkpoint when due

A crash, Ctrl-C or SIGTERM writes a checkpoint of the last completed step before the exception propagates, so no
finished step is lost; ``effine train ... --resume`` continues from it with the same data order.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm

from effine.config import TrainConfig
from effine.data import batch_order, collate
from effine.train.checkpoint import LoopState, save_checkpoint
from effine.train.metrics import MetricsLog
from effine.train.optim import lr_at
from effine.train.step import train_step


@dataclass
class LoopResult:
    state: LoopState
    last_loss: float
    seconds: float
    tokens_per_s: float
    supervised_per_s: float


def plan_steps(n_examples: int, cfg: TrainConfig) -> int:
    """Total optimizer steps: max_steps, or epochs over the data (windows run across epoch boundaries)."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    micro_per_epoch = math.ceil(n_examples / cfg.batch_size)
    return max(1, math.ceil(cfg.epochs * micro_per_epoch / cfg.grad_accum))


def micro_batches(examples: list, cfg: TrainConfig, pad_id: int, epoch: int, index: int
                  ) -> Iterator[tuple[int, int, dict]]:
    """Yield (epoch, index-after-this-batch, batch) forever, starting at micro-batch `index` of `epoch`."""
    lengths = [len(e.input_ids) for e in examples]
    while True:
        order = batch_order(lengths, cfg.batch_size, cfg.seed, epoch)
        for i in range(index, len(order)):
            yield epoch, i + 1, collate([examples[j] for j in order[i]], pad_id)
        epoch, index = epoch + 1, 0


class _Interrupted(Exception):
    pass


def _raise_on_sigterm(signum, frame):  # SIGTERM (a scheduler pre-empting us) takes the same path as Ctrl-C
    raise _Interrupted(f"signal {signum}")


def train_loop(model: torch.nn.Module, optimizer: torch.optim.Optimizer, examples: list, cfg: TrainConfig,
               pad_id: int, run_dir: Path, metrics: MetricsLog, state: LoopState | None = None,
               evaluate: Callable[[int], dict] | None = None, log: Callable[[str], None] = print) -> LoopResult:
    state = state or LoopState()
    total = plan_steps(len(examples), cfg)
    batches = micro_batches(examples, cfg, pad_id, state.epoch, state.batch_index)
    trainable = [p for p in model.parameters() if p.requires_grad]
    old_handler = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    model.train()
    t_start = time.perf_counter()
    t_log, tok_log, sup_log, loss_acc, loss_n = t_start, 0, 0, 0.0, 0
    last_loss = float("nan")
    start_tokens, start_sup = state.tokens_seen, state.supervised_seen
    bar = tqdm(total=total, initial=state.step, desc="train", unit="step", dynamic_ncols=True)
    try:
        while state.step < total:
            window = [next(batches) for _ in range(cfg.grad_accum)]
            lr = lr_at(state.step, cfg, total)
            res = train_step(model, optimizer, [b for _, _, b in window], lr, cfg.max_grad_norm, trainable,
                             cfg.loss_impl)
            step_loss, n_sup, grad_norm = res.loss_sum, res.supervised, res.grad_norm

            last_epoch, last_index, _ = window[-1]
            n_tok = res.tokens
            state.step += 1
            state.epoch, state.batch_index = last_epoch, last_index
            state.tokens_seen += n_tok
            state.supervised_seen += n_sup
            last_loss = step_loss / max(n_sup, 1)
            loss_acc, loss_n = loss_acc + step_loss, loss_n + n_sup
            tok_log, sup_log = tok_log + n_tok, sup_log + n_sup
            bar.update(1)
            if state.step % cfg.log_every == 0 or state.step == total:
                dt = time.perf_counter() - t_log
                row = {"step": state.step, "epoch": state.epoch, "loss": loss_acc / max(loss_n, 1), "lr": lr,
                       "grad_norm": grad_norm, "tokens_per_s": tok_log / dt, "supervised_per_s": sup_log / dt,
                       "tokens_seen": state.tokens_seen}
                metrics.write("train", **row)
                bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}", lr=f"{lr:.1e}")
                t_log, tok_log, sup_log, loss_acc, loss_n = time.perf_counter(), 0, 0, 0.0, 0
            if evaluate and cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < total:
                res = evaluate(state.step)
                log(f"step {state.step}: eval_loss {res['eval_loss']:.4f} (ppl {res['eval_ppl']:.2f})")
                model.train()
            if cfg.save_every and state.step % cfg.save_every == 0 and state.step < total:
                save_checkpoint(run_dir, model, optimizer, state)
    except (KeyboardInterrupt, _Interrupted, Exception) as e:
        bar.close()
        if state.step > 0:
            path = save_checkpoint(run_dir, model, optimizer, state)
            log(f"[effine] {type(e).__name__} at step {state.step}: saved checkpoint {path}; "
                f"continue with `effine train CONFIG --resume`.")
        raise
    finally:
        signal.signal(signal.SIGTERM, old_handler)
    bar.close()
    seconds = time.perf_counter() - t_start
    return LoopResult(state, last_loss, seconds, (state.tokens_seen - start_tokens) / seconds,
                      (state.supervised_seen - start_sup) / seconds)
