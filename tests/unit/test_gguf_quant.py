"""effine's Q8_0 / Q4_0 (affine quantization with Z = 0, 32 weights per scale) are byte-identical to GGML's, as
the gguf package's reference quantizer (gguf.quants, "bit-exact with ggml-quants.c") computes them."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import quants
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from effine.export.gguf_quant import BLOCK_BYTES, dequantize_blocks, q4_0_qparams, q8_0_qparams, quantize_blocks

_QT = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}


@st.composite
def weights(draw):
    rows = draw(st.integers(1, 4))
    blocks = draw(st.integers(1, 3))
    scale = draw(st.sampled_from([1e-6, 1e-2, 1.0, 300.0]))
    x = draw(arrays(np.float32, (rows, 32 * blocks),
                    elements=st.floats(-1.0, 1.0, width=32, allow_nan=False, allow_infinity=False,
                                              allow_subnormal=False)))
    # Hypothesis' floats favour edge values (0, +-1, ties between +m and -m): exactly what the layout must get right.
    # Values near the float32 underflow are flushed: a block max of ~1e-40 makes 1/scale infinite, and casting
    # inf to int8 is undefined behaviour in C and numpy alike (no weight is that small).
    x = x * np.float32(scale)
    return np.where(np.abs(x) < 1e-30, np.float32(0), x).astype(np.float32)


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
@settings(max_examples=60)
@given(x=weights())
def test_blocks_are_bit_identical_to_ggml(kind, x):
    ref = quants.quantize(x, _QT[kind])
    mine = quantize_blocks(torch.from_numpy(x), kind)
    assert mine.dtype == np.uint8 and mine.shape == ref.shape
    assert np.array_equal(mine, ref)
    assert np.array_equal(dequantize_blocks(mine, kind, x.shape).numpy(), quants.dequantize(ref, _QT[kind]))


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_random_normal_weights_and_zero_block(kind):
    x = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
    x[3, 32:64] = 0.0  # an all-zero block: GGML stores scale 0
    mine = quantize_blocks(torch.from_numpy(x), kind)
    assert np.array_equal(mine, quants.quantize(x, _QT[kind]))
    assert mine.shape == (64, 256 // 32 * BLOCK_BYTES[kind])


def test_it_is_the_affine_map_with_zero_point_0():
    w = torch.tensor([[0.5, -1.0, 0.25] + [0.0] * 29])
    s8, q8 = q8_0_qparams(w)
    assert s8.item() == pytest.approx(1.0 / 127) and q8[0, :3].tolist() == [64, -127, 32]  # 63.5 rounds away
    s4, q4 = q4_0_qparams(w)
    assert s4.item() == pytest.approx(1.0 / 8) and q4[0, :3].tolist() == [4, -8, 2]  # the extreme maps to -8
    assert torch.equal(q4.float() * s4, torch.tensor([[0.5, -1.0, 0.25] + [0.0] * 29]))


def test_refuses_rows_not_split_in_blocks():
    with pytest.raises(ValueError, match="divisible by 32"):
        quantize_blocks(torch.zeros(2, 33), "q8_0")
