"""Stochastic rounding of bf16 parameter writes: unbiased, deterministic under a seed, the same bits
in the fused kernel and the reference, and what it buys (updates below half a bf16 step survive)."""

from __future__ import annotations

import math

import pytest
import torch

import fusedopt
from fusedopt import rounding
from kernel_check import KERNEL_DEVICES, require_kernel_device

BF16_STEP_AT_1 = 2.0**-7


def mean_error_in_sigmas(round_fn, x: torch.Tensor, draws: int) -> float:
    """|mean of round_fn over draws - x| in standard errors of a fair two-point rounding."""
    lo = x.to(torch.bfloat16).float()
    lo = torch.where(lo > x, lo - BF16_STEP_AT_1, lo)  # the bf16 value below x (x in [1, 2))
    frac = ((x - lo) / BF16_STEP_AT_1).double()
    total = torch.zeros_like(x, dtype=torch.float64)
    for k in range(draws):
        total += round_fn(x, k).double()
    mean = total / draws
    sigma = BF16_STEP_AT_1 * torch.sqrt(frac * (1 - frac) / draws).clamp_min(1e-12)
    return float(((mean - x.double()).abs() / sigma).max())


def test_rounding_is_unbiased():
    x = 1.0 + torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9]) * BF16_STEP_AT_1
    err = mean_error_in_sigmas(lambda v, k: rounding.to_bf16_stochastic(v, seed=7, step=k + 1).float(), x, 4000)
    assert err < 5.0


def test_a_biased_rounding_is_caught():
    """The check above can fail: 15 random bits instead of 16 round up half as often as they should."""
    def biased(v, k):
        bits = v.view(torch.int32).long()
        noise = rounding.noise(v, 7, k + 1) & 0x7FFF
        return ((bits + noise) >> 16 << 16).to(torch.int32).view(torch.float32)

    x = 1.0 + torch.tensor([0.25, 0.5, 0.75]) * BF16_STEP_AT_1
    assert mean_error_in_sigmas(biased, x, 4000) > 20.0


