"""The torch.optim front end: groups, lazy state, hyperparameters in place, zero_grad, bad input."""

from __future__ import annotations

import pytest
import torch

import fusedopt

FP32, FP64, BF16, FP16 = torch.float32, torch.float64, torch.bfloat16, torch.float16


def _pair(shapes=((4, 5), (7,), (2, 3, 2)), dtype=FP64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen, dtype=FP64).to(dtype) for s in shapes]
    return [p.clone().requires_grad_() for p in init], [p.clone().requires_grad_() for p in init]


def _grads(params, step, seed=1):
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    return [torch.randn(p.shape, generator=gen, dtype=FP64).to(p.dtype) for p in params]


def _set_grads(ours, theirs, step, skip=()):
    for i, (p, q, g) in enumerate(zip(ours, theirs, _grads(ours, step))):
        if i in skip:
            p.grad = q.grad = None
        else:
            p.grad, q.grad = g.clone(), g.clone()


def _assert_same(ours, theirs, rtol=1e-12, atol=1e-14, msg=""):
    for i, (p, q) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=rtol, atol=atol, msg=lambda m, i=i: f"{msg} param {i}: {m}")


# ---- groups --------------------------------------------------------------------------------------

def test_param_groups_use_their_own_hyperparameters():
    ours, theirs = _pair()
    groups = lambda ps: [{"params": ps[:1], "lr": 0.1, "betas": (0.8, 0.9)},
                         {"params": ps[1:], "weight_decay": 0.5}]
    opt = fusedopt.AdamW(groups(ours), lr=0.01, backend="reference")
    ref = torch.optim.AdamW(groups(theirs), lr=0.01, foreach=False)
    assert float(opt.param_groups[0]["lr"]) == 0.1 and float(opt.param_groups[1]["lr"]) == 0.01
    assert opt.param_groups[0]["lr"] is not opt.param_groups[1]["lr"]
    assert tuple(float(b) for b in opt.param_groups[0]["betas"]) == (0.8, 0.9)
    assert float(opt.param_groups[1]["weight_decay"]) == 0.5
    for k in range(5):
        _set_grads(ours, theirs, k)
        opt.step()
        ref.step()
        _assert_same(ours, theirs, msg=f"step {k + 1}")


def test_add_param_group_later_gets_defaults_and_steps():
    ours, theirs = _pair()
    opt = fusedopt.SGD(ours[:2], lr=0.05, momentum=0.9, backend="reference")
    ref = torch.optim.SGD(theirs[:2], lr=0.05, momentum=0.9, foreach=False)
    opt.add_param_group({"params": ours[2:], "lr": 0.2})
    ref.add_param_group({"params": theirs[2:], "lr": 0.2})
    assert float(opt.param_groups[1]["momentum"]) == 0.9
    for k in range(4):
        _set_grads(ours, theirs, k)
        opt.step()
        ref.step()
    _assert_same(ours, theirs)


def test_params_without_grad_are_skipped_and_their_step_does_not_advance():
    ours, theirs = _pair()
    opt = fusedopt.Adam(ours, lr=0.1, backend="reference")
    ref = torch.optim.Adam(theirs, lr=0.1, foreach=False)
    frozen = ours[1].detach().clone()
    for k in range(3):
        _set_grads(ours, theirs, k, skip={1})
        opt.step()
        ref.step()
    assert torch.equal(ours[1].detach(), frozen)
    assert ours[1] not in opt.state
    assert float(opt.state[ours[0]]["step"]) == 3
    for k in range(3, 5):  # now it gets gradients: its own count starts at 1
        _set_grads(ours, theirs, k)
        opt.step()
        ref.step()
    assert float(opt.state[ours[1]]["step"]) == 2 and float(opt.state[ours[0]]["step"]) == 5
    _assert_same(ours, theirs)


