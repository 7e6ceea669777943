"""The numerics guard: a window whose loss or gradient norm is not finite never reaches the weights.

:func:`effine.train.step.train_step` with ``skip_nonfinite=True`` leaves the optimizer alone when the window's loss
or global grad norm is inf/NaN, or when no token in it carries a label. The loop hands the result to
:meth:`NumericsGuard.check`, which

* logs the step and the rows of the batch (``file:line``), and writes a ``nonfinite`` / ``empty`` metrics event;
* with ``train.nonfinite: skip`` counts it (the schedule does not advance: the next window gets the same step and
  learning rate) and raises :class:`NonFiniteError` after ``train.max_nonfinite`` such windows in a row;
* with ``train.nonfinite: stop`` raises :class:`NonFiniteError` at once.

A window with no supervised token is reported and skipped, never counted as a loss of 0, and does not count
towards ``max_nonfinite``.
"""

from __future__ import annotations

import math
from typing import Callable

from effine.config import TrainConfig
from effine.errors import EffineError
from effine.train.checkpoint import LoopState
from effine.train.metrics import MetricsLog
from effine.train.step import StepResult


class NonFiniteError(EffineError):
    """Training stopped on non-finite losses or gradients (train.nonfinite / train.max_nonfinite)."""

    exit_code = 3


def format_rows(rows: list[str], limit: int = 8) -> str:
    shown = ", ".join(rows[:limit])
    return shown + (f" (+{len(rows) - limit} more)" if len(rows) > limit else "")


class NumericsGuard:
    def __init__(self, cfg: TrainConfig, metrics: MetricsLog, log: Callable[[str], None] = print):
        self.cfg, self.metrics, self.log = cfg, metrics, log

    def check(self, state: LoopState, res: StepResult, rows: list[str]) -> bool:
        """True when the update was applied; otherwise report (and maybe stop) as the module docstring says."""
        step = state.step + 1  # the step this window was meant to be
        if res.applied:
            state.nonfinite_streak = 0
            return True
        if res.supervised == 0:
            state.empty_windows += 1
            self.metrics.write("empty", step=step, rows=rows)
            self.log(f"[effine] step {step}: no token of this window carries a label (every label masked); skipped, "
                     f"not counted as loss 0. Rows: {format_rows(rows)}")
            return False
        state.nonfinite_skipped += 1
        state.nonfinite_streak += 1
        self.metrics.write("nonfinite", step=step, loss=res.loss_sum, grad_norm=res.grad_norm, rows=rows,
                           streak=state.nonfinite_streak, total=state.nonfinite_skipped)
        what = f"loss {res.loss_sum / res.supervised}" if not math.isfinite(res.loss_sum) \
            else f"gradient norm {res.grad_norm}"
        msg = f"step {step}: non-finite {what} on rows {format_rows(rows)}"
        if self.cfg.nonfinite == "stop":
            raise NonFiniteError(f"{msg}. train.nonfinite=stop: stopping before this update touches the weights. "
                                 "Check those rows, lower train.lr or set train.max_grad_norm, then resume.")
        self.log(f"[effine] {msg}: update skipped ({state.nonfinite_streak} in a row, {state.nonfinite_skipped} "
                 f"in total; stopping after train.max_nonfinite={self.cfg.max_nonfinite} in a row)")
        if state.nonfinite_streak >= self.cfg.max_nonfinite:
            raise NonFiniteError(f"{msg}: {state.nonfinite_streak} windows in a row had non-finite values "
                                 f"(train.max_nonfinite={self.cfg.max_nonfinite}); the run is diverging. "
                                 "Lower train.lr or set train.max_grad_norm, then resume.")
        return False
