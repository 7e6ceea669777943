"""Checkpoints that survive crashes, and exact resume.

A checkpoint is a directory ``run_dir/checkpoints/step-000120/`` holding
  * ``trainable.safetensors``: every trainable parameter (LoRA A/B, or all weights for full fine-tuning);
  * ``optimizer.pt``: the optimizer state (tensors and plain containers only; loaded with ``weights_only=True``);
  * ``rng.safetensors``: torch's CPU (and CUDA) RNG state, so dropout continues the same stream;
  * ``state.json``: the loop position (optimizer step, epoch, micro-batch index in the epoch, tokens seen).
It is written to ``step-N.tmp`` and renamed when complete, so a crash mid-write never leaves a checkpoint that
looks whole. Only the newest ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


@dataclass
class LoopState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    batch_index: int = 0  # micro-batches of the current epoch already consumed
    tokens_seen: int = 0  # non-pad tokens
    supervised_seen: int = 0  # tokens that carried a label


def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: LoopState,
                    keep: int = 2) -> Path:
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:06d}"
    tmp = root / f"step-{state.step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({n: p.detach().cpu().contiguous() for n, p in _trainable(model).items()},
              str(tmp / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(tmp / "rng.safetensors"))
    (tmp / "state.json").write_text(json.dumps(asdict(state), indent=2))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(p for p in root.glob("step-*") if not p.name.endswith(".tmp"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    done = sorted(p for p in (run_dir / "checkpoints").glob("step-*") if not p.name.endswith(".tmp"))
    return done[-1] if done else None


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> LoopState:
    params = _trainable(model)
    saved = load_file(str(path / "trainable.safetensors"))
    if set(saved) != set(params):
        missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise RuntimeError(f"{path}: checkpoint does not match the model's trainable parameters "
                           f"(missing {missing[:3]}, unexpected {extra[:3]}); was the adapter config changed?")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n])
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return LoopState(**json.loads((path / "state.json").read_text()))
