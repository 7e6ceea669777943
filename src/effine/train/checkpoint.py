"""Checkpoints that survive crashes, and exact resume.

A checkpoint is a directory ``run_dir/checkpoints/step-000120/`` holding
  * ``trainable.safetensors``: every trainable parameter (LoRA A/B, or all weights for full fine-tuning);
  * ``optimizer.pt``: the optimizer state (tensors and plain containers only; loaded with ``weights_only=True``);
  * ``rng.safetensors``: torch's CPU (and CUDA) RNG state, so dropout continues the same stream;
  * ``state.json``: the loop position (optimizer step, epoch, micro-batch index in the epoch, tokens seen, ...);
  * ``fingerprint.json``: the settings a resume must not change silently (see :mod:`effine.train.resume`);
  * ``manifest.json``, written LAST: every other file's name, size and sha256.

Writing (:func:`save_checkpoint`): the files go to ``step-000120.tmp/``, each one fsynced; then the manifest
(fsynced), the staging directory is fsynced, renamed to ``step-000120`` and the parent directory fsynced: after a
power cut the checkpoint is either absent or whole. The new checkpoint is read back and verified against its
manifest; only then are older ones rotated away (moved to ``*.trash`` atomically, then deleted), keeping the newest
``keep`` and, with ``keep_best``, the one with the lowest eval loss. A disk that fills up mid-save leaves the
previous checkpoints untouched, the staging directory removed and a :class:`DiskFullError`.

Reading: :func:`find_resumable` walks the committed checkpoints newest first and returns the first whose files
match its manifest, warning about every one it skips (truncated, corrupt, incomplete) and why.

The building blocks (:func:`fsync_file`, :func:`write_manifest`, :func:`verify`, :func:`commit`, :func:`rotate`)
work on any directory of files (recursively), so other checkpoint writers (e.g. a sharded, distributed one) can
stage their own files and commit them the same way.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from effine.errors import EffineError
from effine.train.faults import fault

MANIFEST = "manifest.json"
_NAME = re.compile(r"^step-(\d+)$")


class CheckpointError(EffineError):
    """A checkpoint cannot be used (fails its manifest, or does not match the model)."""


class DiskFullError(EffineError):
    """Not enough disk space for a checkpoint; the message names the path and the bytes needed and free."""

    exit_code = 4


@dataclass
class LoopState:
    step: int = 0  # optimizer updates applied (the schedule position)
    epoch: int = 0  # current epoch
    batch_index: int = 0  # micro-batches of the current epoch already consumed
    tokens_seen: int = 0  # non-pad tokens
    supervised_seen: int = 0  # tokens that carried a label
    windows: int = 0  # windows (grad_accum micro-batches) consumed, skipped ones included
    nonfinite_skipped: int = 0  # windows skipped for a non-finite loss or gradient norm (train.nonfinite=skip)
    nonfinite_streak: int = 0  # of those, in a row up to now
    empty_windows: int = 0  # windows skipped because no label survived in them
    eval_loss: float | None = None  # eval loss of these very weights, when an eval ran at this step (keep_best)

    @classmethod
    def from_dict(cls, d: dict) -> LoopState:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# ---------------------------------------------------------------------------------------------------------------
# Durable files and directories


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Persist a directory's entries (a created, renamed or deleted name), not only the files' contents."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: Path) -> dict:
    """Write ``manifest.json`` (every other file below ``directory``: size and sha256) and fsync it."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)}
               for p in files}
    manifest = {"format": "effine-checkpoint-1", "files": entries}
    with (directory / MANIFEST).open("w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    return manifest


def verify(directory: Path) -> str | None:
    """None when every file listed in the manifest is there with its size and sha256; else why not."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        entries = manifest["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (incomplete: the save was interrupted, or an effine before manifests wrote it)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} unreadable ({type(e).__name__}: {e})"
    for name, meta in entries.items():
        p = directory / name
        if not p.is_file():
            return f"{name} is missing"
        size = p.stat().st_size
        if size != meta["size"]:
            return f"{name} is {size} bytes, the manifest says {meta['size']} (truncated or overwritten)"
        if file_sha256(p) != meta["sha256"]:
            return f"{name} does not match its sha256 in the manifest (corrupt)"
    return None


def commit(staging: Path, final: Path) -> None:
    """Atomically publish a fully written, manifested staging dir as ``final`` (replacing an older ``final``).

    An existing ``final`` is first renamed to ``final.old`` (still a valid checkpoint, found by
    :func:`find_resumable` if a crash lands between the two renames), removed once the new one is in place.
    """
    fsync_dir(staging)
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    fault("save:rename")
    staging.rename(final)
    fault("save:renamed")
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def _trash(path: Path) -> None:
    """Delete a checkpoint atomically first (rename), then its files: a crash never leaves half of one."""
    trash = path.with_name(path.name + ".trash")
    shutil.rmtree(trash, ignore_errors=True)
    path.rename(trash)
    fsync_dir(path.parent)
    fault("save:rotate")
    shutil.rmtree(trash, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# Listing, rotation, finding the newest valid one


def committed(root: Path) -> list[Path]:
    """Committed checkpoint dirs (``step-N``, and a ``step-N.old`` left by a crash mid-replace), newest first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name.removesuffix(".old"))
        if m and p.is_dir() and not (p.name.endswith(".old") and p.with_name(p.name[:-4]).exists()):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found, reverse=True)]


