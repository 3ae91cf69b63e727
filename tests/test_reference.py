"""The reference interpreter: fp32 backend vs fp64 oracle, built-ins vs torch.optim and test vectors.

Tolerances of the property tests are derived from the dtypes in ``oracle.py``; the tests below
``# the check can fail`` show that those tolerances reject wrong rules.
"""

from __future__ import annotations

import oracle
import pytest
import strategies
import torch
from hypothesis import HealthCheck, Phase, find, given, settings
from strategies import Case, TensorSpec

import fusedopt
from fusedopt import reference
from fusedopt.dsl import rule, sqrt
from fusedopt.optimizers.adam import moments

FP32, FP64, BF16 = torch.float32, torch.float64, torch.bfloat16


# ---- property: the fp32 backend equals the fp64 oracle -------------------------------------------

@pytest.mark.parametrize("name", ["adam", "adamw", "sgd", "lion", "random"])
@given(data=strategies.st.data())
def test_fp32_backend_matches_fp64_oracle(name, data):
    case = data.draw(strategies.rule_cases(name), label="case")
    oracle.assert_matches_oracle(case)


def test_oracle_check_covers_every_builtin_option():
    """Every built-in, for every combination of its static options, passes one fixed case."""
    specs = (TensorSpec((7, 3), FP32, "mixed", 1), TensorSpec((129,), BF16, "normal", 2))
    for r in strategies.BUILTIN_RULES.values():
        for program in strategies.all_option_programs(r):
            if dict(program.options).get("nesterov") and not dict(program.options).get("with_momentum"):
                continue  # not a valid combination (SGD rejects it)
            hp = dict(zip(program.hparams, program.defaults))
            hp.update({k: v for k, v in {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.05}.items() if k in hp})
            oracle.assert_matches_oracle(Case(program, hp, specs, 4))


# ---- the check can fail --------------------------------------------------------------------------

@rule("adam")
def adam_eps_inside_sqrt(p, g, t, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                         amsgrad=False, maximize=False):
    """Adam with a classic mistake: eps added to v-hat under the square root."""
    g = (-g if maximize else g) + weight_decay * p
    m, v = moments(g, beta1, beta2, amsgrad)
    p.set(p - lr / (1 - beta1**t) * m / sqrt(v / (1 - beta2**t) + eps))


@rule("adam")
def adam_off_by_one_bias_correction(p, g, t, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                                    amsgrad=False, maximize=False):
    """Adam with the second bias correction one step ahead: 1 - beta2**(t+1)."""
    g = (-g if maximize else g) + weight_decay * p
    m, v = moments(g, beta1, beta2, amsgrad)
    p.set(p - lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2 ** (t + 1)) + eps))


BROKEN = {"eps_inside_sqrt": adam_eps_inside_sqrt, "off_by_one_bias_correction": adam_off_by_one_bias_correction}


def _failures_of(broken, case: Case) -> list[str]:
    """Run ``broken`` through the fp32 backend, judged against the correct rule's fp64 oracle."""
    bad = broken.program(**dict(case.program.options))
    return oracle.run_case(case, backend_for=lambda _: oracle.fp32_backend(bad), oracle_program=case.program)


@pytest.mark.parametrize("broken", list(BROKEN), ids=list(BROKEN))
def test_oracle_check_rejects_broken_adam_on_tiny_gradients(broken):
    program = fusedopt.optimizers.adam.program()
    hp = dict(zip(program.hparams, program.defaults))
    case = Case(program, hp, (TensorSpec((64,), FP32, "tiny", 0),), 3)
    assert oracle.run_case(case) == []  # the correct rule passes this very case
    failures = _failures_of(BROKEN[broken], case)
    assert failures, f"the oracle check accepted the broken rule {broken}"


@pytest.mark.parametrize("broken", list(BROKEN), ids=list(BROKEN))
def test_property_search_finds_a_counterexample_to_broken_adam(broken):
    """The same strategy and check as the property test find a case that exposes the broken rule."""
    found = find(
        strategies.rule_cases("adam", min_params=1, max_params=2),
        lambda case: bool(_failures_of(BROKEN[broken], case)),
        settings=settings(max_examples=50, database=None, derandomize=True, phases=[Phase.generate],
                          suppress_health_check=list(HealthCheck)),
    )
    assert _failures_of(BROKEN[broken], found)
    assert oracle.run_case(found) == []


@pytest.mark.parametrize("dtype", [FP32, BF16, torch.float16])
def test_oracle_tolerance_rejects_a_perturbation_of_a_few_ulps(dtype):
    """A backend off by 16 ulps of the storage dtype (relative) on p fails the check: the derived
    tolerance is a few ulps of |p| + |update|, not a loose relative tolerance."""
    program = fusedopt.optimizers.adamw.program()
    hp = dict(zip(program.hparams, program.defaults))
    case = Case(program, hp, (TensorSpec((257,), dtype, "normal", 3),), 2)
    assert oracle.run_case(case) == []
    ulp = 2 * oracle.UNIT_ROUNDOFF[dtype]

    def perturbed(prog):
        def run(params, grads, states, steps, hparams):
            reference.step(prog, params, grads, states, steps, hparams)
            for p in params:
                p.mul_(1 + 16 * ulp)
        return run

    assert oracle.run_case(case, backend_for=perturbed)


