"""Affine int quantization: hand-worked values, shapes, packing and property tests."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from effine.errors import ConfigError
from effine.quant.affine import (
    compute_qparams,
    dequantize,
    fake_quantize,
    pack_int4,
    qrange,
    quantize,
    unpack_int4,
)


def test_qrange():
    assert qrange(8) == (-128, 127)
    assert qrange(4) == (-8, 7)
    with pytest.raises(ConfigError, match="bits"):
        qrange(9)


def test_hand_worked_8bit_asymmetric():
    # r = [-1, 0, 0.5, 2], 8-bit asymmetric, per-tensor:
    #   r_min = -1, r_max = 2, q_min = -128, q_max = 127
    #   S = (2 - (-1)) / (127 - (-128)) = 3 / 255 = 0.0117647...
    #   Z = round(q_min - r_min / S) = round(-128 + 85) = -43
    #   q = round(r / S) + Z = [-85, 0, round(42.5) = 42 (half to even), 170] - 43 = [-128, -43, -1, 127]
    #   r' = (q - Z) * S = [-85 S, 0, 42 S, 170 S] = [-1.0, 0.0, 0.494118, 2.0]
    r = torch.tensor([-1.0, 0.0, 0.5, 2.0])
    s, z = compute_qparams(r, bits=8, symmetric=False)
    assert s.shape == () and z.shape == ()
    assert s.item() == pytest.approx(3 / 255, rel=1e-7)
    assert z.item() == -43 and z.dtype == torch.int8
    q = quantize(r, s, z, bits=8)
    assert q.dtype == torch.int8
    assert q.tolist() == [-128, -43, -1, 127]
    rq = dequantize(q, s, z)
    torch.testing.assert_close(rq, torch.tensor([-1.0, 0.0, 42 * 3 / 255, 2.0]), rtol=1e-6, atol=1e-7)


def test_hand_worked_8bit_symmetric():
    # Same r, symmetric: Z = 0, S = max|r| / q_max = 2 / 127 = 0.015748...
    #   r / S = [-63.5, 0, 31.75, 127] -> round (half to even) -> q = [-64, 0, 32, 127]
    #   r' = q * S = [-1.007874, 0, 0.503937, 2.0]
    r = torch.tensor([-1.0, 0.0, 0.5, 2.0])
    s, z = compute_qparams(r, bits=8, symmetric=True)
    assert s.item() == pytest.approx(2 / 127, rel=1e-7) and z.item() == 0
    q = quantize(r, s, z, bits=8)
    assert q.tolist() == [-64, 0, 32, 127]
    torch.testing.assert_close(dequantize(q, s, z), torch.tensor([-64, 0, 32, 127]) * (2 / 127), rtol=1e-6, atol=1e-7)


def test_hand_worked_4bit_asymmetric():
    # r = [0, 1, 2, 3], 4-bit asymmetric: q in [-8, 7], r_min = 0, r_max = 3
    #   S = 3 / 15 = 0.2, Z = round(-8 - 0 / 0.2) = -8
    #   q = round(r / 0.2) - 8 = [0, 5, 10, 15] - 8 = [-8, -3, 2, 7]; r' = r exactly (up to float)
    r = torch.tensor([0.0, 1.0, 2.0, 3.0])
    s, z = compute_qparams(r, bits=4, symmetric=False)
    assert s.item() == pytest.approx(0.2, rel=1e-7) and z.item() == -8
    q = quantize(r, s, z, bits=4)
    assert q.tolist() == [-8, -3, 2, 7]
    torch.testing.assert_close(dequantize(q, s, z), r)


def test_constant_and_zero_tensors():
    for c in (0.0, 3.5, -2.0):
        w = torch.full((4, 8), c)
        for symmetric in (True, False):
            s, z = compute_qparams(w, bits=8, symmetric=symmetric, group_size=4)
            assert torch.isfinite(s).all() and (s > 0).all()
            q = quantize(w, s, z, bits=8, group_size=4)
            torch.testing.assert_close(dequantize(q, s, z, group_size=4), w, rtol=1e-6, atol=0)


def test_shapes_per_channel_and_groups():
    w = torch.randn(6, 200)
    s, z = compute_qparams(w, bits=8, per_channel=True)
    assert s.shape == (6, 1) and z.shape == (6, 1)
    for g in (32, 64, 128):
        s, z = compute_qparams(w, bits=4, symmetric=False, group_size=g)
        n_groups = -(-200 // g)  # 200 is not a multiple of 64 or 128: ragged last group
        assert s.shape == (6, n_groups) and z.shape == (6, n_groups)
        q = quantize(w, s, z, bits=4, group_size=g)
        assert q.shape == w.shape
        assert dequantize(q, s, z, group_size=g, dtype=torch.bfloat16).dtype == torch.bfloat16
    # each group's scale only depends on its own columns
    w2 = w.clone()
    w2[:, :32] *= 10
    s1, _ = compute_qparams(w, bits=8, group_size=32)
    s2, _ = compute_qparams(w2, bits=8, group_size=32)
    torch.testing.assert_close(s2[:, 0], s1[:, 0] * 10)
    torch.testing.assert_close(s2[:, 1:], s1[:, 1:])


def test_finer_granularity_is_more_accurate():
    torch.manual_seed(0)
    w = torch.randn(64, 256) * torch.logspace(-2, 0, 256)  # columns with very different magnitudes
    errs = []
    for kw in ({}, {"per_channel": True}, {"group_size": 128}, {"group_size": 32}):
        errs.append((fake_quantize(w, bits=4, **kw) - w).pow(2).mean().item())
    assert errs == sorted(errs, reverse=True)


def test_bad_arguments_raise_config_error():
    w = torch.randn(4, 8)
    with pytest.raises(ConfigError, match="group_size"):
        compute_qparams(w, group_size=0)
    s, z = compute_qparams(w, group_size=4)
    with pytest.raises(ConfigError, match="group_size"):
        quantize(w, s, z, group_size=8)
    with pytest.raises(ConfigError, match="NaN"):
        compute_qparams(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ConfigError, match="range"):
        pack_int4(torch.tensor([8], dtype=torch.int8))


def test_pack_int4_order_and_round_trip():
    q = torch.tensor([[1, -1, -8, 7]], dtype=torch.int8)
    packed = pack_int4(q)
    # element 0 in the high nibble: 1 -> 0x1, -1 -> 0xF => 0x1F; -8 -> 0x8, 7 -> 0x7 => 0x87
    assert packed.dtype == torch.uint8 and packed.tolist() == [[0x1F, 0x87]]
    assert torch.equal(unpack_int4(packed), q)
    all_vals = torch.arange(-8, 8, dtype=torch.int8)
    grid = torch.cartesian_prod(all_vals, all_vals).to(torch.int8).reshape(16, 32)
    assert torch.equal(unpack_int4(pack_int4(grid)), grid)
    odd = torch.randint(-8, 8, (3, 5), dtype=torch.int8)
    assert pack_int4(odd).shape == (3, 3)
    assert torch.equal(unpack_int4(pack_int4(odd), 5), odd)


# ---------------------------------------------------------------------------------------------- properties

_values = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_subnormal=False, width=32)


@st.composite
def _weights(draw):
    rows = draw(st.integers(1, 4))
    cols = draw(st.integers(1, 40))
    vals = draw(st.lists(_values, min_size=rows * cols, max_size=rows * cols))
    scale = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    return torch.tensor(vals, dtype=torch.float32).reshape(rows, cols) * scale


_configs = st.tuples(
    st.sampled_from([4, 8]),
    st.booleans(),
    st.sampled_from([None, "channel", 4, 16, 32]),
)


def _qparams(w, bits, symmetric, gran):
    group_size = gran if isinstance(gran, int) else None
    s, z = compute_qparams(w, bits=bits, symmetric=symmetric, group_size=group_size, per_channel=gran == "channel")
    return s, z, group_size


def _per_element(t, w, group_size):
    """Broadcast a (O, n_groups)/(O, 1)/() tensor to w's shape."""
    if group_size is None:
        return t.expand_as(w) if t.dim() else t.expand(w.shape)
    return t.repeat_interleave(group_size, dim=1)[:, : w.shape[1]]