@pytest.mark.parametrize("cls, kwargs, keys", [
    (fusedopt.Adam, {}, {"step", "exp_avg", "exp_avg_sq"}),
    (fusedopt.AdamW, {"amsgrad": True}, {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}),
    (fusedopt.SGD, {"momentum": 0.9}, {"step", "momentum_buffer"}),
    (fusedopt.SGD, {}, {"step"}),
    (fusedopt.Lion, {}, {"step", "exp_avg"}),
])
def test_state_is_created_lazily_at_the_first_step_with_a_gradient(cls, kwargs, keys):
    params = [torch.randn(3, 4, requires_grad=True), torch.randn(5, dtype=FP64, requires_grad=True)]
    opt = cls(params, backend="reference", **kwargs)
    assert len(opt.state) == 0
    opt.step()  # no gradients yet: nothing happens
    assert len(opt.state) == 0
    params[0].grad = torch.randn(3, 4)
    opt.step()
    assert set(opt.state) == {params[0]}
    st = opt.state[params[0]]
    assert set(st) == keys
    assert st["step"].shape == () and st["step"].dtype == FP32 and float(st["step"]) == 1
    for key in keys - {"step"}:
        assert st[key].shape == params[0].shape and st[key].dtype == FP32
    params[1].grad = torch.randn(5, dtype=FP64)
    opt.step()
    for key in keys - {"step"}:
        assert opt.state[params[1]][key].dtype == FP64  # torch.optim keeps float64 states for float64


def test_step_returns_the_closure_loss():
    p = torch.randn(3, requires_grad=True)
    opt = fusedopt.SGD([p], lr=0.1, backend="reference")
    before = p.detach().clone()

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.equal(loss, (before**2).sum())
    torch.testing.assert_close(p.detach(), before - 0.1 * 2 * before)


# ---- hyperparameters change in place -------------------------------------------------------------

def test_setting_lr_and_betas_by_hand_writes_in_place_and_matches_torch():
    ours, theirs = _pair()
    opt = fusedopt.Adam(ours, lr=0.01, backend="reference")
    ref = torch.optim.Adam(theirs, lr=0.01, foreach=False)
    lr, betas = opt.param_groups[0]["lr"], opt.param_groups[0]["betas"]
    schedule = {1: {"lr": 0.1}, 2: {"betas": (0.5, 0.99)}, 3: {"lr": torch.tensor(0.03)}, 4: {"eps": 1e-3}}
    for k in range(6):
        for key, value in schedule.get(k, {}).items():
            opt.param_groups[0][key] = value
            ref.param_groups[0][key] = value.item() if isinstance(value, torch.Tensor) else value
        _set_grads(ours, theirs, k)
        opt.step()
        ref.step()
        _assert_same(ours, theirs, msg=f"step {k + 1}")
    assert opt.param_groups[0]["lr"] is lr and opt.param_groups[0]["betas"] is betas
    assert float(lr) == float(torch.tensor(0.03)) and [float(b) for b in betas] == [0.5, 0.99]
    assert float(opt.param_groups[0]["eps"]) == 1e-3


def test_changing_a_static_option_by_hand_takes_effect():
    p = torch.zeros(3, requires_grad=True)
    opt = fusedopt.SGD([p], lr=0.1, backend="reference")
    p.grad = torch.ones(3)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((3,), -0.1))
    opt.param_groups[0]["maximize"] = True
    opt.step()
    torch.testing.assert_close(p.detach(), torch.zeros(3))


def test_a_hyperparameter_tensor_must_hold_one_number():
    opt = fusedopt.AdamW([torch.randn(2, requires_grad=True)], backend="reference")
    with pytest.raises(ValueError, match="one number"):
        opt.param_groups[0]["lr"] = torch.tensor([0.1, 0.2])
    with pytest.raises(ValueError):
        opt.param_groups[0]["betas"] = (0.9,)
    assert float(opt.param_groups[0]["lr"]) == 1e-3


