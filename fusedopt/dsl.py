"""The rule DSL: write an optimizer's update once, as elementwise math over symbols.

    @rule("adamw")
    def adamw(p, g, t, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2):
        m = state("exp_avg")
        v = state("exp_avg_sq")
        m.set(lerp(m, g, 1 - beta1))
        v.set(beta2 * v + (1 - beta2) * g * g)
        p.set(p * (1 - lr * weight_decay)
              - lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps))

The function's first three arguments are the parameter ``p``, its gradient ``g`` and the step
``t`` (1 on the first step). Keyword arguments with a numeric default are hyperparameters: they
become symbols, live in device tensors at run time and can change every step without any
recompilation. Keyword arguments with a bool default are static options: the function runs once
per choice of them and may branch on them in Python (``if amsgrad: ...``).

Reading a state or ``p`` after setting it sees the new value. Each state and ``p`` may be set once.
Mistakes are reported when the decorator runs, naming the rule, the offending name and the fix.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import pickle
import sys
from typing import Any, Callable

import sympy

from . import ir


class RuleError(ValueError):
    """A rule is malformed; raised when the rule is defined, never inside a step."""


def _fail(rule: str, problem: str, fix: str) -> RuleError:
    return RuleError(f"rule '{rule}': {problem}. Fix: {fix}.")


class _Builder:
    """Collects states and updates while a rule's function runs."""

    active: list["_Builder"] = []

    def __init__(self, rule: str, known: set[str]):
        self.rule = rule
        self.known = known
        self.states: dict[str, ir.StateSpec] = {}
        self.updates: dict[str, sympy.Expr] = {}
        self.selections: dict[str, sympy.Expr] = {}

    @classmethod
    def current(cls, what: str) -> "_Builder":
        if not cls.active:
            raise RuleError(f"{what} can only be called inside a function decorated with @rule")
        return cls.active[-1]


def _checked(b: _Builder, value: Any, what: str) -> sympy.Expr:
    """``value`` as a sympy expression over declared names, or a RuleError naming ``what``."""
    try:
        expr = sympy.sympify(value, strict=True)
    except (sympy.SympifyError, TypeError) as exc:
        raise _fail(b.rule, f"{what} got {value!r}, which is not an expression",
                    "pass arithmetic over p, g, t, states and hyperparameters") from exc
    if _is_condition(expr):
        raise _fail(b.rule, f"{what} got a comparison ({expr})", "wrap comparisons in where(cond, a, b)")
    unknown = sorted(ir.free_names(expr) - b.known - set(b.states))
    if unknown:
        raise _fail(b.rule, f"{what} reads undeclared name(s) {unknown}",
                    "declare states with state('name') and hyperparameters as keyword arguments")
    return expr


def _called_by_rule_code() -> bool:
    """Whether the dunder method calling this was called by a rule's own code: a module outside
    sympy and fusedopt's machinery (fusedopt.optimizers holds rules)."""
    module = sys._getframe(2).f_globals.get("__name__", "")
    internal = module.startswith("sympy") or module == "fusedopt" or \
        (module.startswith("fusedopt.") and not module.startswith("fusedopt.optimizers"))
    return not internal


def _python_logic(name: str, what: str, other: Any = None) -> RuleError:
    b = _Builder.current("a rule's value")
    cond = f"eq({name}, {other!r})" if what in ("==", "!=") else f"{name} > 0"
    branches = "b, a" if what == "!=" else "a, b"
    shown = f"`{what}` (comparing with {other!r})" if what in ("==", "!=") else "`if`/`and`/`or`/`not`"
    return _fail(b.rule, f"Python {shown} on '{name}' decides on the symbol, not on its value at run time (the rule "
                 "is traced once, so one branch would hold for every step)",
                 f"for a choice at run time use where({cond}, {branches}); for a choice made once, add a bool "
                 "option (e.g. use_x=False) and branch on that")


class _Traced(sympy.Symbol):
    """A name a rule's function reads while it runs (g, t, hyperparameters, the values of p and of
    states): an ordinary sympy symbol, except that Python control flow on it from the rule's code
    (``if wd == 0:``, ``if t == 1:``, ``lr or 1e-3``) raises a RuleError instead of silently taking
    one branch for every step. After the trace every _Traced symbol is replaced by a plain one."""

    def __bool__(self) -> bool:
        if _called_by_rule_code():
            raise _python_logic(self.name, "bool")
        return True

    def __eq__(self, other: Any) -> bool:
        if _called_by_rule_code():
            raise _python_logic(self.name, "==", other)
        return super().__eq__(other)

    def __ne__(self, other: Any) -> bool:
        if _called_by_rule_code():
            raise _python_logic(self.name, "!=", other)
        return super().__ne__(other)

    __hash__ = sympy.Symbol.__hash__

    def set(self, value: Any) -> None:
        b = _Builder.current("set()")
        raise _fail(b.rule, f"'{self.name}' is set, but it is read-only",
                    "only p and states declared with state(...) are set; compute a new value and use it")


def _untraced(expr: sympy.Basic) -> sympy.Basic:
    return expr.xreplace({s: ir.symbol(s.name) for s in expr.atoms(_Traced)})


