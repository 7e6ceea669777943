"""One optimizer step: the body of the training loop, and the only copy of it.

    N = supervised tokens in the whole window (all micro-batches)
    for each micro-batch:  (loss_sum(micro) / N).backward()      # == mean loss of the big batch
    clip the global grad norm, set the lr, AdamW step, zero grads

The loop (:mod:`effine.train.loop`), the memory measurement (:mod:`effine.plan.measure`) and the benchmark worker
(``bench/worker_effine.py``) all call :func:`train_step`, so what is measured is what trains.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from effine.ops.model_loss import count_supervised, loss_sum
from effine.train.optim import set_lr


@dataclass
class StepResult:
    loss_sum: float  # summed next-token loss over the window's supervised tokens
    supervised: int  # supervised tokens in the window (the loss normaliser)
    tokens: int  # non-pad tokens in the window
    grad_norm: float  # global grad norm before clipping (nan when clipping is off)
    phases: dict[str, float] = field(default_factory=dict)  # seconds: fwd_bwd, clip, optim

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.supervised, 1)


def backward_window(model: torch.nn.Module, batches: list[dict], impl: str = "chunked") -> tuple[float, int]:
    """Accumulate the gradient of the window's mean loss per supervised token; return (loss sum, tokens).

    Each micro-batch's summed loss is divided by the supervised tokens of the WHOLE window, not its own: a
    micro-batch with few labels must weigh less, exactly as its tokens would inside one big batch. So the
    gradient is identical however the window is split into micro-batches.
    """
    n_sup = sum(count_supervised(b["labels"]) for b in batches)
    total = 0.0
    for batch in batches:
        loss, _ = loss_sum(model, batch, impl=impl)
        (loss / max(n_sup, 1)).backward()
        total += float(loss.detach())
    return total, n_sup


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: list[dict], lr: float,
               max_grad_norm: float | None, params: list[torch.nn.Parameter] | None = None,
               loss_impl: str = "chunked") -> StepResult:
    """Forward + backward over the micro-batches of one window, clip, update with learning rate ``lr``, zero grads.

    ``params`` are the trainable parameters (for clipping); default: those of ``model`` that require grad.
    """
    t0 = time.perf_counter()
    loss, n_sup = backward_window(model, batches, loss_impl)
    t1 = time.perf_counter()
    grad_norm = float("nan")
    if max_grad_norm is not None:
        params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    t2 = time.perf_counter()
    set_lr(optimizer, lr)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    n_tok = sum(int(b["attention_mask"].sum()) for b in batches)
    return StepResult(loss, n_sup, n_tok, grad_norm, {"fwd_bwd": t1 - t0, "clip": t2 - t1, "optim": t3 - t2})
