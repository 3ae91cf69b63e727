"""The eager reference interpreter: runs a Program over lists of tensors with plain torch ops.

It is deliberately naive (one tensor at a time, the unlowered expressions walked node by node) so
that it can serve as the oracle for every generated kernel: with ``compute_dtype=torch.float64`` and
float64 inputs it is the test oracle; with float32 compute and the states' storage dtypes it is the
portable backend that runs anywhere torch runs, and that ``torch.compile`` can trace. In float32
the per-tensor scalar factors are grouped first as the kernels group them (``Compiled.grouped``),
so that the two backends round alike (elementwise rules: the same bits).

Hyperparameters arrive as 0-d float64 tensors and the step as a 0-d float32 tensor, so expressions
that read only them (bias corrections) are computed in float64, like torch.optim computes them in
Python floats; elementwise math runs in ``compute_dtype``.
"""

from __future__ import annotations

import functools
import math
import operator
from typing import Mapping, NamedTuple, Sequence

import sympy
import torch

from . import ir, passes, quant, rounding
from .dtypes import storage_dtype


def _reduce(op, values):
    out = values[0]
    for v in values[1:]:
        out = op(out, v)
    return out


def _sqrt(x):
    """The square root rounded to nearest, as IEEE (and the kernels' sqrt_rn) round it. torch's CPU
    sqrt is a vectorized approximation that is 1 ulp off for about 0.6 % of inputs; for float32 the
    neighbour on the right side of the halfway point is chosen, exactly, in float64 (a midpoint of
    two float32 values and its square are exact there)."""
    if not isinstance(x, torch.Tensor):
        return math.sqrt(x) if x >= 0 else math.nan
    y = torch.sqrt(x)
    if x.dtype != torch.float32:
        return y
    hi = torch.nextafter(y, torch.full_like(y, math.inf))
    lo = torch.nextafter(y, torch.zeros_like(y))
    wide, yd = x.double(), y.double()
    up, down = (yd + hi.double()) * 0.5, (yd + lo.double()) * 0.5
    return torch.where(wide > up * up, hi, torch.where(wide < down * down, lo, y))


def _pow(base, exponent):
    if isinstance(exponent, float):
        if exponent == 1.0:
            return base
        if exponent == 2.0:
            return base * base
        if exponent in (3.0, 4.0):  # multiplied out, as the kernels do
            return base * base * base if exponent == 3.0 else base * base * base * base
        if exponent == 0.5:
            return _sqrt(base)
        if exponent == -0.5:
            return 1.0 / _sqrt(base)
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


class Compiled(NamedTuple):
    """A program flattened into straight-line code over named slots.

    Each instruction is ``(op, out, args)`` with args naming slots or holding Python floats: one
    instruction per distinct sympy node, nothing rewritten. Built eagerly, so that running it needs
    no sympy and ``torch.compile`` can trace it.
    """

    program: ir.Program
    code: tuple[tuple[str, str, tuple], ...]
    outputs: tuple[tuple[str, str], ...]  # target -> slot
    # group reductions, computed over every tensor before the per-tensor code runs:
    # (slot the result goes to, "sum" | "max", code computing the argument per tensor, argument slot)
    groups: tuple[tuple[str, str, tuple, object], ...] = ()
    skip: object = None  # the slot of Program.skip_when: nonzero when the step is skipped
    # the same program with its per-tensor scalar factors computed first, as the kernels compute
    # them (``lr / (1 - beta1**t)`` once, then one product per element): what float32 compute runs,
    # so that this backend and the kernels round alike; float64 compute (the oracle) runs the code
    # above, which shares nothing with the kernels' lowering
    grouped: "Compiled | None" = None


