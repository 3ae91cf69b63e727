"""IR -> IR passes: hoisting per-tensor scalars and common-subexpression elimination.

:func:`lower` turns a :class:`~fusedopt.ir.Program` into a :class:`Lowered` program, the form code
generators print: a list of per-tensor scalars (expressions over hyperparameters and the step only,
such as ``lr / (1 - beta1**t)``; computed once per tensor, not once per element), a list of
elementwise temporaries shared by several outputs, and one expression per output.

Generated names start with ``_`` (``_s0``, ``_e0``), which rule authors cannot use.
"""

from __future__ import annotations

import dataclasses
import hashlib

import sympy

from . import ir


@dataclasses.dataclass(frozen=True)
class ReductionSpec:
    """One reduction, computed in reduction phase ``phase`` (0 first) from ``arg``, an elementwise
    expression that may read the results of reductions of earlier phases."""

    name: str  # the symbol the result is read through: _r0, _r1, ...
    op: str  # "sum" | "max"
    over: str  # "tensor" | "group"
    phase: int
    arg: sympy.Expr


@dataclasses.dataclass(frozen=True)
class Lowered:
    program: ir.Program
    scalars: tuple[tuple[str, sympy.Expr], ...]  # in dependency order; read hparams, t, earlier scalars
    temps: tuple[tuple[str, sympy.Expr], ...]  # elementwise temporaries, in dependency order
    outputs: tuple[tuple[str, sympy.Expr], ...]  # target -> expression
    reductions: tuple[ReductionSpec, ...] = ()

    @property
    def n_phases(self) -> int:
        """Reduction phases before the final (updating) phase."""
        return 1 + max((r.phase for r in self.reductions), default=-1)

    def available_in(self, name: str) -> int:
        """The first phase whose kernel can compute scalar ``name`` (after the reductions it reads)."""
        deps = dict(self.scalars)[name].free_symbols
        phases = {r.name: r.phase for r in self.reductions}
        avail = {n: self.available_in(n) for n, _ in self.scalars if n in {d.name for d in deps}}
        return max([phases[d.name] + 1 for d in deps if d.name in phases] + list(avail.values()) + [0])

    def text(self) -> str:
        lines = [self.program.text().rstrip()]
        lines += [f"  reduce {r.name} = {r.op} over {r.over} in phase {r.phase} of {r.arg}" for r in self.reductions]
        lines += [f"  scalar {n} = {e}" for n, e in self.scalars]
        lines += [f"  temp {n} = {e}" for n, e in self.temps]
        lines += [f"  out {n} = {e}" for n, e in self.outputs]
        return "\n".join(lines) + "\n"

    def key(self) -> str:
        return hashlib.sha256(self.text().encode()).hexdigest()


def _is_scalar(expr: sympy.Basic, scalar_names: frozenset[str]) -> bool:
    names = ir.free_names(expr)
    return bool(names) and names <= scalar_names


class _Hoister:
    """Replaces maximal scalar-only subexpressions by fresh symbols."""

    def __init__(self, scalar_names: frozenset[str]):
        self.scalar_names = scalar_names
        self.hoisted: dict[sympy.Expr, sympy.Symbol] = {}

    def name_for(self, expr: sympy.Expr) -> sympy.Symbol:
        if expr not in self.hoisted:
            self.hoisted[expr] = ir.symbol(f"_h{len(self.hoisted)}")
        return self.hoisted[expr]

    def __call__(self, expr: sympy.Expr) -> sympy.Expr:
        if expr.is_Atom:
            return expr
        if _is_scalar(expr, self.scalar_names):
            return self.name_for(expr)
        args = list(expr.args)
        if isinstance(expr, (sympy.Add, sympy.Mul)):
            scalar = [a for a in args if a.is_Number or _is_scalar(a, self.scalar_names)]
            rest = [a for a in args if a not in scalar]
            if any(not a.is_Number for a in scalar) and len(scalar) > 1:
                return expr.func(self.name_for(expr.func(*scalar)), *[self(a) for a in rest])
        if isinstance(expr, sympy.Piecewise):
            return sympy.Piecewise(*[(self(e), self(c)) for e, c in args])
        return expr.func(*[self(a) for a in args])


