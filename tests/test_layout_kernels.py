"""Fused kernels for per-row, per-column and per-block values equal the reference interpreter.

Rules here reduce over rows (the last dim), columns (the second-to-last) and blocks of a partition,
keep states of those layouts, and mix them (a per-row value reduced over columns, a per-column one
over rows): every combination the kernels index differently. Shapes stress the indexing: one row,
one column, leading batch dims, rows longer than a program's chunk, blocks of any size.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fusedopt
from codegen import launch, ops, template
from fusedopt import reference
from fusedopt.dsl import amax, lerp, mean, rms, rsqrt, rule, sqrt, state, total
from fusedopt.optimizers import adafactor, adam_mini
from kernel_check import KERNEL_DEVICES, any_kernel_device, hparam_tensors, require_kernel_device

CHUNK = launch.chunk_elements("interpreter")


@rule("factored_mix")
def factored_mix(p, g, t, lr=0.1, beta=0.9, matrix=False):
    """Every reduction over rows and columns, of full, per-row and per-column values."""
    if matrix:
        r = state("r", layout="rows")
        c = state("c", layout="cols")
        r.set(lerp(r, mean(g * g, over="rows"), 1 - beta))
        c.set(beta * c + total(abs(g), over="cols") / 8)
        scale = total(r, over="cols") + amax(c, over="rows") + mean(c, over="cols")
        peak = amax(abs(g), over="rows") + amax(g, over="cols") + total(r, over="rows") / (1 + abs(mean(g, over="cols")))
        p.set(p - lr * g * rsqrt(r * c / (scale + 1) + 1e-3) / (peak + 1))
    else:
        p.set(p - lr * g / (rms(g) + 1))


@rule("block_mix")
def block_mix(p, g, t, lr=0.1, beta=0.9):
    """Per-block sums, maxima and means, and a per-block state reduced over its own blocks."""
    v = state("v", layout="blocks")
    m = state("m")
    v.set(beta * v + (1 - beta) * mean(g * g, over="blocks"))
    m.set(lerp(m, g, 0.1))
    spread = amax(abs(g), over="blocks") - total(g, over="blocks") / 4 + total(v, over="blocks") / 16
    p.set(p - lr * m / (sqrt(v) + 1e-3) / (1 + abs(spread)))


@rule("tensor_state")
def tensor_state(p, g, t, lr=0.1, beta=0.9):
    """A per-tensor state: an average of the gradient's norm, normalising the step."""
    s = state("norm_avg", layout="tensor")
    s.set(lerp(s, sqrt(total(g * g)), 1 - beta) + amax(abs(p)) * 0)
    p.set(p - lr * g / (s + 1e-3))


@st.composite
def matrix_shapes(draw):
    rows = draw(st.sampled_from([1, 2, 3, 5, 17]))
    cols = draw(st.sampled_from([1, 2, 7, 64, CHUNK - 1, CHUNK + 3, 2 * CHUNK + 5]))
    lead = draw(st.sampled_from([(), (), (2,), (3, 2)]))
    shape = lead + (rows, cols)
    if math.prod(shape) > 6000:
        shape = (rows, cols)
    return shape


def _one_step_both(program, params, grads, states, steps, hparams, views=None):
    """One step with the fused kernel and with the reference, from copies of the same inputs."""
    out = []
    for backend in ("triton", "reference"):
        ps = [p.clone() for p in params]
        ss = {k: [t.clone() for t in v] for k, v in states.items()}
        ts = [s.clone() for s in steps]
        if backend == "triton":
            key = ops.register(program)
            flat = [t for name in program.storage_names for t in ss[name]]
            ops.fused_step(key, ps, list(grads), flat, ts, [hparams[h] for h in program.hparams])
        else:
            reference.step(program, ps, grads, ss, ts, hparams, views=views)
        out.append((ps, ss, ts))
    return out


# float32: a few float32 roundings apart (reductions sum in another order); bfloat16 parameters: one
# rounding of the stored value apart at most (a value near a rounding tie can round either way)
RTOL = {torch.float32: 2e-5, torch.bfloat16: 2.0**-7}