class _Flattener:
    def __init__(self, prefix: str = "%"):
        self.code: list[tuple[str, str, tuple]] = []
        self.slots: dict[sympy.Basic, object] = {}
        self.prefix = prefix
        self.groups: list[tuple[str, str, tuple, object]] = []

    def __call__(self, e: sympy.Basic):
        if e not in self.slots:
            self.slots[e] = self.visit(e)
        return self.slots[e]

    def emit(self, op: str, *args) -> str:
        out = f"{self.prefix}{len(self.code)}"
        self.code.append((op, out, args))
        return out

    def visit(self, e: sympy.Basic):
        if e.is_Symbol:
            return e.name
        if e.is_Number:
            return float(e)
        if isinstance(e, sympy.Add):
            return self.emit("add", *[self(a) for a in e.args])
        if isinstance(e, sympy.Mul):
            # factors with a negative exponent divide: a * b**-k is computed as a / b**k; squares
            # to fourth powers multiply out after the other factors, as the kernels do
            den = [a for a in e.args if a.is_Pow and a.exp.is_Number and a.exp < 0]
            repeated = [a for a in e.args if ir.repeated_factor(a)]
            num = [a for a in e.args if a not in den and a not in repeated]
            num += [a.base for a in repeated for _ in range(int(a.exp))]
            out = self.emit("mul", *[self(a) for a in num]) if num else 1.0
            for d in den:
                out = self.emit("div", out, self.emit("pow", self(d.base), float(-d.exp)))
            return out
        if isinstance(e, sympy.Pow):
            return self.emit("pow", self(e.base), self(e.exp))
        if isinstance(e, sympy.Piecewise):
            (a, cond), (b, _) = e.args
            return self.emit("where", self(cond), self(a), self(b))
        if isinstance(e, ir.Reduction) and e.over in ("tensor", "rows", "cols", "blocks"):
            return self.emit(f"{e.op}_{e.over}", self(e.args[0]), ir.PARAM)
        if isinstance(e, ir.Reduction) and e.over == "group":
            if e.args[0].atoms(ir.Reduction) - {e}:
                raise NotImplementedError(f"reference interpreter: a group reduction over another reduction: {e}")
            inner = _Flattener(prefix=f"%g{len(self.groups)}.")
            arg = inner(e.args[0])
            slot = f"%g{len(self.groups)}"
            self.groups.append((slot, e.op, tuple(inner.code), arg))
            return slot
        for kind, op in _FUNCTIONS:
            if isinstance(e, kind):
                return self.emit(op, *[self(a) for a in e.args])
        raise NotImplementedError(f"reference interpreter: no rule for {type(e).__name__} in {e}")


def _full(x, like: torch.Tensor) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return torch.broadcast_to(x, like.shape)
    return torch.full(like.shape, x, dtype=like.dtype, device=like.device)


def _reduce_dim(op: str, x, dim: int, like: torch.Tensor):
    """``op`` ("sum", "max" or "mean") over one dim of x broadcast to ``like``'s shape, kept as size 1.

    A value already constant along the dim (stored with size 1 there, or a number) is not expanded:
    its mean and max are itself and its sum is the dim's length times it. Sums and means accumulate
    in float64, as the fused kernels do. A tensor of fewer dims has a dim of length 1 there."""
    length = like.shape[dim] if like.dim() >= -dim else 1
    if not isinstance(x, torch.Tensor) or x.dim() < -dim or x.shape[dim] == 1:
        return x * length if op == "sum" else x
    if op == "max":
        return x.amax(dim=dim, keepdim=True) if x.numel() else x.sum(dim=dim, keepdim=True) - float("inf")
    out = x.sum(dim=dim, keepdim=True, dtype=torch.float64)
    return (out / length if op == "mean" else out).to(x.dtype)


def _tensor_sum(x, like: torch.Tensor) -> torch.Tensor:
    # float64 accumulation, as the fused kernels: sums of a billion float32 terms keep their digits
    return torch.sum(_full(x, like), dtype=torch.float64)


def _tensor_max(x, like: torch.Tensor) -> torch.Tensor:
    if like.numel() == 0:
        return torch.tensor(float("-inf"), dtype=like.dtype, device=like.device)
    return torch.amax(_full(x, like))


def _relational(op):
    def apply(lhs, rhs):
        if isinstance(lhs, float):
            lhs = torch.tensor(lhs, dtype=torch.float64)
        return op(lhs, rhs)
    return apply


