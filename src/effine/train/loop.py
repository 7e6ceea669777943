"""THE training loop. One file, read top to bottom.

    for each optimizer step:
        take `grad_accum` micro-batches (the data order is a pure function of (seed, epoch), so the loop position
                                          (epoch, micro-batch index) is all that resume needs)
        N = supervised tokens in the whole window
        for each micro-batch:  (loss_sum(micro) / N).backward()      # == mean loss of the big batch
        clip the global grad norm, set the scheduled lr, AdamW step, zero grads
        log (loss, lr, grad norm, tokens/s), evaluate and checkpoint when due

Nothing finished is lost: SIGTERM or the first Ctrl-C lets the step in progress finish, then checkpoints and
raises :class:`~effine.train.signals.Interrupted`; a crash checkpoints the last completed step when the weights are
finite and no update broke off half-way; the last step is checkpointed before the outputs are written. A window with
a non-finite loss or gradient norm is never applied (:mod:`effine.train.numerics`). ``effine train ... --resume``
(or ``train.resume: auto``) continues from the newest valid checkpoint with the same data order. Each window's rows
(``file:line``) are appended to ``run_dir/samples.jsonl``, so what was trained on can be audited.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm

from effine.config import TrainConfig
from effine.system.heap import status_bytes
from effine.data import batch_order
from effine.train.checkpoint import (CheckpointError, DiskFullError, LoopState, find_resumable, first_nonfinite,
                                     save_checkpoint, updates_applied)
from effine.train.faults import fault
from effine.train.dist_checkpoint import save_dist_checkpoint
from effine.train.distributed import SINGLE, Dist
from effine.train.metrics import MetricsLog
from effine.train.numerics import NumericsGuard
from effine.train.optim import lr_at
from effine.train.signals import NAMES, Interrupted, StopSignals
from effine.train.step import train_step


@dataclass
class LoopResult:
    state: LoopState
    last_loss: float
    seconds: float  # training time: periodic evaluations (train.eval_every) left out
    tokens_per_s: float
    supervised_per_s: float


def plan_steps(n_examples: int, cfg: TrainConfig) -> int:
    """Total optimizer steps: max_steps, or epochs over the data (windows run across epoch boundaries)."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    micro_per_epoch = math.ceil(n_examples / cfg.batch_size)
    return max(1, math.ceil(cfg.epochs * micro_per_epoch / cfg.grad_accum))


def micro_batches(examples: list, cfg: TrainConfig, pad_id: int, epoch: int, index: int, dist: Dist = SINGLE
                  ) -> Iterator[tuple[int, int, dict, list[str]]]:
    """Yield (epoch, index-after-this-batch, batch, rows) forever, starting at micro-batch `index` of `epoch`.

    ``rows`` are the source locations (``file:line``) of the batch's examples (every document of a packed row).
    With several ranks, ``cfg`` is the global config (batch_size x world), each rank collates its own slice and
    ``rows`` are those of the whole global micro-batch."""
    lengths = [len(e.input_ids) for e in examples]
    while True:
        order = batch_order(lengths, cfg.batch_size, cfg.seed, epoch)
        for i in range(index, len(order)):
            items = [examples[j] for j in order[i]]
            rows = [w for e in items for w in (getattr(e, "wheres", None) or [e.where])]
            yield epoch, i + 1, dist.collate_shard(items, pad_id), rows
        epoch, index = epoch + 1, 0


