"""Checkpoint forms beyond a plain round trip: the dense form of states stored differently from what
the group now asks for, master copies across loads, torch.optim's load hooks, and optimizers that
are deep-copied or pickled whole."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import fusedopt
from fusedopt import ir, quant
from fusedopt.dsl import rule, state


SMALL_WINDOW = dict(lr=1e-3, density=0.1, block=256, quant_block=128)  # MicroAdam on small tensors


def _trained(opt, params, steps=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt.step()


def _param(shape=(64, 80), dtype=torch.float32, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype).requires_grad_()


@pytest.mark.parametrize("change", [{"state_dtype": "fp32"}, {"state_dtype": "q4"}, {"quant_threshold": 10**6},
                                    {"state_dtype": "bf16"}])
def test_dense_form_decodes_the_states_as_stored_before_a_changed_storage_converts_them(change):
    """A group's storage changed by hand converts its states at the next step; a dense checkpoint
    taken before that step decodes what is stored (q8 codes), not what the group now names."""
    p = _param()
    opt = fusedopt.AdamW8bit([p], lr=1e-2)
    _trained(opt, [p])
    before = opt.state_dict(dense=True)["state"][0]
    for key, value in change.items():
        opt.param_groups[0][key] = value
    after = opt.state_dict(dense=True)["state"][0]
    assert sorted(after) == ["exp_avg", "exp_avg_sq", "step"]
    for name in ("exp_avg", "exp_avg_sq"):
        assert after[name].dtype == torch.float32 and torch.equal(after[name], before[name]), name
        stored = opt.state[p]
        assert torch.equal(after[name], quant.decode_state(stored[name], stored[name + "_absmax"], "q8",
                                                           signed=name == "exp_avg", shape=p.shape))
    torch_opt = torch.optim.AdamW([p.detach().clone().requires_grad_()])
    torch_opt.load_state_dict(opt.state_dict(dense=True))  # torch.optim's form: it loads
    assert torch.equal(next(iter(torch_opt.state.values()))["exp_avg"], before["exp_avg"])


def test_dense_form_of_bf16_states_is_float32():
    p = _param()
    opt = fusedopt.AdamW([p], lr=1e-2, state_dtype="bf16")
    _trained(opt, [p])
    dense = opt.state_dict(dense=True)["state"][0]
    for name in ("exp_avg", "exp_avg_sq"):
        assert dense[name].dtype == torch.float32 and torch.equal(dense[name], opt.state[p][name].float())


def test_a_checkpoint_with_master_copies_loads_into_an_optimizer_without_them():
    """Whether a group keeps the copy is the loading optimizer's choice, in both directions."""
    p = _param(dtype=torch.bfloat16)
    opt = fusedopt.AdamW([p], lr=1e-2, master_weights=True)
    _trained(opt, [p])
    q = p.detach().clone().requires_grad_()
    without = fusedopt.AdamW([q], lr=1e-2)
    without.load_state_dict(opt.state_dict())
    assert ir.MASTER not in without.state[q]
    assert torch.equal(without.state[q]["exp_avg"], opt.state[p]["exp_avg"])
    _trained(without, [q])  # and it steps
    assert ir.MASTER not in without.state[q]


def test_master_copies_do_not_depend_on_whether_the_model_or_the_optimizer_loads_first():
    """A saved copy is loaded as it is (the model's weights may be loaded after the optimizer, as
    torch.optim allows); the dense form carries none, and the copy then starts from the parameter at
    the next step, so from the weights loaded last."""
    p = _param(dtype=torch.bfloat16)
    opt = fusedopt.AdamW([p], lr=1e-2, master_weights=True, stochastic_rounding=True)
    _trained(opt, [p])
    assert ir.MASTER not in opt.state_dict(dense=True)["state"][0]
    for form in ("compact", "dense"):
        q = _param(dtype=torch.bfloat16, seed=9)  # a fresh model's weights
        resumed = fusedopt.AdamW([q], master_weights=True)
        resumed.load_state_dict(opt.state_dict(dense=form == "dense"))
        resumed.param_groups[0]["lr"] = 0.0  # (the checkpoint's lr was loaded)
        with torch.no_grad():
            q.copy_(p)  # the model loads second
        q.grad = torch.zeros_like(q)
        resumed.step()  # lr 0: the copy and the parameter keep their values
        want = opt.state[p][ir.MASTER] if form == "compact" else p.detach().float()
        assert torch.equal(resumed.state[q][ir.MASTER], want), form
        if form == "dense":  # (the compact form's step rounds its copy stochastically again)
            assert torch.equal(q, p)


