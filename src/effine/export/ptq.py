"""Post-training quantization (PTQ) of a transformers model dir into a dir that effine loads back.

    ptq_export("runs/x/merged", "runs/x/int4", bits=4, group_size=128)     # -> PTQReport (sizes)
    model = load_ptq_model("runs/x/int4", dtype="fp32")                     # dense, dequantized weights
    model = load_ptq_model("runs/x/int4", keep_quantized=True)              # QuantLinear int4 layers

Every ``nn.Linear`` inside the decoder layers (attention and MLP projections; never the embeddings or the
``lm_head``) is quantized group-wise with the affine map of :mod:`effine.quant.affine` (``r = (q - Z) * S``,
symmetric by default: ``Z = 0``, ``S = max|r| / q_max`` per group of ``group_size`` input columns, round half to
even, so every weight is off by at most ``S / 2``).

On-disk format (version 1)
--------------------------
``out_dir/``

* ``effine_ptq.safetensors``: the state dict of :func:`effine.quant.swap.ptq_quantize_state_dict`. For each
  quantized linear ``<name>`` with a weight of shape ``(O, I)``:

  - ``<name>.qweight``: int8 ``(O, I)`` for 8 bits; uint8 ``(O, ceil(I/2))`` for 4 bits, two signed 4-bit
    values per byte, element ``2j`` in the high nibble (two's complement nibbles);
  - ``<name>.scales``: float32 ``(O, ceil(I / group_size))`` (``(O, 1)`` for per-row scales, group_size None);
  - ``<name>.zeros``: int8, same shape (all 0 when symmetric);
  - ``<name>.qmeta``: int32 ``[bits, group_size or 0, I, dtype code]`` (0 fp32, 1 fp16, 2 bf16: the original
    weight dtype);
  - ``<name>.bias`` (if any) and every other tensor (embeddings, norms, ...) as is, in the original dtype.

  A tensor shared by several names (tied input/output embeddings) is stored once, under its first name; the
  file's metadata ``"effine_tied"`` maps each dropped name to the stored one.
* ``config.json``: the source config plus ``"effine_ptq": {"bits", "group_size", "symmetric", "format",
  "weights", "quantized_modules"}``. There is deliberately no ``quantization_config`` (transformers would try to
  interpret it) and no ``model.safetensors``, so ``AutoModelForCausalLM.from_pretrained`` on this dir fails
  loudly instead of silently building a randomly initialised model; use :func:`load_ptq_model`.
* tokenizer and generation files copied from the source dir, and ``ptq_report.json`` (sizes before/after).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from effine.errors import ConfigError, ModelError
from effine.model.ptq_load import PTQ_CONFIG_KEY, PTQ_FORMAT, PTQ_WEIGHTS_NAME, is_ptq_dir, load_ptq_model

__all__ = ["PTQReport", "ptq_export", "load_ptq_model", "is_ptq_dir", "PTQ_WEIGHTS_NAME", "PTQ_CONFIG_KEY"]

REPORT_NAME = "ptq_report.json"

# Files that hold weights (never copied) or that this module writes itself.
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")
_SKIP_NAMES = {"config.json", "model.safetensors.index.json", REPORT_NAME}


@dataclass
class PTQReport:
    """Sizes and settings of one export (``ptq_report.json``)."""

    model_dir: str
    out_dir: str
    bits: int
    group_size: int | None
    symmetric: bool
    quantized_modules: int
    quantized_params: int  # weights of the quantized linears
    linear_bytes_before: int  # those weights in their stored dtype
    linear_bytes_fp32: int  # the same at 4 bytes each
    linear_bytes_after: int  # qweight + scales + zeros + qmeta
    ratio_vs_fp32: float  # linear_bytes_after / linear_bytes_fp32
    ratio_vs_stored: float  # linear_bytes_after / linear_bytes_before
    total_bytes_before: int  # every tensor of the (deduplicated) state dict
    total_bytes_after: int
    file_bytes: int  # effine_ptq.safetensors on disk
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def decoder_linear_names(model: nn.Module) -> list[str]:
    """Qualified names of the ``nn.Linear`` layers inside the decoder layers (not embeddings, not lm_head)."""
    from effine.adapters.lora import default_targets
    from effine.quant import default_filter

    return [n for n in default_targets(model)
            if isinstance(model.get_submodule(n), nn.Linear) and default_filter(n)]


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop names whose tensor is the same storage as an earlier name's (tied weights); return the alias map."""
    seen: dict[tuple[int, int, tuple[int, ...], torch.dtype], str] = {}
    out, tied = {}, {}
    for k, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            tied[k] = seen[key]
            continue
        seen.setdefault(key, k)
        out[k] = t
    return out, tied


