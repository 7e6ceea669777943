"""Fused RMSNorm and gated activation with hand-written backward passes that keep less for autograd.

Why: in LoRA training of a bf16 model most activation memory is not the matmuls' inputs but what autograd keeps
for the elementwise ops of the eager modules. Per token and per decoder layer (hidden d, MLP width m):

    eager LlamaRMSNorm   x.float() (4d bytes, kept by pow and mul), rsqrt (4 bytes), normalised bf16 (2d, shared
                         with the next linear)
    fused rms_norm       x in its own dtype (2d bytes) + rstd (4 bytes); the normalised value is recomputed
    eager gated MLP      gate (2m), act(gate) (2m), up (2m), product (2m, kept by a LoRA down_proj)
    fused gated_act      gate (2m) + up (2m); act(gate) is recomputed, and (recompute_saved) so is the product

Each op is a ``torch.autograd.Function`` whose forward runs under no-grad (so its temporaries are freed at once)
and saves only the tensors listed above. The forward reproduces the eager modules' arithmetic exactly, casts
included, so logits are unchanged. The norm's backward computes in fp32 and rounds once; the gated activation's
backward is eager's own arithmetic (bit-identical gradients).

RMSNorm
-------
For one row x in R^d, with g = dL/dy the incoming gradient and w~ = offset + w the effective scale:

    r    = (mean(x^2) + eps)^(-1/2)          (rstd, one fp32 per row; saved)
    xhat = x r
    y    = xhat * w~

Backward. dr/dx_j = -1/2 (mean(x^2) + eps)^(-3/2) * 2 x_j / d = -r^3 x_j / d, so

    dxhat_i / dx_j = r delta_ij - x_i r^3 x_j / d = r (delta_ij - xhat_i xhat_j / d)

and with gw = g * w~ (elementwise)

    dx_j = sum_i gw_i dxhat_i/dx_j = r (gw_j - xhat_j * mean_i(gw_i xhat_i))
    dw   = sum over rows of g * xhat          (the offset is a constant: d(offset + w)/dw = 1)

Only x and r are needed: xhat = x r is recomputed in backward.

Casts. Llama / Mistral / Qwen2 (``offset=0``) round the normalised value to the input dtype *before* the weight
multiply and multiply in the promoted dtype: ``w * (x.float() * r).to(x.dtype)``. Gemma / Gemma2 / Gemma3
(``offset=1``, weights stored as w - 1 around zero) multiply in fp32 and round once at the end:
``(x.float() * r * (1 + w.float())).type_as(x)``. ``cast_before_weight`` picks the ordering and defaults to the
Llama one for ``offset == 0`` and the Gemma one otherwise. In the Llama ordering the weight gradient uses the
rounded normalised value, as eager autograd does.

Gated activation
----------------
    y = act(gate) * up,     dgate = g * up * act'(gate),     dup = g * act(gate)

SiLU:  silu(z) = z s,  s = sigmoid(z)
       silu'(z) = s + z s (1 - s) = s (1 + z (1 - s))
tanh-GELU ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"), with c = sqrt(2/pi), k = 0.044715:
       u = c (z + k z^3),  t = tanh(u),  gelu(z) = z/2 (1 + t)
       gelu'(z) = 1/2 (1 + t) + z/2 (1 - t^2) c (1 + 3 k z^2)

Only gate and up are saved (in their own dtype); act(gate) is recomputed in backward. The derivative itself runs
through ATen's fused kernels for exactly these closed forms (``silu_backward``, ``gelu_backward(approximate=
"tanh")``, what eager autograd calls): one pass in the tensor's dtype, faster on CPU than spelling the formula out
in fp32 ops (bench/results/kernels.md), and bit-identical to eager in forward and backward. :func:`act_and_grad`
states the formulas in code; the tests check both it and the kernels against autograd.

Recomputing the MLP product
---------------------------
The product p = act(gate) * up is the down projection's input, and a LoRA down projection (or a trainable one)
keeps it for its weight gradient: another m values per token next to gate and up. :func:`recompute_saved` runs
the down projection under ``saved_tensors_hooks`` that replace every saved reference to p by a note to recompute it
from gate and up (which the gated activation keeps anyway) when backward first needs it; the recomputation is the
same elementwise arithmetic, so the result is bit-identical and no matmul is repeated. The hooks compose with hooks
already active (``torch.utils.checkpoint``'s, or a memory probe's): every other tensor, and gate and up, go through
the outer pack/unpack.

Switches: ``EFFINE_FUSED=0`` in the environment (read at every call) or ``fused=False`` sends both functions to the
plain eager formulas (:func:`rms_norm_reference`, :func:`gated_act_reference`), which autograd differentiates.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

__all__ = [
    "ACTIVATIONS",
    "ENV_VAR",
    "act_and_grad",
    "fused_enabled",
    "gated_act",
    "gated_act_reference",
    "recompute_saved",
    "rms_norm",
    "rms_norm_reference",
]

ENV_VAR = "EFFINE_FUSED"
ACTIVATIONS = ("silu", "gelu_tanh")

_C = math.sqrt(2.0 / math.pi)
_K = 0.044715


def fused_enabled(fused: bool | None = None) -> bool:
    """The argument when given, else the environment: ``EFFINE_FUSED`` = 0 / false / off / no disables fusion."""
    if fused is not None:
        return bool(fused)
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "off", "no")


# ---------------------------------------------------------------------------------------------------------------------
# RMSNorm


def _default_cast(offset: float, cast_before_weight: bool | None) -> bool:
    return offset == 0.0 if cast_before_weight is None else bool(cast_before_weight)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
                       cast_before_weight: bool | None = None) -> torch.Tensor:
    """The eager formula (transformers' LlamaRMSNorm for ``offset=0``, GemmaRMSNorm for ``offset=1``)."""
    xf = x.float()
    xhat = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if _default_cast(offset, cast_before_weight):
        w = weight if offset == 0.0 else offset + weight
        return w * xhat.to(x.dtype)
    return (xhat * (offset + weight.float())).to(x.dtype)


def _scale_rows(xf: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, offset: float,
                cast_before: bool) -> torch.Tensor:
    """``y`` from the fp32 buffer ``xf`` (a private copy of x, overwritten) and the row scales ``rstd``."""
    if cast_before:  # Llama: round xhat to x.dtype, multiply in the promoted dtype
        w = weight if offset == 0.0 else offset + weight
        return w * xf.mul_(rstd).to(x.dtype)
    return xf.mul_(rstd).mul_(offset + weight.float()).to(x.dtype)  # Gemma: everything in fp32, one rounding


def rms_norm_from_rstd(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, offset: float = 0.0,
                       cast_before_weight: bool | None = None) -> torch.Tensor:
    """The RMSNorm output for known row scales ``rstd`` (no grad): what :func:`rms_norm` returned, bit for bit,
    when given the ``rstd`` it computed. Recomputing a norm's output this way skips the mean of squares."""
    cast_before = _default_cast(offset, cast_before_weight)
    return _scale_rows(x.to(torch.float32, copy=True), x, weight, rstd, float(offset), cast_before)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, cast_before: bool):
        xf = x.to(torch.float32, copy=True)  # a private fp32 buffer: modified in place below
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(eps))  # (..., 1) fp32
        y = _scale_rows(xf, x, weight, rstd, offset, cast_before)
        ctx.save_for_backward(x, weight, rstd)
        ctx.offset, ctx.cast_before = offset, cast_before
        ctx.mark_non_differentiable(rstd)
        return y, rstd

    @staticmethod
    def backward(ctx, g: torch.Tensor, _g_rstd=None):
        x, weight, rstd = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        xhat = x.to(torch.float32, copy=True).mul_(rstd)  # recomputed
        gf = g.to(torch.float32, copy=True)  # private copies: x is saved, g belongs to autograd
        dx = dw = None
        if need_w:
            # In the Llama ordering the weight multiplies the rounded xhat; use the same value here.
            h = xhat.to(x.dtype).float() if ctx.cast_before and x.dtype != torch.float32 else xhat
            dw = (gf * h).reshape(-1, h.shape[-1]).sum(0).to(weight.dtype)
        if need_x:
            gw = gf.mul_(weight.float() + ctx.offset)
            dot = (gw * xhat).mean(-1, keepdim=True)  # mean_i(gw_i xhat_i), (..., 1)
            dx = gw.sub_(xhat.mul_(dot)).mul_(rstd).to(x.dtype)
        return dx, dw, None, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0, *,
             cast_before_weight: bool | None = None, fused: bool | None = None, return_rstd: bool = False):
    """``x / sqrt(mean(x^2) + eps) * (offset + weight)`` over the last dim, computed in fp32.

    ``offset=0`` is Llama/Mistral/Qwen2's RMSNorm, ``offset=1`` Gemma's (see the module docstring for the casts).
    The output has x's dtype (Llama ordering: the dtype promoted from x and weight, as in eager). Autograd keeps
    x and one fp32 rstd per row; ``fused=False`` / ``EFFINE_FUSED=0`` runs :func:`rms_norm_reference` instead.
    ``return_rstd=True`` (fused path only) returns ``(y, rstd)``, rstd (..., 1) fp32 and not differentiable.
    """
    cast_before = _default_cast(offset, cast_before_weight)
    if not fused_enabled(fused):
        if return_rstd:
            raise ValueError("rms_norm: return_rstd needs the fused path")
        return rms_norm_reference(x, weight, eps, offset, cast_before)
    y, rstd = _RMSNorm.apply(x, weight, float(eps), float(offset), cast_before)
    return (y, rstd) if return_rstd else y