def test_window_optimizers_drop_a_master_copy_they_do_not_keep():
    p = _param(dtype=torch.bfloat16)
    opt = fusedopt.MicroAdam([p], **SMALL_WINDOW, master_weights=True)
    _trained(opt, [p])
    q = p.detach().clone().requires_grad_()
    without = fusedopt.MicroAdam([q], **SMALL_WINDOW)
    without.load_state_dict(opt.state_dict())
    assert ir.MASTER not in without.state[q] and ir.MASTER not in without.state_dict()["state"][0]
    assert torch.equal(without.state[q]["window_value"], opt.state[p]["window_value"])


def test_load_hooks_run_as_in_torch_optim():
    calls = []
    p = _param()
    opt = fusedopt.AdamW8bit([p], lr=1e-2)
    _trained(opt, [p])
    sd = opt.state_dict()
    other = fusedopt.AdamW8bit([q := p.detach().clone().requires_grad_()], lr=1.0)

    def pre(optimizer, state_dict):
        calls.append(("pre", optimizer is other))
        state_dict = copy.deepcopy(state_dict)
        state_dict["param_groups"][0]["lr"] = 0.5  # a pre-hook may return a new state dict
        return state_dict

    def replace_groups(optimizer, state_dict):  # changes the dict it is given: a shallow copy
        state_dict["param_groups"] = copy.deepcopy(state_dict["param_groups"])

    other.register_load_state_dict_pre_hook(replace_groups)
    other.register_load_state_dict_pre_hook(pre)
    other.register_load_state_dict_post_hook(lambda optimizer: calls.append(("post", float(optimizer.param_groups[0]["lr"]))))
    groups_before = sd["param_groups"]
    other.load_state_dict(sd)
    assert calls == [("pre", True), ("post", 0.5)]
    assert sd["param_groups"] is groups_before and sd["param_groups"][0]["lr"] == 0.01
    assert torch.equal(other.state[q]["exp_avg"], opt.state[p]["exp_avg"])


def test_state_dict_post_hooks_see_the_form_returned():
    """The dense conversion and the plain numbers come before torch's post-hooks, in both front ends."""
    seen = []
    p = _param()
    opt = fusedopt.AdamW8bit([p], lr=1e-2)
    _trained(opt, [p])
    opt.register_state_dict_post_hook(lambda o, sd: seen.append((sd["state"][0]["exp_avg"].dtype,
                                                                 type(sd["param_groups"][0]["lr"]))))
    opt.state_dict(dense=True)
    opt.state_dict()
    assert seen == [(torch.float32, float), (torch.uint8, float)]
    window = fusedopt.MicroAdam([_param()], **SMALL_WINDOW)
    window.register_state_dict_post_hook(lambda o, sd: seen.append(type(sd["param_groups"][0]["lr"])))
    window.state_dict()
    assert seen[-1] is float


def test_a_load_leaves_no_cached_answer_keyed_by_its_temporary_groups():
    """Checks during a load see merged copies of the groups; answers cached under their ids would
    be found by a later group that reuses one of those ids."""
    big, small = _param(), _param((10,))
    opt = fusedopt.AdamW8bit([big, small], lr=1e-2, max_grad_norm=1.0)  # two storages: several programs
    _trained(opt, [big, small])
    opt.load_state_dict(opt.state_dict())
    live = {id(g) for g in opt.param_groups}
    assert {key[0] for key in opt._multi} <= live and set(opt._factors) <= live


def _copies(opt):
    yield "deepcopy", copy.deepcopy(opt)
    buffer = io.BytesIO()
    torch.save(opt, buffer)
    buffer.seek(0)
    yield "torch.save", torch.load(buffer, weights_only=False)


def _params_of(opt):
    return [p for g in opt.param_groups for p in g["params"]]


