"""Quantization-aware training (QAT) with fake quantization and a straight-through estimator.

In the forward pass the weight is replaced by its fake-quantized copy ``W_q = (clamp(round(W / S) + Z) - Z) * S``
(see :mod:`effine.quant.affine`), so the loss sees exactly the rounding error the deployed integer model will
have. Rounding has zero derivative almost everywhere, so the backward pass uses the straight-through estimator
(Bengio et al. 2013): ``dL/dW = dL/dW_q`` for elements whose ``round(W / S) + Z`` lies inside
``[q_min, q_max]`` and 0 for clamped ones. The scale and zero point are recomputed from the current weight every
step and are treated as constants (no gradient flows into them). Because they are computed from the weight's
own min/max, nothing is clamped in practice and the estimator is the identity; the mask matters only for
elements outside the range (e.g. if scales are ever fixed or learned), and it is saved only when some element
is actually clamped.

With LoRA (``quant.qat_bits`` and ``adapter.method: lora``): :func:`effine.recipe.build_model` wraps the
linears in :class:`FakeQuantLinear` first and then wraps each of those in a
:class:`effine.adapters.lora.LoRALinear`. Fake-quantizing the frozen ``W`` alone would be pointless (it is a
constant, and the adapters would never see the rounding that PTQ of the deployed weight applies), so the LoRA layer
instead computes

    y = x fq(W + s·B A)^T + b

with this layer's ``fq`` (same bits, symmetric, group_size and per-channel setting; see
:meth:`FakeQuantLinear.fake_quantize`) and the STE, so the gradients reach ``A`` and ``B`` through the rounding.
The merged weight is formed in fp32 from the master weights and cast to the activation dtype after ``fq``.
Adapter dropout has no place in this merged form and is refused while training (``adapter.dropout`` must be 0
with ``quant.qat_bits``).
Merging (:func:`effine.adapters.merge_lora`) gives the latent ``W + s·B A``; ``effine ptq`` with the same bits,
group_size and symmetric setting then produces exactly the ``fq(W + s·B A)`` that training computed with, and
``effine merge`` (``bake_qat=True``) writes ``fq(W + s·B A)`` itself.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from effine.errors import ConfigError
from effine.quant import affine

__all__ = ["FakeQuantLinear", "ste_fake_quantize"]


class _STEFakeQuantFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor, bits: int, symmetric: bool, group_size: Optional[int], per_channel: bool):
        out, inside = affine._fake_quantize_impl(w, bits, symmetric, group_size, per_channel, want_mask=True)
        assert inside is not None
        # Save the (bool, 1 byte/element) mask only when it is not all True, which is the common case.
        ctx.all_inside = bool(inside.all())
        ctx.save_for_backward(None if ctx.all_inside else inside)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if ctx.all_inside:
            return grad_out, None, None, None, None
        (inside,) = ctx.saved_tensors
        return grad_out * inside.to(grad_out.dtype), None, None, None, None


def ste_fake_quantize(
    w: torch.Tensor,
    bits: int = 8,
    symmetric: bool = True,
    group_size: Optional[int] = None,
    per_channel: bool = False,
) -> torch.Tensor:
    """:func:`effine.quant.affine.fake_quantize` with a straight-through gradient (identity inside the clamp range)."""
    return _STEFakeQuantFn.apply(w, bits, symmetric, group_size, per_channel)


def _check_qat_config(bits: int, group_size: Optional[int]) -> None:
    if bits not in (4, 8):
        raise ConfigError(
            f"QAT bits={bits!r} is not supported (effine.quant.qat.FakeQuantLinear): use 4 or 8."
        )
    affine._check_group_size(group_size)


class FakeQuantLinear(nn.Module):
    """A trainable linear layer whose forward uses the fake-quantized weight (QAT).

    ``weight``/``bias`` are the *same* ``nn.Parameter`` objects as in the wrapped ``nn.Linear`` (no copy), so an
    optimizer built before the swap keeps working and :meth:`to_linear` hands the trained tensors back.
    Granularity: ``group_size`` groups along the input dim (default 128; a ragged last group is allowed), or
    ``group_size=None`` for one scale per output row.
    """

    def __init__(
        self,
        linear: nn.Linear,
        bits: int = 8,
        group_size: Optional[int] = 128,
        symmetric: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise ConfigError(f"FakeQuantLinear wraps an nn.Linear, got {type(linear).__name__} (effine.quant.qat).")
        _check_qat_config(bits, group_size)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.bits = bits
        self.group_size = group_size
        self.symmetric = symmetric
        self.weight = linear.weight
        self.bias = linear.bias

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, bits: int = 8, group_size: Optional[int] = 128, symmetric: bool = True
    ) -> "FakeQuantLinear":
        return cls(linear, bits=bits, group_size=group_size, symmetric=symmetric)

    def fake_quantize(self, w: torch.Tensor) -> torch.Tensor:
        """``fq(w)`` with this layer's settings (bits, symmetric, group_size, per-channel when group_size is None)
        and the STE; ``w`` is any ``(out_features, in_features)`` tensor (LoRA passes ``W + s·B A``)."""
        return ste_fake_quantize(w, self.bits, self.symmetric, self.group_size, per_channel=self.group_size is None)

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight ``(out_features, in_features)``, differentiable through the STE."""
        return self.fake_quantize(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight(), self.bias)

    def to_linear(self, bake: bool = False) -> nn.Linear:
        """A plain ``nn.Linear`` holding this layer's (trained) parameters.

        With ``bake=True`` the weight values are replaced in place by their fake-quantized values, so the plain
        layer computes exactly what this one did (and quantizing it again with the same settings is lossless up
        to float rounding).
        """
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        if bake:
            with torch.no_grad():
                self.weight.copy_(self.quantized_weight())
        lin.weight = self.weight
        lin.bias = self.bias
        return lin

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"bits={self.bits}, group_size={self.group_size}, symmetric={self.symmetric}"
        )