# ---------------------------------------------------------------------------------------------------------------------
# Gated activation


def _act(gate: torch.Tensor, act: str) -> torch.Tensor:
    if act == "silu":
        return F.silu(gate)
    if act == "gelu_tanh":
        return F.gelu(gate, approximate="tanh")
    raise ValueError(f"unsupported activation {act!r}; expected one of {ACTIVATIONS}")


def gated_act_reference(gate: torch.Tensor, up: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """``act(gate) * up`` with PyTorch's own activation (what the eager MLPs compute)."""
    return _act(gate, act) * up


def act_and_grad(z: torch.Tensor, act: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(act(z), act'(z))`` from the closed forms in the module docstring (the reference for the kernels)."""
    if act == "silu":
        s = torch.sigmoid(z)
        a = z * s
        return a, s + a * (1.0 - s)  # s (1 + z (1 - s)) = s + z s (1 - s)
    if act == "gelu_tanh":
        z2 = z * z
        t = torch.tanh(_C * z * (1.0 + _K * z2))
        half1pt = 0.5 * (1.0 + t)
        a = z * half1pt
        d = half1pt + 0.5 * z * (1.0 - t * t) * _C * (1.0 + 3.0 * _K * z2)
        return a, d
    raise ValueError(f"unsupported activation {act!r}; expected one of {ACTIVATIONS}")


def _act_backward(grad: torch.Tensor, gate: torch.Tensor, act: str) -> torch.Tensor:
    """``grad * act'(gate)`` with ATen's fused derivative kernels (the closed forms of :func:`act_and_grad`)."""
    if act == "silu":
        return torch.ops.aten.silu_backward(grad, gate)
    return torch.ops.aten.gelu_backward(grad, gate, approximate="tanh")


class _GatedAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, act: str):
        y = _act(gate, act) * up  # the eager arithmetic (same roundings), without keeping act(gate)
        ctx.save_for_backward(gate, up)
        ctx.act = act
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        gate, up = ctx.saved_tensors
        # The same operations, in the same dtype, as eager autograd's backward of act(gate) * up, so the gradients
        # are bit-identical to eager; only act(gate) is recomputed instead of read back.
        dup = g * _act(gate, ctx.act) if ctx.needs_input_grad[1] else None
        dgate = _act_backward(g * up, gate, ctx.act) if ctx.needs_input_grad[0] else None
        return dgate, dup, None


def gated_act(gate: torch.Tensor, up: torch.Tensor, act: str = "silu", *, fused: bool | None = None) -> torch.Tensor:
    """``act(gate) * up`` (act: "silu" or "gelu_tanh"); autograd keeps gate and up only and recomputes act.

    ``fused=False`` / ``EFFINE_FUSED=0`` runs :func:`gated_act_reference` instead.
    """
    if act not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {act!r}; expected one of {ACTIVATIONS}")
    if not fused_enabled(fused):
        return gated_act_reference(gate, up, act)
    return _GatedAct.apply(gate, up, act)


# ---------------------------------------------------------------------------------------------------------------------
# Recompute a saved tensor instead of keeping it


class _Recompute:
    """What the pack hook stores in place of the tensor: the (outer-packed) inputs, the saved view's geometry and
    the block's shared state (how many markers are still to be unpacked, the recomputed tensor meanwhile)."""

    __slots__ = ("inputs", "size", "stride", "offset", "state")

    def __init__(self, inputs: tuple, size: torch.Size, stride: tuple[int, ...], offset: int, state: dict) -> None:
        self.inputs, self.size, self.stride, self.offset, self.state = inputs, size, stride, offset, state


def _outer_hooks() -> tuple[Callable, Callable] | None | bool:
    """The saved-tensor hooks active now, None when there are none, False when hooks cannot be used here."""
    ag = torch._C._autograd
    try:
        if not ag._saved_tensors_hooks_is_enabled():
            return False
        return ag._top_saved_tensors_default_hooks(False)
    except AttributeError:  # private API moved: fall back to keeping the tensor
        return False


def _hooks(key: int, dtype: torch.dtype, device: torch.device, fn: Callable, inputs: tuple,
           outer: tuple[Callable, Callable] | None) -> tuple[Callable, Callable, dict]:
    # Deliberately captures no reference to the tensor itself: the hooks live as long as the saved variables do.
    outer_pack, outer_unpack = outer if outer else (None, None)
    state: dict = {"inputs": inputs, "refs": 0}  # "inputs" is dropped when the block ends; markers hold their own

    def pack(x: torch.Tensor):
        if x.dtype == dtype and x.device == device and x.untyped_storage().data_ptr() == key:
            ins = state["inputs"]
            # Packed once per saved reference: an outer hook (torch.utils.checkpoint's) may unpack each only once.
            packed = tuple(outer_pack(i) for i in ins) if outer_pack else ins
            state["refs"] += 1
            return _Recompute(packed, x.size(), x.stride(), x.storage_offset(), state)
        return outer_pack(x) if outer_pack else x

    def unpack(obj):
        if isinstance(obj, _Recompute):
            st = obj.state
            full = st.get("full")
            if full is None:
                ins = [outer_unpack(i) for i in obj.inputs] if outer_unpack else obj.inputs
                with torch.no_grad():
                    full = fn(*ins)
            # Several saved references (q, k and v read one normalised input) share one recomputation: keep it
            # until the last of them has been unpacked.
            st["refs"] -= 1
            if st["refs"] > 0:
                st["full"] = full
            else:
                st.pop("full", None)
            return full.as_strided(obj.size, obj.stride, obj.offset)
        return outer_unpack(obj) if outer_unpack else obj

    return pack, unpack, state


@contextlib.contextmanager
def recompute_saved(t: torch.Tensor, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> Iterator[None]:
    """Inside the block autograd keeps ``inputs`` instead of ``t`` (or views of it) and recomputes ``fn(*inputs)``.

    ``fn(*inputs)`` must reproduce ``t`` exactly (same values, a fresh contiguous tensor). Used where ``inputs`` are
    saved for backward anyway, so that ``t`` costs nothing. A no-op when grad is off, ``t`` does not require grad,
    ``t`` is not a whole contiguous storage, or saved-tensor hooks are unavailable.
    """
    outer = _outer_hooks()
    usable = (outer is not False and torch.is_grad_enabled() and t.requires_grad and t.is_contiguous()
              and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size())
    if not usable:
        yield
        return
    pack, unpack, state = _hooks(t.untyped_storage().data_ptr(), t.dtype, t.device, fn, inputs, outer)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield
    finally:
        state.pop("inputs", None)  # the markers hold what backward needs; the hooks' closure keeps nothing alive
