"""The eager interpreter of rules with a window: the oracle of their fused kernel, and the backend that
runs them where that kernel does not (CPU, float64 parameters, settings the kernel lacks).

One parameter at a time, flat, in the compute dtype (float32; float64 for float64 parameters), in the
order the rule's semantics fix: the step counter advances; the score and the pushed value are
computed from the old states (per-tensor scalar subexpressions, such as bias corrections, first and
in float64, as :func:`fusedopt.passes.lower` hoists them for the kernel); :func:`fusedopt.sparse.block_topk` selects each block's top-k of
``|score|`` (ties to the lower index); the pushed values go to ring row ``(t - 1) mod m``; the window
sums are rebuilt from every written row (:func:`fusedopt.sparse.window_sum`, ``beta ** age`` on the host
in float64); then the parameter (bf16 and fp16 ones of a program with stochastic rounding rounded as
:func:`fusedopt.rounding.to_stochastic`) and the other states get their new values. A program
that skips non-finite steps returns before any of this when its flag is nonzero. q4minmax states decode and
encode with :func:`fusedopt.sparse.ef_decode` and :func:`fusedopt.sparse.ef_encode`.
"""

from __future__ import annotations

import math

import torch

from . import ir, reference, rounding, sparse
from .dtypes import storage_dtype
from .window_passes import KEPT, PUSH, SCORE, lower_window


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


def step(program: ir.Program, param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor],
         count: torch.Tensor, hparams: dict[str, float | torch.Tensor]) -> None:
    """One step of ``param`` in place (its states in ``state``, its int64 step counter ``count``)."""
    low = lower_window(program)
    w = program.window
    d = param.numel()
    cd = compute_dtype(param.dtype)
    env: dict[str, object] = {k: torch.as_tensor(v, dtype=torch.float64, device=param.device).reshape(())
                              for k, v in hparams.items()}
    if program.skip_when is not None and bool(reference.evaluate([program.skip_when], dict(env))[0] != 0):
        return  # a non-finite gradient in the group: nothing changes, the step does not count
    count += 1
    t = int(count)
    env[ir.STEP] = torch.tensor(float(t), dtype=torch.float64, device=param.device)
    env[ir.NUMEL] = float(d)
    env[ir.PARAM] = param.detach().reshape(-1).to(cd)
    env[ir.GRAD] = grad.detach().reshape(-1).to(cd)
    for spec in program.states:
        if spec.dtype in ir.MINMAX_BITS:
            codes, lo, hi = (state[n] for n in spec.storage)
            env[spec.name] = sparse.ef_decode(codes, lo, hi, spec.block, d, ir.MINMAX_BITS[spec.dtype]).to(cd)
        elif spec.layout != "window":
            env[spec.name] = state[spec.name].reshape(-1).to(cd)

    names = [n for n, _ in low.scalars]
    env.update(zip(names, reference.evaluate([e for _, e in low.scalars], dict(env))))  # per-tensor scalars, float64
    updates = dict(low.updates)
    score, value = (_flat(x, d, cd, param.device) for x in reference.evaluate([updates[SCORE], updates[PUSH]], dict(env)))
    layout = sparse.topk_layout(d, w.block, w.density)
    index, _ = sparse.block_topk(score, w.block, w.density)
    position = sparse.column_block_starts(layout, param.device) + index.to(torch.int64)
    w_index, w_value = (state[n] for n in w.storage)
    row = sparse.window_row(t, w.m)
    w_index[row] = index
    w_value[row] = value[position].to(w_value.dtype)

    kept = torch.zeros(d, dtype=cd, device=param.device)
    kept[position] = 1.0
    env[KEPT] = kept
    for s, beta in zip(low.sums, reference.evaluate([s.beta for s in low.sums], dict(env))):
        env[s.name] = sparse.window_sum(w_index, w_value, t, layout, float(beta), s.power, cd)

    targets = [t_ for t_, _ in low.updates if t_ not in (SCORE, PUSH)]
    values = reference.evaluate([updates[t_] for t_ in targets], env)
    for target, new in zip(targets, values):
        new = _flat(new, d, cd, param.device)
        if target == ir.PARAM:
            if program.stochastic_rounding and param.dtype in rounding.STOCHASTIC_DTYPES:
                new = rounding.to_stochastic(new, param.dtype, int(env[ir.SR_SEED]), t)
            dest = reference.writable(param)
            dest.copy_(new.view_as(dest))
            continue
        spec = next(s for s in program.states if s.name == target)
        if spec.dtype in ir.MINMAX_BITS:
            for name, part in zip(spec.storage, sparse.ef_encode(new, spec.block, ir.MINMAX_BITS[spec.dtype])):
                state[name].copy_(part)
        else:
            dest = reference.writable(state[target])
            dest.copy_(new.view_as(dest))