_FUNCTIONS = (
    (ir.NonFinite, "nonfinite"), (sympy.Abs, "abs"), (sympy.sign, "sign"), (sympy.exp, "exp"), (sympy.log, "log"),
    (sympy.Min, "min"), (sympy.Max, "max"),
    (sympy.StrictGreaterThan, "gt"), (sympy.GreaterThan, "ge"), (sympy.StrictLessThan, "lt"),
    (sympy.LessThan, "le"), (sympy.Equality, "eq"), (sympy.Unequality, "ne"),
)

_OPS = {
    "add": lambda *xs: _reduce(operator.add, xs),
    "mul": lambda *xs: _reduce(operator.mul, xs),
    "div": operator.truediv,
    "pow": _pow,
    "where": torch.where,
    "sum_rows": lambda x, like: _reduce_dim("sum", x, -1, like),
    "sum_blocks": lambda x, like: _reduce_dim("sum", x, -1, like),  # in the (n_blocks, block_numel) view
    "sum_cols": lambda x, like: _reduce_dim("sum", x, -2, like),
    "max_rows": lambda x, like: _reduce_dim("max", x, -1, like),
    "max_blocks": lambda x, like: _reduce_dim("max", x, -1, like),  # in the (n_blocks, block_numel) view
    "max_cols": lambda x, like: _reduce_dim("max", x, -2, like),
    "mean_rows": lambda x, like: _reduce_dim("mean", x, -1, like),
    "mean_blocks": lambda x, like: _reduce_dim("mean", x, -1, like),  # in the (n_blocks, block_numel) view
    "mean_cols": lambda x, like: _reduce_dim("mean", x, -2, like),
    "sum_tensor": lambda x, like: _tensor_sum(x, like),
    "max_tensor": lambda x, like: _tensor_max(x, like),
    "abs": torch.abs,
    "sign": torch.sign,
    "nonfinite": lambda x: (~torch.isfinite(x)).to(x.dtype) if isinstance(x, torch.Tensor) else float(not math.isfinite(x)),
    "exp": torch.exp,
    "log": torch.log,
    "min": lambda *xs: _reduce(_min, xs),
    "max": lambda *xs: _reduce(_max, xs),
    "gt": _relational(operator.gt),
    "ge": _relational(operator.ge),
    "lt": _relational(operator.lt),
    "le": _relational(operator.le),
    "eq": _relational(operator.eq),
    "ne": _relational(operator.ne),
}


@functools.lru_cache(maxsize=None)
def compile_program(program: ir.Program) -> Compiled:
    """The program as straight-line code, node by node as written, and (``grouped``) with its
    per-tensor scalar factors grouped as the kernels group them (passes.hoist_scalars)."""
    naive = _compile(program, program.updates)
    scalars, updates = passes.hoist_scalars(program)
    return naive._replace(grouped=_compile(program, updates, scalars)) if scalars else naive


def _compile(program: ir.Program, updates, scalars=()) -> Compiled:
    flat = _Flattener()
    for sym, expr in scalars:  # a hoisted symbol reads its expression's slot
        flat.slots[sym] = flat(expr)
    outputs = tuple((target, flat(expr)) for target, expr in updates)
    skip = flat(program.skip_when) if program.skip_when is not None else None
    return Compiled(program, tuple(flat.code), outputs, tuple(flat.groups), skip)


def _run(code: tuple, env: dict) -> dict:
    for op, out, args in code:
        env[out] = _OPS[op](*[env[a] if isinstance(a, str) else a for a in args])
    return env


def _value(env: dict, slot):
    return env[slot] if isinstance(slot, str) else slot


def writable(t: torch.Tensor) -> torch.Tensor:
    """``t``, or for a 0-d tensor a one-element view of it, to write a step's result into. A compiled
    step that writes a 0-d float64 CPU tensor in place loses the write (seen with torch 2.13 under
    aot_eager and inductor: a float64 scalar parameter, or a per-tensor state of float64
    parameters); through a view it lands."""
    return t.view(1) if t.dim() == 0 else t


class Flat(NamedTuple):
    """Sympy expressions flattened into straight-line code (as :class:`Compiled`): running it needs no
    sympy, so ``torch.compile`` traces it."""

    code: tuple[tuple[str, str, tuple], ...]
    slots: tuple  # the slot (or Python float) holding each expression's value


