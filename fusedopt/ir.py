"""The intermediate representation of an optimizer rule.

A :class:`Program` is what the DSL produces and what every backend consumes. It is frozen and
hashable, and :meth:`Program.text` prints it deterministically: two rules that build equal programs
print the same text, and :meth:`Program.key` (a sha256 of that text) is what kernel caches use.

Updates are *functional*: each right-hand side is a sympy expression over the values the tensors
had **before** the step (``p``, ``g``, the step ``t``, the hyperparameters and the old states). A
rule that writes ``m`` and then reads it again sees the new expression inlined by the DSL, so the
order of statements is already resolved here and backends may load everything, compute, then store.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Mapping

import sympy

PARAM = "p"
GRAD = "g"
STEP = "t"
NUMEL = "numel"  # the element count of the tensor being updated, a per-tensor scalar
RESERVED = frozenset({PARAM, GRAD, STEP, NUMEL, "param", "grad", "step", "params", "lr_scheduler"})

REDUCE_OPS = ("sum", "max", "mean")
# tensor: one value per tensor; group: one per group (all tensors of a launch); rows: over the last
# dim (keeping it as size 1); cols: over the second-to-last dim
REDUCE_OVER = ("tensor", "group", "rows", "cols", "blocks")
SMALL_OVER = ("rows", "cols", "blocks")  # reductions whose result is kept per row, column or block

STORAGE_DTYPES = ("fp32", "bf16", "q8", "q4")
# Blockwise-quantized storages (see fusedopt.quant): a state is kept as codes (q8: one byte per
# element, shaped like the state; q4: two per byte, flat) plus one scale per block of 256 or 128
# elements (its absmax rounded up to bfloat16), stored under "<state>_absmax".
QUANTIZED = ("q8", "q4")
ABSMAX_SUFFIX = "_absmax"
# Min/max storage (MicroAdam's error feedback, see fusedopt.sparse): per quantization block a bf16
# minimum and maximum, under "<state>_min" and "<state>_max", and per element a code of 4 bits (two per
# byte) or 8 bits, under the state's name. Only rules with a window keep such states.
MINMAX = "q4minmax"
MINMAX_BITS = {"q4minmax": 4, "q8minmax": 8}
MINMAX_SUFFIXES = ("_min", "_max")
DEFAULT_MINMAX_BLOCK = 2048
# A window (layout "window"): a ring buffer of m rows, each holding the block top-k selection of one
# step as k (int16 block-local index, value) pairs, stored as "<window>_index" and "<window>_value".
WINDOW_SUFFIXES = ("_index", "_value")
WINDOW_VALUE_DTYPES = ("fp32", "bf16", "fp16")
SR_SEED = "sr_seed"  # the hyperparameter a program with stochastic rounding gains
MASTER = "master_param"  # the float32 state a program with master weights keeps in place of p
STATE_INITS = ("zeros", "p", "g")
STATE_LAYOUTS = ("full", "rows", "cols", "blocks", "tensor", "window")
# The per-tensor static option a rule may declare: True for tensors with two or more dimensions.
MATRIX_OPTION = "matrix"


@dataclasses.dataclass(frozen=True)
class StateSpec:
    """One optimizer state: full size, like the parameter."""

    name: str
    init: str = "zeros"  # "zeros", or a copy of "p" or "g" taken when the state is created
    dtype: str = "fp32"  # storage dtype; compute is always fp32 (fp64 in the oracle)
    layout: str = "full"  # "full" (like p), "rows" (shape[:-1] + (1,)), "cols" (shape[:-2] + (1, m)),
    # "blocks" (n_blocks, 1): one value per block of a partition that views p as (n_blocks, block_numel),
    # "tensor" (shape ()): one value per tensor
    nonnegative: bool = False  # never negative (a second moment): quantized with the unsigned map
    block: int = 0  # a q4minmax state: its quantization block; a window: its top-k block
    m: int = 0  # a window: its rows
    density: float = 0.0  # a window: the fraction of each top-k block one row keeps

    @property
    def quantized(self) -> bool:
        return self.dtype in QUANTIZED

    @property
    def storage(self) -> tuple[str, ...]:
        """The names of the tensors that keep this state."""
        if self.quantized:
            return (self.name, self.name + ABSMAX_SUFFIX)
        if self.dtype in MINMAX_BITS:
            return (self.name, *(self.name + s for s in MINMAX_SUFFIXES))
        if self.layout == "window":
            return tuple(self.name + s for s in WINDOW_SUFFIXES)
        return (self.name,)

    def describe(self) -> str:
        """One line of Program.text."""
        extra = f" layout={self.layout}" if self.layout != "full" else ""
        extra += " nonnegative" if self.nonnegative else ""
        if self.dtype in MINMAX_BITS:
            extra += f" quant_block={self.block}"
        if self.layout == "window":
            extra += f" m={self.m} density={self.density!r} block={self.block}"
        return f"state {self.name}: init={self.init} dtype={self.dtype}{extra}"


@dataclasses.dataclass(frozen=True)
class Program:
    """A whole rule, built for one choice of its static options."""

    name: str
    hparams: tuple[str, ...]
    defaults: tuple[float, ...]
    options: tuple[tuple[str, bool], ...]
    states: tuple[StateSpec, ...]
    updates: tuple[tuple[str, sympy.Expr], ...]  # target ("p" or a state name) -> new value
    # bf16/fp16 parameters are written with stochastic rounding (hyperparameter SR_SEED seeds the stream)
    stochastic_rounding: bool = False
    # a scalar that is nonzero when the step must leave everything as it was (a non-finite gradient
    # in the group): every update already keeps its old value then (in a rule with a window, whose
    # row must not be written either, the kernel and interpreter skip the whole step instead); the
    # step counter does not advance
    skip_when: sympy.Expr | None = None
    # per window: the score whose largest magnitudes its push keeps (block-wise top-k)
    selections: tuple[tuple[str, sympy.Expr], ...] = ()

    @property
    def window(self) -> StateSpec | None:
        """The rule's window state, if it has one (a rule has at most one)."""
        return next((s for s in self.states if s.layout == "window"), None)

    @property
    def state_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.states)

    @property
    def storage_names(self) -> tuple[str, ...]:
        """The tensors kept per parameter: each state, and after a quantized one its absmax."""
        return tuple(n for s in self.states for n in s.storage)

    @property
    def has_quantized_states(self) -> bool:
        return any(s.quantized for s in self.states)

    @property
    def scalar_names(self) -> frozenset[str]:
        """Names whose value is one number per tensor (hyperparameters, the step, the size)."""
        return frozenset(self.hparams) | {STEP, NUMEL}

    @functools.cached_property
    def has_reductions(self) -> bool:
        return any(expr.atoms(Reduction) for _, expr in self.updates)

    @functools.cached_property
    def needs_reference(self) -> bool:
        """Rules the fused kernels cannot run, so they run on the reference backend: block reductions
        without a block-layout state (a kernel learns a tensor's partition from that state's shape),
        and rules mixing block layouts with row/column ones (two views of one tensor)."""
        layouts = {s.layout for s in self.states}
        overs = {r.over for _, e in self.updates for r in e.atoms(Reduction)}
        blocks = "blocks" in layouts or "blocks" in overs
        factored = bool((layouts | overs) & {"rows", "cols"})
        return blocks and ("blocks" not in layouts or factored)

    @functools.cached_property
    def uses_blocks(self) -> bool:
        """Needs a per-tensor block view (a partition) to run."""
        return any(s.layout == "blocks" for s in self.states) or any(
            r.over == "blocks" for _, e in self.updates for r in e.atoms(Reduction))

    @functools.cached_property
    def has_small_layouts(self) -> bool:
        """Has row, column or block states or reductions (values kept per row, column or block)."""
        return any(s.layout != "full" for s in self.states) or any(
            r.over in SMALL_OVER for _, e in self.updates for r in e.atoms(Reduction))

    @functools.cached_property
    def has_group_reductions(self) -> bool:
        return any(r.over == "group" for _, expr in self.updates for r in expr.atoms(Reduction))

    def update_of(self, target: str) -> sympy.Expr | None:
        return dict(self.updates).get(target)

    def text(self) -> str:
        """Deterministic, human-readable listing; also the input of :meth:`key`."""
        lines = [f"rule {self.name}"]
        for name, default in zip(self.hparams, self.defaults):
            lines.append(f"  hparam {name} = {default!r}")
        for name, value in self.options:
            lines.append(f"  option {name} = {value!r}")
        for s in self.states:
            lines.append("  " + s.describe())
        for target, expr in self.updates:
            lines.append(f"  {target} <- {sympy.srepr(expr)}")
        for window, score in self.selections:
            lines.append(f"  select {window} by |{sympy.srepr(score)}|")
        if self.stochastic_rounding:
            lines.append("  stochastic_rounding")
        if self.skip_when is not None:
            lines.append(f"  skip_when {sympy.srepr(self.skip_when)}")
        return "\n".join(lines) + "\n"

    def pretty(self) -> str:
        """Short listing with infix math, for people."""
        lines = [f"rule {self.name}({', '.join(self.hparams)})"]
        lines += [f"  state {s.name} ({s.dtype}, init {s.init})" for s in self.states]
        lines += [f"  {target} <- {expr}" for target, expr in self.updates]
        lines += [f"  {window} keeps the top-k of |{score}|" for window, score in self.selections]
        return "\n".join(lines)

    def key(self) -> str:
        return hashlib.sha256(self.text().encode()).hexdigest()

    def __str__(self) -> str:
        return self.pretty()