def _assert_agree(program, fused, ref, rtol=2e-5, atol=1e-6):
    (kp, ks, kt), (rp, rs, rt) = fused, ref
    for i, (a, b) in enumerate(zip(kp, rp)):
        torch.testing.assert_close(a, b, rtol=RTOL.get(a.dtype, rtol), atol=atol, msg=f"param {i} {tuple(a.shape)}")
        for name in program.storage_names:
            torch.testing.assert_close(ks[name][i], rs[name][i], rtol=rtol, atol=atol * 1e-2,
                                       msg=f"state {name} of param {i}")
        assert kt[i].item() == rt[i].item()


def _run_steps(program, params, grads_per_step, views=None, **values):
    device = params[0].device
    hparams = hparam_tensors(program, values, device)
    states_per = [reference.init_state(program, p, p, v) for p, v in zip(params, views or [None] * len(params))]
    states = {name: [s[name] for s in states_per] for name in program.storage_names}
    steps = [torch.zeros((), device=device) for _ in params]
    for grads in grads_per_step:
        fused, ref = _one_step_both(program, params, grads, states, steps, hparams, views)
        _assert_agree(program, fused, ref)
        params, states, steps = fused  # continue from the kernel's state
    return params


def _random_case(shapes, n_steps, seed, device, dtype=torch.float32):
    """Parameters of ``shapes`` (ints: flat sizes) and ``n_steps`` lists of gradients, seeded."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(device, dtype) for s in shapes]
    grads = [[torch.randn(s, generator=gen).to(device) for s in shapes] for _ in range(n_steps)]
    return params, grads


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@given(shapes=st.lists(matrix_shapes(), min_size=1, max_size=3), n_steps=st.integers(1, 3),
       seed=st.integers(0, 2**16), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_row_and_column_reductions_and_states_match_the_reference(device, shapes, n_steps, seed, dtype):
    require_kernel_device(device)
    params, grads = _random_case(shapes, n_steps, seed, device, dtype)
    _run_steps(factored_mix.program(matrix=True), params, grads)


@st.composite
def block_views(draw):
    n_blocks = draw(st.sampled_from([1, 2, 3, 8]))
    size = draw(st.sampled_from([1, 3, 7, 64, CHUNK - 1, CHUNK + 1, 2 * CHUNK + 3]))
    return n_blocks, size


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@given(views=st.lists(block_views(), min_size=1, max_size=4), n_steps=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_block_reductions_and_states_match_the_reference(device, views, n_steps, seed):
    require_kernel_device(device)
    params, grads = _random_case([n * b for n, b in views], n_steps, seed, device)
    _run_steps(block_mix.program(), params, grads, views=views)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@given(sizes=st.lists(st.sampled_from([0, 1, 7, CHUNK - 1, CHUNK + 1, 3 * CHUNK + 5]), min_size=1, max_size=4),
       n_steps=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_per_tensor_states_match_the_reference(device, sizes, n_steps, seed):
    require_kernel_device(device)
    params, grads = _random_case(sizes, n_steps, seed, device)
    after = _run_steps(tensor_state.program(), params, grads)
    assert all(p.shape == (n,) for p, n in zip(after, sizes))


def test_reductions_see_their_argument_at_every_element():
    """total over rows of a per-row value is shape[-1] times it; over columns, the sum of the rows."""
    @rule("counts")
    def counts(p, g, t, lr=1.0, matrix=False):
        if matrix:
            r = state("r", layout="rows")
            r.set(mean(g, over="rows"))
            p.set(p + total(r, over="rows") + 10 * total(r, over="cols") + 100 * amax(g, over="cols"))
        else:
            p.set(p)

    device = any_kernel_device()
    g = torch.arange(2 * 3 * 4, dtype=torch.float32, device=device).reshape(2, 3, 4)
    p = torch.zeros_like(g)
    row_mean = g.mean(-1, keepdim=True)
    expected = 4 * row_mean + 10 * row_mean.sum(-2, keepdim=True) + 100 * g.amax(-2, keepdim=True)
    for backend in ("triton", "reference"):
        q = p.clone()
        program = counts.program(matrix=True)
        states = {"r": [torch.zeros(2, 3, 1, device=device)]}
        if backend == "triton":
            ops.fused_step(ops.register(program), [q], [g], states["r"], [torch.zeros((), device=device)],
                           [torch.tensor(1.0, dtype=torch.float64, device=device)])
        else:
            reference.step(program, [q], [g], states, [torch.zeros(())],
                           {"lr": torch.tensor(1.0, dtype=torch.float64)})
        torch.testing.assert_close(q.cpu(), expected.cpu(), msg=backend)


def test_a_wrong_column_index_is_caught(monkeypatch):
    """The property test above fails for a kernel that forgets the leading (batch) dims of a column."""
    device = any_kernel_device()
    monkeypatch.setitem(template.LAYOUT_INDEX, "cols", "offs % g_n")
    ops.source.cache_clear()
    try:
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(3, 4, 5, generator=gen).to(device)]
        grads = [[torch.randn(3, 4, 5, generator=gen).to(device)]]
        with pytest.raises(AssertionError):
            _run_steps(factored_mix.program(matrix=True), params, grads)
    finally:
        monkeypatch.undo()
        ops.source.cache_clear()


# ---- the built-in rules ---------------------------------------------------------------------------

@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("variant", [dict(), dict(hf=True), dict(hf=True, use_first_moment=True),
                                     dict(use_first_moment=True)])
@given(shapes=st.lists(matrix_shapes(), min_size=1, max_size=3), n_steps=st.integers(1, 3),
       seed=st.integers(0, 2**16), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       lr=st.sampled_from([1e-3, 0.05]), weight_decay=st.sampled_from([0.0, 0.01]))
def test_factored_adafactor_matches_the_reference(device, variant, shapes, n_steps, seed, dtype, lr, weight_decay):
    require_kernel_device(device)
    params, grads = _random_case(shapes, n_steps, seed, device, dtype)
    _run_steps(adafactor.program(matrix=True, **variant), params, grads, lr=lr, weight_decay=weight_decay)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@given(views=st.lists(block_views(), min_size=1, max_size=4), n_steps=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_adam_mini_matches_the_reference(device, views, n_steps, seed):
    require_kernel_device(device)
    params, grads = _random_case([n * b for n, b in views], n_steps, seed, device)
    _run_steps(adam_mini.program(), params, grads, views=views, weight_decay=0.1)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("state_dtype", ["q8", "q4"])
def test_adam_mini_with_a_quantized_first_moment_matches_the_reference(device, state_dtype):
    """The quantized m stores its scales beside its codes: the per-block state must still be found
    by name (the block size comes from its length), in one-pass and tiled launches alike."""
    require_kernel_device(device)
    views = [(16, 64), (4, 1000), (1, 300)]
    params, grads = _random_case([n * b for n, b in views], 2, 11, device)
    _run_steps(adam_mini.program(state_dtype=state_dtype), params, grads, views=views, weight_decay=0.1)


def test_factored_adafactor_is_four_launches_and_adam_mini_three():
    """Adafactor: sums of g^2 and p^2; the new factors (stored) and their mean; RMS(U); the update.
    Adam-mini: block means of g^2; the new block second moments (stored); the update."""
    assert ops.lowered(adafactor.program(matrix=True)).n_phases + 1 == 4
    assert ops.lowered(adam_mini.program()).n_phases + 1 == 3
    text = fusedopt.phases(adafactor, matrix=True)
    assert "phase 3 (the updating kernel)" in text and "store rows value" in text


def test_optimizers_run_factored_matrices_fused():
    device = any_kernel_device()
    before = launch.launches["adafactor"]
    p = torch.randn(6, 5, device=device, requires_grad=True)
    opt = fusedopt.Adafactor([p], backend="triton")
    p.grad = torch.randn_like(p)
    opt.step()
    assert launch.launches["adafactor"] - before == 4
    assert opt.state[p]["row_var"].shape == (6, 1) and opt.state[p]["col_var"].shape == (1, 5)


def test_a_transposed_matrix_takes_the_reference_path_and_agrees():
    """Per-row values are found in row-major order: a non-contiguous parameter is stepped eagerly."""
    device = any_kernel_device()
    results = []
    for backend in ("triton", "reference"):
        torch.manual_seed(0)
        base = torch.randn(5, 6, device=device)
        p = base.t().requires_grad_()  # not contiguous
        opt = fusedopt.Adafactor([p], backend=backend, lr=0.05)
        for _ in range(2):
            p.grad = torch.randn(6, 5, device=device)
            opt.step()
        results.append(p.detach().clone())
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


# ---- every phase in one kernel ---------------------------------------------------------------------

@pytest.mark.parametrize("views,launches", [([(8, 64), (2, CHUNK)], 1), ([(8, 64), (3, 7)], 1 + 3)])
def test_blocks_that_fit_a_chunk_take_every_phase_in_one_launch(views, launches):
    """Adam-mini's tensors whose blocks each lie in one program's chunk: one launch per step; the rest
    take the three phases. Either way the result is the reference's."""
    device = any_kernel_device()
    gen = torch.Generator().manual_seed(2)
    params = [torch.randn(n * b, generator=gen).to(device) for n, b in views]
    grads = [[torch.randn(n * b, generator=gen).to(device) for n, b in views] for _ in range(3)]
    before = launch.launches["adam_mini"]
    _run_steps(adam_mini.program(), params, grads, views=views, weight_decay=0.1)
    assert launch.launches["adam_mini"] - before == 3 * launches


