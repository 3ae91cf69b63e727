"""nonfinite="skip": a NaN or Inf in any gradient of a group leaves the whole group's step undone.

Parameters, states (quantized ones included) and step counters keep their values, with no host sync:
the kernels find the bad gradient with a reduction over the group (or, for a group that runs as
several programs, read a flag computed on the device before the launches). The default, "propagate",
lets NaN and Inf flow into the parameters and states as torch.optim does.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fusedopt
from kernel_check import any_kernel_device

BACKENDS = ["reference", "triton"]

# (constructor, shapes): one program for the whole group, or several (matrix and vector variants,
# quantized and float32 states)
CASES = {
    "adamw": (lambda ps, **kw: fusedopt.AdamW(ps, lr=0.01, **kw), [(700,), (5, 300)]),
    "adamw8bit-split": (lambda ps, **kw: fusedopt.AdamW8bit(ps, lr=0.01, **kw), [(10,), (5000,)]),
    "adamw4bit-one-program": (lambda ps, **kw: fusedopt.AdamW4bit(ps, lr=0.01, **kw), [(4100,), (70, 64)]),
    "adafactor": (lambda ps, **kw: fusedopt.Adafactor(ps, lr=0.01, **kw), [(7,), (6, 50)]),
    "lamb-clipped": (lambda ps, **kw: fusedopt.LAMB(ps, lr=0.01, **kw), [(300,), (4, 5)]),
}


def _device(backend: str) -> str:
    return any_kernel_device() if backend == "triton" else "cpu"


def _setup(case: str, backend: str, **kwargs):
    make, shapes = CASES[case]
    gen = torch.Generator().manual_seed(0)
    device = _device(backend)
    params = [torch.randn(s, generator=gen).to(device).requires_grad_() for s in shapes]
    opt = make(params, backend=backend, **kwargs)
    grads = [[torch.randn(s, generator=gen).to(device) for s in shapes] for _ in range(4)]
    return params, opt, grads


def _snapshot(params, opt):
    return [p.detach().clone() for p in params], copy.deepcopy({i: opt.state[p] for i, p in enumerate(params)})


def _step(params, opt, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_nonfinite_gradient_skips_the_whole_group(case, backend, bad):
    params, opt, grads = _setup(case, backend, nonfinite="skip")
    _step(params, opt, grads[0])
    before, states = _snapshot(params, opt)
    poisoned = [g.clone() for g in grads[1]]
    poisoned[-1].view(-1)[3] = bad  # one element of one tensor
    _step(params, opt, poisoned)
    for i, (p, old) in enumerate(zip(params, before)):
        assert torch.equal(p.detach(), old), f"param {i} changed"
        for name, value in states[i].items():
            assert torch.equal(opt.state[p][name], value), f"state {name} of param {i} changed"
        assert opt.state[p]["step"].item() == 1.0
    _step(params, opt, grads[2])  # and the next finite step proceeds as if nothing happened
    assert all(not torch.equal(p.detach(), old) for p, old in zip(params, before))
    assert all(opt.state[p]["step"].item() == 2.0 for p in params)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_finite_steps_are_those_of_the_propagating_optimizer(case, backend):
    """The skip check changes nothing while gradients are finite."""
    params, opt, grads = _setup(case, backend, nonfinite="skip")
    ref_params, ref_opt, _ = _setup(case, backend)
    for step in grads:
        _step(params, opt, step)
        _step(ref_params, ref_opt, step)
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_propagate_is_the_default_and_lets_nan_through(backend):
    params, opt, grads = _setup("adamw", backend)
    poisoned = [g.clone() for g in grads[0]]
    poisoned[0][0] = float("nan")
    _step(params, opt, poisoned)
    assert bool(params[0][0].isnan()) and not bool(params[1].isnan().any())
    assert opt.state[params[0]]["step"].item() == 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nonfinite_gradient_skips_every_group_that_skips(backend):
    """One flag over the skipping groups, as torch.amp.GradScaler skips a whole step: no half step of
    the model. A group that propagates still steps."""
    device = _device(backend)
    a, b, c = (torch.zeros(300, device=device, requires_grad=True) for _ in range(3))
    opt = fusedopt.SGD([{"params": [a]}, {"params": [b]}, {"params": [c], "nonfinite": "propagate"}], lr=0.1,
                       nonfinite="skip", backend=backend)
    for p in (a, b, c):
        p.grad = torch.ones(300, device=device)
    b.grad[7] = float("inf")
    opt.step()
    assert torch.equal(a.detach(), torch.zeros(300, device=device))
    assert torch.equal(b.detach(), torch.zeros(300, device=device))
    assert torch.equal(c.detach(), torch.full((300,), -0.1, device=device))
    assert [int(opt.state[p]["step"]) for p in (a, b, c)] == [0, 0, 1]
    b.grad[7] = 1.0
    opt.step()  # finite again: both skipping groups step
    assert torch.equal(a.detach(), torch.full((300,), -0.1, device=device))
    assert torch.equal(b.detach(), torch.full((300,), -0.1, device=device))


@pytest.mark.parametrize("backend", BACKENDS)
def test_adam_mini_skips_its_two_internal_groups_together(backend):
    """AdamMini splits a model into weight-decay and no-decay groups itself; an infinite bias gradient
    leaves the weights as they were too."""
    device = _device(backend)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8)).to(device)
    opt = fusedopt.AdamMini(model.named_parameters(), lr=1e-2, dim=8, n_heads=2, nonfinite="skip", backend=backend)
    assert len(opt.param_groups) == 2
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    model[0].bias.grad[3] = float("inf")
    opt.step()
    assert all(torch.equal(p.detach(), q) for p, q in zip(model.parameters(), before))
    assert all(int(opt.state[p]["step"]) == 1 for p in model.parameters())


def test_a_bad_policy_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"nonfinite='ignore'.*'propagate'.*'skip'"):
        fusedopt.AdamW([torch.zeros(3, requires_grad=True)], nonfinite="ignore")


def test_a_detector_that_misses_infinities_is_caught(monkeypatch):
    """The skip test can fail: a flag that sees NaN but not Inf lets an infinite gradient through."""
    from codegen import ops, printer

    monkeypatch.setattr(printer.TritonPrinter, "_print_NonFinite",
                        lambda self, e: f"tl.where({self(e.args[0])} == {self(e.args[0])}, "
                                        f"{self._const(0.0)}, {self._const(1.0)})")
    ops.source.cache_clear()
    try:
        with pytest.raises(AssertionError, match="changed"):
            test_a_nonfinite_gradient_skips_the_whole_group("adamw", "triton", float("inf"))
    finally:
        monkeypatch.undo()
        ops.source.cache_clear()