def symbol(name: str) -> sympy.Symbol:
    """The one way names become sympy symbols, so that equal names give equal symbols."""
    return sympy.Symbol(name)


def free_names(expr: sympy.Expr) -> frozenset[str]:
    return frozenset(s.name for s in expr.free_symbols)


def scalar_env_names(program: Program) -> Mapping[str, str]:
    """Kind of every name a program may read: 'element' or 'scalar'."""
    kinds = {PARAM: "element", GRAD: "element", STEP: "scalar"}
    kinds.update({h: "scalar" for h in program.hparams})
    kinds.update({s.name: "element" for s in program.states})
    return kinds


class Reduction(sympy.Function):
    """A reduction of an elementwise expression to one value per tensor or per group.

    Concrete classes (``SumTensor``, ``MaxGroup``, ...) come from :func:`reduction`; their names are
    part of the program text. The value is a scalar for every element that reads it.
    """

    op = ""
    over = ""
    nargs = 1

    @classmethod
    def eval(cls, arg):
        return None  # never evaluated symbolically


_REDUCTIONS: dict[tuple[str, str], type] = {}


def reduction(op: str, over: str) -> type:
    """The sympy function class for ``op`` in REDUCE_OPS over ``over`` in REDUCE_OVER."""
    key = (op, over)
    if key not in _REDUCTIONS:
        name = op.capitalize() + over.capitalize()
        _REDUCTIONS[key] = type(name, (Reduction,), {"op": op, "over": over})
    return _REDUCTIONS[key]


