"""Fused Triton kernels equal the reference interpreter, step by step, for any parameter list."""

from __future__ import annotations

import pytest
import sympy
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fusedopt
from codegen import launch
from fusedopt.dsl import lerp, rule, sqrt, state
from kernel_check import (KERNEL_DEVICES, builtin_programs, compare_step, fresh_states, hparam_tensors,
                          require_kernel_device, run_one_step)

PROGRAMS = builtin_programs()
CHUNK = launch.chunk_elements("interpreter")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# Sizes that stress the chunking: empty, single, primes, chunk boundaries, a few chunks.
SIZES = st.sampled_from([0, 1, 2, 3, 7, 31, 127, 255, 256, 257, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 3, 1499])


@st.composite
def shapes(draw):
    n = draw(SIZES)
    ndim = draw(st.integers(1, 4))
    if ndim == 1 or n == 0:
        return (n,) if ndim == 1 else (n,) + (1,) * (ndim - 1)
    # split n into ndim factors: (n, 1, ..) permuted, or a real factorisation when n factors
    factors = [n] + [1] * (ndim - 1)
    for d in (2, 3, 5):
        if factors[0] % d == 0 and draw(st.booleans()):
            factors[0] //= d
            factors[draw(st.integers(1, ndim - 1))] *= d
    return tuple(draw(st.permutations(factors)))


@st.composite
def grad_like(draw, shape, dtype):
    kind = draw(st.sampled_from(["normal", "tiny", "huge", "zero", "mixed"]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    if kind == "tiny":
        g = g * 10.0 ** draw(st.integers(-30, -6))
    elif kind == "huge":
        g = g * 10.0 ** draw(st.integers(3, 4 if dtype == torch.float16 else 6))
    elif kind == "zero":
        g = torch.zeros(shape, dtype=torch.float64)
    elif kind == "mixed":
        g = g * torch.where(torch.rand(shape, generator=gen) < 0.5, 1e-8, 1.0)
    return g.to(dtype)


def hparams_for(program, draw):
    values = {}
    for h in program.hparams:
        if h.startswith("beta") or h in ("momentum",):
            values[h] = draw(st.floats(0.0, 0.999))
        elif h == "dampening":
            values[h] = 0.0 if dict(program.options).get("nesterov") else draw(st.floats(0.0, 0.9))
        elif h == "eps":
            values[h] = draw(st.sampled_from([1e-8, 1e-6, 1e-3]))
        elif h == "lr":
            values[h] = draw(st.floats(1e-5, 0.5))
        elif h == "max_grad_norm":
            values[h] = draw(st.sampled_from([1e-3, 0.5, 10.0, 1e6]))
        else:
            values[h] = draw(st.floats(0.0, 0.2))
    return values


@st.composite
def cases(draw, program_strategy=st.sampled_from(PROGRAMS)):
    name, program = draw(program_strategy)
    n = draw(st.integers(0, 5))
    mixed = draw(st.booleans())
    base = draw(st.sampled_from(DTYPES))
    dtypes = [draw(st.sampled_from(DTYPES)) if mixed else base for _ in range(n)]
    shape_list = [draw(shapes()) for _ in range(n)]
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(d) for s, d in zip(shape_list, dtypes)]
    steps = draw(st.integers(1, 4))
    grads = [[draw(grad_like(s, d)) for s, d in zip(shape_list, dtypes)] for _ in range(steps)]
    return name, program, params, grads, hparams_for(program, draw)


def run_trajectory(program, params, grads, hparams, device):
    params = [p.to(device) for p in params]
    states = fresh_states(program, params, grads[0] if grads else [])
    steps = [torch.zeros((), device=device) for _ in params]
    hp = hparam_tensors(program, hparams, device)
    for gs in grads:
        gs = [g.to(device) for g in gs]
        params, states, steps = compare_step(program, params, gs, states, steps, hp)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@given(case=cases())
def test_fused_kernel_matches_reference_interpreter(device, case):
    require_kernel_device(device)
    name, program, params, grads, hparams = case
    run_trajectory(program, params, grads, hparams, device)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("name,program", PROGRAMS, ids=[n for n, _ in PROGRAMS])
def test_every_builtin_matches_reference_on_awkward_sizes(device, name, program):
    require_kernel_device(device)
    gen = torch.Generator().manual_seed(1)
    shapes_ = [(1,), (CHUNK + 1,), (3, 5, 7), (0,), (CHUNK,)]
    params = [torch.randn(s, generator=gen) for s in shapes_]
    grads = [[torch.randn(s, generator=gen) for s in shapes_] for _ in range(3)]
    run_trajectory(program, params, grads, {}, device)


def test_a_planted_bug_is_caught_by_the_same_check():
    """eps inside the square root: the comparison against the correct rule's reference must fail."""

    @rule("adam_eps_inside")
    def wrong(p, g, t, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8):
        m = state("exp_avg")
        v = state("exp_avg_sq")
        m.set(lerp(m, g, 1 - beta1))
        v.set(beta2 * v + (1 - beta2) * g * g)
        p.set(p - lr / (1 - beta1**t) * m / sqrt(v / (1 - beta2**t) + eps))

    right = fusedopt.optimizers.adam.program()
    bad = wrong.program()
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(300, generator=gen)]
    grads = [torch.randn(300, generator=gen) * 1e-6]  # small gradients: sqrt(v) ~ sqrt(eps)
    states = fresh_states(right, params, grads)
    steps = [torch.zeros(())]
    hp = hparam_tensors(right, {}, "cpu")
    from kernel_check import _assert_close, run_one_step

    kp, ks, kt = [params[0].clone()], {k: [v[0].clone()] for k, v in states.items()}, [steps[0].clone()]
    run_one_step(bad, kp, grads, ks, kt, hp, "triton")
    rp, rs, rt = [params[0].clone()], {k: [v[0].clone()] for k, v in states.items()}, [steps[0].clone()]
    run_one_step(right, rp, grads, rs, rt, hp, "reference")
    with pytest.raises(AssertionError, match="kernel"):
        _assert_close("param", kp[0], rp[0], params[0], grads[0], 8 * 2.0**-24)


