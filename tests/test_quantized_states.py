"""8-bit and 4-bit blockwise states (state_dtype="q8", "q4"): the fused kernel against the reference
(the same bits), trajectories against float32 AdamW, state bytes, checkpoints in compact and dense
form, and the non-finite policy."""

from __future__ import annotations

import copy
import functools
import itertools
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import fusedopt
from benchmarks import shapes as bench_shapes
from codegen import launch, ops, template
from fusedopt import quant, reference
from fusedopt.dsl import absolute, rule, state
from fusedopt.optimizers import adafactor as adafactor_rule
from kernel_check import KERNEL_DEVICES, any_kernel_device, require_kernel_device

RULES = {
    "adamw": (fusedopt.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    "adam-amsgrad": (fusedopt.Adam, dict(lr=1e-2, amsgrad=True)),
    "lion": (fusedopt.Lion, dict(lr=1e-3)),
    "sgd-momentum": (fusedopt.SGD, dict(lr=1e-2, momentum=0.9)),
}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.dtype in (torch.bfloat16, torch.float16) else \
        t.view(torch.int32) if t.dtype == torch.float32 else t


def assert_same_storage(sa: dict, sb: dict, what: str) -> None:
    """Kernel and reference states are the same bits: codes, scales, float states and step counters.
    The float32 reference does the kernels' operations in their order (grouped per-tensor factors,
    IEEE division and square root, the same quantizer), so for these elementwise rules any
    difference is a bug."""
    for key in sa:
        a, b = sa[key], sb[key]
        if a.dtype == torch.uint8:
            flips = int((a != b).sum())
            assert flips == 0, f"{what} {key}: {flips} of {a.numel()} codes differ (by up to {int((a.int() - b.int()).abs().max())})"
        else:
            assert torch.equal(_bits(a), _bits(b)), f"{what} {key}: {a[a != b][:3].tolist()} vs {b[a != b][:3].tolist()}"


def run_pair(name, shapes, steps, device, seed=0, threshold=0, fmt="q8"):
    cls, kwargs = RULES[name]
    gen = torch.Generator().manual_seed(seed)
    base = [torch.randn(s, generator=gen) for s in shapes]
    a = [p.clone().to(device).requires_grad_() for p in base]
    b = [p.clone().requires_grad_() for p in base]
    oa = cls(a, state_dtype=fmt, quant_threshold=threshold, backend="triton", **kwargs)
    ob = cls(b, state_dtype=fmt, quant_threshold=threshold, backend="reference", **kwargs)
    for step in range(steps):
        for x, y in zip(a, b):
            g = torch.randn(x.shape, generator=gen) * 10.0 ** float(torch.randint(-3, 3, (), generator=gen))
            x.grad, y.grad = g.to(device), g.clone()
        oa.step()
        ob.step()
        for x, y in zip(a, b):
            bad = _bits(x.detach().cpu()) != _bits(y.detach())
            assert not bool(bad.any()), (f"{name} step {step}: params {x.detach().cpu()[bad][:3].tolist()} vs "
                                         f"{y.detach()[bad][:3].tolist()}")
            assert_same_storage({k: v.cpu() for k, v in oa.state[x].items()}, ob.state[y], f"{name} step {step}")
    return a, b, oa, ob


SIZES = st.sampled_from([1, 7, 127, 128, 129, 255, 256, 257, 511, 600, 1024, 1500])


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@settings(deadline=None)
@given(name=st.sampled_from(sorted(RULES)), sizes=st.lists(SIZES, min_size=1, max_size=3),
       matrix=st.booleans(), steps=st.integers(1, 4), seed=st.integers(0, 2**16), fmt=st.sampled_from(["q8", "q4"]))
def test_fused_quantized_step_matches_the_reference(device, name, sizes, matrix, steps, seed, fmt):
    """AdamW, Adam with amsgrad, Lion and SGD with 8-bit or 4-bit states on float32 parameters: the
    kernel and the reference write the same parameters, codes and scales, bit for bit, every step."""
    require_kernel_device(device)
    shapes = [(n,) if not matrix or n < 4 else (n // 4, 4) if n % 4 == 0 else (n,) for n in sizes]
    run_pair(name, shapes, steps, device, seed=seed, fmt=fmt)


# A state that is set to the gradient itself: no arithmetic before quantizing, so codes and
# absmax must be bit-identical to fusedopt.quant on every backend. The non-negative state holds g * g,
# or |g| (``magnitude``: no rounding at all, so test values land exactly where they are put).
def _odd_layouts(gen: torch.Generator) -> list[torch.Tensor]:
    """Dense but not contiguous (a transpose, channels_last) and 0-d tensors."""
    return [torch.randn(90, 70, generator=gen).t(),
            torch.randn(4, 8, 6, 5, generator=gen).contiguous(memory_format=torch.channels_last),
            torch.randn((), generator=gen), torch.randn((), generator=gen)]


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("fmt", ["q8", "q4", "fp32"])
def test_non_contiguous_and_0d_parameters_step_as_contiguous_ones(device, fmt):
    """Codes and scales follow the elements' row-major order, whatever the parameter's strides: the
    fused step (which takes only contiguous quantized tensors), the reference on the same layouts and
    the reference on contiguous copies write the same bits, and the dense forms agree. (A kernel that
    indexed 4-bit codes by memory offset put a transposed tensor's moments on the wrong elements; the
    reference computed 0-d parameters in float64.)"""
    require_kernel_device(device)
    gen = torch.Generator().manual_seed(5)
    base = _odd_layouts(gen)
    runs = {"triton": [p.clone().to(device).requires_grad_() for p in base],
            "reference": [p.clone().requires_grad_() for p in base],
            "contiguous": [p.contiguous().reshape(p.shape or (1,)).requires_grad_() for p in base]}
    opts = {k: fusedopt.AdamW(ps, lr=1e-2, weight_decay=0.1, state_dtype=fmt, quant_threshold=0,
                              backend="triton" if k == "triton" else "reference") for k, ps in runs.items()}
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=gen) for p in base]
        for k, ps in runs.items():
            for p, g in zip(ps, grads):
                p.grad = torch.empty_like(p).copy_(g.reshape(p.shape)) if k != "contiguous" else g.reshape(p.shape)
            opts[k].step()
    for k in ("triton", "reference"):
        for p, q in zip(runs[k], runs["contiguous"]):
            assert torch.equal(_bits(p.detach().cpu().reshape(q.shape)), _bits(q.detach())), (k, tuple(p.shape))
        dense, expected = (opts[x].state_dict(dense=True)["state"] for x in (k, "contiguous"))
        for i in expected:
            for name in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(dense[i][name].cpu().reshape(-1), expected[i][name].reshape(-1)), (k, i, name)


@rule("declared_q8_q4")
def declared_q8_q4(p, g, t, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8):
    m = state("m", dtype="q8")
    v = state("v", dtype="q4", nonnegative=True)
    m.set(m + (1 - beta1) * (g - m))
    v.set(v + (1 - beta2) * (g * g - v))
    p.set(p - lr * m / ((v) ** 0.5 + eps))


@pytest.mark.parametrize("shape", [(), (1,)], ids=["0-d", "one-element"])
def test_states_a_rule_declares_quantized_work_on_one_element(shape):
    """A rule's own q8/q4 states quantize whatever the tensor's size; one element's codes (the same
    shape in both formats) are decoded, in the dense form and on load, as the rule declares them."""
    device = any_kernel_device()
    runs = {}
    for backend in ("reference", "triton"):
        p = torch.full(shape, 0.5).to(device if backend == "triton" else "cpu").requires_grad_()
        opt = fusedopt.FusedOptimizer([p], declared_q8_q4, backend=backend)
        for k in range(3):
            p.grad = torch.full(shape, (-1.0) ** k * (k + 1)).to(p.device)
            opt.step()
        runs[backend] = (p, opt)
    (p, opt), (q, fused) = runs["reference"], runs["triton"]
    assert torch.equal(_bits(q.detach().cpu()), _bits(p.detach()))
    st = opt.state[p]
    dense = opt.state_dict(dense=True)["state"][0]
    for name, fmt, signed in (("m", "q8", True), ("v", "q4", False)):
        assert st[name].dtype == torch.uint8
        want = quant.decode_state(st[name], st[name + "_absmax"], fmt, signed, shape=p.shape)
        assert torch.equal(dense[name], want), name
    again = fusedopt.FusedOptimizer([r := p.detach().clone().requires_grad_()], declared_q8_q4)
    again.load_state_dict(opt.state_dict())
    assert all(torch.equal(again.state[r][k], v) for k, v in st.items())
    again.load_state_dict(opt.state_dict(dense=True))  # re-encoded (a one-element scale rounds up to bf16)
    torch.testing.assert_close(again.state_dict(dense=True)["state"][0]["m"], dense["m"], rtol=2.0**-7, atol=0)


def _hold_gradient_rule(fmt: str, magnitude: bool = False):
    @rule(f"hold_{'magnitude' if magnitude else 'gradient'}_{fmt}")
    def hold_gradient(p, g, t, lr=0.1):
        m = state("m", dtype=fmt)
        v = state("v", dtype=fmt, nonnegative=True)
        m.set(g)
        v.set(absolute(g) if magnitude else g * g)
        p.set(p - lr * m)

    return hold_gradient


hold_gradient, hold_gradient_4bit = _hold_gradient_rule("q8"), _hold_gradient_rule("q4")


def _hold_gradient_states(device, grad, which=hold_gradient):
    p = torch.zeros_like(grad, device=device)
    opt = fusedopt.FusedOptimizer([p.requires_grad_()], which, backend="triton")
    p.grad = grad.to(device)
    opt.step()
    return {k: v.cpu() for k, v in opt.state[p].items()}


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_kernel_codes_are_bit_identical_to_the_quantizer(device):
    require_kernel_device(device)
    gen = torch.Generator().manual_seed(3)
    grad = torch.randn(3 * 256 + 17, generator=gen) * torch.logspace(-6, 2, 3 * 256 + 17)
    grad[256:512] = 0.0  # an all-zero block
    got = _hold_gradient_states(device, grad)
    m, m_absmax = quant.encode_state(grad, "q8", signed=True)
    v, v_absmax = quant.encode_state(grad * grad, "q8", signed=False)
    assert torch.equal(got["m"], m) and torch.equal(got["m_absmax"], m_absmax)
    assert torch.equal(got["v"], v) and torch.equal(got["v_absmax"], v_absmax)
    assert got["m_absmax"][1] == 0 and bool((quant.decode_state(got["m"], got["m_absmax"], "q8", True)[256:512] == 0).all())


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_packed_4bit_kernel_codes_are_bit_identical_to_the_quantizer(device):
    require_kernel_device(device)
    gen = torch.Generator().manual_seed(5)
    grad = torch.randn(5 * 128 + 7, generator=gen) * torch.logspace(-4, 2, 5 * 128 + 7)  # odd: a half byte
    grad[128:256] = 0.0
    got = _hold_gradient_states(device, grad, hold_gradient_4bit)
    m, m_absmax = quant.encode_state(grad, "q4", signed=True)
    v, v_absmax = quant.encode_state(grad * grad, "q4", signed=False)
    assert got["m"].shape == (324,) and got["m_absmax"].shape == (6,)
    assert torch.equal(got["m"], m) and torch.equal(got["m_absmax"], m_absmax)
    assert torch.equal(got["v"], v) and torch.equal(got["v_absmax"], v_absmax)


def _two_steps(optimizer, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    """Parameter and states after two steps on a tensor with a partial last chunk and block."""
    gen = torch.Generator().manual_seed(11)
    p = torch.randn(9 * 512 + 256 + 77, generator=gen).to(dtype).to(device).requires_grad_()
    opt = optimizer([p], lr=1e-2, backend="triton")
    for _ in range(2):
        p.grad = torch.randn(p.shape, generator=gen).to(dtype).to(device)
        opt.step()
    return {"p": p.detach().cpu(), **{k: v.cpu() for k, v in opt.state[p].items()}}


STATE_KINDS = {"q8": (fusedopt.AdamW8bit, torch.uint8), "q4": (fusedopt.AdamW4bit, torch.uint8),
               "fp32-states": (fusedopt.AdamW, torch.float32),
               "bf16-states": (functools.partial(fusedopt.AdamW, state_dtype="bf16"), torch.bfloat16)}
# (BLOCK, ITERS, num_warps) with 4 and 16 elements per thread, besides the default 8 (on CUDA only
# 16, the one with split stores: each configuration compiles every kernel again)
OTHER_LAYOUTS = {"cpu": ((512, 1, 4), (512, 1, 1)), "cuda": ((2048, 2, 4),)}


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("kind", sorted(STATE_KINDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_results_do_not_depend_on_elements_per_thread(monkeypatch, device, kind, dtype):
    """The stores that follow the registers' layout (template._store_runs, _byte_runs, _store_scales)
    take other paths at 4 and 16 elements per thread than at the default 8 (one vector per run,
    four); every path writes the same bits, with quantized states and with float states of another
    width than the parameters. (The interpreter's configuration is patched; CUDA's is set through
    FUSEDOPT_LAUNCH.)"""
    require_kernel_device(device)
    optimizer, state_dtype = STATE_KINDS[kind]
    expected = _two_steps(optimizer, dtype, device)
    assert expected["exp_avg"].dtype == state_dtype  # (the tensor is above the 4096-element threshold)
    for block, iters, warps in OTHER_LAYOUTS[device]:
        if device == "cpu":
            patched = dict(BLOCK=block, ITERS=iters, ROWS=2, num_warps=warps)
            monkeypatch.setitem(launch._CONFIG, "interpreter", patched)
        else:
            monkeypatch.setenv("FUSEDOPT_LAUNCH", f"BLOCK={block},ITERS={iters},num_warps={warps}")
        ops._PLANS.plans.clear()
        got = _two_steps(optimizer, dtype, device)
        for name, value in expected.items():
            assert torch.equal(got[name], value), (block, iters, warps, name)
    ops._PLANS.plans.clear()


def test_a_store_that_swaps_two_vectors_of_a_run_is_caught(monkeypatch):
    """The check above can fail: a _store_runs that writes each thread's two vectors in each
    other's place moves parameters."""
    device = any_kernel_device()
    if device != "cpu":
        pytest.skip("the interpreter's layout (8 float32 elements per thread) is the one patched")
    expected = _two_steps(fusedopt.AdamW8bit, torch.float32, device)
    good = template._STORE_RUNS
    bad = good.replace("tl.store(ptr + row, x0)\n            tl.store(ptr + row + V, x1)",
                       "tl.store(ptr + row, x1)\n            tl.store(ptr + row + V, x0)")
    assert bad != good
    monkeypatch.setattr(template, "_STORE_RUNS", bad)
    ops.source.cache_clear()
    try:
        got = _two_steps(fusedopt.AdamW8bit, torch.float32, device)
        assert not torch.equal(got["p"], expected["p"])
    finally:
        monkeypatch.undo()
        ops.source.cache_clear()


def _on_midpoints(fmt: str, signed: bool) -> torch.Tensor:
    """Blocks that put x / scale on and beside every midpoint of a map: each block holds its scale
    (a bf16 value: 1, 3, 0.1 rounded, a subnormal) first, then scale * midpoint rounded to float32
    and that value's float32 neighbours, for the midpoints rounded down and to nearest."""
    f = quant.format_for(fmt)
    mids = quant.midpoints(f.code(signed))
    centre = torch.cat([mids.to(torch.float32), quant.midpoints_below_f32(f.code(signed))])
    blocks = []
    for scale in (1.0, 3.0, float(torch.tensor(0.1).to(torch.bfloat16)), 2.0**-130):
        x = (centre.double() * scale).to(torch.float32)
        x = torch.cat([x, torch.nextafter(x, torch.full_like(x, math.inf)),
                       torch.nextafter(x, torch.full_like(x, -math.inf))])
        x = x[x.abs() <= scale]
        for start in range(0, x.numel(), f.block - 1):
            part = x[start:start + f.block - 1]
            blocks.append(torch.cat([torch.tensor([scale]), part,
                                     torch.zeros(f.block - 1 - part.numel())]))
    return torch.cat(blocks)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("fmt", ["q8", "q4"])
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_codes_on_and_beside_every_midpoint_match_the_quantizer(device, fmt, signed):
    """Where rounding is decided: values on a midpoint take the lower code, their neighbours the
    codes on either side, through every scale path (unit, odd, inexact and subnormal scales)."""
    require_kernel_device(device)
    grad = _on_midpoints(fmt, signed)
    got = _hold_gradient_states(device, grad, _hold_gradient_rule(fmt, magnitude=True))
    name = "m" if signed else "v"
    codes, absmax = quant.encode_state(grad if signed else grad.abs(), fmt, signed=signed)
    assert torch.equal(got[f"{name}_absmax"], absmax)
    assert torch.equal(got[name], codes), f"{int((got[name] != codes).sum())} of {codes.numel()} codes differ"


@rule("read_back_q4")
def read_back_q4(p, g, t):
    m = state("m", dtype="q4")
    v = state("v", dtype="q4", nonnegative=True)
    m.set(m)
    v.set(v)
    p.set(p + m + v)


def _read_back_4bit(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(what the kernel reads back, what fusedopt.quant decodes) for stored 4-bit codes: every
    nibble value in both halves of a byte, then random ones, under random bf16 scales."""
    n = 5 * 128 + 37
    p = torch.zeros(n, device=device, requires_grad=True)
    opt = fusedopt.FusedOptimizer([p], read_back_q4, backend="triton")
    p.grad = torch.zeros(n, device=device)
    opt.step()  # creates the states
    gen = torch.Generator().manual_seed(8)
    expected = torch.zeros(n)
    for name, signed in (("m", True), ("v", False)):
        codes = torch.randint(0, 256, opt.state[p][name].shape, generator=gen, dtype=torch.uint8)
        codes[:16] = torch.arange(0, 256, 17, dtype=torch.uint8)  # 0x00, 0x11, .. 0xFF: every nibble, both halves
        scales = torch.rand(opt.state[p][f"{name}_absmax"].shape, generator=gen).add(0.01).to(torch.bfloat16)
        opt.state[p][name].copy_(codes)
        opt.state[p][f"{name}_absmax"].copy_(scales)
        expected = expected + quant.decode_state(codes, scales, "q4", signed, shape=(n,))
    with torch.no_grad():
        p.zero_()
    opt.step()
    return p.detach().cpu(), expected


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_every_4bit_code_decodes_as_the_quantizer(device):
    """Stored codes read back as fusedopt.quant.decode_state gives them, bit for bit: the signed
    map through its table, the second moment's k / 16 in closed form (template._even_grid_values)."""
    require_kernel_device(device)
    got, expected = _read_back_4bit(device)
    assert torch.equal(got, expected)


def test_a_closed_form_4bit_decode_off_by_one_code_is_caught(monkeypatch):
    """The check above can fail: decoding k / 16 as c / 16 instead of (c + 1) / 16 moves values."""
    device = any_kernel_device()
    assert template._even_grid_values(quant.Q4.code(False)) == (1.0, 0.0625)
    monkeypatch.setattr(template, "_even_grid_values", lambda code_map: (0.0, 0.0625) if code_map.min() > 0 else None)
    ops.source.cache_clear()
    try:
        got, expected = _read_back_4bit(device)
        assert not torch.equal(got, expected)
    finally:
        monkeypatch.undo()
        ops.source.cache_clear()


def test_a_closed_form_4bit_code_off_by_half_a_step_is_caught(monkeypatch):
    """The midpoint check can fail: rounding the even 4-bit grid at its values instead of its
    midpoints (an offset of 1 instead of 1.5) moves codes."""
    device = any_kernel_device()
    assert template._even_grid(quant.Q4.code(False)) == (16.0, 1.5)
    monkeypatch.setattr(template, "_even_grid", lambda code_map: (16.0, 1.0) if code_map.numel() == 16 else None)
    ops.source.cache_clear()
    try:
        grad = _on_midpoints("q4", signed=False)
        got = _hold_gradient_states(device, grad, _hold_gradient_rule("q4", magnitude=True))
        codes, _ = quant.encode_state(grad, "q4", signed=False)
        assert not torch.equal(got["v"], codes)
    finally:
        monkeypatch.undo()
        ops.source.cache_clear()


def _bucket_encode(table: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The q8 kernel's encoder (template._q8_store_source) in integer torch ops, for float32 y."""
    signed_bits = y.view(torch.int32).to(torch.int64)
    entry = table.to(torch.int64)[(signed_bits & 0xFFFFFFFF) >> 16]
    low = (signed_bits ^ (signed_bits >> 31)) & 0xFFFF
    return (entry & 0xFF) + (low > (entry >> 8)).to(torch.int64)


@pytest.mark.parametrize("fmt", ["q8", "q4"])
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_the_bucket_table_finds_the_nearest_code_at_every_bucket_edge_and_midpoint(fmt, signed):
    """Every float32 in [-1, 1] where a bucket starts or ends, every midpoint (rounded down to
    float32) and its neighbours 1 to 3 ulps away: the table's one comparison gives the count of
    exact midpoints below the value, as the quantizer's search does."""
    code = quant.format_for(fmt).code(signed)
    table = ops.bucket_table(code)
    top = torch.arange(2**16, dtype=torch.int64)
    edges = torch.cat([top << 16, (top << 16) | 0xFFFF])
    edges = torch.where(edges >= 2**31, edges - 2**32, edges).to(torch.int32).view(torch.float32)
    mids = quant.midpoints_below_f32(code)
    near = [mids] + [torch.nextafter(mids, torch.full_like(mids, d)) for d in (2.0, -2.0)]
    for _ in range(2):
        near += [torch.nextafter(near[-2], torch.full_like(mids, 2.0)),
                 torch.nextafter(near[-1], torch.full_like(mids, -2.0))]
    y = torch.cat([edges, *near, -mids, torch.tensor([0.0, -0.0])])
    y = y[y.abs() <= 1]
    if not signed:
        y = y[y >= 0]
    expected = torch.searchsorted(quant.midpoints(code), y.double())
    assert torch.equal(_bucket_encode(table, y), expected)


def test_a_bucket_table_that_ignores_the_sign_is_caught():
    """The check above can fail: a table whose low bits are not complemented for negative buckets
    misrounds negative values next to a midpoint."""
    code = quant.Q8.code(True)
    table = ops.bucket_table(code).to(torch.int64)
    negative = torch.arange(2**16) >= 2**15
    low = table >> 8
    wrong = torch.where(negative & (low != 0xFFFF), (table & 0xFF) | ((0xFFFF - low) << 8), table)
    mids = quant.midpoints_below_f32(code)
    y = torch.cat([mids, torch.nextafter(mids, torch.full_like(mids, -2.0))])
    y = y[(y < 0) & (y >= -1)]
    expected = torch.searchsorted(quant.midpoints(code), y.double())
    assert torch.equal(_bucket_encode(table, y), expected)
    assert not torch.equal(_bucket_encode(wrong, y), expected)


def test_a_floor_quantizer_in_the_kernel_is_caught(monkeypatch):
    """The comparison above can fail: a kernel that skips the comparison with the midpoint inside
    a value's bucket (so rounds some values down) disagrees with the quantizer."""
    device = any_kernel_device()
    original = template._q8_store_source

    def floor_quantizer():
        good = original()
        bad = good.replace("code = (entry & 0xFF) + (low > (entry >> 8)).to(tl.int32)", "code = entry & 0xFF")
        assert bad != good
        return bad

    monkeypatch.setattr(template, "_q8_store_source", floor_quantizer)
    ops.source.cache_clear()
    try:
        grad = torch.randn(1000, generator=torch.Generator().manual_seed(4))
        got = _hold_gradient_states(device, grad)
        m, _ = quant.encode_state(grad, "q8", signed=True)
        assert not torch.equal(got["m"], m)
        with pytest.raises(AssertionError, match="codes differ"):
            assert_same_storage({"m": got["m"]}, {"m": m}, "floor")
    finally:
        monkeypatch.undo()
        ops.source.cache_clear()


def test_adamw8bit_trajectory_stays_close_to_float32_adamw():
    """100 steps of least squares from a loss of 63.4. Measured (CPU, reference backend): float32
    AdamW 0.559, 8-bit moments 0.590 (parameters 1.9 % from float32's, relative norm), 4-bit
    moments 5.07: the linear 4-bit map without zero cannot hold second moments below 1/16 of its
    block's largest, so small-gradient coordinates take smaller steps."""
    gen = torch.Generator().manual_seed(0)
    x, w_true = torch.randn(256, 64, generator=gen), torch.randn(64, 32, generator=gen)
    y = x @ w_true + 0.01 * torch.randn(256, 32, generator=gen)
    results = {}
    for cls in (fusedopt.AdamW, fusedopt.AdamW8bit, fusedopt.AdamW4bit):
        w = torch.zeros(64, 32, requires_grad=True)
        opt = cls([w], lr=3e-2, weight_decay=0.0, backend="reference", quant_threshold=0)
        assert cls is fusedopt.AdamW or opt.param_groups[0]["state_dtype"] in ("q8", "q4")
        for _ in range(100):
            loss = ((x @ w - y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        results[cls.__name__] = (((x @ w - y) ** 2).mean().item(), w.detach().clone())
    (loss32, w32), (loss8, w8), (loss4, w4) = results["AdamW"], results["AdamW8bit"], results["AdamW4bit"]
    start = (y**2).mean().item()
    assert loss32 < 0.01 * start  # the problem was actually solved
    assert loss8 <= 1.1 * loss32 and (w8 - w32).norm() / w32.norm() < 0.03
    assert loss4 <= 0.1 * start and loss4 > loss8  # 4-bit moments converge, and visibly slower


def _state_bytes_per_param(opt) -> float:
    total = numel = 0
    for group in opt.param_groups:
        for p in group["params"]:
            program = opt._prepared(group, *opt._kind_of(group, p)).program
            for shape, dtype in reference.storage_shapes(program, p).values():
                total += math.prod(shape) * dtype.itemsize
            numel += p.numel()
    return total / numel


def test_state_bytes_per_param_on_llama1b_shapes_are_counted_not_allocated():
    params = [torch.empty(s, device="meta", requires_grad=True) for _, s in bench_shapes.param_list("llama1b")]
    q4 = _state_bytes_per_param(fusedopt.AdamW4bit(params, backend="reference"))
    # 2 x (1/2 + 2/128) = 1.03125 on big tensors (bfloat16 scales); the norms keep float32 moments
    assert 1.03125 <= q4 < 1.0320 and q4 <= 1.05
    q8 = _state_bytes_per_param(fusedopt.AdamW8bit(params, backend="reference"))
    fp32 = _state_bytes_per_param(fusedopt.AdamW(params, backend="reference"))
    assert fp32 == 8.0
    # 2 x (1 + 2/256) = 2.015625 on big tensors; the 33 RMSNorm weights (2048 elements, under the
    # threshold) keep float32 moments: 2.0160 in all
    assert 2.015625 <= q8 < 2.0165 and q8 <= 2.03
    assert q8 == pytest.approx(2 * quant.state_bytes(10**9, "q8") / 10**9, abs=1e-3)


def test_small_tensors_keep_float32_states_below_the_threshold():
    small, big = torch.zeros(100, requires_grad=True), torch.zeros(5000, requires_grad=True)
    opt = fusedopt.AdamW8bit([small, big], backend="reference")
    for p in (small, big):
        p.grad = torch.ones_like(p)
    opt.step()
    assert opt.state[small]["exp_avg"].dtype == torch.float32 and "exp_avg_absmax" not in opt.state[small]
    assert opt.state[big]["exp_avg"].dtype == torch.uint8 and opt.state[big]["exp_avg_absmax"].shape == (20,)
    every = fusedopt.AdamW8bit([torch.zeros(100, requires_grad=True)], quant_threshold=0)
    assert every.param_groups[0]["quant_threshold"] == 0
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="quant_threshold"):
            fusedopt.AdamW8bit([small], quant_threshold=bad)
    with pytest.raises(ValueError, match="state_dtype='q9'"):
        fusedopt.Lion([small], state_dtype="q9")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_non_finite_gradients_poison_only_their_block(backend):
    device = any_kernel_device() if backend == "triton" else "cpu"
    p = torch.zeros(1024, device=device, requires_grad=True)
    opt = fusedopt.AdamW8bit([p], backend=backend, quant_threshold=0)
    g = torch.ones(1024)
    g[300] = float("nan")
    p.grad = g.to(device)
    opt.step()
    st = {k: v.cpu() for k, v in opt.state[p].items()}
    absmax = st["exp_avg_absmax"]
    assert bool(absmax[1].isnan()) and bool(torch.isfinite(absmax[[0, 2, 3]]).all())
    zero_code = int(quant.encode_state(torch.zeros(1), "q8", True)[0][0])
    assert bool((st["exp_avg"][256:512] == zero_code).all())  # no garbage codes
    dense = quant.decode_state(st["exp_avg"], absmax, "q8", True)
    assert bool(dense[256:512].isnan().all()) and bool(torch.isfinite(dense[:256]).all())
    assert bool(p.detach().cpu()[300].isnan())  # propagated, as with float32 states


@pytest.mark.parametrize("backend", ["reference", *(["triton"] if any_kernel_device() else [])])
@pytest.mark.parametrize("cls", [fusedopt.AdamW, fusedopt.AdamW8bit, fusedopt.AdamW4bit])
def test_a_huge_finite_gradient_stays_finite_as_in_torch(backend, cls):
    """(1 - beta2) * g * g multiplies as torch's addcmul, (c * g) * g: a gradient of 1e20 gives a
    second moment of 1e37, not g * g = inf (which froze the element in float32 and turned a
    quantized block into NaN)."""
    device = any_kernel_device() if backend == "triton" else "cpu"
    gen = torch.Generator().manual_seed(4)
    g = torch.randn(5000, generator=gen) * 1e-3
    g[7] = 1e20
    p = torch.zeros(5000, device=device, requires_grad=True)
    q = torch.zeros(5000, requires_grad=True)
    ours, theirs = cls([p], lr=1e-3, backend=backend), torch.optim.AdamW([q], lr=1e-3)
    for _ in range(3):
        p.grad, q.grad = g.to(device), g.clone()
        ours.step()
        theirs.step()
    assert bool(torch.isfinite(p).all()) and bool(torch.isfinite(theirs.state[q]["exp_avg_sq"]).all())
    atol = 1e-8 if cls is fusedopt.AdamW else 5e-3  # the quantized moments: a few lr
    torch.testing.assert_close(p.detach().cpu(), q.detach(), rtol=0, atol=atol)
    rtol = 1e-6 if cls is fusedopt.AdamW else 1e-3  # the block's largest moment: quantized within 0.1 %
    torch.testing.assert_close(p.detach().cpu()[7], q.detach()[7], rtol=rtol, atol=0)


def test_checkpoints_move_between_compact_dense_and_torch_forms():
    gen = torch.Generator().manual_seed(1)
    base = [torch.randn(s, generator=gen) for s in [(64, 80), (300,)]]
    grads = [[torch.randn(s.shape, generator=gen) for s in base] for _ in range(6)]

    def train(opt, params, steps):
        for gs in steps:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()

    a = [p.clone().requires_grad_() for p in base]
    oa = fusedopt.AdamW8bit(a, lr=1e-2)
    train(oa, a, grads[:3])
    # deep copies, as torch.save would make: a state_dict holds the optimizer's live tensors
    compact = copy.deepcopy(oa.state_dict())
    assert compact["state"][0]["exp_avg"].dtype == torch.uint8 and "exp_avg_absmax" in compact["state"][0]
    dense = copy.deepcopy(oa.state_dict(dense=True))
    assert dense["state"][0]["exp_avg"].dtype == torch.float32 and "exp_avg_absmax" not in dense["state"][0]
    assert compact["state"][0]["exp_avg"].dtype == torch.uint8  # the compact dict was not modified

    # compact -> another AdamW8bit: identical continuation
    b = [p.detach().clone().requires_grad_() for p in a]
    ob = fusedopt.AdamW8bit(b, lr=1e-2)
    ob.load_state_dict(compact)
    # dense -> torch.optim.AdamW and fusedopt.AdamW (fp32 states): the decoded moments
    c = [p.detach().clone().requires_grad_() for p in a]
    oc = torch.optim.AdamW(c, lr=1e-2)
    oc.load_state_dict(dense)
    assert torch.equal(oc.state[c[0]]["exp_avg_sq"], dense["state"][0]["exp_avg_sq"])
    d = [p.detach().clone().requires_grad_() for p in a]
    od = fusedopt.AdamW(d, lr=1e-2)
    od.load_state_dict(compact)  # compact into float32 storage: decoded on load
    torch.testing.assert_close(od.state[d[0]]["exp_avg"], dense["state"][0]["exp_avg"])
    # and a float32 (torch) checkpoint into 8-bit storage: encoded on load
    e = [p.detach().clone().requires_grad_() for p in a]
    oe = fusedopt.AdamW8bit(e, lr=1e-2)
    oe.load_state_dict(copy.deepcopy(oc.state_dict()))
    for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        # re-encoding decoded values is not always exact: a block's largest decoded value can lie below
        # its scale (the bf16 scale is the absmax rounded up, and the signed map has no -1), so the
        # block gets a smaller scale and some codes move by a step
        again = quant.decode_state(oe.state[e[0]][key], oe.state[e[0]][key + "_absmax"], "q8", signed)
        first = dense["state"][0][key]
        torch.testing.assert_close(again, first, rtol=0.05, atol=1e-3 * float(first.abs().max()))

    for opt, params in ((oa, a), (ob, b), (oc, c), (od, d), (oe, e)):
        train(opt, params, grads[3:])
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    torch.testing.assert_close(c[0], d[0])  # torch and fusedopt continue alike from the decoded moments
    with pytest.raises(ValueError, match="absmax"):
        broken = oa.state_dict()
        del broken["state"][0]["exp_avg_absmax"]
        fusedopt.AdamW8bit([p.detach().clone().requires_grad_() for p in a]).load_state_dict(broken)


def test_4bit_checkpoints_decode_to_dense_and_convert_to_8bit():
    gen = torch.Generator().manual_seed(2)
    p = torch.randn(50, 101, generator=gen).requires_grad_()  # odd element count: a half-used byte
    opt = fusedopt.AdamW4bit([p], lr=1e-2)
    for _ in range(2):
        p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    compact = copy.deepcopy(opt.state_dict())
    assert compact["state"][0]["exp_avg"].shape == (2525,) and compact["state"][0]["exp_avg_absmax"].shape == (40,)
    dense = opt.state_dict(dense=True)["state"][0]
    expected = quant.decode_state(compact["state"][0]["exp_avg"], compact["state"][0]["exp_avg_absmax"], "q4", True,
                                  shape=p.shape)
    assert dense["exp_avg"].shape == p.shape and torch.equal(dense["exp_avg"], expected)
    q = p.detach().clone().requires_grad_()
    eight = fusedopt.AdamW8bit([q], lr=1e-2)
    eight.load_state_dict(compact)  # 4-bit codes -> dense -> 8-bit codes
    again = quant.decode_state(eight.state[q]["exp_avg_sq"], eight.state[q]["exp_avg_sq_absmax"], "q8", False)
    torch.testing.assert_close(again, dense["exp_avg_sq"], rtol=0.05, atol=1e-3 * float(dense["exp_avg_sq"].max()))
    with pytest.raises(ValueError, match="q8 or q4"):
        broken = copy.deepcopy(compact)
        broken["state"][0]["exp_avg"] = broken["state"][0]["exp_avg"][:-1]
        fusedopt.AdamW4bit([p.detach().clone().requires_grad_()]).load_state_dict(broken)


@pytest.mark.parametrize("backend", ["reference", *(["triton"] if any_kernel_device() else [])])
def test_a_storage_changed_between_steps_converts_the_states(backend):
    """group["state_dtype"] (or quant_threshold) changed after steps: the next step converts each
    state to the new storage, as a checkpoint load would, and never reads codes as values."""
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(8)
    p = torch.randn(5000, generator=gen).to(device).requires_grad_()
    opt = fusedopt.AdamW8bit([p], lr=1e-2, backend=backend)
    grads = [torch.randn(5000, generator=gen).to(device) for _ in range(6)]
    history = []
    for i, g in enumerate(grads):
        if i in (2, 4):
            dense = opt.state_dict(dense=True)["state"][0]
            opt.param_groups[0]["state_dtype"] = "fp32" if i == 2 else "q4"
            fresh = fusedopt.AdamW([q := p.detach().clone().requires_grad_()], lr=1e-2, backend=backend,
                                   state_dtype=opt.param_groups[0]["state_dtype"])
            fresh.load_state_dict({"state": {0: dense}, "param_groups": opt.state_dict()["param_groups"]})
            q.grad = g.clone()
            fresh.step()
        p.grad = g.clone()
        opt.step()
        if i in (2, 4):  # the same as loading the dense checkpoint into that storage
            assert torch.equal(p.detach(), q.detach())
        history.append(p.detach().clone())
    st = opt.state[p]
    assert st["exp_avg"].dtype == torch.uint8 and st["exp_avg"].shape == (2500,) and st["exp_avg_absmax"].shape == (40,)
    opt.param_groups[0]["quant_threshold"] = 10**6  # now below the threshold: float32 states
    p.grad = grads[-1].clone()
    opt.step()
    assert st is opt.state[p] and st["exp_avg"].dtype == torch.float32 and "exp_avg_absmax" not in st
    assert all(torch.isfinite(h).all() for h in history) and float((history[-1] - history[0]).abs().max()) < 0.1


def test_one_element_tensors_keep_float32_states_even_with_no_threshold():
    """q8 and q4 codes of one element would have the same shapes, so one element never quantizes."""
    for cls in (fusedopt.AdamW4bit, fusedopt.AdamW8bit):
        p, big = torch.randn(1).requires_grad_(), torch.randn(2).requires_grad_()
        opt = cls([p, big], quant_threshold=0)
        p.grad, big.grad = torch.randn(1), torch.randn(2)
        opt.step()
        assert opt.state[p]["exp_avg"].dtype == torch.float32 and "exp_avg_absmax" not in opt.state[p]
        assert opt.state[big]["exp_avg"].dtype == torch.uint8 and "exp_avg_absmax" in opt.state[big]


def test_a_one_element_compact_state_decodes_as_its_checkpoint_group_says():
    """A compact one-element state (saved before one element stopped quantizing) is read as the
    saved group's state_dtype names, whatever the loader keeps; with no state_dtype saved, a loader
    that does not quantize cannot tell the format and says so."""
    value = {"exp_avg": torch.tensor([0.2236]), "exp_avg_sq": torch.tensor([0.003])}
    for fmt, cls in (("q4", fusedopt.AdamW4bit), ("q8", fusedopt.AdamW8bit)):
        state = {"step": torch.tensor(3.0)}
        for name, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            state[name], state[name + "_absmax"] = quant.encode_state(value[name], fmt, signed)
        saved = cls([torch.zeros(1, requires_grad=True)], quant_threshold=0).state_dict()
        saved["state"] = {0: state}
        for loader in (fusedopt.AdamW, fusedopt.AdamW8bit, fusedopt.AdamW4bit):
            q = torch.zeros(1, requires_grad=True)
            opt = loader([q], quant_threshold=0)
            opt.load_state_dict(copy.deepcopy(saved))
            for name, signed in (("exp_avg", True), ("exp_avg_sq", False)):
                expected = quant.decode_state(state[name], state[name + "_absmax"], fmt, signed, shape=(1,))
                assert torch.equal(opt.state[q][name], expected), (fmt, loader.__name__, name)
        del saved["param_groups"][0]["state_dtype"]
        with pytest.raises(ValueError, match="could be q8 or q4"):
            fusedopt.AdamW([torch.zeros(1, requires_grad=True)]).load_state_dict(saved)


@pytest.mark.parametrize("fmt", ["q8", "q4"])
def test_compact_states_with_float32_scales_are_re_encoded_on_load(fmt):
    """Compact states whose scales are float32 (bitsandbytes' and torchao's layout) load: they are
    decoded with those scales and re-encoded with bf16 ones, so they change by one rounding at most."""
    gen = torch.Generator().manual_seed(4)
    p = torch.randn(40, 130, generator=gen).requires_grad_()
    opt = fusedopt.AdamW(([p]), lr=1e-2)
    for _ in range(3):
        p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    sd = copy.deepcopy(opt.state_dict())
    fm = quant.format_for(fmt)
    dense = {}
    for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        codes, scale = quant.quantize_blockwise(sd["state"][0][key], fm.code(signed), fm.block, torch.float32)
        sd["state"][0][key] = quant.pack_nibbles(codes) if fm.bits == 4 else codes.reshape(p.shape)
        sd["state"][0][key + "_absmax"] = scale
        dense[key] = quant.decode_state(sd["state"][0][key], scale, fmt, signed, shape=p.shape)
    q = p.detach().clone().requires_grad_()
    loaded = fusedopt.AdamW(([q]), lr=1e-2, state_dtype=fmt)
    loaded.load_state_dict(sd)
    for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        state = loaded.state[q]
        assert state[key + "_absmax"].dtype == torch.bfloat16
        again = quant.decode_state(state[key], state[key + "_absmax"], fmt, signed, shape=p.shape)
        assert torch.equal(state[key + "_absmax"], quant.encode_state(dense[key], fmt, signed)[1])
        code = fm.code(signed)
        half_gap = float((code[1:] - code[:-1]).max()) / 2  # one re-rounding to the nearest code
        top = float(dense[key].abs().max())
        torch.testing.assert_close(again, dense[key], rtol=0.0, atol=half_gap * top * (1 + 2.0**-7) * 1.001)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_subnormal_moments_quantize_as_the_reference(device):
    """Second moments of tiny gradients are float32 subnormals: absmax and codes must still match
    the quantizer (no flush to zero in the kernel)."""
    require_kernel_device(device)
    grad = torch.linspace(-1, 1, 700) * 1e-39  # subnormal values; their squares underflow to 0
    got = _hold_gradient_states(device, grad)
    m, m_absmax = quant.encode_state(grad, "q8", signed=True)
    assert bool((m_absmax > 0).all()) and float(m_absmax.max()) < torch.finfo(torch.float32).tiny
    assert torch.equal(got["m"], m) and torch.equal(got["m_absmax"], m_absmax)


def test_clipping_spans_a_group_split_by_the_quant_threshold():
    """Small tensors keep float32 states (a second program); the clipping norm still spans both, so the
    small tensor (float32 momentum) follows torch's SGD after clip_grad_norm_ over both tensors."""
    device = any_kernel_device()
    gen = torch.Generator().manual_seed(4)
    base = [torch.randn(10, generator=gen), torch.randn(5000, generator=gen)]
    ours = [p.clone().to(device).requires_grad_() for p in base]
    theirs = [p.clone().requires_grad_() for p in base]
    opt = fusedopt.SGD(ours, lr=0.1, momentum=0.9, state_dtype="q8", max_grad_norm=1.0, backend="triton")
    ref = torch.optim.SGD(theirs, lr=0.1, momentum=0.9)
    for _ in range(3):
        for a, b in zip(ours, theirs):
            g = torch.randn(a.shape, generator=gen) * 3
            a.grad, b.grad = g.clone().to(device), g
        assert float(torch.nn.utils.clip_grad_norm_(theirs, 1.0)) > 10  # the clipping matters
        opt.step()
        ref.step()
    assert opt.state[ours[1]]["momentum_buffer"].dtype == torch.uint8
    assert opt.state[ours[0]]["momentum_buffer"].dtype == torch.float32
    torch.testing.assert_close(ours[0].cpu(), theirs[0], rtol=1e-5, atol=1e-6)
    # 8-bit momentum: the large tensor moves as torch's does, to within the map's resolution (the
    # dynamic map's steps are a few percent of a block's absmax), against moves of about 1e-2
    moved, expected = ours[1].detach().cpu() - base[1], theirs[1].detach() - base[1]
    assert float(expected.abs().max()) > 5e-3
    torch.testing.assert_close(moved, expected, rtol=0, atol=0.05 * float(expected.abs().max()))


def test_the_bucket_table_refuses_buckets_wider_than_the_kernel_compares(monkeypatch):
    """The span check can fail: with coarse buckets several q8 midpoints share one, which the
    kernel's single comparison would misround, so building the table raises."""
    code = quant.Q8.code(False)
    assert ops.bucket_table(code).dtype == torch.int32
    monkeypatch.setattr(ops, "QUANT_BUCKET_BITS", 10)
    with pytest.raises(AssertionError, match="midpoints per bucket"):
        ops.bucket_table(code)


def test_a_quantized_buffer_kept_while_unused_checkpoints_in_both_forms():
    """SGD keeps its momentum buffer while the momentum is 0 (as torch does); stored as q8 codes it
    is saved with its scales and decoded in the dense form, which torch.optim.SGD takes."""
    gen = torch.Generator().manual_seed(2)
    p = torch.randn(80, 64, generator=gen).requires_grad_()
    opt = fusedopt.SGD([p], lr=0.1, momentum=0.9, state_dtype="q8", quant_threshold=0)
    p.grad = torch.randn(80, 64, generator=gen)
    opt.step()
    buffer = quant.decode_state(opt.state[p]["momentum_buffer"], opt.state[p]["momentum_buffer_absmax"], "q8",
                                signed=True, shape=p.shape)
    opt.param_groups[0]["momentum"] = 0.0
    p.grad = torch.randn(80, 64, generator=gen)
    opt.step()  # no momentum: the buffer is kept as it was
    q = p.detach().clone().requires_grad_()
    again = fusedopt.SGD([q], lr=0.1, momentum=0.0, state_dtype="q8", quant_threshold=0)
    again.load_state_dict(opt.state_dict())
    assert all(torch.equal(again.state[q][k], v) for k, v in opt.state[p].items())
    dense = opt.state_dict(dense=True)
    assert sorted(dense["state"][0]) == ["momentum_buffer", "step"]
    assert torch.equal(dense["state"][0]["momentum_buffer"], buffer)
    torch_sgd = torch.optim.SGD([q], lr=0.1, momentum=0.9)
    torch_sgd.load_state_dict(dense)
    assert torch.equal(torch_sgd.state[q]["momentum_buffer"], buffer)


# ---- Adafactor's second moment: the unsigned map, and checkpoints coded before it used it ---------

ADAFACTOR_VARIANTS = {"torch": dict(lr=1e-2), "hf": dict(hf=True, relative_step=False, lr=1e-2)}


def _adafactor_vector(fmt: str, variant: str = "torch", steps: int = 3, seed: int = 11, backend: str = "reference",
                      **kwargs):
    """An Adafactor over one vector of 5000 elements (over the quant threshold) after ``steps`` steps."""
    device = any_kernel_device() if backend == "triton" else "cpu"
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(5000, generator=gen).to(device).requires_grad_()
    opt = fusedopt.Adafactor([p], state_dtype=fmt, backend=backend, **ADAFACTOR_VARIANTS[variant], **kwargs)
    for _ in range(steps):
        p.grad = torch.randn(p.shape, generator=gen).to(device)
        opt.step()
    return p, opt


def _rounding_bound(fmt: str, signed: bool) -> float:
    """The largest distance, as a fraction of a block's scale, from a value of [0, scale] to the code
    it takes: half the widest gap between codes, or the smallest non-negative code (q4's unsigned map
    has no 0, so the values below 1/16 go up to it)."""
    code = quant.format_for(fmt).code(signed)
    code = code[code >= 0]
    return max(float((code[1:] - code[:-1]).max()) / 2, float(code[0]))


def test_adafactor_declares_its_second_moments_nonnegative():
    """Both variants, vectors and factored matrices; the first moment stays signed. The row and
    column factors never quantize (state_dtype converts full-size states only), so they keep fp32."""
    for variant, matrix, moment in itertools.product((False, True), (False, True), (False, True)):
        program = adafactor_rule.program(hf=variant, matrix=matrix, use_first_moment=moment,
                                                        state_dtype="q8")
        kinds = {s.name: (s.nonnegative, s.dtype) for s in program.states}
        expected = {"row_var": (True, "fp32"), "col_var": (True, "fp32")} if matrix else {"variance": (True, "q8")}
        if moment:
            expected["exp_avg"] = (False, "q8")
        assert kinds == expected, (variant, matrix, moment)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("variant", sorted(ADAFACTOR_VARIANTS))
@pytest.mark.parametrize("fmt", ["q8", "q4"])
def test_adafactor_second_moment_is_coded_with_the_unsigned_map(fmt, variant, backend):
    """After one step from zeros the variance is g^2 (HF: g^2 + eps1), exactly as a float32 state
    holds it; q8 and q4 store the codes and scales encode_state gives it with the unsigned map (the
    fused kernel too). Under q8 that halves the median relative error of the signed map (about 0.009
    against 0.018 here)."""
    exact, exact_opt = _adafactor_vector("fp32", variant, steps=1)
    p, opt = _adafactor_vector(fmt, variant, steps=1, backend=backend)
    v = exact_opt.state[exact]["variance"]
    codes, scales = quant.encode_state(v, fmt, signed=False)
    st = {k: t.cpu() for k, t in opt.state[p].items()}
    assert torch.equal(st["variance"], codes) and torch.equal(st["variance_absmax"], scales)
    if fmt == "q8":
        decoded = quant.decode_state(st["variance"], st["variance_absmax"], fmt, signed=False, shape=p.shape)
        assert float(((decoded - v).abs() / v).median()) < 0.012


def _signed_era_checkpoint(fmt: str, variant: str = "torch"):
    """A compact Adafactor checkpoint as fusedopt saved it before the variance was declared
    nonnegative: the variance coded with the signed map, no "quant_maps" key in the groups. Returns
    it with the values the variance held before that coding."""
    p, opt = _adafactor_vector(fmt, variant, beta1=0.9)
    old = copy.deepcopy(opt.state_dict())
    del old["param_groups"][0]["quant_maps"]
    values = opt.state_dict(dense=True)["state"][0]["variance"]
    old["state"][0]["variance"], old["state"][0]["variance_absmax"] = quant.encode_state(values, fmt, signed=True)
    return p, old, values


@pytest.mark.parametrize("variant", sorted(ADAFACTOR_VARIANTS))
@pytest.mark.parametrize("fmt", ["q8", "q4"])
def test_an_adafactor_checkpoint_with_signed_variance_codes_loads_by_the_signed_map(fmt, variant):
    """A checkpoint without "quant_maps" (saved before Adafactor's variance was declared nonnegative)
    holds the variance's codes of the signed map: loading decodes them with it and codes the values
    with the unsigned map, so they move by one rounding to it at most; a float32 loader gets the
    signed decoding exactly. The signed first moment's codes load as they are."""
    p, old, values = _signed_era_checkpoint(fmt, variant)
    saved = old["state"][0]
    signed_values = quant.decode_state(saved["variance"], saved["variance_absmax"], fmt, signed=True, shape=p.shape)
    scale = float(saved["variance_absmax"].float().max())
    misread = quant.decode_state(saved["variance"], saved["variance_absmax"], fmt, signed=False, shape=p.shape)
    both = (_rounding_bound(fmt, True) + _rounding_bound(fmt, False)) * scale
    assert float((misread - values).abs().max()) > 2 * both  # what reading the codes with the new map gives

    q = p.detach().clone().requires_grad_()
    loaded = fusedopt.Adafactor([q], state_dtype=fmt, backend="reference", beta1=0.9, **ADAFACTOR_VARIANTS[variant])
    loaded.load_state_dict(copy.deepcopy(old))
    st = loaded.state[q]
    codes, scales = quant.encode_state(signed_values, fmt, signed=False)
    assert torch.equal(st["variance"], codes) and torch.equal(st["variance_absmax"], scales)
    again = quant.decode_state(st["variance"], st["variance_absmax"], fmt, signed=False, shape=p.shape)
    torch.testing.assert_close(again, signed_values, rtol=0.0, atol=_rounding_bound(fmt, False) * scale * 1.001)
    torch.testing.assert_close(again, values, rtol=0.0, atol=both * 1.001)
    assert torch.equal(st["exp_avg"], saved["exp_avg"]) and torch.equal(st["exp_avg_absmax"], saved["exp_avg_absmax"])

    dense = fusedopt.Adafactor([p.detach().clone().requires_grad_()], backend="reference", beta1=0.9,
                               **ADAFACTOR_VARIANTS[variant])
    dense.load_state_dict(copy.deepcopy(old))
    assert torch.equal(next(iter(dense.state.values()))["variance"], signed_values)
    assert loaded.state_dict()["param_groups"][0]["quant_maps"] == 2  # saved again in the current form


@pytest.mark.parametrize("fmt", ["q8", "q4"])
def test_adafactor_checkpoints_round_trip_bit_for_bit_and_through_torch(fmt):
    """A checkpoint saved now carries "quant_maps" and loads back bit for bit (codes as they are, no
    re-coding), saving again the same dictionary; its dense form loads into torch.optim.Adafactor,
    whose checkpoint (no "quant_maps", float values) codes the variance with the unsigned map."""
    p, opt = _adafactor_vector(fmt)
    sd = copy.deepcopy(opt.state_dict())
    assert sd["param_groups"][0]["quant_maps"] == 2
    q = p.detach().clone().requires_grad_()
    loaded = fusedopt.Adafactor([q], state_dtype=fmt, backend="reference", lr=1e-2)
    loaded.load_state_dict(copy.deepcopy(sd))
    assert sorted(loaded.state[q]) == sorted(opt.state[p])
    assert all(torch.equal(loaded.state[q][k], v) for k, v in opt.state[p].items())
    again = loaded.state_dict()
    assert again["param_groups"] == sd["param_groups"]
    assert all(torch.equal(again["state"][0][k], v) for k, v in sd["state"][0].items())
    for version in (3, 0, True, "2"):  # a version this code does not know: refused, nothing changed
        sd["param_groups"][0]["quant_maps"] = version
        with pytest.raises(ValueError, match="quant_maps"):
            loaded.load_state_dict(copy.deepcopy(sd))
    assert all(torch.equal(loaded.state[q][k], v) for k, v in opt.state[p].items())

    dense = opt.state_dict(dense=True)
    torch_opt = torch.optim.Adafactor([p.detach().clone().requires_grad_()], lr=1e-2)
    torch_opt.load_state_dict(copy.deepcopy(dense))
    assert "quant_maps" not in dense["param_groups"][0]  # torch.optim's form holds no codes
    from_torch = torch_opt.state_dict()
    r = p.detach().clone().requires_grad_()
    back = fusedopt.Adafactor([r], state_dtype=fmt, backend="reference", lr=1e-2)
    back.load_state_dict(from_torch)
    codes, scales = quant.encode_state(dense["state"][0]["variance"], fmt, signed=False)
    assert torch.equal(back.state[r]["variance"], codes) and torch.equal(back.state[r]["variance_absmax"], scales)


def test_an_optimizer_pickled_before_the_variance_was_nonnegative_recodes_it():
    """A whole optimizer pickled by an earlier version (no "_quant_maps" in its pickled state) holds
    the variance coded with the signed map: unpickling codes it again with the unsigned map (as a
    load does); one pickled now keeps its codes as they are."""
    p, opt = _adafactor_vector("q8", beta1=0.9)
    values = opt.state_dict(dense=True)["state"][0]["variance"]
    pickled = opt.__getstate__()
    assert pickled["_quant_maps"] == 2
    again = object.__new__(type(opt))
    again.__setstate__(copy.copy(pickled))
    assert all(torch.equal(again.state[p][k], v) for k, v in opt.state[p].items())

    old = {k: v for k, v in pickled.items() if k != "_quant_maps"}
    old["state"] = {p: dict(opt.state[p])}
    signed_codes, signed_scales = quant.encode_state(values, "q8", signed=True)
    old["state"][p]["variance"], old["state"][p]["variance_absmax"] = signed_codes, signed_scales
    restored = object.__new__(type(opt))
    restored.__setstate__(old)
    signed_values = quant.decode_state(signed_codes, signed_scales, "q8", signed=True, shape=p.shape)
    codes, scales = quant.encode_state(signed_values, "q8", signed=False)
    st = restored.state[p]
    assert torch.equal(st["variance"], codes) and torch.equal(st["variance_absmax"], scales)
    assert torch.equal(st["exp_avg"], opt.state[p]["exp_avg"])


@rule("adafactor")
def same_name_signed_variance(p, g, t, lr=0.1):
    """Another rule that took the name "adafactor", with a signed state "variance"."""
    v = state("variance")
    v.set(0.9 * v + g)
    p.set(p - lr * v)


def test_the_map_change_is_the_built_in_adafactors_only():
    """A version-1 checkpoint of another rule named "adafactor" with a signed "variance" loads its
    codes as they are; a group holding no codes saves no "quant_maps"."""
    gen = torch.Generator().manual_seed(5)
    p = torch.randn(5000, generator=gen).requires_grad_()
    opt = fusedopt.FusedOptimizer([p], same_name_signed_variance, state_dtype="q8", backend="reference")
    p.grad = torch.randn(5000, generator=gen)
    opt.step()
    old = copy.deepcopy(opt.state_dict())
    del old["param_groups"][0]["quant_maps"]
    q = p.detach().clone().requires_grad_()
    loaded = fusedopt.FusedOptimizer([q], same_name_signed_variance, state_dtype="q8", backend="reference")
    loaded.load_state_dict(old)
    assert all(torch.equal(loaded.state[q][k], v) for k, v in opt.state[p].items())
    _, plain = _adafactor_vector("fp32")
    assert "quant_maps" not in plain.state_dict()["param_groups"][0]
