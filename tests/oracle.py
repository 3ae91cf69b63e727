"""Compare a backend's step with the fp64 oracle, within a tolerance derived from the dtypes.

The oracle is :func:`fusedopt.reference.step` run on float64 copies of everything with
``compute_dtype=torch.float64``. A backend under test (the fp32 portable interpreter here; fused
kernels elsewhere) runs the same step from the same starting values, in storage dtypes.

Comparing one step at a time, from the same starting state, keeps the tolerance honest: errors do
not compound over steps, and a chaotic rule (a ``sign`` or a ``where`` near its boundary) cannot
drift into another branch. After each comparison both continue from the backend's values.

How the tolerance is derived
----------------------------
:class:`ErrorBound` walks the rule's expression once more, in float64, and carries for every node
its value ``v`` and a bound ``e`` on ``|computed - exact|`` (running error analysis, Higham,
*Accuracy and Stability of Numerical Algorithms*, ch. 3):

* inputs (p, g, states) are exact: both sides start from the same storage values, which fp32 and
  fp64 represent exactly. Hyperparameters and ``t`` are exact float64 numbers.
* each operation of the backend rounds once: ``e += u * (|v| + e) + tiny`` with ``u`` the unit
  roundoff of the compute dtype (2**-24 for fp32) and ``tiny`` its smallest subnormal (underflow);
  ``2u`` for functions that need not be correctly rounded (exp, log, pow, rsqrt). The oracle's own
  rounding (``u = 2**-53`` per operation) is added as well.
* errors propagate exactly through each operation: ``a*b``: ``(|a|+ea)(|b|+eb) - |a||b|``;
  ``1/b``: ``eb / (|b| (|b| - eb))`` (unbounded if ``eb >= |b|``); monotone functions (sqrt, exp,
  powers): the largest change of f over ``[v - e, v + e]``; ``min``/``max``/``abs``: ``max(e)``;
  n-ary sums and products use order-independent forms, so any evaluation order is covered.
* ``sign(x)`` and ``where(a < b, x, y)`` are exact unless the error interval of their argument
  crosses the boundary; there the bound is the distance between the two possible results.
* per-tensor scalars (expressions of hyperparameters and ``t`` only) are computed in float64 by the
  backend, as torch.optim computes bias corrections in Python floats; they are rounded to fp32 once,
  where they meet an element. Only ``t``-only scalars are fp32 (the step counter is an fp32 tensor).
* the result is stored in its storage dtype: ``+ u_s * (|v| + e) + tiny_s`` (u_s = 2**-8 for bf16,
  2**-11 for fp16, 2**-24 for fp32).

A backend passes when ``|got - oracle| <= 2 * bound`` elementwise; the factor 2 covers the
difference between the computed and exact magnitudes used in the rounding terms. For Adam this
comes to a few fp32 ulps of ``|p| + |update|`` for fp32 parameters and one storage ulp for bf16:
far below the effect of any wrong rule (eps inside the square root, a missing bias correction),
which :mod:`test_reference` checks the comparison catches.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

import sympy
import torch

from fusedopt import ir, reference

FP64 = torch.float64

UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
SMALLEST_SUBNORMAL = {torch.float64: 2.0**-1074, torch.float32: 2.0**-149, torch.bfloat16: 2.0**-133,
                      torch.float16: 2.0**-24}
U64 = UNIT_ROUNDOFF[torch.float64]
INF = float("inf")


@dataclasses.dataclass
class Node:
    value: torch.Tensor  # float64 (0-d for scalars), or bool for conditions
    err: torch.Tensor  # bound on |computed - exact|; for conditions: where the outcome is uncertain
    scalar: bool  # depends on hyperparameters and t only
    prec: str = "fp64"  # scalars: "fp64" (reads a hyperparameter tensor), "fp32" (t only), "const"


def _t(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.tensor(float(x), dtype=FP64)


class ErrorBound:
    """Values and error bounds of a program's expressions at given float64 inputs."""

    def __init__(self, env: Mapping[str, torch.Tensor], scalar_names: frozenset[str],
                 compute_dtype: torch.dtype = torch.float32):
        self.env = {k: v if _t(v).dtype == torch.bool else _t(v).to(FP64) for k, v in env.items()}
        self.scalar_names = scalar_names
        self.u = UNIT_ROUNDOFF[compute_dtype]
        self.tiny = SMALLEST_SUBNORMAL[compute_dtype]
        self.memo: dict[sympy.Basic, Node] = {}

    def __call__(self, expr: sympy.Basic) -> Node:
        if expr not in self.memo:
            self.memo[expr] = self._visit(expr)
        return self.memo[expr]

    # -- helpers --
    def _op_u(self, args: Sequence[Node], scalar: bool, transcendental: bool = False) -> float:
        """Unit roundoff of one operation of the backend, plus the oracle's own.

        Scalars are 0-d tensors: an operation on them runs in float64 when an operand is a float64
        hyperparameter tensor (torch promotes 0-d fp32 with 0-d fp64 to fp64), in fp32 when the only
        tensor is the fp32 step counter, and Python floats take the other operand's dtype. An n-ary
        sum or product is taken as float64 only if every non-constant operand is.
        """
        k = 2 if transcendental else 1
        if scalar:
            tensors = [a.prec for a in args if a.prec != "const"]
            if not tensors or all(p == "fp64" for p in tensors) or (len(args) == 2 and "fp64" in tensors):
                return k * U64 + U64
        return k * self.u + U64

    @staticmethod
    def _prec(args: Sequence[Node]) -> str:
        precs = {a.prec for a in args}
        return "fp64" if "fp64" in precs else "fp32" if "fp32" in precs else "const"

    def _elem(self, n: Node) -> Node:
        """An operand as an element op sees it: a scalar meeting an element is rounded to fp32."""
        if not n.scalar:
            return n
        v = n.value
        exact = (v.to(torch.float32).to(FP64) == v) if v.dtype == FP64 else torch.tensor(True)
        rounding = torch.where(exact & (n.err == 0), 0.0, self.u * (v.abs() + n.err))
        return Node(v, n.err + rounding, False, "fp32")

    def _round(self, value: torch.Tensor, err: torch.Tensor, u: float, n_ops: int = 1) -> torch.Tensor:
        return err + n_ops * (u * (value.abs() + err) + self.tiny)

    def _monotone(self, f: Callable[[torch.Tensor], torch.Tensor], a: Node, lo_domain: float | None = None,
                  pole_at_zero: bool = False) -> torch.Tensor:
        """Largest change of f over [v - e, v + e] (f monotone or even-convex there)."""
        v, e = a.value, a.err
        lo, hi = v - e, v + e
        if lo_domain is not None:
            lo = torch.clamp(lo, min=lo_domain)
        fv = f(v)
        change = torch.maximum((f(lo) - fv).abs(), (f(hi) - fv).abs())
        if pole_at_zero:
            change = torch.where((lo <= 0) & (hi >= 0) & (e > 0), INF, change)
        return torch.where(e == 0, 0.0, change)

    # -- nodes --
    def _visit(self, e: sympy.Basic) -> Node:
        if e.is_Symbol:
            scalar = e.name in self.scalar_names
            prec = "fp32" if e.name == ir.STEP else "fp64"
            return Node(self.env[e.name], torch.zeros((), dtype=FP64), scalar, prec)
        if e.is_Number:
            return Node(_t(float(e)), torch.zeros((), dtype=FP64), True, "const")
        if isinstance(e, sympy.Add):
            return self._add([self(a) for a in e.args])
        if isinstance(e, sympy.Mul):
            return self._mul(e)
        if isinstance(e, sympy.Pow):
            return self._pow(self(e.base), e.exp)
        if isinstance(e, (sympy.Min, sympy.Max)):
            args = [self(a) for a in e.args]
            scalar = all(a.scalar for a in args)
            if not scalar:
                args = [self._elem(a) for a in args]
            pick = torch.minimum if isinstance(e, sympy.Min) else torch.maximum
            value, err = args[0].value, args[0].err
            for a in args[1:]:
                value, err = pick(value, a.value), torch.maximum(err, a.err)
            return Node(value, err, scalar, self._prec(args))
        if isinstance(e, sympy.Abs):
            a = self(e.args[0])
            return Node(a.value.abs(), a.err, a.scalar, a.prec)
        if isinstance(e, sympy.sign):
            a = self(e.args[0])
            s = torch.sign(a.value)
            flip = torch.maximum((torch.sign(a.value - a.err) - s).abs(), (torch.sign(a.value + a.err) - s).abs())
            return Node(s, torch.where(a.err > 0, flip, 0.0), a.scalar, a.prec)
        if isinstance(e, sympy.exp):
            a = self(e.args[0])
            v = torch.exp(a.value)
            err = self._monotone(torch.exp, a)
            return Node(v, self._round(v, err, self._op_u([a], a.scalar, True)), a.scalar, a.prec)
        if isinstance(e, sympy.log):
            a = self(e.args[0])
            v = torch.log(a.value)
            err = self._monotone(torch.log, a, lo_domain=0.0, pole_at_zero=True)
            return Node(v, self._round(v, err, self._op_u([a], a.scalar, True)), a.scalar, a.prec)
        if isinstance(e, sympy.Piecewise):
            (x, cond), (y, _) = e.args
            c, a, b = self(cond), self(x), self(y)
            scalar = c.scalar and a.scalar and b.scalar
            if not scalar:
                a, b = self._elem(a), self._elem(b)
            value = torch.where(c.value, a.value, b.value)
            err = torch.where(c.value, a.err, b.err)
            err = torch.where(c.err.bool(), torch.maximum(a.err, b.err) + (a.value - b.value).abs(), err)
            return Node(value, err, scalar, self._prec([a, b]))
        if isinstance(e, sympy.core.relational.Relational):
            lhs, rhs = self(e.lhs), self(e.rhs)
            scalar = lhs.scalar and rhs.scalar
            if not scalar:
                lhs, rhs = self._elem(lhs), self._elem(rhs)
            op = {"<": torch.lt, "<=": torch.le, ">": torch.gt, ">=": torch.ge, "==": torch.eq, "!=": torch.ne}
            value = op[e.rel_op](lhs.value, rhs.value)
            slack = lhs.err + rhs.err
            uncertain = ((lhs.value - rhs.value).abs() <= slack) & (slack > 0)
            return Node(value, uncertain, scalar, self._prec([lhs, rhs]))
        if e == sympy.true or e == sympy.false:
            return Node(torch.tensor(bool(e)), torch.tensor(False), True, "const")
        raise NotImplementedError(f"error bound: no rule for {type(e).__name__} in {e}")

    def _add(self, args: list[Node]) -> Node:
        scalar = all(a.scalar for a in args)
        if not scalar:
            args = [self._elem(a) for a in args]
        value = sum((a.value for a in args), torch.zeros((), dtype=FP64))
        err = sum((a.err for a in args), torch.zeros((), dtype=FP64))
        magnitude = sum((a.value.abs() + a.err for a in args), torch.zeros((), dtype=FP64))
        u = self._op_u(args, scalar)
        # each of the n-1 partial sums, in any order, is at most the sum of magnitudes
        err = err + (len(args) - 1) * (u * magnitude + self.tiny)
        return Node(value, err, scalar, self._prec(args))

    def _mul(self, e: sympy.Mul) -> Node:
        # as the interpreter: factors with a negative numeric exponent divide
        den = [a for a in e.args if a.is_Pow and a.exp.is_Number and a.exp < 0]
        num = [a for a in e.args if a not in den]
        factors = [self(a) for a in num] + [self._pow(self(d.base), -d.exp, reciprocal=True) for d in den]
        scalar = all(f.scalar for f in factors)
        if not scalar:
            factors = [self._elem(f) for f in factors]
        value = torch.ones((), dtype=FP64)
        exact_mag = torch.ones((), dtype=FP64)
        upper_mag = torch.ones((), dtype=FP64)
        for f in factors:
            value = value * f.value
            exact_mag = exact_mag * f.value.abs()
            upper_mag = upper_mag * (f.value.abs() + f.err)
        err = upper_mag - exact_mag
        u = self._op_u(factors, scalar)
        n_ops = len(factors) - 1 + (0 if num else 1)
        err = err + n_ops * (u * upper_mag + self.tiny)
        return Node(value, err, scalar, self._prec(factors))

    def _pow(self, a: Node, exponent: sympy.Basic, reciprocal: bool = False) -> Node:
        """a**exponent; with ``reciprocal``: the factor 1/a**exponent of a product (no rounding of
        the division itself, which the product counts)."""
        if not exponent.is_Number:
            x = self(exponent)
            if not (a.scalar and x.scalar):
                raise NotImplementedError("error bound: a power with a non-numeric exponent must be a scalar")
            v = torch.pow(a.value, x.value)
            # d(a^x) = x a^(x-1) da + a^x log(a) dx
            err = (x.value * v / a.value).abs() * a.err + (v * torch.log(a.value.abs())).abs() * x.err
            err = self._round(v, torch.nan_to_num(err, nan=0.0), self._op_u([a, x], True, True))
            return Node(v, err, True, self._prec([a, x]))
        k = float(exponent)
        if not a.scalar:
            a = self._elem(a)
        u = self._op_u([a], a.scalar, transcendental=k not in (1.0, 2.0, 0.5, -1.0))
        if k == 1.0:
            base = a
        else:
            mag = abs(k)
            f = (lambda x: x * x) if mag == 2.0 else (lambda x: torch.sqrt(x)) if mag == 0.5 else \
                (lambda x: torch.pow(x, mag))
            integer = mag == int(mag)
            v = f(a.value)
            err = self._monotone(f, a, lo_domain=None if integer else 0.0)
            rounded = mag != 1.0
            base = Node(v, self._round(v, err, u) if rounded else err, a.scalar, a.prec)
        if (k < 0) == reciprocal:
            return base
        # 1/base: the interpreter divides (or, for x**-1 alone, computes 1.0 / x)
        v = 1.0 / base.value
        safe = base.value.abs() - base.err
        err = torch.where(safe > 0, base.err / (base.value.abs() * safe.clamp(min=1e-300)), INF)
        err = torch.where(base.err == 0, 0.0, err)
        if not reciprocal:
            err = self._round(v, err, u if k != -0.5 else 2 * self.u + U64)
        return Node(v, err, base.scalar, base.prec)