def test_a_planted_printer_bug_is_caught(monkeypatch):
    """A printer that swaps max for min must make the property fail (proof the check can fail)."""
    from codegen import ops
    from codegen.printer import TritonPrinter

    monkeypatch.setattr(TritonPrinter, "_print_Max", TritonPrinter._print_Min)
    ops.source.cache_clear()
    try:
        program = fusedopt.optimizers.adam.program(amsgrad=True)
        gen = torch.Generator().manual_seed(3)
        params = [torch.randn(50, generator=gen)]
        grads = [[torch.randn(50, generator=gen)] for _ in range(3)]
        with pytest.raises(AssertionError):
            run_trajectory(program, params, grads, {}, "cpu")
    finally:
        ops.source.cache_clear()


def test_random_rules_match_reference():
    """Rules built at random from the DSL's operators run the same through both backends."""
    strategies = pytest.importorskip("strategies")
    if not hasattr(strategies, "random_rules"):
        pytest.skip("tests/strategies.py has no random_rules strategy")

    @settings(max_examples=15)
    @given(r=strategies.random_rules(), seed=st.integers(0, 2**31 - 1), n=st.sampled_from([1, 7, CHUNK + 1]))
    def check(r, seed, n):
        program = r.program() if isinstance(r, fusedopt.Rule) else r
        gen = torch.Generator().manual_seed(seed)
        params = [torch.randn(n, generator=gen), torch.randn(3, 4, generator=gen)]
        grads = [[torch.randn_like(p) for p in params] for _ in range(3)]
        states = fresh_states(program, params, grads[0])
        steps = [torch.zeros(()) for _ in params]
        hp = hparam_tensors(program, {}, "cpu")
        for gs in grads:
            params, states, steps = compare_step(program, params, gs, states, steps, hp, rtol=1e-5)

    require_kernel_device("cpu")
    check()


def test_symbolic_exponent_rule_matches_reference():
    """pow with a symbolic exponent and a hoisted boolean scalar (eq(t, 1)) print and run."""
    from fusedopt.dsl import absolute, eq, where

    @rule("odd_rule")
    def odd(p, g, t, lr=0.1, power=1.5):
        p.set(p - lr * where(eq(t, 1), g, absolute(g) ** power * sympy.sign(g)))

    require_kernel_device("cpu")
    program = odd.program()
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(100, generator=gen)]
    grads = [[torch.randn(100, generator=gen)] for _ in range(3)]
    run_trajectory(program, params, grads, {}, "cpu")


