"""LoRA: a frozen linear layer plus a trainable low-rank update, swapped into the model in place.

    x ─────┬──────────────► base: frozen W (d, k) ──────────────────► W x ───┐
    (…, k) │                                                                 (+)──► y (…, d)
           └─► dropout ──► lora_A (r, k) ──► lora_B (d, r) ──► × s ─► s·BAx ┘

The math (Hu et al., 2021). A pretrained weight W of shape (d, k) is kept frozen and the update is factored:

    W + ΔW = W + B A,      B: (d, r),  A: (r, k),  r << min(d, k)
    y = W x + s · B A dropout(x),      s = alpha / r        (rsLoRA: s = alpha / sqrt(r))

A starts as PEFT's default (kaiming-uniform, a = sqrt(5)) and B starts at zero, so B A = 0 and the model is unchanged
at step 0 while the gradient w.r.t. B is non-zero. rsLoRA (Kalajdzievski, 2023) keeps the update's scale stable
as r grows. Merging folds the update back in: W' = W + s · B A, computed in fp32 and cast to the base dtype.

On a QAT base (:class:`effine.quant.qat.FakeQuantLinear`) the update is folded in *before* the fake quantization,
y = x fq(W + s · B A)^T + b, so the adapters train against the rounding that PTQ of the merged weight will apply
(see :meth:`LoRALinear.forward`); adapter dropout cannot be used there.

Injection is a module swap driven by a filter: :func:`resolve_targets` picks qualified module names,
:func:`wrap_modules` replaces each with a :class:`LoRALinear` that holds the original as ``.base``. Everything else
here is a pure function over the module tree. Because ``lora_A`` / ``lora_B`` are bias-free ``nn.Linear`` children,
a LoRA module at ``model.layers.0.self_attn.q_proj`` owns ``…q_proj.lora_A.weight`` — PEFT's saved key minus its
``base_model.model.`` prefix, so the PEFT mapping is a string prefix and nothing else.

    names = inject_lora(model, AdapterConfig(r=8, alpha=16))   # ['model.layers.0.self_attn.q_proj', ...]
    opt = torch.optim.AdamW(lora_parameters(model), lr=2e-4)
    ...
    model = merge_lora(model)                                    # plain nn.Linear layers again
"""

from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Iterator

import torch
from torch import nn

from effine.config import AdapterConfig
from effine.errors import ConfigError
from effine.module_tree import named_by, set_submodule
from effine.quant.linear import QuantLinear
from effine.quant.qat import FakeQuantLinear

log = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."  # PeftModel wraps LoraModel wraps the transformers model


# ---------------------------------------------------------------------------------------------------------------
# The module


