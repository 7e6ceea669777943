"""Multi-process pieces that need no process group: parallel resolution, the per-rank memory plan, launcher errors."""

from __future__ import annotations

import pytest

from effine.config import Config, TrainConfig
from effine.errors import ConfigError
from effine.model.tiny import random_large_config
from effine.train.distributed import Dist, init_distributed, resolve_parallel
from effine.plan.memory import plan_memory


def test_parallel_auto_is_none_alone_and_ddp_with_several_processes():
    assert resolve_parallel("auto", 1) == "none" and resolve_parallel("auto", 4) == "ddp"
    assert resolve_parallel("fsdp", 2) == "fsdp"
    with pytest.raises(ConfigError, match="independent copies"):
        resolve_parallel("none", 2)


def test_ddp_or_fsdp_without_torchrun_says_how_to_launch(monkeypatch):
    import torch

    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(var, raising=False)
    assert init_distributed(TrainConfig(), torch.device("cpu")).world == 1  # auto, alone: no process group
    with pytest.raises(ConfigError, match="--nproc N"):
        init_distributed(TrainConfig(parallel="fsdp"), torch.device("cpu"))


def test_shard_bounds_split_a_global_batch_contiguously():
    spans = [Dist(world=3, rank=r).shard_bounds(7) for r in range(3)]
    assert spans == [(0, 3), (3, 5), (5, 7)]
    assert [Dist(world=3, rank=r).shard_bounds(1) for r in range(3)] == [(0, 1), (1, 1), (1, 1)]
    assert Dist(world=2).global_config(TrainConfig(batch_size=3)).batch_size == 6


@pytest.mark.parametrize("method", ["full", "lora"])
def test_plan_per_rank_fsdp_divides_states_and_keeps_activations(method):
    cfg = Config()
    cfg.adapter.method, cfg.model.dtype, cfg.train.grad_accum = method, "bf16", 2
    conf = random_large_config("llama-1b")
    one = plan_memory(cfg, device="cuda", model_config=conf)
    fsdp = plan_memory(cfg, device="cuda", model_config=conf, world=4, parallel="fsdp")
    ddp = plan_memory(cfg, device="cuda", model_config=conf, world=4, parallel="ddp")
    assert fsdp.weights_dense == one.weights_dense // 4 and fsdp.optimizer == one.optimizer // 4
    assert fsdp.gradients == one.gradients // 4 and fsdp.activations == one.activations
    # what is gathered while computing: embeddings/head of llama-1b (tied, 128256 x 2048 bf16) + two layers
    root = 128256 * 2048 * 2
    assert root < fsdp.workspace - one.workspace < root + 3 * (one.weights_dense - root) // 16
    assert fsdp.total < one.total and any("per process of 4 (fsdp)" in n for n in fsdp.notes)
    assert ddp.weights_dense == one.weights_dense and ddp.gradients > one.gradients
    cfg.train.fsdp_cpu_offload = True
    off = plan_memory(cfg, device="cuda", model_config=conf, world=4, parallel="fsdp")
    assert off.weights_dense == 0 and off.optimizer == 0