SCHEDULERS = {
    "step": (fusedopt.AdamW, torch.optim.AdamW, {"lr": 0.1},
             lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5)),
    "cosine": (fusedopt.SGD, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9},
               lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=4)),
    "onecycle-betas": (fusedopt.Adam, torch.optim.Adam, {"lr": 0.1},
                       lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=10)),
    "onecycle-momentum": (fusedopt.SGD, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9},
                          lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=10)),
    "lambda": (fusedopt.Lion, None, {"lr": 0.01},
               lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda k: 1.0 / (k + 1))),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_schedulers_write_in_place_and_the_trajectory_matches_torch(name):
    cls, torch_cls, kwargs, make = SCHEDULERS[name]
    ours, theirs = _pair()
    opt = cls(ours, backend="reference", **kwargs)
    group = opt.param_groups[0]
    tensors = {k: v for k, v in group.items() if isinstance(v, (torch.Tensor, tuple)) and k != "params"}
    sched = make(opt)
    if torch_cls is not None:
        ref = torch_cls(theirs, foreach=False, **kwargs)
        ref_sched = make(ref)
    seen_lrs = set()
    for k in range(9):
        _set_grads(ours, theirs, k)
        opt.step()
        sched.step()
        seen_lrs.add(float(group["lr"]))
        if torch_cls is not None:
            ref.step()
            ref_sched.step()
            _assert_same(ours, theirs, msg=f"step {k + 1}")
            assert float(group["lr"]) == ref.param_groups[0]["lr"]
            if "betas" in group:
                assert [float(b) for b in group["betas"]] == list(ref.param_groups[0]["betas"])
            if "momentum" in group:
                assert float(group["momentum"]) == ref.param_groups[0]["momentum"]
        for key, value in tensors.items():  # the very same tensors, updated in place
            assert group[key] is value, key
    assert len(seen_lrs) > 3
    assert float(group["lr"]) == sched.get_last_lr()[0]


# ---- zero_grad -----------------------------------------------------------------------------------

def test_zero_grad_sets_to_none_by_default():
    params = [torch.randn(3, requires_grad=True), torch.randn(2, requires_grad=True)]
    opt = fusedopt.SGD(params, backend="reference")
    params[0].grad = torch.ones(3)
    opt.zero_grad()
    assert params[0].grad is None and params[1].grad is None


def test_zero_grad_set_to_none_false_zeroes_in_place():
    p = torch.randn(3, requires_grad=True)
    opt = fusedopt.SGD([p], backend="reference")
    (p * 2).sum().backward()
    grad = p.grad
    opt.zero_grad(set_to_none=False)
    assert p.grad is grad and torch.equal(grad, torch.zeros(3))
    assert not grad.requires_grad


# ---- bad input raises, and changes nothing -------------------------------------------------------

def _snapshot(opt, params):
    return ([p.detach().clone() for p in params],
            {id(p): {k: v.clone() for k, v in st.items()} for p, st in opt.state.items()},
            len(opt.param_groups))


def _assert_unchanged(opt, params, snap):
    values, states, n_groups = snap
    for p, v in zip(params, values):
        assert torch.equal(p.detach(), v)
    assert {id(p) for p in opt.state} == set(states)
    for p, st in opt.state.items():
        assert set(st) == set(states[id(p)])
        for k, v in st.items():
            assert torch.equal(v, states[id(p)][k]), k
    assert len(opt.param_groups) == n_groups


