"""``QuantLinear``: a frozen linear layer whose weight is stored quantized.

The weight lives in buffers only (never an ``nn.Parameter``), so optimizers never see it and ``state_dict``
saves the quantized form. Methods and their buffers, for a weight of shape ``(O, I)`` = ``(out_features,
in_features)``:

* ``"nf4"`` / ``"fp4"`` (:mod:`effine.quant.nf4`, bitsandbytes layout): ``qweight`` uint8 ``(ceil(O*I/2),)``,
  ``absmax`` float32 ``(n_blocks,)`` or, with double quantization, uint8 ``(n_blocks,)`` plus ``absmax_scale``
  float32 ``(ceil(n_blocks/256),)`` and ``absmax_offset`` float32 ``()``; ``n_blocks = ceil(O*I/blocksize)``.
* ``"int8"``: ``qweight`` int8 ``(O, I)``; ``"int4"``: ``qweight`` uint8 ``(O, ceil(I/2))`` (two's complement
  nibbles, first element in the high nibble). Both: ``scales`` float32 ``(O, n_groups)`` and, when asymmetric,
  ``zeros`` int8 ``(O, n_groups)``; ``n_groups = ceil(I / group_size)`` or 1 with ``group_size=None``
  (per-channel). Affine map ``w = (q - Z) * S`` (:mod:`effine.quant.affine`).

Forward is ``y = x @ W^T + b`` with ``W`` dequantized to ``compute_dtype`` on the fly. A custom autograd
function keeps nothing for backward but a reference to the module: backward dequantizes ``W`` again to compute
``dL/dx = dL/dy @ W``. That trades one extra dequantization per backward (cheap next to the matmul) for not
holding an ``(O, I)`` dense copy of every layer's weight between forward and backward, which for QLoRA on a
large model would cost as much memory as the unquantized model (2 bytes/weight in bf16 instead of ~0.52).
No gradient is computed for the weight; the bias gets one only if someone sets ``bias.requires_grad``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from effine.errors import ConfigError
from effine.quant import affine
from effine.quant.nf4 import NESTED_BLOCKSIZE, QuantState4bit, check_4bit_args, dequantize_nf4, quantize_nf4

__all__ = ["QuantLinear", "QUANT_METHODS"]

QUANT_METHODS = ("nf4", "fp4", "int8", "int4")


class _DequantLinearFn(torch.autograd.Function):
    """y = x @ W^T + b with W = module.dequantize(); backward re-dequantizes instead of saving W."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: Optional[torch.Tensor], module: "QuantLinear") -> torch.Tensor:
        ctx.module = module  # a reference only: the quantized buffers are owned by the module anyway
        ctx.has_bias = bias is not None
        w = module.dequantize()  # (O, I) in compute dtype, freed when forward returns
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            w = ctx.module.dequantize()  # same values as in forward: the buffers are frozen
            grad_x = grad_out.matmul(w)  # (..., O) @ (O, I) -> (..., I)
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_bias, None


