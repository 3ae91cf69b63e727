"""Blockwise quantized state storage (fusedopt.quant): maps, nearest rounding, blocks, packing.

The round-trip bound is computed from the map: an element whose normalised value y = x/absmax lies
between the codes lo <= y <= hi may be off by (hi - lo)/2 * absmax (by hi - y below the first code),
plus a few float32 roundings. ``test_bound_catches_a_floor_quantizer`` shows the bound rejects a
quantizer that rounds down instead of to the nearest code.
"""

from __future__ import annotations

import hashlib
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from fusedopt import quant
from fusedopt.quant import Q4, Q8

FP32, FP64 = torch.float32, torch.float64
U = 2.0**-24  # float32 unit roundoff
TINIEST = 2.0**-149  # float32's smallest denormal

MAPS = {
    "q8-signed": (quant.dynamic_map(True), Q8.block),
    "q8-unsigned": (quant.dynamic_map(False), Q8.block),
    "q4-signed": (quant.signed_map_4bit(), Q4.block),
    "q4-unsigned": (quant.linear_map_4bit(), Q4.block),
}


def round_trip(x, code, block, scale_dtype=FP32):
    codes, absmax = quant.quantize_blockwise(x, code, block, scale_dtype)
    return codes, absmax, quant.dequantize_blockwise(codes, absmax, code, block, x.shape)


def block_absmax(x: torch.Tensor, block: int) -> torch.Tensor:
    x64 = x.reshape(-1).to(FP64)
    return torch.nn.functional.pad(x64.abs(), (0, -x64.numel() % block)).view(-1, block).amax(1)


def violations(x: torch.Tensor, deq: torch.Tensor, code: torch.Tensor, block: int,
               scale: torch.Tensor | None = None) -> int:
    """How many elements of ``deq`` are further from ``x`` than the nearest-code bound allows, for
    blocks scaled by their absmax or by the given per-block ``scale``."""
    x64 = x.reshape(-1).to(FP64)
    n = x64.numel()
    absmax = block_absmax(x, block) if scale is None else scale.to(FP64)
    a = absmax.repeat_interleave(block)[:n]
    y = torch.where(a > 0, x64 / torch.where(a > 0, a, 1.0), 0.0)
    c = code.to(FP64)
    hi_i = torch.searchsorted(c, y).clamp(max=c.numel() - 1)  # first code >= y
    lo_i = torch.searchsorted(c, y, right=True) - 1  # last code <= y
    half_gap = torch.where(lo_i >= 0, (c[hi_i] - c[lo_i.clamp(min=0)]) / 2, c[0] - y)
    bound = half_gap * a + 4 * U * a + TINIEST
    return int(((deq.reshape(-1).to(FP64) - x64).abs() > bound).sum())


# ---- maps ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MAPS)
def test_map_is_sorted_in_range_and_has_one(name):
    code, _ = MAPS[name]
    assert code.dtype == FP32 and code.ndim == 1
    assert code.numel() == (256 if name.startswith("q8") else 16)
    assert bool((code[1:] > code[:-1]).all())
    assert code[-1].item() == 1.0
    lowest = -1.0 if name.endswith("-signed") else 0.0
    assert code[0].item() >= lowest and (code[0].item() < 0) == name.endswith("-signed")
    # every map but torchao's 4-bit linear one holds an exact 0; none holds -1
    assert (0.0 in code.tolist()) == (name != "q4-unsigned")
    assert -1.0 not in code.tolist()


