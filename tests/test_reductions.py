"""Per-tensor and group-wide reductions in the DSL: LAMB's trust ratio and fused gradient clipping."""

from __future__ import annotations

import math

import pytest
import torch

import fusedopt
from fusedopt import reference
from fusedopt.dsl import RuleError, amax, mean, norm, rms, rule, total
from kernel_check import KERNEL_DEVICES, require_kernel_device


def lamb_by_hand(params, grads_per_step, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, wd=0.01, max_norm=1.0):
    """timm's Lamb written out in float64 torch ops, one step at a time."""
    ps = [p.double().clone() for p in params]
    m = [torch.zeros_like(p) for p in ps]
    v = [torch.zeros_like(p) for p in ps]
    for t, grads in enumerate(grads_per_step, start=1):
        gs = [g.double() for g in grads]
        total_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in gs]))
        coef = min(1.0, max_norm / (total_norm.item() + 1e-6))
        for i, (p, g) in enumerate(zip(ps, gs)):
            g = g * coef
            m[i] = betas[0] * m[i] + (1 - betas[0]) * g
            v[i] = betas[1] * v[i] + (1 - betas[1]) * g * g
            u = (m[i] / (1 - betas[0] ** t)) / (v[i].sqrt() / math.sqrt(1 - betas[1] ** t) + eps) + wd * p
            w, n = p.norm(), u.norm()
            ratio = (w / n).item() if w > 0 and n > 0 else 1.0
            ratio = ratio if wd != 0 else 1.0
            ps[i] = p - lr * ratio * u
    return ps


@pytest.mark.parametrize("wd", [0.01, 0.0])
def test_lamb_matches_its_formula(wd):
    gen = torch.Generator().manual_seed(0)
    shapes = [(6, 5), (7,), (1,), (3, 2, 2)]
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) * 2 for s in shapes] for _ in range(5)]
    mine = [p.clone().requires_grad_() for p in params]
    opt = fusedopt.LAMB(mine, lr=0.05, weight_decay=wd)
    for gs in grads:
        for p, g in zip(mine, gs):
            p.grad = g.clone()
        opt.step()
    expected = lamb_by_hand(params, grads, lr=0.05, wd=wd)
    for a, b in zip(mine, expected):
        torch.testing.assert_close(a.detach(), b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cls,torch_cls,kwargs", [
    (fusedopt.AdamW, torch.optim.AdamW, dict(lr=0.01)),
    (fusedopt.Adam, torch.optim.Adam, dict(lr=0.01, amsgrad=True)),
    (fusedopt.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True)),
])
@pytest.mark.parametrize("max_norm", [0.3, 1e3])
def test_max_grad_norm_equals_clip_grad_norm_then_step(cls, torch_cls, kwargs, max_norm):
    gen = torch.Generator().manual_seed(1)
    shapes = [(5, 3), (7,), (2, 2, 2)]
    base = [torch.randn(s, generator=gen) for s in shapes]
    a = [p.clone().requires_grad_() for p in base]
    b = [p.clone().requires_grad_() for p in base]
    oa = cls(a, max_grad_norm=max_norm, **kwargs)
    ob = torch_cls(b, foreach=False, **kwargs)
    for _ in range(4):
        for x, y in zip(a, b):
            g = torch.randn(x.shape, generator=gen) * 3
            x.grad, y.grad = g.clone(), g.clone()
        torch.nn.utils.clip_grad_norm_(b, max_norm)
        oa.step()
        ob.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


def test_clipping_is_over_the_group_not_each_tensor():
    big, small = torch.zeros(4, requires_grad=True), torch.zeros(4, requires_grad=True)
    opt = fusedopt.SGD([big, small], lr=1.0, max_grad_norm=1.0)
    big.grad, small.grad = torch.full((4,), 10.0), torch.full((4,), 0.1)
    opt.step()
    norm_ = math.sqrt(4 * 100 + 4 * 0.01)
    torch.testing.assert_close(small.detach(), torch.full((4,), -0.1 / (norm_ + 1e-6)))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_clipping_spans_every_clipping_group(backend):
    """Several groups with max_grad_norm: one norm over all their gradients, as clip_grad_norm_ over
    those parameters (a group without max_grad_norm is neither counted nor clipped)."""
    if backend == "triton":
        require_kernel_device("cpu")
    gen = torch.Generator().manual_seed(5)
    base = [torch.randn(s, generator=gen) for s in ((6, 5), (7,), (3, 4), (9,))]
    a = [p.clone().requires_grad_() for p in base]
    b = [p.clone().requires_grad_() for p in base]
    oa = fusedopt.AdamW([{"params": a[:2]}, {"params": a[2:3], "lr": 0.03}, {"params": a[3:], "max_grad_norm": None}],
                        lr=0.01, max_grad_norm=0.5, backend=backend)
    ob = torch.optim.AdamW([{"params": b[:2]}, {"params": b[2:3], "lr": 0.03}, {"params": b[3:]}], lr=0.01,
                           foreach=False)
    for _ in range(4):
        for x, y in zip(a, b):
            g = torch.randn(x.shape, generator=gen) * 3
            x.grad, y.grad = g.clone(), g.clone()
        torch.nn.utils.clip_grad_norm_(b[:3], 0.5)
        oa.step()
        ob.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("make", ["adam_mini", "lamb"])