def flatten(exprs) -> Flat:
    """``exprs`` (sympy) as a :class:`Flat`, for :func:`run` (built once, before any step)."""
    flat = _Flattener()
    slots = tuple(flat(e) for e in exprs)
    return Flat(tuple(flat.code), slots)


def run(flat: Flat, env: dict) -> list:
    """The values of a :class:`Flat`'s expressions over the names in ``env`` (not modified)."""
    env = _run(flat.code, dict(env))
    return [_value(env, s) for s in flat.slots]


def evaluate(exprs, env: dict) -> list:
    """The values of sympy expressions over the names in ``env``, walked node by node as a program's
    updates are (for interpreters of other rule forms, such as fusedopt.window_reference)."""
    return run(flatten(exprs), env)


def state_shape(spec: ir.StateSpec, param_shape, view: tuple[int, int] | None = None) -> tuple[int, ...]:
    """The shape a state of this layout has for a parameter of ``param_shape`` (``view``: the
    parameter's (n_blocks, block_numel) block view, for the "blocks" layout)."""
    if spec.layout == "blocks":
        if view is None:
            raise ValueError(f"state '{spec.name}' has the blocks layout, which needs a partition of the "
                             "parameter (use fusedopt.AdamMini, or an optimizer that provides block views)")
        return (view[0], 1)
    if spec.layout == "tensor":
        return ()
    shape = list(param_shape)
    if spec.layout == "rows":
        shape[-1] = 1
    elif spec.layout == "cols":
        shape[-2] = 1
    return tuple(shape)


def storage_shapes(program: ir.Program, param: torch.Tensor,
                   view: tuple[int, int] | None = None) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of every tensor kept for ``param`` (see ``Program.storage_names``)."""
    out = {}
    for spec in program.states:
        shape = state_shape(spec, param.shape, view)
        if spec.quantized:
            shape = quant.codes_shape(shape, spec.dtype)
        out[spec.name] = (shape, storage_dtype(spec.dtype, param.dtype))
        if spec.quantized:
            fmt = quant.format_for(spec.dtype)
            out[spec.name + ir.ABSMAX_SUFFIX] = ((-(-param.numel() // fmt.block),), fmt.scale_dtype)
    return out


def init_state(program: ir.Program, param: torch.Tensor, grad: torch.Tensor,
               view: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """Fresh states for one parameter, in their storage dtypes, on the parameter's device."""
    out = {}
    for spec in program.states:
        if spec.quantized:
            dense = torch.zeros_like(param, dtype=torch.float32) if spec.init == "zeros" else \
                (param if spec.init == "p" else grad).detach().to(torch.float32)
            codes, absmax = quant.encode_state(dense, spec.dtype, signed=not spec.nonnegative)
            out[spec.name], out[spec.name + ir.ABSMAX_SUFFIX] = codes.contiguous(), absmax
            continue
        dtype = storage_dtype(spec.dtype, param.dtype)
        if spec.layout != "full":
            out[spec.name] = torch.zeros(state_shape(spec, param.shape, view), dtype=dtype, device=param.device)
        elif spec.init == "zeros":
            out[spec.name] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
        else:
            src = param if spec.init == "p" else grad
            out[spec.name] = src.detach().to(dtype=dtype, copy=True)
    return out


