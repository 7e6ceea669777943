"""Weight quantization: affine int8/int4, NF4/FP4 (QLoRA, bitsandbytes layout), quantized and QAT linears.

Linear quantization is the affine map ``r = (q - Z) * S`` with ``S = (r_max - r_min) / (q_max - q_min)``,
``Z = round(q_min - r_min / S)``, ``q_max = 2^(N-1) - 1``, ``q_min = -2^(N-1)`` (see :mod:`effine.quant.affine`).
"""

from effine.quant.affine import (
    compute_qparams,
    dequantize,
    fake_quantize,
    pack_int4,
    qrange,
    quantize,
    unpack_int4,
)
from effine.quant.linear import QUANT_METHODS, QuantLinear
from effine.quant.nf4 import (
    FP4_CODE,
    NF4_CODE,
    QuantState4bit,
    dequantize_nf4,
    dynamic_map_8bit,
    quantize_nf4,
)
from effine.quant.qat import FakeQuantLinear, ste_fake_quantize
from effine.quant.swap import (
    apply_qat,
    check_quant_settings,
    default_filter,
    load_ptq_state_dict,
    ptq_quantize_state_dict,
    quantize_model,
    skip_filter,
    unwrap_qat,
)

from effine.quant import affine as _affine
from effine.quant import swap as _swap

# The package's names are its modules' public names (each module lists its own in __all__).
__all__ = [*_affine.__all__, "NF4_CODE", "FP4_CODE", "QuantState4bit", "dynamic_map_8bit", "quantize_nf4",
           "dequantize_nf4", "QUANT_METHODS", "QuantLinear", "FakeQuantLinear", "ste_fake_quantize", *_swap.__all__]