def test_sparse_gradient_raises_before_any_group_is_updated():
    dense = [torch.randn(4, requires_grad=True), torch.randn(3, requires_grad=True)]
    emb = torch.randn(5, 2, requires_grad=True)
    params = [*dense, emb]
    opt = fusedopt.Adam([{"params": dense}, {"params": [emb], "lr": 0.1}], backend="reference")
    for p in dense:
        p.grad = torch.randn(p.shape)
    emb.grad = torch.randn(5, 2)
    opt.step()
    snap = _snapshot(opt, params)
    for p in dense:
        p.grad = torch.randn(p.shape)
    emb.grad = torch.sparse_coo_tensor(torch.tensor([[0, 3]]), torch.randn(2, 2), (5, 2), check_invariants=True)
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    _assert_unchanged(opt, params, snap)
    for p in params:
        assert float(opt.state[p]["step"]) == 1


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128, torch.int64])
def test_unsupported_parameter_dtype_raises_at_construction(dtype):
    p = torch.zeros(3, dtype=dtype)
    with pytest.raises(TypeError, match="view_as_real|not supported"):
        fusedopt.AdamW([p])


@pytest.mark.parametrize("cls, kwargs, match", [
    (fusedopt.Adam, {"lr": -1e-3}, "lr"),
    (fusedopt.AdamW, {"eps": -1e-8}, "eps"),
    (fusedopt.AdamW, {"weight_decay": -0.1}, "weight_decay"),
    (fusedopt.Adam, {"betas": (1.0, 0.999)}, "beta1"),
    (fusedopt.Adam, {"betas": (0.9, -0.1)}, "beta2"),
    (fusedopt.Lion, {"betas": (0.9, 1.5)}, "beta2"),
    (fusedopt.SGD, {"nesterov": True}, "nesterov"),
    (fusedopt.SGD, {"momentum": 0.9, "dampening": 0.1, "nesterov": True}, "nesterov"),
    (fusedopt.SGD, {"momentum": -0.5}, "momentum"),
    (fusedopt.SGD, {"lr": -0.1}, "lr"),
])
def test_invalid_hyperparameters_raise_value_error(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls([torch.randn(2, requires_grad=True)], **kwargs)


def test_invalid_group_is_rejected_and_the_optimizer_is_unchanged():
    params = [torch.randn(3, requires_grad=True), torch.randn(4, requires_grad=True)]
    extra = torch.randn(2, requires_grad=True)
    opt = fusedopt.AdamW(params[:1], lr=0.1, backend="reference")
    params[0].grad = torch.randn(3)
    opt.step()
    snap = _snapshot(opt, params)
    for bad in ({"params": [extra], "lr": -1.0}, {"params": [extra], "betas": (0.9, 1.0)},
                {"params": [params[0]]},  # already in group 0
                {"params": [extra], "amsgrad": 1}):
        with pytest.raises((ValueError, TypeError)):
            opt.add_param_group(bad)
        _assert_unchanged(opt, params, snap)
        assert opt._groups == opt.param_groups
    opt.step()  # and it still works
    assert float(opt.state[params[0]]["step"]) == 2


def _group_norm_rule():
    from fusedopt.dsl import norm, rule, state

    @rule("group_normalized")
    def group_normalized(p, g, t, lr=0.1, beta=0.9):
        m = state("m")
        m.set(beta * m + g)
        p.set(p - lr * m / (norm(g, over="group") + 1e-6))

    return group_normalized


def test_a_group_that_fails_after_the_torch_checks_is_not_kept():
    """A rule reducing over the whole group cannot run a group split into several programs (here by
    the quantization threshold): refused by add_param_group, which then keeps nothing."""
    rule = _group_norm_rule()
    first = torch.randn(3, requires_grad=True)
    opt = fusedopt.FusedOptimizer([first], rule, backend="reference")
    big, small = torch.randn(5000, requires_grad=True), torch.randn(10, requires_grad=True)
    with pytest.raises(ValueError, match="reduces over the whole group.*quant_threshold=0"):
        opt.add_param_group({"params": [big, small], "state_dtype": "q8"})
    assert len(opt.param_groups) == 1 and opt._groups == opt.param_groups
    opt.add_param_group({"params": [big, small], "state_dtype": "q8", "quant_threshold": 0})  # one storage: fine
    for p in (first, big, small):
        p.grad = torch.randn(p.shape)
    opt.step()
    assert opt.state[small]["m"].dtype == torch.uint8


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_clipping_a_rule_that_reduces_over_the_group_equals_clipping_first(backend):
    """max_grad_norm on a rule with its own group reduction: the clipping factor is computed before
    the launch (a reduction of a reduction is not one fused phase), as clip_grad_norm_ then step."""
    if backend == "triton":
        from kernel_check import require_kernel_device

        require_kernel_device("cpu")
    rule = _group_norm_rule()
    gen = torch.Generator().manual_seed(3)
    ours = [torch.randn(s, generator=gen).requires_grad_() for s in (7, (3, 5))]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    a = fusedopt.FusedOptimizer(ours, rule, max_grad_norm=0.5, backend=backend)
    b = fusedopt.FusedOptimizer(theirs, rule, backend=backend)
    for _ in range(3):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn(p.shape, generator=gen) * 3
            q.grad = p.grad.clone()
        torch.nn.utils.clip_grad_norm_(theirs, 0.5)
        a.step()
        b.step()
    _assert_same(ours, theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    ({"lr": "0.1"}, "lr='0.1' is not a number"),
    ({"lr": None}, "lr=None is not a number"),
    ({"weight_decay": True}, "weight_decay=True is not a number"),
    ({"betas": ("a", "b")}, r"betas=\('a', 'b'\) is not a number"),
    ({"betas": (0.9,)}, "expected 2 numbers"),
    ({"lr": torch.tensor([0.1, 0.2])}, "lr=tensor"),
])
def test_hyperparameters_that_are_not_numbers_name_the_argument(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        fusedopt.AdamW([torch.randn(2, requires_grad=True)], **kwargs)


def test_numpy_scalars_are_numbers():
    import numpy as np

    p = torch.randn(3, requires_grad=True)
    opt = fusedopt.Adam([p], lr=np.float32(1e-3), weight_decay=np.int64(0), betas=(np.float64(0.9), 0.999))
    p.grad = torch.ones(3)
    opt.step()
    assert abs(float(opt.param_groups[0]["lr"]) - 1e-3) < 1e-9


def test_an_sgd_checkpoint_with_a_buffer_and_momentum_zero_loads():
    """momentum set to 0 keeps the buffer unused, as torch; the checkpoint then holds it and loads
    (into fusedopt and from torch.optim), and the buffer is used again once momentum returns."""
    ours, theirs = _pair(dtype=FP32)
    a, b = fusedopt.SGD(ours, lr=0.1, momentum=0.9), torch.optim.SGD(theirs, lr=0.1, momentum=0.9)
    for step in range(4):
        if step == 2:
            for o in (a, b):
                o.param_groups[0]["momentum"] = 0.0
        _set_grads(ours, theirs, step)
        a.step(), b.step()
    for saved in (a.state_dict(), b.state_dict()):
        c = fusedopt.SGD([p.detach().clone().requires_grad_() for p in ours], lr=0.1, momentum=0.9)
        c.load_state_dict(saved)
        assert c.param_groups[0]["with_momentum"] is False and "momentum_buffer" in c.state[c.param_groups[0]["params"][0]]
    for o in (a, b):
        o.param_groups[0]["momentum"] = 0.5
    _set_grads(ours, theirs, 4)
    a.step(), b.step()
    _assert_same(ours, theirs, rtol=1e-6, atol=1e-7)


def test_a_loaded_checkpoint_is_checked_like_a_new_group():
    p = torch.randn(3, requires_grad=True).to(torch.float16).detach().requires_grad_()
    opt = fusedopt.AdamW([p], master_weights=True, backend="reference")
    saved = opt.state_dict()
    assert isinstance(saved["param_groups"][0]["sr_seed"], int)
    saved["param_groups"][0]["nonfinite"] = "sometimes"
    with pytest.raises(ValueError, match="nonfinite='sometimes'"):
        opt.load_state_dict(saved)
    saved["param_groups"][0].update(nonfinite="propagate", sr_seed=-1)
    with pytest.raises(ValueError, match="sr_seed=-1"):
        opt.load_state_dict(saved)
    saved["param_groups"][0]["sr_seed"] = 7.0  # older checkpoints saved the seed as a float
    opt.load_state_dict(saved)
    assert int(opt.param_groups[0]["sr_seed"]) == 7


def test_a_parameter_in_two_groups_raises():
    p = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match="more than one"):
        fusedopt.SGD([{"params": [p]}, {"params": [p], "lr": 0.1}])


