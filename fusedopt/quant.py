"""Blockwise quantized storage for optimizer states (8-bit and 4-bit), in plain torch.

A state tensor of ``n`` elements is cut into blocks of ``block`` consecutive elements (in flat,
row-major order; the last block may be partial). Each block keeps one scale and each element keeps
the index of the entry of a small sorted table of values in [-1, 1] (the *map*) that is nearest to
``x / scale``. Decoding is ``map[code] * scale``.

The scale of a block is its ``absmax`` (the largest magnitude in the block). Optimizer states keep
it in bfloat16, rounded *up* to the next bfloat16 value (:func:`bf16_ceil`), so ``|x| / scale`` never
exceeds 1 and each block's scale costs 2 bytes instead of 4; the price is a scale up to 2^-7 (0.8 %)
larger than the absmax, which moves each normalised value by less than one code step of the 8-bit
maps near 1. :func:`quantize_blockwise` can also keep the exact float32 absmax, as bitsandbytes and
torchao do (``scale_dtype=torch.float32``).

Formats (:data:`Q8`, :data:`Q4`; pick one by name with :func:`format_for`):

* ``q8``: blocks of 256, one code per byte. Both states use the dynamic-exponent map of
  bitsandbytes' ``create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)``: the signed map
  for the first moment (it has 0 and 1.0 but not -1.0; its most negative value is -0.99297), the
  unsigned map (0 to 1.0) for the second moment. Bytes per element and state: 1 + 2/256.
* ``q4``: blocks of 128, two codes per byte, as torchao's 4-bit AdamW: the first moment uses the
  signed dynamic map with 3 exponent bits (16 values, -0.8875 to 1.0), the second moment the linear
  map *without zero*, {k/16 : k = 1..16}. Bytes per element and state: 1/2 + 2/128.
  Packing: element ``2i`` goes in the low nibble of byte ``i``, element ``2i+1`` in the high nibble
  (torchao puts the first element in the high nibble, so packed bytes are not interchangeable).

Rounding: the code of ``y = float32(x / scale)`` is the nearest map value; the midpoints between
neighbouring map values are exact (taken in float64), and a ``y`` exactly on a midpoint takes the
lower code. An all-zero block has ``scale = 0``: every element gets the code nearest 0 (the code of
0 itself where the map has one; 1/16 for the q4 unsigned map) and decodes to exactly 0. A block
whose absmax exceeds the largest bfloat16 (3.39e38) keeps that largest value as its scale; its
extreme elements take the map's end codes.

Non-finite policy: :func:`quantize_blockwise` raises ``ValueError`` on NaN or +-Inf input
(including values that overflow float32 when a float64 tensor is converted) instead of producing
codes that decode to garbage. Optimizer states go through :func:`encode_state`, which the fused
kernels match bit for bit: a block holding a non-finite value stores scale NaN and the codes of 0,
so it decodes to NaN (the value propagates, as through a float32 state) and no code is garbage.

All math is float32 (``x`` may be any floating dtype; it is converted first). Maps are built
deterministically with torch on the CPU, in the same float32 steps as the reference libraries.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

from . import blocks

# ---- maps ----------------------------------------------------------------------------------------


@functools.cache
def _dynamic_values(signed: bool, max_exponent_bits: int, total_bits: int) -> tuple[float, ...]:
    # Exponent level i (i = 0 .. E-1) covers the decade [10^(i-E+1) / 10, 10^(i-E+1)): it holds the
    # midpoints of consecutive points of an even grid of [0.1, 1] (float32 linspace) scaled by that
    # decade's power of ten. Each higher level doubles the number of grid intervals; the unsigned map
    # spends the sign bit on one more doubling. 0 and 1.0 complete the table.
    fraction_bits = total_bits - 1 - max_exponent_bits
    if fraction_bits != 0:
        raise ValueError("only maps with total_bits == max_exponent_bits + 1 are supported")
    values: list[float] = [0.0, 1.0]
    for i in range(max_exponent_bits):
        intervals = 2 ** (i if signed else i + 1)
        grid = torch.linspace(0.1, 1.0, intervals + 1, dtype=torch.float32)
        mids = (grid[:-1] + grid[1:]) / 2.0
        level = (10.0 ** (i - (max_exponent_bits - 1))) * mids  # float32 product, as the references
        values += level.tolist()
        if signed:
            values += (-level).tolist()
    if len(values) != 2**total_bits:
        raise AssertionError(f"dynamic map has {len(values)} values, expected {2**total_bits}")
    return tuple(sorted(values))


def dynamic_map(signed: bool, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The dynamic-exponent map (bitsandbytes' ``create_dynamic_map``): sorted float32 values."""
    return torch.tensor(_dynamic_values(bool(signed), max_exponent_bits, total_bits), dtype=torch.float32)