class LoRALinear(nn.Module):
    """``base(x) + s · lora_B(lora_A(dropout(x)))`` around a frozen linear-like ``base``.

    ``base`` is an ``nn.Linear`` or anything with ``in_features``, ``out_features`` and ``forward(x)``; merging also
    needs its (out, in) weight, from ``dequantize()`` when it has one (quantized bases) or else ``.weight``.
    The adapter may use a different dtype than the base (fp32 adapters on a bf16 base): the parameters stay in
    their dtype (the optimizer's master copy) and the update is computed in the activation dtype.

    On a QAT base (:class:`~effine.quant.qat.FakeQuantLinear`) the forward is ``x fq(W + s·B A)^T + b`` instead
    (see :meth:`forward`), and ``dropout`` must be 0 while training.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {r}")
        self.base = base
        self.in_features: int = base.in_features
        self.out_features: int = base.out_features
        self.r = r
        self.alpha = float(alpha)
        self.rslora = rslora
        self.scale = self.alpha / (math.sqrt(r) if rslora else r)
        dtype = dtype or _compute_dtype(base)
        device = _device(base)
        # nn.Linear stores (out_features, in_features): lora_A.weight is A (r, k), lora_B.weight is B (d, r).
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        if self.lora_A.weight.is_meta:
            return
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's default init of A
        nn.init.zeros_(self.lora_B.weight)  # B = 0: the adapted model starts equal to the base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x) + s · B A dropout(x)``; on a QAT base ``x fq(W + s·B A)^T + b`` (:meth:`_qat_forward`)."""
        if isinstance(self.base, FakeQuantLinear):
            return self._qat_forward(x)
        base = self.base
        if not (self.training and isinstance(self.dropout, nn.Dropout)):
            # The common cases (a frozen dense or quantized base, no active dropout): one autograd node.
            fused = self._fused_forward(x)
            if fused is not None:
                return fused
        y = base(x)  # (…, d) in the base's compute dtype
        # Mixed precision: the adapter weights are the (fp32) master copy, but the update is computed in the
        # activation dtype. Casting A (r, k) and B (d, r) is cheap; casting x (…, k) to fp32 instead would make
        # autograd keep an fp32 copy of every adapted layer's input — on a bf16 base that was most of the
        # activation memory. The casts' backward hands fp32 gradients to the fp32 parameters.
        a = self.lora_A.weight.to(x.dtype)
        b = self.lora_B.weight.to(x.dtype)
        h = nn.functional.linear(self.dropout(x), a)  # (…, r)
        return y + (nn.functional.linear(h, b) * self.scale).to(y.dtype)

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """:class:`_LoRALinearFn` for a frozen ``nn.Linear`` or :class:`~effine.quant.QuantLinear` base whose
        compute dtype is ``x``'s; None when the base is anything else (the caller takes the unfused path)."""
        base, x2 = self.base, x.reshape(-1, self.in_features)
        bias = base.bias
        if bias is not None and bias.requires_grad:
            return None
        if type(base) is nn.Linear and x.dtype == base.weight.dtype and not base.weight.requires_grad:
            y = _LoRALinearFn.apply(x2, base.weight, bias, self.lora_A.weight, self.lora_B.weight,
                                    float(self.scale), None)
        elif type(base) is QuantLinear and x.dtype == base.compute_dtype:
            y = _LoRALinearFn.apply(x2, None, bias, self.lora_A.weight, self.lora_B.weight, float(self.scale), base)
        else:
            return None
        return y.view(*x.shape[:-1], self.out_features)

    def _qat_forward(self, x: torch.Tensor) -> torch.Tensor:
        """QAT + LoRA: ``y = x fq(W + s·B A)^T + b`` with the base's fake quantization and straight-through gradient.

        Fake-quantizing the frozen ``W`` alone would be a constant: the adapters would never see the rounding that
        PTQ of the merged weight applies. Here the merged weight is formed in fp32 from the master weights
        (``s·(B A)`` then ``+ W``, the same fp32 sum :meth:`merged` and :func:`merge_lora` produce), fake-quantized
        with the base's settings (:meth:`FakeQuantLinear.fake_quantize`: bits, symmetric, group_size,
        per-channel), and only then cast to the activation dtype. The STE is the identity inside the clamp range,
        so ``dL/dB = s · G A^T`` and ``dL/dA = s · B^T G`` with ``G = dL/dfq = g^T x``.

        Memory: per layer and per forward, one fp32 weight-sized temporary (``B A``, scaled and summed with ``W``
        in place) plus fq's own weight-sized scratch (the same as a plain :class:`FakeQuantLinear`), all freed when
        the layer returns. Autograd keeps ``x`` and ``fq(W + s·B A)`` in the activation dtype (what the matmul's
        backward needs; the same single weight-sized tensor a plain :class:`FakeQuantLinear` keeps) and the small
        ``A``, ``B``; no fp32 copy of the weight is kept. The backward forms ``G`` (weight-sized, in the activation
        dtype and then fp32) to reach ``A`` and ``B``, freed once their gradients are computed.

        Dropout on the adapter input has no meaning in this merged form (there is no separate adapter input), so
        training with ``dropout > 0`` raises :class:`ConfigError`; in eval mode dropout is the identity anyway.
        """
        if self.training and isinstance(self.dropout, nn.Dropout):
            raise _qat_dropout_error(self.dropout.p)
        base = self.base
        w = self.lora_B.weight.float() @ self.lora_A.weight.float()  # (d, k) fp32: the only new weight-sized buffer
        w = w.mul_(self.scale).add_(base.weight)  # W + s·B A in fp32 (a bf16 W is upcast exactly by the add)
        wq = base.fake_quantize(w).to(x.dtype)
        bias = base.bias
        return nn.functional.linear(x, wq, None if bias is None else bias.to(x.dtype))

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """s · B A as an fp32 (out, in) matrix."""
        return self.scale * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding W + s·B A (fp32 sum, cast to the base dtype). Never requantizes.

        On a QAT base this is the latent ``W + s·B A``, not ``fq(W + s·B A)``: PTQ with the QAT settings
        (``effine ptq``) turns it into exactly the weight training computed with.
        """
        w = base_weight(self.base)
        if tuple(w.shape) != (self.out_features, self.in_features):
            raise ValueError(f"cannot merge LoRA: base weight has shape {tuple(w.shape)}, expected "
                             f"(out_features, in_features) = {(self.out_features, self.in_features)}")
        out_dtype = w.dtype if w.dtype.is_floating_point else torch.float32
        merged_w = (w.float() + self.delta_weight().to(w.device)).to(out_dtype)
        bias = getattr(self.base, "bias", None)
        # Built on the meta device so that nn.Linear's own random init costs nothing; the real tensors go in next.
        lin = nn.Linear(self.in_features, self.out_features, bias=isinstance(bias, torch.Tensor), device="meta")
        lin.weight = nn.Parameter(merged_w, requires_grad=False)
        if isinstance(bias, torch.Tensor):
            lin.bias = nn.Parameter(bias.detach(), requires_grad=False)
        return lin

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha:g}, scale={self.scale:g}{', rslora' if self.rslora else ''}")


class _LoRALinearFn(torch.autograd.Function):
    """``y = x W^T + b + s (x A^T) B^T`` for a frozen W, as one autograd node (the math of
    :meth:`LoRALinear.forward`, fewer passes over the activations). W is a dense weight, or (``qbase``, QLoRA)
    a :class:`~effine.quant.QuantLinear` dequantized in forward and again in backward, never saved.

    x (N, k) and W (d, k) in the compute dtype; A (r, k) and B (d, r) are the fp32 master weights, used as
    ``a = A`` and ``bs = s·B`` cast to the compute dtype. Forward: ``y = x W^T + b`` then ``y += h bs^T`` with
    ``h = x a^T`` (N, r), accumulated in place by ``addmm_`` (fp32 inside, one rounding) instead of separate
    scale and add passes over the (N, d) output. Backward, with g = dL/dy and ``gb = g bs`` (N, r):

        dL/dx = g W + gb a          (one matmul plus an in-place addmm)
        dL/dA = gb^T x              (r, k)     dL/dB = s g^T h    (d, r)      (returned in fp32)

    Saved for backward: x (shared with the layer's other consumers), h, and the small cast copies of A and B —
    the same tensors the unfused graph keeps (a dense W is saved by reference; a quantized one is not saved).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale: float, qbase):
        a = lora_a.to(x.dtype)  # (r, k)
        bs = (lora_b * scale).to(x.dtype)  # (d, r)
        w = weight if qbase is None else qbase.dequantize()  # a dequantized W is freed when forward returns
        y = nn.functional.linear(x, w, bias)  # (N, d)
        h = x @ a.t()  # (N, r)
        y.addmm_(h, bs.t())
        ctx.save_for_backward(x, weight, h, a, bs)
        ctx.scale, ctx.qbase = scale, qbase
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, weight, h, a, bs = ctx.saved_tensors
        if ctx.qbase is not None:
            weight = ctx.qbase.dequantize()  # the same values as in forward: the quantized buffers are frozen
        need_x, _, need_bias, need_a, need_b, _, _ = ctx.needs_input_grad
        gb = g @ bs  # (N, r)
        grad_x = grad_bias = grad_a = grad_b = None
        if need_x:
            grad_x = g @ weight  # (N, k)
            grad_x.addmm_(gb, a)
        if need_bias:
            grad_bias = g.sum(0)
        if need_a:
            grad_a = (gb.t() @ x).float()
        if need_b:
            grad_b = (g.t() @ h).float().mul_(ctx.scale)
        return grad_x, None, grad_bias, grad_a, grad_b, None, None


