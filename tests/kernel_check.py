"""Shared checks for the fused kernels: run one step with both backends from the same state."""

from __future__ import annotations

import os

import pytest
import torch

import fusedopt
from fusedopt import reference
from fusedopt.dtypes import UNIT_ROUNDOFF

# Devices a kernel test runs on: the CPU through Triton's interpreter, CUDA with compiled kernels.
KERNEL_DEVICES = [
    pytest.param("cpu", id="interpreter"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
]


def require_kernel_device(device: str) -> None:
    if device == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("CPU kernels need TRITON_INTERPRET=1 (set by conftest when there is no GPU)")


def any_kernel_device() -> str:
    """The device fused kernels can run on here: CUDA, else the CPU through the interpreter (or skip)."""
    if torch.cuda.is_available():
        return "cuda"
    require_kernel_device("cpu")
    return "cpu"


def fresh_states(program, params, grads):
    per = [reference.init_state(program, p, g) for p, g in zip(params, grads)]
    return {name: [st[name] for st in per] for name in program.state_names}


def hparam_tensors(program, values, device):
    return {h: torch.tensor(float(values.get(h, d)), dtype=torch.float64, device=device)
            for h, d in zip(program.hparams, program.defaults)}


def tolerance(ref: torch.Tensor, old: torch.Tensor, grad: torch.Tensor, dtype: torch.dtype, rtol: float):
    """Allowed |kernel - reference| per element for one step.

    Both backends compute in float32 from the same inputs, so they differ by float32 rounding in
    the arithmetic (at most a few units of 2**-24 relative to the magnitudes that enter the update:
    the old value, the new value and the gradient) plus, where the stored dtype is narrower, one
    rounding of the stored result (ties and near-ties can round to neighbouring values).
    """
    scale = old.double().abs() + ref.double().abs() + grad.double().abs()
    return rtol * scale + 2 * UNIT_ROUNDOFF[dtype] * ref.double().abs() * (dtype != torch.float32) + 1e-37


def run_one_step(program, params, grads, states, steps, hparams, backend):
    if backend == "reference":
        reference.step(program, params, grads, states, steps, hparams)
    else:
        from codegen import ops

        key = ops.register(program)
        flat = [t for name in program.state_names for t in states[name]]
        ops.fused_step(key, list(params), list(grads), flat, list(steps), [hparams[h] for h in program.hparams])


def compare_step(program, params, grads, states, steps, hparams, rtol=8 * 2.0**-24):
    """One step with the kernel and with the reference from identical copies; assert they agree.

    Returns the kernel's new (params, states, steps) so that trajectories can continue from them.
    """
    def clone():
        return ([p.clone() for p in params], {k: [t.clone() for t in v] for k, v in states.items()},
                [s.clone() for s in steps])

    kp, ks, kt = clone()
    rp, rs, rt = clone()
    run_one_step(program, kp, grads, ks, kt, hparams, "triton")
    run_one_step(program, rp, [g.to(rp[i].device) for i, g in enumerate(grads)], rs, rt, hparams, "reference")
    for i, (a, b) in enumerate(zip(kp, rp)):
        _assert_close(f"param {i} {tuple(a.shape)} {a.dtype}", a, b, params[i], grads[i], rtol)
        for name in program.state_names:
            _assert_close(f"state {name} of param {i}", ks[name][i], rs[name][i], states[name][i], grads[i], rtol)
        assert kt[i].item() == rt[i].item() == steps[i].item() + 1, f"step counter of param {i}"
    return kp, ks, kt


def _assert_close(what, got, ref, old, grad, rtol):
    assert got.dtype == ref.dtype and got.shape == ref.shape, what
    if got.numel() == 0:
        return
    same_nan = got.isnan() == ref.isnan()
    assert bool(same_nan.all()), f"{what}: NaN pattern differs"
    ok = got.isnan() | ((got.double() - ref.double()).abs() <= tolerance(ref, old, grad, got.dtype, rtol))
    ok |= got.double() == ref.double()  # equal infinities
    if not bool(ok.all()):
        i = int((~ok).flatten().nonzero()[0])
        raise AssertionError(f"{what}: kernel {got.flatten()[i].item()!r} vs reference {ref.flatten()[i].item()!r} "
                             f"at flat index {i} (old {old.flatten()[i].item()!r}, grad {grad.flatten()[i].item()!r})")


def builtin_programs():
    """(id, program, valid hyperparameter ranges) for every built-in rule and option set."""
    from fusedopt.optimizers import adam, adamw, lamb, lion, sgd

    out = []
    for amsgrad in (False, True):
        for maximize in (False, True):
            out.append((f"adam-ams{int(amsgrad)}-max{int(maximize)}", adam.program(amsgrad=amsgrad, maximize=maximize)))
            out.append((f"adamw-ams{int(amsgrad)}-max{int(maximize)}", adamw.program(amsgrad=amsgrad, maximize=maximize)))
    for nesterov in (False, True):
        out.append((f"sgd-momentum-nesterov{int(nesterov)}", sgd.program(with_momentum=True, nesterov=nesterov)))
    out.append(("sgd-plain", sgd.program()))
    out.append(("lion", lion.program()))
    out.append(("lion-max", lion.program(maximize=True)))
    out.append(("lamb", lamb.program()))  # per-tensor norms: two reduction phases
    out.append(("lamb-clip", lamb.program(clip=True)))  # plus a group-wide norm
    out.append(("adamw-clip", adamw.program(clip=True)))
    out.append(("sgd-clip", sgd.program(with_momentum=True, clip=True)))
    return out


__all__ = ["KERNEL_DEVICES", "any_kernel_device", "builtin_programs", "compare_step", "fresh_states", "fusedopt", "hparam_tensors",
           "require_kernel_device", "run_one_step", "tolerance"]
