"""Adafactor: row/column layouts and reductions, against torch.optim.Adafactor."""

from __future__ import annotations

import pytest
import torch

import fusedopt
from fusedopt.dsl import RuleError, lerp, mean, rule, state

SHAPES = [(6, 5), (7,), (3, 4, 5), (1, 9), (9, 1), (1,), (2, 1, 3, 4)]


def run_pair(dtype, steps=20, backend="reference", **kwargs):
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES]
    a = [p.clone().requires_grad_() for p in base]
    b = [p.clone().requires_grad_() for p in base]
    oa = fusedopt.Adafactor(a, backend=backend, **kwargs)
    ob = torch.optim.Adafactor(b, foreach=False, **kwargs)
    for _ in range(steps):
        for x, y in zip(a, b):
            g = torch.randn(x.shape, generator=gen, dtype=dtype)
            x.grad, y.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    return a, b, oa, ob


@pytest.mark.parametrize("kwargs", [dict(), dict(lr=0.05, weight_decay=0.1), dict(maximize=True, d=2.0)])
def test_trajectory_matches_torch_adafactor_in_float64(kwargs):
    a, b, _, _ = run_pair(torch.float64, **kwargs)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)


def test_trajectory_matches_torch_adafactor_in_float32():
    # 20 steps; the RMS normalisation and the reductions sum in a different order than torch
    a, b, _, _ = run_pair(torch.float32, lr=0.05)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=5e-5, atol=1e-6)


def test_state_has_torch_shapes_and_round_trips_both_ways():
    a, b, oa, ob = run_pair(torch.float64, steps=3)
    for x, y in zip(a, b):
        assert {k: tuple(v.shape) for k, v in oa.state[x].items()} == \
            {k: tuple(v.shape) for k, v in ob.state[y].items()}
    ob.load_state_dict(oa.state_dict())
    oa.load_state_dict(ob.state_dict())
    gen = torch.Generator().manual_seed(9)
    for _ in range(3):
        for x, y in zip(a, b):
            g = torch.randn(x.shape, generator=gen, dtype=torch.float64)
            x.grad, y.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)


def test_wrongly_shaped_factor_is_rejected_on_load():
    a, _, oa, _ = run_pair(torch.float64, steps=1)
    sd = oa.state_dict()
    sd["state"][0]["row_var"] = torch.zeros(6, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"row_var.*\(6, 1\)"):
        oa.load_state_dict(sd)


def test_vectors_run_fused_and_matrices_on_the_reference_backend():
    from codegen import launch
    from kernel_check import any_kernel_device

    any_kernel_device()

    before = launch.launches["adafactor"]
    a, b, _, _ = run_pair(torch.float32, steps=3, backend="triton", lr=0.05)
    # vectors: RMS(p) and RMS(U) are both reductions of old values, so one reduction phase, then the update
    assert launch.launches["adafactor"] - before == 3 * 2
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=5e-5, atol=1e-6)


def test_row_state_set_to_a_full_value_is_a_definition_error():
    with pytest.raises(RuleError, match=r"layout 'rows'.*layout 'full'.*mean\(x, over='rows'\)"):
        @rule("bad_rows")
        def bad_rows(p, g, t, lr=0.1, matrix=False):
            if matrix:
                r = state("r", layout="rows")
                r.set(lerp(r, g * g, 0.1))
            p.set(p - lr * g)


def test_row_states_need_the_matrix_option():
    with pytest.raises(RuleError, match="matrix"):
        @rule("no_matrix")
        def no_matrix(p, g, t, lr=0.1):
            r = state("r", layout="rows")
            r.set(mean(g * g, over="rows"))
            p.set(p - lr * g / (r + 1))


def test_max_grad_norm_is_refused_clearly_for_adafactor():
    with pytest.raises(NotImplementedError, match="clip_grad_norm_"):
        fusedopt.Adafactor([torch.zeros(2, 2, requires_grad=True)], max_grad_norm=1.0)


def test_kernel_source_says_factored_layouts_have_no_fused_kernel_yet():
    with pytest.raises(NotImplementedError, match="reference backend"):
        fusedopt.kernel_source(fusedopt.optimizers.adafactor, matrix=True)
    assert "def fused_step" in fusedopt.kernel_source(fusedopt.optimizers.adafactor, matrix=False)
