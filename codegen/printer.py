"""sympy expression -> Triton expression text.

Two contexts, one method per node kind:

* ``element``: per-element math, always float32 in registers. Symbols print as ``v_<name>``;
  constants print as ``tl.full([], c, tl.float32)`` so nothing can promote to float64; divisions
  and square roots are the IEEE-rounded ``tl.div_rn`` / ``tl.sqrt_rn``, as torch computes them.
* ``scalar``: per-tensor scalars (hyperparameters, the step, hoisted subexpressions), computed once
  per program in float64, as torch.optim computes bias corrections in Python floats. Symbols print
  as ``s_<name>``. On CUDA transcendental float64 functions go through libdevice; the CPU
  interpreter (``TRITON_INTERPRET=1``) has no libdevice, so there they use ``tl.exp``/``tl.log``.

Powers: exponents 2 to 4 multiply out, 1/2 is a square root; any other power is ``2 ** (e *
log2|b|)`` with torch.pow's real cases (a negative base takes the sign of an odd whole exponent and
gives NaN for a fractional one): decided while printing for a constant exponent, at run time by
``codegen.jit_helpers.real_power`` for a symbolic one. ``TritonPrinter.helpers`` names the helpers
printed text calls, so that a template imports them.

A node with no rule raises NotImplementedError naming the node, never a silent default.
"""

from __future__ import annotations

import sympy

from fusedopt import ir

TARGETS = ("cuda", "interpreter")


def is_boolean(expr: sympy.Basic, boolean_names: frozenset[str] = frozenset()) -> bool:
    """True for comparisons and logic (sympy Symbols are Boolean too; they count only if named so)."""
    if isinstance(expr, sympy.Symbol):
        return expr.name in boolean_names
    return isinstance(expr, sympy.logic.boolalg.Boolean) and not isinstance(expr, sympy.Expr)


