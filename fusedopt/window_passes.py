"""Lowering of a rule with a window (``fusedopt.dsl.window``) to the form its kernel template prints.

A window rule runs one program per top-k block of a tensor (``codegen.window_template``), in a fixed
order: compute what the push needs, select the block's top-k of the score, write the window row,
accumulate the window sums, compute the rest. :func:`lower_window` splits the rule's math along that
order. The window's reads become symbols: ``Kept(w)`` is ``_kept`` and each distinct
``WindowSum(w, beta, power)`` is ``_w0``, ``_w1``, ... Everything else is :func:`fusedopt.passes.lower`:
hoisted per-tensor scalars and shared temporaries, then each temporary and output is placed before
the selection when it reads neither ``_kept`` nor a window sum, and after it otherwise.
"""

from __future__ import annotations

import dataclasses
import functools

import sympy

from . import ir, passes

KEPT = "_kept"
SCORE = "_score"
PUSH = "_push"


@dataclasses.dataclass(frozen=True)
class WindowSumSpec:
    name: str  # the symbol the sum is read through: _w0, _w1, ...
    beta: sympy.Expr  # a per-tensor scalar expression
    power: int


@dataclasses.dataclass(frozen=True)
class WindowLowered:
    program: ir.Program
    # what the reference interpreter walks: the rule's updates with the window's reads replaced (SCORE
    # and PUSH last) and their per-tensor scalar subexpressions hoisted into `scalars`, which it computes
    # first, in float64, as the kernel does; nothing else is rewritten
    scalars: tuple[tuple[str, sympy.Expr], ...]
    updates: tuple[tuple[str, sympy.Expr], ...]
    lowered: passes.Lowered  # scalars, temps and outputs; outputs include SCORE and PUSH
    sums: tuple[WindowSumSpec, ...]
    before: frozenset[str]  # temporaries and outputs computable before the selection

    @property
    def window(self) -> ir.StateSpec:
        return self.program.window

    def temps(self, before: bool) -> tuple[tuple[str, sympy.Expr], ...]:
        return tuple((n, e) for n, e in self.lowered.temps if (n in self.before) == before)

    def outputs(self) -> tuple[tuple[str, sympy.Expr], ...]:
        """The parameter and full-size states, in program order."""
        return tuple((t, e) for t, e in self.lowered.outputs if t not in (SCORE, PUSH))

    def expression(self, target: str) -> sympy.Expr:
        return dict(self.lowered.outputs)[target]

    def text(self) -> str:
        lines = [f"window rule {self.program.name}"]
        if self.program.skip_when is not None:
            lines += [f"  skip the whole step (window row, states, p, step counter) where {self.program.skip_when} != 0"]
        lines += [f"  scalar {n} = {e}" for n, e in self.lowered.scalars]
        lines += [f"  before {n} = {e}" for n, e in self.temps(True)]
        lines += [f"  select the top-k of |{self.expression(SCORE)}|, push {self.expression(PUSH)}"]
        lines += [f"  {s.name} = window sum of {s.beta}**age * value**{s.power}" for s in self.sums]
        lines += [f"  after {n} = {e}" for n, e in self.temps(False)]
        lines += [f"  {t} <- {e}" for t, e in self.outputs()]
        if self.program.stochastic_rounding:
            lines += [f"  bf16 {ir.PARAM} stored with stochastic rounding (seed {ir.SR_SEED})"]
        return "\n".join(lines) + "\n"


@functools.lru_cache(maxsize=None)
def lower_window(program: ir.Program) -> WindowLowered:
    w = program.window
    if w is None:
        raise ValueError(f"rule '{program.name}' has no window; lower it with fusedopt.passes.lower")
    sums: dict[tuple[sympy.Expr, int], WindowSumSpec] = {}

    def replace(e: sympy.Basic) -> sympy.Basic:
        if isinstance(e, ir.Kept):
            return ir.symbol(KEPT)
        if isinstance(e, ir.WindowSum):
            key = (e.args[1], int(e.args[2]))
            if key not in sums:
                sums[key] = WindowSumSpec(f"_w{len(sums)}", *key)
            return ir.symbol(sums[key].name)
        if e.is_Atom:
            return e
        if isinstance(e, sympy.Piecewise):
            return sympy.Piecewise(*[(replace(v), replace(c)) for v, c in e.args])
        return passes._rebuild(e, [replace(a) for a in e.args])

    updates = [(t, replace(e)) for t, e in program.updates if t != w.name]
    score = dict(program.selections)[w.name]
    updates += [(SCORE, score), (PUSH, program.update_of(w.name))]
    shadow = dataclasses.replace(program, states=tuple(s for s in program.states if s.layout != "window"),
                                 updates=tuple(updates), selections=(), skip_when=None)
    lowered = passes.lower(shadow)
    late = {KEPT, *(s.name for s in sums.values())}
    before = set()
    for name, expr in lowered.temps:  # in dependency order; a late temporary makes its readers late
        if ir.free_names(expr) & late:
            late.add(name)
        else:
            before.add(name)
    # outputs are new values: their names (p, a state) read as the old values elsewhere
    before |= {t for t, e in lowered.outputs if not ir.free_names(e) & late}
    for target in (SCORE, PUSH):
        if target not in before:  # the DSL refuses such pushes; this guards the invariant
            raise ValueError(f"rule '{program.name}': the {target[1:]} of the push reads the window")
    hoister = passes._Hoister(program.scalar_names)
    hoisted = tuple((t, hoister(e)) for t, e in updates)
    scalars = tuple((sym.name, e) for e, sym in hoister.hoisted.items())
    return WindowLowered(program, scalars, hoisted, lowered, tuple(sums.values()), frozenset(before))