for _op in REDUCE_OPS:
    for _over in REDUCE_OVER:
        globals()[_op.capitalize() + _over.capitalize()] = reduction(_op, _over)


class NonFinite(sympy.Function):
    """1 where x is NaN or infinite, 0 where it is finite."""

    nargs = 1

    @classmethod
    def eval(cls, arg):
        if arg.is_Number:
            return sympy.Integer(0 if arg.is_finite else 1)
        return None


class Kept(sympy.Function):
    """1 where this step's push into the window (the argument, a Symbol) kept the element, else 0."""

    nargs = 1

    @classmethod
    def eval(cls, window):
        return None


class WindowSum(sympy.Function):
    """``sum over the window's rows of beta**age * value**power`` at each element (rows that did not
    keep the element add 0; age 0 is this step's row). Arguments: the window's Symbol, beta (a
    scalar expression) and the power (a positive Integer)."""

    nargs = 3

    @classmethod
    def eval(cls, window, beta, power):
        return None


WINDOW_NODES = (Kept, WindowSum)

# Node kinds every backend can run; anything else in a rule is a definition-time error.
SUPPORTED_NODES = (Reduction, NonFinite, Kept, WindowSum,
    sympy.Symbol, sympy.Number, sympy.Add, sympy.Mul, sympy.Pow, sympy.Abs, sympy.sign, sympy.exp,
    sympy.log, sympy.Min, sympy.Max, sympy.Piecewise, sympy.functions.elementary.piecewise.ExprCondPair,
    sympy.StrictGreaterThan, sympy.GreaterThan, sympy.StrictLessThan, sympy.LessThan, sympy.Equality,
    sympy.Unequality, sympy.logic.boolalg.BooleanTrue, sympy.logic.boolalg.BooleanFalse,
)