def test_dynamic_map_8bit_pinned_values():
    # By hand from the construction: level i scales the midpoints of linspace(0.1, 1, 2^i + 1)
    # (signed) or linspace(0.1, 1, 2^(i+1) + 1) (unsigned) by 10^(i-6).
    s, u = quant.dynamic_map(True).tolist(), quant.dynamic_map(False).tolist()
    def approx(v):  # float32 linspace rounding
        return pytest.approx(v, rel=1e-6)

    assert s[127] == 0.0 and s[255] == 1.0
    assert s[128] == approx(0.55e-6) and s[126] == approx(-0.55e-6)  # level 0: one midpoint, 0.55
    assert s[129] == approx(0.325e-5) and s[130] == approx(0.775e-5)  # level 1: 0.325, 0.775
    assert s[254] == approx(1 - 0.45 / 64) and s[0] == approx(-(1 - 0.45 / 64))  # 0.99296875
    assert u[0] == 0.0 and u[255] == 1.0
    assert u[1] == approx(0.325e-6) and u[2] == approx(0.775e-6)
    assert u[254] == approx(1 - 0.45 / 128)  # 0.996484375
    # values per decade: 2, 4, 8, ..., 128 (both signs) from [1e-7, 1e-6) up to [0.1, 1)
    mags = torch.tensor(s).abs()
    counts = [int(((mags >= 10.0 ** (k - 7)) & (mags < 10.0 ** (k - 6))).sum()) for k in range(7)]
    assert counts == [2, 4, 8, 16, 32, 64, 128]


def test_4bit_maps_pinned_values():
    pos = [0.0055, 0.0325, 0.0775, 0.2125, 0.4375, 0.6625, 0.8875]
    expected = [-v for v in reversed(pos)] + [0.0] + pos + [1.0]
    assert quant.signed_map_4bit().tolist() == pytest.approx(expected, rel=1e-6)
    assert quant.linear_map_4bit().tolist() == [k / 16 for k in range(1, 17)]


# sha256 (first 16 hex digits) of each map's float32 bytes. Checked equal, bit for bit, to
# bitsandbytes 0.50.2 create_dynamic_map(True/False) and torchao 0.18.0 (optim.subclass_8bit and
# subclass_4bit get_qmap_signed/get_qmap_unsigned) on torch 2.13 CPU.
MAP_DIGESTS = {"q8-signed": "e732639a65f497b4", "q8-unsigned": "305f002cc11278fb",
               "q4-signed": "721d11e3711326d4", "q4-unsigned": "0aeb670b8c9b6b0f"}


@pytest.mark.parametrize("name", MAPS)
def test_maps_are_bitwise_those_of_the_reference_libraries(name):
    code, _ = MAPS[name]
    assert hashlib.sha256(code.numpy().tobytes()).hexdigest()[:16] == MAP_DIGESTS[name]


def test_maps_are_deterministic_and_fresh():
    a = quant.dynamic_map(True)
    a[0] = 5.0  # a caller's tensor is its own: the next call is unaffected
    assert torch.equal(quant.dynamic_map(True), torch.tensor(Q8.signed_map, dtype=FP32))
    assert torch.equal(Q4.code(False), quant.linear_map_4bit())


# ---- round trips ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MAPS)
@pytest.mark.parametrize("scale_dtype", [FP32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1.0, 0.3, 1e-20, 7e25, 2.0**-130])
def test_every_code_value_round_trips_exactly(name, scale, scale_dtype):
    code, block = MAPS[name]
    if scale_dtype == torch.bfloat16:  # a scale that bfloat16 holds exactly
        scale = float(torch.tensor(scale).to(torch.bfloat16))
    reps = max(1, block // code.numel())
    x = (code * scale).repeat(reps)  # the map's 1.0 makes each block's absmax exactly `scale`
    codes, absmax, deq = round_trip(x, code, block, scale_dtype)
    if scale == 2.0**-130:  # denormal scale: products of the map's small values underflow
        assert torch.equal(deq, (code * scale).repeat(reps)) and int(codes.max()) == code.numel() - 1
        return
    assert torch.equal(codes.long(), torch.arange(code.numel()).repeat(reps))
    assert torch.equal(absmax, torch.full_like(absmax, float(torch.tensor(scale, dtype=FP32))))
    assert torch.equal(deq, x)


def sizes(block: int) -> tuple[int, ...]:
    return (1, 2, 7, block - 1, block, block + 1, 257, 509, 3 * block + 5)


KINDS = ("normal", "tiny", "huge", "zero_blocks", "wide")


@st.composite
def tensors(draw, block: int, signed: bool) -> torch.Tensor:
    n = draw(st.sampled_from(sizes(block)), label="n")
    kind = draw(st.sampled_from(KINDS), label="kind")
    dtype = draw(st.sampled_from([FP32, torch.bfloat16, torch.float16] if kind in ("normal", "zero_blocks")
                                 else [FP32]), label="dtype")
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1), label="seed"))
    x = torch.randn(n, generator=gen, dtype=FP64)
    if kind == "tiny":
        x = x * 1e-40  # float32 denormals
    elif kind == "huge":
        x = x * 1e30
    elif kind == "wide":  # magnitudes over many decades inside one block: exercises the small codes
        x = x * torch.exp(torch.randn(n, generator=gen, dtype=FP64) * 6)
    elif kind == "zero_blocks":
        keep = torch.rand(math.ceil(n / block), generator=gen) < 0.5
        x = x * keep.repeat_interleave(block)[:n]
    x = x if signed else x.abs()
    return x.to(FP32).to(dtype)