def test_error_bound_of_sign_covers_a_flip_only_where_the_argument_is_uncertain():
    import sympy

    x = sympy.Symbol("x")
    env = {"x": torch.tensor([1.0, 1e-30, 0.0, -2.0], dtype=FP64)}
    node = oracle.ErrorBound(env, frozenset())(sympy.sign(x - sympy.Float(1e-30)))
    # x - 1e-30 is off by roundings of about 2**-24 |x|: only the element where it is 0 is uncertain
    assert node.err.tolist() == [0.0, 1.0, 0.0, 0.0]


# ---- built-ins against torch.optim ---------------------------------------------------------------

TORCH_CONFIGS = [
    ("Adam", {}),
    ("Adam", {"weight_decay": 0.1}),
    ("Adam", {"amsgrad": True, "weight_decay": 0.05}),
    ("Adam", {"maximize": True, "betas": (0.8, 0.99), "eps": 1e-6}),
    ("AdamW", {}),
    ("AdamW", {"weight_decay": 0.3, "amsgrad": True}),
    ("AdamW", {"maximize": True, "weight_decay": 0.0}),
    ("SGD", {}),
    ("SGD", {"momentum": 0.9}),
    ("SGD", {"momentum": 0.9, "dampening": 0.3, "weight_decay": 0.01}),
    ("SGD", {"momentum": 0.8, "nesterov": True, "weight_decay": 0.1}),
    ("SGD", {"momentum": 0.5, "maximize": True}),
]


def _trajectories(cls_name: str, kwargs: dict, dtype: torch.dtype, steps: int = 10):
    gen = torch.Generator().manual_seed(0)
    shapes = [(5, 7), (13,), (2, 3, 4), (1,)]
    init = [torch.randn(s, generator=gen, dtype=FP64).to(dtype) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=FP64).to(dtype) for s in shapes] for _ in range(steps)]
    ours = [p.clone().requires_grad_() for p in init]
    theirs = [p.clone().requires_grad_() for p in init]
    kwargs = {"lr": 0.01, **kwargs}
    opt_ours = getattr(fusedopt, cls_name)(ours, backend="reference", **kwargs)
    opt_theirs = getattr(torch.optim, cls_name)(theirs, foreach=False, **kwargs)
    for k in range(steps):
        for p, q, g in zip(ours, theirs, grads[k]):
            p.grad, q.grad = g.clone(), g.clone()
        opt_ours.step()
        opt_theirs.step()
        yield k, ours, theirs, opt_ours, opt_theirs


@pytest.mark.parametrize("cls_name, kwargs", TORCH_CONFIGS, ids=[f"{c}-{k}" for c, k in TORCH_CONFIGS])
def test_trajectory_matches_torch_optim_fp32(cls_name, kwargs):
    for k, ours, theirs, _, _ in _trajectories(cls_name, kwargs, FP32):
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=lambda m, k=k: f"step {k + 1}: {m}")


@pytest.mark.parametrize("cls_name, kwargs", TORCH_CONFIGS, ids=[f"{c}-{k}" for c, k in TORCH_CONFIGS])
def test_trajectory_matches_torch_optim_fp64(cls_name, kwargs):
    for k, ours, theirs, opt_ours, opt_theirs in _trajectories(cls_name, kwargs, FP64):
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14, msg=lambda m, k=k: f"step {k + 1}: {m}")
    for p, q in zip(ours, theirs):  # and the states, under torch's names
        for key, value in opt_theirs.state[q].items():
            torch.testing.assert_close(opt_ours.state[p][key].to(value.dtype), value, rtol=1e-12, atol=1e-14)


