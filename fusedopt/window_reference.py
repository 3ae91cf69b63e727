"""The eager interpreter of rules with a window: the oracle of their fused kernel, and the backend that
runs them where that kernel does not (CPU, float64 parameters, settings the kernel lacks).

One parameter at a time, flat, in the compute dtype (float32; float64 for float64 parameters), in the
order the rule's semantics fix: the step number is ``t = count + 1``; the score and the pushed value
are computed from the old states (per-tensor scalar subexpressions, such as bias corrections, first
and in float64, as :func:`fusedopt.passes.lower` hoists them for the kernel);
:func:`fusedopt.sparse.block_topk` selects each block's top-k of ``|score|`` (ties to the lower
index); the pushed values go to ring row ``(t - 1) mod m``; the window sums are rebuilt from every
written row (:func:`fusedopt.sparse.window_sum`, ``beta ** age`` in float64); then the parameter (bf16
and fp16 ones of a program with stochastic rounding rounded as :func:`fusedopt.rounding.to_stochastic`)
and the other states get their new values, and the counter advances. A program that skips
non-finite steps computes all of this and, where its flag is nonzero, writes the old values back and
leaves the counter (no tensor is read on the host, so a compiled step traces it). q4minmax states
decode and encode with :func:`fusedopt.sparse.ef_decode` and :func:`fusedopt.sparse.ef_encode`.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from . import ir, reference, rounding, sparse
from .dtypes import storage_dtype
from .window_passes import KEPT, PUSH, SCORE, WindowSumSpec, lower_window


def compute_dtype(param_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def storage_shapes(program: ir.Program, numel: int, param_shape, param_dtype: torch.dtype):
    """``{storage name: (shape, dtype)}`` of every tensor kept for one parameter (nothing allocated)."""
    out = {}
    for spec in program.states:
        if spec.layout == "window":
            k = sparse.topk_layout(numel, spec.block, spec.density).k
            index, value = spec.storage
            out[index] = ((spec.m, k), torch.int16)
            out[value] = ((spec.m, k), storage_dtype(spec.dtype, param_dtype))
        elif spec.dtype in ir.MINMAX_BITS:
            codes, lo, hi = spec.storage
            nq = math.ceil(numel / spec.block)
            out[codes] = (((numel + 1) // 2 if ir.MINMAX_BITS[spec.dtype] == 4 else numel,), torch.uint8)
            out[lo] = ((nq,), torch.bfloat16)
            out[hi] = ((nq,), torch.bfloat16)
        else:
            out[spec.name] = (tuple(param_shape), storage_dtype(spec.dtype, param_dtype))
    return out


def state_bytes(program: ir.Program, numel: int) -> int:
    """Bytes of state one parameter of ``numel`` elements keeps (float32 parameters), counted."""
    shapes = storage_shapes(program, numel, (numel,), torch.float32)
    return sum(math.prod(shape) * torch.empty((), dtype=dtype).element_size() for shape, dtype in shapes.values())


def init_state(program: ir.Program, param: torch.Tensor) -> dict[str, torch.Tensor]:
    """Fresh states for ``param``: zeros, or a copy of p for a state declared with init="p"."""
    out = {}
    for name, (shape, dtype) in storage_shapes(program, param.numel(), param.shape, param.dtype).items():
        spec = next((s for s in program.states if s.name == name), None)
        if spec is not None and spec.init == "p":
            out[name] = param.detach().to(dtype=dtype, copy=True)
        else:
            out[name] = torch.zeros(shape, dtype=dtype, device=param.device)
    return out


def _flat(x, numel: int, dtype: torch.dtype, device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(dtype).expand(numel) if x.numel() == 1 else x.reshape(numel).to(dtype)
    return torch.full((numel,), x, dtype=dtype, device=device)


class WindowPlan(NamedTuple):
    """A window program's expressions flattened for :func:`step` (see :func:`plan`)."""

    skip: reference.Flat | None  # Program.skip_when
    scalar_names: tuple[str, ...]
    scalars: reference.Flat  # the per-tensor scalars, float64
    score_push: reference.Flat  # the top-k score and the pushed value
    sums: tuple[WindowSumSpec, ...]
    betas: reference.Flat  # each window sum's decay
    targets: tuple[str, ...]  # what the rest updates: p and the states beside the window
    updates: reference.Flat


