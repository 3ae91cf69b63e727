"""Reusable Hypothesis strategies: parameter lists, gradients, hyperparameters, random rules.

Tensors are not drawn element by element (too slow for thousands of elements): a strategy draws a
:class:`TensorSpec` (shape, dtype, gradient kind, seed) and the spec makes the values with a seeded
torch generator, so a failing example is still printed, replayed and shrunk by Hypothesis.

Typical use::

    @given(case=strategies.rule_cases("adamw"))
    def test_something(case):
        params, states, steps = case.init()
        for k in range(case.n_steps):
            grads = case.grads(k)
            ...

The random-rule strategy (:func:`random_rules`) builds elementwise rules from the DSL's operators.
Its rules are numerically tame by construction: every division is by ``abs(x) + 1``, every square
root is of ``abs(x)``, every ``exp`` is of ``-abs(x)``, states are updated by convex or
bounded steps and the parameter moves by at most ``h0`` per step, so values stay finite in fp16
over ten steps whatever the gradients.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
from collections.abc import Callable
from typing import Any

import sympy
import torch
from hypothesis import strategies as st

from fusedopt.dsl import RuleError
from fusedopt import dsl, ir, optimizers, reference
from fusedopt.dsl import Rule

FP32, BF16, FP16, FP64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
PARAM_DTYPES = (FP32, BF16, FP16)

# Sizes: 1, primes, powers of two and their neighbours (block/chunk edges), a few thousand at most.
PRIMES = (2, 3, 5, 7, 13, 31, 61, 127, 257, 509, 1021, 2039, 4093)
EDGES = (16, 63, 64, 65, 127, 128, 129, 1023, 1024, 1025, 2047, 2048, 2049, 4095, 4096)
SIZES = (1,) + PRIMES + EDGES
MAX_NUMEL = 4096

GRAD_KINDS = ("normal", "tiny", "huge", "zero", "mixed")


# ---- tensors ------------------------------------------------------------------------------------

@st.composite
def shapes(draw, max_numel: int = MAX_NUMEL, max_dims: int = 4) -> tuple[int, ...]:
    """1-D to 4-D shapes with at most ``max_numel`` elements; 1-D sizes hit 1, primes and edges."""
    ndim = draw(st.integers(1, max_dims))
    if ndim == 1:
        return (draw(st.sampled_from([s for s in SIZES if s <= max_numel])),)
    dims: list[int] = []
    budget = max_numel
    for _ in range(ndim):
        d = draw(st.sampled_from([s for s in (1, 2, 3, 5, 7, 8, 13, 16, 31, 64) if s <= budget]))
        dims.append(d)
        budget //= d
    return tuple(dims)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One parameter: its shape and dtype, the kind of gradients it gets, and a seed for values."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    grad_kind: str
    seed: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def _gen(self, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1000 + salt)

    def param(self) -> torch.Tensor:
        """Initial values: standard normal, in the spec's dtype."""
        return torch.randn(self.shape, generator=self._gen(999), dtype=FP64).to(self.dtype)

    def grad(self, step: int) -> torch.Tensor:
        """The gradient for step ``step`` (0-based), in the spec's dtype."""
        return gradient_values(self.shape, self.dtype, self.grad_kind, self._gen(step))


def gradient_values(shape: tuple[int, ...], dtype: torch.dtype, kind: str, gen: torch.Generator) -> torch.Tensor:
    """Gradients of one kind: normal N(0,1); tiny |g| in [1e-30, 1e-6]; huge |g| in [1e3, 1e6]
    (fp16: [1e3, 1e4], below its 65504 limit); zero; or mixed, each element any of those."""
    huge_hi = 4.0 if dtype == FP16 else 6.0
    sign = torch.where(torch.rand(shape, generator=gen, dtype=FP64) < 0.5, -1.0, 1.0)
    u = torch.rand(shape, generator=gen, dtype=FP64)
    normal = torch.randn(shape, generator=gen, dtype=FP64)
    tiny = sign * 10.0 ** (-30.0 + 24.0 * u)
    huge = sign * 10.0 ** (3.0 + (huge_hi - 3.0) * u)
    zero = torch.zeros(shape, dtype=FP64)
    if kind == "normal":
        out = normal
    elif kind == "tiny":
        out = tiny
    elif kind == "huge":
        out = huge
    elif kind == "zero":
        out = zero
    elif kind == "mixed":
        pick = torch.randint(0, 4, shape, generator=gen)
        out = torch.where(pick == 0, normal, torch.where(pick == 1, tiny, torch.where(pick == 2, huge, zero)))
    else:
        raise ValueError(f"unknown gradient kind {kind!r}; use one of {GRAD_KINDS}")
    return out.to(dtype)


