"""Lowering: hoisting per-tensor scalars, CSE, semantics preserved, deterministic text."""

from __future__ import annotations

import os
import subprocess
import sys

import oracle
import pytest
import strategies
import sympy
import torch
from hypothesis import given
from hypothesis import strategies as st
from sympy.functions.elementary.piecewise import ExprCondPair

from fusedopt import ir, passes
from fusedopt.optimizers import adam, adamw, lion, sgd

S = sympy.Symbol
BUILTIN_PROGRAMS = [p for r in (adam, adamw, sgd, lion) for p in strategies.all_option_programs(r)]
IDS = [f"{p.name}-{'-'.join(k for k, v in p.options if v) or 'plain'}" for p in BUILTIN_PROGRAMS]


def _resolve(lowered: passes.Lowered, expr: sympy.Expr, scalars: bool = True) -> sympy.Expr:
    """Substitute temps (and scalars) back until only the program's own names remain."""
    defs = dict(lowered.temps)
    if scalars:
        defs.update(lowered.scalars)
    table = {S(n): e for n, e in defs.items()}
    for _ in range(len(table) + 1):
        new = expr.xreplace(table)
        if new == expr:
            return expr
        expr = new
    return expr


def _scalar_only_compounds(expr: sympy.Basic, scalar_names: set[str]) -> list[sympy.Basic]:
    """Non-atomic subexpressions reading only scalars: what hoisting should have taken out."""
    found = []
    for node in sympy.preorder_traversal(expr):
        if node.is_Atom or isinstance(node, sympy.logic.boolalg.BooleanAtom):
            continue
        names = ir.free_names(node)
        if names and names <= scalar_names and not isinstance(node, ExprCondPair):
            found.append(node)
    return found


def _scalar_names(lowered: passes.Lowered) -> set[str]:
    return set(lowered.program.scalar_names) | {n for n, _ in lowered.scalars}


# ---- hoisting ------------------------------------------------------------------------------------

def test_adamw_hoists_bias_corrections_and_decay_factor():
    low = passes.lower(adamw.program())
    elementwise = [e for _, e in low.temps] + [e for _, e in low.outputs]
    lr, wd, b1, b2, t = S("lr"), S("weight_decay"), S("beta1"), S("beta2"), S("t")
    # per element, hyperparameters appear only bare (beta2 * v); every expression of them is hoisted
    for e in elementwise:
        assert not ir.free_names(e) & {"t", "beta1", "lr", "weight_decay"}, e
        assert not e.has(b1**t) and not e.has(b2**t) and not e.has(1 - b2)
        assert not _scalar_only_compounds(e, _scalar_names(low)), e
    resolved = [_resolve(low, S(n)) for n, _ in low.scalars]
    assert any(r.has(b1**t) for r in resolved)
    assert any(r.has(b2**t) for r in resolved)
    assert any(r.has(lr * wd) for r in resolved)
    for r in resolved:
        assert ir.free_names(r) <= set(low.program.scalar_names), r


@pytest.mark.parametrize("program", BUILTIN_PROGRAMS, ids=IDS)
def test_no_scalar_only_subexpression_is_left_per_element(program):
    low = passes.lower(program)
    names = _scalar_names(low)
    for name, e in [*low.temps, *low.outputs]:
        assert not _scalar_only_compounds(e, names), f"{name} = {e}"


@given(rule=strategies.random_rules())
def test_random_rules_leave_no_scalar_only_subexpression_per_element(rule):
    low = passes.lower(rule.program())
    names = _scalar_names(low)
    for name, e in [*low.temps, *low.outputs]:
        assert not _scalar_only_compounds(e, names), f"{name} = {e}"


@pytest.mark.parametrize("program", BUILTIN_PROGRAMS, ids=IDS)
def test_definitions_come_in_dependency_order(program):
    low = passes.lower(program)
    known = set(program.scalar_names)
    for name, e in low.scalars:
        assert ir.free_names(e) <= known, f"scalar {name} = {e} reads a later name"
        known.add(name)
    known |= {ir.PARAM, ir.GRAD, *program.state_names}
    for name, e in low.temps:
        assert ir.free_names(e) <= known, f"temp {name} = {e} reads a later name"
        known.add(name)
    for name, e in low.outputs:
        assert ir.free_names(e) <= known, f"output {name} = {e}"
    assert [t for t, _ in low.outputs] == [t for t, _ in program.updates]
    assert all(n.startswith("_") for n, _ in [*low.scalars, *low.temps])


# ---- CSE -----------------------------------------------------------------------------------------

def _uses(low: passes.Lowered, name: str) -> int:
    sym = S(name)
    exprs = [e for _, e in low.temps] + [e for _, e in low.outputs]
    return sum(_count(e, sym) for e in exprs)


def _count(expr: sympy.Basic, sym: sympy.Symbol) -> int:
    return sum(1 for node in sympy.preorder_traversal(expr) if node == sym)


@pytest.mark.parametrize("program", [adam.program(amsgrad=True), adam.program(), adamw.program(),
                                     sgd.program(with_momentum=True, nesterov=True)], ids=lambda p: p.name)
def test_cse_shares_temps_between_outputs(program):
    low = passes.lower(program)
    assert low.temps, "expected shared temporaries"
    for name, _ in low.temps:
        assert _uses(low, name) >= 2, f"temp {name} is used once: nothing shared"
    # the new moments are computed once and both stored and used by the parameter update
    outputs = dict(low.outputs)
    if "exp_avg" in outputs:
        shared = outputs["exp_avg"]
        assert isinstance(shared, sympy.Symbol) and outputs["p"].has(shared)
    before = sum(sympy.count_ops(e) for _, e in program.updates)
    after = sum(sympy.count_ops(e) for _, e in [*low.scalars, *low.temps, *low.outputs])
    assert after < before


