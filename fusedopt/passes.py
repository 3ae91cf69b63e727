"""IR -> IR passes: hoisting per-tensor scalars and common-subexpression elimination.

:func:`lower` turns a :class:`~fusedopt.ir.Program` into a :class:`Lowered` program, the form code
generators print: a list of per-tensor scalars (expressions over hyperparameters and the step only,
such as ``lr / (1 - beta1**t)``; computed once per tensor, not once per element), a list of
elementwise temporaries shared by several outputs, and one expression per output.

Generated names start with ``_`` (``_s0``, ``_e0``), which rule authors cannot use.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib

import sympy

from . import ir


@dataclasses.dataclass(frozen=True)
class ReductionSpec:
    """One value computed in phase ``phase`` (0 first) from ``arg``, an elementwise expression that may
    read the results of earlier phases: a reduction, or (op "store") a value of a row, column or block
    layout written once per row, column or block, for later phases to read back.

    A reduction sees its argument at every element of the tensor (a per-row value counts once per
    element of its row), so ``total(r, over="rows")`` of a per-row ``r`` is ``shape[-1] * r``."""

    name: str  # the symbol the result is read through: _r0, _r1, ...
    op: str  # "sum" | "max" | "mean" | "store"
    over: str  # "tensor" | "group" | "rows" | "cols" | "blocks"; for a store, the layout it keeps
    phase: int
    arg: sympy.Expr
    layout: str = "scalar"  # the result's layout (see ir.layout_of)
    arg_layout: str = "full"

    @property
    def small(self) -> bool:
        """Kept in a per-tensor buffer of its layout, not as one number per tensor or group."""
        return self.over not in ("tensor", "group")


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

    @property
    def small(self) -> tuple[ReductionSpec, ...]:
        """The reductions and stores kept per row, column or block, in buffer order."""
        return tuple(r for r in self.reductions if r.small)

    @functools.cached_property
    def layouts(self) -> dict[str, str]:
        """Layout of every name that is not one value per element or per tensor."""
        out = {s.name: _kept(s.layout) for s in self.program.states if s.layout != "full"}
        out.update({r.name: r.layout for r in self.small})
        return out

    @property
    def skip_flag(self) -> str | None:
        """The scalar (a reduction result or a hyperparameter) that is nonzero when the step is
        skipped (see ir.Program.skip_when), or None."""
        flag = self.program.skip_when
        if flag is None:
            return None
        if isinstance(flag, sympy.Symbol):
            return flag.name
        return next(r.name for r in self.reductions
                    if (r.op, r.over, r.arg) == (flag.op, flag.over, flag.args[0]))

    def available_in(self, name: str) -> int:
        """The first phase whose kernel can compute scalar ``name`` (after the reductions it reads)."""
        deps = dict(self.scalars)[name].free_symbols
        phases = {r.name: r.phase for r in self.reductions}
        avail = {n: self.available_in(n) for n, _ in self.scalars if n in {d.name for d in deps}}
        return max([phases[d.name] + 1 for d in deps if d.name in phases] + list(avail.values()) + [0])

    def text(self) -> str:
        lines = [self.program.text().rstrip()]
        lines += [f"  reduce {r.name} = {r.op} over {r.over} in phase {r.phase} of {r.arg}"
                  + (f" ({r.arg_layout} -> {r.layout})" if r.small else "") for r in self.reductions]
        lines += [f"  scalar {n} = {e}" for n, e in self.scalars]
        lines += [f"  temp {n} = {e}" for n, e in self.temps]
        lines += [f"  out {n} = {e}" for n, e in self.outputs]
        return "\n".join(lines) + "\n"

    def phases(self) -> str:
        """The launch plan for people: what each kernel of a step computes."""
        lines = []
        for phase in range(self.n_phases):
            lines.append(f"phase {phase} (a reduction kernel):")
            for r in self.reductions:
                if r.phase == phase:
                    what = f"store {r.over} value" if r.op == "store" else f"{r.op} over {r.over}"
                    lines.append(f"  {r.name} = {what} of {r.arg}")
        lines.append(f"phase {self.n_phases} (the updating kernel):")
        lines += [f"  {n} <- {e}" for n, e in self.outputs]
        return "\n".join(lines)

    def key(self) -> str:
        return hashlib.sha256(self.text().encode()).hexdigest()


def _kept(layout: str) -> str:
    """The layout a state's values have (ir.layout_of): a per-tensor state holds one scalar."""
    return "scalar" if layout == "tensor" else layout


def _is_scalar(expr: sympy.Basic, scalar_names: frozenset[str]) -> bool:
    names = ir.free_names(expr)
    return bool(names) and names <= scalar_names