def output_bounds(program: ir.Program, env64: Mapping[str, torch.Tensor],
                  storage: Mapping[str, torch.dtype]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """For each target: (value, bound) with the rounding to its storage dtype included."""
    bound = ErrorBound(env64, program.scalar_names)
    out = {}
    for target, expr in program.updates:
        n = bound(expr)
        u_s, tiny_s = UNIT_ROUNDOFF[storage[target]], SMALLEST_SUBNORMAL[storage[target]]
        value = n.value
        err = torch.nan_to_num(n.err, nan=INF)
        err = err + u_s * (value.abs() + err) + tiny_s
        out[target] = (value, err)
    return out


def within(got: torch.Tensor, want: torch.Tensor, tol: torch.Tensor) -> torch.Tensor:
    got, want = got.to(FP64), want.to(FP64)
    return ((got - want).abs() <= tol) | (got == want) | (torch.isnan(got) & torch.isnan(want))


# A backend: runs one step in place on (params, grads, states, steps, hparams) in storage dtypes.
Backend = Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor], Mapping[str, Sequence[torch.Tensor]],
                    Sequence[torch.Tensor], Mapping[str, torch.Tensor]], None]


def fp32_backend(program: ir.Program) -> Backend:
    def run(params, grads, states, steps, hparams):
        reference.step(program, params, grads, states, steps, hparams, compute_dtype=torch.float32)
    return run