@pytest.mark.parametrize("cls", [fusedopt.Adam, fusedopt.AdamW, fusedopt.SGD, fusedopt.Lion])
def test_unknown_argument_raises_type_error(cls):
    with pytest.raises(TypeError, match="unknown argument 'momentun'|unexpected keyword"):
        cls([torch.randn(2, requires_grad=True)], momentun=0.9)


def test_torch_only_flags_are_accepted():
    p = torch.randn(2, requires_grad=True)
    fusedopt.AdamW([p], foreach=False, capturable=False, fused=None, differentiable=False)
    fusedopt.SGD([p], foreach=None, fused=None)


def test_decoupled_weight_decay_selects_adamw_as_in_torch():
    ours, theirs = _pair()
    twin = [p.detach().clone().requires_grad_() for p in ours]
    a = fusedopt.Adam(ours, lr=0.1, weight_decay=0.5, decoupled_weight_decay=True)
    b = torch.optim.Adam(theirs, lr=0.1, weight_decay=0.5, decoupled_weight_decay=True)
    c = fusedopt.AdamW(twin, lr=0.1, weight_decay=0.5)
    for step in range(3):
        _set_grads(ours, theirs, step)
        for p, q in zip(twin, ours):
            p.grad = q.grad.clone()
        a.step(), b.step(), c.step()
    _assert_same(ours, theirs)
    _assert_same(twin, theirs)
    assert a.param_groups[0]["decoupled_weight_decay"] is True and c.param_groups[0]["decoupled_weight_decay"] is True
    with pytest.raises(ValueError, match="L2.*decoupled_weight_decay=True"):  # torch AdamW's checkpoint into Adam
        fusedopt.Adam([p.detach().clone().requires_grad_() for p in ours]).load_state_dict(b.state_dict())
    fusedopt.AdamW([p.detach().clone().requires_grad_() for p in ours]).load_state_dict(b.state_dict())
    with pytest.raises(TypeError, match="always decoupled"):
        fusedopt.AdamW(ours, decoupled_weight_decay=False)
    with pytest.raises(ValueError, match="differentiable=True is not supported"):
        fusedopt.Adam(ours, differentiable=True)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_sgd_momentum_may_cross_zero_between_steps_as_in_torch(backend):
    """torch.optim.SGD keeps (and uses) a buffer while momentum != 0, whatever it was at construction:
    momentum set by hand, and OneCycleLR cycling the momentum of an SGD built with momentum=0."""
    if backend == "triton":
        from kernel_check import require_kernel_device

        require_kernel_device("cpu")
    ours, theirs = _pair(dtype=FP32)
    a = fusedopt.SGD(ours, lr=0.1, momentum=0.0, backend=backend)
    b = torch.optim.SGD(theirs, lr=0.1, momentum=0.0)
    for step in range(6):
        if step in (2, 4):
            for o in (a, b):
                o.param_groups[0]["momentum"] = 0.9 if step == 2 else 0.0
        _set_grads(ours, theirs, step)
        a.step(), b.step()
    _assert_same(ours, theirs, rtol=1e-6, atol=1e-7)
    assert "momentum_buffer" in a.state[ours[0]]
    ours, theirs = _pair(dtype=FP32)
    a = fusedopt.SGD(ours, lr=0.1, momentum=0.0, backend=backend)
    b = torch.optim.SGD(theirs, lr=0.1, momentum=0.0)
    schedules = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=10) for o in (a, b)]
    for step in range(4):
        _set_grads(ours, theirs, step)
        a.step(), b.step()
        for s in schedules:
            s.step()
    _assert_same(ours, theirs, rtol=1e-6, atol=1e-7)