class _Handle:
    """A tensor the rule may write (``p`` or a state); reads give its current value."""

    def __init__(self, builder: _Builder, name: str):
        self._builder = builder
        self._name = name

    def _sympy_(self) -> sympy.Expr:
        return self._builder.updates.get(self._name, _Traced(self._name))

    def set(self, value: Any) -> None:
        b = self._builder
        if self._name in b.updates:
            raise _fail(b.rule, f"'{self._name}' is set twice",
                        f"compute the final value of '{self._name}' and call {self._name}.set(...) once")
        expr = _checked(b, value, f"'{self._name}'.set()")
        if self._name in b.states:
            target = b.states[self._name].layout
            try:
                got = ir.layout_of(expr, {n: s.layout for n, s in b.states.items()})
            except ValueError as exc:
                raise _fail(b.rule, f"'{self._name}' mixes layouts: {exc}", "use one partition per rule") from exc
            allowed = ("scalar",) if target == "tensor" else ("scalar", "batch", target)
            if target != "full" and got not in allowed:
                raise _fail(b.rule, f"state '{self._name}' has layout '{target}' but is set to a value with layout "
                            f"'{got}'", f"reduce it first, e.g. mean(x, over='{target}')")
        b.updates[self._name] = expr

    # arithmetic reads the current value
    def __add__(self, o): return self._sympy_() + o
    def __radd__(self, o): return o + self._sympy_()
    def __sub__(self, o): return self._sympy_() - o
    def __rsub__(self, o): return o - self._sympy_()
    def __mul__(self, o): return self._sympy_() * o
    def __rmul__(self, o): return o * self._sympy_()
    def __truediv__(self, o): return self._sympy_() / o
    def __rtruediv__(self, o): return o / self._sympy_()
    def __pow__(self, o): return self._sympy_() ** o
    def __rpow__(self, o): return o ** self._sympy_()
    def __neg__(self): return -self._sympy_()
    def __abs__(self): return sympy.Abs(self._sympy_())
    def __lt__(self, o): return self._sympy_() < o
    def __le__(self, o): return self._sympy_() <= o
    def __gt__(self, o): return self._sympy_() > o
    def __ge__(self, o): return self._sympy_() >= o

    def __bool__(self) -> bool:
        raise _python_logic(self._name, "bool")

    def __eq__(self, other: Any) -> bool:
        raise _python_logic(self._name, "==", other)

    def __ne__(self, other: Any) -> bool:
        raise _python_logic(self._name, "!=", other)

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return f"<{self._name}>"


def state(name: str, init: str = "zeros", dtype: str = "fp32", layout: str = "full",
          nonnegative: bool = False, quant_block: int | None = None) -> _Handle:
    """Declare a state. ``init``: "zeros", "p" or "g"; ``dtype``: "fp32", "bf16", "q8" (8-bit
    blockwise) or "q4" (4-bit blockwise), see fusedopt.quant (``Rule.program(state_dtype=...)``
    switches every full-size fp32 state of a rule at once); ``nonnegative``: a promise that the
    state is never negative (a second moment), so a quantized storage uses the unsigned map. It is
    not checked: under q8 a negative value is stored as 0, under q4 (whose unsigned map has no zero)
    as 1/16 of its block's scale, a positive value; fp32 and bf16 store it as it is. ``layout``: "full"
    (the shape of p), "rows" (one value per row: shape[:-1] + (1,)) or "cols" (one per column:
    shape[:-2] + (1, shape[-1])), as torch.optim.Adafactor keeps its factors, or "blocks" (one value
    per block of the optimizer's partition, shape (n_blocks, 1)) or "tensor" (one value per tensor,
    shape ()). Row and column layouts need a rule
    option ``matrix`` (True for tensors of two or more dimensions) to branch on.

    ``dtype="q4minmax"`` (rules with a :func:`window` only) keeps the state as 4-bit codes, two per
    byte, with a bf16 minimum and maximum per ``quant_block`` elements (default 2048, even), as
    MicroAdam keeps its error feedback (see fusedopt.sparse); ``"q8minmax"``: the same with 8-bit
    codes (255 steps between min and max), one per byte."""
    b = _Builder.current("state()")
    _declare(b, name, "state")
    if init not in ir.STATE_INITS:
        raise _fail(b.rule, f"state '{name}' has init={init!r}", f"use one of {list(ir.STATE_INITS)}")
    if dtype not in (*ir.STORAGE_DTYPES, *ir.MINMAX_BITS):
        raise _fail(b.rule, f"state '{name}' has dtype={dtype!r}",
                    f"use one of {[*ir.STORAGE_DTYPES, *ir.MINMAX_BITS]}")
    if dtype in ir.MINMAX_BITS:
        quant_block = ir.DEFAULT_MINMAX_BLOCK if quant_block is None else quant_block
        if isinstance(quant_block, bool) or not isinstance(quant_block, int) or quant_block < 2 or quant_block % 2:
            raise _fail(b.rule, f"state '{name}' has quant_block={quant_block!r}",
                        "use an even int >= 2 (two 4-bit codes share a byte), e.g. 2048")
    elif quant_block is not None:
        raise _fail(b.rule, f"state '{name}' has quant_block={quant_block!r} but dtype={dtype!r}",
                    f"quant_block applies to the min/max dtypes {list(ir.MINMAX_BITS)} only (q8 and q4 blocks are fixed)")
    if layout == "window":
        raise _fail(b.rule, f"state '{name}' has layout='window'", "declare windows with window(name, m, density, block)")
    if layout not in ir.STATE_LAYOUTS:
        raise _fail(b.rule, f"state '{name}' has layout={layout!r}", f"use one of {list(ir.STATE_LAYOUTS)}")
    if layout != "full" and init != "zeros":
        raise _fail(b.rule, f"state '{name}' with layout {layout!r} has init={init!r}", "use init='zeros'")
    if layout != "full" and dtype in ir.QUANTIZED:
        raise _fail(b.rule, f"state '{name}' with layout {layout!r} has dtype={dtype!r}",
                    "quantize full-size states only (factored and per-block states are already small)")
    if not isinstance(nonnegative, bool):
        raise _fail(b.rule, f"state '{name}' has nonnegative={nonnegative!r}", "pass True or False")
    if dtype in ir.MINMAX_BITS and init != "zeros":
        raise _fail(b.rule, f"state '{name}' with dtype={dtype!r} has init={init!r}", "use init='zeros'")
    b.states[name] = ir.StateSpec(name, init, dtype, layout, nonnegative, block=quant_block or 0)
    return _Handle(b, name)


