"""The eager reference interpreter: runs a Program over lists of tensors with plain torch ops.

It is deliberately naive (one tensor at a time, the unlowered expressions walked node by node) so
that it can serve as the oracle for every generated kernel: with ``compute_dtype=torch.float64`` and
float64 inputs it is the test oracle; with float32 compute and the states' storage dtypes it is the
portable backend that runs anywhere torch runs, and that ``torch.compile`` can trace.

Hyperparameters arrive as 0-d float64 tensors and the step as a 0-d float32 tensor, so expressions
that read only them (bias corrections) are computed in float64, like torch.optim computes them in
Python floats; elementwise math runs in ``compute_dtype``.
"""

from __future__ import annotations

import operator
from typing import Mapping, Sequence

import sympy
import torch

from . import ir
from .dtypes import storage_dtype


def _reduce(op, values):
    out = values[0]
    for v in values[1:]:
        out = op(out, v)
    return out


def _pow(base, exponent):
    if isinstance(exponent, float):
        if exponent == 2.0:
            return base * base
        if exponent == 0.5:
            return torch.sqrt(base)
        if exponent == -0.5:
            return torch.rsqrt(base)
        if exponent == -1.0:
            return 1.0 / base
    if isinstance(base, float) and not isinstance(exponent, float):
        base = torch.tensor(base, dtype=torch.float64, device=exponent.device)
    return torch.pow(base, exponent)


def _min(a, b):
    if isinstance(a, float):
        a, b = b, a
    return torch.clamp(a, max=b) if isinstance(b, float) else torch.minimum(a, b)


def _max(a, b):
    if isinstance(a, float):
        a, b = b, a
    return torch.clamp(a, min=b) if isinstance(b, float) else torch.maximum(a, b)


_RELATIONAL = {
    sympy.StrictGreaterThan: operator.gt,
    sympy.GreaterThan: operator.ge,
    sympy.StrictLessThan: operator.lt,
    sympy.LessThan: operator.le,
    sympy.Equality: operator.eq,
    sympy.Unequality: operator.ne,
}


class _Evaluator:
    def __init__(self, env: Mapping[str, torch.Tensor]):
        self.env = env
        self.memo: dict[sympy.Basic, object] = {}

    def __call__(self, expr: sympy.Basic):
        if expr not in self.memo:
            self.memo[expr] = self.visit(expr)
        return self.memo[expr]

    def visit(self, e: sympy.Basic):
        if e.is_Symbol:
            return self.env[e.name]
        if e.is_Number:
            return float(e)
        if isinstance(e, sympy.Add):
            return _reduce(operator.add, [self(a) for a in e.args])
        if isinstance(e, sympy.Mul):
            num = [a for a in e.args if not (a.is_Pow and a.exp == -1)]
            den = [a.base for a in e.args if a.is_Pow and a.exp == -1]
            out = _reduce(operator.mul, [self(a) for a in num]) if num else 1.0
            for d in den:
                out = out / self(d)
            return out
        if isinstance(e, sympy.Pow):
            return _pow(self(e.base), self(e.exp))
        if isinstance(e, sympy.Abs):
            return torch.abs(self(e.args[0]))
        if isinstance(e, sympy.sign):
            return torch.sign(self(e.args[0]))
        if isinstance(e, sympy.exp):
            return torch.exp(self(e.args[0]))
        if isinstance(e, sympy.log):
            return torch.log(self(e.args[0]))
        if isinstance(e, sympy.Min):
            return _reduce(_min, [self(a) for a in e.args])
        if isinstance(e, sympy.Max):
            return _reduce(_max, [self(a) for a in e.args])
        if isinstance(e, sympy.Piecewise):
            (a, cond), (b, _) = e.args
            return torch.where(self(cond), self(a), self(b))
        if type(e) in _RELATIONAL:
            lhs, rhs = self(e.lhs), self(e.rhs)
            if isinstance(lhs, float):
                lhs = torch.tensor(lhs, dtype=torch.float64)
            return _RELATIONAL[type(e)](lhs, rhs)
        raise NotImplementedError(f"reference interpreter: no rule for {type(e).__name__} in {e}")


def init_state(program: ir.Program, param: torch.Tensor, grad: torch.Tensor) -> dict[str, torch.Tensor]:
    """Fresh states for one parameter, in their storage dtypes, on the parameter's device."""
    out = {}
    for spec in program.states:
        dtype = storage_dtype(spec.dtype)
        if spec.init == "zeros":
            out[spec.name] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
        else:
            src = param if spec.init == "p" else grad
            out[spec.name] = src.detach().to(dtype=dtype, copy=True)
    return out


def step(
    program: ir.Program,
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    states: Mapping[str, Sequence[torch.Tensor]],
    steps: Sequence[torch.Tensor],
    hparams: Mapping[str, torch.Tensor],
    compute_dtype: torch.dtype = torch.float32,
) -> None:
    """One optimizer step over every tensor, in place: each step counter += 1, then the update."""
    for i, (p, g) in enumerate(zip(params, grads)):
        steps[i].add_(1)
        env: dict[str, object] = {name: value for name, value in hparams.items()}
        env[ir.STEP] = steps[i].to(torch.float64) if compute_dtype == torch.float64 else steps[i]
        env[ir.PARAM] = p.to(compute_dtype)
        env[ir.GRAD] = g.to(compute_dtype)
        for name in program.state_names:
            env[name] = states[name][i].to(compute_dtype)
        evaluate = _Evaluator(env)
        new = [(target, evaluate(expr)) for target, expr in program.updates]
        for target, value in new:
            dest = p if target == ir.PARAM else states[target][i]
            dest.copy_(value)