def test_backend_must_be_known():
    with pytest.raises(ValueError, match="backend"):
        fusedopt.AdamW([torch.randn(2, requires_grad=True)], backend="cuda-graphs")


# ---- layouts and dtypes --------------------------------------------------------------------------

def _non_contiguous_leaves(dtype):
    gen = torch.Generator().manual_seed(3)
    transposed = torch.randn(4, 6, generator=gen, dtype=dtype).t()  # (6, 4), strides (1, 6)
    base = torch.randn(60, generator=gen, dtype=dtype)
    strided = base.as_strided((5, 4), (12, 2))  # gaps between rows and elements
    sliced = torch.randn(8, 5, generator=gen, dtype=dtype)[::2, 1:]
    return [transposed, strided, sliced]


@pytest.mark.parametrize("dtype, rtol, atol", [(FP64, 1e-12, 1e-14), (FP32, 1e-6, 1e-7)])
@pytest.mark.parametrize("cls_name, kwargs", [("AdamW", {"amsgrad": True}), ("SGD", {"momentum": 0.9})])
def test_non_contiguous_parameters_match_torch(cls_name, kwargs, dtype, rtol, atol):
    views = _non_contiguous_leaves(dtype)
    assert not any(v.is_contiguous() for v in views)
    ours = [v.requires_grad_() for v in views]  # views made leaves
    theirs = [v.detach().clone().requires_grad_() for v in views]
    opt = getattr(fusedopt, cls_name)(ours, lr=0.05, backend="reference", **kwargs)
    ref = getattr(torch.optim, cls_name)(theirs, lr=0.05, foreach=False, **kwargs)
    for k in range(5):
        _set_grads(ours, theirs, k)
        opt.step()
        ref.step()
        _assert_same(ours, theirs, rtol=rtol, atol=atol, msg=f"step {k + 1}")
    assert not ours[0].is_contiguous()  # updated in place, layout kept


