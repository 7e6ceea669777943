"""NF4/FP4 blockwise 4-bit quantization: codebooks, packing, error bounds, double quant, bitsandbytes parity."""

from __future__ import annotations

import os

import pytest
import torch

from effine.errors import ConfigError
from effine.quant import nf4 as N
from effine.quant.nf4 import (
    FP4_CODE,
    NF4_CODE,
    QuantState4bit,
    dequantize_nf4,
    dynamic_map_8bit,
    quantize_nf4,
)


def test_nf4_codebook_values():
    assert NF4_CODE.dtype == torch.float32 and NF4_CODE.shape == (16,)
    assert NF4_CODE[0].item() == -1.0 and NF4_CODE[7].item() == 0.0 and NF4_CODE[15].item() == 1.0
    assert torch.all(NF4_CODE[1:] > NF4_CODE[:-1])  # sorted: code index order = value order
    # a few values from the QLoRA paper / bitsandbytes (float32)
    assert NF4_CODE[1].item() == pytest.approx(-0.6961928009986877, abs=0)
    assert NF4_CODE[8].item() == pytest.approx(0.07958029955625534, abs=0)
    assert NF4_CODE[14].item() == pytest.approx(0.7229568362236023, abs=0)
    # 7 negative and 8 positive values: the asymmetry that gives NF4 an exact zero
    assert (NF4_CODE < 0).sum() == 7 and (NF4_CODE > 0).sum() == 8


def test_fp4_codebook_values():
    expected = torch.tensor([0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, -8, -12, -4, -6, -2, -3]) / 12
    assert torch.equal(FP4_CODE, expected)
    assert torch.equal(FP4_CODE[8:], -FP4_CODE[:8])  # bit 3 is the sign


def test_thresholds_sit_between_codes():
    for code, t in ((NF4_CODE, N._NF4_THRESHOLDS), (torch.sort(FP4_CODE[:8]).values, N._FP4_MAG_THRESHOLDS)):
        assert torch.all(code[:-1] < t) and torch.all(t < code[1:])
        mid = (code[:-1].double() + code[1:].double()) / 2
        assert torch.all((t.double() - mid).abs() <= 1e-6)  # midpoints, to within float rounding


def test_dynamic_map():
    code = dynamic_map_8bit()
    assert code.shape == (256,) and code.dtype == torch.float32
    assert torch.all(code[1:] > code[:-1])  # sorted, no duplicates
    assert code[127].item() == 0.0 and code[255].item() == 1.0
    assert code[0].item() == pytest.approx(-0.99296875, rel=1e-7)
    assert code[128].item() == pytest.approx(5.5e-7, rel=1e-5)  # smallest positive: 1e-6 * (0.1 + 1) / 2


def test_pack_order_nf4_and_fp4():
    w = torch.tensor([1.0, -1.0, 0.0, 0.5])
    st = quantize_nf4(w, blocksize=64, double_quant=False)
    # absmax = 1; codes: 1.0 -> 15, -1.0 -> 0, 0.0 -> 7, 0.5 -> 12 (0.4407 is nearer than 0.5626)
    # first element in the high nibble: [0xF0, 0x7C]
    assert st.packed.dtype == torch.uint8 and st.packed.tolist() == [0xF0, 0x7C]
    assert st.absmax.tolist() == [1.0]
    st = quantize_nf4(w, blocksize=64, double_quant=False, quant_type="fp4")
    # FP4: 1.0 -> code 3, -1.0 -> 8 | 3 = 11, 0.0 -> 0, 0.5 -> 5  => [0x3B, 0x05]
    assert st.packed.tolist() == [0x3B, 0x05]
    # odd length: the last byte is padded with the code of 0.0 in the low nibble
    st = quantize_nf4(torch.tensor([1.0, 0.0, -1.0]), double_quant=False)
    assert st.packed.tolist() == [0xF7, 0x07]