def _declare(b: _Builder, name: str, what: str) -> None:
    if not isinstance(name, str) or not name.isidentifier():
        raise _fail(b.rule, f"{what} name {name!r} is not a Python identifier", "use a name like 'exp_avg'")
    if name.startswith("_") or name in ir.RESERVED or name in FRONT_END_NAMES or name in b.known:
        raise _fail(b.rule, f"{what} '{name}' shadows a reserved name or hyperparameter", f"give the {what} another name")
    if name.endswith(ir.ABSMAX_SUFFIX):
        raise _fail(b.rule, f"{what} '{name}' ends in '{ir.ABSMAX_SUFFIX}', the suffix under which a quantized "
                    "state keeps its scales", f"give the {what} another name")
    if name in b.states:
        raise _fail(b.rule, f"{what} '{name}' is declared twice", f"call {what}('{name}') once and reuse the handle")


class _Window:
    """A window (see :func:`window`): ``push`` once, then read ``kept`` and ``sum``."""

    def __init__(self, builder: _Builder, name: str):
        self._builder = builder
        self._name = name

    def _sympy_(self):
        raise _fail(self._builder.rule, f"the window '{self._name}' is read as a number",
                    f"read it through {self._name}.sum(beta, power) or {self._name}.kept")

    def _pushed(self, what: str) -> sympy.Symbol:
        b = self._builder
        if self._name not in b.updates:
            raise _fail(b.rule, f"'{self._name}.{what}' is read before '{self._name}.push(...)'",
                        "push this step's values first: the window's reads see the row just pushed")
        return ir.symbol(self._name)

    def push(self, value: Any, score: Any = None) -> None:
        """Write this step's row: per top-k block of the tensor, the ``k`` elements whose ``score``
        (default: ``value``) has the largest magnitude (ties to the lower index) keep their ``value``."""
        b = self._builder
        if self._name in b.updates:
            raise _fail(b.rule, f"window '{self._name}' is pushed twice", "push once per step")
        exprs = {}
        for what, x in (("value", value), ("score", value if score is None else score)):
            expr = _checked(b, x, f"the {what} of {self._name}.push()")
            if expr.atoms(*ir.WINDOW_NODES) or expr.atoms(ir.Reduction):
                raise _fail(b.rule, f"the {what} pushed into '{self._name}' reads a window or a reduction ({expr})",
                            "push an elementwise expression of p, g, states and hyperparameters")
            exprs[what] = ir.fold_constants(expr)
        b.updates[self._name] = exprs["value"]
        b.selections[self._name] = exprs["score"]

    @property
    def kept(self):
        """The condition "this step's push kept this element", for where(...)."""
        return sympy.Eq(ir.Kept(self._pushed("kept")), 1, evaluate=False)

    def sum(self, beta: Any = 1, power: int = 1):
        """``sum over rows of beta**age * value**power`` at each element, age 0 for the row just pushed
        (an element a row did not keep adds 0). ``beta`` is a per-tensor scalar (hyperparameters and
        t), ``power`` an int from 1 to 4."""
        b = self._builder
        window = self._pushed("sum")
        beta = _expr(beta)
        if not ir.free_names(beta) <= b.known - {ir.PARAM, ir.GRAD}:
            raise _fail(b.rule, f"{self._name}.sum() got beta={beta}, which varies per element",
                        "use a hyperparameter (or an expression of hyperparameters and t) as beta")
        if isinstance(power, bool) or not isinstance(power, int) or not 1 <= power <= 4:
            raise _fail(b.rule, f"{self._name}.sum() got power={power!r}", "use an int from 1 to 4")
        return ir.WindowSum(window, ir.fold_constants(beta), sympy.Integer(power))

    def __repr__(self) -> str:
        return f"<window {self._name}>"


def window(name: str = "window", m: int = 10, density: float = 0.01, block: int = 4096,
           dtype: str = "bf16") -> _Window:
    """Declare a window: a ring buffer of the last ``m`` block top-k selections (MicroAdam's sliding
    window of sparse gradients). Each step, ``w.push(value, score)`` writes one row: the tensor is cut
    into blocks of ``block`` elements (a partial last block keeps its own count) and each block keeps
    ``max(1, ceil(density * block))`` entries, those with the largest ``|score|``, as (int16
    block-local index, ``dtype`` value) pairs; row ``(t - 1) mod m`` is overwritten. ``w.sum(beta,
    power)`` reads the window back at every element and ``w.kept`` says which elements this step kept.
    The eager semantics are fusedopt.sparse's; a rule has at most one window. ``m``, ``density`` and
    ``block`` fix the state's shape: an optimizer may override them per param group."""
    b = _Builder.current("window()")
    _declare(b, name, "window")
    check = _window_problem(m, density, block, dtype)
    if check:
        raise _fail(b.rule, f"window '{name}' has {check[0]}", check[1])
    if any(s.layout == "window" for s in b.states.values()):
        raise _fail(b.rule, f"window '{name}' is its second window", "use one window per rule")
    b.states[name] = ir.StateSpec(name, "zeros", dtype, "window", block=block, m=m, density=float(density))
    return _Window(b, name)


