"""Triton helpers that generated kernels import by name (the window template, and any kernel whose
printed math calls one).

* :func:`to_bf16_rne`: float32 -> bfloat16 rounded to nearest even on the bits, as torch rounds (the
  CPU interpreter's own conversion truncates);
* :func:`to_bf16_sr`: float32 -> bfloat16 rounded stochastically with the bits of
  :func:`fusedopt.rounding.to_bf16_stochastic` (a hash of seed, step, element count and flat index);
* :func:`to_fp16_sr`: float32 -> float16 rounded stochastically with the bits of
  :func:`fusedopt.rounding.to_fp16_stochastic`;
* :func:`power`: ``base ** n`` in float64 by binary exponentiation (within a few float64 ulps of the
  host's ``base ** n``), for an int64 ``n >= 0`` known only at run time;
* :func:`real_power`: ``base ** exponent`` for any real exponent known only at run time, with
  torch.pow's signs and special cases (the code printer calls it);
* :func:`load_float` / :func:`store_float`: a tensor whose dtype (0 fp32, 1 bf16, 2 fp16) is read from
  a table at run time, as float32 values (a uniform branch, so one kernel serves mixed-dtype groups);
* :func:`decode_minmax` / :func:`encode_minmax`: the min/max storage of :mod:`fusedopt.sparse`
  (4-bit codes two per byte, element ``2i`` in the high nibble, or 8-bit codes one per byte; a bf16
  min and max per ``QBLOCK`` elements) for the ``BLOCK`` elements from ``start``, ``QBLOCK`` a power of two dividing ``start``.
"""

from __future__ import annotations

import triton
import triton.language as tl

DTYPE_CODES = {"fp32": 0, "bf16": 1, "fp16": 2}