@functools.lru_cache(maxsize=None)
def plan(program: ir.Program) -> WindowPlan:
    """``program`` lowered (:func:`fusedopt.window_passes.lower_window`) and flattened: everything a step
    reads, so that the step itself makes no sympy object (a compiled step cannot)."""
    low = lower_window(program)
    updates = dict(low.updates)
    targets = tuple(t for t, _ in low.updates if t not in (SCORE, PUSH))
    skip = None if program.skip_when is None else reference.flatten([program.skip_when])
    return WindowPlan(skip, tuple(n for n, _ in low.scalars), reference.flatten([e for _, e in low.scalars]),
                      reference.flatten([updates[SCORE], updates[PUSH]]),
                      low.sums, reference.flatten([s.beta for s in low.sums]), targets,
                      reference.flatten([updates[t] for t in targets]))


def step(program: ir.Program, param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor],
         count: torch.Tensor, hparams: dict[str, float | torch.Tensor], flat: WindowPlan | None = None) -> None:
    """One step of ``param`` in place (its states in ``state``, its int64 step counter ``count``).

    ``flat``: ``plan(program)``, passed by a caller that built it beforehand (a compiled step cannot
    build it: lowering makes sympy objects). The step never reads a tensor's value on the host, so
    ``torch.compile(fullgraph=True)`` traces it: the step number stays a tensor, the window sums
    weigh all ``m`` rows (0 for rows not written yet) and a skipped step computes the new values and
    then keeps the old ones."""
    flat = plan(program) if flat is None else flat
    w = program.window
    d = param.numel()
    cd = compute_dtype(param.dtype)
    env: dict[str, object] = {k: torch.as_tensor(v, dtype=torch.float64, device=param.device).reshape(())
                              for k, v in hparams.items()}
    skip = None  # a non-finite gradient in the group: nothing changes, the step does not count
    if flat.skip is not None:
        skip = reference.run(flat.skip, env)[0] != 0

    def kept(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        return new if skip is None else torch.where(skip, old, new)

    t = count.to(torch.int64) + 1  # this step's number, on count's device
    env[ir.STEP] = t.to(dtype=torch.float64, device=param.device)
    env[ir.NUMEL] = float(d)
    env[ir.PARAM] = param.detach().reshape(-1).to(cd)
    env[ir.GRAD] = grad.detach().reshape(-1).to(cd)
    for spec in program.states:
        if spec.dtype in ir.MINMAX_BITS:
            codes, lo, hi = (state[n] for n in spec.storage)
            env[spec.name] = sparse.ef_decode(codes, lo, hi, spec.block, d, ir.MINMAX_BITS[spec.dtype]).to(cd)
        elif spec.layout != "window":
            env[spec.name] = state[spec.name].reshape(-1).to(cd)

    env.update(zip(flat.scalar_names, reference.run(flat.scalars, env)))  # per-tensor scalars, float64
    score, value = (_flat(x, d, cd, param.device) for x in reference.run(flat.score_push, env))
    layout = sparse.topk_layout(d, w.block, w.density)
    index, _ = sparse.block_topk(score, w.block, w.density)
    position = sparse.column_block_starts(layout, param.device) + index.to(torch.int64)
    w_index, w_value = (state[n] for n in w.storage)
    row = ((t - 1) % w.m).to(w_index.device).reshape(1)  # sparse.window_row
    w_index.index_copy_(0, row, kept(w_index.index_select(0, row), index.reshape(1, -1)))
    w_value.index_copy_(0, row, kept(w_value.index_select(0, row), value[position].to(w_value.dtype).reshape(1, -1)))

    kept_mask = torch.zeros(d, dtype=cd, device=param.device)
    kept_mask[position] = 1.0
    env[KEPT] = kept_mask
    step_number = t.to(param.device)
    for s, beta in zip(flat.sums, reference.run(flat.betas, env)):
        env[s.name] = sparse.window_sum(w_index, w_value, step_number, layout, beta, s.power, cd)

    for target, new in zip(flat.targets, reference.run(flat.updates, env)):
        new = _flat(new, d, cd, param.device)
        if target == ir.PARAM:
            if program.stochastic_rounding and param.dtype in rounding.STOCHASTIC_DTYPES:
                new = rounding.to_stochastic(new, param.dtype, env[ir.SR_SEED].to(torch.int64), step_number)
            dest = reference.writable(param)
            dest.copy_(kept(dest, new.view_as(dest).to(dest.dtype)))
            continue
        spec = next(s for s in program.states if s.name == target)
        if spec.dtype in ir.MINMAX_BITS:
            for name, part in zip(spec.storage, sparse.ef_encode(new, spec.block, ir.MINMAX_BITS[spec.dtype])):
                state[name].copy_(kept(state[name], part))
        else:
            dest = reference.writable(state[target])
            dest.copy_(kept(dest, new.view_as(dest).to(dest.dtype)))
    count.add_(1 if skip is None else (~skip).to(count.dtype).to(count.device))
