"""Checkpoints: round trips with torch.optim mid-training, devices, and rejected state dicts."""

from __future__ import annotations

import copy

import pytest
import torch

import fusedopt

FP64 = torch.float64

CONFIGS = [
    ("AdamW", {"lr": 0.05, "weight_decay": 0.1}),
    ("AdamW", {"lr": 0.05, "amsgrad": True}),
    ("Adam", {"lr": 0.05, "weight_decay": 0.01, "betas": (0.8, 0.95)}),
    ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
    ("SGD", {"lr": 0.05}),  # no momentum: no state but the step
]
IDS = [f"{c}-{'-'.join(k)}" for c, k in CONFIGS]


def _params(seed=0, device="cpu", dtype=FP64):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=dtype).to(device).requires_grad_() for s in [(4, 3), (6,), (2, 2, 2)]]


def _grad_steps(params, start, n, seed=9):
    for k in range(start, start + n):
        gen = torch.Generator().manual_seed(seed * 100 + k)
        yield [torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for p in params]


def _train(opt, params, grads_per_step):
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()


def _make(kind: str, cls_name: str, params, kwargs):
    if kind == "fusedopt":
        return getattr(fusedopt, cls_name)(params, backend="reference", **kwargs)
    return getattr(torch.optim, cls_name)(params, foreach=False, **kwargs)


@pytest.mark.parametrize("cls_name, kwargs", CONFIGS, ids=IDS)
@pytest.mark.parametrize("source, target", [("fusedopt", "torch"), ("torch", "fusedopt"), ("fusedopt", "fusedopt")])
def test_state_dict_round_trip_continues_the_trajectory(source, target, cls_name, kwargs):
    """Train k steps with A, load A's checkpoint into a fresh B (other hyperparameters), continue both."""
    a_params = _params()
    a = _make(source, cls_name, a_params, kwargs)
    _train(a, a_params, _grad_steps(a_params, 0, 3))

    b_params = [p.detach().clone().requires_grad_() for p in a_params]
    b = _make(target, cls_name, b_params, {**kwargs, "lr": 0.5})  # lr comes from the checkpoint
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert float(b.param_groups[0]["lr"]) == kwargs["lr"]

    for grads in _grad_steps(a_params, 3, 4):
        _train(a, a_params, [grads])
        _train(b, b_params, [grads])
        for p, q in zip(a_params, b_params):
            torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-12, atol=1e-14)
    for p, q in zip(a_params, b_params):
        for key, value in a.state[p].items():
            if key == "step" and cls_name == "SGD" and "torch" in (source, target):
                continue  # torch.optim.SGD keeps no step (and ignores a loaded one)
            torch.testing.assert_close(b.state[q][key].to(value.dtype), value, rtol=1e-12, atol=1e-14)


def test_fusedopt_state_dict_has_torch_layout_and_plain_numbers():
    params = _params()
    opt = fusedopt.AdamW(params, lr=0.01, backend="reference")
    _train(opt, params, _grad_steps(params, 0, 2))
    sd = opt.state_dict()
    group = sd["param_groups"][0]
    assert group["params"] == [0, 1, 2]
    assert isinstance(group["lr"], float) and group["lr"] == 0.01
    assert isinstance(group["betas"], tuple) and all(isinstance(b, float) for b in group["betas"])
    assert set(sd["state"]) == {0, 1, 2}
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert float(sd["state"][0]["step"]) == 2
    for i, p in enumerate(params):
        assert torch.equal(sd["state"][i]["exp_avg"], opt.state[p]["exp_avg"])


def test_loading_keeps_the_hyperparameter_tensors():
    """Loading writes into the existing hyperparameter tensors (a compiled step keeps them)."""
    params = _params()
    opt = fusedopt.Adam(params, lr=0.01, backend="reference")
    lr, betas = opt.param_groups[0]["lr"], opt.param_groups[0]["betas"]
    donor = fusedopt.Adam(_params(), lr=0.3, betas=(0.5, 0.6), backend="reference")
    opt.load_state_dict(donor.state_dict())
    assert opt.param_groups[0]["lr"] is lr and float(lr) == 0.3
    assert opt.param_groups[0]["betas"] is betas and [float(b) for b in betas] == [0.5, 0.6]


