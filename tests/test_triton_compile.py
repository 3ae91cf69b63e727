"""fusedopt::fused_step under torch.library.opcheck and torch.compile(fullgraph=True)."""

from __future__ import annotations

import functools

import pytest
import torch

import fusedopt
from codegen import ops
from kernel_check import KERNEL_DEVICES, fresh_states, hparam_tensors, require_kernel_device

import torch._dynamo  # noqa: E402  (the config below must be read after dynamo is imported)

HAS_BACKWARD_IN_GRAPH = hasattr(torch._dynamo.config, "trace_autograd_ops")  # torch >= 2.13


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("name", ["adam", "adamw", "sgd", "lion"])
def test_fused_step_passes_opcheck(device, name):
    require_kernel_device(device)
    from fusedopt import optimizers

    rule = getattr(optimizers, name)
    program = rule.program(with_momentum=True) if name == "sgd" else rule.program()
    params = [torch.randn(s, device=device) for s in [(5,), (3, 4)]]
    grads = [torch.randn_like(p) for p in params]
    states = fresh_states(program, params, grads)
    steps = [torch.zeros((), device=device) for _ in params]
    hp = hparam_tensors(program, {}, device)
    args = (ops.register(program), params, grads, [t for n in program.state_names for t in states[n]], steps,
            [hp[h] for h in program.hparams])
    torch.library.opcheck(torch.ops.fusedopt.fused_step.default, args)


def _train(model, opt, sched, x, steps, compiled):
    def step(x):
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()

    fn = torch.compile(step, fullgraph=True) if compiled else step
    for _ in range(steps):
        fn(x)
        sched.step()


@pytest.mark.slow
@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("sched_name,opt_name", [("onecycle", "adam"), ("cosine", "adam"), ("cosine", "lamb"),
                                                 ("cosine", "adafactor")])
def test_compiled_training_step_with_fused_kernels_never_recompiles(device, sched_name, opt_name):
    require_kernel_device(device)
    if not HAS_BACKWARD_IN_GRAPH:
        pytest.skip("tracing backward inside the graph needs torch >= 2.13")
    # config.patch, not monkeypatch: undoing a monkeypatched dynamo config can delete the option
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        _check_no_recompiles(device, sched_name, opt_name)


def _check_no_recompiles(device, sched_name, opt_name):
    torch._dynamo.reset()
    torch.manual_seed(0)

    def make():
        model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).to(device)
        return model

    models = [make(), make()]
    models[1].load_state_dict(models[0].state_dict())
    # LAMB: reduction phases and clipping; Adafactor: per-row and per-column values in four phases, and
    # clipping and the non-finite check across its matrix and vector programs (computed before the launches)
    make_opt = {"adam": fusedopt.Adam, "lamb": fusedopt.LAMB,
                "adafactor": functools.partial(fusedopt.Adafactor, max_grad_norm=1.0, nonfinite="skip")}[opt_name]
    opts = [make_opt(m.parameters(), lr=0.01, backend="triton") for m in models]
    if sched_name == "onecycle":  # cycles betas[0] as well as lr
        scheds = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=60) for o in opts]
    else:
        scheds = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=50) for o in opts]
    x = torch.randn(8, 4, device=device)
    counts = torch._dynamo.utils.counters
    counts.clear()
    _train(models[0], opts[0], scheds[0], x, 2, compiled=True)
    graphs_after_state_creation = counts["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        _train(models[0], opts[0], scheds[0], x, 48, compiled=True)
    assert counts["stats"]["unique_graphs"] == graphs_after_state_creation == 2
    assert not counts["graph_break"]
    _train(models[1], opts[1], scheds[1], x, 50, compiled=False)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if "betas" in opts[0].param_groups[0]:
        assert opts[0].param_groups[0]["betas"][0].item() == pytest.approx(opts[1].param_groups[0]["betas"][0].item())


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_compiled_step_is_reinplaced_without_copies(device):
    require_kernel_device(device)
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    params = [torch.randn(s, device=device, requires_grad=True) for s in [(7,), (3, 5)]]
    opt = fusedopt.AdamW(params, backend="triton")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # states exist; the compiled step is the steady state

    @torch.compile(fullgraph=True)
    def step():
        opt.step()

    _, codes = run_and_get_code(step)
    code = "\n".join(codes)
    assert "torch.ops.fusedopt.fused_step.default" in code
    assert "copy_" not in code and "clone" not in code
