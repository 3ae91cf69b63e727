"""torch.compile(fullgraph=True) of a whole training step with the reference backend.

Checked: no graph break (fullgraph=True raises on one), no recompilation over 50 steps while an LR
scheduler changes lr (and betas or momentum), and the compiled trajectory equals the eager one.
The first call creates the optimizer state, so exactly two graphs exist: one for the first step,
one for every later step.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter

import fusedopt

STEPS = 50
HAS_BACKWARD_IN_GRAPH = hasattr(torch._dynamo.config, "trace_autograd_ops")  # torch >= 2.13

CONFIGS = {
    "adamw-cosine": (lambda ps: fusedopt.AdamW(ps, lr=0.01, weight_decay=0.1, backend="reference"),
                     lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=20), ()),
    "sgd-cosine": (lambda ps: fusedopt.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, backend="reference"),
                   lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=20), ()),
    "adam-onecycle-betas": (lambda ps: fusedopt.Adam(ps, lr=0.01, backend="reference"),
                            lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.02, total_steps=STEPS + 5,
                                                                          cycle_momentum=True), ("betas",)),
    "adamw8bit-cosine": (lambda ps: fusedopt.AdamW8bit(ps, lr=0.01, quant_threshold=0, backend="reference"),
                         lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=20), ()),
    "adamw4bit-cosine": (lambda ps: fusedopt.AdamW4bit(ps, lr=0.01, quant_threshold=0, backend="reference"),
                         lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=20), ()),
    # matrices and vectors as two programs, clipped together by a factor computed before them
    "adafactor-clipped-cosine": (lambda ps: fusedopt.Adafactor(ps, lr=0.01, max_grad_norm=1.0, backend="reference"),
                                 lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=20), ()),
    "adamw8bit-skip-nonfinite": (lambda ps: fusedopt.AdamW8bit(ps, lr=0.01, nonfinite="skip", backend="reference"),
                                 lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=20), ()),
    "sgd-onecycle-momentum": (lambda ps: fusedopt.SGD(ps, lr=0.05, momentum=0.9, backend="reference"),
                              lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=STEPS + 5,
                                                                            cycle_momentum=True), ("momentum",)),
}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _setup(config: str, seed: int = 0):
    make_opt, make_sched, cycled = CONFIGS[config]
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = make_opt(list(model.parameters()))
    sched = make_sched(opt)
    gen = torch.Generator().manual_seed(seed + 1)
    data = [(torch.randn(32, 8, generator=gen), torch.randn(32, 1, generator=gen)) for _ in range(4)]
    return model, opt, sched, data, cycled


def _train_step_fn(model, opt):
    def train_step(x, y):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()
    return train_step


def _hparam_values(opt, keys):
    group = opt.param_groups[0]
    out = [float(group["lr"])]
    for key in keys:
        value = group[key]
        out += [float(v) for v in value] if isinstance(value, tuple) else [float(value)]
    return tuple(out)


@pytest.mark.skipif(not HAS_BACKWARD_IN_GRAPH, reason="backward inside a compiled graph needs torch >= 2.13")
@pytest.mark.parametrize("config", list(CONFIGS))
def test_compiled_training_step_is_one_graph_without_recompiles(config):
    model, opt, sched, data, cycled = _setup(config)
    tensors_before = {k: v for k, v in opt.param_groups[0].items() if isinstance(v, (torch.Tensor, tuple))}
    counter = CompileCounter()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        step = torch.compile(_train_step_fn(model, opt), backend=counter, fullgraph=True)
        cycled_values = set()
        losses = []

        def train(k):
            x, y = data[k % len(data)]
            losses.append(step(x, y))
            sched.step()
            cycled_values.add(_hparam_values(opt, cycled))

        for k in range(2):
            train(k)
        assert counter.frame_count == 2  # the first step (creates state) and every later one
        with torch._dynamo.config.patch(error_on_recompile=True):  # any recompilation now raises
            for k in range(2, STEPS):
                train(k)
    assert counter.frame_count == 2, f"{counter.frame_count} graphs for {STEPS} steps"
    assert len(cycled_values) > 20  # lr (and betas / momentum) really changed every step
    for key, value in tensors_before.items():
        assert opt.param_groups[0][key] is value  # written in place
    assert losses[-1] < losses[0]
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.skipif(not HAS_BACKWARD_IN_GRAPH, reason="backward inside a compiled graph needs torch >= 2.13")
@pytest.mark.parametrize("config", ["adamw-cosine", "adam-onecycle-betas", "sgd-onecycle-momentum"])
def test_compiled_trajectory_equals_eager(config):
    eager_model, eager_opt, eager_sched, data, _ = _setup(config)
    model, opt, sched, _, _ = _setup(config)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        step = torch.compile(_train_step_fn(model, opt), backend=CompileCounter(), fullgraph=True)
        eager_step = _train_step_fn(eager_model, eager_opt)
        for k in range(20):
            x, y = data[k % len(data)]
            loss, eager_loss = step(x, y), eager_step(x, y)
            sched.step()
            eager_sched.step()
            torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=1e-7, msg=lambda m, k=k: f"step {k + 1}: {m}")
    for p, q in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for p, q in zip(model.parameters(), eager_model.parameters()):
        for key, value in eager_opt.state[q].items():
            torch.testing.assert_close(opt.state[p][key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config", ["adamw-cosine", "sgd-onecycle-momentum"])
def test_compiled_optimizer_step_alone_is_one_graph_without_recompiles(config):
    """The form that works on every supported torch: backward eager, opt.step() compiled."""
    model, opt, sched, data, _ = _setup(config)
    counter = CompileCounter()

    @torch.compile(backend=counter, fullgraph=True)
    def opt_step():
        opt.step()

    def train(k):
        x, y = data[k % len(data)]
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt_step()
        opt.zero_grad()
        sched.step()

    for k in range(2):
        train(k)
    assert counter.frame_count == 2
    with torch._dynamo.config.patch(error_on_recompile=True):
        for k in range(2, 30):
            train(k)
    assert counter.frame_count == 2


@pytest.mark.parametrize("make", [
    # one tensor kind only: the per-kind programs and the group's static options must agree without
    # building a program inside the traced step
    lambda ps: fusedopt.Adafactor(ps, lr=0.01, max_grad_norm=1.0, backend="reference"),
    # two clipping groups: one norm over both, computed before the launches
    lambda ps: fusedopt.AdamW([{"params": ps[:1]}, {"params": ps[1:], "lr": 0.02}], lr=0.01, max_grad_norm=0.5,
                              backend="reference"),
], ids=["adafactor-matrices-clipped", "adamw-two-groups-clipped"])
def test_compiled_clipping_steps_compile_once(make):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16, bias=False), torch.nn.Tanh(), torch.nn.Linear(16, 1, bias=False))
    opt = make(list(model.parameters()))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
    counter = CompileCounter()

    @torch.compile(backend=counter, fullgraph=True)
    def opt_step():
        opt.step()

    x, y = torch.randn(32, 8), torch.randn(32, 1)
    for k in range(12):
        with torch._dynamo.config.patch(error_on_recompile=k >= 2):
            torch.nn.functional.mse_loss(model(x), y).mul(100).backward()
            opt_step()
            opt.zero_grad()
            sched.step()
    assert counter.frame_count == 2


def test_recompile_count_is_not_vacuous():
    """Changing a static option (a Python bool the graph specialises on) does give a new graph."""
    model, opt, _, data, _ = _setup("adamw-cosine")
    counter = CompileCounter()

    @torch.compile(backend=counter, fullgraph=True)
    def opt_step():
        opt.step()

    def grads(k):
        x, y = data[k % len(data)]
        torch.nn.functional.mse_loss(model(x), y).backward()

    for k in range(3):
        grads(k)
        opt_step()
        opt.zero_grad()
    assert counter.frame_count == 2
    opt.param_groups[0]["maximize"] = True
    grads(3)
    opt.step()  # eagerly once, so the program for the new option exists
    with torch._dynamo.config.patch(error_on_recompile=True), pytest.raises(torch._dynamo.exc.RecompileError):
        opt_step()
    opt_step()
    assert counter.frame_count == 3


@pytest.mark.skipif(not HAS_BACKWARD_IN_GRAPH, reason="backward inside a compiled graph needs torch >= 2.13")
def test_inductor_compiled_training_step_matches_eager_without_recompiles():
    """The same with real code generation (about 25 s on a cold cache on 2 CPU cores)."""
    eager_model, eager_opt, eager_sched, data, _ = _setup("adamw-cosine")
    model, opt, sched, _, _ = _setup("adamw-cosine")
    torch._dynamo.utils.counters.clear()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        step = torch.compile(_train_step_fn(model, opt), backend="inductor", fullgraph=True)
        eager_step = _train_step_fn(eager_model, eager_opt)
        for k in range(STEPS):
            x, y = data[k % len(data)]
            step(x, y)
            eager_step(x, y)
            sched.step()
            eager_sched.step()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    for p, q in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_factors_written_inside_a_compiled_step_reach_the_update(backend):
    """The clipping factor of two clipping groups and the non-finite flag of two skipping groups (one
    of which runs as several programs) are computed inside the compiled opt.step() and read by the
    update through their tensors. The trajectory, a skipped step included, is the eager one, and the clip is active.
    (Written into 0-d float64 tensors, these writes were lost under aot_eager and inductor.)"""
    from torch._dynamo.testing import CompileCounterWithBackend

    def make(ps):
        # group 0: a quantized weight and a float32 bias, two programs; group 1 clips with it
        return fusedopt.AdamW8bit([{"params": ps[:2]}, {"params": ps[2:]}], lr=0.01, max_grad_norm=0.05,
                                  nonfinite="skip", quant_threshold=50, backend="reference")

    runs = []
    for compiled in (False, True, None):  # None: eager without clipping, to show the clip matters
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        opt = make(list(model.parameters()))
        if compiled is None:
            for group in opt.param_groups:
                group["max_grad_norm"] = None
        step = torch.compile(opt.step, backend=CompileCounterWithBackend(backend), fullgraph=True) if compiled \
            else opt.step
        gen = torch.Generator().manual_seed(1)
        for k in range(6):
            x, y = torch.randn(32, 8, generator=gen), torch.randn(32, 1, generator=gen)
            torch.nn.functional.mse_loss(model(x), y).backward()
            if k == 3:
                model[0].weight.grad[2, 5] = float("inf")
            step()
            opt.zero_grad()
        runs.append([p.detach().clone() for p in model.parameters()])
        # the infinite gradient is group 0's; one flag over the skipping groups skips both
        assert [int(opt.state[p]["step"]) for p in model.parameters()] == [5, 5, 5, 5]
    for a, b in zip(runs[0], runs[1]):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    assert any((a - c).abs().max() > 1e-4 for a, c in zip(runs[0], runs[2]))


def test_float64_scalars_are_written_inside_a_compiled_step():
    """A 0-d float64 parameter and a per-tensor state of float64 parameters: the compiled step writes
    them as the eager one does (a direct in-place write of a 0-d float64 CPU tensor is lost by
    aot_eager; the reference backend writes through a one-element view)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from fusedopt.dsl import mean, rule, sqrt, state

    @rule("per_tensor_rms")
    def per_tensor_rms(p, g, t, lr=0.1, beta=0.9):
        s = state("s", layout="tensor")
        s.set(beta * s + (1 - beta) * mean(g * g))
        p.set(p - lr * g / (sqrt(s) + 1e-8))

    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn((), dtype=torch.float64)),
                  torch.nn.Parameter(torch.randn(5, dtype=torch.float64))]
        opt = fusedopt.FusedOptimizer(params, per_tensor_rms, backend="reference")
        step = torch.compile(opt.step, backend=CompileCounterWithBackend("aot_eager"), fullgraph=True) \
            if compiled else opt.step
        gen = torch.Generator().manual_seed(1)
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, dtype=torch.float64, generator=gen)
            step()
        runs.append([p.detach().clone() for p in params] + [opt.state[p]["s"].clone() for p in params])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def _bits_of(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.element_size() == 2 else t


@pytest.mark.parametrize("key, value", [("state_dtype", "q4"), ("stochastic_rounding", True), ("master_weights", True),
                                        ("nonfinite", "skip"), ("max_grad_norm", 0.5), ("sr_seed", 7)])
def test_options_written_by_hand_between_compiled_steps(key, value):
    """A static option written by hand builds the group's programs when written, so the next compiled
    step recompiles (sympy cannot be traced) and runs as the eager step does, bit for bit, with no
    eager step in between. The seed of stochastic rounding is data: writing it recompiles nothing."""
    from torch._dynamo.testing import CompileCounterWithBackend

    runs, counts = [], []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Linear(64, 80).to(torch.bfloat16)
        opt = fusedopt.AdamW(model.parameters(), lr=0.01, state_dtype="q8", quant_threshold=0,
                             stochastic_rounding=key != "stochastic_rounding", backend="reference")
        counter = CompileCounterWithBackend("aot_eager")
        step = torch.compile(opt.step, backend=counter, fullgraph=True) if compiled else opt.step
        gen = torch.Generator().manual_seed(1)
        for k in range(5):
            model(torch.randn(16, 64, generator=gen).to(torch.bfloat16)).float().square().mean().backward()
            if k == 2:
                frames = counter.frame_count
                opt.param_groups[0][key] = value
            step()
            opt.zero_grad()
        runs.append([p.detach().clone() for p in model.parameters()] + [v for p in model.parameters()
                                                                          for v in opt.state[p].values()])
        counts.append(counter.frame_count - frames if compiled else None)
    for a, b in zip(*runs):
        assert torch.equal(_bits_of(a), _bits_of(b))
    if key == "sr_seed":
        assert counts[1] == 0


def test_a_window_optimizer_loaded_between_compiled_steps_keeps_compiling():
    """Loading writes into the groups MicroAdam had (keys in their order, numbers into their
    tensors) and keeps its built programs: the next compiled step with fullgraph=True runs (it
    failed when the load reordered the groups' keys or dropped the built kernels), as eagerly; so
    does one after options are written by hand."""
    import copy

    from torch._dynamo.testing import CompileCounterWithBackend
    from kernel_check import any_kernel_device

    device = any_kernel_device()
    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Linear(64, 64).to(device)
        opt = fusedopt.MicroAdam(model.parameters(), lr=0.01, m=3, density=0.05, block=256, quant_block=128,
                                 backend="triton")
        groups_before = list(opt.param_groups)
        step = torch.compile(opt.step, backend=CompileCounterWithBackend("aot_eager"), fullgraph=True) \
            if compiled else opt.step
        gen = torch.Generator().manual_seed(1)
        for k in range(5):
            model(torch.randn(16, 64, generator=gen).to(device)).square().mean().backward()
            if k == 2:
                opt.load_state_dict(copy.deepcopy(opt.state_dict()))
                assert all(a is b for a, b in zip(opt.param_groups, groups_before))
            if k == 3:  # options written by hand: the programs are built then, not in the trace
                opt.param_groups[0]["nonfinite"] = "skip"
                opt.param_groups[0]["max_grad_norm"] = 0.5
            step()
            opt.zero_grad()
        runs.append([p.detach().cpu().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_sgd_momentum_written_by_hand_between_compiled_steps():
    """The momentum lives in a tensor, but crossing zero changes the static option with_momentum:
    its program is built when written, so the compiled step recompiles and runs as eagerly."""
    from torch._dynamo.testing import CompileCounterWithBackend

    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 4)
        opt = fusedopt.SGD(model.parameters(), lr=0.1, momentum=0.0, backend="reference")
        step = torch.compile(opt.step, backend=CompileCounterWithBackend("aot_eager"), fullgraph=True) \
            if compiled else opt.step
        gen = torch.Generator().manual_seed(1)
        for k in range(4):
            model(torch.randn(5, 8, generator=gen)).square().mean().backward()
            if k == 2:
                opt.param_groups[0]["momentum"] = 0.9
            step()
            opt.zero_grad()
        runs.append([p.detach().clone() for p in model.parameters()])
        assert "momentum_buffer" in opt.state[model.weight]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.is_floating_point():  # NaN where the other has NaN
        return torch.equal(a.isnan(), b.isnan()) and torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))
    return torch.equal(a, b)


