"""4-bit NF4 / FP4 blockwise quantization (QLoRA), laid out like bitsandbytes' ``quantize_4bit``.

Scheme (QLoRA, Dettmers et al. 2023, https://arxiv.org/abs/2305.14314), for a weight ``W`` with ``n`` elements:

1. Flatten ``W`` in row-major order and cut it into blocks of ``blocksize`` (64 by default) consecutive
   elements; the last block may be shorter.
2. Per block ``b``: ``absmax_b = max |w|`` (float32) and each value is scaled into ``[-1, 1]`` as
   ``x = w * (1 / absmax_b)`` (multiplication by the float32 reciprocal, as bitsandbytes' kernels do).
   A block that is entirely zero is stored with absmax 0 and the code of 0.0 for every element.
3. Each ``x`` is replaced by the 4-bit index of the nearest of the 16 codebook values ``c``, decided with
   bitsandbytes' float32 thresholds (``_NF4_THRESHOLDS``; FP4 is sign-magnitude, sign bit = ``x < 0``).
   Dequantization is ``w' = c[index] * absmax_b`` computed in float32, then cast.
4. Two indices per byte: element ``2i`` in the **high** nibble, element ``2i + 1`` in the low nibble of byte
   ``i``; an odd ``n`` is padded with the index of 0.0.

Double quantization (QLoRA section 3, "Double Quantization"): the float32 ``absmax`` vector (one per block) is
itself quantized: ``offset = mean(absmax)``, then ``absmax - offset`` is quantized blockwise with blocks of 256
to 8 bits using bitsandbytes' signed "dynamic" 8-bit code (:func:`dynamic_map_8bit`), nearest value (ties to
the even index, as bitsandbytes' CUDA kernel settles them), with a float32 absmax per 256-block.
Reconstruction: ``absmax_b = code8[q_b] * absmax2[b // 256] + offset``.
That costs ``8/64 + 32/(64*256)`` = 0.127 bits per weight instead of ``32/64 = 0.5``.

Compatibility with bitsandbytes (0.50.2 read for facts, no code copied): the two codebooks below are the
values returned by ``bitsandbytes.functional.get_4bit_type("nf4" | "fp4")``; the 8-bit dynamic code is the one
built by ``bitsandbytes.functional.create_dynamic_map(signed=True)``; block order, nibble order, float32
absmax, the scaling by the block's float32 reciprocal and the nested (double quant) layout match ``quantize_4bit`` /
``dequantize_4bit``. So ``packed`` + ``absmax`` (or ``absmax`` uint8 + ``absmax_scale`` + ``absmax_offset``)
can be handed to bitsandbytes' ``QuantState`` (``packed.view(-1, 1)``) and dequantize to the same values; the
test ``tests/unit/test_quant_nf4.py`` checks this whenever bitsandbytes is importable (and against the CUDA
kernels when a GPU is present). Checked on an H200 against bitsandbytes 0.50.2's CUDA kernels: bnb dequantized
every effine state (nf4/fp4, fp32/bf16/fp16, with and without double quant, ragged shapes) bit-identically, and
the codes effine writes are the same as the kernel's, with these known exceptions, all of which still
dequantize to the same or an equally near value:

* The kernel scales by an *approximate* float32 reciprocal (fast-math ``rcp.approx``) where effine uses the
  exact one, so a value within an ulp of a decision threshold can get the neighbouring code. Measured on
  2,097,152 random weights: NF4 0 differences (fp32, bf16, fp16); FP4 1 (fp32), 48 (fp16), 378 (bf16) -- FP4's
  thresholds sit at simple fractions (5/24, 7/24, 5/6, ...) that ratios of bf16 numbers often hit to an ulp.
* An all-zero block: the kernel computes ``0 * (1/0) = NaN`` and stores NF4 code 0 (-1.0 times absmax 0);
  effine stores the code of 0.0 (as bitsandbytes' CPU backend does).
* With double quantization, ``offset = mean(absmax)`` is a float32 reduction whose last bit depends on the
  device's summation order; on the same device effine and bitsandbytes agree (both use ``torch.mean``).

bitsandbytes' own CPU backend differs from its CUDA kernels at such near-ties too (FP4 ties go toward -inf, its
8-bit nested quantizer is not exactly nearest, and its C dequantize kernel disagrees with its reference code
when a row length is an even non-multiple of the blocksize).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from typing import Optional

import torch
import torch.nn.functional as F

from effine.errors import ConfigError

__all__ = [
    "NF4_CODE",
    "FP4_CODE",
    "QuantState4bit",
    "dynamic_map_8bit",
    "check_4bit_args",
    "quantize_nf4",
    "dequantize_nf4",
    "quantize_blockwise_8bit",
    "dequantize_blockwise_8bit",
]

# NF4 ("NormalFloat4"): quantiles of N(0, 1) rescaled to [-1, 1], with an exact 0 (QLoRA appendix E). These are
# the float32 values of bitsandbytes.functional.get_4bit_type("nf4") (bitsandbytes 0.50.2); index = 4-bit code.
NF4_CODE = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)  # fmt: skip

# FP4 (E2M1 with bitsandbytes' bias): bit 3 = sign, bits 2..0 select a magnitude. bitsandbytes lists the
# magnitudes of codes 0..7 as [0, 0.0625, 8, 12, 4, 6, 2, 3] and divides by the largest (12), in float32;
# code 8 ("-0") is stored as +0.0 (bitsandbytes 0.50.2, get_4bit_type("fp4")).
FP4_CODE = torch.tensor([0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, -8, -12, -4, -6, -2, -3], dtype=torch.float32) / 12

# Decision thresholds (float32) between adjacent codes, compared as "x > t -> upper code" (ties go down).
# They are the midpoints of adjacent code values, written in decimal and rounded once to float32, which is what
# bitsandbytes' CUDA kernel compares against. For 4 of the 15 NF4 midpoints the exact midpoint is a tie between two
# float32 values and this single rounding lands one ulp below the float32 arithmetic (a + b) / 2; using these
# constants keeps every code identical to the CUDA kernel's, which matters for bf16 weights, whose scaled values
# land exactly on midpoints quite often. Verified value by value (+-200 ulps around every threshold) against
# bitsandbytes 0.50.2 on CUDA.
_NF4_THRESHOLDS = torch.tensor(
    [
        -0.8480964303016663, -0.6106328964233398, -0.4599952697753906, -0.33967941999435425,
        -0.23460739850997925, -0.13791173696517944, -0.045525018125772476, 0.03979014977812767,
        0.1202552542090416, 0.2035212516784668, 0.2920137643814087, 0.3893125355243683,
        0.5016633868217468, 0.6427869200706482, 0.8614783883094788,
    ],
    dtype=torch.float32,
)  # fmt: skip
# FP4 magnitude thresholds between the sorted magnitudes [0, 1/192, 1/6, 1/4, 1/3, 1/2, 2/3, 1]; the CUDA kernel uses
# these shorter decimal constants (e.g. 0.583333 for 7/12), hence up to a few ulps away from exact midpoints.
_FP4_MAG_THRESHOLDS = torch.tensor(
    [0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333], dtype=torch.float32
)
_FP4_MAG_CODES = torch.tensor([0, 1, 6, 7, 4, 5, 2, 3], dtype=torch.int32)  # codes sorted by magnitude

_BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256  # QLoRA double quantization block size for the absmax values


def dynamic_map_8bit() -> torch.Tensor:
    """bitsandbytes' signed 8-bit "dynamic" code: 256 sorted float32 values in ``[-0.99297, 1]``.

    Construction (Dettmers 2015, "8-Bit Approximations for Parallelism in Deep Learning"): for each decade
    ``10^(e-6)``, ``e = 0..6``, split ``[0.1, 1]`` into ``2^e`` equal bins (float32 ``linspace``) and take the bin
    centres times the decade, with both signs (``2 * 127`` values); add 0 and 1. Index = 8-bit code.
    The arithmetic is done in float32 in the same order as bitsandbytes so the values are bit-identical.
    """
    return _dynamic_map_cached().clone()


@functools.lru_cache(maxsize=1)
def _dynamic_map_cached() -> torch.Tensor:
    values = [0.0, 1.0]
    for e in range(7):
        edges = torch.linspace(0.1, 1.0, 2**e + 1, dtype=torch.float32)
        centres = (edges[:-1] + edges[1:]) / 2.0
        mags = centres * (10.0 ** (e - 6))  # float32 tensor times a Python float: computed in float32
        values += mags.tolist() + (-mags).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


def _code(quant_type: str) -> torch.Tensor:
    if quant_type == "nf4":
        return NF4_CODE
    if quant_type == "fp4":
        return FP4_CODE
    raise ConfigError(
        f"quant_type={quant_type!r} is not a 4-bit data type (effine.quant.nf4): use 'nf4' or 'fp4'."
    )


@functools.lru_cache(maxsize=None)
def _map8_on(device: torch.device) -> torch.Tensor:
    """The dynamic 8-bit map on ``device``, copied once: a host-to-device copy per call would stall the GPU queue."""
    return _dynamic_map_cached().to(device)


@functools.lru_cache(maxsize=None)
def _tables(quant_type: str, device: torch.device) -> dict[str, torch.Tensor]:
    """Per-device constants: thresholds for quantizing and the byte -> (first, second) value table."""
    code = _code(quant_type)
    out: dict[str, torch.Tensor] = {}
    if quant_type == "nf4":
        out["bounds"] = _NF4_THRESHOLDS  # sorted codebook: bucketize gives the code index directly
    else:
        out["bounds"] = _FP4_MAG_THRESHOLDS  # sign-magnitude: bucketize |x|, then map to the code, add sign bit
        out["mag_codes"] = _FP4_MAG_CODES
    idx = torch.arange(256)
    # (256, 2) float32: byte b -> (code[b >> 4], code[b & 15]) = (first element, second element).
    out["pair_table"] = torch.stack((code[idx >> 4], code[idx & 15]), dim=1)
    out["pair_table64"] = out["pair_table"].contiguous().view(torch.int64).reshape(256)  # same bytes, one row each
    out["code"] = code.float()
    return {k: v.to(device) for k, v in out.items()}


@dataclass
class QuantState4bit:
    """A 4-bit (NF4/FP4) quantized tensor and what is needed to dequantize it.

    ``packed``: uint8 ``(ceil(n / 2),)``, two codes per byte, first element in the high nibble.
    ``absmax``: float32 ``(n_blocks,)``; with double quantization uint8 ``(n_blocks,)`` codes of
    ``absmax - absmax_offset`` in the dynamic 8-bit map, and then ``absmax_scale`` is float32
    ``(ceil(n_blocks / 256),)`` and ``absmax_offset`` a float32 0-dim tensor.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    quant_type: str = "nf4"
    absmax_scale: Optional[torch.Tensor] = None
    absmax_offset: Optional[torch.Tensor] = None
    nested_blocksize: int = field(default=NESTED_BLOCKSIZE)

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= int(d)
        return n

    def absmax_fp32(self) -> torch.Tensor:
        """The float32 per-block absmax, dequantized from the 8-bit codes when double quantized."""
        if not self.double_quant:
            return self.absmax
        assert self.absmax_offset is not None
        return dequantize_blockwise_8bit(self.absmax, self.absmax_scale, self.nested_blocksize) + self.absmax_offset

    def nbytes(self) -> int:
        """Storage bytes of the tensors (packed codes and the absmax state)."""
        ts = [self.packed, self.absmax, self.absmax_scale, self.absmax_offset]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def to(self, device: torch.device | str) -> "QuantState4bit":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(
            self,
            packed=mv(self.packed),
            absmax=mv(self.absmax),
            absmax_scale=mv(self.absmax_scale),
            absmax_offset=mv(self.absmax_offset),
        )


