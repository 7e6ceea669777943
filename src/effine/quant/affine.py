"""Affine (linear) integer quantization of weights.

The founding document defines linear quantization as the affine map between a real value ``r`` and a signed
``N``-bit integer ``q``::

    r = (q - Z) * S

    S = (r_max - r_min) / (q_max - q_min)        # scale: real units per integer step
    Z = round(q_min - r_min / S)                 # zero point: the integer that represents r = 0
    q_max = 2^(N-1) - 1,  q_min = -2^(N-1)       # signed N-bit range, e.g. [-128, 127] for N = 8

and its inverse (quantization) ``q = clamp(round(r / S) + Z, q_min, q_max)``.

Two variants are implemented:

* **asymmetric**: ``S`` and ``Z`` exactly as above. ``r_min``/``r_max`` are the minimum/maximum over the values
  that share one ``(S, Z)`` pair, *extended to include 0* (``r_min <= 0 <= r_max``). For weights, whose range
  straddles 0 anyway, this is the document's formula unchanged; it guarantees that ``Z`` lies in
  ``[q_min, q_max]`` (so ``Z`` is itself an N-bit integer and is stored as int8) and that ``r = 0`` is
  represented exactly (``q = Z``), which is what makes zero padding of a ragged last group free.
* **symmetric**: ``Z = 0`` and ``S = max|r| / q_max``. ``q_min`` is never produced except by clamping
  (the grid is symmetric, ``[-q_max, q_max]``), which keeps ``-r`` and ``r`` equally accurate.

Granularity (which values share one ``(S, Z)``), for a weight of shape ``(out_features, in_features)``:

* per-tensor: one pair; ``scale``/``zero_point`` are 0-dim tensors.
* per-channel: one pair per output row; shapes ``(out_features, 1)``.
* group-wise: one pair per ``group_size`` consecutive input columns of each row; shapes
  ``(out_features, ceil(in_features / group_size))``. A ragged last group is zero padded, which changes neither
  ``S`` nor ``Z`` because 0 is always inside the range.

Scales are float32, zero points int8, quantized values int8 (any ``bits`` from 2 to 8). Two 4-bit values can be
packed into one byte with :func:`pack_int4`.

Hand-worked example (8-bit asymmetric, per-tensor), also a unit test::

    r = [-1.0, 0.0, 0.5, 2.0]            r_min = -1, r_max = 2, q_min = -128, q_max = 127
    S = (2 - (-1)) / 255 = 3/255 = 0.011764...
    Z = round(-128 - (-1) / S) = round(-128 + 85) = -43
    q = round(r / S) + Z = [-85, 0, round(42.5) = 42, 170] + (-43) = [-128, -43, -1, 127]
    r' = (q - Z) * S = [-1.0, 0.0, 42 * S = 0.494118, 2.0]    (error on 0.5 is 0.5 * S, the worst case)

Rounding is round-half-to-even (``torch.round``), which is symmetric (``round(-x) = -round(x)``); that symmetry
is what makes ``q(r_max) = q_max`` and ``q(r_min) = q_min`` exact, so clamping never changes an in-range value
and the round-trip error is at most ``S / 2`` per element.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from effine.errors import ConfigError

__all__ = [
    "qrange",
    "compute_qparams",
    "quantize",
    "dequantize",
    "fake_quantize",
    "pack_int4",
    "unpack_int4",
]


def qrange(bits: int) -> tuple[int, int]:
    """Signed N-bit integer range ``(q_min, q_max) = (-2^(N-1), 2^(N-1) - 1)``; ``(-128, 127)`` for 8 bits."""
    _check_bits(bits)
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise ConfigError(
            f"quantization bits={bits!r} is not supported (effine.quant.affine): "
            "use an integer from 2 to 8 (4 or 8 are the usual choices)."
        )


def _check_group_size(group_size: Optional[int]) -> None:
    if group_size is not None and (not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1):
        raise ConfigError(
            f"quantization group_size={group_size!r} is invalid (effine.quant.affine): "
            "use a positive integer such as 32, 64 or 128, or None for per-channel/per-tensor scales."
        )


def _to_groups(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """(O, I) -> (O, ceil(I / G), G), zero padding the last group when G does not divide I."""
    if t.dim() != 2:
        raise ConfigError(
            f"group-wise quantization needs a 2-D weight (out_features, in_features), got shape {tuple(t.shape)} "
            "(effine.quant.affine): pass group_size=None for per-tensor scales on other shapes."
        )
    rows, cols = t.shape
    n_groups = -(-cols // group_size)
    pad = n_groups * group_size - cols
    if pad:
        t = F.pad(t, (0, pad))
    return t.reshape(rows, n_groups, group_size)


def _from_groups(t: torch.Tensor, cols: int) -> torch.Tensor:
    """(O, n_groups, G) -> (O, I): inverse of :func:`_to_groups` (drops the padding)."""
    rows = t.shape[0]
    return t.reshape(rows, -1)[:, :cols]


def compute_qparams(
    w: torch.Tensor,
    bits: int = 8,
    symmetric: bool = True,
    group_size: Optional[int] = None,
    per_channel: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale ``S`` (float32) and zero point ``Z`` (int8) for ``w``.

    Symmetric:  ``S = max|r| / q_max``, ``Z = 0``.
    Asymmetric: ``S = (r_max - r_min) / (q_max - q_min)``, ``Z = round(q_min - r_min / S)``,
    with ``r_min = min(min(r), 0)`` and ``r_max = max(max(r), 0)``.

    ``group_size`` (takes precedence over ``per_channel``) gives shapes ``(O, ceil(I / G))`` for a 2-D ``w`` of
    shape ``(O, I)``; ``per_channel=True`` gives ``(O, 1)``; otherwise 0-dim (per-tensor).

    A group whose values are all 0 has ``r_max == r_min``; its scale would be 0, so it is set to 1 instead
    (every value then quantizes to ``q = Z`` and dequantizes to exactly 0). A nonzero constant group is fine as
    is, because the range always includes 0.
    """
    _check_bits(bits)
    _check_group_size(group_size)
    if not w.is_floating_point():
        raise ConfigError(
            f"compute_qparams got a {w.dtype} tensor (effine.quant.affine): quantize a floating point weight."
        )
    qmin, qmax = qrange(bits)
    r = w.detach().float()
    if group_size is not None:
        r = _to_groups(r, group_size)  # (O, n_groups, G): reduce over the last dim
        r_min, r_max = r.amin(dim=-1), r.amax(dim=-1)  # (O, n_groups)
    elif per_channel:
        if r.dim() < 2:
            raise ConfigError(
                f"per-channel quantization needs a weight with an output dim, got shape {tuple(w.shape)} "
                "(effine.quant.affine): use per_channel=False."
            )
        flat = r.reshape(r.shape[0], -1)
        r_min, r_max = flat.amin(dim=1, keepdim=True), flat.amax(dim=1, keepdim=True)  # (O, 1)
    else:
        r_min, r_max = r.amin(), r.amax()  # 0-dim
    # Include 0 in the range so that Z is an N-bit integer and r = 0 is exact (see module docstring).
    r_min = torch.clamp(r_min, max=0.0)
    r_max = torch.clamp(r_max, min=0.0)
    if symmetric:
        scale = torch.maximum(-r_min, r_max) / qmax
    else:
        scale = (r_max - r_min) / (qmax - qmin)
    if not torch.isfinite(scale).all():
        raise ConfigError(
            "the tensor to quantize contains NaN or infinite values (effine.quant.affine): "
            "check the checkpoint or the training run that produced it."
        )
    # All-zero group: S would be 0 and r / S undefined; any positive S represents the zeros exactly.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if symmetric:
        zero = torch.zeros_like(scale, dtype=torch.int8)
    else:
        zero = torch.round(qmin - r_min / scale).clamp_(qmin, qmax).to(torch.int8)
    return scale, zero