def linear_map_4bit() -> torch.Tensor:
    """torchao's 4-bit map for the second moment: k/16 for k = 1..16 (zero is not representable)."""
    return torch.arange(1, 17, dtype=torch.float32) / 16


def signed_map_4bit() -> torch.Tensor:
    """torchao's 4-bit map for the first moment: the signed dynamic map with 3 exponent bits."""
    return dynamic_map(True, max_exponent_bits=3, total_bits=4)


# ---- formats -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QuantFormat:
    """A storage format: bits per code, block size, the maps (as tuples of float32 values) for
    signed states (first moment) and non-negative states (second moment), and the dtype of the
    per-block scales."""

    name: str
    bits: int
    block: int
    signed_map: tuple[float, ...] = dataclasses.field(repr=False)
    unsigned_map: tuple[float, ...] = dataclasses.field(repr=False)
    scale_dtype: torch.dtype = torch.bfloat16

    def code(self, signed: bool) -> torch.Tensor:
        """The map for a signed or a non-negative state, as a float32 CPU tensor."""
        return torch.tensor(self.signed_map if signed else self.unsigned_map, dtype=torch.float32)


Q8 = QuantFormat("q8", 8, 256, tuple(dynamic_map(True).tolist()), tuple(dynamic_map(False).tolist()))
Q4 = QuantFormat("q4", 4, 128, tuple(signed_map_4bit().tolist()), tuple(linear_map_4bit().tolist()))
FORMATS = {f.name: f for f in (Q8, Q4)}


def format_for(name: str | QuantFormat) -> QuantFormat:
    """The format called ``name`` ("q8" or "q4"); a QuantFormat is returned unchanged."""
    if isinstance(name, QuantFormat):
        return name
    if name not in FORMATS:
        raise ValueError(f"unknown quantized storage {name!r}; use 'q8' or 'q4'")
    return FORMATS[name]


def state_bytes(numel: int, fmt: str | QuantFormat) -> int:
    """Bytes that one state of ``numel`` elements takes in ``fmt``: codes plus per-block scales."""
    fmt = format_for(fmt)
    code_bytes = numel if fmt.bits == 8 else (numel + 1) // 2
    return code_bytes + fmt.scale_dtype.itemsize * math.ceil(numel / fmt.block)


# ---- quantize / dequantize -----------------------------------------------------------------------


def _check_code(code: torch.Tensor) -> None:
    if code.ndim != 1 or not 2 <= code.numel() <= 256 or not code.is_floating_point():
        raise ValueError(f"a map is a 1-D float tensor of 2 to 256 values, got {tuple(code.shape)} {code.dtype}")
    if not bool((code[1:] > code[:-1]).all()):
        raise ValueError("a map must be sorted strictly increasing")


def _check_block(block: int) -> None:
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive int, got {block!r}")


def midpoints(code: torch.Tensor) -> torch.Tensor:
    """The float64 midpoints between neighbouring values of a map (exact: float32 values, halved
    sums in float64). A value rounds to the code whose index is the count of midpoints below it."""
    c64 = code.to(torch.float64)
    return (c64[:-1] + c64[1:]) / 2


def midpoints_below_f32(code: torch.Tensor) -> torch.Tensor:
    """Each of :func:`midpoints` rounded down to float32. For a float32 ``y``, ``mid < y`` holds
    exactly when ``mid32 < y`` does (no float32 lies in ``(mid32, mid]``), so the kernels find the
    same codes comparing in float32."""
    mids = midpoints(code)
    m32 = mids.to(torch.float32)
    below = torch.nextafter(m32, torch.full_like(m32, -math.inf))
    return torch.where(m32.to(torch.float64) > mids, below, m32)