def _qat_dropout_error(p: float) -> ConfigError:
    return ConfigError(
        f"adapter.dropout={p:g} cannot be used with quant.qat_bits (QAT): with QAT the LoRA update is folded into "
        "the weight before fake quantization, y = x·fq(W + s·B A)^T, so there is no separate adapter input to drop "
        "out. Set adapter.dropout=0 (or train without quant.qat_bits).")


def _compute_dtype(base: nn.Module) -> torch.dtype:
    """The dtype a base layer computes in: a quantized layer's ``compute_dtype``, else its float weight dtype."""
    dt = getattr(base, "compute_dtype", None)
    if isinstance(dt, torch.dtype):
        return dt
    w = getattr(base, "weight", None)
    if isinstance(w, torch.Tensor) and w.dtype.is_floating_point:
        return w.dtype
    return torch.float32  # packed integer storage: train the adapter in fp32


def _device(base: nn.Module) -> torch.device:
    for t in base.parameters():
        return t.device
    for t in base.buffers():
        return t.device
    return torch.device("cpu")


def base_weight(base: nn.Module) -> torch.Tensor:
    """The dense (out, in) weight of a linear-like layer: ``dequantize()`` when it has one, else ``.weight``."""
    deq = getattr(base, "dequantize", None)
    if callable(deq):
        return deq()
    w = getattr(base, "weight", None)
    if isinstance(w, torch.Tensor):
        return w
    raise TypeError(f"{type(base).__name__} has neither dequantize() nor a .weight tensor; cannot merge LoRA into it")


