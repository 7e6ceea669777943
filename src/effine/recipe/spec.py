"""The recipe of a run's model: a frozen, serialisable description of how it is built.

    base model (short name / dir / .gguf / hub id)  ─► load in `dtype` on `device`
        ─► quantize the frozen linears (`quant.method`: nf4 / fp4 / int8 / int4, except `quant.skip_modules`)
        ─► fake-quantize (QAT, `quant.qat_bits`)
        ─► LoRA adapters (`adapter`) or every weight trainable (full)
        ─► effine's attention backend (`attn`), fused RMSNorm / gated MLP (`fused_ops`), checkpointing

Every command that needs the model (train, generate, merge, export, eval, plan, the benchmark workers) builds it
with :func:`effine.recipe.build_model` from one of these, so a new setting is added in one place: a field here,
its use in ``build_model``. A run writes its recipe to ``RUN_DIR/effine_run.json`` and next to its adapter
(``adapter/effine_run.json``) or model; generation and merge read it back and rebuild the base exactly as training
saw it (a QLoRA base quantized again with the same settings gives the same codes).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from effine.errors import ConfigError

RECIPE_NAME = "effine_run.json"
RECIPE_VERSION = 2  # 1: {"model_dtype", "quant"} only (runs before the recipe existed)

QUANT_METHODS = ("none", "nf4", "fp4", "int8", "int4")
DTYPE_NAMES = ("bf16", "fp32", "fp16")


@dataclass(frozen=True)
class QuantSpec:
    method: str = "none"  # none, nf4, fp4, int8, int4: storage of the frozen base linears
    group_size: int | None = 64  # int8/int4 (and QAT) weights per scale
    blocksize: int = 64  # nf4/fp4 weights per absmax
    double_quant: bool = True  # nf4/fp4: quantize the absmax values too
    skip_modules: tuple[str, ...] = ()  # linears the quantization leaves dense (suffix rule)
    qat_bits: int | None = None  # fake-quantize trained weights to this many bits

    def describe(self) -> str:
        parts = []
        if self.method in ("nf4", "fp4"):
            parts.append(f"quantized to {self.method} (blocksize {self.blocksize}"
                         f"{', double quant' if self.double_quant else ''})")
        elif self.method != "none":
            parts.append(f"quantized to {self.method} (group size {self.group_size})")
        if self.method != "none" and self.skip_modules:
            parts[-1] += f" except {', '.join(self.skip_modules)}"
        if self.qat_bits:
            parts.append(f"fake-quantized to {self.qat_bits} bits (QAT, group size {self.group_size})")
        return " and ".join(parts) or "unquantized"


@dataclass(frozen=True)
class AdapterSpec:
    method: str = "lora"  # lora or full
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    rslora: bool = False
    target_modules: tuple[str, ...] | None = None  # suffix rule; None: every attention/MLP linear


@dataclass(frozen=True)
class ModelRecipe:
    base: str  # what the user named: short name, model dir, .gguf file or hub id
    revision: str | None = None
    trust_remote_code: bool = False
    cache_dir: str | None = None
    dtype: str = "bf16"  # the base weights' dtype (and the compute dtype of training)
    device: str = "auto"
    attn: str = "auto"  # effine attention backend in training: auto, sdpa, eager, flash_attn, tiled
    quant: QuantSpec = field(default_factory=QuantSpec)
    adapter: AdapterSpec = field(default_factory=AdapterSpec)
    fused_ops: bool = True
    recompute_norm_outputs: bool = True
    gradient_checkpointing: bool = False

    # -- construction ---------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg) -> "ModelRecipe":
        """The recipe of a training config (:class:`effine.config.Config`)."""
        m, q, a = cfg.model, cfg.quant, cfg.adapter
        return cls(base=m.name, revision=m.revision, trust_remote_code=m.trust_remote_code, cache_dir=m.cache_dir,
                   dtype=m.dtype, device=m.device, attn=m.attn,
                   quant=QuantSpec(q.method, q.group_size, q.blocksize, q.double_quant, tuple(q.skip_modules or ()),
                                   q.qat_bits),
                   adapter=AdapterSpec(a.method, a.r, a.alpha, a.dropout, a.rslora,
                                       tuple(a.target_modules) if a.target_modules else None),
                   fused_ops=m.fused_ops, recompute_norm_outputs=m.recompute_norm_outputs,
                   gradient_checkpointing=m.gradient_checkpointing)

    def replace(self, **changes: Any) -> "ModelRecipe":
        """A copy with fields changed; ``quant=`` / ``adapter=`` may be dicts of the sub-fields to change."""
        for key, sub in (("quant", self.quant), ("adapter", self.adapter)):
            if isinstance(changes.get(key), dict):
                changes[key] = dataclasses.replace(sub, **changes[key])
        return dataclasses.replace(self, **changes)

    @property
    def changes_base(self) -> bool:
        """Training saw a base different from the checkpoint's weights (quantized or fake-quantized)."""
        return self.quant.method != "none" or bool(self.quant.qat_bits)

    def describe(self) -> str:
        return self.quant.describe()

    # -- serialisation --------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"version": RECIPE_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "recipe") -> "ModelRecipe":
        d = {k: v for k, v in d.items() if k != "version"}
        try:
            quant = dict(d.pop("quant", {}) or {})
            quant["skip_modules"] = tuple(quant.get("skip_modules") or ())
            adapter = dict(d.pop("adapter", {}) or {})
            if adapter.get("target_modules") is not None:
                adapter["target_modules"] = tuple(adapter["target_modules"])
            recipe = cls(**d, quant=QuantSpec(**quant), adapter=AdapterSpec(**adapter))
        except TypeError as e:  # an unknown or missing field: a file from another (newer) effine
            raise ConfigError(f"{source}: not a recipe this effine can read ({e}); pass --no-quant to use the "
                              "unquantized base, or upgrade effine.") from None
        recipe.validate(source)
        return recipe

    def validate(self, source: str = "recipe") -> None:
        if self.quant.method not in QUANT_METHODS or self.dtype not in DTYPE_NAMES:
            raise ConfigError(f"{source}: quant.method={self.quant.method!r}, dtype={self.dtype!r}: this effine "
                              "cannot rebuild that base; pass --no-quant to use the unquantized base.")


