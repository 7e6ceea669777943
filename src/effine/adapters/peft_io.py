"""Saving and loading LoRA adapters in PEFT's on-disk format.

An adapter directory holds two files, exactly as ``peft.PeftModel.from_pretrained(base, adapter_dir)`` reads them:

    adapter_dir/
    ├── adapter_config.json          {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 16, "lora_alpha": 32,
    │                                 "target_modules": ["q_proj", ...], "use_rslora": false, ...}
    └── adapter_model.safetensors    base_model.model.<module path>.lora_A.weight   (r, in)
                                     base_model.model.<module path>.lora_B.weight   (out, r)

PEFT rebuilds the scale from the config (lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora), so the config
and the tensors together reproduce y = W x + s · B A x. PEFT re-finds the modules to adapt by matching each
``target_modules`` entry as a name suffix; when suffixes would catch more modules than effine adapted (an explicit
target list that happens to collide with another module's name), the config carries an exact regular expression
instead, which PEFT matches with ``re.fullmatch``.

Pickled ``adapter_model.bin`` files can run code when unpickled; :func:`load_adapter` refuses them unless
``allow_pickle=True``, and then still loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from effine.adapters.lora import (PEFT_PREFIX, _suffix, _unique, _walk, is_linear_like, lora_modules,
                                  lora_state_dict, wrap_modules)
from effine.config import AdapterConfig
from effine.errors import ConfigError, ModelError
from effine.module_tree import named_by

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"

# LoraConfig options that change the math or the file layout; effine's LoRA has none of them, so an adapter that
# sets any of them cannot be loaded faithfully and is refused instead of silently loaded wrong.
_UNSUPPORTED = ("use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern", "modules_to_save", "lora_bias",
                "layer_replication", "target_parameters", "trainable_token_indices", "use_qalora",
                "layers_to_transform", "alora_invocation_tokens")


def _peft_target_modules(model: nn.Module, names: list[str], requested: list[str] | None) -> list[str] | str:
    """``target_modules`` for adapter_config.json: a suffix list that makes PEFT adapt exactly ``names``.

    Tries the plain suffixes (``q_proj``), then the list the user asked for (``layers.1.q_proj``), then falls back
    to an exact regular expression over the qualified names.
    """
    # PEFT matches against the plain model, where each LoRALinear is its base layer: _walk sees exactly those names.
    walked = [n for n, _, _ in _walk(model)]
    for candidate in (_unique([_suffix(n) for n in names]), requested):
        if candidate and {n for n in walked if any(named_by(n, t) for t in candidate)} == set(names):
            return list(candidate)
    return "(?:" + "|".join(re.escape(n) for n in names) + ")"


def save_adapter(model: nn.Module, out_dir: str | Path, cfg: AdapterConfig, base_model_name_or_path: str) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` for PEFT; returns ``out_dir``."""
    mods = lora_modules(model)
    if not mods:
        raise ValueError("save_adapter: the model has no LoRA adapters (call inject_lora first)")
    for name, m in mods.items():  # the config is written once for all modules: they must agree with it
        if m.r != cfg.r or m.alpha != float(cfg.alpha) or m.rslora != cfg.rslora:
            raise ValueError(f"save_adapter: {name} has r={m.r}, alpha={m.alpha:g}, rslora={m.rslora} but the "
                             f"config says r={cfg.r}, alpha={cfg.alpha:g}, rslora={cfg.rslora}")
    names = list(mods)
    alpha: int | float = int(cfg.alpha) if float(cfg.alpha).is_integer() else float(cfg.alpha)
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.r,
        "lora_alpha": alpha,
        "lora_dropout": cfg.dropout,
        "use_rslora": cfg.rslora,
        "target_modules": _peft_target_modules(model, names, cfg.target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_dora": False,
        "revision": None,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tensors = {k: v.contiguous().cpu() for k, v in lora_state_dict(model).items()}
    save_file(tensors, str(out / SAFETENSORS_NAME), metadata={"format": "pt"})
    return out


def _read_config(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / CONFIG_NAME
    if not path.is_file():
        raise ModelError(f"{adapter_dir}: not an adapter directory (no {CONFIG_NAME}).")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
    if config.get("peft_type") != "LORA":
        raise ModelError(f"{path}: peft_type is {config.get('peft_type')!r}; effine loads LoRA adapters only.")
    bad = [k for k in _UNSUPPORTED if config.get(k)]
    if config.get("bias", "none") != "none":
        bad.append(f"bias={config['bias']!r}")
    if bad:
        raise ModelError(f"{path}: uses LoRA options effine does not support: {', '.join(bad)}.")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or isinstance(config.get(key), bool):
            raise ModelError(f"{path}: '{key}' is missing or not a number.")
    return config


def _read_tensors(adapter_dir: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    st, pt = adapter_dir / SAFETENSORS_NAME, adapter_dir / PICKLE_NAME
    if st.is_file():
        return load_file(str(st), device="cpu")
    if pt.is_file():
        if not allow_pickle:
            raise ModelError(f"{pt}: pickled adapter weights can run arbitrary code when loaded; refusing. Convert "
                             f"it to {SAFETENSORS_NAME}, or pass allow_pickle=True if you trust its source.")
        return torch.load(pt, map_location="cpu", weights_only=True)
    raise ModelError(f"{adapter_dir}: no {SAFETENSORS_NAME} next to {CONFIG_NAME}.")


def _modules_from_keys(keys: list[str], where: Path) -> list[str]:
    """Module paths named by PEFT keys; every module must have exactly its lora_A and lora_B weights."""
    per_module: dict[str, set[str]] = {}
    odd = []
    for k in keys:
        m = re.fullmatch(re.escape(PEFT_PREFIX) + r"(.+)\.(lora_[AB])\.weight", k)
        if m is None:
            odd.append(k)
        else:
            per_module.setdefault(m.group(1), set()).add(m.group(2))
    if odd:
        raise ModelError(f"{where}: unexpected tensor keys (expected base_model.model.<module>.lora_A.weight / "
                         f".lora_B.weight): {', '.join(odd[:5])}{' ...' if len(odd) > 5 else ''}")
    half = [f"{n} (has only {next(iter(p))})" for n, p in per_module.items() if len(p) != 2]
    if half:
        raise ModelError(f"{where}: missing tensors: {', '.join(half[:5])}")
    return list(per_module)


def load_adapter(model: nn.Module, adapter_dir: str | Path, *, allow_pickle: bool = False,
                 dtype: torch.dtype | None = None) -> nn.Module:
    """Add the LoRA adapter saved in ``adapter_dir`` (PEFT format) to ``model``; returns the same model.

    The base parameters are frozen, the adapter parameters stay trainable (so training can resume).
    ``dtype`` is the adapter dtype (default: each base layer's compute dtype).
    """
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise ModelError(f"{adapter_dir}: adapter directory not found.")
    if lora_modules(model):
        raise ValueError("load_adapter: this model already has LoRA adapters")
    config = _read_config(adapter_dir)
    tensors = _read_tensors(adapter_dir, allow_pickle)
    where = adapter_dir / SAFETENSORS_NAME
    names = _modules_from_keys(sorted(tensors), where)

    # The tensors say which modules to adapt; the config's target_modules must agree with them.
    walked = {n: m for n, m, _ in _walk(model)}
    absent = [n for n in names if n not in walked or not is_linear_like(walked[n])]
    if absent:
        raise ModelError(f"{where}: has weights for {', '.join(absent[:3])}, which is not a linear layer of this "
                         f"{type(model).__name__}. Is the adapter for another base model "
                         f"({config.get('base_model_name_or_path')})?")
    targets = config.get("target_modules")
    if isinstance(targets, (list, str)) and targets != "all-linear":
        hit = ((lambda n: re.fullmatch(targets, n) is not None) if isinstance(targets, str)
               else (lambda n: any(named_by(n, t) for t in targets)))
        expected = [n for n, m in walked.items() if is_linear_like(m) and hit(n)]
        missing = [n for n in expected if n not in set(names)]
        extra = [n for n in names if not hit(n)]
        if missing or extra:
            raise ModelError(f"{where}: does not match target_modules={targets!r} in {CONFIG_NAME}: "
                             + (f"no weights for {', '.join(missing[:3])}" if missing else "")
                             + ("; " if missing and extra else "")
                             + (f"weights for untargeted {', '.join(extra[:3])}" if extra else ""))

    try:
        cfg = AdapterConfig(method="lora", r=int(config["r"]), alpha=float(config["lora_alpha"]),
                            dropout=float(config.get("lora_dropout") or 0.0),
                            rslora=bool(config.get("use_rslora", False)), target_modules=None)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{adapter_dir / CONFIG_NAME}: {e}") from None
    # Check every shape before touching the model, so that a bad file leaves it as it was.
    for name in names:
        base = walked[name]
        for part, shape in (("lora_A", (cfg.r, base.in_features)), ("lora_B", (base.out_features, cfg.r))):
            key = f"{PEFT_PREFIX}{name}.{part}.weight"
            if tuple(tensors[key].shape) != shape:
                raise ModelError(f"{where}: {key} has shape {tuple(tensors[key].shape)}, expected {shape} "
                                 f"(r={cfg.r}, layer {base.in_features} -> {base.out_features}).")

    order = {n: i for i, n in enumerate(walked)}
    names.sort(key=order.__getitem__)
    for p in model.parameters():
        p.requires_grad_(False)
    wrap_modules(model, names, cfg, dtype=dtype)
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            m.lora_A.weight.copy_(tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"])  # (r, in), cast to adapter dtype
            m.lora_B.weight.copy_(tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"])  # (out, r)
    return model