def train_loop(model: torch.nn.Module, optimizer: torch.optim.Optimizer, examples: list, cfg: TrainConfig,
               pad_id: int, run_dir: Path, metrics: MetricsLog, state: LoopState | None = None,
               evaluate: Callable[[int], dict] | None = None, log: Callable[[str], None] = print,
               stop: StopSignals | None = None, fingerprint: dict | None = None, dist: Dist = SINGLE
               ) -> LoopResult:
    """Train until ``plan_steps`` updates are applied. ``stop``: the run's signal handlers (the loop installs its
    own when None); ``fingerprint``: stored in every checkpoint (see :mod:`effine.train.resume`); ``dist``: the
    process group of a multi-process run (:mod:`effine.train.distributed`; one process: a no-op)."""
    state = state or LoopState()
    cfg = dist.global_config(cfg)  # [distributed hook] data order and steps of the global batch (one rank: same)
    total = plan_steps(len(examples), cfg)
    # total_steps: what `effine watch` counts toward; rss_bytes: the process with the model loaded, before training
    metrics.write("start", step=state.step, total_steps=total, rss_bytes=status_bytes("VmRSS"))
    batches = micro_batches(examples, cfg, pad_id, state.epoch, state.batch_index, dist)
    trainable = [p for p in model.parameters() if p.requires_grad]
    guard = NumericsGuard(cfg, metrics, log)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    samples = (run_dir / "samples.jsonl").open("a") if dist.is_main else open(os.devnull, "w")

    def checkpoint() -> Path:
        if dist.active:  # [distributed hook] every rank writes its shard (DCP), rank 0 commits
            return save_dist_checkpoint(run_dir, model, optimizer, state, dist=dist, global_batch=cfg.batch_size,
                                        keep=cfg.keep_checkpoints, fingerprint=fingerprint)
        return save_checkpoint(run_dir, model, optimizer, state, keep=cfg.keep_checkpoints, keep_best=cfg.keep_best,
                               fingerprint=fingerprint)

    stopped_by: list[str] = []  # with several ranks: why this rank stops when it was not signalled itself

    def stopping() -> bool:
        """A stop signal was received; with several ranks, on any rank (all of them then stop at this step)."""
        if not dist.active:
            return stop.received is not None
        if dist.agree_to_stop(stop.received is not None):  # [distributed hook] one all-reduce per window
            if stop.received is None:  # another rank was signalled
                stopped_by.append("a stop signal on one of the ranks")
                stop.received = signal.SIGTERM
            return True
        return False

    model.train()
    t_start = time.perf_counter()
    t_log, tok_log, sup_log, loss_acc, loss_n = t_start, 0, 0, 0.0, 0
    eval_seconds = 0.0
    last_loss = float("nan")
    start_tokens, start_sup = state.tokens_seen, state.supervised_seen
    bar = tqdm(total=total, initial=state.step, desc="train", unit="step", dynamic_ncols=True,
               disable=not dist.is_main)
    with contextlib.ExitStack() as scope:
        stop = stop or scope.enter_context(StopSignals(log))
        scope.enter_context(stop.deferred())
        try:
            while state.step < total and not stopping():
                fault("step:start")
                window = [next(batches) for _ in range(cfg.grad_accum)]
                rows = [r for *_, micro_rows in window for r in micro_rows]
                lr = lr_at(state.step, cfg, total)
                res = train_step(model, optimizer, [b for _, _, b, _ in window], lr, cfg.max_grad_norm, trainable,
                                 cfg.loss_impl, cfg.loss_chunk_mb * 2**20, dist=dist, skip_nonfinite=True)
                state.windows += 1
                state.epoch, state.batch_index = window[-1][0], window[-1][1]
                samples.write(json.dumps({"window": state.windows, "step": state.step + int(res.applied),
                                          "applied": res.applied, "rows": rows}) + "\n")
                samples.flush()
                if not guard.check(state, res, rows):  # nothing applied: same step and lr for the next window
                    continue

                state.step += 1
                state.eval_loss = None
                state.tokens_seen += res.tokens
                state.supervised_seen += res.supervised
                last_loss = res.loss
                loss_acc, loss_n = loss_acc + res.loss_sum, loss_n + res.supervised
                tok_log, sup_log = tok_log + res.tokens, sup_log + res.supervised
                bar.update(1)
                if state.step % cfg.log_every == 0 or state.step == total:
                    dt = time.perf_counter() - t_log
                    row = {"step": state.step, "epoch": state.epoch, "loss": loss_acc / max(loss_n, 1), "lr": lr,
                           "grad_norm": res.grad_norm, "tokens_per_s": tok_log / dt,
                           "supervised_per_s": sup_log / dt, "tokens_seen": state.tokens_seen}
                    metrics.write("train", **row)
                    bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}", lr=f"{lr:.1e}")
                    t_log, tok_log, sup_log, loss_acc, loss_n = time.perf_counter(), 0, 0, 0.0, 0
                fault("step:logged")
                if evaluate and cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < total:
                    t_eval = time.perf_counter()
                    state.eval_loss = evaluate(state.step)["eval_loss"]
                    log(f"step {state.step}: eval_loss {state.eval_loss:.4f}")
                    model.train()
                    # evaluation is not training: tokens/s (logged and in the summary) leave its time out
                    t_eval = time.perf_counter() - t_eval
                    t_log, eval_seconds = t_log + t_eval, eval_seconds + t_eval
                if cfg.save_every and state.step % cfg.save_every == 0 and state.step < total:
                    checkpoint()
            bar.close()
            # The last step (or the one a signal stopped at) is checkpointed before anything else is written.
            path = checkpoint() if state.step > 0 else None
            if stop.received:
                what = stopped_by[0] if stopped_by else NAMES[stop.received]
                raise Interrupted(stop.received, f"interrupted by {what} at step {state.step}: "
                                  f"saved checkpoint {path}; continue with `effine train CONFIG --resume`.")
        except (Interrupted, DiskFullError, CheckpointError):
            raise
        except KeyboardInterrupt:  # the second Ctrl-C: abort at once, nothing more is written
            log(f"[effine] aborted at step {state.step} without saving; newest valid checkpoint: "
                f"{find_resumable(run_dir, warn=lambda _: None)}")
            raise
        except Exception as e:
            # Several ranks checkpoint together only when they stop together; after an error on one rank the
            # others are elsewhere (a collective would hang): the last committed checkpoint is the one to resume.
            if not dist.active:
                _save_after_crash(e, checkpoint, model, optimizer, state, run_dir, log)
            raise
        finally:
            bar.close()
            samples.close()
    seconds = time.perf_counter() - t_start - eval_seconds
    return LoopResult(state, last_loss, seconds, (state.tokens_seen - start_tokens) / seconds,
                      (state.supervised_seen - start_sup) / seconds)


def _save_after_crash(e: Exception, checkpoint: Callable[[], Path], model, optimizer, state: LoopState,
                      run_dir: Path, log: Callable[[str], None]) -> None:
    """Checkpoint the last completed step after an error, unless that could replace good state with bad."""
    if state.step == 0:
        return
    bad = first_nonfinite(model, optimizer)
    why = f"{bad} is not finite" if bad else None
    if updates_applied(optimizer) - {state.step}:
        why = "an optimizer update broke off half-way"
    if why:
        log(f"[effine] {type(e).__name__} at step {state.step}: NOT saving a checkpoint ({why}); the newest valid "
            f"checkpoint stays {find_resumable(run_dir, warn=lambda _: None)}.")
        return
    path = checkpoint()
    log(f"[effine] {type(e).__name__} at step {state.step}: saved checkpoint {path}; "
        f"continue with `effine train CONFIG --resume`.")