# ---------------------------------------------------------------------------------------------------------------
# The record in run / adapter / model dirs


def write_recipe(out_dir: str | Path, recipe: ModelRecipe, base_dir: str | Path | None = None) -> Path:
    """Write ``out_dir/effine_run.json``: the recipe, plus the resolved base dir and version-1 keys for older readers."""
    from effine import __version__

    q = recipe.quant
    record = {
        "what": "how effine built the model this dir was trained on; generate, merge and export rebuild it from this",
        "effine_version": __version__,
        "base_model": str(base_dir) if base_dir is not None else recipe.base,
        "adapter_method": recipe.adapter.method,
        "model_dtype": recipe.dtype,
        "quant": {"method": q.method, "group_size": q.group_size, "blocksize": q.blocksize,
                  "double_quant": q.double_quant, "qat_bits": q.qat_bits,
                  "skip_modules": list(q.skip_modules) or None},
        "recipe": recipe.to_dict(),
    }
    path = Path(out_dir) / RECIPE_NAME
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def _from_record(record: Any, path: Path) -> ModelRecipe:
    if not isinstance(record, dict) or not isinstance(record.get("quant"), dict) and "recipe" not in record:
        raise ConfigError(f"{path}: has no 'recipe' or 'quant' record; pass --no-quant to use the unquantized base.")
    if isinstance(record.get("recipe"), dict):
        return ModelRecipe.from_dict(record["recipe"], str(path))
    q = record["quant"]  # version 1: only how the base was quantized
    recipe = ModelRecipe(base=str(record.get("base_model", "")), dtype=record.get("model_dtype", "bf16"),
                         quant=QuantSpec(q.get("method", "none"), q.get("group_size"), int(q.get("blocksize", 64)),
                                         bool(q.get("double_quant", True)), tuple(q.get("skip_modules") or ()),
                                         q.get("qat_bits")),
                         adapter=AdapterSpec(method=record.get("adapter_method", "lora")))
    recipe.validate(str(path))
    return recipe


def read_recipe(*dirs: Path | None) -> tuple[ModelRecipe, str] | None:
    """(recipe, where it came from) from the first of ``dirs`` holding ``effine_run.json`` or ``config.yaml``.

    ``effine_run.json`` wins over ``config.yaml`` in every dir (runs saved before the recipe existed have only the
    config); None when no dir has either.
    """
    for d in dirs:
        if d is not None and (d / RECIPE_NAME).is_file():
            path = d / RECIPE_NAME
            try:
                record = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
            return _from_record(record, path), str(path)
    for d in dirs:
        if d is not None and (d / "config.yaml").is_file():
            from effine.config import load_config

            return ModelRecipe.from_config(load_config(d / "config.yaml")), str(d / "config.yaml")
    return None