class QuantLinear(nn.Module):
    """A frozen ``nn.Linear`` replacement with a quantized weight; see the module docstring."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        method: str = "nf4",
        group_size: Optional[int] = 128,
        blocksize: int = 64,
        double_quant: bool = True,
        symmetric: bool = True,
        compute_dtype: Optional[torch.dtype] = None,
        device: Optional[torch.device | str] = None,
    ) -> None:
        super().__init__()
        if method not in QUANT_METHODS:
            raise ConfigError(
                f"quantization method={method!r} is unknown (effine.quant.QuantLinear): use one of {QUANT_METHODS}."
            )
        if in_features < 1 or out_features < 1:
            raise ConfigError(
                f"QuantLinear needs positive sizes, got in_features={in_features}, out_features={out_features}."
            )
        self.in_features = in_features
        self.out_features = out_features
        self.method = method
        self.compute_dtype = compute_dtype or torch.get_default_dtype()
        self.blocksize = blocksize
        self.double_quant = double_quant
        self.group_size = group_size
        self.symmetric = symmetric
        if method in ("nf4", "fp4"):
            check_4bit_args(blocksize, method)
            n = in_features * out_features
            n_blocks = -(-n // blocksize)
            self.register_buffer("qweight", torch.zeros(-(-n // 2), dtype=torch.uint8, device=device))
            if double_quant:
                self.register_buffer("absmax", torch.zeros(n_blocks, dtype=torch.uint8, device=device))
                n2 = -(-n_blocks // NESTED_BLOCKSIZE)
                self.register_buffer("absmax_scale", torch.zeros(n2, dtype=torch.float32, device=device))
                self.register_buffer("absmax_offset", torch.zeros((), dtype=torch.float32, device=device))
            else:
                self.register_buffer("absmax", torch.zeros(n_blocks, dtype=torch.float32, device=device))
        else:
            bits = 8 if method == "int8" else 4
            affine._check_group_size(group_size)
            n_groups = 1 if group_size is None else -(-in_features // group_size)
            if bits == 8:
                qshape = (out_features, in_features)
                qdtype = torch.int8
            else:
                qshape = (out_features, -(-in_features // 2))
                qdtype = torch.uint8
            self.register_buffer("qweight", torch.zeros(qshape, dtype=qdtype, device=device))
            self.register_buffer("scales", torch.ones(out_features, n_groups, dtype=torch.float32, device=device))
            if not symmetric:
                self.register_buffer("zeros", torch.zeros(out_features, n_groups, dtype=torch.int8, device=device))
        if bias:
            # Kept in compute dtype, frozen by default (QLoRA trains adapters only); it is a Parameter so that
            # bias tuning stays possible by setting requires_grad.
            self.bias = nn.Parameter(
                torch.zeros(out_features, dtype=self.compute_dtype, device=device), requires_grad=False
            )
        else:
            self.register_parameter("bias", None)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        method: str = "nf4",
        group_size: Optional[int] = 128,
        blocksize: int = 64,
        double_quant: bool = True,
        symmetric: bool = True,
        compute_dtype: Optional[torch.dtype] = None,
    ) -> "QuantLinear":
        """Quantize ``linear.weight`` (``compute_dtype`` defaults to the weight's dtype)."""
        if not isinstance(linear, nn.Linear):
            raise ConfigError(
                f"QuantLinear.from_linear needs an nn.Linear, got {type(linear).__name__} (effine.quant)."
            )
        w = linear.weight.detach()
        compute_dtype = compute_dtype or w.dtype
        mod = cls(
            linear.in_features, linear.out_features, bias=linear.bias is not None, method=method,
            group_size=group_size, blocksize=blocksize, double_quant=double_quant, symmetric=symmetric,
            compute_dtype=compute_dtype, device=w.device,
        )  # fmt: skip
        mod.set_weight(w)
        if linear.bias is not None:
            mod.bias.data.copy_(linear.bias.detach().to(compute_dtype))
        return mod

    @torch.no_grad()
    def set_weight(self, w: torch.Tensor) -> None:
        """Quantize a dense ``(out_features, in_features)`` weight into this module's buffers."""
        if tuple(w.shape) != (self.out_features, self.in_features):
            raise ConfigError(
                f"weight shape {tuple(w.shape)} does not match QuantLinear({self.in_features} -> "
                f"{self.out_features}) (effine.quant): pass a (out_features, in_features) tensor."
            )
        if self.method in ("nf4", "fp4"):
            st = quantize_nf4(w, blocksize=self.blocksize, double_quant=self.double_quant, quant_type=self.method)
            self.qweight = st.packed
            self.absmax = st.absmax
            if self.double_quant:
                self.absmax_scale = st.absmax_scale
                self.absmax_offset = st.absmax_offset
            return
        bits = 8 if self.method == "int8" else 4
        per_channel = self.group_size is None
        scale, zero = affine.compute_qparams(
            w, bits=bits, symmetric=self.symmetric, group_size=self.group_size, per_channel=per_channel
        )
        q = affine.quantize(w, scale, zero, bits=bits, group_size=self.group_size)
        self.qweight = q if bits == 8 else affine.pack_int4(q)
        self.scales = scale.reshape(self.out_features, -1).contiguous()
        if not self.symmetric:
            self.zeros = zero.reshape(self.out_features, -1).contiguous()

    # ------------------------------------------------------------------ use
    def quant_state(self) -> QuantState4bit:
        """The NF4/FP4 buffers as a :class:`~effine.quant.nf4.QuantState4bit` (views, no copies)."""
        if self.method not in ("nf4", "fp4"):
            raise ConfigError(f"quant_state() is for nf4/fp4 QuantLinear, this one is {self.method!r}.")
        return QuantState4bit(
            packed=self.qweight, absmax=self.absmax, shape=torch.Size((self.out_features, self.in_features)),
            dtype=self.compute_dtype, blocksize=self.blocksize, quant_type=self.method,
            absmax_scale=self.absmax_scale if self.double_quant else None,
            absmax_offset=self.absmax_offset if self.double_quant else None,
        )  # fmt: skip

    def dequantize(self) -> torch.Tensor:
        """Dense weight ``(out_features, in_features)`` in ``compute_dtype``."""
        if self.method in ("nf4", "fp4"):
            return dequantize_nf4(self.quant_state(), dtype=self.compute_dtype)
        if self.method == "int8":
            q = self.qweight
        else:
            q = affine.unpack_int4(self.qweight, self.in_features)
        zero = None if self.symmetric else self.zeros
        return affine.dequantize(q, self.scales, zero, group_size=self.group_size, dtype=self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        x = x.to(self.compute_dtype)
        out = _DequantLinearFn.apply(x, self.bias, self)
        return out.to(in_dtype)

    def nbytes(self, include_bias: bool = True) -> int:
        """Storage bytes: all quantized-weight buffers (codes, scales, zero points) plus, optionally, the bias."""
        total = sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))
        if include_bias and self.bias is not None:
            total += self.bias.numel() * self.bias.element_size()
        return total

    def extra_repr(self) -> str:
        extra = (
            f"blocksize={self.blocksize}, double_quant={self.double_quant}"
            if self.method in ("nf4", "fp4")
            else f"group_size={self.group_size}, symmetric={self.symmetric}"
        )
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"method={self.method}, {extra}, compute_dtype={self.compute_dtype}"
        )
