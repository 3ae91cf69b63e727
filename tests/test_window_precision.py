"""Rules with a window (MicroAdam) with the step options every optimizer has: ``max_grad_norm``,
``nonfinite="skip"``, ``stochastic_rounding`` and ``master_weights``.

The fused kernel (codegen/window_template.py, through the Triton interpreter on a CPU) is checked
against the eager interpreter (fusedopt/window_reference.py) as tests/window_check.py does: window,
error feedback and step counters bit for bit, parameters and master weights within the per-step
bound of its docstring. Each option is also checked against what it stands for: clipping against the
gradients clipped by hand, the skip against a snapshot and against a run that never saw the bad
step, stochastic rounding against its expectation, master weights against float32 training.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fusedopt
from fusedopt import grad_factors, rounding
from fusedopt.microadam import MicroAdam
from kernel_check import any_kernel_device
from window_check import _bits, compare, compiled_against_eager

SMALL = dict(block=64, quant_block=32, m=3)
_SR_BITS = rounding.to_stochastic  # the expected bits, whatever a test patches into the module
BACKENDS = ["reference", "triton"]


def _device(backend: str) -> str:
    return any_kernel_device() if backend == "triton" else "cpu"


def _state(opt, params):
    return [{k: v.clone() for k, v in opt.state[p].items()} for p in params]


def _assert_same(a_params, a_states, b_params, b_states, what):
    for i, (pa, pb) in enumerate(zip(a_params, b_params)):
        assert torch.equal(_bits(pa.detach()), _bits(pb.detach())), f"{what}: param {i} differs"
        for name in a_states[i]:
            assert torch.equal(_bits(a_states[i][name]).cpu(), _bits(b_states[i][name]).cpu()), \
                f"{what}: state {name} of param {i} differs"


# ---- the kernel against the interpreter, every option at once --------------------------------------

@settings(max_examples=6, deadline=None)
@given(sizes=st.lists(st.sampled_from([1, 7, 33, 64, 97, 130]), min_size=1, max_size=3),
       dtypes=st.lists(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), min_size=3, max_size=3),
       steps=st.integers(1, 6),
       seed=st.integers(0, 2**31 - 1), clip=st.sampled_from([None, 0.5, 100.0]),
       sr=st.booleans(), master=st.booleans())
def test_fused_matches_the_interpreter_with_the_step_options(sizes, dtypes, steps, seed, clip, sr, master):
    """With the skip check on and finite gradients (it then changes nothing; skipped steps are tested
    below). Parameters are compared within a bf16 step, which a wrong rounding stream would pass:
    the stream's bits are checked by test_every_written_parameter_is_the_stochastic_rounding_..."""
    compare(sizes, dtypes[:len(sizes)], steps, seed, lr=1e-2, weight_decay=0.1, density=0.1, max_grad_norm=clip,
            nonfinite="skip", stochastic_rounding=sr, sr_seed=seed % 1000, master_weights=master, **SMALL)


# ---- max_grad_norm ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_clipping_is_the_step_on_gradients_clipped_over_every_clipping_group(backend):
    """Two clipping groups share one norm (as clip_grad_norm_ over all their parameters); a third group
    does not clip. The result equals unclipped MicroAdam fed g * float32(factor), bit for bit (the
    factor itself is checked against clip_grad_norm_ below)."""
    device = _device(backend)
    gen = torch.Generator().manual_seed(3)
    shapes = [(70,), (5, 13), (40,)]
    init = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[3 * torch.randn(s, generator=gen) for s in shapes] for _ in range(4)]

    def make(clip):
        ps = [x.clone().to(device).requires_grad_() for x in init]
        groups = [{"params": ps[:1], "max_grad_norm": clip}, {"params": ps[1:2], "max_grad_norm": clip},
                  {"params": ps[2:]}]
        return ps, MicroAdam(groups, lr=1e-2, density=0.2, backend=backend, **SMALL)

    clipped, opt_c = make(1.0)
    by_hand, opt_h = make(None)
    for step in grads:
        norm = torch.linalg.vector_norm(torch.stack([g.double().norm() for g in step[:2]]))
        factor = min(1.0, 1.0 / (float(norm) + 1e-6))
        assert factor < 0.5  # the clip is active
        for i, (p, q, g) in enumerate(zip(clipped, by_hand, step)):
            p.grad = g.to(device)
            q.grad = (g * torch.tensor(factor, dtype=torch.float32) if i < 2 else g).to(device)
        opt_c.step()
        opt_h.step()
        _assert_same(clipped, _state(opt_c, clipped), by_hand, _state(opt_h, by_hand), "clipped")
    assert not torch.equal(clipped[0].detach(), init[0].to(device))


