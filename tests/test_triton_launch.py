"""Launch plans: one launch per group per step, tables rebuilt or refreshed exactly when needed."""

from __future__ import annotations

import pytest
import torch

import fusedopt
from codegen import launch
from kernel_check import KERNEL_DEVICES, require_kernel_device


def pair(shapes, device, dtype=torch.float32, seed=0, **kw):
    gen = torch.Generator().manual_seed(seed)
    base = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    a = [p.clone().to(device).requires_grad_() for p in base]
    b = [p.clone().to(device).requires_grad_() for p in base]
    return a, b


def set_grads(a, b, gen):
    for x, y in zip(a, b):
        g = torch.randn(x.shape, generator=gen).to(x.dtype).to(x.device)
        x.grad, y.grad = g.clone(), g.clone()  # fresh tensors every step, as after zero_grad(set_to_none)


def assert_same(a, b):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_one_launch_per_group_per_step(device):
    require_kernel_device(device)
    params = [torch.randn(s, device=device, requires_grad=True) for s in [(3, 4), (700,), (1,), (0,)]]
    opt = fusedopt.AdamW([{"params": params[:2]}, {"params": params[2:], "lr": 0.1}], backend="triton")
    before = launch.launches["adamw"]
    for step in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    assert launch.launches["adamw"] - before == 2 * 3


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_fresh_gradient_tensors_refresh_the_pointer_table(device):
    require_kernel_device(device)
    a, b = pair([(33,), (5, 7)], device)
    oa = fusedopt.Adam(a, lr=0.05, backend="triton")
    ob = fusedopt.Adam(b, lr=0.05, backend="reference")
    gen = torch.Generator().manual_seed(1)
    keep = []
    for _ in range(4):
        set_grads(a, b, gen)
        keep.append([x.grad for x in a])  # keep old grads alive so new ones get new addresses
        oa.step()
        ob.step()
    assert_same(a, b)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_new_param_list_and_loaded_states_use_new_tables(device):
    require_kernel_device(device)
    a, b = pair([(40,), (6,)], device)
    oa = fusedopt.SGD(a, lr=0.1, momentum=0.9, backend="triton")
    ob = fusedopt.SGD(b, lr=0.1, momentum=0.9, backend="reference")
    gen = torch.Generator().manual_seed(2)
    for _ in range(2):
        set_grads(a, b, gen)
        oa.step()
        ob.step()
    oa.load_state_dict(ob.state_dict())  # new state tensors at new addresses
    for _ in range(2):
        set_grads(a, b, gen)
        oa.step()
        ob.step()
    assert_same(a, b)
    assert all(oa.state[x]["step"].item() == 4 for x in a)
    # a different parameter list with the same shapes gets its own plan
    c, d = pair([(40,), (6,)], device, seed=5)
    oc = fusedopt.SGD(c, lr=0.1, momentum=0.9, backend="triton")
    od = fusedopt.SGD(d, lr=0.1, momentum=0.9, backend="reference")
    set_grads(c, d, gen)
    oc.step()
    od.step()
    assert_same(c, d)


def test_misaligned_tensors_take_the_unhinted_path_and_stay_correct():
    require_kernel_device("cpu")
    storage = torch.randn(1001)
    mis = storage.clone()[1:]  # a view 4 bytes past an aligned start
    mis.requires_grad_()
    assert mis.data_ptr() % 16 != 0
    ref = [storage[1:].clone().requires_grad_()]
    om = fusedopt.AdamW([mis], backend="triton")
    orf = fusedopt.AdamW(ref, backend="reference")
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        g = torch.randn(1000, generator=gen)
        mis.grad, ref[0].grad = g.clone(), g.clone()
        om.step()
        orf.step()
    # eager steps replay through plans of their own
    own = [plan for fast in om._fast.values() for call, _ in fast.calls for _, _, plan in call.kernels]
    plans = [p for p in launch_plans() + own if any(ptr == mis.data_ptr() for ptr in p.pointers)]
    assert plans and not plans[-1].aligned
    torch.testing.assert_close(mis, ref[0], rtol=2e-6, atol=1e-7)


def launch_plans():
    from codegen import ops

    return list(ops._PLANS.plans.values())


def test_tensors_the_kernel_cannot_index_fall_back_to_the_reference():
    require_kernel_device("cpu")
    transposed = torch.randn(8, 6).t().contiguous().t()  # dense, permuted strides: the kernel takes it
    sliced = torch.randn(6, 8)[:, :5]  # not dense: reference fallback
    f64 = torch.randn(9, dtype=torch.float64)  # no float64 kernels: reference fallback
    a = [t.requires_grad_() for t in (transposed, sliced, f64)]
    b = [t.detach().clone().requires_grad_() for t in a]
    oa = fusedopt.Adam(a, lr=0.01, backend="triton")
    ob = torch.optim.Adam(b, lr=0.01, foreach=False)
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        for x, y in zip(a, b):
            g = torch.randn(x.shape, generator=gen, dtype=x.dtype)
            x.grad, y.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


