import math

import pytest

from effine.config import TrainConfig
from effine.train.optim import lr_at


def test_warmup_then_cosine_to_min():
    cfg = TrainConfig(lr=1.0, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg, 20) for s in range(20)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert lr_at(20, cfg, 20) == pytest.approx(0.1)
    # halfway through the decay: m + (1-m) * 0.5 * (1 + cos(pi/2)) = 0.1 + 0.9 * 0.5
    assert lr_at(12, cfg, 20) == pytest.approx(0.1 + 0.9 * 0.5)


def test_linear_and_constant():
    cfg = TrainConfig(lr=2.0, warmup_steps=0, schedule="linear", min_lr_ratio=0.0)
    assert lr_at(0, cfg, 10) == pytest.approx(2.0)
    assert lr_at(5, cfg, 10) == pytest.approx(1.0)
    cfg = TrainConfig(lr=2.0, warmup_ratio=0.1, schedule="constant")
    assert lr_at(0, cfg, 10) == pytest.approx(2.0)  # warmup of 1 step reaches the peak at once
    assert lr_at(9, cfg, 10) == pytest.approx(2.0)
    assert not math.isnan(lr_at(0, TrainConfig(warmup_steps=0), 1))
