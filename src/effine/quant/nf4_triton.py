"""One-kernel NF4/FP4 dequantization for CUDA (Triton): the fast path of :func:`effine.quant.nf4.dequantize_nf4`.

Why: QLoRA dequantizes every frozen weight twice per step (forward, and backward for dL/dx). The reference path
is a chain of ATen kernels — a byte-pair table lookup writing fp32 values, the absmax decode (four more kernels
with double quantization), a float32 multiply and a cast — that moves about 18 bytes per weight through memory.
This kernel reads each packed byte and its block's absmax state once and writes the two values in the compute
dtype: about 2.5 bytes per weight for bf16, in one launch.

Per packed byte b at byte index i (elements 2i and 2i+1, one absmax block since block sizes are even):

    absmax = code8[qabsmax[blk]] * absmax_scale[blk // 256] + absmax_offset     (double quantization)
    absmax = absmax_fp32[blk]                                                    (plain)
    out[2i]   = cast(code4[b >> 4] * absmax),   out[2i+1] = cast(code4[b & 15] * absmax)

with blk = 2i // blocksize. Every product and sum is a separate float32 operation in the same order as the
reference (FMA contraction is switched off at launch), and the cast rounds to nearest even as ``Tensor.to``
does (for bf16 spelled out on the bits: ``(u + 0x7FFF + ((u >> 16) & 1)) >> 16``, exact for finite values), so
the result is bit-identical to the reference; the tests check ``torch.equal``.

Used only for CUDA tensors when Triton imports; any failure on first use falls back to the reference (logged
once). ``EFFINE_TRITON=0`` turns it off.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

log = logging.getLogger(__name__)

_BYTES = 1024  # packed bytes per program (2048 output values)


@functools.lru_cache(maxsize=1)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def dequant4(packed_ptr, absmax_ptr, absmax_scale_ptr, absmax_offset_ptr, code4_ptr, code8_ptr, out_ptr,
                 n, n_bytes, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, DOUBLE: tl.constexpr,
                 BF16: tl.constexpr, BYTES: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid * BYTES + tl.arange(0, BYTES)
        ok = offs < n_bytes
        b = tl.load(packed_ptr + offs, mask=ok, other=0).to(tl.int32)
        hi = tl.load(code4_ptr + (b >> 4))
        lo = tl.load(code4_ptr + (b & 15))
        blk = (offs * 2) // BLOCKSIZE
        if DOUBLE:
            qa = tl.load(absmax_ptr + blk, mask=ok, other=0).to(tl.int32)
            scale = tl.load(absmax_scale_ptr + blk // NESTED, mask=ok, other=0.0)
            absmax = tl.load(code8_ptr + qa) * scale + tl.load(absmax_offset_ptr)
        else:
            absmax = tl.load(absmax_ptr + blk, mask=ok, other=0.0)
        vals = tl.interleave(hi * absmax, lo * absmax)  # (2 * BYTES,): element order
        idx = pid * 2 * BYTES + tl.arange(0, 2 * BYTES)
        if BF16:  # round to nearest even by hand (finite values): the same on every backend, interpreter included
            u = vals.to(tl.uint32, bitcast=True)
            u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
            tl.store(out_ptr + idx, u.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=idx < n)
        else:
            tl.store(out_ptr + idx, vals.to(out_ptr.dtype.element_ty), mask=idx < n)

    return dequant4


def dequantize_4bit_triton(state, dtype: torch.dtype) -> torch.Tensor:
    """``dequantize_nf4(state, dtype)`` in one Triton kernel (CUDA tensors; CPU under ``TRITON_INTERPRET=1``)."""
    from effine.quant.nf4 import _map8_on, _tables

    import triton

    dev = state.packed.device
    n, n_bytes = state.numel, state.packed.numel()
    out = torch.empty(n, dtype=dtype, device=dev)
    code4 = _tables(state.quant_type, dev)["code"]  # device copies made once (no host-to-device copy per call)
    double = state.double_quant
    code8 = _map8_on(dev) if double else code4
    scale = state.absmax_scale if double else state.absmax
    offset = state.absmax_offset.reshape(1).float() if double else state.absmax
    grid = (triton.cdiv(n_bytes, _BYTES),)
    _kernel()[grid](state.packed.reshape(-1), state.absmax, scale, offset, code4, code8, out, n, n_bytes,
                    BLOCKSIZE=state.blocksize, NESTED=state.nested_blocksize, DOUBLE=double,
                    BF16=dtype == torch.bfloat16, BYTES=_BYTES,
                    enable_fp_fusion=False)
    return out.view(state.shape)


_failed = False


def try_dequantize(state, dtype: torch.dtype) -> torch.Tensor | None:
    """The Triton result for a CUDA state, or None (not CUDA, switched off, Triton missing or failed once)."""
    global _failed
    if _failed or not state.packed.is_cuda or os.environ.get("EFFINE_TRITON", "1") == "0":
        return None
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return None
    try:
        return dequantize_4bit_triton(state, dtype)
    except Exception as e:  # ImportError, a compile failure: the reference path still works
        _failed = True
        log.warning("effine: Triton 4-bit dequantization unavailable (%s: %s); using the reference path",
                    type(e).__name__, str(e)[:200])
        return None
