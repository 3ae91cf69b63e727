"""Stochastic rounding of float32 values to bfloat16 and float16, reproducible bit for bit on every
backend.

A value is rounded up (away from zero) with probability equal to the fraction of a step of the target
dtype that it lies past the representable value below it, so the rounding is unbiased:
E[round(x)] = x (float16 subnormals: within 2**-16 of a step, see :func:`to_fp16_stochastic`). The
random 16 bits
come from a counter-based integer hash (murmur3's 32-bit finalizer) of the seed, the step, the
tensor's element count, the element's flat index and the float32 bits being rounded (without them,
same-sized tensors, such as the layers of a transformer, would share one noise pattern per step and
round in step with each other; for a given value the bits still vary with the seed and the step, so
the rounding stays unbiased), so a step is deterministic under a seed, no generator state is kept,
and the Triton kernels (``codegen.jit_helpers.to_bf16_sr`` and ``to_fp16_sr``) compute the same bits
as this torch version. NaN stays NaN; a value within a step of the largest finite value may round to
infinity.
"""

from __future__ import annotations

import torch

_MASK = 0xFFFFFFFF
STOCHASTIC_DTYPES = (torch.bfloat16, torch.float16)  # the parameter dtypes to_stochastic writes


def _mul32(h: torch.Tensor | int, c: int):
    """(h * c) mod 2**32 without int64 overflow (h < 2**32)."""
    return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & _MASK


def mix32(h):
    """murmur3's finalizer: a bijection of 32-bit integers that spreads every input bit."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def stream_key(seed: int | torch.Tensor, step: int | torch.Tensor, numel: int) -> int | torch.Tensor:
    """The per-(seed, step, tensor size) key that every element's random bits derive from (seed and
    step: Python ints or int64 tensors, as a compiled step reads them)."""
    return mix32((seed & _MASK) ^ mix32((_mul32(step & _MASK, 0x9E3779B9) + (numel & _MASK)) & _MASK))


def noise(x: torch.Tensor, seed: int | torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
    """The 16 random bits (int64) added below the kept bits of each element of ``x`` (float32): a
    hash of the stream key, the flat index and the value's own bits, so that tensors of the same size
    draw different bits at the same step."""
    flat = x.detach().reshape(-1).to(torch.float32)
    key = stream_key(seed, step, flat.numel())
    index = torch.arange(flat.numel(), dtype=torch.int64, device=x.device) & _MASK
    bits = flat.view(torch.int32).to(torch.int64) & _MASK
    return mix32(bits ^ mix32(index ^ key)) & 0xFFFF  # hashed apart: index ^ bits alone repeats on ramps


def to_bf16_stochastic(x: torch.Tensor, seed: int | torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
    """``x`` (float32) rounded stochastically to bfloat16, with the bits the fused kernels use."""
    flat = x.detach().reshape(-1).to(torch.float32)
    bits = flat.view(torch.int32).to(torch.int64) & _MASK
    rounded = ((bits + noise(flat, seed, step)) >> 16) & 0xFFFF
    rounded = torch.where(flat.isnan(), torch.full_like(rounded, 0x7FC0), rounded)
    as_int16 = torch.where(rounded >= 0x8000, rounded - 0x10000, rounded).to(torch.int16)
    return as_int16.view(torch.bfloat16).reshape(x.shape)


def to_fp16_stochastic(x: torch.Tensor, seed: int | torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
    """``x`` (float32) rounded stochastically to float16, with the bits the fused kernels use.

    ``lo`` is ``|x|`` rounded toward zero to float16 and ``s`` the float16 spacing above it (2**-24
    for subnormals; 32 above the largest finite value, so values within a step of it may round to
    infinity, as to nearest they do from 65520). ``|x|`` rounds up when ``(|x| - lo) * 2**16 / s``
    (exact: a difference within a factor of two and a power-of-two scale) reaches ``2**16 - noise``:
    with probability ``(|x| - lo) / s``, exactly for normal float16 values and for subnormal ones
    from ``2**-17`` up; below that the fraction is truncated to 16 bits, which biases the rounding
    toward zero by less than ``2**-16`` of a step (values under ``2**-40`` always round to zero)."""
    flat = x.detach().reshape(-1).to(torch.float32)
    a = flat.abs()
    near = a.to(torch.float16)
    nb = near.view(torch.int16).to(torch.int32)
    lo_bits = torch.where(near.float() > a, nb - 1, nb)  # toward zero (near > a >= 0 means nb >= 1)
    lo = lo_bits.to(torch.int16).view(torch.float16).float()
    exponent = torch.clamp(lo_bits >> 10, min=1)  # float16's biased exponent; subnormals space like 1
    scale = ((168 - exponent) << 23).view(torch.float32)  # 2**16 / spacing = 2**(41 - exponent)
    up = (a - lo) * scale >= 65536.0 - noise(flat, seed, step).to(torch.float32)
    out = lo_bits + up.to(torch.int32)
    out = torch.where(flat.view(torch.int32) < 0, out | 0x8000, out)
    out = torch.where(flat.isnan(), torch.full_like(out, 0x7E00), out)
    as_int16 = torch.where(out >= 0x8000, out - 0x10000, out).to(torch.int16)
    return as_int16.view(torch.float16).reshape(x.shape)


def bf16_nearest(x: torch.Tensor) -> torch.Tensor:
    """``x`` (float32) rounded to the nearest bfloat16 (ties to even), as ``x.to(torch.bfloat16)`` rounds,
    but computed on the bits and returned as float32. torch.compile's inductor drops a float32 ->
    bfloat16 -> float32 round trip inside a fused computation (it keeps the float32 value); a value
    that is already a bfloat16 survives that, so a step that rounds here and then reads the rounded
    value computes the same bits compiled and eager."""
    flat = x.to(torch.float32)
    bits = flat.view(torch.int32).to(torch.int64) & _MASK
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    as_int32 = torch.where(rounded >= 0x80000000, rounded - 0x100000000, rounded).to(torch.int32)
    return torch.where(flat.isnan(), flat, as_int32.view(torch.float32))


def to_stochastic(x: torch.Tensor, dtype: torch.dtype, seed: int | torch.Tensor,
                  step: int | torch.Tensor) -> torch.Tensor:
    """``x`` (float32) rounded stochastically to ``dtype`` (bfloat16 or float16)."""
    if dtype == torch.bfloat16:
        return to_bf16_stochastic(x, seed, step)
    if dtype == torch.float16:
        return to_fp16_stochastic(x, seed, step)
    raise ValueError(f"stochastic rounding writes bfloat16 or float16, not {dtype}")