@pytest.mark.parametrize("form", ["g**5", "g**6", "g**7", "g**-3", "g**k", "g**(-k)"])
@pytest.mark.parametrize("k", [3.0, 2.0, 0.0, 2.5])
def test_powers_of_negative_bases_match_reference(form, k):
    """Powers the printer cannot multiply out: a negative base keeps the sign of an odd whole
    exponent (torch.pow), ``x ** 0`` is 1, a fractional power of a negative base is NaN."""
    require_kernel_device("cpu")
    power = {"g**5": lambda g, k: g**5, "g**6": lambda g, k: g**6, "g**7": lambda g, k: g**7,
             "g**-3": lambda g, k: g**-3, "g**k": lambda g, k: g**k, "g**(-k)": lambda g, k: g ** (-k)}[form]

    @rule("powers")
    def powers(p, g, t, lr=0.01, k=1.0):
        p.set(p - lr * power(g, k))

    program = powers.program()
    g = torch.tensor([-2.0, -1.5, -1.0, -0.75, -0.0, 0.0, 0.5, 1.0, 1.25, 3.0, float("-inf"), float("inf")])
    params, grads = [torch.ones(g.numel())], [[g], [-g]]
    states = fresh_states(program, params, grads[0])
    steps = [torch.zeros(())]
    hp = hparam_tensors(program, {"k": k}, "cpu")
    for gs in grads:
        params, states, steps = compare_step(program, params, gs, states, steps, hp, rtol=2e-6)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("name,program", [
    ("adam", fusedopt.optimizers.adam.program()), ("adam-amsgrad", fusedopt.optimizers.adam.program(amsgrad=True)),
    ("adamw", fusedopt.optimizers.adamw.program()), ("lion", fusedopt.optimizers.lion.program()),
    ("sgd-nesterov", fusedopt.optimizers.sgd.program(with_momentum=True, nesterov=True)),
], ids=lambda x: x if isinstance(x, str) else "")
def test_elementwise_builtins_write_the_same_bits_as_the_reference(device, name, program):
    """For float32 parameters the reference groups per-tensor factors as the kernels do and rounds
    its square roots as IEEE does, so an elementwise rule's parameters and states agree bit for bit,
    step after step (rules with reductions sum in another order and agree to a few ulps)."""
    require_kernel_device(device)
    gen = torch.Generator().manual_seed(7)
    shapes_ = [(1,), (7,), (CHUNK + 1,), (33, 65)]
    params = [torch.randn(s, generator=gen).to(device) for s in shapes_]
    hp = hparam_tensors(program, {"lr": 0.01, "weight_decay": 0.1}, device)
    states = fresh_states(program, params, params)
    steps = [torch.zeros((), device=device) for _ in params]
    for _ in range(4):
        grads = [torch.randn(s, generator=gen).to(device) for s in shapes_]
        (kp, ks, kt), (rp, rs, rt) = [([p.clone() for p in params], {k: [t.clone() for t in v] for k, v in states.items()},
                                       [s.clone() for s in steps]) for _ in range(2)]
        run_one_step(program, kp, grads, ks, kt, hp, "triton")
        run_one_step(program, rp, grads, rs, rt, hp, "reference")
        for i in range(len(params)):
            assert torch.equal(kp[i], rp[i]), (name, i, int((kp[i] != rp[i]).sum()))
            for k in states:
                assert torch.equal(ks[k][i], rs[k][i]), (name, k, i)
        params, states, steps = kp, ks, kt


def test_a_power_that_drops_the_sign_of_a_negative_base_is_caught(monkeypatch):
    """The printer's old power, 2 ** (e * log2(b)), is NaN for a negative base: the comparison of
    test_powers_of_negative_bases_match_reference must fail on it."""
    from codegen import ops
    from codegen.printer import TritonPrinter

    require_kernel_device("cpu")
    monkeypatch.setattr(TritonPrinter, "_pow_general",
                        lambda self, base, exponent: f"tl.exp2({exponent} * tl.log2({self(base)}))")
    ops.source.cache_clear()
    try:
        with pytest.raises(AssertionError, match="NaN pattern"):
            test_powers_of_negative_bases_match_reference("g**k", 3.0)
    finally:
        ops.source.cache_clear()
