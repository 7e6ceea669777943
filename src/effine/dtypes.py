"""The dtype names effine's config and files use, and their torch dtypes: the one table."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bf16"``; other dtypes as torch prints them."""
    return {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype))
