"""The small dtype vocabulary shared by the front end, the reference interpreter and codegen."""

from __future__ import annotations

import torch

STORAGE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "q8": torch.uint8,
           "q4": torch.uint8, "q4minmax": torch.uint8}  # quantized: the codes
PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
LOW_PRECISION = (torch.bfloat16, torch.float16)  # parameter dtypes a float32 master copy serves

# Unit roundoff of each storage dtype: half the distance between 1 and the next number.
UNIT_ROUNDOFF = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-11,
}


def storage_dtype(name: str, param_dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype a state declared with ``dtype=name`` is stored in. "fp32" means full precision:
    the states of float64 parameters are float64, as torch.optim keeps them."""
    if name == "fp32" and param_dtype == torch.float64:
        return torch.float64
    return STORAGE[name]