def repeated_factor(factor: sympy.Basic) -> bool:
    """A factor of a product that both backends multiply out as repeated factors, after the other
    factors: x**2 to x**4 (c * x**2 is (c * x) * x, as torch's addcmul; x * x alone may overflow)."""
    return factor.is_Pow and factor.exp.is_Integer and 2 <= factor.exp <= 4


def unsupported_node(expr: sympy.Basic) -> sympy.Basic | None:
    """The first node of ``expr`` that no backend supports, or None."""
    if not isinstance(expr, SUPPORTED_NODES):
        return expr
    for arg in expr.args:
        bad = unsupported_node(arg)
        if bad is not None:
            return bad
    return None


def fold_constants(expr: sympy.Basic) -> sympy.Basic:
    """Replace symbol-free numeric subexpressions (exp(-1), sqrt(2), pi) by Floats."""
    if expr.is_Atom and not isinstance(expr, sympy.NumberSymbol):
        return expr
    if isinstance(expr, sympy.Expr) and not expr.free_symbols and not expr.atoms(Reduction):
        value = complex(expr.evalf())
        if value.imag != 0:
            raise ValueError(f"the constant `{expr}` is not real")
        return sympy.Float(value.real)
    if not expr.args:
        return expr
    args = [fold_constants(a) for a in expr.args]
    return expr if args == list(expr.args) else expr.func(*args)


_LAYOUT_RANK = {"scalar": 0, "batch": 1, "rows": 2, "cols": 2, "blocks": 2, "full": 3}


def _join(a: str, b: str) -> str:
    if {a, b} == {"rows", "cols"}:
        return "full"
    if "blocks" in (a, b) and {a, b} & {"rows", "cols", "batch"}:
        raise ValueError(f"a '{a}' value and a '{b}' value cannot be combined")
    return a if _LAYOUT_RANK[a] >= _LAYOUT_RANK[b] else b


def layout_of(expr: sympy.Basic, states: dict[str, str]) -> str:
    """Which values an expression has per tensor: "scalar", "batch" (one per leading index),
    "rows", "cols" or "full" (one per element). ``states`` maps state names to their layouts."""
    if isinstance(expr, sympy.Symbol):
        if expr.name in (PARAM, GRAD):
            return "full"
        layout = states.get(expr.name, "scalar")
        return "scalar" if layout == "tensor" else layout
    if isinstance(expr, WINDOW_NODES):
        return "full"
    if isinstance(expr, Reduction):
        inner = layout_of(expr.args[0], states)
        if expr.over in ("tensor", "group"):
            return "scalar"
        if expr.over == "blocks":
            return "scalar" if inner == "scalar" else "blocks"
        kept = "cols" if expr.over == "rows" else "rows"  # what a full input reduces to: the other factor
        reduced = {"full": "rows" if expr.over == "rows" else "cols", kept: "batch"}
        return reduced.get(inner, inner)
    out = "scalar"
    for arg in expr.args:
        out = _join(out, layout_of(arg, states))
    return out