@pytest.mark.parametrize("name", MAPS)
@pytest.mark.parametrize("scale_dtype", [FP32, torch.bfloat16])
@given(data=st.data())
@settings(max_examples=40)
def test_round_trip_error_is_within_half_the_code_gap(name, scale_dtype, data):
    code, block = MAPS[name]
    x = data.draw(tensors(block, signed=name.endswith("-signed")), label="x")
    codes, scale, deq = round_trip(x, code, block, scale_dtype)
    assert codes.dtype == torch.uint8 and codes.shape == (x.numel(),)
    assert scale.dtype == scale_dtype and scale.shape == (math.ceil(x.numel() / block),)
    assert deq.shape == x.shape and deq.dtype == FP32
    absmax = block_absmax(x.to(FP32), block)
    if scale_dtype == FP32:  # the exact absmax
        assert torch.equal(scale.to(FP64), absmax)
    else:  # the absmax rounded up by one bfloat16 step at most: 2^-7 relative, 2^-133 among denormals
        wide = scale.to(FP64)
        assert bool((wide >= absmax).all())
        assert bool((wide <= torch.maximum(absmax * (1 + 2.0**-7), absmax + 2.0**-133)).all())
    assert violations(x, deq, code, block, scale) == 0
    assert not (deq * x.to(FP32) < 0).any()  # nearest rounding never flips a sign (bnb's sign guard)


def floor_quantize(x, code, block):
    """A wrong quantizer: the largest code <= x/absmax instead of the nearest one."""
    flat = x.reshape(-1).to(FP32)
    xb = torch.nn.functional.pad(flat, (0, -flat.numel() % block)).view(-1, block)
    absmax = xb.abs().amax(1)
    y = (xb / absmax.clamp(min=1e-38)[:, None]).reshape(-1)[: flat.numel()]
    idx = (torch.searchsorted(code, y, right=True) - 1).clamp(min=0)
    return idx.to(torch.uint8), absmax


@pytest.mark.parametrize("name", MAPS)
def test_bound_catches_a_floor_quantizer(name):
    code, block = MAPS[name]
    x = torch.randn(3 * block + 5, generator=torch.Generator().manual_seed(0))
    x = x if name.endswith("-signed") else x.abs()
    codes, absmax = floor_quantize(x, code, block)
    wrong = quant.dequantize_blockwise(codes, absmax, code, block, x.shape)
    assert violations(x, wrong, code, block) > x.numel() // 10
    assert violations(x, round_trip(x, code, block)[2], code, block) == 0


def _float32_neighbours(values: torch.Tensor, steps: int = 3) -> torch.Tensor:
    """Every float32 within ``steps`` representable values of each of ``values`` (float64)."""
    out = [values.to(FP32)]
    for direction in (math.inf, -math.inf):
        x = values.to(FP32)
        for _ in range(steps):
            x = torch.nextafter(x, torch.full_like(x, direction))
            out.append(x)
    return torch.cat(out)