def test_plan_tables_cover_every_element_exactly_once():
    from codegen.template import KernelSpec

    from codegen import ops

    spec = ops.kernel_spec(fusedopt.optimizers.sgd.program(), torch.float32, torch.float32, "interpreter")
    assert isinstance(spec, KernelSpec)
    chunk = launch.chunk_elements("interpreter")
    numels = [0, 1, chunk - 1, chunk, chunk + 1, 3 * chunk + 7]
    plan = launch.Plan(spec, numels, 2, torch.device("cpu"))
    covered = [0] * len(numels)
    for t, s in zip(plan.chunk_tensor.tolist(), plan.chunk_start.tolist()):
        covered[t] += min(chunk, max(0, numels[t] - s))
    assert covered == numels
    assert plan.chunk_count.tolist() == [max(1, -(-n // chunk)) for n in numels]


def test_eager_fused_step_bumps_version_counters_like_an_inplace_op():
    """The eager path skips the dispatcher, so it must tell autograd what it wrote."""
    require_kernel_device("cpu")
    w = torch.randn(5, requires_grad=True)
    opt = fusedopt.AdamW([w], backend="triton")
    w.grad = torch.randn(5)
    x = torch.randn(5, requires_grad=True)
    loss = (w * x).sum()  # saves w for the gradient of x
    before = w._version
    opt.step()
    assert w._version > before
    assert all(t._version > 0 for t in opt.state[w].values())
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_triton_backend_on_a_device_it_cannot_use_fails_at_construction(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="backend='reference'"):
        fusedopt.AdamW([torch.zeros(3, requires_grad=True)], backend="triton")


def _replay_pair(device, shapes=((33,), (5, 7), (300,)), rule=fusedopt.Adam, **kw):
    a, b = pair(shapes, device)
    return a, b, rule(a, lr=0.05, backend="triton", **kw), rule(b, lr=0.05, backend="reference", **kw)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_replayed_steps_see_a_replaced_parameter_storage(device):
    """The eager replay keys on parameter addresses: ``p.data = ...`` must not write to the old storage."""
    require_kernel_device(device)
    a, b, oa, ob = _replay_pair(device)
    gen = torch.Generator().manual_seed(2)
    for step in range(4):
        set_grads(a, b, gen)
        if step == 2:
            old = a[1].data
            a[1].data = a[1].data.clone()
            b[1].data = b[1].data.clone()
            frozen = old.clone()
        oa.step()
        ob.step()
    assert torch.equal(old, frozen)  # the replaced storage was left alone
    assert_same(a, b)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_replayed_steps_see_a_parameter_relaid_in_its_own_storage(device):
    """``p.data = p.data.t()`` keeps the address and (square) shape; only the strides change, and the
    recorded call, which indexes memory in the old order, must not be replayed."""
    require_kernel_device(device)
    a, b, oa, ob = _replay_pair(device, shapes=((6, 6), (40,)))
    gen = torch.Generator().manual_seed(4)
    for step in range(4):
        if step == 2:
            a[0].data, b[0].data = a[0].data.t(), b[0].data.t()
        set_grads(a, b, gen)
        oa.step()
        ob.step()
        assert_same(a, b)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_replayed_steps_follow_missing_and_relaid_gradients(device):
    require_kernel_device(device)
    a, b, oa, ob = _replay_pair(device)
    gen = torch.Generator().manual_seed(3)
    for step in range(6):
        set_grads(a, b, gen)
        if step == 2:  # one parameter without a gradient: it must not move
            a[0].grad = b[0].grad = None
        if step == 4:  # a gradient with another memory layout (transposed storage)
            g = torch.randn(7, 5, generator=gen).to(device).t()
            a[1].grad, b[1].grad = g.clone().t().contiguous().t(), g.clone()
            assert not a[1].grad.is_contiguous()
        before = a[0].detach().clone()
        oa.step()
        ob.step()
        if step == 2:
            assert torch.equal(a[0], before)
        assert_same(a, b)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_replayed_steps_use_loaded_states_and_changed_options(device):
    require_kernel_device(device)
    a, b, oa, ob = _replay_pair(device)
    gen = torch.Generator().manual_seed(4)
    for step in range(6):
        set_grads(a, b, gen)
        if step == 2:
            saved = ob.state_dict()
            oa.load_state_dict(saved)  # fresh state tensors: the replay must not keep the old ones
            for x, y in zip(a, b):
                x.data.copy_(y.data)
        if step == 4:
            for o in (oa, ob):
                o.param_groups[0]["amsgrad"] = True
        oa.step()
        ob.step()
        assert_same(a, b)
    assert "max_exp_avg_sq" in oa.state[a[0]]


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("change", ["clear", "delete one", "replace a tensor"])
def test_replayed_steps_see_a_cleared_or_replaced_state(device, change):
    """``opt.state`` edited by hand between steps: the next step must use (and create) the states
    that ``opt.state`` holds, as torch.optim does, never the tensors the previous step launched on."""
    require_kernel_device(device)
    a, b, oa, ob = _replay_pair(device)
    gen = torch.Generator().manual_seed(6)
    for step in range(5):
        set_grads(a, b, gen)
        if step == 2:
            for o, ps in ((oa, a), (ob, b)):
                if change == "clear":
                    o.state.clear()
                elif change == "delete one":
                    del o.state[ps[1]]
                else:
                    o.state[ps[2]]["exp_avg"] = torch.full_like(o.state[ps[2]]["exp_avg"], 0.25)
        oa.step()
        ob.step()
        assert_same(a, b)
    saved = oa.state_dict()["state"]
    expected = {"clear": [3, 3, 3], "delete one": [5, 3, 5], "replace a tensor": [5, 5, 5]}[change]
    assert [float(saved[i]["step"]) for i in range(3)] == expected
    for x, y in zip(a, b):
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(oa.state[x][name], ob.state[y][name], rtol=0, atol=0)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_replayed_steps_with_the_same_gradient_objects(device):
    """zero_grad(set_to_none=False) keeps gradient tensors: the replay relaunches without any refresh."""
    require_kernel_device(device)
    a, b, oa, ob = _replay_pair(device)
    gen = torch.Generator().manual_seed(5)
    set_grads(a, b, gen)
    for _ in range(4):
        oa.step()
        ob.step()
        for x, y in zip(a, b):  # new values, same tensors
            g = torch.randn(x.shape, generator=gen).to(x.device)
            x.grad.copy_(g)
            y.grad.copy_(g)
    assert_same(a, b)
    assert len(oa._fast) == 1


def test_launch_override_is_parsed_and_checked(monkeypatch):
    from codegen import config

    monkeypatch.setenv("FUSEDOPT_LAUNCH", "BLOCK=2048, ITERS=2,num_warps=8,ROWS=8")
    assert launch.config_for("cuda") == {"BLOCK": 2048, "ITERS": 2, "ROWS": 8, "num_warps": 8}
    assert launch.config_for("interpreter") == {"BLOCK": 256, "ITERS": 2, "ROWS": 2, "num_warps": 1}  # CUDA only
    for bad in ("BLOCK=1000", "ITERS=0", "warps=4", "BLOCK=x"):
        monkeypatch.setenv("FUSEDOPT_LAUNCH", bad)
        with pytest.raises(ValueError, match="FUSEDOPT_LAUNCH"):
            config.launch_override()


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_a_new_tensor_at_an_old_address_gets_its_own_tables(device):
    """Plans are cached by address; a tensor of another size at a freed tensor's address (the caching
    allocator does this all the time) must not reuse the old chunk tables."""
    require_kernel_device(device)
    base = torch.zeros(5000, device=device)
    for n in (100, 4000):
        p = base[:n].requires_grad_()  # same address, another size
        p.grad = torch.ones(n, device=device)
        fusedopt.SGD([p], lr=1.0, backend="triton").step()
    assert torch.equal(base[:100], torch.full((100,), -2.0, device=device))
    assert torch.equal(base[100:4000], torch.full((3900,), -1.0, device=device))


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_two_optimizers_over_the_same_parameters_keep_their_own_states(device):
    """Replayed steps own their device tables: another optimizer over the same tensors (same rule,
    same addresses) must not make one of them update the other's states."""
    require_kernel_device(device)
    a, b = pair([(40,), (3, 5)], device)
    first, second = fusedopt.Adam(a, lr=0.1, backend="triton"), fusedopt.Adam(a, lr=0.1, backend="triton")
    ref_first, ref_second = fusedopt.Adam(b, lr=0.1, backend="reference"), fusedopt.Adam(b, lr=0.1, backend="reference")
    gen = torch.Generator().manual_seed(6)
    set_grads(a, b, gen)
    for _ in range(3):  # the same gradient tensors each step: the replay path
        for opt, ref in ((first, ref_first), (second, ref_second)):
            opt.step()
            ref.step()
    assert_same(a, b)
    for x, y in zip(a, b):
        torch.testing.assert_close(first.state[x]["exp_avg"], ref_first.state[y]["exp_avg"], rtol=2e-6, atol=1e-7)
