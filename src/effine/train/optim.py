"""Optimizer and learning-rate schedule.

AdamW with decoupled weight decay on weight matrices only (norm scales, biases and 1-d parameters are not decayed:
decaying a norm's gain towards zero only hurts). The schedule is linear warmup then cosine or linear decay to
``min_lr_ratio * lr``, or constant:

    warmup (s < W):      lr(s) = lr * (s + 1) / W
    cosine (s >= W):     lr(s) = lr * (m + (1 - m) * 0.5 * (1 + cos(pi * p))),   p = (s - W) / max(1, S - W)
    linear (s >= W):     lr(s) = lr * (m + (1 - m) * (1 - p))
"""

from __future__ import annotations

import math

import torch

from effine.config import TrainConfig


def build_optimizer(params: list[tuple[str, torch.nn.Parameter]], cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for n, p in params if p.ndim >= 2]
    no_decay = [p for n, p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=1e-8, **adamw_impl(p for _, p in params))


def adamw_impl(params) -> dict[str, bool]:
    """``{"fused": True}`` where PyTorch has a fused AdamW kernel for every parameter (floating point, on CPU or
    CUDA): one kernel pass per parameter, no temporaries, the same math as foreach (bench/results/kernels.md has
    the measured speed-up on LoRA's many small tensors). Elsewhere
    ``{"foreach": True}``: a handful of multi-tensor kernels instead of a Python loop over parameters."""
    ok = all(p.dtype.is_floating_point and p.device.type in ("cpu", "cuda") for p in params)
    return {"fused": True} if ok else {"foreach": True}


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    if cfg.warmup_steps is not None:
        return min(cfg.warmup_steps, total_steps)
    return int(round(cfg.warmup_ratio * total_steps))


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    w = warmup_steps(cfg, total_steps)
    if step < w:
        return cfg.lr * (step + 1) / w
    if cfg.schedule == "constant":
        return cfg.lr
    m = cfg.min_lr_ratio
    p = min(1.0, (step - w) / max(1, total_steps - w))
    if cfg.schedule == "cosine":
        return cfg.lr * (m + (1 - m) * 0.5 * (1 + math.cos(math.pi * p)))
    return cfg.lr * (m + (1 - m) * (1 - p))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