@pytest.mark.parametrize("make, dtype", [
    (lambda ps: fusedopt.AdamW8bit(ps, lr=1e-2, max_grad_norm=1.0, quant_threshold=100), torch.float32),
    (lambda ps: fusedopt.AdamW(ps, lr=1e-2, master_weights=True, stochastic_rounding=True, sr_seed=3), torch.bfloat16),
    (lambda ps: fusedopt.MicroAdam(ps, **SMALL_WINDOW), torch.float32),
], ids=["adamw8bit", "adamw-bf16-master", "microadam"])
def test_a_copied_or_pickled_optimizer_steps_as_the_original(make, dtype):
    """torch.optim pickles defaults, state and param groups only; a fusedopt optimizer also keeps
    its rule, backend and settings, so a copy (with its copied parameters) continues bit for bit."""
    params = [_param((40, 30), dtype, seed=2), _param((50,), dtype, seed=3)]
    opt = make(params)
    _trained(opt, params)
    for how, twin in _copies(opt):
        twin_params = _params_of(twin)
        assert all(a is not b and torch.equal(a, b) for a, b in zip(params, twin_params)), how
        originals = [p.detach().clone() for p in params]
        _trained(twin, twin_params, steps=2, seed=5)
        assert all(torch.equal(p, o) for p, o in zip(params, originals)), f"{how}: the copy moved the original"
        reference = copy.deepcopy(params)
        again = make(reference)
        again.load_state_dict(opt.state_dict())
        _trained(again, reference, steps=2, seed=5)
        for a, b in zip(twin_params, reference):
            assert not torch.equal(a.detach(), originals[0]) if a.shape == originals[0].shape else True
            assert torch.equal(a.detach(), b.detach()), how


@pytest.mark.parametrize("make", [
    lambda ps: fusedopt.AdamW8bit(ps, lr=1e-2, max_grad_norm=1.0, quant_threshold=100),
    lambda ps: fusedopt.MicroAdam(ps, **SMALL_WINDOW),
], ids=["adamw8bit", "microadam"])
def test_a_copied_or_pickled_optimizer_compiles_its_step_at_once(make):
    """Copies rebuild their programs when they are made: building one makes sympy objects, which a
    step compiled with fullgraph=True cannot trace (a copy's first compiled step failed so)."""
    params = [_param((40, 30), seed=2), _param((50,), seed=3)]
    opt = make(params)
    _trained(opt, params)
    for how, twin in _copies(opt):
        twin_params = _params_of(twin)
        for p in twin_params:
            p.grad = torch.ones_like(p)
        torch.compile(twin.step, fullgraph=True, backend="aot_eager")()
        assert all(int(twin.state[p]["step"]) == 4 for p in twin_params), how


def test_adam_mini_copies_keep_their_block_views():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    opt = fusedopt.AdamMini(model.named_parameters(), lr=1e-2, dim=8, n_heads=2)
    _trained(opt, list(model.parameters()))
    twin = copy.deepcopy(opt)
    assert [twin._views[p] for p in _params_of(twin)] == [opt._views[p] for p in _params_of(opt)]
    _trained(twin, _params_of(twin))


@rule("local_sgd_momentum")
def local_sgd_momentum(p, g, t, lr=0.1, beta=0.9):
    b = state("momentum_buffer")
    b.set(beta * b + g)
    p.set(p - lr * b)


def test_a_rule_pickles_by_name_and_a_local_rule_says_how_to_fix_it():
    assert pickle.loads(pickle.dumps(local_sgd_momentum)) is local_sgd_momentum
    assert copy.deepcopy(local_sgd_momentum) is local_sgd_momentum

    @rule("inner")
    def inner(p, g, t, lr=0.1):
        p.set(p - lr * g)

    opt = fusedopt.FusedOptimizer([_param((5,))], inner)
    assert copy.deepcopy(opt).rule is inner and "differentiable" not in copy.deepcopy(opt).defaults
    with pytest.raises(pickle.PicklingError, match="define the rule at module level"):
        pickle.dumps(opt)
    pickled = pickle.dumps(fusedopt.FusedOptimizer([_param((5,))], local_sgd_momentum))
    rule_object = globals().pop("local_sgd_momentum")  # the rule is gone where the pickle names it
    try:
        with pytest.raises(AttributeError, match="local_sgd_momentum"):
            pickle.loads(pickled)
    finally:
        globals()["local_sgd_momentum"] = rule_object