def _max_half_gap(code: torch.Tensor) -> float:
    s = torch.sort(code).values
    return float((s[1:] - s[:-1]).max()) / 2


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape,blocksize", [((64, 128), 64), ((33, 65), 64), ((7,), 32), ((16, 96), 128)])
def test_round_trip_error_bound(quant_type, shape, blocksize):
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.02
    st = quantize_nf4(w, blocksize=blocksize, double_quant=False, quant_type=quant_type)
    out = dequantize_nf4(st)
    assert out.shape == w.shape and out.dtype == w.dtype
    n = w.numel()
    assert st.packed.shape == (-(-n // 2),) and st.absmax.shape == (-(-n // blocksize),)
    per_el_absmax = st.absmax.repeat_interleave(blocksize)[:n].view(shape)
    bound = per_el_absmax * (_max_half_gap(N._code(quant_type)) + 1e-6)
    assert ((out - w).abs() <= bound).all()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_codes_are_nearest(quant_type):
    torch.manual_seed(1)
    w = torch.randn(4096)
    st = quantize_nf4(w, blocksize=64, double_quant=False, quant_type=quant_type)
    code = N._code(quant_type)
    p = st.packed.long()
    idx = torch.stack((p >> 4, p & 15), 1).reshape(-1)
    x = (w.view(-1, 64) / st.absmax.view(-1, 1)).reshape(-1)
    best = (x.unsqueeze(1) - code).abs().min(1).values
    chosen = (x - code[idx]).abs()
    assert (chosen <= best + 1e-6).all()  # nearest, up to the float rounding of the thresholds


def test_dequantize_dtypes_and_zero_block():
    w = torch.randn(8, 64, dtype=torch.bfloat16)
    w[0] = 0  # an all-zero block must not produce NaN
    st = quantize_nf4(w)
    out = dequantize_nf4(st)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all() and (out[0] == 0).all()
    assert dequantize_nf4(st, dtype=torch.float32).dtype == torch.float32


def test_double_quant_absmax_error_and_size():
    torch.manual_seed(2)
    w = torch.randn(1024, 1024) * 0.02
    plain = quantize_nf4(w, double_quant=False)
    dq = quantize_nf4(w, double_quant=True)
    assert dq.double_quant and dq.absmax.dtype == torch.uint8
    assert dq.absmax_scale.shape == (-(-plain.absmax.numel() // 256),) and dq.absmax_scale.dtype == torch.float32
    assert dq.absmax_offset.dim() == 0
    assert torch.equal(dq.packed, plain.packed)  # the 4-bit codes do not depend on double quantization
    approx = dq.absmax_fp32()
    err = (approx - plain.absmax).abs()
    scale_per_block = dq.absmax_scale.repeat_interleave(256)[: err.numel()]
    assert (err <= scale_per_block * (_max_half_gap(dynamic_map_8bit()) + 1e-6)).all()
    assert (err / plain.absmax).mean() < 5e-3
    # bytes: 0.5 (codes) + 1/64 (uint8 absmax) + tiny, vs 2 bytes/weight in bf16
    assert dq.nbytes() <= 0.3 * w.numel() * 2
    assert dq.nbytes() < plain.nbytes()
    # reconstruction error with double quant stays close to plain 4-bit
    e_plain = (dequantize_nf4(plain) - w).pow(2).mean()
    e_dq = (dequantize_nf4(dq) - w).pow(2).mean()
    assert e_dq <= e_plain * 1.05


def test_state_to_and_errors():
    st = quantize_nf4(torch.randn(10, 10))
    assert isinstance(st.to("cpu"), QuantState4bit)
    with pytest.raises(ConfigError, match="blocksize"):
        quantize_nf4(torch.randn(10), blocksize=48)
    with pytest.raises(ConfigError, match="quant_type"):
        quantize_nf4(torch.randn(10), quant_type="int4")
    with pytest.raises(ConfigError, match="float"):
        quantize_nf4(torch.ones(10, dtype=torch.int32))


# ------------------------------------------------------------------------------------ against bitsandbytes
# Runs only where bitsandbytes is importable (it is not a dependency of effine). On CUDA it compares with the CUDA
# kernels too (the reference implementation; exact). Shapes avoid rows whose length is an even non-multiple of the
# blocksize: bitsandbytes 0.50.2's CPU dequantize kernel disagrees with its own reference implementation there.

_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _bnb_state(BF, st: QuantState4bit, device):
    state2 = None
    if st.double_quant:
        state2 = BF.QuantState(
            absmax=st.absmax_scale.to(device), code=dynamic_map_8bit().to(device), blocksize=256,
            dtype=torch.float32,
        )  # fmt: skip
    return BF.QuantState(
        absmax=st.absmax.to(device), shape=st.shape, code=BF.get_4bit_type(st.quant_type, device=device),
        blocksize=st.blocksize, quant_type=st.quant_type, dtype=st.dtype,
        offset=None if not st.double_quant else st.absmax_offset.to(device), state2=state2,
    )  # fmt: skip


def test_bnb_codebooks():
    BF = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(BF.get_4bit_type("nf4", device="cpu"), NF4_CODE)
    assert torch.equal(BF.get_4bit_type("fp4", device="cpu"), FP4_CODE)
    assert torch.equal(BF.create_dynamic_map(signed=True), dynamic_map_8bit())


@pytest.mark.parametrize("device", _DEVICES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("double_quant", [False, True])
def test_bnb_dequantizes_effine_state_identically(device, quant_type, dtype, double_quant):
    BF = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(3)
    for shape, bs in (((256, 512), 64), ((33, 65), 64), ((64, 256), 128)):
        w = (torch.randn(shape) * 0.03).to(dtype)
        st = quantize_nf4(w, blocksize=bs, double_quant=double_quant, quant_type=quant_type)
        ours = dequantize_nf4(st)
        theirs = BF.dequantize_4bit(st.packed.view(-1, 1).to(device), _bnb_state(BF, st, device)).cpu()
        assert theirs.dtype == dtype and theirs.shape == w.shape
        if device == "cuda":
            assert torch.equal(theirs, ours), (shape, bs)
        else:
            # bitsandbytes' CPU kernels vary with the host (an AVX-512 build rounds fp16 output differently), so on
            # CPU allow one unit in the last place of the output dtype (and flushed subnormals); CUDA is exact.
            fi = torch.finfo(dtype)
            torch.testing.assert_close(theirs, ours, rtol=fi.eps, atol=fi.tiny, msg=str((shape, bs)))


@pytest.mark.parametrize("device", _DEVICES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_bnb_quantize_agrees(device, quant_type, double_quant):
    """Same codes and absmax as bitsandbytes' quantize_4bit, except for values within a few ulps of a decision
    threshold (bitsandbytes' backends differ among themselves there: rounding of the thresholds, approximate
    reciprocal on CUDA, tie direction on CPU). float32 data, so such near-ties are rare."""
    BF = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(4)
    w = torch.randn(512, 512) * 0.02
    p, bst = BF.quantize_4bit(w.to(device), blocksize=64, compress_statistics=double_quant, quant_type=quant_type)
    st = quantize_nf4(w.to(device), blocksize=64, double_quant=double_quant, quant_type=quant_type)
    code = N._code(quant_type).to(device)
    pb, po = p.view(-1).long(), st.packed.long()
    vb = code[torch.stack((pb >> 4, pb & 15), 1).reshape(-1)]
    vo = code[torch.stack((po >> 4, po & 15), 1).reshape(-1)]
    assert (vb != vo).sum().item() <= 2  # value-equal codes (FP4 +0/-0 codes count as equal)
    if double_quant:
        assert torch.equal(bst.offset, st.absmax_offset)
        assert torch.equal(bst.state2.absmax, st.absmax_scale)
        same = (bst.absmax == st.absmax).float().mean().item()
        assert same >= 0.99  # bitsandbytes' CPU kernel is not exactly nearest; CUDA agrees fully in our checks
    else:
        assert torch.equal(bst.absmax, st.absmax)


# ------------------------------------------------------------------------------------ the Triton kernel (CUDA)


def _triton_ready() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(not _triton_ready(), reason="needs Triton and CUDA (or TRITON_INTERPRET=1 on a CPU)")
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_dequantize_is_bit_identical(quant_type, double_quant, dtype, monkeypatch):
    from effine.quant.nf4_triton import dequantize_4bit_triton

    device = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.setenv("EFFINE_TRITON", "0")  # dequantize_nf4 below is the reference path
    torch.manual_seed(5)
    for shape, bs in (((256, 512), 64), ((33, 65), 64), ((64, 256), 128), ((3, 1001), 32)):
        w = (torch.randn(shape) * 0.03).to(dtype).to(device)
        st = quantize_nf4(w, blocksize=bs, double_quant=double_quant, quant_type=quant_type)
        got = dequantize_4bit_triton(st, dtype)
        assert got.dtype == dtype and got.shape == w.shape
        assert torch.equal(got, dequantize_nf4(st, dtype)), (shape, bs)