@triton.jit
def to_bf16_rne(x):
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    rounded = tl.where(x != x, 0x7FC0, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def mix32(h):
    """murmur3's 32-bit finalizer on uint32 values (fusedopt.rounding.mix32)."""
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def to_bf16_sr(x, seed, step, n, offs):
    """``x`` rounded up with probability equal to its distance past the bf16 below it: 16 random bits
    from (seed, step, n: the tensor's element count, offs: the flat index, x's own bits), as
    fusedopt.rounding, added below the 16 kept bits before truncating."""
    key = mix32(seed.to(tl.uint32) ^ mix32(step.to(tl.uint32) * 0x9E3779B9 + n.to(tl.uint32)))
    bits = x.to(tl.uint32, bitcast=True)
    noise = mix32(bits ^ mix32(offs.to(tl.uint32) ^ key)) & 0xFFFF
    rounded = tl.where(x != x, 0x7FC0, (bits + noise) >> 16)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def to_fp16_sr(x, seed, step, n, offs):
    """``x`` rounded stochastically to float16 with the bits of fusedopt.rounding.to_fp16_stochastic:
    |x| rounded toward zero (``lo``), then up by one float16 step when the fraction past ``lo``,
    scaled exactly to 16 bits, reaches 2**16 minus the noise."""
    key = mix32(seed.to(tl.uint32) ^ mix32(step.to(tl.uint32) * 0x9E3779B9 + n.to(tl.uint32)))
    bits = x.to(tl.uint32, bitcast=True)
    noise = (mix32(bits ^ mix32(offs.to(tl.uint32) ^ key)) & 0xFFFF).to(tl.float32)
    a = tl.abs(x)
    near = a.to(tl.float16)
    nb = near.to(tl.int16, bitcast=True).to(tl.int32)
    lo_bits = tl.where(near.to(tl.float32) > a, nb - 1, nb)
    lo = lo_bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    exponent = tl.maximum(lo_bits >> 10, 1)
    scale = ((168 - exponent) << 23).to(tl.float32, bitcast=True)
    up = (a - lo) * scale >= 65536.0 - noise
    out = lo_bits + up.to(tl.int32)
    out = tl.where((bits >> 31) != 0, out | 0x8000, out)
    out = tl.where(x != x, 0x7E00, out)
    return out.to(tl.uint16).to(tl.float16, bitcast=True)


@triton.jit
def power(base, n):
    result = tl.full([], 1.0, tl.float64)
    b = base
    e = n
    while e > 0:
        result = tl.where((e & 1) == 1, result * b, result)
        b = b * b
        e = e >> 1
    return result


@triton.jit
def load_float(base, offs, mask, dtype_code):
    if dtype_code == 0:
        x = tl.load(base.to(tl.pointer_type(tl.float32)) + offs, mask=mask, other=0.0)
    elif dtype_code == 1:
        x = tl.load(base.to(tl.pointer_type(tl.bfloat16)) + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        x = tl.load(base.to(tl.pointer_type(tl.float16)) + offs, mask=mask, other=0.0).to(tl.float32)
    return x


@triton.jit
def store_float(base, offs, x, mask, dtype_code):
    if dtype_code == 0:
        tl.store(base.to(tl.pointer_type(tl.float32)) + offs, x, mask=mask)
    elif dtype_code == 1:
        tl.store(base.to(tl.pointer_type(tl.bfloat16)) + offs, to_bf16_rne(x), mask=mask)
    else:
        tl.store(base.to(tl.pointer_type(tl.float16)) + offs, x.to(tl.float16), mask=mask)


@triton.jit
def decode_minmax(codes, lo_ptr, hi_ptr, start, size, BLOCK: tl.constexpr, QBLOCK: tl.constexpr,
                  BITS: tl.constexpr):
    """``code * (hi - lo) / (2^BITS - 1) + lo`` per element (float32 [BLOCK]); lanes past ``size`` are junk."""
    qlane = tl.arange(0, BLOCK // QBLOCK)
    if BITS == 4:
        half = tl.arange(0, BLOCK // 2)
        packed = tl.load(codes + start // 2 + half, mask=2 * half < size, other=0).to(tl.int32)
        code = tl.interleave(packed >> 4, packed & 15).to(tl.float32)
    else:
        lane = tl.arange(0, BLOCK)
        code = tl.load(codes + start + lane, mask=lane < size, other=0).to(tl.float32)
    qvalid = qlane * QBLOCK < size
    lo = tl.load(lo_ptr + start // QBLOCK + qlane, mask=qvalid, other=0.0).to(tl.float32)
    hi = tl.load(hi_ptr + start // QBLOCK + qlane, mask=qvalid, other=0.0).to(tl.float32)
    unit = tl.div_rn(hi - lo, (15.0 if BITS == 4 else 255.0))
    return tl.reshape(tl.reshape(code, [BLOCK // QBLOCK, QBLOCK]) * unit[:, None] + lo[:, None], [BLOCK])


@triton.jit
def encode_minmax(r, valid, codes, lo_ptr, hi_ptr, start, size, BLOCK: tl.constexpr, QBLOCK: tl.constexpr,
                  BITS: tl.constexpr):
    """Store ``r`` (float32 [BLOCK], lanes where ``valid``): per quantization block its min and max
    rounded to bf16 (NaN for both if it holds a NaN, as torch.amin), then clamped codes of BITS bits."""
    qlane = tl.arange(0, BLOCK // QBLOCK)
    qvalid = qlane * QBLOCK < size
    r2 = tl.reshape(r, [BLOCK // QBLOCK, QBLOCK])
    valid2 = tl.reshape(valid, [BLOCK // QBLOCK, QBLOCK])
    lo = tl.min(tl.where(valid2, r2, float("inf")), axis=1)
    hi = tl.max(tl.where(valid2, r2, float("-inf")), axis=1)
    has_nan = tl.max(((r2 != r2) & valid2).to(tl.int32), axis=1) > 0
    lo = to_bf16_rne(tl.where(has_nan, float("nan"), lo))
    hi = to_bf16_rne(tl.where(has_nan, float("nan"), hi))
    tl.store(lo_ptr + start // QBLOCK + qlane, lo, mask=qvalid)
    tl.store(hi_ptr + start // QBLOCK + qlane, hi, mask=qvalid)
    lo32 = lo.to(tl.float32)
    unit = tl.div_rn(hi.to(tl.float32) - lo32, (15.0 if BITS == 4 else 255.0))
    safe = tl.where(unit > 0.0, unit, 1.0)
    q = tl.floor(tl.div_rn(r2 - lo32[:, None], safe[:, None]) + 0.5)
    q = tl.where((unit[:, None] > 0.0) & (tl.abs(q) < float("inf")), q, 0.0)
    q = tl.minimum(tl.maximum(q, 0.0), (15.0 if BITS == 4 else 255.0))
    q = tl.where(valid, tl.reshape(q, [BLOCK]), 0.0).to(tl.int32)
    if BITS == 4:
        half = tl.arange(0, BLOCK // 2)
        even, odd = tl.split(tl.reshape(q, [BLOCK // 2, 2]))
        tl.store(codes + start // 2 + half, (even * 16 + odd).to(tl.uint8), mask=2 * half < size)
    else:
        tl.store(codes + start + tl.arange(0, BLOCK), q.to(tl.uint8), mask=valid)


@triton.jit
def real_power(base, exponent):
    """``base ** exponent`` with torch.pow's real cases, as ``2 ** (exponent * log2|base|)``: a
    negative base (-0.0 included) takes the sign of an odd whole exponent, and a finite one gives NaN
    for a fractional exponent; ``x ** 0``, ``1 ** x`` and ``(-1) ** +-inf`` are 1."""
    magnitude = tl.exp2(exponent * tl.log2(tl.abs(base)))
    half = exponent * 0.5
    whole = exponent == tl.floor(exponent)
    odd = whole & (half != tl.floor(half))  # conditions on the exponent alone, and on the base alone,
    negative = (base < 0) | ((base == 0) & (1.0 / base < 0))  # meet only through where
    signed = tl.where(negative, tl.where(odd, -magnitude, magnitude), magnitude)
    fractional = tl.where(base == float("-inf"), magnitude, float("nan"))
    out = tl.where(base < 0, tl.where(whole, signed, fractional), signed)
    out = tl.where(base == -1, tl.where(tl.abs(exponent) == float("inf"), 1.0, out), out)
    out = tl.where(base == 1, 1.0, out)
    return tl.where(exponent == 0, 1.0, out)