def read_state(path: Path) -> LoopState:
    return LoopState.from_dict(json.loads((path / "state.json").read_text()))


def rotate(root: Path, keep: int, keep_best: bool = False) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints (and the lowest-eval-loss one with ``keep_best``)."""
    ckpts = committed(root)
    survivors = set(ckpts[:keep])
    if keep_best:
        scored = []
        for p in ckpts:
            try:
                loss = read_state(p).eval_loss
            except (OSError, ValueError, TypeError):
                continue
            if loss is not None and math.isfinite(loss):
                scored.append((loss, p))
        if scored:
            survivors.add(min(scored)[1])
    removed = [p for p in ckpts if p not in survivors]
    for p in removed:
        _trash(p)
    return removed


def clean_staging(root: Path) -> list[Path]:
    """Remove what crashed saves left: staging (``*.tmp``) and trash dirs, ``.old`` dirs already replaced."""
    leftovers = [p for p in root.glob("step-*") if p.suffix in (".tmp", ".trash")
                 or (p.suffix == ".old" and p.with_name(p.stem).exists())] if root.is_dir() else []
    for p in leftovers:
        shutil.rmtree(p, ignore_errors=True)
    return leftovers


def find_resumable(run_dir: Path, warn: Callable[[str], None] = print) -> Path | None:
    """The newest checkpoint whose files match its manifest; every skipped one is named with the reason."""
    root = run_dir / "checkpoints"
    for tmp in sorted(root.glob("step-*.tmp")) if root.is_dir() else []:
        warn(f"[effine] ignoring {tmp}: staging dir of a save that was interrupted (never committed)")
    for path in committed(root):
        reason = verify(path)
        if reason is None:
            return path
        warn(f"[effine] skipping checkpoint {path}: {reason}")
    return None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """Kept for callers of the old API: the newest valid checkpoint (see :func:`find_resumable`)."""
    return find_resumable(run_dir, warn=lambda _: None)


# ---------------------------------------------------------------------------------------------------------------
# Save and load


def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def estimate_checkpoint_bytes(model: torch.nn.Module) -> int:
    """Bytes of one checkpoint: the trainable weights, and AdamW's two fp32 moments per trainable element."""
    params = _trainable(model).values()
    weights = sum(p.numel() * p.element_size() for p in params)
    moments = sum(2 * p.numel() * 4 for p in params)
    return weights + moments + 64 * 1024 + 512 * len(list(params))  # + RNG, JSON, per-tensor headers


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def check_disk_space(run_dir: Path, model: torch.nn.Module, keep: int, keep_best: bool, outputs: int) -> int:
    """Before training: raise DiskFullError unless the checkpoints still to be written and the outputs fit.

    Rotation deletes an old checkpoint only after the new one is verified, so ``keep + 1`` (+1 for the best)
    exist at once; those already on disk count as written. Returns the bytes needed.
    """
    per = estimate_checkpoint_bytes(model)
    on_disk = len(committed(run_dir / "checkpoints"))
    needed = max(0, keep + 1 + int(keep_best) - on_disk) * per + outputs
    free = free_bytes(run_dir)
    if free < needed:
        raise DiskFullError(f"not enough free disk space in {run_dir}: needs about {needed:,} bytes "
                            f"({keep + 1 + int(keep_best)} checkpoints of {per:,} bytes at once during rotation, "
                            f"{on_disk} already there, + {outputs:,} for the outputs), {free:,} bytes are free. "
                            "Free some space, lower train.keep_checkpoints, or set output.dir elsewhere.")
    return needed