def check_step(program: ir.Program, backend: Backend, params: list[torch.Tensor], grads: list[torch.Tensor],
               states: dict[str, list[torch.Tensor]], steps: list[torch.Tensor],
               hparams: Mapping[str, torch.Tensor], slack: float = 2.0) -> list[str]:
    """Run one step with ``backend`` (in place) and with the fp64 oracle of ``program``; return a
    description of every target that differs by more than ``slack`` times the derived bound."""
    names = program.state_names
    p64 = [p.to(FP64) for p in params]
    g64 = [g.to(FP64) for g in grads]
    s64 = {n: [s.to(FP64) for s in states[n]] for n in names}
    t64 = [t.clone() for t in steps]
    before = {"p": [p.clone() for p in p64], **{n: [s.clone() for s in s64[n]] for n in names}}
    backend(params, grads, states, steps, hparams)
    reference.step(program, p64, g64, s64, t64, hparams, compute_dtype=FP64)
    failures = []
    for i in range(len(params)):
        env = {k: v for k, v in hparams.items()}
        env.update({n: before[n][i] for n in names})
        env[ir.PARAM], env[ir.GRAD] = before["p"][i], g64[i]
        env[ir.STEP] = t64[i].to(FP64)
        storage = {"p": params[i].dtype, **{n: states[n][i].dtype for n in names}}
        bounds = output_bounds(program, env, storage)
        for target in ("p", *names):
            got = params[i] if target == "p" else states[target][i]
            want = p64[i] if target == "p" else s64[target][i]
            value, err = bounds[target]
            ok = within(got, want, slack * err)
            ok_mine = within(value.expand_as(want), want, slack * err)  # independent fp64 evaluation
            if not bool(ok.all()) or not bool(ok_mine.all()):
                bad = (~ok | ~ok_mine).nonzero()[0].tolist()
                idx = tuple(bad)
                failures.append(
                    f"tensor {i} {tuple(got.shape)} {got.dtype} step {int(steps[i])}: '{target}' at {idx}: "
                    f"backend {got[idx].item()!r}, oracle {want[idx].item()!r}, independent fp64 "
                    f"{value.expand_as(want)[idx].item()!r}, allowed {slack * err.expand_as(want)[idx].item():.3g} "
                    f"({int((~ok).sum())} of {got.numel()} elements off)")
    return failures


def run_case(case, backend_for: Callable[[ir.Program], Backend] = fp32_backend,
             oracle_program: ir.Program | None = None) -> list[str]:
    """Run every step of a :class:`strategies.Case`; return the failures of the first bad step."""
    program = oracle_program or case.program
    backend = backend_for(case.program)
    params, states, steps = case.init()
    hparams = case.hparam_tensors()
    for k in range(case.n_steps):
        failures = check_step(program, backend, params, case.grads(k), states, steps, hparams)
        if failures:
            return [f"step {k + 1} of {case.n_steps}: {f}" for f in failures]
    return []


def assert_matches_oracle(case, **kwargs) -> None:
    failures = run_case(case, **kwargs)
    assert not failures, f"{case}\n" + "\n".join(failures[:5])


__all__ = [
    "ErrorBound",
    "assert_matches_oracle",
    "check_step",
    "fp32_backend",
    "math",
    "output_bounds",
    "run_case",
    "within",
]