def _copy_side_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name not in _SKIP_NAMES and not f.name.endswith(_SKIP_SUFFIXES):
            shutil.copy2(f, dst / f.name)
            copied.append(f.name)
    return copied


def ptq_export(
    model_dir: str | Path,
    out_dir: str | Path,
    bits: int = 4,
    group_size: int | None = 128,
    symmetric: bool = True,
    trust_remote_code: bool = False,
) -> PTQReport:
    """Quantize every decoder ``nn.Linear`` of the model in ``model_dir`` and write ``out_dir`` (format above)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from effine.quant import ptq_quantize_state_dict

    t0 = time.perf_counter()
    model_dir, out = Path(model_dir), Path(out_dir)
    if bits not in (4, 8):
        raise ConfigError(f"ptq: bits={bits!r} is not supported; use 4 or 8.")
    if not (model_dir / "config.json").is_file():
        raise ModelError(f"ptq: {model_dir} is not a transformers model dir (no config.json).")
    src_config = json.loads((model_dir / "config.json").read_text())
    if PTQ_CONFIG_KEY in src_config or is_ptq_dir(model_dir):
        raise ConfigError(f"ptq: {model_dir} is already an effine PTQ export; quantize the dense model instead.")
    if src_config.get("quantization_config"):
        raise ConfigError(f"ptq: {model_dir} holds a quantized checkpoint (quantization_config = "
                          f"{src_config['quantization_config'].get('quant_method', '?')}); export a dense one.")
    if not any(model_dir.glob("*.safetensors")):
        raise ModelError(f"ptq: {model_dir} has no *.safetensors weights (pickled checkpoints are not loaded).")
    if out.resolve() == model_dir.resolve():
        raise ConfigError("ptq: out_dir must differ from model_dir.")

    # transformers does the key renaming and tying for any architecture; "auto" keeps the stored dtype.
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="auto", use_safetensors=True,
                                                 trust_remote_code=trust_remote_code)
    names = set(decoder_linear_names(model))
    if not names:
        raise ModelError(f"ptq: found no nn.Linear inside the decoder layers of {type(model).__name__}.")
    state, tied = _dedupe({k: v.detach() for k, v in model.state_dict().items()})
    qstate = ptq_quantize_state_dict(state, bits=bits, group_size=group_size, symmetric=symmetric,
                                     filter_fn=lambda name, t: name in names)
    quantized = sorted(k[: -len(".qmeta")] for k in qstate if k.endswith(".qmeta"))
    if set(quantized) != names:
        missing = sorted(names - set(quantized))
        raise ModelError(f"ptq: could not quantize {missing[:3]} (not 2-D floating weights?).")

    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.safetensors"):
        stale.unlink()
    settings = {"bits": bits, "group_size": group_size, "symmetric": symmetric, "format": PTQ_FORMAT,
                "weights": PTQ_WEIGHTS_NAME, "quantized_modules": len(quantized)}
    save_file({k: v.contiguous() for k, v in qstate.items()}, str(out / PTQ_WEIGHTS_NAME),
              metadata={"format": "pt", PTQ_CONFIG_KEY: json.dumps(settings), "effine_tied": json.dumps(tied)})
    config = dict(src_config)
    config[PTQ_CONFIG_KEY] = settings
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    _copy_side_files(model_dir, out)

    q_suffixes = (".qweight", ".scales", ".zeros", ".qmeta")
    before = sum(_nbytes(state[f"{n}.weight"]) for n in quantized)
    params = sum(state[f"{n}.weight"].numel() for n in quantized)
    after = sum(_nbytes(qstate[n + s]) for n in quantized for s in q_suffixes)
    report = PTQReport(
        model_dir=str(model_dir), out_dir=str(out), bits=bits, group_size=group_size, symmetric=symmetric,
        quantized_modules=len(quantized), quantized_params=params, linear_bytes_before=before,
        linear_bytes_fp32=4 * params, linear_bytes_after=after, ratio_vs_fp32=after / (4 * params),
        ratio_vs_stored=after / before, total_bytes_before=sum(_nbytes(t) for t in state.values()),
        total_bytes_after=sum(_nbytes(t) for t in qstate.values()),
        file_bytes=(out / PTQ_WEIGHTS_NAME).stat().st_size, seconds=time.perf_counter() - t0,
    )  # fmt: skip
    (out / REPORT_NAME).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return report