@pytest.mark.parametrize("make", [
    lambda ps: fusedopt.AdamW8bit(ps, lr=1e-2, quant_threshold=0, nonfinite="skip"),
    lambda ps: fusedopt.AdamW4bit(ps, lr=1e-2, quant_threshold=0),
], ids=["adamw8bit-skip", "adamw4bit"])
def test_inductor_steps_quantized_states_of_partial_blocks_as_eager(make):
    """The reference backend's step compiled by inductor (real code generation, about 20 s on 2 CPU
    cores) writes the eager step's parameters, codes and scales bit for bit, for sizes whose last
    quantization block is partial (2049, 300) or odd (75, 7), through a NaN gradient. Inductor in
    torch 2.13 compiled blocks indexed as padded views sliced back to ``n`` into loops that skip the
    elements past the first block (the codes of a 2049-element state differed from the first
    step); fusedopt.blocks cuts them into full blocks and a tail."""
    shapes = [(2049,), (300,), (12, 32), (75,), (7,)]

    def params():
        gen = torch.Generator().manual_seed(0)
        return [torch.randn(s, generator=gen).requires_grad_() for s in shapes]

    eager_params, compiled_params = params(), params()
    eager, compiled = make(eager_params), make(compiled_params)
    step = torch.compile(compiled.step, fullgraph=True, backend="inductor")
    gen = torch.Generator().manual_seed(1)
    for k in range(4):
        for a, b in zip(eager_params, compiled_params):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        if k == 2:
            eager_params[0].grad[3] = compiled_params[0].grad[3] = float("nan")
        eager.step()
        step()
        for a, b in zip(eager_params, compiled_params):
            assert _same_bits(a.detach(), b.detach()), k
            for name, value in eager.state[a].items():
                assert _same_bits(value, compiled.state[b][name]), (k, name, tuple(a.shape))