def _blocks(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """(n,) -> (n_blocks, blocksize), zero padding the last block (zeros change no absmax)."""
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    pad = n_blocks * blocksize - n
    if pad:
        flat = F.pad(flat, (0, pad))
    return flat.view(n_blocks, blocksize)


def _scale_blocks(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax (float32, (n_blocks,)) and the rows scaled into [-1, 1] by the float32 reciprocal."""
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks * (1.0 / absmax).unsqueeze(1)
    # An all-zero block gives 0 * inf = NaN (and a subnormal absmax can give inf): send those to 0 and +-1.
    scaled = torch.nan_to_num(scaled, nan=0.0).clamp_(-1.0, 1.0)
    return absmax, scaled


def quantize_blockwise_8bit(x: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantization with the dynamic map: ``(codes uint8 (n,), absmax float32 (n_blocks,))``.

    Used for double quantization of the 4-bit absmax values; nearest code value after scaling by the block's
    float32 reciprocal absmax, like bitsandbytes' ``quantize_blockwise``.
    """
    flat = x.reshape(-1).float()
    absmax, scaled = _scale_blocks(_blocks(flat, blocksize))
    v = scaled.reshape(-1)[: flat.numel()]
    code = _map8_on(x.device)
    mids = (code[:-1] + code[1:]) / 2  # (255,) float32, computed like the kernel: (a + b) * 0.5 in float32
    q = torch.bucketize(v, mids)  # nearest code; a value equal to a midpoint gets the lower index here, ...
    # ... but bitsandbytes' kernel (a 7-step binary search from index 127) settles ties on the even index.
    tie = (q < 255) & (v == mids[q.clamp(max=254)]) & (q % 2 == 1)
    q = (q + tie.long()).to(torch.uint8)
    return q, absmax


def dequantize_blockwise_8bit(q: torch.Tensor, absmax: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise_8bit`: float32 ``code8[q] * absmax[i // blocksize]``, shape ``(n,)``."""
    code = _map8_on(q.device)
    n = q.numel()
    vals = _blocks(code[q.reshape(-1).long()], blocksize) * absmax.unsqueeze(1)
    return vals.reshape(-1)[:n]


def check_4bit_args(blocksize: int, quant_type: str) -> None:
    """Raise :class:`ConfigError` unless ``quant_type`` is nf4/fp4 and ``blocksize`` one bitsandbytes supports."""
    _code(quant_type)
    if blocksize not in _BNB_BLOCKSIZES:
        raise ConfigError(
            f"4-bit blocksize={blocksize!r} is not supported (effine.quant.nf4): use one of {_BNB_BLOCKSIZES} "
            "(the sizes bitsandbytes can read); 64 is the QLoRA default."
        )


def quantize_nf4(
    w: torch.Tensor,
    blocksize: int = 64,
    double_quant: bool = True,
    quant_type: str = "nf4",
) -> QuantState4bit:
    """Quantize ``w`` (any shape, float16/bfloat16/float32) to 4-bit NF4 or FP4; see the module docstring."""
    check_4bit_args(blocksize, quant_type)
    if w.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ConfigError(
            f"quantize_nf4 got a {w.dtype} tensor (effine.quant.nf4): pass a float16, bfloat16 or float32 weight."
        )
    tables = _tables(quant_type, w.device)
    flat = w.detach().reshape(-1).float()
    n = flat.numel()
    if n == 0:
        raise ConfigError("quantize_nf4 got an empty tensor (effine.quant.nf4): there is nothing to quantize.")
    absmax, scaled = _scale_blocks(_blocks(flat, blocksize))  # (n_blocks,), (n_blocks, blocksize)
    x = scaled.reshape(-1)[:n]
    if quant_type == "nf4":
        idx = torch.bucketize(x, tables["bounds"], out_int32=True)  # (n,) in 0..15
    else:
        mag = torch.bucketize(x.abs(), tables["bounds"], out_int32=True)  # (n,) in 0..7 by magnitude
        idx = tables["mag_codes"][mag] | ((x < 0).to(torch.int32) << 3)
    if n % 2:  # pad with the code of 0.0 (7 for NF4, 0 for FP4)
        idx = F.pad(idx, (0, 1), value=7 if quant_type == "nf4" else 0)
    packed = ((idx[0::2] << 4) | idx[1::2]).to(torch.uint8)  # (ceil(n/2),)
    state = QuantState4bit(
        packed=packed, absmax=absmax, shape=torch.Size(w.shape), dtype=w.dtype, blocksize=blocksize,
        quant_type=quant_type,
    )  # fmt: skip
    if double_quant:
        offset = absmax.mean()
        q_absmax, absmax2 = quantize_blockwise_8bit(absmax - offset, NESTED_BLOCKSIZE)
        state.absmax, state.absmax_scale, state.absmax_offset = q_absmax, absmax2, offset
    return state


def dequantize_nf4(state: QuantState4bit, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Dequantize a :class:`QuantState4bit` to ``state.shape`` in ``dtype`` (default ``state.dtype``).

    Vectorised lookup: the (256, 2) float32 byte table is viewed as 256 int64 entries (each holding the two
    float32 values of one byte), so a single 1-D ``index_select`` over the packed bytes yields all values in
    element order (a 1-D gather of 8-byte rows is an order of magnitude faster on CPU than indexing a 2-D table).
    The values are then multiplied by their block's absmax in float32 (as bitsandbytes does) and cast once.
    """
    dtype = dtype or state.dtype
    if state.packed.is_cuda:  # one Triton kernel, bit-identical (effine.quant.nf4_triton); None: not available
        from effine.quant.nf4_triton import try_dequantize

        fast = try_dequantize(state, dtype)
        if fast is not None:
            return fast
    n = state.numel
    table = _tables(state.quant_type, state.packed.device)["pair_table64"]
    vals = table.index_select(0, state.packed.reshape(-1).to(torch.int32)).view(torch.float32)  # (2 * n_bytes,)
    absmax = state.absmax_fp32().float()
    bs = state.blocksize
    n_blocks = absmax.numel()
    if vals.numel() != n_blocks * bs:  # odd n or a short last block
        vals = F.pad(vals[:n], (0, n_blocks * bs - n))
    vals = vals.view(n_blocks, bs).mul_(absmax.unsqueeze(1))  # float32 product, rounded once by the cast below
    return vals.view(-1)[:n].view(state.shape).to(dtype)
