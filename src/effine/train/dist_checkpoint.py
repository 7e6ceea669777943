"""Checkpoints of multi-process runs, with torch.distributed.checkpoint (DCP), resumable on any world size.

    run_dir/checkpoints/step-000120/
      dcp/              every rank writes its own shard (FSDP) or its share of the replicated tensors (DDP):
                        trainable weights and optimizer state, keyed by parameter name (*.distcp + .metadata)
      rng.safetensors   rank 0's torch RNG state
      state.json        the loop position (global micro-batches), as in a one-process checkpoint
      distributed.json  written last, by rank 0, once every rank's shard is on disk: the commit marker

The directory is built as ``step-N.tmp`` and renamed by rank 0 after the marker, so a crash (or a killed rank)
never leaves a checkpoint that looks whole. All ranks must see the same ``run_dir`` (one machine, or a shared
filesystem across nodes).

Loading reshards: DCP reads whatever slices this rank's tensors need, so a checkpoint saved by 2 processes resumes
on 1 (a plain model) or on 4, and a one-process checkpoint (:mod:`effine.train.checkpoint`: one safetensors file
and an index-keyed optimizer state) resumes on N. The loop position counts global micro-batches, so a resume must
keep the global batch (batch_size x processes) the same; that is checked.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from effine.errors import ConfigError
from effine.train.checkpoint import LoopState, commit, load_checkpoint, rotate, verify, write_manifest
from effine.train.distributed import SINGLE, Dist

MARKER = "distributed.json"


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, **kw)


def is_dist_checkpoint(path: Path) -> bool:
    return (path / MARKER).is_file()


def save_dist_checkpoint(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: LoopState,
                         dist: Dist, global_batch: int, keep: int = 2, fingerprint: dict | None = None) -> Path:
    """Collective: every rank calls it at the same step. Returns the committed directory."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = run_dir / "checkpoints"
    final, tmp = root / f"step-{state.step:06d}", root / f"step-{state.step:06d}.tmp"
    if dist.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options())
    with warnings.catch_warnings():  # one process: DCP warns that it saves without a process group; that is meant
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp / "dcp"))
    dist.barrier()  # every shard is on disk
    if dist.is_main:
        save_file({"cpu": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps(asdict(state), indent=2))
        (tmp / MARKER).write_text(json.dumps({"format": "torch.distributed.checkpoint", "world_size": dist.world,
                                              "parallel": dist.parallel, "global_batch_size": global_batch},
                                             indent=2))
        if fingerprint is not None:
            (tmp / "fingerprint.json").write_text(json.dumps(fingerprint, indent=1, sort_keys=True))
        # The same durability as a one-process checkpoint: manifest of every shard written last, atomic commit,
        # rotation only after the new one verifies (effine.train.checkpoint).
        write_manifest(tmp)
        commit(tmp, final)
        if verify(final) is None:
            rotate(root, keep)
    dist.barrier()
    return final


def load_any_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        dist: Dist = SINGLE, global_batch: int | None = None) -> LoopState:
    """Load a one-process or a DCP checkpoint into a plain, DDP or FSDP model (call after wrapping, on every rank)."""
    if is_dist_checkpoint(path):
        _load_dcp(path, model, optimizer, global_batch)
    elif not dist.active:
        return load_checkpoint(path, model, optimizer)
    else:
        _load_single_file(path, model, optimizer)
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["cpu"])
    return LoopState.from_dict(json.loads((path / "state.json").read_text()))


def _load_dcp(path: Path, model, optimizer, global_batch: int | None) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    meta = json.loads((path / MARKER).read_text())
    if global_batch is not None and meta.get("global_batch_size") != global_batch:
        raise ConfigError(
            f"--resume: {path} was saved with a global micro-batch of {meta.get('global_batch_size')} samples "
            f"({meta.get('world_size')} processes); this run has {global_batch}. The data position is counted in "
            "global micro-batches: set train.batch_size so that batch_size x processes matches.")
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options())  # also creates empty AdamW state
    sd = {"model": model_sd, "optimizer": optim_sd}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(sd, checkpoint_id=str(path / "dcp"))
    # strict=False: frozen weights are not in the checkpoint (dcp.load has already failed on any trainable one missing)
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"],
                   options=_options(strict=False))


def _load_single_file(path: Path, model, optimizer) -> None:
    """A one-process checkpoint into a DDP/FSDP model: full tensors in, each rank keeps its shard.

    Its optimizer state is keyed by position in the param groups; the optimizer here was built from the same named
    parameter list (``build_optimizer``), so position i names the same parameter.
    """
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    full = load_file(str(path / "trainable.safetensors"))
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    if set(order) != set(full):
        raise RuntimeError(f"{path}: checkpoint does not match the model's trainable parameters "
                           f"(missing {sorted(set(order) - set(full))[:3]}); was the adapter config changed?")
    set_model_state_dict(model, full, options=_options(full_state_dict=True, strict=False))
    raw = torch.load(path / "optimizer.pt", weights_only=True)
    optim_sd = {"state": {order[i]: s for i, s in raw["state"].items()},
                "param_groups": [{**{k: v for k, v in g.items() if k != "params"},
                                  "params": [order[i] for i in g["params"]]} for g in raw["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, optim_sd, options=_options(full_state_dict=True))