@pytest.mark.parametrize("name", MAPS)
def test_float32_midpoints_rounded_down_compare_like_the_exact_ones(name):
    # the kernels compare float32 values with the midpoints rounded down to float32
    code, _ = MAPS[name]
    exact, low = quant.midpoints(code), quant.midpoints_below_f32(code)
    assert low.dtype == FP32 and bool((low.to(FP64) <= exact).all())
    uniform = torch.rand(10_000, generator=torch.Generator().manual_seed(1)) * 2 - 1
    y = torch.cat([_float32_neighbours(exact), uniform])
    assert torch.equal(low[None, :] < y[:, None], exact[None, :] < y.to(FP64)[:, None])


def test_float32_midpoints_rounded_to_nearest_would_move_codes():
    # what the comparison above guards against: some midpoint is not a float32, and rounding it to
    # nearest instead of down changes the code of a float32 next to it
    code = quant.dynamic_map(False)
    exact, nearest = quant.midpoints(code), quant.midpoints(code).to(FP32)
    y = _float32_neighbours(exact)
    assert not torch.equal(nearest[None, :] < y[:, None], exact[None, :] < y.to(FP64)[:, None])


def test_ties_go_to_the_lower_code():
    code = torch.tensor([0.0, 0.5, 1.0])
    x = torch.tensor([1.0, 0.25, 0.75, 0.2500001, 0.7499999])
    codes, _ = quant.quantize_blockwise(x, code, 8)
    assert codes.tolist() == [2, 0, 1, 1, 1]


# ---- blocks and edge cases -----------------------------------------------------------------------

@pytest.mark.parametrize("fmt", [Q8, Q4])
def test_partial_last_block_has_its_own_absmax(fmt):
    n = 2 * fmt.block + 3
    x = torch.ones(n)
    x[: fmt.block] *= 4.0
    x[-3:] = torch.tensor([0.5, -0.25, 0.125])
    codes, absmax = quant.quantize_blockwise(x, fmt.code(True), fmt.block)
    assert absmax.tolist() == [4.0, 1.0, 0.5]
    deq = quant.dequantize_blockwise(codes, absmax, fmt.code(True), fmt.block, (n,))
    assert deq[-3].item() == 0.5 and deq[0].item() == 4.0  # each block's positive extreme is exact
    assert violations(x, deq, fmt.code(True), fmt.block) == 0


@pytest.mark.parametrize("name", ["q8-signed", "q4-signed"])
def test_negative_extreme_decodes_to_the_most_negative_code(name):
    # The signed maps stop short of -1 (-0.99297 for 8 bits, -0.8875 for 4 bits), as in the
    # reference libraries: a block whose extreme is negative loses that much of it.
    code, block = MAPS[name]
    x = torch.tensor([-2.0, 1.0, 0.5])
    codes, absmax, deq = round_trip(x, code, block)
    assert codes[0].item() == 0 and absmax.item() == 2.0
    assert deq[0].item() == 2.0 * code[0].item() > -2.0


@pytest.mark.parametrize("name", MAPS)
def test_all_zero_block_gives_zero_absmax_and_exact_zeros(name):
    code, block = MAPS[name]
    x = torch.zeros(2 * block + 1)
    x[block:2 * block] = torch.linspace(0.1, 1.0, block)  # only the middle block is non-zero
    codes, absmax, deq = round_trip(x, code, block)
    assert absmax[0].item() == 0.0 and absmax[2].item() == 0.0
    nearest_zero = int(code.abs().argmin())
    assert set(codes[:block].tolist()) | {codes[-1].item()} == {nearest_zero}
    assert torch.equal(deq[:block], torch.zeros(block)) and deq[-1].item() == 0.0
    assert not deq.isnan().any()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_raises(bad):
    x = torch.randn(300)
    x[17] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        quant.quantize_blockwise(x, Q8.code(True), 256)
    with pytest.raises(ValueError, match="NaN or Inf"):
        quant.from_dense(x, "q4", signed=False)


