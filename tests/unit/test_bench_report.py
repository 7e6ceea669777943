"""The benchmark report's run throughput and paired ratios (bench/report.py): the numbers the speed goals are read
from."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def run_mod():
    # bench/ is a package run from the repository root (python -m bench.run); tests import it the same way
    root = str(BENCH.parent)
    sys.path.insert(0, root)
    try:
        yield importlib.import_module("bench.report")
    finally:
        sys.path.remove(root)


def _run(repeat: int, steps: list[tuple[int, float]], warmup_steps: int = 1) -> dict:
    st = [{"step": i, "tokens": t, "interval_s": dt, "supervised": t // 2, "cpu_s": 2 * dt, "padded": t,
           "foreign_cores": 0.0, "loss": 1.0, "lengths": [t], "width": t}
          for i, (t, dt) in enumerate([(100, 9.0)] * warmup_steps + steps)]
    return {"repeat": repeat, "steps": st, "rss": {"peak_train_hwm": 3 << 20, "peak_sampled": 3 << 20,
                                                   "post_load": 1 << 20},
            "time_to_first_step": {"total_s": 1.0}}


def test_run_throughput_weighs_batches_by_time_not_by_count(run_mod):
    # one long batch at 100 tok/s and three short ones at 1000 tok/s: the median step rate is 1000 tok/s, but
    # the run trains 4000 tokens in 37.3 s
    r = _run(0, [(3700, 37.0), (100, 0.1), (100, 0.1), (100, 0.1)])
    assert run_mod.run_throughput(r, warmup=1) == pytest.approx(4000 / 37.3)
    # warm-up steps and a profiled step are left out
    r["steps"][2]["profiled"] = True
    assert run_mod.run_throughput(r, warmup=1) == pytest.approx(3900 / 37.2)


def test_paired_ratios_pair_runs_of_the_same_repeat(run_mod):
    eff = [_run(0, [(1000, 1.0)]), _run(1, [(1000, 2.0)])]
    base = [_run(1, [(1000, 8.0)]), _run(0, [(1000, 3.0)])]  # listed in another order than effine's
    shape = {"n_matmul_layers": 10, "n_lora": 1, "lm_head": 1, "vocab": 2, "hidden": 2, "layers": 1, "d_attn": 2,
             "intermediate": 4, "lora_modules": 1, "sliding_window": None}
    se = run_mod.summarise(eff, 1, shape, 1e12, 0.3)
    sb = run_mod.summarise(base, 1, shape, 1e12, 0.3)
    assert se["run_rates"] == {"0": 1000.0, "1": 500.0}
    assert sb["run_tokens_per_s"]["median"] == pytest.approx((125 + 1000 / 3) / 2)
    pr = run_mod.paired_run_ratios(se, sb)
    assert pr["all"] == pytest.approx([3.0, 4.0])  # repeat 0: 1000 / 333.3, repeat 1: 500 / 125
    assert pr["median"] == pytest.approx(3.5) and pr["min"] == pytest.approx(3.0)
    assert run_mod.paired_run_ratios(se, {"run_rates": {"7": 1.0}}) is None