def extract_reductions(updates) -> tuple[list[ReductionSpec], list[tuple[str, sympy.Expr]]]:
    """Replace every reduction by a symbol ``_rK``; innermost first, identical ones shared."""
    found: list[ReductionSpec] = []
    names: dict[tuple, sympy.Symbol] = {}

    def visit(e: sympy.Basic) -> sympy.Basic:
        if e.is_Atom:
            return e
        if isinstance(e, sympy.Piecewise):
            return sympy.Piecewise(*[(visit(v), visit(c)) for v, c in e.args])
        args = [visit(a) for a in e.args]
        if not isinstance(e, ir.Reduction):
            return _rebuild(e, args)
        key = (e.op, e.over, args[0])
        if key not in names:
            deps = [r.phase for r in found if r.name in ir.free_names(args[0])]
            names[key] = ir.symbol(f"_r{len(found)}")
            found.append(ReductionSpec(names[key].name, e.op, e.over, 1 + max(deps, default=-1), args[0]))
        return names[key]

    return found, [(target, visit(expr)) for target, expr in updates]


def hoist(program: ir.Program):
    """Pull scalar-only subexpressions out of the updates and the reduction arguments.

    Returns (scalars, updates, reductions); reduction results count as scalars."""
    reductions, updates = extract_reductions(program.updates)
    h = _Hoister(program.scalar_names | {r.name for r in reductions})
    updates = [(target, h(expr)) for target, expr in updates]
    reductions = [dataclasses.replace(r, arg=h(r.arg)) for r in reductions]
    scalars = [(sym, expr) for expr, sym in h.hoisted.items()]
    return scalars, updates, reductions


def _rebuild(e: sympy.Basic, args: list) -> sympy.Basic:
    if list(e.args) == args:
        return e
    try:
        return e.func(*args, evaluate=False)
    except TypeError:  # nodes such as ExprCondPair take no evaluate flag
        return e.func(*args)


def cse(exprs: list[sympy.Expr], prefix: str) -> tuple[list[tuple[sympy.Symbol, sympy.Expr]], list[sympy.Expr]]:
    """Common-subexpression elimination of whole, identical subtrees, in a deterministic order.

    Only complete subtrees are shared: sums and products are never regrouped (sympy.cse would split
    ``-m + g + wd*p`` into ``(g + wd*p) - m``), so float rounding follows the rule as written and the
    kernels agree with the reference interpreter to a few ulps even under cancellation.
    """
    counts: dict[sympy.Basic, int] = {}

    def count(e: sympy.Basic) -> None:
        if e.is_Atom:
            return
        counts[e] = counts.get(e, 0) + 1
        if counts[e] == 1:
            for a in e.args:
                count(a)

    for e in exprs:
        count(e)
    names = sympy.numbered_symbols(prefix)
    temps: list[tuple[sympy.Symbol, sympy.Expr]] = []
    replaced: dict[sympy.Basic, sympy.Basic] = {}

    def rewrite(e: sympy.Basic) -> sympy.Basic:
        if e.is_Atom:
            return e
        if e in replaced:
            return replaced[e]
        if isinstance(e, sympy.Piecewise):
            new = sympy.Piecewise(*[(rewrite(v), rewrite(c)) for v, c in e.args])
        else:
            new = _rebuild(e, [rewrite(a) for a in e.args])
        if counts.get(e, 0) > 1 and not isinstance(e, sympy.functions.elementary.piecewise.ExprCondPair):
            sym = next(names)
            temps.append((sym, new))
            new = sym
        replaced[e] = new
        return new

    reduced = [rewrite(e) for e in exprs]
    return temps, reduced


def lower(program: ir.Program) -> Lowered:
    scalar_defs, updates, reductions = hoist(program)
    s_temps, s_reduced = cse([e for _, e in scalar_defs], "_s")
    scalars = [(s.name, e) for s, e in s_temps]
    scalars += [(sym.name, e) for (sym, _), e in zip(scalar_defs, s_reduced)]
    e_temps, e_reduced = cse([e for _, e in updates], "_e")
    return Lowered(
        program=program,
        scalars=tuple(scalars),
        temps=tuple((s.name, e) for s, e in e_temps),
        outputs=tuple((target, e) for (target, _), e in zip(updates, e_reduced)),
        reductions=tuple(reductions),
    )