def test_the_clip_factor_is_clip_grad_norm_s():
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=gen) * 4 for s in [(50,), (7, 9)]]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(params, 0.7)
    factor = grad_factors.clip_factor(0.7, grad_factors.total_norm(grads, torch.device("cpu")))
    for p, g in zip(params, grads):
        torch.testing.assert_close(p.grad, g * factor.float(), rtol=2e-7, atol=0)


# ---- nonfinite="skip" --------------------------------------------------------------------------------

def _skip_setup(backend, **kw):
    device = _device(backend)
    gen = torch.Generator().manual_seed(0)
    shapes = [(100,), (6, 20)]
    params = [torch.randn(s, generator=gen).to(device).requires_grad_() for s in shapes]
    grads = [[torch.randn(s, generator=gen).to(device) for s in shapes] for _ in range(3)]
    return params, MicroAdam(params, lr=1e-2, density=0.1, backend=backend, **SMALL, **kw), grads


def _step(params, opt, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_nonfinite_gradient_skips_the_whole_group(backend, bad):
    """Parameters, window rows, error codes and step counters stay as they were; the next finite step
    is the one an optimizer that never saw the bad gradient takes."""
    params, opt, grads = _skip_setup(backend, nonfinite="skip")
    clean, clean_opt, _ = _skip_setup(backend, nonfinite="skip")
    _step(params, opt, grads[0])
    _step(clean, clean_opt, grads[0])
    before, states = [p.detach().clone() for p in params], _state(opt, params)
    poisoned = [g.clone() for g in grads[1]]
    poisoned[-1].view(-1)[5] = bad
    _step(params, opt, poisoned)
    for i, (p, old) in enumerate(zip(params, before)):
        assert torch.equal(p.detach(), old), f"param {i} changed"
        for name, value in states[i].items():
            assert torch.equal(opt.state[p][name], value), f"state {name} of param {i} changed"
    _step(params, opt, grads[2])
    _step(clean, clean_opt, grads[2])
    _assert_same(params, _state(opt, params), clean, _state(clean_opt, clean), "after the skipped step")
    assert all(int(opt.state[p]["step"]) == 2 for p in params)


@pytest.mark.parametrize("backend", BACKENDS)
def test_skipping_groups_skip_together_and_propagate_lets_nan_through(backend):
    """One flag over the groups that skip (as FusedOptimizer, as torch.amp.GradScaler skips a step)."""
    device = _device(backend)
    a, b, c = (torch.zeros(80, device=device, requires_grad=True) for _ in range(3))
    opt = MicroAdam([{"params": [a], "nonfinite": "skip"}, {"params": [b], "nonfinite": "skip"}, {"params": [c]}],
                    lr=0.1, density=1.0, backend=backend, **SMALL)
    for p in (a, b, c):
        p.grad = torch.ones(80, device=device)
    b.grad[7] = float("inf")
    c.grad[7] = float("nan")
    opt.step()
    assert torch.equal(b.detach(), torch.zeros(80, device=device))
    assert int(opt.state[b]["step"]) == 0
    assert torch.equal(a.detach(), torch.zeros(80, device=device)) and int(opt.state[a]["step"]) == 0
    assert bool(c[7].isnan()) and int(opt.state[c]["step"]) == 1
    b.grad[7] = 1.0
    c.grad = None
    opt.step()  # finite again: both skipping groups step
    torch.testing.assert_close(a.detach(), torch.full((80,), -0.1, device=device))
    torch.testing.assert_close(b.detach(), torch.full((80,), -0.1, device=device))


def test_a_detector_that_misses_infinities_is_caught(monkeypatch):
    """The skip test can fail: a flag that sees NaN but not Inf lets an infinite gradient through."""
    monkeypatch.setattr(grad_factors, "any_nonfinite",
                        lambda grads, device: torch.stack([g.isnan().any().to(device) for g in grads]).any())
    with pytest.raises(AssertionError, match="changed"):
        test_a_nonfinite_gradient_skips_the_whole_group("triton", float("inf"))


# ---- stochastic rounding -----------------------------------------------------------------------------

def _quarter_step(backend, sr, seed=0, n=4096):
    """bf16 parameters at 1.0 and a first step of exactly 2**-10 (a quarter of the bf16 spacing just
    below 1.0): at density 1 MicroAdam's first update is lr * a / |a| with a = g = 1."""
    device = _device(backend)
    p = torch.ones(n, dtype=torch.bfloat16, device=device, requires_grad=True)
    opt = MicroAdam([p], lr=2.0**-10, density=1.0, eps=0.0, block=1024, quant_block=512, m=2, backend=backend,
                    stochastic_rounding=sr, sr_seed=seed)
    p.grad = torch.ones(n, dtype=torch.bfloat16, device=device)
    opt.step()
    return p.detach().float().cpu()


def test_a_quarter_step_survives_on_average_only_with_stochastic_rounding():
    n = 4096
    assert torch.equal(_quarter_step("reference", False), torch.ones(n))  # to nearest: lost
    new = _quarter_step("reference", True)
    assert set(new.unique().tolist()) == {1.0, 1.0 - 2.0**-8}
    sigma = 2.0**-8 * (0.25 * 0.75 / n) ** 0.5  # of the mean of n draws: each falls 2**-8 with p = 1/4
    assert abs(float(new.double().mean()) - (1.0 - 2.0**-10)) < 5 * sigma


def test_the_kernel_rounds_to_the_interpreter_s_bits_and_the_seed_decides_them():
    fused = _quarter_step("triton", True, seed=7)
    assert torch.equal(fused, _quarter_step("reference", True, seed=7))
    assert torch.equal(fused, _quarter_step("triton", True, seed=7))
    assert not torch.equal(fused, _quarter_step("triton", True, seed=8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_written_parameter_is_the_stochastic_rounding_of_its_master_copy(backend, dtype):
    """Several tensors (blocks and a tail), several steps: each bf16 or fp16 parameter holds exactly
    fusedopt.rounding's bits for its float32 master value, this step and this seed."""
    device = _device(backend)
    gen = torch.Generator().manual_seed(9)
    params = [torch.randn(n, generator=gen).to(dtype).to(device).requires_grad_() for n in (33, 130, 200)]
    opt = MicroAdam(params, lr=1e-2, density=0.2, stochastic_rounding=True, sr_seed=12345, master_weights=True,
                    backend=backend, **SMALL)
    for t in range(1, 5):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(dtype).to(device)
        opt.step()
        for i, p in enumerate(params):
            expected = _SR_BITS(opt.state[p]["master_param"].cpu(), dtype, 12345, t)
            assert torch.equal(_bits(p.detach().cpu()), _bits(expected)), f"step {t}, tensor {i}"
            assert not torch.equal(p.detach().cpu(), opt.state[p]["master_param"].cpu().to(dtype)), \
                "rounded to nearest everywhere"


def test_a_stochastic_rounding_with_another_stream_is_caught(monkeypatch):
    """The bit check can fail: an interpreter whose stream is off by one seed writes other bits."""
    monkeypatch.setattr(rounding, "to_stochastic", lambda x, dtype, seed, step: _SR_BITS(x, dtype, seed + 1, step))
    with pytest.raises(AssertionError, match="step 1, tensor 0"):
        test_every_written_parameter_is_the_stochastic_rounding_of_its_master_copy("reference", torch.float16)


def test_bad_step_options_are_refused_at_construction():
    with pytest.raises(TypeError, match="stochastic_rounding must be a bool"):
        MicroAdam([torch.zeros(4, requires_grad=True)], stochastic_rounding="yes")
    with pytest.raises(ValueError, match=r"sr_seed=-1"):
        MicroAdam([torch.zeros(4, requires_grad=True)], sr_seed=-1)
    with pytest.raises(ValueError, match=r"max_grad_norm 0"):
        MicroAdam([torch.zeros(4, requires_grad=True)], max_grad_norm=0)
    with pytest.raises(ValueError, match=r"nonfinite='never'"):
        MicroAdam([torch.zeros(4, requires_grad=True)], nonfinite="never")


# ---- master weights ------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_master_copy_follows_the_float32_trajectory_and_p_is_its_rounding(backend):
    device = _device(backend)
    gen = torch.Generator().manual_seed(1)
    base = [torch.randn(s, generator=gen).bfloat16() for s in [(150,), (9, 11)]]
    half = [x.clone().to(device).requires_grad_() for x in base]
    full = [x.float().to(device).requires_grad_() for x in base]
    kw = dict(lr=1e-2, weight_decay=0.1, density=0.2, backend=backend, **SMALL)
    oh, of = MicroAdam(half, master_weights=True, **kw), MicroAdam(full, **kw)
    for _ in range(5):
        for h, f in zip(half, full):
            g = torch.randn(h.shape, generator=gen).bfloat16()
            h.grad, f.grad = g.to(device), g.float().to(device)
        oh.step()
        of.step()
    for h, f in zip(half, full):
        master = oh.state[h]["master_param"]
        assert master.dtype == torch.float32
        assert torch.equal(master, f.detach())
        assert torch.equal(h.detach(), master.bfloat16())
        assert not torch.equal(master, master.bfloat16().float())  # the copy holds what bf16 cannot


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_parameters_of_a_master_weights_group_keep_no_copy(backend):
    """A float32 copy of a float32 parameter would equal it (4 bytes per element for nothing): in a
    group with master_weights=True the float32 parameter keeps none and steps bit for bit as without
    master weights, the bf16 one keeps its copy; the group runs as two programs. A checkpoint holding
    a copy of the float32 parameter loads without it."""
    device = _device(backend)
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(150, generator=gen), torch.randn(9, 11, generator=gen)
    mixed = [x.clone().to(device).requires_grad_(), y.bfloat16().to(device).requires_grad_()]
    plain = [x.clone().to(device).requires_grad_()]
    kw = dict(lr=1e-2, weight_decay=0.1, density=0.2, backend=backend, **SMALL)
    om, op = MicroAdam(mixed, master_weights=True, **kw), MicroAdam(plain, **kw)
    for _ in range(4):
        g = torch.randn(150, generator=gen).to(device)
        mixed[0].grad, plain[0].grad = g, g.clone()
        mixed[1].grad = torch.randn(9, 11, generator=gen).bfloat16().to(device)
        om.step()
        op.step()
    assert "master_param" not in om.state[mixed[0]]
    assert om.state[mixed[1]]["master_param"].dtype == torch.float32
    assert torch.equal(mixed[0].detach(), plain[0].detach())
    for name, value in op.state[plain[0]].items():
        assert torch.equal(om.state[mixed[0]][name].cpu(), value.cpu()), name
    saved = om.state_dict()
    saved["state"][0]["master_param"] = mixed[0].detach().clone()  # as an older version saved it
    om.load_state_dict(saved)
    assert "master_param" not in om.state[mixed[0]] and "master_param" in om.state[mixed[1]]


def test_a_checkpoint_without_master_weights_starts_them_from_the_parameter():
    """master_weights is the loading optimizer's choice (as FusedOptimizer's): its copy starts from
    the parameter and follows the float32 run that starts there."""
    gen = torch.Generator().manual_seed(2)
    p = torch.randn(90, generator=gen).bfloat16().requires_grad_()
    opt = MicroAdam([p], lr=1e-2, density=0.2, **SMALL)
    p.grad = torch.randn(90, generator=gen).bfloat16()
    opt.step()
    saved = opt.state_dict()
    q = p.detach().clone().requires_grad_()
    resumed = MicroAdam([q], lr=1e-2, density=0.2, master_weights=True, **SMALL)
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["master_weights"] is True
    x = q.detach().float().clone().requires_grad_()
    expected = MicroAdam([x], lr=1e-2, density=0.2, **SMALL)
    expected.load_state_dict(saved)
    g = torch.randn(90, generator=gen).bfloat16()
    q.grad, x.grad = g, g.float()
    resumed.step()
    expected.step()
    assert int(resumed.state[q]["step"]) == 2
    assert torch.equal(resumed.state[q]["master_param"], x.detach())
    assert torch.equal(q.detach(), x.detach().bfloat16())


@pytest.mark.parametrize("make", [
    lambda ps: MicroAdam(ps, lr=0.1, density=1.0, master_weights=True, **SMALL),
    lambda ps: fusedopt.AdamW(ps, lr=0.1, master_weights=True),
], ids=["microadam", "adamw"])
def test_master_weights_turned_off_and_on_restart_from_the_parameter(make):
    p = torch.full((64,), 0.5, dtype=torch.bfloat16, requires_grad=True)
    opt = make([p])
    for on in (True, False, False, True):
        opt.param_groups[0]["master_weights"] = on
        before = p.detach().float().clone()
        p.grad = torch.ones(64, dtype=torch.bfloat16)
        opt.step()
        if on:  # the copy moved from where p was, not from where it was left
            step = before - opt.state[p]["master_param"]
            assert bool((step > 0).all()) and float(step.max()) < 0.11
        else:
            assert "master_param" not in opt.state[p]


def test_checkpoints_keep_the_step_options_and_resume_bit_for_bit():
    gen = torch.Generator().manual_seed(4)
    kw = dict(lr=1e-2, density=0.2, max_grad_norm=0.5, nonfinite="skip", stochastic_rounding=True,
              sr_seed=2**32 - 1, master_weights=True, **SMALL)
    a = torch.randn(120, generator=gen).bfloat16().requires_grad_()
    opt = MicroAdam([a], **kw)
    grads = [torch.randn(120, generator=gen).bfloat16() for _ in range(5)]
    for g in grads[:2]:
        a.grad = g.clone()
        opt.step()
    saved = opt.state_dict()
    group = saved["param_groups"][0]
    assert group["sr_seed"] == 2**32 - 1 and isinstance(group["sr_seed"], int)
    assert (group["max_grad_norm"], group["nonfinite"], group["master_weights"]) == (0.5, "skip", True)
    b = a.detach().clone().requires_grad_()
    # the other options come from the checkpoint; master weights are the loading optimizer's choice
    resumed = MicroAdam([b], lr=1e-2, density=0.2, master_weights=True, **SMALL)
    resumed.load_state_dict(copy.deepcopy(saved))
    group = resumed.param_groups[0]
    assert (float(group["max_grad_norm"]), group["nonfinite"], group["stochastic_rounding"]) == (0.5, "skip", True)
    for g in grads[2:]:
        a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        resumed.step()
    _assert_same([a], _state(opt, [a]), [b], _state(resumed, [b]), "resumed")


def test_an_older_checkpoint_without_the_step_keys_keeps_the_groups_values():
    p = torch.randn(40).requires_grad_()
    opt = MicroAdam([p], density=0.5, **SMALL)
    p.grad = torch.randn(40)
    opt.step()
    saved = opt.state_dict()
    for key in ("max_grad_norm", "nonfinite", "stochastic_rounding", "sr_seed", "master_weights"):
        del saved["param_groups"][0][key]
    fresh = MicroAdam([p.detach().clone().requires_grad_()], density=0.5, nonfinite="skip", max_grad_norm=2.0,
                      **SMALL)
    fresh.load_state_dict(saved)
    group = fresh.param_groups[0]
    assert group["nonfinite"] == "skip" and float(group["max_grad_norm"]) == 2.0
    bad = copy.deepcopy(opt.state_dict())
    bad["param_groups"][0]["nonfinite"] = "sometimes"
    with pytest.raises(ValueError, match="nonfinite='sometimes'"):
        fresh.load_state_dict(bad)
    assert fresh.param_groups[0]["nonfinite"] == "skip"  # nothing changed


# ---- torch.compile -------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_step_with_every_option_is_one_graph_without_recompiles(backend):
    """bf16 model, clipping, the skip check, stochastic rounding and master weights: opt.step()
    compiled with fullgraph=True (aot_eager) compiles on the first two steps only, and the trajectory,
    a skipped step included, is the eager one of the same backend bit for bit (the interpreter
    traced too: it reads no tensor on the host)."""
    device = _device(backend)

    def setup():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))
        model = model.to(device=device, dtype=torch.bfloat16)
        return model, MicroAdam(model.parameters(), lr=0.01, density=0.1, backend=backend, max_grad_norm=0.1,
                                nonfinite="skip", stochastic_rounding=True, sr_seed=5, master_weights=True, **SMALL)

    x = torch.randn(16, 8, device=device, dtype=torch.bfloat16)
    y = torch.randn(16, 1, device=device, dtype=torch.bfloat16)
    runs = compiled_against_eager(setup, x, y, steps=12, poison_step=5)
    for _, opt in runs:
        weight = opt.param_groups[0]["params"][0]
        assert int(opt.state[weight]["step"]) == 11  # the poisoned step was skipped
    for a, b in zip(runs[0][0], runs[1][0]):
        assert torch.equal(a, b)


def test_interpreter_compiled_by_inductor_follows_the_eager_steps():
    """The interpreter's step compiled with inductor (real code generation; about 30 s on 2 CPU cores)
    follows the eager steps over 6 steps, a skipped one included, with the window wrapping around,
    partial quantization blocks and odd sizes: the same step counters and parameters within 1e-5
    (inductor's fusion leaves a few float32 ulps in the update; the failures below moved parameters
    by about 1e-3). Inductor keeps float32 values in place of a float32 -> bf16 -> float32 round trip
    inside a fused computation, so the error feedback's bf16 min and max are rounded on the bits (with
    ``.to(torch.bfloat16)`` the codes came out one level lower near the halfway points); and it
    skipped the elements past the first block of a tensor with a partial last block when the blocks
    were indexed as ``i // q`` or padded (codes read from uninitialized memory)."""
    def setup():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Tanh(), torch.nn.Linear(96, 4),
                                    torch.nn.Tanh(), torch.nn.Linear(4, 75))  # partial blocks, odd sizes
        return model, MicroAdam(model.parameters(), lr=1e-3, m=4, density=0.05, block=512, quant_block=256,
                                nonfinite="skip", backend="reference")

    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 64, generator=gen), torch.randn(32, 75, generator=gen)
    runs = compiled_against_eager(setup, x, y, steps=6, poison_step=3, backend="inductor")
    (eager, eager_opt), (compiled, compiled_opt) = runs
    for a, b, p, q in zip(eager, compiled, eager_opt.param_groups[0]["params"], compiled_opt.param_groups[0]["params"]):
        assert int(eager_opt.state[p]["step"]) == int(compiled_opt.state[q]["step"]) == 5
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
