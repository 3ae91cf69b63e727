"""Fused against eager steps of rules with a window (MicroAdam and user-written ones), shared by the
window test modules. What is compared and why the parameter tolerance is what it is: see the module
docstring of test_microadam_kernel.py."""

from __future__ import annotations

import torch

from fusedopt.microadam import MicroAdam

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MASTER = "master_param"  # with master_weights=True: compared within the parameter's float32 tolerance


def _bits(t: torch.Tensor) -> torch.Tensor:
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.int16)
    if t.dtype == torch.float32:
        return t.view(torch.int32)
    return t


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` at |x| (float64), the normal spacing at the smallest normal below it."""
    info = torch.finfo(dtype)
    mag = x.abs().double().clamp_min(info.tiny)
    return torch.exp2(torch.floor(torch.log2(mag))) * info.eps


def param_tolerance(old: torch.Tensor, ref_new: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-element bound on |fused - reference| after one step from the same state (module docstring)."""
    old, new = old.double(), ref_new.double()
    return _ulp(new, dtype) + 2.0**-20 * (2 * old.abs() + new.abs())


def make_grads(sizes, dtypes, steps, seed, ties):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        row = []
        for n, dtype in zip(sizes, dtypes):
            g = torch.randn(n, generator=gen)
            if ties:  # few distinct magnitudes: the k-th largest falls inside a tie
                g = (g * 2).round() / 2
            row.append(g.to(dtype))
        out.append(row)
    return out


def compare(sizes, dtypes, steps, seed, ties=False, make=MicroAdam, **kw):
    """Step a fused and a reference optimizer (``make(params, backend=..., **kw)``) side by side;
    assert after every step. Returns the largest parameter difference seen, in units of the tolerance."""
    gen = torch.Generator().manual_seed(seed + 1)
    init = [torch.randn(n, generator=gen) for n in sizes]
    fused = [torch.nn.Parameter(x.to(dtype).to(DEVICE).clone()) for x, dtype in zip(init, dtypes)]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in fused]
    assert not any(a.data_ptr() == b.data_ptr() for a in fused for b in ref)
    opt_f = make(fused, backend="triton", **kw)
    opt_r = make(ref, backend="reference", **kw)
    worst = 0.0
    for t, grads in enumerate(make_grads(sizes, dtypes, steps, seed, ties), start=1):
        old = [p.detach().clone() for p in ref]
        old_master = [opt_r.state[p][MASTER].clone() if MASTER in opt_r.state[p] else p.detach().float()
                      for p in ref]
        for pf, pr, g in zip(fused, ref, grads):
            pf.grad = g.to(DEVICE)
            pr.grad = g.to(DEVICE).clone()
        opt_f.step()
        opt_r.step()
        for i, (pf, pr) in enumerate(zip(fused, ref)):
            sf, sr = opt_f.state[pf], opt_r.state[pr]
            if MASTER in sf:  # master weights: float32 values of the parameter, compared as the parameter is
                mf, mr = sf[MASTER], sr[MASTER]
                tol = param_tolerance(old_master[i], mr, torch.float32).cpu()
                diff = (mf.double() - mr.double()).abs().cpu()
                assert not (diff > tol).any(), f"step {t}, tensor {i}: master weights off by {diff.max().item():.3g}"
                mr.copy_(mf)
            for name in set(sf) - {"step", MASTER}:
                assert sf[name].dtype == sr[name].dtype, (name, sf[name].dtype, sr[name].dtype)
                assert torch.equal(_bits(sf[name]).cpu(), _bits(sr[name]).cpu()), \
                    f"step {t}, tensor {i} ({sizes[i]} elements, {dtypes[i]}): {name} differs"
            assert int(sf["step"]) == int(sr["step"]) == t
            diff = (pf.detach().double() - pr.detach().double()).abs().cpu()
            tol = param_tolerance(old[i], pr.detach(), dtypes[i]).cpu()
            bad = diff > tol
            assert not bad.any(), (f"step {t}, tensor {i} ({sizes[i]} elements, {dtypes[i]}): parameter off by "
                                   f"{diff[bad].max().item():.3g} > tolerance {tol[bad].min().item():.3g}")
            worst = max(worst, float((diff / tol).max()))
            with torch.no_grad():
                pr.copy_(pf)  # the next step starts from the same parameters
    return worst


def compiled_against_eager(setup, x, y, steps, poison_step=None, backend="aot_eager"):
    """Train ``setup()``'s (model, optimizer) on (x, y) for ``steps`` steps twice: eagerly, then with
    opt.step() and opt.zero_grad() compiled together (fullgraph=True, aot_eager: functionalized, so
    ``mutates_args`` and the fake impl count) under a cosine schedule. The compiled run may compile on
    its first two steps only (the first creates the state); later steps raise on a recompile. At
    ``poison_step`` one gradient element is NaN. ``backend``: inductor generates real code. Returns
    the two runs' (parameters, optimizer)."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend(backend)
    runs = []
    for compiled in (False, True):
        model, opt = setup()
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)

        def update():
            opt.step()
            opt.zero_grad()

        step = torch.compile(update, backend=counter, fullgraph=True) if compiled else update
        for k in range(steps):
            if k == 2:
                warm = counter.frame_count
            with torch._dynamo.config.patch(error_on_recompile=compiled and k >= 2):
                torch.nn.functional.mse_loss(model(x), y).backward()
                if k == poison_step:
                    next(model.parameters()).grad.view(-1)[0] = float("nan")
                step()
                sched.step()
        runs.append(([p.detach().clone() for p in model.parameters()], opt))
    assert 0 < counter.frame_count == warm
    return runs

