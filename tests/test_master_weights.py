"""fp32 master weights for bf16 and fp16 parameters (master_weights=True): the rule runs on a float32
copy, the parameter receives its value rounded; trajectories equal float32 training."""

from __future__ import annotations

import pytest
import torch

import fusedopt
from fusedopt import ir
from kernel_check import any_kernel_device


def _pair(device, backend, seed=0, steps=5, dtype=torch.bfloat16, **kw):
    gen = torch.Generator().manual_seed(seed)
    base = [torch.randn(s, generator=gen) for s in [(300,), (17, 9)]]
    half = [p.to(dtype).to(device).requires_grad_() for p in base]
    full = [p.to(dtype).float().requires_grad_() for p in base]  # the same starting values
    oh = fusedopt.AdamW(half, lr=1e-2, weight_decay=0.1, master_weights=True, backend=backend, **kw)
    of = fusedopt.AdamW(full, lr=1e-2, weight_decay=0.1, backend="reference")
    for _ in range(steps):
        for h, f in zip(half, full):
            g = torch.randn(h.shape, generator=gen).to(dtype)
            h.grad, f.grad = g.to(device), g.float()
        oh.step()
        of.step()
    return half, full, oh


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_master_copy_follows_the_float32_trajectory_and_p_is_its_rounding(backend, dtype):
    device = any_kernel_device() if backend == "triton" else "cpu"
    half, full, opt = _pair(device, backend, dtype=dtype)
    for h, f in zip(half, full):
        master = opt.state[h][ir.MASTER].cpu()
        assert master.dtype == torch.float32
        assert torch.equal(master, f.detach())  # the float32 run's bits
        assert torch.equal(h.detach().cpu(), master.to(dtype))  # round to nearest even


def test_without_master_weights_small_updates_are_lost():
    """The point of the copy: bf16 parameters alone drop updates below half a step."""
    p = torch.ones(64, dtype=torch.bfloat16, requires_grad=True)
    q = torch.ones(64, dtype=torch.bfloat16, requires_grad=True)
    plain = fusedopt.SGD([p], lr=1e-4)
    master = fusedopt.SGD([q], lr=1e-4, master_weights=True)
    for _ in range(100):
        p.grad = torch.ones_like(p)
        q.grad = torch.ones_like(q)
        plain.step()
        master.step()
    assert bool((p == 1).all())
    torch.testing.assert_close(master.state[q][ir.MASTER], torch.full((64,), 0.99), rtol=1e-5, atol=1e-6)
    assert bool((q.float() == torch.tensor(0.99).to(torch.bfloat16).float()).all())


def test_a_checkpoint_without_the_master_copy_starts_it_from_the_parameter():
    p = torch.randn(20).to(torch.bfloat16).requires_grad_()
    torch_opt = torch.optim.AdamW([p.detach().clone().requires_grad_()], lr=1e-2)
    torch_opt.param_groups[0]["params"][0].grad = torch.ones(20, dtype=torch.bfloat16)
    torch_opt.step()
    opt = fusedopt.AdamW([p], lr=1e-2, master_weights=True)
    opt.load_state_dict(torch_opt.state_dict())
    with torch.no_grad():
        p.copy_(torch_opt.param_groups[0]["params"][0])  # the model's weights, loaded after the optimizer
    opt.param_groups[0]["lr"] = 0.0
    p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(opt.state[p][ir.MASTER], p.detach().float())
    assert torch.equal(p, torch_opt.param_groups[0]["params"][0])
    with pytest.raises(TypeError, match="master_weights"):
        fusedopt.AdamW([p], master_weights=1)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_only_bf16_and_fp16_parameters_get_a_master_copy(backend):
    """A float32 copy of a float32 parameter would equal it: such parameters keep none (and step as
    without master weights) while the group's bf16 ones keep theirs."""
    device = any_kernel_device() if backend == "triton" else "cpu"
    gen = torch.Generator().manual_seed(3)
    full, half = torch.randn(40, 30, generator=gen), torch.randn(300, generator=gen)
    mixed = [full.clone().to(device).requires_grad_(), half.to(torch.bfloat16).to(device).requires_grad_()]
    plain = [full.clone().requires_grad_()]
    om = fusedopt.AdamW(mixed, lr=1e-2, master_weights=True, max_grad_norm=1e6, backend=backend)  # two programs
    op = fusedopt.AdamW(plain, lr=1e-2, backend="reference")
    for _ in range(3):
        g = torch.randn(40, 30, generator=gen)
        mixed[0].grad, plain[0].grad = g.to(device), g.clone()
        mixed[1].grad = torch.randn(300, generator=gen).to(torch.bfloat16).to(device)
        om.step()
        op.step()
    assert ir.MASTER not in om.state[mixed[0]] and om.state[mixed[1]][ir.MASTER].dtype == torch.float32
    torch.testing.assert_close(mixed[0].detach().cpu(), plain[0].detach(), rtol=1e-6, atol=1e-6)
    assert torch.equal(mixed[1].detach(), om.state[mixed[1]][ir.MASTER].to(torch.bfloat16))


def test_adafactor_with_master_weights_takes_float32_eps_and_follows_float32_training():
    """torch's Adafactor takes eps1 from the parameter's dtype; with a float32 master copy the update
    runs in float32, so eps1 is float32's and the copy follows float32 training bit for bit."""
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(24, 16, generator=gen).to(torch.bfloat16)
    half, full = start.clone().requires_grad_(), start.float().requires_grad_()
    oh = fusedopt.Adafactor([half], lr=1e-2, master_weights=True)
    of = fusedopt.Adafactor([full], lr=1e-2)
    assert oh.param_groups[0]["eps"][0].item() == torch.finfo(torch.float32).eps
    assert fusedopt.Adafactor([start.clone().requires_grad_()])._groups[0]["eps"][0].item() == 2.0**-7
    for _ in range(4):
        g = torch.randn(24, 16, generator=gen).to(torch.bfloat16)
        half.grad, full.grad = g, g.float()
        oh.step()
        of.step()
    assert torch.equal(oh.state[half][ir.MASTER], full.detach())