@rule("block_and_tensor")
def block_and_tensor(p, g, t, lr=0.1):
    v = state("v", layout="blocks")
    v.set(mean(g * g, over="blocks"))
    p.set(p - lr * g / (sqrt(v) + rms(g) + 1e-3))


def test_one_kernel_for_a_rule_reducing_over_whole_tensors_would_be_wrong(monkeypatch):
    """Why a per-tensor reduction rules the single kernel out: a program cannot wait for the others'
    share of the tensor's sum. Forcing it is caught by the comparison with the reference."""
    device = any_kernel_device()
    views = [(4, 64), (2, CHUNK)]  # blocks that fit, in several chunks
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(n * b, generator=gen).to(device) for n, b in views]
    grads = [[torch.randn(n * b, generator=gen).to(device) for n, b in views]]
    assert not ops.single_pass_possible(ops.lowered(block_and_tensor.program()))
    _run_steps(block_and_tensor.program(), params, grads, views=views)  # the phased kernels agree
    monkeypatch.setattr(ops, "single_pass_possible", lambda low: True)
    with pytest.raises(AssertionError):
        _run_steps(block_and_tensor.program(), params, grads, views=views)


# ---- empty tensors -----------------------------------------------------------------------------------

@rule("cols_and_tensor")
def cols_and_tensor(p, g, t, lr=0.1):
    s = state("s", layout="tensor")
    s.set(s + 1)
    p.set(p - lr * g * mean(g * g, over="cols") - s * 0)