def test_float64_beyond_float32_range_raises():
    with pytest.raises(ValueError, match="float32 range"):
        quant.quantize_blockwise(torch.tensor([1.0, 1e300], dtype=FP64), Q8.code(True), 256)


def test_bad_arguments_raise():
    with pytest.raises(TypeError):
        quant.quantize_blockwise(torch.arange(4), Q8.code(True), 256)
    with pytest.raises(ValueError, match="sorted"):
        quant.quantize_blockwise(torch.ones(4), torch.tensor([0.0, 1.0, 0.5]), 2)
    with pytest.raises(ValueError, match="block"):
        quant.quantize_blockwise(torch.ones(4), Q8.code(True), 0)
    codes, absmax = quant.quantize_blockwise(torch.ones(10), Q8.code(True), 4)
    with pytest.raises(ValueError, match="do not fit"):
        quant.dequantize_blockwise(codes, absmax, Q8.code(True), 4, (11,))


# ---- packing, formats, bytes, converters ---------------------------------------------------------

@pytest.mark.parametrize("n", [0, 1, 2, 3, 127, 128, 129, 1001])
def test_pack_unpack_round_trip(n):
    codes = torch.randint(0, 16, (n,), generator=torch.Generator().manual_seed(n), dtype=torch.uint8)
    packed = quant.pack_nibbles(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 1) // 2
    assert torch.equal(quant.unpack_nibbles(packed, n), codes)


def test_pack_puts_the_first_code_in_the_low_nibble():
    assert quant.pack_nibbles(torch.tensor([1, 2, 15], dtype=torch.uint8)).tolist() == [0x21, 0x0F]
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        quant.pack_nibbles(torch.tensor([16], dtype=torch.uint8))
    with pytest.raises(ValueError, match="bytes"):
        quant.unpack_nibbles(torch.zeros(3, dtype=torch.uint8), 8)


def test_format_for():
    assert quant.format_for("q8") is Q8 and quant.format_for("q4") is Q4 and quant.format_for(Q4) is Q4
    assert (Q8.bits, Q8.block, Q4.bits, Q4.block) == (8, 256, 4, 128)
    with pytest.raises(ValueError, match=r"^unknown quantized storage 'q5'; use 'q8' or 'q4'$"):
        quant.format_for("q5")
    assert hash(Q8) != hash(Q4) and Q8 == quant.format_for("q8")


def test_state_bytes_per_element():
    numel = 1_235_814_400  # Llama-3.2-1B's parameter count, a multiple of 256
    assert quant.state_bytes(numel, "q8") / numel == 1 + 2 / 256 == 1.0078125
    assert quant.state_bytes(numel, Q4) / numel == 0.5 + 2 / 128 == 0.515625
    assert quant.state_bytes(257, "q8") == 257 + 4 and quant.state_bytes(129, "q4") == 65 + 4


@pytest.mark.parametrize("fmt", [Q8, Q4])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape", [(), (0,), (1,), (7, 37), (3, 2, 129)])
def test_dense_converters_round_trip_and_match_state_bytes(fmt, signed, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.bfloat16)
    x = x if signed else x.abs()
    codes, absmax = quant.from_dense(x, fmt.name, signed)
    assert absmax.dtype == torch.bfloat16
    assert codes.numel() + 2 * absmax.numel() == quant.state_bytes(x.numel(), fmt)
    dense = quant.to_dense(codes, absmax, fmt, signed, shape)
    assert dense.shape == shape and dense.dtype == FP32
    assert violations(x, dense, fmt.code(signed), fmt.block, absmax) == 0
    if not signed:  # a decoded non-negative state re-encodes to itself (signed: see the test above)
        assert torch.equal(quant.from_dense(dense, fmt, signed)[1], absmax)
        assert torch.equal(quant.to_dense(*quant.from_dense(dense, fmt, signed), fmt, signed, shape), dense)