@pytest.mark.parametrize("program", BUILTIN_PROGRAMS, ids=IDS)
def test_cse_temps_are_all_used_more_than_once(program):
    low = passes.lower(program)
    for name, _ in low.temps:
        assert _uses(low, name) >= 2, f"temp {name} is used once"


# ---- semantics -----------------------------------------------------------------------------------

def _evaluate(expr: sympy.Expr, env: dict[str, torch.Tensor], scalar_names) -> torch.Tensor:
    return oracle.ErrorBound(env, frozenset(scalar_names), torch.float64)(expr).value


def _random_env(program: ir.Program, hparams: dict[str, float], t: int, seed: int, n: int = 64):
    gen = torch.Generator().manual_seed(seed)
    env = {h: torch.tensor(v, dtype=torch.float64) for h, v in hparams.items()}
    env[ir.STEP] = torch.tensor(float(t), dtype=torch.float64)
    for name in (ir.PARAM, ir.GRAD):
        env[name] = torch.randn(n, generator=gen, dtype=torch.float64)
    for name in program.state_names:  # non-negative, as second moments are
        env[name] = torch.randn(n, generator=gen, dtype=torch.float64).abs()
    return env


def _check_lowering_preserves_semantics(program, hparams, t, seed):
    low = passes.lower(program)
    env = _random_env(program, hparams, t, seed)
    scalar_names = set(program.scalar_names)
    want = {target: _evaluate(e, env, scalar_names) for target, e in program.updates}
    # 1. substitute scalars and temps back into each output
    for target, e in low.outputs:
        got = _evaluate(_resolve(low, e), env, scalar_names)
        torch.testing.assert_close(got.expand_as(want[target]), want[target], rtol=1e-9, atol=1e-12,
                                   msg=lambda m, target=target: f"{target} (substituted back): {m}")
    # 2. evaluate the lowered program in order, as a kernel does
    seq = dict(env)
    for name, e in [*low.scalars, *low.temps]:
        seq[name] = _evaluate(e, seq, scalar_names | {n for n, _ in low.scalars})
    for target, e in low.outputs:
        got = _evaluate(e, seq, scalar_names | {n for n, _ in low.scalars})
        torch.testing.assert_close(got.expand_as(want[target]), want[target], rtol=1e-9, atol=1e-12,
                                   msg=lambda m, target=target: f"{target} (in order): {m}")


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd", "lion"])
@given(data=st.data())
def test_lowering_preserves_semantics_of_builtins(name, data):
    hp, options = data.draw(strategies.hparams_for(name), label="hparams")
    program = strategies.BUILTIN_RULES[name].program(**options)
    _check_lowering_preserves_semantics(program, hp, data.draw(st.integers(1, 10)), data.draw(st.integers(0, 999)))


@given(rule=strategies.random_rules(), hp=strategies.random_rule_hparams(), t=st.integers(1, 10),
       seed=st.integers(0, 999))
def test_lowering_preserves_semantics_of_random_rules(rule, hp, t, seed):
    _check_lowering_preserves_semantics(rule.program(), hp[0], t, seed)


def test_semantics_check_detects_a_changed_lowering():
    """The comparison above fails when a lowered output is altered (it is not vacuous)."""
    low = passes.lower(adamw.program())
    outputs = tuple((t, e * 1.0001 if t == "p" else e) for t, e in low.outputs)
    broken = passes.Lowered(low.program, low.scalars, low.temps, outputs)
    env = _random_env(low.program, dict(zip(low.program.hparams, low.program.defaults)), 3, 0)
    names = set(low.program.scalar_names)
    want = _evaluate(low.program.update_of("p"), env, names)
    got = _evaluate(_resolve(broken, dict(broken.outputs)["p"]), env, names)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


# ---- determinism ---------------------------------------------------------------------------------

def test_lowering_is_deterministic_within_a_process():
    for program in BUILTIN_PROGRAMS:
        assert passes.lower(program).text() == passes.lower(program).text()
        assert passes.lower(program) == passes.lower(program)


_PRINT_KEYS = """
import hashlib
from fusedopt import passes
from fusedopt.dsl import rule, state, where, minimum, maximum, sign, eq
from fusedopt.optimizers import adam, adamw, sgd, lion
import itertools

@rule("mixed")
def mixed(p, g, t, lr=0.1, beta=0.9, clip=1.0):
    m = state("m")
    m.set(where(eq(t, 1), g, beta * m + (1 - beta) * g))
    p.set(p - lr * minimum(maximum(m, -clip), clip) * sign(g) / (1 - beta**t))

for r in (adam, adamw, sgd, lion, mixed):
    names = sorted(r.options)
    for combo in itertools.product((False, True), repeat=len(names)):
        prog = r.program(**dict(zip(names, combo)))
        print(prog.name, combo, prog.key(), hashlib.sha256(passes.lower(prog).text().encode()).hexdigest())
"""


def test_keys_and_lowered_text_are_identical_across_processes_and_hash_seeds():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    outputs = []
    for seed in ("0", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": root}
        res = subprocess.run([sys.executable, "-c", _PRINT_KEYS], env=env, cwd=root, capture_output=True,
                             text=True, timeout=300, check=False)
        assert res.returncode == 0, res.stderr
        outputs.append(res.stdout)
    assert outputs[0].count("\n") == 19  # every option combination of the four built-ins, and "mixed"
    assert outputs[0] == outputs[1]
    # and the same keys as in this process
    assert adamw.program().key() in outputs[0]
    assert sgd.program(with_momentum=True, nesterov=True).key() in outputs[0]