def test_mixed_fp32_and_fp64_parameters_match_torch_in_their_own_precision():
    (a32, a64), (b32, b64) = ([torch.randn(6, 3, dtype=d, generator=torch.Generator().manual_seed(5))
                               .requires_grad_() for d in (FP32, FP64)] for _ in range(2))
    opt = fusedopt.Adam([a32, a64], lr=0.05, weight_decay=0.1, backend="reference")
    ref = torch.optim.Adam([b32, b64], lr=0.05, weight_decay=0.1, foreach=False)
    for k in range(6):
        _set_grads([a32, a64], [b32, b64], k)
        opt.step()
        ref.step()
        _assert_same([a32], [b32], rtol=1e-6, atol=1e-7, msg=f"fp32 step {k + 1}")
        _assert_same([a64], [b64], rtol=1e-12, atol=1e-14, msg=f"fp64 step {k + 1}")


@pytest.mark.parametrize("dtype", [BF16, FP16])
def test_low_precision_parameters_step_like_torch_in_fp32_then_round(dtype):
    """bf16/fp16 parameters keep fp32 states and compute in fp32: one step equals torch's fp32 step
    from the same values, rounded once to the parameter dtype (within one ulp for near-ties)."""
    gen = torch.Generator().manual_seed(7)
    low = torch.randn(64, generator=gen).to(dtype).requires_grad_()
    full = low.detach().float().requires_grad_()
    opt = fusedopt.AdamW([low], lr=0.05, weight_decay=0.1, backend="reference")
    ref = torch.optim.AdamW([full], lr=0.05, weight_decay=0.1, foreach=False)
    ulp = 2.0 ** -(7 if dtype == BF16 else 10)
    for k in range(5):
        g = torch.randn(64, generator=gen).to(dtype)
        low.grad, full.grad = g, g.float()
        with torch.no_grad():
            full.copy_(low.float())  # same starting values
        opt.step()
        ref.step()
        assert low.dtype == dtype
        torch.testing.assert_close(low.detach().float(), full.detach().to(dtype).float(), rtol=ulp, atol=0.0)
        for key in ("exp_avg", "exp_avg_sq"):
            assert opt.state[low][key].dtype == FP32
            # a few fp32 ulps: torch's lerp rounds differently where m nearly cancels
            torch.testing.assert_close(opt.state[low][key], ref.state[full][key], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("key, bad", [("sr_seed", 2**32 + 5), ("sr_seed", -1), ("sr_seed", 2.5), ("nonfinite", "Skip"),
                                      ("stochastic_rounding", 1), ("master_weights", "yes"), ("max_grad_norm", 0.0),
                                      ("quant_threshold", -3), ("quant_threshold", 10.5), ("state_dtype", "int8")])
def test_a_bad_value_written_by_hand_is_refused_and_changes_nothing(key, bad):
    """As at construction: a group key written after it is checked when written, not at some step."""
    opt = fusedopt.AdamW([torch.zeros(10, requires_grad=True)], stochastic_rounding=True, max_grad_norm=1.0)
    group = opt.param_groups[0]
    before = group[key].clone() if isinstance(group[key], torch.Tensor) else group[key]
    with pytest.raises((ValueError, TypeError), match=key):
        group[key] = bad
    after = group[key]
    assert torch.equal(after, before) if isinstance(after, torch.Tensor) else after == before
    good = {"sr_seed": 7, "nonfinite": "skip", "stochastic_rounding": False, "master_weights": True,
            "max_grad_norm": None, "quant_threshold": 0, "state_dtype": "q8"}[key]
    group[key] = good  # and a good value is taken
    assert (int(group[key]) if isinstance(group[key], torch.Tensor) else group[key]) == good


def test_update_and_setdefault_write_through_the_checks():
    opt = fusedopt.AdamW([torch.zeros(10, requires_grad=True)], stochastic_rounding=True)
    group = opt.param_groups[0]
    seed = group["sr_seed"]
    with pytest.raises(ValueError, match="nonfinite"):
        group.update(nonfinite="Skip")
    group.update(sr_seed=9, lr=0.5)
    assert group["sr_seed"] is seed and int(seed) == 9 and float(group["lr"]) == 0.5
    assert group.setdefault("sr_seed", 3) is seed and int(seed) == 9


def test_a_param_group_copies_without_the_optimizer_hook():
    import copy
    import pickle

    opt = fusedopt.AdamW([torch.zeros(10, requires_grad=True)], amsgrad=False)
    group = copy.deepcopy(opt.param_groups[0])
    assert group.on_change is None and group["amsgrad"] is False
    assert pickle.loads(pickle.dumps(opt.param_groups[0])).on_change is None
    twin = copy.deepcopy(opt)
    assert twin.param_groups[0].on_change.__self__ is twin  # the copy's own hook


def test_a_group_wide_rule_keeps_master_copies_for_every_tensor_of_a_mixed_group():
    """A rule reducing over the whole group runs it as one program, so its float32 tensors keep a
    copy too (rather than the group being refused as two programs)."""
    from fusedopt.dsl import norm, rule

    @rule("group_normalized")
    def group_normalized(p, g, t, lr=0.1):
        p.set(p - lr * g / (norm(g, over="group") + 1e-12))

    half, full = torch.zeros(8, dtype=torch.bfloat16, requires_grad=True), torch.zeros(8, requires_grad=True)
    opt = fusedopt.FusedOptimizer([half, full], group_normalized, master_weights=True)
    half.grad, full.grad = torch.ones(8, dtype=torch.bfloat16), torch.ones(8)
    opt.step()
    assert "master_param" in opt.state[half] and "master_param" in opt.state[full]
