"""Rules with a window, written in the DSL: definition-time errors, the program text, variants of
MicroAdam that differ from it by one line (8-bit error feedback, another score, another window), run
fused (the kernel generated from the rule) against the eager interpreter of the same rule, and the
custom op under opcheck."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fusedopt
from fusedopt import RuleError, WindowOptimizer, configure_states, sparse
from fusedopt.dsl import absolute, eq, mean, rule, sqrt, state, where, window
from fusedopt.optimizers import microadam
from window_check import DEVICE, compare

SMALL = {"window": {"block": 64, "m": 3, "density": 0.1}}


def _adam_from_window(p, a, w, t, lr, beta1, beta2, eps, weight_decay):
    """MicroAdam's update from its window: the lines every variant below shares."""
    m = w.sum(beta1)
    v = w.sum(beta2, power=2)
    u = (1 - beta1) / (1 - beta1**t) * m / (sqrt((1 - beta2) / (1 - beta2**t) * v) + eps)
    p.set(p * (1 - lr * weight_decay) - lr * where(eq(v, 0), 0, u))


@rule("microadam_ef8")
def microadam_ef8(p, g, t, lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
    e = state("error", dtype="q8minmax", quant_block=32)  # the one changed line: 8-bit error feedback
    w = window("window")
    a = g + e
    w.push(a)
    e.set(where(w.kept, 0, a))
    _adam_from_window(p, a, w, t, lr, beta1, beta2, eps, weight_decay)


@rule("microadam_by_gradient")
def microadam_by_gradient(p, g, t, lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
    e = state("error", dtype="q4minmax", quant_block=32)
    w = window("window")
    a = g + e
    w.push(a, score=g * absolute(p))  # the one changed line: top-k of |g * |p|| instead of |a|
    e.set(where(w.kept, 0, a))
    _adam_from_window(p, a, w, t, lr, beta1, beta2, eps, weight_decay)


@rule("window_momentum")
def window_momentum(p, g, t, lr=1e-2, beta=0.9):
    """Heavy-ball momentum rebuilt from a window of sparse gradients, with a float32 error feedback."""
    e = state("residual")
    w = window("window", m=4, density=0.25, block=64, dtype="fp32")
    a = g + e
    w.push(a)
    e.set(a - where(w.kept, a, 0))
    p.set(p - lr * w.sum(beta))


VARIANTS = {"ef8": microadam_ef8, "by_gradient": microadam_by_gradient, "momentum": window_momentum}


def _make(rule_):
    def make(params, backend, **kw):
        return WindowOptimizer(params, rule_, backend=backend, states=kw.pop("states", None), **kw)
    return make


# ---- variants: fused against the eager interpreter ----------------------------------------------

@settings(max_examples=6, deadline=None)
@given(name=st.sampled_from(sorted(VARIANTS)),
       sizes=st.lists(st.sampled_from([1, 7, 32, 33, 64, 65, 130]), min_size=1, max_size=3),
       bf16=st.booleans(), steps=st.integers(1, 8), seed=st.integers(0, 2**31 - 1))
def test_variants_fused_match_the_interpreter(name, sizes, bf16, steps, seed):
    dtypes = [torch.bfloat16 if bf16 and i % 2 == 0 else torch.float32 for i in range(len(sizes))]
    states = None if name == "momentum" else SMALL
    hp = {"lr": 1e-2} if name == "momentum" else {"lr": 1e-2, "weight_decay": 0.1}
    compare(sizes, dtypes, steps, seed, make=_make(VARIANTS[name]), states=states, **hp)


def test_eight_bit_error_feedback_is_finer_than_four_bit():
    """The 8-bit variant keeps one byte per element and its residual 16x closer to the exact one."""
    grad = torch.randn(256, generator=torch.Generator().manual_seed(0))
    exact = grad.clone()
    index, _ = sparse.block_topk(exact, 64, 0.1)
    sparse.scatter_columns(index, torch.zeros(len(index)), sparse.topk_layout(256, 64, 0.1), exact)
    out = {}
    for r, bits in ((microadam, 4), (microadam_ef8, 8)):
        p = torch.nn.Parameter(torch.zeros(256))
        opt = WindowOptimizer([p], r, states={**SMALL, "error": {"quant_block": 32}}, lr=0.0)
        p.grad = grad.clone()
        opt.step()
        s = opt.state[p]
        decoded = sparse.ef_decode(s["error"], s["error_min"], s["error_max"], 32, 256, bits)
        out[bits] = ((decoded - exact).abs().max().item(), s["error"].numel())
    assert out[8][1] == 256 and out[4][1] == 128
    assert out[8][0] < out[4][0] / 8


def test_opcheck_of_the_window_step_op():
    from codegen import window_ops
    from fusedopt import window_reference

    program = configure_states(microadam.program(), {**SMALL, "error": {"quant_block": 32}})
    params = [torch.randn(n, device=DEVICE) for n in (70, 5)]
    grads = [torch.randn_like(p) for p in params]
    states = [window_reference.init_state(program, p) for p in params]
    args = (window_ops.register(program), params, grads, [s[n] for n in program.storage_names for s in states],
            [torch.zeros((), dtype=torch.int64, device=DEVICE) for _ in params],
            [torch.tensor(v, dtype=torch.float64, device=DEVICE) for v in (1e-2, 0.9, 0.999, 1e-8, 0.0)])
    torch.library.opcheck(torch.ops.fusedopt.window_step.default, args)


# ---- what the program and the kernel look like --------------------------------------------------

def test_program_text_names_the_window_settings_and_the_selection():
    text = microadam.program().text()
    assert "state window: init=zeros dtype=bf16 layout=window m=10 density=0.01 block=4096" in text
    assert "state error: init=zeros dtype=q4minmax quant_block=2048" in text
    assert "select window by |Add(Symbol('error'), Symbol('g'))|" in text
    changed = configure_states(microadam.program(), {"window": {"m": 20}})
    assert changed.key() != microadam.program().key() and "m=20" in changed.text()


def test_kernel_source_is_printable_and_deterministic():
    a = fusedopt.kernel_source(microadam, target="cuda")
    b = fusedopt.kernel_source(microadam, target="cuda")
    assert a == b and "def window_step(" in a and "select_topk" in a and "libdevice.pow" in a
    assert "encode_minmax(" in a and ", 2048, 4)" in a
    ef8 = fusedopt.kernel_source(microadam_ef8, target="interpreter")
    assert ", 32, 8)" in ef8 and ef8 != fusedopt.kernel_source(microadam, target="interpreter")
    assert "select the top-k of |" in fusedopt.phases(microadam)


def test_a_window_rule_needs_the_window_front_end():
    with pytest.raises(ValueError, match="declares a window; run it with fusedopt.WindowOptimizer"):
        fusedopt.FusedOptimizer([torch.nn.Parameter(torch.zeros(3))], microadam)
    with pytest.raises(ValueError, match="declares no window"):
        WindowOptimizer([torch.nn.Parameter(torch.zeros(3))], fusedopt.optimizers.adamw)
    with pytest.raises(ValueError, match="no hyperparameter"):
        WindowOptimizer([torch.nn.Parameter(torch.zeros(3))], microadam, beta3=0.5)
    with pytest.raises(ValueError, match=r"takes no \['state_dtype'\].*states=\{'error'"):
        WindowOptimizer([torch.nn.Parameter(torch.zeros(3))], microadam, state_dtype="q8")


# ---- definition-time errors ----------------------------------------------------------------------

def _define(body):
    @rule("bad")
    def bad(p, g, t, lr=0.1, beta=0.9):
        body(p, g, t, lr, beta)


def _window_then(fn):
    def body(p, g, t, lr, beta):
        w = window("w")
        fn(p, g, t, lr, beta, w)
    return body


@pytest.mark.parametrize("body, match", [
    (_window_then(lambda p, g, t, lr, beta, w: (w.push(g), w.push(g))), "pushed twice"),
    (_window_then(lambda p, g, t, lr, beta, w: p.set(p - w.sum(beta))), r"'w.sum' is read before 'w.push"),
    (_window_then(lambda p, g, t, lr, beta, w: p.set(where(w.kept, p, 0))), r"'w.kept' is read before"),
    (_window_then(lambda p, g, t, lr, beta, w: (w.push(g), p.set(p - w.sum(p)))), "varies per element"),
    (_window_then(lambda p, g, t, lr, beta, w: (w.push(g), p.set(p - w.sum(beta, power=5)))), "power=5"),
    (_window_then(lambda p, g, t, lr, beta, w: p.set(p - w)), "is read as a number"),
    (_window_then(lambda p, g, t, lr, beta, w: (w.push(g), window("v"))), "second window"),
    (_window_then(lambda p, g, t, lr, beta, w: p.set(p - lr * g)), r"never set \(a window: never pushed\)"),
    (_window_then(lambda p, g, t, lr, beta, w: (w.push(g), p.set(p - lr * mean(g)))), "reduces"),
    (_window_then(lambda p, g, t, lr, beta, w: w.push(g > 0)), "comparison"),
    (_window_then(lambda p, g, t, lr, beta, w: (w.push(g), state("v", dtype="q8").set(g), p.set(p))),
     "sit beside a window"),
    (lambda p, g, t, lr, beta: (state("e", dtype="q4minmax").set(g), p.set(p)), "which only rules with a window keep"),
    (lambda p, g, t, lr, beta: (state("e", quant_block=64).set(g), p.set(p)), "quant_block applies to"),
    (lambda p, g, t, lr, beta: (state("e", dtype="q4minmax", quant_block=7)), "quant_block=7"),
    (lambda p, g, t, lr, beta: window("w", m=0), "m=0"),
    (lambda p, g, t, lr, beta: window("w", density=1.5), "density=1.5"),
    (lambda p, g, t, lr, beta: window("w", block=40000), "block=40000"),
    (lambda p, g, t, lr, beta: window("w", dtype="q8"), "dtype='q8'"),
    (lambda p, g, t, lr, beta: window("lr"), "shadows a reserved name or hyperparameter"),
])
def test_definition_errors_name_the_problem_and_the_fix(body, match):
    with pytest.raises(RuleError, match=match) as info:
        _define(body)
    assert "Fix:" in str(info.value)


def test_window_rules_refuse_options_they_cannot_honour():
    """A window kernel has no reduction over the group: clipping and the non-finite check come in as
    factors computed before the step; storage dtypes come from the rule."""
    with pytest.raises(RuleError, match="clip=True .* no reduction over the group.*clip='scale'"):
        microadam.program(clip=True)
    with pytest.raises(RuleError, match="skip_nonfinite='group'.*skip_nonfinite='flag'"):
        microadam.program(skip_nonfinite="group")
    with pytest.raises(RuleError, match="state_dtype='q8'.*configure_states"):
        microadam.program(state_dtype="q8")
    taken = microadam.program(clip="scale", skip_nonfinite="flag", stochastic_rounding=True, master_weights=True)
    assert {"clip_scale", "nonfinite_flag", "sr_seed"} <= set(taken.hparams)
    assert taken.states[0].name == "master_param" and taken.stochastic_rounding
    assert taken.skip_when is not None


@pytest.mark.parametrize("settings_, match", [
    ({"nothing": {"m": 2}}, "no state 'nothing'"),
    ({"window": {"quant_block": 2}}, "no setting"),
    ({"window": {"m": 0}}, "m=0"),
    ({"error": {"dtype": "q8"}}, "dtype='q8'"),
    ({"error": {"quant_block": 3}}, "quant_block=3"),
])
def test_configure_states_errors(settings_, match):
    with pytest.raises(RuleError, match=match):
        configure_states(microadam.program(), settings_)