def _fsynced(path: Path) -> None:
    fsync_file(path)
    fault("save:file")


def _disk_full(e: OSError, path: Path, needed: int) -> DiskFullError:
    free = free_bytes(path if path.exists() else path.parent)
    return DiskFullError(f"no space left on device while writing checkpoint {path} ({e.strerror}): it needs about "
                         f"{needed:,} bytes, {free:,} bytes are free there. The previous checkpoints are intact. "
                         "Free some space (or set train.keep_checkpoints lower, or output.dir elsewhere), then "
                         "continue with `effine train CONFIG --resume`.")


def save_checkpoint(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: LoopState,
                    keep: int = 2, keep_best: bool = False, fingerprint: dict | None = None) -> Path:
    """Write, commit and verify the checkpoint of ``state``, then rotate old ones (see the module docstring).

    A committed checkpoint of this very state (same step and position) is reused, not written again (leftovers
    of a crashed save are still cleaned up and the rotation completed).
    """
    root = run_dir / "checkpoints"
    if not root.is_dir():
        root.mkdir(parents=True)
        fsync_dir(run_dir)
    final = root / f"step-{state.step:06d}"
    clean_staging(root)
    if final.is_dir() and verify(final) is None and read_state(final) == state:
        rotate(root, keep, keep_best)  # finishes a rotation that a crash interrupted
        return final
    staging = root / f"{final.name}.tmp"
    try:
        staging.mkdir()
        fault("save:start")
        save_file({n: p.detach().cpu().contiguous() for n, p in _trainable(model).items()},
                  str(staging / "trainable.safetensors"))
        _fsynced(staging / "trainable.safetensors")
        torch.save(optimizer.state_dict(), staging / "optimizer.pt")
        _fsynced(staging / "optimizer.pt")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, str(staging / "rng.safetensors"))
        _fsynced(staging / "rng.safetensors")
        for name, obj in (("state.json", asdict(state)), ("fingerprint.json", fingerprint)):
            if obj is not None:
                (staging / name).write_text(json.dumps(obj, indent=1))
                _fsynced(staging / name)
        write_manifest(staging)
        fault("save:manifest")
        commit(staging, final)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _disk_full(e, staging, estimate_checkpoint_bytes(model)) from e
        raise
    except BaseException:  # a second Ctrl-C mid-save: no half-written staging dir stays behind
        shutil.rmtree(staging, ignore_errors=True)
        raise
    reason = verify(final)
    if reason is not None:  # read back what the disk now holds before deleting anything older
        raise CheckpointError(f"checkpoint {final} failed verification right after saving: {reason}")
    rotate(root, keep, keep_best)
    return final


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> LoopState:
    """Verify ``path`` against its manifest, then restore weights, optimizer, RNG; return the loop state."""
    reason = verify(path)
    if reason is not None:
        raise CheckpointError(f"checkpoint {path} is not usable: {reason}")
    params = _trainable(model)
    saved = load_file(str(path / "trainable.safetensors"))
    if set(saved) != set(params):
        missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise CheckpointError(f"{path}: checkpoint does not match the model's trainable parameters "
                              f"(missing {missing[:3]}, unexpected {extra[:3]}); was the adapter config changed?")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n])
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return read_state(path)


def read_fingerprint(path: Path) -> dict | None:
    f = path / "fingerprint.json"
    return json.loads(f.read_text()) if f.is_file() else None


def first_nonfinite(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> str | None:
    """None when every trainable weight and optimizer tensor is finite; else the name of the first that is not."""
    for n, p in _trainable(model).items():
        if not bool(torch.isfinite(p).all()):
            return f"trainable parameter {n}"
    for i, st in enumerate(optimizer.state.values()):
        for k, t in st.items():
            if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return f"optimizer state {k} of parameter #{i}"
    return None


def updates_applied(optimizer: torch.optim.Optimizer) -> set[int]:
    """The distinct per-parameter update counts of an Adam-style optimizer (one value unless a step broke off)."""
    return {int(st["step"]) for st in optimizer.state.values() if "step" in st}