def test_optimizers_that_split_groups_themselves_clip_over_the_whole_model(make):
    """AdamMini puts biases and norms in a group of their own and LAMB is used so: max_grad_norm
    still clips by the norm over every parameter (as clip_grad_norm_(model.parameters()); timm's
    LAMB takes one norm over all groups)."""
    def model():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 4))
        return m

    def build(m, clip):
        if make == "adam_mini":
            return fusedopt.AdamMini(m.named_parameters(), lr=1e-2, weight_decay=0.1, dim=8, n_heads=2,
                                     max_grad_norm=clip)
        decay = [p for n, p in m.named_parameters() if n.endswith("weight") and p.dim() > 1]
        rest = [p for n, p in m.named_parameters() if not (n.endswith("weight") and p.dim() > 1)]
        return fusedopt.LAMB([{"params": decay}, {"params": rest, "weight_decay": 0.0}], lr=1e-2, max_grad_norm=clip)

    ours, theirs = model(), model()
    oa, ob = build(ours, 0.5), build(theirs, None)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    for _ in range(4):
        for m in (ours, theirs):
            (m(x) ** 2).sum().mul(3).backward()
        torch.nn.utils.clip_grad_norm_(list(theirs.parameters()), 0.5)
        oa.step(), ob.step()
        oa.zero_grad(), ob.zero_grad()
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_clipping_a_rule_whose_matrix_variant_alone_reduces_over_the_group():
    """Only the matrix variant has a group reduction; a group of matrices must still be clipped."""
    @rule("matrix_group_norm")
    def matrix_group_norm(p, g, t, lr=0.1, matrix=False):
        if matrix:
            p.set(p - lr * g * norm(g, over="group"))
        else:
            p.set(p - lr * g)

    gen = torch.Generator().manual_seed(2)
    base = [torch.randn(4, 5, generator=gen), torch.randn(3, 5, generator=gen)]
    a = [p.clone().requires_grad_() for p in base]
    b = [p.clone().requires_grad_() for p in base]
    oa = fusedopt.FusedOptimizer(a, matrix_group_norm, max_grad_norm=1e-3, backend="reference")
    ob = fusedopt.FusedOptimizer(b, matrix_group_norm, backend="reference")
    for x, y in zip(a, b):
        x.grad = torch.randn(x.shape, generator=gen)
        y.grad = x.grad.clone()
    torch.nn.utils.clip_grad_norm_(b, 1e-3)
    oa.step()
    ob.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-9)


def test_max_grad_norm_can_be_switched_on_and_off():
    p = torch.zeros(3, requires_grad=True)
    opt = fusedopt.SGD([p], lr=1.0)
    p.grad = torch.full((3,), 4.0)
    opt.param_groups[0]["max_grad_norm"] = 1.0
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((3,), -1 / math.sqrt(3)), rtol=1e-5, atol=1e-6)
    opt.param_groups[0]["max_grad_norm"] = None
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((3,), -1 / math.sqrt(3) - 4.0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [0.0, -1.0, "a"])
def test_invalid_max_grad_norm_is_rejected_at_construction(bad):
    with pytest.raises(ValueError, match="max_grad_norm"):
        fusedopt.AdamW([torch.zeros(2, requires_grad=True)], max_grad_norm=bad)


def test_tensor_reductions_evaluate_as_written():
    @rule("normalised")
    def normalised(p, g, t, lr=0.1):
        p.set(p - lr * (g - mean(g)) / (rms(g) + amax(abs(g)) + norm(g) + total(g * 0 + 1)))

    gen = torch.Generator().manual_seed(2)
    p0, g = torch.randn(11, generator=gen, dtype=torch.float64), torch.randn(11, generator=gen, dtype=torch.float64)
    p = p0.clone()
    reference.step(normalised.program(), [p], [g], {}, [torch.zeros(())],
                   {"lr": torch.tensor(0.1, dtype=torch.float64)}, compute_dtype=torch.float64)
    denom = g.pow(2).mean().sqrt() + g.abs().max() + g.norm() + 11
    torch.testing.assert_close(p, p0 - 0.1 * (g - g.mean()) / denom, rtol=1e-14, atol=0)