def _window_problem(m, density, block, dtype) -> tuple[str, str] | None:
    """(problem, fix) for window settings that cannot work, else None."""
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        return f"m={m!r}", "use an int >= 1 (rows of the ring buffer); MicroAdam uses m=10"
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        return f"density={density!r}", "use a number in (0, 1]; 0.01 keeps 1 % of each block"
    if isinstance(block, bool) or not isinstance(block, int) or not 1 <= block <= 32767:
        return f"block={block!r}", "use an int from 1 to 32767 (block-local indices are int16); 4096 is the default"
    if dtype not in ir.WINDOW_VALUE_DTYPES:
        return f"dtype={dtype!r}", f"use one of {list(ir.WINDOW_VALUE_DTYPES)} for the stored values"
    return None


# ---- elementwise functions ---------------------------------------------------------------------

def _misuse(problem: str, fix: str) -> RuleError:
    """An error naming the rule being defined, if any."""
    if _Builder.active:
        return _fail(_Builder.active[-1].rule, problem, fix)
    return RuleError(f"{problem}. Fix: {fix}.")


def _is_condition(x: Any) -> bool:
    """A comparison or a logical combination of them (sympy's Symbol is a Boolean too: not one)."""
    return isinstance(x, sympy.logic.boolalg.Boolean) and not isinstance(x, sympy.Symbol)


def _expr(x: Any) -> sympy.Expr:
    return sympy.sympify(x, strict=True)


def sqrt(x):
    return sympy.sqrt(_expr(x))


def rsqrt(x):
    return 1 / sympy.sqrt(_expr(x))


def exp(x):
    return sympy.exp(_expr(x))


def log(x):
    return sympy.log(_expr(x))


def sign(x):
    """-1, 0 or 1 (sign(0) = 0, as torch.sign)."""
    return sympy.sign(_expr(x))


def absolute(x):
    return sympy.Abs(_expr(x))


def minimum(a, b):
    return sympy.Min(_expr(a), _expr(b))


def maximum(a, b):
    return sympy.Max(_expr(a), _expr(b))


def clamp(x, lo, hi):
    return sympy.Min(sympy.Max(_expr(x), _expr(lo)), _expr(hi))


def lerp(a, b, w):
    """a + w * (b - a), as torch.lerp."""
    a = _expr(a)
    return a + _expr(w) * (_expr(b) - a)


# ---- reductions ---------------------------------------------------------------------------------

def _reduce(op: str, x, over: str):
    if over not in ir.REDUCE_OVER:
        raise _misuse(f"over={over!r} is not a reduction domain", f"use one of {list(ir.REDUCE_OVER)}")
    return ir.reduction(op, over)(_expr(x))


# Every reduction sees its argument at each element of the tensor: a per-row value r counts once per
# element of its row, so total(r, over="rows") is shape[-1] * r and mean(r, over="rows") is r.

def total(x, over: str = "tensor"):
    """Sum of x over the tensor ("tensor"), every tensor of the group ("group"), each row ("rows":
    the last dim), each column ("cols": the second-to-last dim) or each block of the partition
    ("blocks"); a reduced dim is kept as size 1, so the result broadcasts against p."""
    return _reduce("sum", x, over)


def amax(x, over: str = "tensor"):
    """Largest value of x over the same domains as :func:`total`."""
    return _reduce("max", x, over)


def mean(x, over: str = "tensor"):
    """Mean of x over the tensor, or over each row ("rows": the last dim), column ("cols": the
    second-to-last dim) or block ("blocks"), keeping the reduced dim as size 1 so that the result
    broadcasts."""
    if over == "group":
        raise _misuse("mean over 'group' is not supported", "use mean(x, over='tensor') or total(x, over='group')")
    if over in ir.SMALL_OVER:
        return _reduce("mean", x, over)
    return total(x, over) / ir.symbol(ir.NUMEL)


def norm(x, over: str = "tensor"):
    """L2 norm of x over the tensor or over every tensor of the group (a global norm)."""
    x = _expr(x)
    return sympy.sqrt(total(x * x, over))


def rms(x, over: str = "tensor"):
    """Root mean square of x over the tensor."""
    x = _expr(x)
    return sympy.sqrt(mean(x * x, over))


def eq(a, b):
    """The comparison a == b (Python's == on symbols compares structure, not values)."""
    return sympy.Eq(_expr(a), _expr(b), evaluate=False)


def where(cond, a, b):
    """a where cond holds, else b. Build cond with <, <=, >, >= or eq()."""
    if isinstance(cond, bool):
        raise _misuse(f"where() got the Python bool {cond}: a comparison such as `t == 1` compares "
                      "symbols structurally", "write eq(t, 1)")
    if not _is_condition(cond):
        raise _misuse(f"where() needs a comparison as its condition, got {cond!r}", "e.g. where(g > 0, a, b)")
    if isinstance(cond, (sympy.And, sympy.Or, sympy.Not)):
        raise _misuse(f"where() got the combined condition {cond} (`&`, `|` or `~`), which the backends do not run",
                      "nest where() instead: where(x > 0, where(y > 0, a, b), b) for (x > 0) & (y > 0)")
    return _select(cond, _expr(a), _expr(b), [MAX_CASE_SPLITS])


MAX_CASE_SPLITS = 16  # where() values compared inside one where()'s condition, nested included