# ---------------------------------------------------------------------------------------------------------------
# Finding the layers to adapt


def is_linear_like(module: nn.Module) -> bool:
    """An ``nn.Linear``, or a duck-typed linear: ``in_features``, ``out_features`` and either ``dequantize()``
    (quantized linears) or a 2-d ``.weight`` (wrappers such as QAT's fake-quantized linear)."""
    if isinstance(module, (nn.Linear, LoRALinear)):
        return True
    if not (isinstance(getattr(module, "in_features", None), int)
            and isinstance(getattr(module, "out_features", None), int)):
        return False
    w = getattr(module, "weight", None)
    return callable(getattr(module, "dequantize", None)) or (isinstance(w, torch.Tensor) and w.dim() == 2)


def _walk(module: nn.Module, prefix: str = "", in_layers: bool = False) -> Iterator[tuple[str, nn.Module, bool]]:
    """(qualified name, module, inside a decoder-layer list) for every module, not descending into linears.

    "Inside the decoder layers" means having an ``nn.ModuleList`` ancestor: in a causal LM that is the stack of
    decoder blocks, and it excludes the embeddings and the lm_head. A LoRALinear counts as the linear it wraps, so
    discovery gives the same answer before and after injection.
    """
    for name, child in module.named_children():
        qual = f"{prefix}.{name}" if prefix else name
        inside = in_layers or isinstance(module, nn.ModuleList)
        yield qual, child, inside
        if not is_linear_like(child):
            yield from _walk(child, qual, inside)