# the largest finite bfloat16, as float32 bits: scales are clamped to it (see bf16_ceil)
_BF16_MAX_BITS = 0x7F7F0000
SCALE_DTYPES = (torch.float32, torch.bfloat16)


def bf16_ceil(x: torch.Tensor) -> torch.Tensor:
    """The smallest bfloat16 value >= each non-negative finite float32 of ``x`` (at most the largest
    finite bfloat16, 3.39e38), as bfloat16. Exact on the bits: the low 16 bits of the float32 are
    rounded up, so denormals and zero are handled as any other value. The kernels do the same."""
    bits = x.to(torch.float32).contiguous().view(torch.int32)
    bits = (torch.clamp(bits, max=_BF16_MAX_BITS) + 0xFFFF) & -0x10000
    return bits.view(torch.float32).to(torch.bfloat16)


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, block: int,
                       scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (uint8, flat, ``x.numel()`` of them) and per-block scales (ceil(n/block) of them): the
    exact absmax in float32, or with ``scale_dtype=torch.bfloat16`` the absmax rounded up to
    bfloat16 (:func:`bf16_ceil`).

    Raises ValueError if ``x`` has a NaN or an infinity (see the module docstring)."""
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be torch.float32 or torch.bfloat16, got {scale_dtype}")
    if not x.is_floating_point():
        raise TypeError(f"quantize_blockwise takes a floating tensor, got {x.dtype}")
    _check_code(code)
    flat = x.detach().reshape(-1).to(torch.float32)
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("cannot quantize a tensor with NaN or Inf values (or values beyond the float32 range)")
    return _nearest_codes(flat, code, block, scale_dtype)


def _nearest_codes(flat: torch.Tensor, code: torch.Tensor, block: int,
                   scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_blockwise without its checks (and so without host syncs: torch.compile traces it)."""
    _check_block(block)
    absmax = blocks.reduce_blocks(lambda b: b.abs().amax(dim=1), flat, block)
    scale = bf16_ceil(absmax) if scale_dtype == torch.bfloat16 else absmax
    wide = scale.to(torch.float32)
    # An all-zero block divides by 1 instead of 0: y is 0 there, so no 0/0.
    y = blocks.per_block(torch.div, flat, block, torch.where(wide > 0, wide, torch.ones_like(wide)))
    mids = midpoints(code.to(device=flat.device))
    # The number of midpoints strictly below y is the index of the nearest code; a y equal to a
    # midpoint counts it as not below, so ties go to the lower code.
    idx = torch.searchsorted(mids, y.to(torch.float64), right=False)
    return idx.to(torch.uint8), scale


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, block: int,
                         shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``code[codes] * absmax`` of each element's block (its scale, float32 or bfloat16), in float32,
    reshaped to ``shape``, cast to ``dtype``."""
    _check_code(code)
    n = math.prod(shape)
    if codes.numel() != n or absmax.numel() != math.ceil(n / block):
        raise ValueError(f"{codes.numel()} codes and {absmax.numel()} absmax values do not fit shape "
                         f"{tuple(shape)} in blocks of {block}")
    return _decode(codes, absmax, code, block, shape, dtype)


def _decode(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, block: int, shape,
            dtype: torch.dtype) -> torch.Tensor:
    """dequantize_blockwise without its checks."""
    values = code.to(device=codes.device, dtype=torch.float32)[codes.reshape(-1).long()]
    out = blocks.per_block(torch.mul, values, block, absmax.to(torch.float32))
    return out.reshape(shape).to(dtype)


# ---- 4-bit packing -------------------------------------------------------------------------------


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte, element 2i in the low nibble of byte i; ceil(n/2) bytes (an odd
    count leaves the last high nibble 0)."""
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() and int(flat.max()) > 15:
        raise ValueError("pack_nibbles takes codes in [0, 15]")
    return _pack(flat)