def _select(cond, a, b, budget: list[int]):
    """Piecewise((a, cond), (b, True)) with no where() inside a condition: a comparison of a value
    that is itself a where() (sympy would make it an ITE, which no backend runs) is split by cases,
    where(c, u, v) > 0  ->  where(c, u > 0, v > 0), as nested selections. Each split copies a and
    b, so chains of such comparisons grow exponentially: past MAX_CASE_SPLITS, a RuleError."""
    inner = next((x for x in sympy.preorder_traversal(cond) if isinstance(x, sympy.Piecewise)), None)
    if inner is None:
        return sympy.Piecewise((a, cond), (b, True))
    budget[0] -= 1
    if budget[0] < 0:
        raise _misuse(f"where() compares values that are themselves where() results, nested too deeply to split "
                      f"by cases (more than {MAX_CASE_SPLITS} splits)",
                      "keep the compared value in a state (s.set(where(...)) and compare s in the next "
                      "step's rule), or compare the inputs of the inner where() directly")
    (u, c), (v, _) = inner.args
    return _select(c, _select(cond.xreplace({inner: u}), a, b, budget),
                   _select(cond.xreplace({inner: v}), a, b, budget), budget)


CLIP_HPARAM = "max_grad_norm"
# Clipping where one launch does not see the whole norm (a group whose tensors run as several
# programs: a rule's matrix and vector variants, quantized and float32 states; a norm over several
# groups; a rule with its own group reduction): the front end computes the factor
# min(1, max_norm / (||g|| + 1e-6)) on the device and every program reads it as this hyperparameter.
CLIP_SCALE = "clip_scale"
CLIP_MODES = ("norm", "scale")
# Skipping the step of a group with a NaN or infinite gradient: "group" finds it with a fused reduction
# over the group; "flag" reads a flag the caller computed (for groups that run as several programs).
SKIP_FLAG = "nonfinite_flag"
SKIP_MODES = ("group", "flag")
# Names the front end gives meaning to, beside a rule's own: hyperparameters it adds to programs,
# keys of every param group and FusedOptimizer's own arguments. A rule's hyperparameter, option or
# state of one of these names would be overwritten or shadowed, so it is refused; options also may
# not take the names of Rule.program's arguments.
FRONT_END_NAMES = frozenset({CLIP_HPARAM, CLIP_SCALE, SKIP_FLAG, ir.SR_SEED, ir.MASTER, "state_dtype",
                             "quant_threshold", "stochastic_rounding", "master_weights", "nonfinite", "backend"})
PROGRAM_ARGUMENTS = frozenset({"clip", "state_dtype", "stochastic_rounding", "master_weights", "skip_nonfinite"})


# ---- the decorator ------------------------------------------------------------------------------