class TritonPrinter:
    def __init__(self, context: str, target: str):
        if context not in ("element", "scalar"):
            raise ValueError(f"context must be 'element' or 'scalar', got {context!r}")
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        self.context = context
        self.target = target
        self.helpers: set[str] = set()  # names from codegen.jit_helpers the printed text calls

    # ---- entry point --------------------------------------------------------------------------

    def __call__(self, expr: sympy.Basic) -> str:
        method = getattr(self, f"_print_{type(expr).__name__}", None)
        if method is None:
            for base in type(expr).__mro__[1:]:
                method = getattr(self, f"_print_{base.__name__}", None)
                if method is not None and base.__name__ in _GENERIC_BASES:
                    break
                method = None
        if method is None:
            raise NotImplementedError(
                f"TritonPrinter ({self.context}): no rule for {type(expr).__name__} node `{expr}`; "
                "use the operators of fusedopt.dsl")
        return method(expr)

    # ---- helpers ------------------------------------------------------------------------------

    @property
    def _dtype(self) -> str:
        return "tl.float32" if self.context == "element" else "tl.float64"

    def _const(self, value: float) -> str:
        if self.context == "element":
            return f"tl.full([], {value!r}, tl.float32)"
        return repr(value)

    def _div(self, num: str, den: str) -> str:
        return f"tl.div_rn({num}, {den})" if self.context == "element" else f"({num} / {den})"

    def _sqrt(self, x: str) -> str:
        if self.context == "element":
            return f"tl.sqrt_rn({x})"
        return f"libdevice.sqrt({x})" if self.target == "cuda" else f"tl.sqrt({x})"

    def _fn64(self, name: str, x: str) -> str:
        """exp / log: fp32 in the element context, libdevice in fp64 on CUDA."""
        if self.context == "scalar" and self.target == "cuda":
            return f"libdevice.{name}({x})"
        return f"tl.{name}({x})"

    def _pow_general(self, base: sympy.Basic, exponent: str) -> str:
        """``base ** exponent`` for an exponent known only at run time."""
        b = self(base)
        if self.context == "scalar" and self.target == "cuda":
            return f"libdevice.pow({b}, {exponent})"
        if base.is_Number and base > 0:  # a positive constant base: the logarithm is all it takes
            return f"tl.exp2({exponent} * tl.log2({b}))"
        self.helpers.add("real_power")  # torch.pow's sign and special cases (codegen.jit_helpers)
        return f"real_power({b}, {exponent})"

    def _positive_power(self, base: sympy.Basic, exponent: sympy.Number) -> str:
        b = self(base)
        if exponent == 1:
            return b
        if exponent.is_Integer and 2 <= exponent <= 4:
            return "(" + " * ".join([b] * int(exponent)) + ")"
        if exponent == sympy.Rational(1, 2):
            return self._sqrt(b)
        if self.context == "scalar" and self.target == "cuda":
            return f"libdevice.pow({b}, {self._const(float(exponent))})"
        if exponent.is_Integer:  # |b| ** n, and b's sign for odd n (b * |b| ** (n - 1) keeps -0.0 and -inf)
            n = int(exponent)
            magnitude = f"tl.exp2({self._const(float(n - n % 2))} * tl.log2(tl.abs({b})))"
            return f"({b} * {magnitude})" if n % 2 else magnitude
        # a fractional power: NaN for a negative base, as torch.pow
        return f"tl.exp2({self._const(float(exponent))} * tl.log2({b}))"

    # ---- atoms --------------------------------------------------------------------------------

    def _print_Symbol(self, e: sympy.Symbol) -> str:
        return ("v_" if self.context == "element" else "s_") + e.name

    def _print_Number(self, e: sympy.Number) -> str:
        return self._const(float(e))

    def _print_BooleanTrue(self, e) -> str:
        return "True"

    def _print_BooleanFalse(self, e) -> str:
        return "False"

    # ---- arithmetic ---------------------------------------------------------------------------

    def _print_Add(self, e: sympy.Add) -> str:
        return "(" + " + ".join(self(a) for a in e.args) + ")"

    def _print_Mul(self, e: sympy.Mul) -> str:
        num, den, negate, repeated = [], [], False, []
        for a in e.args:
            if a == -1:
                negate = not negate
            elif a.is_Pow and a.exp.is_Number and a.exp < 0:
                den.append(self._positive_power(a.base, -a.exp))
            elif ir.repeated_factor(a):  # multiplied out after the other factors, as the reference does
                repeated += [self(a.base)] * int(a.exp)
            else:
                num.append(self(a))
        num += repeated
        out = " * ".join(num) if num else self._const(1.0)
        if len(num) > 1:
            out = f"({out})"
        for d in den:
            out = self._div(out, d)
        return f"(-{out})" if negate else out

    def _print_Pow(self, e: sympy.Pow) -> str:
        if e.exp.is_Number:
            if e.exp < 0:
                return self._div(self._const(1.0), self._positive_power(e.base, -e.exp))
            if e.exp == 0:
                return self._const(1.0)
            return self._positive_power(e.base, e.exp)
        return self._pow_general(e.base, self(e.exp))

    # ---- functions ----------------------------------------------------------------------------

    def _print_Abs(self, e) -> str:
        return f"tl.abs({self(e.args[0])})"

    def _print_sign(self, e) -> str:
        x = self(e.args[0])
        return (f"tl.where({x} > 0, {self._const(1.0)}, tl.where({x} < 0, {self._const(-1.0)}, "
                f"{self._const(0.0)}))")

    def _print_NonFinite(self, e) -> str:
        x = self(e.args[0])  # NaN compares false with everything, so it counts as non-finite
        return f"tl.where(tl.abs({x}) < float('inf'), {self._const(0.0)}, {self._const(1.0)})"

    def _print_exp(self, e) -> str:
        return self._fn64("exp", self(e.args[0]))

    def _print_log(self, e) -> str:
        return self._fn64("log", self(e.args[0]))

    def _fold(self, fn: str, args) -> str:
        out = self(args[0])
        for a in args[1:]:
            out = f"tl.{fn}({out}, {self(a)}, propagate_nan=tl.PropagateNan.ALL)"
        return out

    def _print_Min(self, e) -> str:
        return self._fold("minimum", e.args)

    def _print_Max(self, e) -> str:
        return self._fold("maximum", e.args)

    def _print_Piecewise(self, e: sympy.Piecewise) -> str:
        *pieces, (last, cond) = e.args
        if cond != sympy.true:
            raise NotImplementedError(f"TritonPrinter: Piecewise without a default branch: `{e}`")
        out = self(last)
        for value, c in reversed(pieces):
            out = f"tl.where({self(c)}, {self(value)}, {out})"
        return out

    # ---- comparisons --------------------------------------------------------------------------

    def _relational(self, e, op: str) -> str:
        return f"({self(e.lhs)} {op} {self(e.rhs)})"

    def _print_StrictGreaterThan(self, e) -> str:
        return self._relational(e, ">")

    def _print_GreaterThan(self, e) -> str:
        return self._relational(e, ">=")

    def _print_StrictLessThan(self, e) -> str:
        return self._relational(e, "<")

    def _print_LessThan(self, e) -> str:
        return self._relational(e, "<=")

    def _print_Equality(self, e) -> str:
        return self._relational(e, "==")

    def _print_Unequality(self, e) -> str:
        return self._relational(e, "!=")


# Base classes whose rule applies to every subclass (sympy's Integer, Float, Rational, ... are Numbers).
_GENERIC_BASES = {"Number"}