@settings(max_examples=60, deadline=None)
@given(w=_weights(), cfg=_configs)
def test_round_trip_error_at_most_half_scale(w, cfg):
    bits, symmetric, gran = cfg
    s, z, g = _qparams(w, bits, symmetric, gran)
    q = quantize(w, s, z, bits=bits, group_size=g)
    qmin, qmax = qrange(bits)
    assert q.dtype == torch.int8 and int(q.min()) >= qmin and int(q.max()) <= qmax
    err = (dequantize(q, s, z, group_size=g) - w).abs()
    s_el = _per_element(s, w, g)
    # S/2 from rounding, plus float32 rounding in r/S and (q - Z) * S (a few ulps of up to 255 * S)
    assert (err <= s_el * (0.5 + 1e-4)).all()


@settings(max_examples=40, deadline=None)
@given(w=_weights(), cfg=_configs)
def test_fake_quantize_idempotent(w, cfg):
    bits, symmetric, gran = cfg
    g = gran if isinstance(gran, int) else None
    kw = dict(bits=bits, symmetric=symmetric, group_size=g, per_channel=gran == "channel")
    once = fake_quantize(w, **kw)
    assert once.shape == w.shape and once.dtype == w.dtype
    s, z, _ = _qparams(w, bits, symmetric, gran)
    tol = _per_element(s, w, g) * 1e-4
    # Values already on the grid stay on it: quantizing them again with the same (S, Z) changes nothing.
    again = dequantize(quantize(once, s, z, bits=bits, group_size=g), s, z, group_size=g)
    assert ((again - once).abs() <= tol).all()
    if symmetric:
        # Symmetric only: max|fq(w)| = q_max * S, so recomputing S from fq(w) gives S back. (Asymmetric min/max
        # of fq(w) can move, e.g. w = [9.999, -9.999], so recomputed parameters are not idempotent there.)
        twice = fake_quantize(once, **kw)
        assert ((twice - once).abs() <= tol).all()


def test_fake_quantize_keeps_dtype_and_has_no_grad():
    w = torch.randn(8, 64, dtype=torch.bfloat16, requires_grad=True)
    out = fake_quantize(w, bits=4, group_size=32)
    assert out.dtype == torch.bfloat16 and not out.requires_grad