class Rule:
    """A rule defined with :func:`rule`; ``program(**options)`` builds its IR."""

    def __init__(self, name: str, fn: Callable[..., None]):
        self.name = name
        self.fn = fn
        self.__doc__ = fn.__doc__
        self.hparams: dict[str, float] = {}
        self.options: dict[str, bool] = {}
        params = list(inspect.signature(fn).parameters.values())
        head = [p.name for p in params[:3]]
        if head != [ir.PARAM, ir.GRAD, ir.STEP]:
            raise _fail(name, f"the first arguments are {head}", "start the signature with (p, g, t, ...)")
        for prm in params[3:]:
            self._add_argument(prm)
        self.program()  # build once now so that mistakes surface at definition time
        if ir.MATRIX_OPTION in self.options:  # and the per-tensor variant the front end will ask for
            self.program(**{ir.MATRIX_OPTION: not self.options[ir.MATRIX_OPTION]})

    def _add_argument(self, prm: inspect.Parameter) -> None:
        if prm.name in ir.RESERVED or prm.name.startswith("_"):
            raise _fail(self.name, f"hyperparameter '{prm.name}' shadows a reserved name",
                        f"rename it; {sorted(ir.RESERVED)} and names starting with '_' are reserved")
        is_option = isinstance(prm.default, bool)
        if prm.name in FRONT_END_NAMES or (is_option and prm.name in PROGRAM_ARGUMENTS):
            raise _fail(self.name, f"argument '{prm.name}' has a name every optimizer gives its own meaning "
                        "(a param group key, or for an option an argument of Rule.program)",
                        f"rename it; reserved: {sorted(FRONT_END_NAMES | PROGRAM_ARGUMENTS)}")
        default = prm.default
        if default is inspect.Parameter.empty:
            raise _fail(self.name, f"hyperparameter '{prm.name}' has no default",
                        f"give it a default, e.g. {prm.name}=0.0")
        if isinstance(default, bool):
            self.options[prm.name] = default
        elif isinstance(default, (int, float)):
            self.hparams[prm.name] = float(default)
        else:
            raise _fail(self.name, f"hyperparameter '{prm.name}' has the non-numeric default {default!r}",
                        "use a number (a hyperparameter) or a bool (a static option)")

    def program(self, clip: bool | str | None = False, state_dtype: str | None = None,
                stochastic_rounding: bool = False, master_weights: bool = False, skip_nonfinite: str | None = None,
                **options: bool) -> ir.Program:
        """The rule's IR for these static options. ``clip=True`` (or "norm") adds global-norm gradient
        clipping: the rule sees ``g * min(1, max_grad_norm / (||g||_group + 1e-6))``, as after
        ``torch.nn.utils.clip_grad_norm_`` over the group, and gains the hyperparameter
        ``max_grad_norm``; ``clip="scale"`` reads that factor, computed by the caller, as the
        hyperparameter ``clip_scale`` instead. ``state_dtype`` ("fp32", "bf16", "q8" or "q4") stores
        every full-size state that the rule declares as fp32 in that dtype instead. ``stochastic_rounding=True`` writes
        bf16 and fp16 parameters rounded stochastically (see fusedopt.rounding) and adds the hyperparameter
        ``sr_seed``. ``master_weights=True`` keeps a float32 copy of each parameter as the state
        ``master_param``: the rule reads and updates it in place of ``p``, and ``p`` receives its new
        value rounded to the parameter's dtype (for bf16/fp16 training). ``skip_nonfinite`` ("group" or
        "flag") leaves parameters, states and step counters as they were when a gradient of the group
        holds a NaN or an infinity: "group" detects it with a reduction over the group, "flag" reads
        the hyperparameter ``nonfinite_flag`` (nonzero: skip) that the caller computed. A rule with a
        window has no reduction over the group in its kernel: it takes ``clip="scale"`` and
        ``skip_nonfinite="flag"``, and its storage dtypes from the rule (or configure_states)."""
        if state_dtype is not None and state_dtype not in ir.STORAGE_DTYPES:
            raise _fail(self.name, f"state_dtype={state_dtype!r} is not a storage dtype",
                        f"use one of {list(ir.STORAGE_DTYPES)}")
        for k, v in options.items():
            if k not in self.options:
                hint = {"nonfinite": "skip_nonfinite='group'", "max_grad_norm": "clip=True",
                        "master_param": "master_weights=True"}.get(k, "")
                raise _fail(self.name, f"unknown option '{k}'",
                            f"the rule's options are {sorted(self.options)}; the program also takes "
                            f"{sorted(PROGRAM_ARGUMENTS)}" + (f" (here: {hint})" if hint else ""))
            if not isinstance(v, bool):
                raise _fail(self.name, f"option '{k}' must be a bool, got {v!r}", f"pass {k}=True or False")
        if clip is True:
            clip = "norm"
        if clip not in (None, False, *CLIP_MODES):
            raise _fail(self.name, f"clip={clip!r}", f"pass False, True or one of {list(CLIP_MODES)}")
        full = {**self.options, **options}
        if _build(self, tuple(sorted(full.items()))).window is not None:
            _check_window_options(self.name, clip, state_dtype, skip_nonfinite)
        program = _build(self, tuple(sorted(full.items())), clip or "")
        if state_dtype not in (None, "fp32"):
            program = _with_state_dtype(program, state_dtype)
        if stochastic_rounding:
            program = _with_stochastic_rounding(program)
        if master_weights:
            program = _with_master_weights(program)
        if skip_nonfinite:
            if skip_nonfinite not in SKIP_MODES:
                raise _fail(self.name, f"skip_nonfinite={skip_nonfinite!r}", f"pass None or one of {list(SKIP_MODES)}")
            program = _with_skip_nonfinite(program, skip_nonfinite)
        return program

    def __repr__(self) -> str:
        return f"Rule({self.name!r}, hparams={self.hparams}, options={self.options})"

    # A rule is its function: copies share it, and pickles name it (as functions pickle).
    def __copy__(self) -> "Rule":
        return self

    def __deepcopy__(self, memo: dict) -> "Rule":
        return self

    def __reduce__(self):
        module, qualname = self.fn.__module__, self.fn.__qualname__
        try:
            found = _rule_at(module, qualname)
        except (ImportError, AttributeError):
            found = None
        if found is not self:
            raise pickle.PicklingError(
                f"rule '{self.name}' cannot be pickled: {module}.{qualname} does not name it (a rule defined "
                "inside a function, or stored under another name). Fix: define the rule at module level "
                "with @rule, or save opt.state_dict() instead of the optimizer object")
        return _rule_at, (module, qualname)


def _rule_at(module: str, qualname: str) -> Any:
    """The object ``module.qualname`` names: how a pickled rule is found again (an AttributeError
    where it is gone, as for a pickled function)."""
    obj: Any = sys.modules.get(module) or importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _check_window_options(name: str, clip, state_dtype: str | None, skip_nonfinite: str | None) -> None:
    """A rule with a window runs one program per top-k block with no reduction over the group, so it
    takes clipping and the non-finite check as factors computed before the step ("scale", "flag"),
    and storage dtypes from the rule itself."""
    if clip == "norm":
        raise _fail(name, "clip=True (a group norm inside the step) was asked for a rule with a window, "
                    "whose kernel has no reduction over the group",
                    "pass clip='scale' and the factor as the hyperparameter clip_scale (what "
                    "WindowOptimizer(max_grad_norm=...) does)")
    if skip_nonfinite == "group":
        raise _fail(name, "skip_nonfinite='group' (a check inside the step) was asked for a rule with a window",
                    "pass skip_nonfinite='flag' and the flag as the hyperparameter nonfinite_flag (what "
                    "WindowOptimizer(nonfinite='skip') does)")
    if state_dtype not in (None, "fp32"):
        raise _fail(name, f"state_dtype={state_dtype!r} was asked for a rule with a window",
                    "set the storage dtype of a state in the rule, or with configure_states (fp32, bf16, "
                    f"{' or '.join(ir.MINMAX_BITS)} beside a window)")


_SETTINGS = {"window": ("m", "density", "block", "dtype"), ir.MINMAX: ("dtype", "quant_block"),
             "full": ("dtype",)}


def configure_states(program: ir.Program, settings: dict[str, dict[str, Any]]) -> ir.Program:
    """The program with some states' shape settings changed, e.g. ``{"window": {"m": 20}, "error":
    {"dtype": "fp32"}}``: a window's ``m``, ``density``, ``block`` and value ``dtype``; a full-size state's
    storage ``dtype`` (in a rule with a window: fp32, bf16 or q4minmax) and a q4minmax state's
    ``quant_block``. The update expressions do not depend on these, so any rule takes them; an
    optimizer uses this to offer them as constructor arguments."""
    frozen = tuple(sorted((name, tuple(sorted(values.items()))) for name, values in settings.items()))
    return _configured(program, frozen)