def _pack(flat: torch.Tensor) -> torch.Tensor:
    """pack_nibbles without its check."""
    even = flat.numel() - flat.numel() % 2
    packed = flat[0:even:2] | (flat[1:even:2] << 4)
    if even < flat.numel():  # an odd count: the last code alone (no padding: see fusedopt.blocks)
        packed = torch.cat([packed, flat[even:]])
    return packed


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` codes that :func:`pack_nibbles` packed into ``packed``."""
    if packed.numel() != (n + 1) // 2:
        raise ValueError(f"{n} codes take {(n + 1) // 2} bytes, got {packed.numel()}")
    flat = packed.reshape(-1)
    if n % 2 == 0:
        return torch.stack((flat & 15, flat >> 4), dim=1).reshape(-1)
    # an odd count: the last byte holds one code (no slice of a longer result: see fusedopt.blocks)
    return torch.cat([torch.stack((flat[:-1] & 15, flat[:-1] >> 4), dim=1).reshape(-1), flat[-1:] & 15])


# ---- dense converters (checkpoints) --------------------------------------------------------------


def from_dense(x: torch.Tensor, fmt: str | QuantFormat, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored codes (packed for 4-bit) and scales of the dense state ``x``."""
    fmt = format_for(fmt)
    codes, absmax = quantize_blockwise(x, fmt.code(signed), fmt.block, fmt.scale_dtype)
    return (pack_nibbles(codes) if fmt.bits == 4 else codes), absmax


def to_dense(codes: torch.Tensor, absmax: torch.Tensor, fmt: str | QuantFormat, signed: bool,
             shape) -> torch.Tensor:
    """The float32 state of ``shape`` that stored ``codes`` (packed for 4-bit) and scales (float32 or
    bfloat16) decode to."""
    fmt = format_for(fmt)
    shape = tuple(shape)
    if fmt.bits == 4:
        codes = unpack_nibbles(codes, math.prod(shape))
    return dequantize_blockwise(codes, absmax, fmt.code(signed), fmt.block, shape)


# ---- optimizer states (the policy the fused kernels share) ---------------------------------------


def codes_shape(shape, fmt: str | QuantFormat) -> tuple[int, ...]:
    """The shape of the stored codes of a state of ``shape``: the same shape for 8-bit codes, a flat
    run of ceil(n / 2) bytes for packed 4-bit ones."""
    fmt = format_for(fmt)
    return tuple(shape) if fmt.bits == 8 else (-(-math.prod(shape) // 2),)


def encode_state(x: torch.Tensor, fmt: str | QuantFormat, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored codes (uint8, :func:`codes_shape`; 4-bit codes packed) and scales (the format's
    ``scale_dtype``) of an optimizer state, as the kernels store them.

    Unlike :func:`quantize_blockwise` this never raises: a block holding a NaN or an infinity gets
    scale NaN and the codes of 0, so the whole block decodes to NaN. Non-finite values propagate,
    as they would through a float32 state, and never turn into finite garbage. A negative value
    under an unsigned map takes the code nearest 0 (0 under q8; 1/16 of the scale under q4, whose
    unsigned map has no zero).
    """
    fmt = format_for(fmt)
    flat = x.detach().reshape(-1).to(torch.float32)
    finite = blocks.reduce_blocks(lambda b: torch.isfinite(b).all(dim=1), flat, fmt.block)
    clean = blocks.per_block(lambda b, ok: torch.where(ok, b, torch.zeros_like(b)), flat, fmt.block, finite)
    codes, absmax = _nearest_codes(clean, fmt.code(signed).to(x.device), fmt.block, fmt.scale_dtype)
    codes = codes.to(torch.uint8)
    absmax = torch.where(finite, absmax, torch.full_like(absmax, float("nan")))
    if fmt.bits == 4:
        return _pack(codes), absmax
    return codes.reshape(x.shape), absmax


def decode_state(codes: torch.Tensor, absmax: torch.Tensor, fmt: str | QuantFormat, signed: bool,
                 shape=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense state that :func:`encode_state` codes stand for, of ``shape`` (default: the
    codes' own shape, right for 8-bit codes; 4-bit codes need it)."""
    fmt = format_for(fmt)
    shape = tuple(codes.shape if shape is None else shape)
    if fmt.bits == 4:
        codes = unpack_nibbles(codes, math.prod(shape))
    return _decode(codes, absmax, fmt.code(signed).to(codes.device), fmt.block, shape, dtype)