def tensor_specs(dtypes=PARAM_DTYPES, grad_kinds=GRAD_KINDS, max_numel: int = MAX_NUMEL) -> st.SearchStrategy:
    return st.builds(
        TensorSpec,
        shape=shapes(max_numel=max_numel),
        dtype=st.sampled_from(dtypes),
        grad_kind=st.sampled_from(grad_kinds),
        seed=st.integers(0, 2**16),
    )


def param_lists(min_size: int = 0, max_size: int = 6, **kwargs) -> st.SearchStrategy:
    """Lists of :class:`TensorSpec`: empty, one, or many tensors of mixed shapes and dtypes."""
    return st.lists(tensor_specs(**kwargs), min_size=min_size, max_size=max_size)


steps = st.integers(1, 10)


# ---- hyperparameters of the built-in rules ------------------------------------------------------

def _log_uniform(lo: float, hi: float) -> st.SearchStrategy:
    return st.floats(math.log10(lo), math.log10(hi)).map(lambda e: 10.0**e)


def _zero_or(strategy: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(st.just(0.0), strategy)


@st.composite
def adam_hparams(draw) -> tuple[dict[str, float], dict[str, bool]]:
    """(hyperparameters, options) of the adam and adamw rules, within torch.optim's valid ranges."""
    hp = {
        "lr": draw(_log_uniform(1e-4, 1e-1)),
        "beta1": draw(st.one_of(st.just(0.9), st.floats(0.0, 0.99))),
        "beta2": draw(st.one_of(st.just(0.999), st.floats(0.5, 0.9999))),
        "eps": draw(_log_uniform(1e-10, 1e-3)),
        "weight_decay": draw(_zero_or(st.floats(1e-4, 0.3))),
    }
    return hp, {"amsgrad": draw(st.booleans()), "maximize": draw(st.booleans())}


@st.composite
def sgd_hparams(draw) -> tuple[dict[str, float], dict[str, bool]]:
    momentum = draw(_zero_or(st.floats(0.1, 0.99)))
    dampening = draw(_zero_or(st.floats(0.01, 0.9)))
    nesterov = momentum > 0 and dampening == 0 and draw(st.booleans())
    hp = {
        "lr": draw(_log_uniform(1e-4, 1e-1)),
        "momentum": momentum,
        "dampening": dampening,
        "weight_decay": draw(_zero_or(st.floats(1e-4, 0.3))),
    }
    options = {"nesterov": nesterov, "maximize": draw(st.booleans()), "with_momentum": momentum != 0.0}
    return hp, options


@st.composite
def lion_hparams(draw) -> tuple[dict[str, float], dict[str, bool]]:
    hp = {
        "lr": draw(_log_uniform(1e-5, 1e-2)),
        "beta1": draw(st.one_of(st.just(0.9), st.floats(0.0, 0.99))),
        "beta2": draw(st.one_of(st.just(0.99), st.floats(0.5, 0.999))),
        "weight_decay": draw(_zero_or(st.floats(1e-3, 1.0))),
    }
    return hp, {"maximize": draw(st.booleans())}


BUILTIN_RULES: dict[str, Rule] = {
    "adam": optimizers.adam,
    "adamw": optimizers.adamw,
    "sgd": optimizers.sgd,
    "lion": optimizers.lion,
}
HPARAMS: dict[str, Callable[[], st.SearchStrategy]] = {
    "adam": adam_hparams,
    "adamw": adam_hparams,
    "sgd": sgd_hparams,
    "lion": lion_hparams,
}


def hparams_for(name: str) -> st.SearchStrategy:
    """(hyperparameters, options) for the built-in rule ``name``."""
    return HPARAMS[name]()


def hparam_tensors(hparams: dict[str, float], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Hyperparameters as the front end passes them: 0-d float64 tensors."""
    return {k: torch.tensor(float(v), dtype=FP64, device=device) for k, v in hparams.items()}


# ---- random rules -------------------------------------------------------------------------------
#
# An expression is a nested tuple: ("p",), ("g",), ("s0",), ("num", 0.5), ("h0",), ("tpow",) ...
# or (op, child, ...). `build` turns it into DSL calls; `show` prints it.

_ELEMENT_LEAVES = ("p", "g")
_SCALAR_LEAVES = ("h0", "h1", "tpow", "tinv")
_NUMBERS = (-1.5, -0.5, 0.25, 0.5, 1.0, 2.0, 3.0)
_CMP = ("lt", "le", "gt", "ge")


def _leaves(n_states: int) -> st.SearchStrategy:
    names = _ELEMENT_LEAVES + tuple(f"s{i}" for i in range(n_states)) + _SCALAR_LEAVES
    return st.one_of(
        st.sampled_from(names).map(lambda n: (n,)),
        st.sampled_from(_NUMBERS).map(lambda v: ("num", v)),
    )


def expr_trees(n_states: int, max_depth: int = 3) -> st.SearchStrategy:
    """Random expression trees over p, g, the states, h0, h1, h1**t, 1/t and small numbers."""
    leaf = _leaves(n_states)

    # Operands of a comparison hold no where(): sympy turns a Piecewise inside a relational into
    # an ITE node, which the interpreter and printers do not handle.
    simple = st.one_of(leaf, st.tuples(st.sampled_from(("add", "sub", "max")), leaf, leaf))

    def extend(children: st.SearchStrategy) -> st.SearchStrategy:
        pair = st.tuples(simple, simple)
        return st.one_of(
            st.tuples(st.sampled_from(("add", "sub", "min", "max")), children, children),
            # a product has one leaf operand, so magnitudes grow at most geometrically in depth
            st.tuples(st.just("mul"), leaf, children),
            st.tuples(st.just("div"), children, children),            # x / (abs(y) + 1)
            st.tuples(st.sampled_from(("abs", "sign", "sqrt", "exp", "clamp")), children),
            st.tuples(st.just("where"), st.sampled_from(_CMP), pair, st.tuples(children, children)),
            st.tuples(st.just("lerp"), children, children, st.sampled_from(("h1", "1-h1", "tpow", "num"))),
        )

    return st.recursive(leaf, extend, max_leaves=2**max_depth)


def _num(v: float) -> sympy.Float:
    return sympy.Float(v)


def build(tree: tuple, env: dict[str, Any]) -> Any:
    """Evaluate a tree with the DSL's functions; ``env`` maps p, g, s*, h0, h1, t to DSL values."""
    op = tree[0]
    if op == "num":
        return _num(tree[1])
    if op == "tpow":
        return env["h1"] ** env["t"]
    if op == "tinv":
        return 1 / env["t"]
    if len(tree) == 1:  # p, g, s0, s1, h0, h1
        return env[op]
    if op == "where":
        cmp, (a, b), (x, y) = tree[1], tree[2], tree[3]
        a, b, x, y = (_sympy(build(v, env)) for v in (a, b, x, y))
        cond = {"lt": a < b, "le": a <= b, "gt": a > b, "ge": a >= b}[cmp]
        return dsl.where(cond, x, y)
    if op == "lerp":
        w = {"h1": env["h1"], "1-h1": 1 - env["h1"], "tpow": env["h1"] ** env["t"], "num": _num(0.25)}[tree[3]]
        return dsl.lerp(build(tree[1], env), build(tree[2], env), w)
    args = [build(a, env) if isinstance(a, tuple) else a for a in tree[1:]]
    if op == "add":
        return args[0] + args[1]
    if op == "sub":
        return args[0] - args[1]
    if op == "mul":
        return args[0] * args[1]
    if op == "div":
        return args[0] / (dsl.absolute(args[1]) + 1)
    if op == "min":
        return dsl.minimum(args[0], args[1])
    if op == "max":
        return dsl.maximum(args[0], args[1])
    if op == "abs":
        return dsl.absolute(args[0])
    if op == "sign":
        return dsl.sign(args[0])
    if op == "sqrt":
        return dsl.sqrt(dsl.absolute(args[0]))
    if op == "exp":
        # exp(-|x|) is in (0, 1]. The Float factor keeps a constant argument a Float, which sympy
        # evaluates (exp(Integer) would stay symbolic, as would the E of exp(1)).
        return dsl.exp(sympy.Float(-1.0) * dsl.absolute(args[0]))
    if op == "clamp":
        return dsl.clamp(args[0], -2, 2)
    raise ValueError(f"unknown node {op!r}")


def _sympy(x: Any) -> sympy.Expr:
    return x._sympy_() if hasattr(x, "_sympy_") else sympy.sympify(x)


def show(tree: tuple) -> str:
    op = tree[0]
    if op == "num":
        return repr(tree[1])
    if len(tree) == 1:
        return {"tpow": "h1**t", "tinv": "1/t"}.get(op, op)
    if op == "where":
        cmp, (a, b), (x, y) = tree[1], tree[2], tree[3]
        sym = {"lt": "<", "le": "<=", "gt": ">", "ge": ">="}[cmp]
        return f"where({show(a)} {sym} {show(b)}, {show(x)}, {show(y)})"
    if op == "lerp":
        return f"lerp({show(tree[1])}, {show(tree[2])}, {tree[3]})"
    return f"{op}({', '.join(show(a) for a in tree[1:])})"


# How a target is finally written, given the random expression E (keeps every value bounded).
STATE_FORMS = ("lerp_clamp", "decay_squash", "max_abs")
PARAM_FORMS = ("squash", "decay_clamp", "sign")


def _squash(x):
    return x / (dsl.absolute(x) + 1)  # in (-1, 1)


def _state_value(form: str, s, e, env):
    if form == "lerp_clamp":
        return dsl.lerp(s, dsl.clamp(e, -3, 3), env["h1"])
    if form == "decay_squash":
        return env["h1"] * s + _squash(e)
    if form == "max_abs":
        return dsl.maximum(env["h1"] * s, dsl.clamp(dsl.absolute(e), 0, 5))
    raise ValueError(form)


def _param_value(form: str, p, e, env):
    if form == "squash":
        return p - env["h0"] * _squash(e)
    if form == "decay_clamp":
        return p * (1 - env["h0"] * env["h1"]) - env["h0"] * dsl.clamp(e, -1, 1)
    if form == "sign":
        return p - env["h0"] * dsl.sign(e)
    raise ValueError(form)


@dataclasses.dataclass(frozen=True)
class RuleSpec:
    """A randomly drawn rule: one expression per target, the order targets are set in, and states."""

    states: tuple[tuple[str, str, str], ...]  # (name, init, dtype)
    targets: tuple[tuple[str, str, tuple], ...]  # (target, form, expression tree), in set order

    def __repr__(self) -> str:
        body = "; ".join(f"{t}.set({form}[{show(e)}])" for t, form, e in self.targets)
        decl = ", ".join(f"{n}({init},{dt})" for n, init, dt in self.states)
        return f"[{decl}] {body}"


class RandomRule(Rule):
    """A :class:`fusedopt.Rule` built from a :class:`RuleSpec`; its repr shows the drawn body."""

    def __init__(self, spec: RuleSpec):
        self.spec = spec

        def fn(p, g, t, h0=0.05, h1=0.9):
            env: dict[str, Any] = {"p": p, "g": g, "t": t, "h0": h0, "h1": h1}
            for name, init, dtype in spec.states:
                env[name] = dsl.state(name, init=init, dtype=dtype)
            for target, form, tree in spec.targets:
                e = build(tree, env)
                if target == "p":
                    p.set(_param_value(form, p, e, env))
                else:
                    env[target].set(_state_value(form, env[target], e, env))

        digest = hashlib.sha256(repr(spec).encode()).hexdigest()[:8]
        super().__init__(f"random_{digest}", fn)

    def __repr__(self) -> str:
        return f"RandomRule({self.spec!r})"


_RANDOM_RULES: dict[RuleSpec, RandomRule] = {}


def random_rule(spec: RuleSpec) -> RandomRule | None:
    """The rule of a spec, or None when the DSL rejects it; built once per spec, so equal draws
    give the same Rule object."""
    if spec not in _RANDOM_RULES:
        try:
            _RANDOM_RULES[spec] = RandomRule(spec)
        except RuleError:
            # sympy treats symbols as complex numbers and rewrites some valid-looking expressions
            # into nodes no backend evaluates (Abs(exp(x)) -> exp(re(x)), conjugate, ITE); the DSL
            # rejects those at definition time (tested in test_dsl.py), so they are left out here.
            _RANDOM_RULES[spec] = None
    return _RANDOM_RULES[spec]


def random_rules(max_states: int = 2, max_depth: int = 3) -> st.SearchStrategy:
    """Random elementwise :class:`fusedopt.Rule` s over p, g, t, one or two states and hyperparameters
    h0 (a step size in [1e-3, 0.5]) and h1 (a decay in [0, 1)); see :func:`random_rule_hparams`."""
    return rule_specs(max_states, max_depth).map(random_rule).filter(lambda r: r is not None)


# quantized storages have their own tests (test_quantized_states.py): codes are compared differently
DENSE_STORAGE = tuple(d for d in ir.STORAGE_DTYPES if d not in ir.QUANTIZED)


@st.composite
def rule_specs(draw, max_states: int = 2, max_depth: int = 3) -> RuleSpec:
    n_states = draw(st.integers(1, max_states))
    states = tuple(
        (f"s{i}", draw(st.sampled_from(ir.STATE_INITS)), draw(st.sampled_from(DENSE_STORAGE)))
        for i in range(n_states)
    )
    order = draw(st.permutations(["p"] + [n for n, _, _ in states]))
    trees = expr_trees(n_states, max_depth)
    targets = tuple(
        (t, draw(st.sampled_from(PARAM_FORMS if t == "p" else STATE_FORMS)), draw(trees)) for t in order
    )
    return RuleSpec(states, targets)


@st.composite
def random_rule_hparams(draw) -> tuple[dict[str, float], dict[str, bool]]:
    return {"h0": draw(_log_uniform(1e-3, 0.5)), "h1": draw(st.floats(0.0, 0.999))}, {}


# ---- whole cases --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Case:
    """A rule built for some options, its hyperparameters, a parameter list and a step count."""

    program: ir.Program
    hparams: dict[str, float]
    specs: tuple[TensorSpec, ...]
    n_steps: int
    label: str = ""

    def init(self) -> tuple[list[torch.Tensor], dict[str, list[torch.Tensor]], list[torch.Tensor]]:
        """Fresh (params, states, steps); states are created from the first step's gradients."""
        params = [s.param() for s in self.specs]
        grads0 = self.grads(0)
        fresh = [reference.init_state(self.program, p, g) for p, g in zip(params, grads0)]
        states = {n: [f[n] for f in fresh] for n in self.program.state_names}
        steps_ = [torch.zeros((), dtype=torch.float32) for _ in self.specs]
        return params, states, steps_

    def grads(self, step: int) -> list[torch.Tensor]:
        return [s.grad(step) for s in self.specs]

    def hparam_tensors(self) -> dict[str, torch.Tensor]:
        return hparam_tensors(self.hparams)

    def __repr__(self) -> str:
        specs = ", ".join(f"{tuple(s.shape)}:{str(s.dtype)[6:]}:{s.grad_kind}:{s.seed}" for s in self.specs)
        return (f"Case({self.label or self.program.name}, options={dict(self.program.options)}, "
                f"hparams={self.hparams}, steps={self.n_steps}, params=[{specs}])")


@st.composite
def rule_cases(draw, name: str, min_params: int = 0, max_params: int = 6, **spec_kwargs) -> Case:
    """A :class:`Case` for the built-in rule ``name``, or for a random rule if ``name == "random"``."""
    if name == "random":
        rule = draw(random_rules())
        label = repr(rule)
        hp, options = draw(random_rule_hparams())
    else:
        rule, label = BUILTIN_RULES[name], name
        hp, options = draw(hparams_for(name))
    specs = draw(param_lists(min_params, max_params, **spec_kwargs))
    return Case(rule.program(**options), hp, tuple(specs), draw(steps), label)


def all_option_programs(rule: Rule) -> list[ir.Program]:
    """The rule's program for every combination of its static options."""
    names = sorted(rule.options)
    return [rule.program(**dict(zip(names, combo))) for combo in itertools.product((False, True), repeat=len(names))]