@functools.lru_cache(maxsize=None)
def _configured(program: ir.Program, settings: tuple) -> ir.Program:
    specs = {s.name: s for s in program.states}
    windowed = program.window is not None
    for name, values in settings:
        spec = specs.get(name)
        if spec is None:
            raise _fail(program.name, f"it has no state '{name}' to configure", f"states are {list(specs)}")
        kind = "window" if spec.layout == "window" else ir.MINMAX if spec.dtype in ir.MINMAX_BITS else spec.layout
        values = dict(values)
        allowed = _SETTINGS.get(kind, ())
        bad = sorted(set(values) - set(allowed))
        if bad:
            raise _fail(program.name, f"state '{name}' ({kind}) has no setting(s) {bad}", f"settable: {list(allowed)}")
        if kind == "window":
            merged = {**dict(m=spec.m, density=spec.density, block=spec.block, dtype=spec.dtype), **values}
            problem = _window_problem(**merged)
            if problem:
                raise _fail(program.name, f"window '{name}' gets {problem[0]}", problem[1])
            spec = dataclasses.replace(spec, m=merged["m"], density=float(merged["density"]), block=merged["block"],
                                       dtype=merged["dtype"])
        else:
            dtype = values.get("dtype", spec.dtype)
            dtypes = ("fp32", "bf16", *ir.MINMAX_BITS) if windowed else ("fp32", "bf16", *ir.QUANTIZED)
            if dtype not in dtypes:
                raise _fail(program.name, f"state '{name}' gets dtype={dtype!r}", f"use one of {list(dtypes)}")
            block = values.get("quant_block", spec.block or ir.DEFAULT_MINMAX_BLOCK)
            if dtype in ir.MINMAX_BITS and (isinstance(block, bool) or not isinstance(block, int) or block < 2 or block % 2):
                raise _fail(program.name, f"state '{name}' gets quant_block={block!r}", "use an even int >= 2, e.g. 2048")
            spec = dataclasses.replace(spec, dtype=dtype, block=block if dtype in ir.MINMAX_BITS else 0,
                                       init="zeros" if dtype in ir.MINMAX_BITS else spec.init)
        specs[name] = spec
    return dataclasses.replace(program, states=tuple(specs[s.name] for s in program.states))


@functools.lru_cache(maxsize=None)
def _with_state_dtype(program: ir.Program, dtype: str) -> ir.Program:
    states = tuple(dataclasses.replace(s, dtype=dtype) if s.layout == "full" and s.dtype == "fp32" else s
                   for s in program.states)
    return dataclasses.replace(program, states=states)


@functools.lru_cache(maxsize=None)
def _with_master_weights(program: ir.Program) -> ir.Program:
    if ir.MASTER in program.state_names:
        raise _fail(program.name, f"it has its own state '{ir.MASTER}'", "rename it to use master weights")
    p, master = ir.symbol(ir.PARAM), ir.symbol(ir.MASTER)
    updates = [(target, expr.subs(p, master)) for target, expr in program.updates]
    new_value = dict(updates).get(ir.PARAM, master)
    updates = [(ir.MASTER if target == ir.PARAM else target, expr) for target, expr in updates]
    updates.append((ir.PARAM, new_value))
    selections = tuple((name, expr.subs(p, master)) for name, expr in program.selections)  # a window's score
    states = (ir.StateSpec(ir.MASTER, init="p", dtype="fp32"),) + program.states
    return dataclasses.replace(program, states=states, updates=tuple(updates), selections=selections)


@functools.lru_cache(maxsize=None)
def _with_skip_nonfinite(program: ir.Program, mode: str) -> ir.Program:
    hparams, defaults = program.hparams, program.defaults
    if mode == "group":
        flag = ir.MaxGroup(ir.NonFinite(ir.symbol(ir.GRAD)))
    else:
        if SKIP_FLAG in hparams:
            raise _fail(program.name, f"it has its own '{SKIP_FLAG}'", "rename it to skip non-finite steps")
        hparams, defaults, flag = hparams + (SKIP_FLAG,), defaults + (0.0,), ir.symbol(SKIP_FLAG)
    if program.window is not None:  # its kernel and interpreter skip the whole step, window row included
        return dataclasses.replace(program, hparams=hparams, defaults=defaults, skip_when=flag)
    keep = sympy.Eq(flag, 0, evaluate=False)
    updates = tuple((target, sympy.Piecewise((expr, keep), (ir.symbol(target), True))) for target, expr in program.updates)
    return dataclasses.replace(program, hparams=hparams, defaults=defaults, updates=updates, skip_when=flag)


@functools.lru_cache(maxsize=None)
def _with_stochastic_rounding(program: ir.Program) -> ir.Program:
    if ir.SR_SEED in program.hparams:
        raise _fail(program.name, f"it has its own '{ir.SR_SEED}'", "rename it to use stochastic rounding")
    return dataclasses.replace(program, hparams=program.hparams + (ir.SR_SEED,), defaults=program.defaults + (0.0,),
                               stochastic_rounding=True)