def _check_qparams(w: torch.Tensor, scale: torch.Tensor, group_size: Optional[int]) -> None:
    if group_size is None:
        return
    n_groups = -(-w.shape[-1] // group_size)
    if w.dim() != 2 or scale.dim() != 2 or scale.shape[0] != w.shape[0] or scale.shape[1] != n_groups:
        raise ConfigError(
            f"scale shape {tuple(scale.shape)} does not fit a weight of shape {tuple(w.shape)} with group_size="
            f"{group_size} (effine.quant.affine): pass the group_size that compute_qparams was called with."
        )


def _quantize_impl(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    bits: int,
    group_size: Optional[int],
    want_mask: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """q = clamp(round(r / S) + Z, q_min, q_max) as int8, plus (optionally) the mask of unclamped elements."""
    _check_bits(bits)
    _check_group_size(group_size)
    _check_qparams(w, scale, group_size)
    qmin, qmax = qrange(bits)
    r = w.detach().float()
    s = scale.float()
    z = zero_point.float()
    if group_size is not None:
        cols = r.shape[1]
        r = _to_groups(r, group_size)  # (O, n_groups, G)
        s, z = s.unsqueeze(-1), z.unsqueeze(-1)  # (O, n_groups, 1)
    q = torch.round(r / s) + z
    mask = ((q >= qmin) & (q <= qmax)) if want_mask else None
    q = q.clamp_(qmin, qmax).to(torch.int8)
    if group_size is not None:
        q = _from_groups(q, cols)
        if mask is not None:
            mask = _from_groups(mask, cols)
    return q, mask


def quantize(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    bits: int = 8,
    group_size: Optional[int] = None,
) -> torch.Tensor:
    """``q = clamp(round(r / S) + Z, q_min, q_max)`` as an int8 tensor of ``w``'s shape.

    ``scale``/``zero_point`` come from :func:`compute_qparams` (0-dim, ``(O, 1)`` or, with ``group_size``,
    ``(O, ceil(I / G))``).
    """
    return _quantize_impl(w, scale, zero_point, bits, group_size)[0]


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: Optional[torch.Tensor],
    group_size: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``r' = (q - Z) * S``, computed in float32 and returned in ``dtype`` with ``q``'s shape.

    ``zero_point=None`` means ``Z = 0`` (symmetric) and skips the subtraction.
    """
    _check_group_size(group_size)
    _check_qparams(q, scale, group_size)
    s = scale.float()
    z = None if zero_point is None else zero_point.float()
    if group_size is None:
        r = q.float()
    else:
        cols = q.shape[1]
        r = _to_groups(q, group_size).float()  # (O, n_groups, G)
        s = s.unsqueeze(-1)  # (O, n_groups, 1)
        z = None if z is None else z.unsqueeze(-1)
    if z is not None:
        r = r.sub_(z)
    r = r.mul_(s)
    return (r if group_size is None else _from_groups(r, cols)).to(dtype)


def _fake_quantize_impl(
    w: torch.Tensor, bits: int, symmetric: bool, group_size: Optional[int], per_channel: bool, want_mask: bool
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    scale, zero = compute_qparams(w, bits=bits, symmetric=symmetric, group_size=group_size, per_channel=per_channel)
    q, mask = _quantize_impl(w, scale, zero, bits, group_size, want_mask=want_mask)
    return dequantize(q, scale, zero, group_size=group_size, dtype=w.dtype), mask


def fake_quantize(
    w: torch.Tensor,
    bits: int = 8,
    symmetric: bool = True,
    group_size: Optional[int] = None,
    per_channel: bool = False,
) -> torch.Tensor:
    """Quantize then dequantize ``w`` (same shape and dtype): ``(clamp(round(r / S) + Z) - Z) * S``.

    The result carries no autograd history (rounding has zero gradient almost everywhere); for training use
    :func:`effine.quant.qat.ste_fake_quantize`, which passes gradients straight through.
    """
    with torch.no_grad():
        return _fake_quantize_impl(w, bits, symmetric, group_size, per_channel, want_mask=False)[0]


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack signed 4-bit values (int8 in ``[-8, 7]``) two per byte along the last dim.

    Nibble order: element ``2i`` goes into the **high** nibble and element ``2i + 1`` into the low nibble of byte
    ``i`` (the same order as the NF4 packing in :mod:`effine.quant.nf4`). Each nibble is the value's 4-bit two's
    complement (``-1 -> 0xF``, ``-8 -> 0x8``). An odd last dim is padded with a 0 nibble; pass the original
    length to :func:`unpack_int4` to drop it. Shape ``(..., n)`` -> uint8 ``(..., ceil(n / 2))``.
    """
    if q.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        raise ConfigError(f"pack_int4 needs an integer tensor, got {q.dtype} (effine.quant.affine).")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ConfigError(
            "pack_int4 got values outside the signed 4-bit range [-8, 7] (effine.quant.affine): "
            "quantize with bits=4 first."
        )
    v = q.to(torch.int16)
    if v.shape[-1] % 2:
        v = F.pad(v, (0, 1))
    v = v & 0xF  # two's complement nibble
    return ((v[..., 0::2] << 4) | v[..., 1::2]).to(torch.uint8)


@functools.lru_cache(maxsize=None)
def _int4_pair_table(device: torch.device) -> torch.Tensor:
    """(256,) int16 whose two bytes are the sign-extended (high, low) nibbles of the index, in memory order."""
    b = torch.arange(256, dtype=torch.int16)
    pairs = torch.stack((b >> 4, b & 0xF), dim=1)  # (256, 2): high nibble first
    pairs = ((pairs ^ 8) - 8).to(torch.int8)  # sign-extend the 4-bit two's complement values
    return pairs.contiguous().view(torch.int16).reshape(256).to(device)


def unpack_int4(packed: torch.Tensor, n: Optional[int] = None) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 ``(..., m)`` -> int8 ``(..., 2m)`` (or ``(..., n)`` if ``n`` given).

    One 1-D lookup per byte in a 256-entry table of int16 (each entry holding the two int8 values), which is
    much faster on CPU than shifting and interleaving nibbles.
    """
    if packed.dtype != torch.uint8:
        raise ConfigError(f"unpack_int4 needs a uint8 tensor, got {packed.dtype} (effine.quant.affine).")
    table = _int4_pair_table(packed.device)
    pairs = table.index_select(0, packed.reshape(-1).to(torch.int32))  # (numel,) int16
    out = pairs.view(torch.int8).reshape(*packed.shape[:-1], 2 * packed.shape[-1])
    if n is not None:
        if not 0 <= n <= out.shape[-1]:
            raise ConfigError(
                f"unpack_int4: n={n} is larger than the {out.shape[-1]} values packed (effine.quant.affine)."
            )
        out = out[..., :n]
    return out
