"""Measuring memory for real: peak RSS of a training run in a subprocess, the saved-for-backward bytes of a forward,
and the two process-level helpers (giving freed heap pages back, resetting the peak-RSS mark).

:func:`measure_peak` is what the planner's formula (:mod:`effine.plan.memory`) is validated against
(``bench/memory_plan.py``, ``tests/unit/test_memory_plan.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from effine.config import Config
from effine.system.heap import reset_peak_rss, status_bytes


def _measure_worker() -> None:
    """Child process of :func:`measure_peak`: reads {"config": ..., "steps": ...} on stdin, prints one JSON line.
    Runs under the allocator `effine train` would use (:func:`effine.system.allocator.ensure`)."""
    from effine.system.allocator import ensure

    ensure()  # may re-execute this child under jemalloc; stdin is still unread
    import gc
    import resource
    import time

    req = json.loads(sys.stdin.read())
    import transformers  # noqa: F401  (part of the baseline, as in `effine train`)

    from effine.config import config_from_dict
    from effine.model.loader import resolve_model_dir
    from effine.train.step import train_step
    from effine.train.optim import build_optimizer
    from effine.recipe import ModelRecipe, build_model

    cfg = config_from_dict(req["config"])
    torch.set_num_threads(cfg.train.threads or os.cpu_count() or 1)
    model_dir = resolve_model_dir(cfg.model.name, cfg.model.cache_dir, cfg.model.revision)
    gc.collect()
    baseline = status_bytes("VmRSS")
    can_reset = reset_peak_rss()
    t0 = time.perf_counter()
    model = build_model(ModelRecipe.from_config(cfg), model_dir=model_dir)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = build_optimizer(trainable, cfg.train)
    load_hwm = status_bytes("VmHWM")
    after_load = status_bytes("VmRSS")
    B, T = cfg.train.batch_size, cfg.data.max_length
    V = model.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    params = [p for _, p in trainable]
    model.train()
    step_peaks, step_s = [], []
    if can_reset:
        reset_peak_rss()
    for _ in range(req["steps"]):
        t = time.perf_counter()
        window = []
        for _ in range(cfg.train.grad_accum):
            ids = torch.randint(0, V, (B, T), generator=g)
            window.append({"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids),
                           "position_ids": torch.arange(T).expand(B, T)})
        train_step(model, optimizer, window, cfg.train.lr, cfg.train.max_grad_norm, params, cfg.train.loss_impl,
                   cfg.train.loss_chunk_mb * 2**20)
        step_s.append(time.perf_counter() - t)
        step_peaks.append(status_bytes("VmHWM") - baseline)
    train_hwm = status_bytes("VmHWM") if can_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    load_peak = load_hwm - baseline
    train_peak = train_hwm - baseline
    out = {"baseline": baseline, "load_peak": load_peak, "after_load": after_load - baseline,
           "train_peak": train_peak, "peak": max(load_peak, train_peak), "step_peaks": step_peaks,
           "step_seconds": step_s, "load_seconds": time.perf_counter() - t0 - sum(step_s),
           "hwm_reset": can_reset}
    print("EFFINE_MEASURE " + json.dumps(out), flush=True)


def measure_peak(cfg: Config, steps: int = 2, env: dict[str, str] | None = None, timeout: float = 1800) -> dict:
    """Run ``build_model`` + ``steps`` training steps of the planned shape in a subprocess; peak RSS above baseline.

    Each micro-batch is ``train.batch_size`` x ``data.max_length`` random token ids, all supervised. The baseline
    is the child's RSS after importing torch, transformers and effine, right before loading. Returns bytes:
    ``peak`` (= max of ``load_peak`` and ``train_peak``), ``load_peak`` (VmHWM during build_model),
    ``train_peak`` (VmHWM during the steps, reset after loading), ``after_load``, ``baseline``, ``step_peaks``,
    and seconds. ``env`` adds environment variables (e.g. ``MALLOC_MMAP_THRESHOLD_`` to see live memory).
    """
    req = json.dumps({"config": cfg.to_dict(), "steps": steps})
    child_env = {**os.environ, **(env or {})}
    src = str(Path(__file__).resolve().parents[2])
    child_env["PYTHONPATH"] = src + os.pathsep + child_env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", "from effine.plan.measure import _measure_worker; _measure_worker()"],
                          input=req, capture_output=True, text=True, env=child_env, timeout=timeout)
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("EFFINE_MEASURE "):
            return json.loads(line[len("EFFINE_MEASURE "):])
    raise RuntimeError(f"measure_peak: the worker failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def saved_for_backward_bytes(model: torch.nn.Module, forward: Callable[[], Any], keep: bool = True) -> int:
    """Unique storage bytes that autograd keeps for backward during ``forward()`` (parameters and buffers excluded).

    Counts each storage once (views share one), which is what the activation formula of
    :mod:`effine.plan.memory` predicts. ``keep=False``: the graph keeps nothing (no backward can follow), so the
    counted tensors are freed as soon as the forward returns.
    """
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}
    alive: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        if keep:
            return t
        alive.append(t)  # held until the forward returns, so a freed storage's address is not counted twice
        return None

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    alive.clear()
    return sum(seen.values())
