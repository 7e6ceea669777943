"""GGML's Q8_0 and Q4_0 block formats, computed with effine's affine quantization.

Both are the affine map ``r = (q - Z) * S`` of :mod:`effine.quant.affine` with ``Z = 0`` and one scale per block
of 32 consecutive weights of a row (``group_size=32``). What GGML fixes on top of that, and what this module
reproduces bit for bit (checked against ``gguf.quants`` in tests/test_gguf_quant.py):

    Q8_0  S = max|r| / 127 (float32, as compute_qparams' symmetric scale), q = round_half_away(r * (1 / S)),
          q in [-127, 127].  Block bytes: S as float16 (2) + q as int8 (32) = 34 bytes.
    Q4_0  S = m / -8 where m is the block's value of largest magnitude (signed; the first one on ties), so m
          maps to q = -8 exactly and the 16-level grid [-8, 7] is used in full.  q = floor(r * (1 / S) + 0.5),
          clamped to [-8, 7]; stored as q + 8 in a nibble.  Block bytes: S as float16 (2) + 16 bytes where byte
          j holds element j in its low nibble and element j + 16 in its high nibble = 18 bytes.

An all-zero block gets S = 0 (GGML's choice; affine's compute_qparams would pick 1, which dequantizes the same
but is not byte-identical). The quantized values use the float32 scale and the stored scale is its float16
rounding, exactly as ggml-quants.c does.
"""

from __future__ import annotations

import numpy as np
import torch

from effine.quant.affine import compute_qparams, dequantize, qrange

BLOCK = 32
BLOCK_BYTES = {"q8_0": 2 + BLOCK, "q4_0": 2 + BLOCK // 2}


def _blocks(w: torch.Tensor) -> torch.Tensor:
    """(..., n) float -> (n_blocks, 32) float32; n must be a multiple of 32."""
    if w.shape[-1] % BLOCK:
        raise ValueError(f"GGML block quantization needs a last dim divisible by {BLOCK}, got {tuple(w.shape)}")
    return w.detach().to(torch.float32).reshape(-1, BLOCK)


def _reciprocal(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale == 0, torch.zeros_like(scale), 1.0 / torch.where(scale == 0, 1.0, scale))


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    # Exact in float32 (no x + 0.5 rounding): floor(a) + floor(2 * frac(a)), as C's roundf.
    a = x.abs()
    fl = torch.floor(a)
    return torch.sign(x) * (fl + torch.floor(2 * (a - fl)))


def q8_0_qparams(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale (n_blocks, 1) float32, q (n_blocks, 32) int8) of Q8_0 for ``w``."""
    r = _blocks(w)
    scale, _zero = compute_qparams(r, bits=8, symmetric=True, group_size=BLOCK)  # S = max|r| / 127, Z = 0
    scale = torch.where(r.abs().amax(dim=1, keepdim=True) == 0, 0.0, scale)
    qmin, qmax = qrange(8)
    q = _round_half_away(r * _reciprocal(scale)).clamp_(qmin + 1, qmax).to(torch.int8)
    return scale, q


def q4_0_qparams(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale (n_blocks, 1) float32, q (n_blocks, 32) int8 in [-8, 7]) of Q4_0 for ``w``."""
    r = _blocks(w)
    idx = r.abs().argmax(dim=1, keepdim=True)  # first index of the largest magnitude, as numpy/ggml
    scale = torch.gather(r, 1, idx) / -8.0
    qmin, qmax = qrange(4)
    # ggml: trunc(r / S + 8.5) clamped to [0, 15]; the argument is >= 0.5, so trunc == floor and q = that - 8.
    q = (torch.trunc(r * _reciprocal(scale) + 8.5).clamp_(0, 15) - 8).clamp_(qmin, qmax).to(torch.int8)
    return scale, q


def quantize_blocks(w: torch.Tensor, kind: str) -> np.ndarray:
    """``w`` (rows, n) -> GGML block bytes, uint8 of shape (rows, n // 32 * bytes_per_block)."""
    rows = w.reshape(-1, w.shape[-1]).shape[0]
    if kind == "q8_0":
        scale, q = q8_0_qparams(w)
        payload = q.view(torch.uint8)
    elif kind == "q4_0":
        scale, q = q4_0_qparams(w)
        u = (q + 8).to(torch.uint8)
        payload = u[:, : BLOCK // 2] | (u[:, BLOCK // 2:] << 4)
    else:
        raise ValueError(f"unknown GGML block type {kind!r}; use q8_0 or q4_0")
    d = scale.to(torch.float16).view(torch.uint8)  # (n_blocks, 2), little-endian float16
    return torch.cat([d, payload], dim=1).reshape(rows, -1).numpy()


def dequantize_blocks(data: np.ndarray, kind: str, shape: tuple[int, ...]) -> torch.Tensor:
    """GGML block bytes -> float32 tensor of ``shape``: ``r' = (q - 0) * S`` through affine.dequantize."""
    raw = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, BLOCK_BYTES[kind]))
    scale = raw[:, :2].contiguous().view(torch.float16).float()  # (n_blocks, 1)
    if kind == "q8_0":
        q = raw[:, 2:].contiguous().view(torch.int8)
    else:
        p = raw[:, 2:]
        q = torch.cat([p & 0x0F, p >> 4], dim=1).to(torch.int8) - 8
    return dequantize(q, scale, None, group_size=BLOCK).reshape(shape)