@pytest.mark.gpu
def test_cpu_checkpoint_loads_into_a_cuda_optimizer():
    cpu_params = _params(dtype=torch.float32)  # float32: the fused kernels run on CUDA
    cpu = fusedopt.AdamW(cpu_params, lr=0.01, backend="reference")
    _train(cpu, cpu_params, _grad_steps(cpu_params, 0, 2))
    cuda_params = [p.detach().cuda().requires_grad_() for p in cpu_params]
    gpu = fusedopt.AdamW(cuda_params, lr=0.5)
    gpu.load_state_dict(cpu.state_dict())
    for p in cuda_params:
        for key, value in gpu.state[p].items():
            assert value.device.type == "cuda", key
    assert gpu.param_groups[0]["lr"].device.type == "cuda" and float(gpu.param_groups[0]["lr"]) == 0.01
    for grads in _grad_steps(cpu_params, 2, 2):
        _train(cpu, cpu_params, [grads])
        _train(gpu, cuda_params, [[g.cuda() for g in grads]])
    for p, q in zip(cpu_params, cuda_params):
        torch.testing.assert_close(q.detach().cpu(), p.detach(), rtol=1e-5, atol=1e-6)


# ---- rejected checkpoints leave the optimizer unchanged ------------------------------------------

def _trained_adamw():
    params = _params()
    opt = fusedopt.AdamW([{"params": params[:2]}, {"params": params[2:], "lr": 0.2}], lr=0.01,
                         backend="reference")
    _train(opt, params, _grad_steps(params, 0, 2))
    return opt, params


def _snapshot(opt):
    groups = [{k: (tuple(float(x) for x in v) if isinstance(v, tuple) else float(v) if isinstance(v, torch.Tensor)
                   else v) for k, v in g.items() if k != "params"} for g in opt.param_groups]
    state = {id(p): {k: v.clone() for k, v in st.items()} for p, st in opt.state.items()}
    return groups, state


def _assert_unchanged(opt, snap):
    groups, state = _snapshot(opt)
    assert groups == snap[0]
    assert set(state) == set(snap[1])
    for pid, st in state.items():
        assert set(st) == set(snap[1][pid])
        for k, v in st.items():
            assert torch.equal(v, snap[1][pid][k]), k


def _corrupt(sd, how):
    sd = copy.deepcopy(sd)
    if how == "wrong shape":
        sd["state"][1]["exp_avg"] = torch.zeros(5)
    elif how == "missing state key":
        del sd["state"][2]["exp_avg_sq"]
    elif how == "unexpected state key":
        sd["state"][0]["momentum_buffer"] = torch.zeros(4, 3)
    elif how == "state is not a tensor":
        sd["state"][0]["exp_avg"] = 0.0
    elif how == "missing 'state'":
        del sd["state"]
    elif how == "missing 'param_groups'":
        del sd["param_groups"]
    elif how == "too few groups":
        sd["param_groups"] = sd["param_groups"][:1]
    elif how == "too many groups":
        sd["param_groups"].append(copy.deepcopy(sd["param_groups"][1]))
    elif how == "wrong param count":
        sd["param_groups"][0]["params"] = [0]
    elif how == "group without params":
        del sd["param_groups"][1]["params"]
    elif how == "unknown param id":
        sd["state"][7] = copy.deepcopy(sd["state"][0])
    elif how == "invalid lr":
        sd["param_groups"][0]["lr"] = -1.0
    elif how == "options need a missing state":
        sd["param_groups"][1]["amsgrad"] = True
    else:
        raise AssertionError(how)
    return sd


CORRUPTIONS = ["wrong shape", "missing state key", "unexpected state key", "state is not a tensor",
               "missing 'state'", "missing 'param_groups'", "too few groups", "too many groups",
               "wrong param count", "group without params", "unknown param id", "invalid lr",
               "options need a missing state"]


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_bad_state_dict_raises_value_error_and_changes_nothing(how):
    opt, params = _trained_adamw()
    good = opt.state_dict()
    before = _snapshot(opt)
    values = [p.detach().clone() for p in params]
    with pytest.raises(ValueError):
        opt.load_state_dict(_corrupt(good, how))
    _assert_unchanged(opt, before)
    assert all(torch.equal(p.detach(), v) for p, v in zip(params, values))
    opt.load_state_dict(good)  # the good one still loads
    _assert_unchanged(opt, before)


def test_unchanged_check_detects_a_change():
    """The comparison used above is not vacuous: a load that changes a value is noticed."""
    opt, _ = _trained_adamw()
    before = _snapshot(opt)
    sd = opt.state_dict()
    sd["state"][0]["exp_avg"] = sd["state"][0]["exp_avg"] + 1
    opt.load_state_dict(sd)
    with pytest.raises(AssertionError):
        _assert_unchanged(opt, before)