class _Hoister:
    """Replaces maximal scalar-only subexpressions by fresh symbols."""

    def __init__(self, scalar_names: frozenset[str], into_reductions: bool = True):
        self.scalar_names = scalar_names
        self.into_reductions = into_reductions
        self.hoisted: dict[sympy.Expr, sympy.Symbol] = {}

    def name_for(self, expr: sympy.Expr) -> sympy.Symbol:
        if expr not in self.hoisted:
            self.hoisted[expr] = ir.symbol(f"_h{len(self.hoisted)}")
        return self.hoisted[expr]

    def __call__(self, expr: sympy.Expr) -> sympy.Expr:
        if expr.is_Atom or (not self.into_reductions and isinstance(expr, ir.Reduction)):
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


def extract_reductions(updates, layouts: dict[str, str] | None = None):
    """Replace every reduction by a symbol ``_rK``; innermost first, identical ones shared.
    ``layouts``: the layout of every state that is not full size."""
    layouts = dict(layouts or {})
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
            spec = ReductionSpec(names[key].name, e.op, e.over, 1 + max(deps, default=-1), args[0],
                                 ir.layout_of(e.func(args[0]), layouts), ir.layout_of(args[0], layouts))
            found.append(spec)
            if spec.small:
                layouts[spec.name] = spec.layout
        return names[key]

    return found, [(target, visit(expr)) for target, expr in updates]


def store_small_states(program: ir.Program, reductions: list[ReductionSpec], updates):
    """Give every row, column or block state that the step rewrites a store phase of its own.

    The updating kernel writes such a state once per row (by the row's first element) while other
    programs of the same launch still read the row: they must not read the old value there. So the
    new value is computed, and kept in a buffer, one phase earlier (a "store"); the updating phase
    reads it from there and copies it into the state. A read of the old value that is left in the
    updating phase (the new value was rewritten beyond recognition) reads a copy stored in phase 0.
    """
    small_states = {s.name: _kept(s.layout) for s in program.states if s.layout != "full"}
    written = [(t, e) for t, e in updates if t in small_states]
    if not written:
        return reductions, updates
    reductions = list(reductions)
    phase_of = {r.name: r.phase for r in reductions}
    stored: dict[sympy.Expr, sympy.Symbol] = {}

    def store(expr: sympy.Expr, layout: str) -> ReductionSpec:
        phase = 1 + max((phase_of[n] for n in ir.free_names(expr) if n in phase_of), default=-1)
        spec = ReductionSpec(f"_r{len(reductions)}", "store", layout, phase, expr, layout, layout)
        reductions.append(spec)
        phase_of[spec.name] = phase
        return spec

    for target, expr in written:
        if expr not in stored and (ir.free_names(expr) & set(small_states)):
            stored[expr] = ir.symbol(store(expr, small_states[target]).name)
    later = {s: phase_of[s.name] for s in stored.values()}

    def replace(expr: sympy.Expr, phase: int | None) -> sympy.Expr:
        """Reads of stored values in ``phase`` (None: the updating phase) go through the stores."""
        return expr.xreplace({e: s for e, s in stored.items() if phase is None or later[s] < phase})

    reductions = [dataclasses.replace(r, arg=replace(r.arg, r.phase)) if r.op != "store" else r for r in reductions]
    updates = [(t, replace(e, None)) for t, e in updates]
    old = sorted({n for t, e in updates for n in ir.free_names(e) if n in dict(written)})
    for name in old:  # the old value, still read by the updating phase
        copy = ir.symbol(store(ir.symbol(name), small_states[name]).name)
        updates = [(t, e.xreplace({ir.symbol(name): copy})) for t, e in updates]
    return reductions, updates


def hoist_scalars(program: ir.Program) -> tuple[list[tuple[sympy.Symbol, sympy.Expr]], list]:
    """The updates with their maximal scalar-only subexpressions (of hyperparameters, the step and
    the size) replaced by symbols, as the kernels hoist them, and the hoisted (symbol, expression)
    pairs; reductions stay in place, their arguments untouched. The reference interpreter evaluates
    this form, so that both backends group (and round) the per-tensor factors alike:
    ``lr / (1 - beta1**t)`` once, in float64, then one float32 product."""
    h = _Hoister(program.scalar_names, into_reductions=False)
    updates = [(target, h(expr)) for target, expr in program.updates]
    return [(sym, expr) for expr, sym in h.hoisted.items()], updates


def hoist(program: ir.Program):
    """Pull scalar-only subexpressions out of the updates and the reduction arguments.

    Returns (scalars, updates, reductions); per-tensor and group reduction results count as scalars."""
    layouts = {s.name: s.layout for s in program.states if s.layout != "full"}
    reductions, updates = extract_reductions(program.updates, layouts)
    reductions, updates = store_small_states(program, reductions, updates)
    h = _Hoister(program.scalar_names | {r.name for r in reductions if not r.small})
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