def _lion_formula(params, grads_per_step, lr, beta1, beta2, wd):
    """Lion as written in the google/automl code, in float64."""
    params = [p.clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    for grads in grads_per_step:
        for i, g in enumerate(grads):
            params[i] = params[i] * (1 - lr * wd)
            c = beta1 * m[i] + (1 - beta1) * g
            params[i] = params[i] - lr * torch.sign(c)
            m[i] = beta2 * m[i] + (1 - beta2) * g
        yield [p.clone() for p in params]


@pytest.mark.parametrize("dtype, rtol", [(FP64, 1e-12), (FP32, 1e-6)])
def test_lion_trajectory_matches_the_formula(dtype, rtol):
    gen = torch.Generator().manual_seed(1)
    init = [torch.randn(s, generator=gen, dtype=FP64) for s in [(4, 5), (11,)]]
    grads = [[torch.randn(p.shape, generator=gen, dtype=FP64) for p in init] for _ in range(8)]
    ours = [p.to(dtype).requires_grad_() for p in init]
    opt = fusedopt.Lion(ours, lr=0.01, betas=(0.9, 0.99), weight_decay=0.1, backend="reference")
    for k, want in enumerate(_lion_formula([p.to(dtype).to(FP64) for p in init], grads, 0.01, 0.9, 0.99, 0.1)):
        for p, g in zip(ours, grads[k]):
            p.grad = g.to(dtype)
        opt.step()
        for p, w in zip(ours, want):
            torch.testing.assert_close(p.detach().to(FP64), w, rtol=rtol, atol=rtol / 10,
                                       msg=lambda m, k=k: f"step {k + 1}: {m}")


# ---- worked vectors: three steps of each rule from fixed inputs, to 10 significant digits ----------

THETA0 = [1.0, -2.0, 0.5]
GRADS = [[0.1, -0.2, 0.3], [0.0, 0.5, -0.1], [1.0, 1.0, 1.0]]

VECTORS = {
    "adam": (
        "Adam", {"lr": 0.01, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0},
        {1: {"param": [0.990000001, -1.990000001, 0.4900000003], "exp_avg": [0.01, -0.02, 0.03],
             "exp_avg_sq": [1e-05, 4e-05, 9e-05]},
         2: {"param": [0.9832994194, -1.994422153, 0.4859978148], "exp_avg": [0.009, 0.032, 0.017],
             "exp_avg_sq": [9.99e-06, 0.00028996, 9.991e-05]},
         3: {"param": [0.9764280476, -2.001667358, 0.4789744601], "exp_avg": [0.1081, 0.1288, 0.1153],
             "exp_avg_sq": [0.00100998001, 0.00128967004, 0.00109981009]}},
    ),
    "adamw": (
        "AdamW", {"lr": 0.01, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1},
        {1: {"param": [0.989000001, -1.988000001, 0.4895000003], "exp_avg": [0.01, -0.02, 0.03],
             "exp_avg_sq": [1e-05, 4e-05, 9e-05]},
         2: {"param": [0.9813104194, -1.990434153, 0.4850083148], "exp_avg": [0.009, 0.032, 0.017],
             "exp_avg_sq": [9.99e-06, 0.00028996, 9.991e-05]},
         3: {"param": [0.9734577372, -1.995688924, 0.4774999518], "exp_avg": [0.1081, 0.1288, 0.1153],
             "exp_avg_sq": [0.00100998001, 0.00128967004, 0.00109981009]}},
    ),
    "adam-l2": (
        "Adam", {"lr": 0.01, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1},
        {1: {"param": [0.9900000005, -1.99, 0.4900000003], "exp_avg": [0.02, -0.04, 0.035]},
         2: {"param": [0.9806929425, -1.989122692, 0.4844430175]},
         3: {"param": [0.9730009673, -1.994182135, 0.4770175537],
             "exp_avg": [0.1349169294, 0.07479877308, 0.1286044302],
             "exp_avg_sq": [0.001255467414, 0.0008919321114, 0.001224088975]}},
    ),
    "lion": (
        "Lion", {"lr": 0.01, "betas": (0.9, 0.99), "weight_decay": 0.1},
        {1: {"param": [0.989, -1.988, 0.4895], "exp_avg": [0.001, -0.002, 0.003]},
         2: {"param": [0.978011, -1.996012, 0.4990105], "exp_avg": [0.00099, 0.00302, 0.00197]},
         3: {"param": [0.967032989, -2.004015988, 0.4885114895], "exp_avg": [0.0109801, 0.0129898, 0.0119503]}},
    ),
}


@pytest.mark.parametrize("dtype", [FP64, FP32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("vector", list(VECTORS))
def test_reproduces_reference_test_vectors(vector, dtype):
    cls_name, kwargs, expected = VECTORS[vector]
    p = torch.tensor(THETA0, dtype=dtype, requires_grad=True)
    opt = getattr(fusedopt, cls_name)([p], backend="reference", **kwargs)
    # float64: the vectors are printed to 10 significant digits; fp32: atol 3e-7
    # (on the parameter; fp32 states, computed with fewer roundings, are held to 1e-6 relative)
    for t, grad in enumerate(GRADS, start=1):
        p.grad = torch.tensor(grad, dtype=dtype)
        opt.step()
        for key, want in expected[t].items():
            got = p.detach() if key == "param" else opt.state[p][key]
            if dtype == FP64:
                tol = {"rtol": 1e-9, "atol": 1e-12}
            else:
                tol = {"rtol": 0.0, "atol": 3e-7} if key == "param" else {"rtol": 1e-6, "atol": 1e-12}
            torch.testing.assert_close(got.to(FP64), torch.tensor(want, dtype=FP64), **tol,
                                       msg=lambda m, t=t, key=key: f"{vector} t={t} {key}: {m}")
        assert float(opt.state[p]["step"]) == t


def test_float32_square_roots_are_correctly_rounded():
    """The portable backend's sqrt is IEEE's (as the kernels' sqrt_rn), not torch's CPU approximation."""
    import numpy as np

    from fusedopt.reference import _sqrt

    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(200_000, generator=gen) * 10.0 ** torch.randint(-40, 38, (200_000,), generator=gen),
                   torch.tensor([0.0, -0.0, 1.0, 2.0, 1e-45, 3.4e38, float("inf"), -1.0, float("nan")])])
    got = _sqrt(x)
    want = torch.from_numpy(np.sqrt(x.numpy()))
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got[~got.isnan()], want[~want.isnan()])