def test_an_empty_tensor_keeps_its_per_tensor_state_in_tiled_phases():
    """The store of a per-tensor state shares a phase (over tiles) with a column reduction; an empty
    tensor gets a masked tile of its own, so its state still advances, as in the reference."""
    device = any_kernel_device()
    program = cols_and_tensor.program()
    assert template.tiled_phases(ops.lowered(program))
    sizes = [0, 5]
    result = {}
    for backend in ("triton", "reference"):
        ps = [torch.zeros(n, device=device) for n in sizes]
        gs = [torch.ones(n, device=device) for n in sizes]
        ss = [torch.zeros((), device=device) for _ in sizes]
        ts = [torch.zeros((), device=device) for _ in sizes]
        lr = torch.tensor(0.1, dtype=torch.float64, device=device)
        for _ in range(3):
            if backend == "triton":
                ops.fused_step(ops.register(program), ps, gs, ss, ts, [lr])
            else:
                reference.step(program, ps, gs, {"s": ss}, ts, {"lr": lr})
        result[backend] = [x.item() for x in ss]
    assert result["triton"] == result["reference"] == [3.0, 3.0]


def test_empty_matrices_in_a_fused_adafactor_step():
    """A (0, 4) matrix still has a (1, 4) column factor: such tensors take the reference path."""
    device = any_kernel_device()
    shapes = [(0, 4), (3, 4), (4, 0)]
    finals = {}
    for backend in ("triton", "reference"):
        params = [torch.ones(s, device=device).requires_grad_() for s in shapes]
        opt = fusedopt.Adafactor(params, backend=backend)
        for _ in range(2):
            for p in params:
                p.grad = torch.full_like(p, 0.5)
            opt.step()
        finals[backend] = (params[1].detach().cpu(), opt.state[params[0]]["col_var"].shape,
                           opt.state[params[2]]["row_var"].shape)
    torch.testing.assert_close(finals["triton"][0], finals["reference"][0])
    assert finals["triton"][1:] == finals["reference"][1:] == ((1, 4), (4, 1))