def test_same_sized_tensors_draw_independent_noise():
    """Two tensors of one size (two layers of a model) do not share a noise pattern at a step: their
    16-bit draws are uncorrelated, where a hash of the index alone would make them equal."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(4096, generator=gen), torch.randn(4096, generator=gen)
    na, nb = rounding.noise(a, 3, 5).double(), rounding.noise(b, 3, 5).double()
    assert not torch.equal(na, nb)
    corr = float(torch.corrcoef(torch.stack([na, nb]))[0, 1])
    assert abs(corr) < 5 / math.sqrt(4096)
    assert float(na.mean()) == pytest.approx(2**15, rel=0.05)  # uniform on [0, 2**16)
    ramp = (0x3F800000 + torch.arange(4096, dtype=torch.int32)).view(torch.float32)  # consecutive floats from 1
    # 4096 uniform 16-bit draws hold about 3970 distinct values; were index and value bits to cancel: 1
    assert rounding.noise(ramp, 3, 5).unique().numel() > 3800


def test_rounding_is_deterministic_under_a_seed_and_exact_on_representable_values():
    x = torch.randn(1000)
    a, b = rounding.to_bf16_stochastic(x, 3, 5), rounding.to_bf16_stochastic(x, 3, 5)
    assert torch.equal(a, b)
    assert not torch.equal(a, rounding.to_bf16_stochastic(x, 4, 5))
    assert not torch.equal(a, rounding.to_bf16_stochastic(x, 3, 6))
    exact = x.to(torch.bfloat16)
    assert torch.equal(rounding.to_bf16_stochastic(exact.float(), 3, 5), exact)
    down, up = x.to(torch.bfloat16).float(), a.float()
    assert bool(((up - x).abs() < 2 * (x.abs() * 2.0**-8) + 1e-38).all())  # within one bf16 step
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0])
    out = rounding.to_bf16_stochastic(special, 1, 1).float()
    assert out[0].isnan() and out[1] == float("inf") and out[2] == -float("inf") and out[3] == 0 and out[4] == 0
    assert down.dtype == torch.float32


# float16: normal values (a step of 2**-10 at 1), subnormal ones (2**-24 everywhere below 2**-14),
# values under the smallest subnormal, and the largest finite value (65504, a step of 32 above it)
FP16_CASES = [(1.0, 2.0**-10), (1000.0, 0.5), (2.0**-20, 2.0**-24), (0.0, 2.0**-24), (65504.0, 32.0)]


@pytest.mark.parametrize("base, spacing", FP16_CASES)
def test_float16_rounding_is_unbiased(base, spacing):
    x = base + torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9]) * spacing
    total = torch.zeros(5, dtype=torch.float64)
    draws = 4000
    for k in range(draws):
        total += rounding.to_fp16_stochastic(x, 5, k + 1).double().clamp(max=65536.0)  # inf counts as 65536
    frac = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)
    sigma = spacing * torch.sqrt(frac * (1 - frac) / draws)
    err = float(((total / draws - x.double()).abs() / sigma).max())
    assert err < 5.0, err


def test_a_biased_float16_rounding_is_caught(monkeypatch):
    """The check above can fail: 15 random bits instead of 16 round up half as often as they should."""
    full = rounding.noise
    monkeypatch.setattr(rounding, "noise", lambda v, seed, step: full(v, seed, step) & 0x7FFF)
    with pytest.raises(AssertionError):
        test_float16_rounding_is_unbiased(1.0, 2.0**-10)


def test_float16_rounding_is_exact_on_representable_values_and_keeps_specials():
    x = torch.randn(10000).half()
    assert torch.equal(rounding.to_fp16_stochastic(x.float(), 3, 5), x)
    sub = torch.arange(-1023, 1024) * 2.0**-24
    assert torch.equal(rounding.to_fp16_stochastic(sub, 3, 5).float(), sub)
    y = torch.randn(10000) * 100
    a = rounding.to_fp16_stochastic(y, 3, 5)
    assert torch.equal(a, rounding.to_fp16_stochastic(y, 3, 5)) and not torch.equal(a, rounding.to_fp16_stochastic(y, 4, 5))
    lo = torch.where(y.half().float().abs() > y.abs(), torch.nextafter(y.half(), torch.zeros_like(y).half()), y.half())
    assert bool(((a == lo) | (a.float().abs() > lo.float().abs())).all())  # the value below or the one above
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e6, -1e6])
    out = rounding.to_fp16_stochastic(special, 1, 1)
    assert out[0].isnan() and out[1] == float("inf") and out[2] == -float("inf") and out[5] == float("inf")
    assert out[6] == -float("inf") and out[3].view(torch.int16) == 0 and out[4].view(torch.int16) == -32768


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_kernel_and_reference_round_to_the_same_bits(device, dtype):
    require_kernel_device(device)
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=gen).to(dtype) for s in [(1000,), (33, 7), (5,)]]
    a = [p.clone().to(device).requires_grad_() for p in base]
    b = [p.clone().requires_grad_() for p in base]
    kw = dict(lr=1e-3, momentum=0.9, stochastic_rounding=True, sr_seed=1234)
    oa, ob = fusedopt.SGD(a, backend="triton", **kw), fusedopt.SGD(b, backend="reference", **kw)
    for _ in range(4):
        for x, y in zip(a, b):
            g = torch.randn(x.shape, generator=gen).to(dtype)
            x.grad, y.grad = g.to(device), g.clone()
        oa.step()
        ob.step()
        for x, y in zip(a, b):
            assert torch.equal(x.detach().cpu(), y.detach())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_updates_below_half_a_step_survive_only_with_stochastic_rounding(dtype):
    """1000 steps of -1e-4 on ones (a step below 1 is 2**-8 in bf16, 2**-11 = 4.9e-4 in fp16):
    round-to-nearest never moves them; stochastic rounding brings their mean to 0.9 (within a
    statistical bound)."""
    results = {}
    for sr in (False, True):
        p = torch.ones(4096, dtype=dtype, requires_grad=True)
        opt = fusedopt.SGD([p], lr=1e-4, stochastic_rounding=sr, sr_seed=11, backend="reference")
        for _ in range(1000):
            p.grad = torch.ones_like(p)
            opt.step()
        results[sr] = p.detach().float()
    assert bool((results[False] == 1.0).all())
    # each element is a sum of ~1000 independent roundings of variance <= step^2/4
    assert abs(results[True].mean().item() - 0.9) < 5 * (2.0**-7 / 2) * math.sqrt(1000) / math.sqrt(4096) + 2**-8


def test_float32_parameters_ignore_the_flag_and_bad_settings_are_refused():
    p = torch.randn(50, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    oa = fusedopt.AdamW([p], stochastic_rounding=True)
    ob = fusedopt.AdamW([q])
    for _ in range(3):
        g = torch.randn(50)
        p.grad, q.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    assert torch.equal(p, q)
    with pytest.raises(ValueError, match="sr_seed"):
        fusedopt.AdamW([torch.zeros(2, requires_grad=True)], stochastic_rounding=True, sr_seed=-1)
    with pytest.raises(TypeError, match="stochastic_rounding"):
        fusedopt.AdamW([torch.zeros(2, requires_grad=True)], stochastic_rounding="yes")
    fusedopt.AdamW([torch.zeros(2, dtype=torch.float16, requires_grad=True)], stochastic_rounding=True)  # taken


def test_bf16_nearest_on_the_bits_is_torchs_rounding():
    """rounding.bf16_nearest equals ``x.to(torch.bfloat16)`` on every high half of the float32 bits,
    each with the low halves that decide a rounding (0, just under, at and just over the halfway
    point, the largest) and a random one: ties to even, carries into the exponent, overflow to
    infinity, subnormals, signed zeros, infinities and NaNs."""
    high = torch.arange(1 << 16, dtype=torch.int64) << 16
    low = torch.tensor([0, 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x3C5A], dtype=torch.int64)
    bits = (high[:, None] | low[None, :]).reshape(-1)
    x = torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32).view(torch.float32)
    got = rounding.bf16_nearest(x)
    want = x.to(torch.bfloat16).to(torch.float32)
    assert got.dtype == torch.float32
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got[~nan].view(torch.int32), want[~nan].view(torch.int32))