def test_reductions_over_unsupported_domains_are_definition_errors():
    from fusedopt.dsl import state

    with pytest.raises(RuleError, match=r"rule 'mixed'.*mixes layouts.*Fix"):
        @rule("mixed")
        def mixed(p, g, t, lr=0.1, matrix=False):
            if matrix:
                r = state("r", layout="rows")
                r.set(mean(g * g, over="rows") + mean(g * g, over="blocks"))
            p.set(p - lr * g)
    with pytest.raises(RuleError, match="over='diagonal'"):
        @rule("diag")
        def diag(p, g, t, lr=0.1):
            p.set(p - lr * total(g, over="diagonal"))


def test_a_group_with_clipping_on_two_devices_is_refused_clearly():
    if not torch.cuda.is_available():
        pytest.skip("needs a second device")
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(2, device="cuda", requires_grad=True)
    opt = fusedopt.SGD([a, b], lr=0.1, max_grad_norm=1.0)
    a.grad, b.grad = torch.ones(2), torch.ones(2, device="cuda")
    with pytest.raises(RuntimeError, match="own"):
        opt.step()


def test_fused_reductions_launch_one_kernel_per_phase_and_match_clip_grad_norm():
    from codegen import launch
    from kernel_check import any_kernel_device

    device = any_kernel_device()
    gen = torch.Generator().manual_seed(5)
    shapes = [(9, 4), (600,), (1,)]
    base = [torch.randn(s, generator=gen) for s in shapes]
    a = [p.clone().to(device).requires_grad_() for p in base]
    b = [p.clone().to(device).requires_grad_() for p in base]
    oa = fusedopt.LAMB(a, lr=0.02, backend="triton")  # max_grad_norm 1.0: group norm, then tensor norms
    ob = fusedopt.LAMB(b, lr=0.02, backend="reference")
    before = launch.launches["lamb"]
    for _ in range(3):
        for x, y in zip(a, b):
            g = (torch.randn(x.shape, generator=gen) * 4).to(device)
            x.grad, y.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    assert launch.launches["lamb"] - before == 3 * 3  # two reduction phases and the update, per step
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_group_norm_spans_tensors_of_different_dtypes():
    """A group mixing fp32 and bf16 parameters runs one kernel per dtype signature; the clipping
    norm must still cover every tensor of the group, not each signature's share."""
    from kernel_check import any_kernel_device

    device = any_kernel_device()
    gen = torch.Generator().manual_seed(11)
    base = [(torch.randn(40, generator=gen), torch.float32), (torch.randn(3, 7, generator=gen), torch.bfloat16),
            (torch.randn(5, generator=gen), torch.float32)]
    a = [p.to(device, dtype).requires_grad_() for p, dtype in base]
    b = [p.to(device, dtype).requires_grad_() for p, dtype in base]
    oa = fusedopt.SGD(a, lr=0.5, max_grad_norm=0.01, backend="triton")
    ob = fusedopt.SGD(b, lr=0.5, max_grad_norm=0.01, backend="reference")
    for _ in range(3):
        for x, y in zip(a, b):
            g = torch.randn(x.shape, generator=gen).to(device, x.dtype)
            x.grad, y.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5 if x.dtype == torch.float32 else 8e-3, atol=1e-6)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_norms_of_subnormal_squares_are_not_flushed(device):
    """LAMB's trust ratio divides by the norm of the update; with tiny gradients the squares are
    float32 subnormals, which float32 atomics on a GPU flush to zero (a ratio of 1 instead of 1e20).
    The kernels accumulate in float64."""
    require_kernel_device(device)
    a = torch.tensor([1.541], device=device, requires_grad=True)
    b = a.detach().clone().requires_grad_()
    for x in (a, b):
        x.grad = torch.tensor([1.541e-28], device=device)
    kw = dict(lr=0.5, betas=(0.0, 0.0), eps=1e-8, weight_decay=1e-30, max_grad_norm=None)
    fusedopt.LAMB([a], backend="triton", **kw).step()
    fusedopt.LAMB([b], backend="reference", **kw).step()
    assert abs(b.item() - 1.541 * 0.5) < 1e-3  # the ratio took the update to |p| * lr
    torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