@functools.lru_cache(maxsize=None)
def _build(rule: Rule, options: tuple[tuple[str, bool], ...], clip: str = "") -> ir.Program:
    hparams = dict(rule.hparams)
    grad: sympy.Expr = _Traced(ir.GRAD)
    if clip:
        name = CLIP_HPARAM if clip == "norm" else CLIP_SCALE
        if name in hparams:
            raise _fail(rule.name, f"it has its own '{name}'", "rename it, or do not ask for clipping")
        hparams[name] = 1.0
        if clip == "norm":
            clip_norm = ir.symbol(CLIP_HPARAM)
            grad = grad * sympy.Min(1, clip_norm / (sympy.sqrt(ir.SumGroup(grad * grad)) + sympy.Float(1e-6)))
        else:
            grad = grad * ir.symbol(CLIP_SCALE)
    known = set(hparams) | {ir.PARAM, ir.GRAD, ir.STEP, ir.NUMEL}
    b = _Builder(rule.name, known)
    kwargs: dict[str, Any] = {h: _Traced(h) for h in rule.hparams}
    kwargs.update(dict(options))
    _Builder.active.append(b)
    try:
        returned = rule.fn(_Handle(b, ir.PARAM), grad, _Traced(ir.STEP), **kwargs)
    except RuleError:
        raise
    except Exception as exc:
        fix = "use only p, g, t, hyperparameters, states and the fusedopt.dsl functions"
        if isinstance(exc, TypeError) and ("convert expression to float" in str(exc) or "real number" in str(exc)):
            fix = ("a symbol went through a function that needs a Python number (math.sqrt, math.exp, float(), "
                   "...): use fusedopt.dsl's sqrt, exp, log, minimum, maximum instead")
        raise _fail(rule.name, f"its function raised {type(exc).__name__}: {exc}", fix) from exc
    finally:
        _Builder.active.pop()
    if returned is not None:
        raise _fail(rule.name, f"its function returned {returned!r}, which would be ignored",
                    "write results with p.set(...) and state.set(...), and return nothing")
    if ir.PARAM not in b.updates:
        raise _fail(rule.name, "it never sets p", "end the rule with p.set(new_value)")
    b.updates = {name: _untraced(expr) for name, expr in b.updates.items()}
    b.selections = {name: _untraced(expr) for name, expr in b.selections.items()}
    factored = [s.name for s in b.states.values() if s.layout in ("rows", "cols")]
    if factored and dict(options).get(ir.MATRIX_OPTION) is not True:
        raise _fail(rule.name, f"states {factored} have row/column layouts but the rule is being built for "
                    "tensors that may have fewer than two dimensions",
                    f"add the option {ir.MATRIX_OPTION}=False and declare them under `if {ir.MATRIX_OPTION}:`")
    unset = [s for s in b.states if s not in b.updates]
    if unset:
        raise _fail(rule.name, f"state(s) {unset} are declared but never set (a window: never pushed)",
                    "set (push) them or remove them")
    _check_window_rule(rule.name, b)
    order = [ir.PARAM] + list(b.states)
    updates = tuple((name, ir.fold_constants(b.updates[name])) for name in order)
    for name, expr in updates:
        for r in expr.atoms(ir.Reduction):
            if r.over == "group" and r.args[0].atoms(ir.Reduction):
                if clip == "norm":
                    raise _fail(rule.name, "clip=True (the group norm inside the step) meets the rule's own group "
                                "reduction, which would reduce over a reduction",
                                "pass clip='scale' and the factor as the hyperparameter clip_scale (what "
                                "FusedOptimizer(max_grad_norm=...) does for this rule)")
                raise _fail(rule.name, f"'{name}' reduces over the group a value that holds another reduction ({r})",
                            "a group reduction takes elementwise values of g, p and states; reduce per tensor "
                            "instead (over='tensor'), or clip with max_grad_norm rather than in the rule")
    for name, expr in updates:
        bad = ir.unsupported_node(expr)
        if bad is not None:
            raise _fail(rule.name, f"'{name}' contains {type(bad).__name__} (`{bad}`), which sympy introduced "
                        "or the backends cannot run",
                        "use only the fusedopt.dsl functions; sympy treats symbols as complex, so for example "
                        "abs(exp(g) * g) becomes exp(re(g)): write exp(g) * abs(g)")
    return ir.Program(
        name=rule.name,
        hparams=tuple(hparams),
        defaults=tuple(hparams.values()),
        options=options,
        states=tuple(b.states.values()),
        updates=updates,
        selections=tuple(b.selections.items()),
    )


def _check_window_rule(name: str, b: _Builder) -> None:
    """A rule with a window runs on its own template (codegen.window_template): one program per top-k
    block, so it takes only elementwise math and full-size states besides the window."""
    minmax = [s.name for s in b.states.values() if s.dtype in ir.MINMAX_BITS]
    if not b.selections:
        if minmax:
            raise _fail(name, f"state(s) {minmax} use a min/max dtype {list(ir.MINMAX_BITS)}, which only rules with a window keep",
                        "use dtype 'q8' or 'q4', or add a window")
        return
    other = [f"{s.name} ({s.layout}, {s.dtype})" for s in b.states.values()
             if s.layout != "window" and (s.layout != "full" or s.dtype not in ("fp32", "bf16", *ir.MINMAX_BITS))]
    if other:
        raise _fail(name, f"state(s) {other} sit beside a window",
                    f"in a rule with a window, other states are full-size fp32, bf16, {' or '.join(ir.MINMAX_BITS)}")
    reductions = [str(r) for e in b.updates.values() for r in e.atoms(ir.Reduction)]
    if reductions:
        raise _fail(name, f"it reduces ({reductions[0]}) beside a window", "a rule with a window is elementwise "
                    "apart from its top-k and window sums")


def rule(name: str) -> Callable[[Callable[..., None]], Rule]:
    """Decorator turning an update function into a :class:`Rule`."""
    if not isinstance(name, str) or not name:
        raise RuleError(f"@rule needs a non-empty name, got {name!r}. Fix: @rule('my_rule')")

    def wrap(fn: Callable[..., None]) -> Rule:
        return Rule(name, fn)

    return wrap