def step(
    program: ir.Program | Compiled,
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    states: Mapping[str, Sequence[torch.Tensor]],
    steps: Sequence[torch.Tensor],
    hparams: Mapping[str, torch.Tensor],
    compute_dtype: torch.dtype = torch.float32,
    views: Sequence[tuple[int, int] | None] | None = None,
) -> None:
    """One optimizer step over every tensor, in place: each step counter += 1, then the update.

    ``views``: per tensor, the (n_blocks, block_numel) view its full-size tensors take for block
    layouts and reductions (None: the tensor's own shape)."""
    compiled = program if isinstance(program, Compiled) else compile_program(program)
    if compute_dtype != torch.float64 and compiled.grouped is not None:
        compiled = compiled.grouped
    full = {s.name for s in compiled.program.states if s.layout == "full"}
    quantized = {s.name: s for s in compiled.program.states if s.quantized}
    envs = []
    for i, (p, g) in enumerate(zip(params, grads)):
        steps[i].add_(1)
        view = views[i] if views is not None else None

        def load(x: torch.Tensor, is_full: bool = True) -> torch.Tensor:
            if is_full and x.dim() == 0:  # a 0-d float32 value beside the 0-d float64 hyperparameters
                x = x.reshape(1)          # would be promoted to float64; a 1-d one stays float32
            return (x.reshape(view) if view is not None and is_full else x).to(compute_dtype)

        env: dict[str, object] = dict(hparams)
        env[ir.STEP] = steps[i].to(torch.float64) if compute_dtype == torch.float64 else steps[i]
        # a float64 tensor, as the kernels' float64 scalar: per-tensor factors of it (1 / numel, hoisted
        # as the kernels hoist them) divide as IEEE does for an empty tensor, where Python raises
        env[ir.NUMEL] = torch.tensor(float(p.numel()), dtype=torch.float64, device=p.device)
        env[ir.PARAM] = load(p)
        env[ir.GRAD] = load(g)
        for spec in compiled.program.states:
            stored = states[spec.name][i]
            if spec.quantized:
                stored = quant.decode_state(stored, states[spec.name + ir.ABSMAX_SUFFIX][i], spec.dtype,
                                            signed=not spec.nonnegative, shape=p.shape)
            env[spec.name] = load(stored, spec.name in full)
        envs.append(env)
    for slot, op, code, arg in compiled.groups:  # one value over every tensor of the call
        reduce = _tensor_sum if op == "sum" else _tensor_max
        parts = [reduce(_value(_run(code, dict(env)), arg), env[ir.PARAM]) for env in envs]
        if parts:
            total = torch.stack(parts).sum() if op == "sum" else torch.stack(parts).amax()
            for env in envs:
                env[slot] = total
    for i, (p, env) in enumerate(zip(params, envs)):
        env = _run(compiled.code, env)
        # an output that is an unchanged input must not see another output's write
        values = [env[s].clone() if isinstance(s, str) and not s.startswith("%") else _value(env, s)
                  for _, s in compiled.outputs]
        for (target, _), value in zip(compiled.outputs, values):
            dest = writable(p if target == ir.PARAM else states[target][i])
            spec = quantized.get(target)
            if spec is not None:  # blockwise: codes and absmax from the new float32 value
                dense = value if isinstance(value, torch.Tensor) else torch.tensor(value)
                dense = dense.to(torch.float32)
                dense = dense.reshape(p.shape) if dense.numel() == p.numel() else dense.expand(p.shape)
                codes, absmax = quant.encode_state(dense.reshape(p.shape), spec.dtype, not spec.nonnegative)
                if compiled.skip is not None:  # a skipped step keeps the codes (re-encoding may move them)
                    skip = torch.as_tensor(_value(env, compiled.skip) != 0, device=dest.device)
                    codes = torch.where(skip, dest.reshape(codes.shape), codes)
                    absmax = torch.where(skip, states[target + ir.ABSMAX_SUFFIX][i], absmax)
                dest.copy_(codes.reshape(dest.shape))
                states[target + ir.ABSMAX_SUFFIX][i].copy_(absmax)
                continue
            rounds = compiled.program.stochastic_rounding and dest.dtype in rounding.STOCHASTIC_DTYPES
            if target == ir.PARAM and rounds:
                dense = torch.as_tensor(value, dtype=torch.float32, device=dest.device)
                dense = dense.reshape(dest.shape) if dense.numel() == dest.numel() else dense.expand(dest.shape)
                # seed and step as int64 tensors: a compiled step reads them, rather than baking in
                # their values (a seed written by hand would recompile)
                seed = torch.as_tensor(env[ir.SR_SEED]).to(torch.int64)
                dest.copy_(rounding.to_stochastic(dense, dest.dtype, seed, steps[i].to(torch.int64)))
                continue
            if isinstance(value, torch.Tensor):
                if value.dim() and value.shape != dest.shape and value.numel() == dest.numel():
                    value = value.reshape(dest.shape)  # computed in a block view
                dest.copy_(value)
            else:
                dest.fill_(value)
        if compiled.skip is not None:  # a skipped step does not count
            steps[i].sub_(torch.as_tensor(_value(env, compiled.skip) != 0, dtype=steps[i].dtype))