def _suffix(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def default_targets(model: nn.Module) -> list[str]:
    """Qualified names of every linear layer inside the decoder layers (attention and MLP projections)."""
    return _lm_head_free([n for n, m, inside in _walk(model) if inside and is_linear_like(m)], model)


def _lm_head_free(names: list[str], model: nn.Module) -> list[str]:
    # Belt and braces: never adapt the output projection, even in a model that keeps it inside a ModuleList.
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is None:
        return names
    return [n for n in names if model.get_submodule(n) is not head]


def target_modules_for(model: nn.Module) -> list[str]:
    """The default target suffixes found in ``model`` (``['q_proj', 'k_proj', ...]``), in forward order."""
    return _unique([_suffix(n) for n in default_targets(model)])


def resolve_targets(model: nn.Module, target_modules: list[str] | None) -> list[str]:
    """Qualified names to adapt: explicit suffixes, or (None) every linear inside the decoder layers.

    Raises ConfigError naming ``adapter.target_modules`` when an entry matches nothing (with the nearest suffix
    that exists) or matches something that is not a linear layer.
    """
    if target_modules is None:
        names = default_targets(model)
        if not names:
            raise ConfigError("adapter.target_modules: found no linear layers inside the decoder layers of this "
                              f"{type(model).__name__}; list the projections to adapt explicitly.")
        return names
    if not target_modules:
        raise ConfigError("adapter.target_modules: the list is empty; leave it unset to adapt every attention and "
                          "MLP projection.")
    walked = list(_walk(model))
    linear_suffixes = _unique([_suffix(n) for n, m, _ in walked if is_linear_like(m)])
    chosen: list[str] = []
    for t in target_modules:
        hits = [(n, m) for n, m, _ in walked if named_by(n, t)]
        if not hits:
            close = difflib.get_close_matches(_suffix(t), linear_suffixes, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else "."
            raise ConfigError(f"adapter.target_modules: no module matches '{t}' — modules in this model: "
                              f"{', '.join(linear_suffixes)}{hint}")
        bad = [(n, type(m).__name__) for n, m in hits if not is_linear_like(m)]
        if bad:
            raise ConfigError(f"adapter.target_modules: '{t}' matches {bad[0][0]} ({bad[0][1]}), "
                              f"which is not a linear layer; name the projections inside it "
                              f"(linear layers in this model: {', '.join(linear_suffixes)}).")
        chosen += [n for n, _ in hits]
    order = {n: i for i, (n, _, _) in enumerate(walked)}
    return sorted(set(chosen), key=order.__getitem__)


# ---------------------------------------------------------------------------------------------------------------
# Injecting, inspecting, merging


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def wrap_modules(model: nn.Module, names: list[str], cfg: AdapterConfig,
                 dtype: torch.dtype | None = None) -> list[str]:
    """Swap each named linear for a LoRALinear around it (r, alpha, dropout, rslora from ``cfg``)."""
    for name in names:
        base = model.get_submodule(name)
        if isinstance(base, LoRALinear):
            raise ValueError(f"{name} already has a LoRA adapter")
        if not is_linear_like(base):
            raise ValueError(f"{name} is a {type(base).__name__}, not a linear layer")
        lora = LoRALinear(base, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, rslora=cfg.rslora, dtype=dtype)
        lora.train(base.training)  # a fresh module is in train mode; keep the model's mode (dropout!)
        set_submodule(model, name, lora)
    return list(names)


def inject_lora(model: nn.Module, cfg: AdapterConfig, dtype: torch.dtype | None = None) -> list[str]:
    """Freeze every base parameter and add LoRA adapters to the target linears; returns their qualified names.

    ``dtype`` is the adapter dtype (default: each base layer's compute dtype). Raises ConfigError when a target is
    a QAT layer (:class:`~effine.quant.qat.FakeQuantLinear`) and ``cfg.dropout > 0`` (see
    :meth:`LoRALinear._qat_forward`).
    """
    if cfg.method != "lora":
        raise ConfigError(f"adapter.method: inject_lora needs 'lora', got {cfg.method!r}.")
    if lora_modules(model):
        raise ValueError("this model already has LoRA adapters; merge_lora() it or start from a fresh base")
    names = resolve_targets(model, cfg.target_modules)
    if cfg.dropout > 0 and any(isinstance(model.get_submodule(n), FakeQuantLinear) for n in names):
        raise _qat_dropout_error(cfg.dropout)  # before anything is frozen or swapped
    if cfg.target_modules is None:
        _check_family(model, names)
    for p in model.parameters():
        p.requires_grad_(False)
    return wrap_modules(model, names, cfg, dtype=dtype)


def _check_family(model: nn.Module, names: list[str]) -> None:
    from effine.model.families import family_for  # local: effine.model may import adapters later

    fam = family_for(model)
    if fam is None:
        return
    found, expected = set(map(_suffix, names)), set(fam.target_modules)
    if found != expected:
        log.warning("LoRA target discovery for %s found %s; the %s family normally has %s",
                    type(model).__name__, sorted(found), fam.model_type, sorted(expected))


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable adapter parameters (every lora_A and lora_B weight), in module order."""
    return [p for m in lora_modules(model).values() for p in (m.lora_A.weight, m.lora_B.weight)]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors under PEFT's keys: ``base_model.model.<module path>.lora_A.weight`` (and lora_B).

    The tensors are detached views of the live parameters, not copies.
    """
    out: dict[str, torch.Tensor] = {}
    for name, m in lora_modules(model).items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach()  # (r, in)
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach()  # (out, r)
    return out


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by a plain nn.Linear holding W + s·B A; returns the same (mutated) model."""
    for name, m in lora_modules(model).items():
        set_submodule(model, name, m.merged())
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights are counted once.

    A quantized layer (``QuantLinear``: its weight is a packed ``qweight`` buffer, not a parameter) counts as its
    logical ``out_features x in_features`` weights, so a QLoRA model reports the same total as the dense one.
    """
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    for m in model.modules():
        if isinstance(getattr(m, "qweight", None), torch.Tensor) and hasattr(m, "in_features"):
            total += m.in_features * m.out_features
    return trainable, total
