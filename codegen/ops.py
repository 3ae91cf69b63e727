"""The torch.library custom op that runs a fused optimizer step: ``fusedopt::fused_step``.

The op is opaque to torch.compile (it builds pointer tables from real addresses, which fake
tensors do not have); ``mutates_args`` names the parameters, states and step counters, so the
compiler functionalizes the call and re-inplaces it: the compiled graph holds no copies.

A program travels through the op as the key of its lowered form, registered here before the call.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from fusedopt import ir, quant
from fusedopt.passes import Lowered, lower

from . import cache, config, launch
from .template import QUANT_BUCKET_BITS, KernelSpec, TORCH_TO_NAME, render, single_pass_possible

_PROGRAMS: dict[str, Lowered] = {}
_PLANS = launch.PlanCache()


@functools.lru_cache(maxsize=None)
def lowered(program: ir.Program) -> Lowered:
    return lower(program)


def target_for(device: torch.device) -> str:
    if device.type == "cuda" and not config.interpreting():
        return "cuda"
    if device.type == "cpu" and config.interpreting():
        return "interpreter"
    raise RuntimeError(f"the triton backend needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set "
                       f"before triton is imported), got a tensor on {device}; use backend='reference'")


def dtype_name(dtype: torch.dtype) -> str:
    return TORCH_TO_NAME[str(dtype)]


def kernel_spec(program: ir.Program, param_dtype: torch.dtype, grad_dtype: torch.dtype, target: str) -> KernelSpec:
    return KernelSpec(lowered(program), dtype_name(param_dtype), dtype_name(grad_dtype), target)


@functools.lru_cache(maxsize=None)
def source(spec: KernelSpec) -> str:
    return render(spec)


@torch.library.custom_op("fusedopt::fused_step", mutates_args=("params", "states", "steps"))
def fused_step(
    program_key: str,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[torch.Tensor],
    steps: list[torch.Tensor],
    hparams: list[torch.Tensor],
) -> None:
    """One step of the registered program over every tensor; states are listed state-major."""
    _launch(program_key, params, grads, states, steps, hparams)


def _launch(program_key, params, grads, states, steps, hparams) -> None:
    launch.run(_kernels(program_key, params, grads, states, steps, hparams)[0])


@functools.lru_cache(maxsize=None)
def _quant_tables(device: torch.device) -> tuple[torch.Tensor, ...]:
    """In template.QUANT_TABLES order: per map (q8 signed and unsigned, then q4) its values
    (float32) and its encoder's bucket table (bucket_table). Kept for the life of the process, read
    by kernels through the hyperparameter table."""
    out = []
    for signed in (True, False):
        code = quant.Q8.code(signed)
        out += [code.to(device), bucket_table(code).to(device)]
    for signed in (True, False):
        code = quant.Q4.code(signed)
        out += [code.to(device), bucket_table(code).to(device)]
    return tuple(out)


def bucket_table(code: torch.Tensor) -> torch.Tensor:
    """The encoder table of a q8 or q4 map (see template._q8_store_source), int32, one entry per bucket of
    float32 values: the values sharing their top QUANT_BUCKET_BITS bits ``h`` (sign, exponent, leading
    mantissa bits), an interval from ``h << shift`` up for a positive sign, down to ``(h << shift) |
    (2**shift - 1)`` for a negative one. An entry holds, in its low 8 bits, how many of the map's
    midpoints lie below the bucket's smallest value, and above them the low ``shift`` bits of the one
    midpoint (rounded down to float32) that may lie inside the bucket: for a positive sign as they are,
    so that a value inside is above it exactly when its own low bits are larger; for a negative sign
    complemented, so that the same comparison of complemented low bits holds. A bucket without a
    midpoint holds all ones there, which no value's low bits exceed. Raises when a bucket holds more
    than one midpoint (the kernel makes one comparison)."""
    shift = 32 - QUANT_BUCKET_BITS
    ones = (1 << shift) - 1
    midpoints, below_f32 = quant.midpoints(code), quant.midpoints_below_f32(code)
    top = torch.arange(2**QUANT_BUCKET_BITS, dtype=torch.int64)
    negative = top >= 2 ** (QUANT_BUCKET_BITS - 1)
    smallest_bits = torch.where(negative, (top << shift) | ones, top << shift)
    smallest = torch.where(smallest_bits >= 2**31, smallest_bits - 2**32, smallest_bits).to(torch.int32)
    smallest = smallest.view(torch.float32).double()
    finite = torch.isfinite(smallest)
    base = torch.searchsorted(midpoints, torch.where(finite, smallest, torch.zeros_like(smallest)))
    # in value order (negative buckets from the most negative up, then the positive ones), the next
    # bucket's count minus this one's is how many midpoints this bucket holds
    order = torch.cat([negative.nonzero().flatten().flip(0), (~negative).nonzero().flatten()])
    held = torch.zeros_like(base)
    both = finite[order[1:]] & finite[order[:-1]]
    held[order[:-1]] = torch.where(both, base[order[1:]] - base[order[:-1]], 0)
    if int(held.max()) > 1:
        raise AssertionError("a quantization map has more midpoints per bucket than the kernel compares")
    inside = held == 1
    mid_bits = below_f32.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    mid_bits = mid_bits[base.clamp(max=len(below_f32) - 1)]
    if not bool(((mid_bits >> shift) == top)[inside].all()):
        raise AssertionError("a midpoint rounded down to float32 left its bucket")
    low = torch.where(negative, ~mid_bits & ones, mid_bits & ones)
    low = torch.where(inside, low, torch.full_like(low, ones))
    return (base | (low << 8)).to(torch.int32)


def _kernels(program_key, params, grads, states, steps, hparams, private: bool = False):
    """(module, spec, plan) per dtype signature, pointer tables refreshed; and each one's tensor
    indices. ``private``: new plans that no other call shares (an EagerStep relies on its tables
    holding what it last wrote)."""
    low = _PROGRAMS[program_key]
    n = len(params)
    n_states = len(low.program.storage_names)
    if len(grads) != n or len(steps) != n or len(states) != n * n_states or len(hparams) != len(low.program.hparams):
        raise ValueError(f"fused_step: {n} params need {n} grads, {n * n_states} states, {n} steps and "
                         f"{len(low.program.hparams)} hparams; got {len(grads)}, {len(states)}, {len(steps)}, "
                         f"{len(hparams)}")
    if n == 0:
        return [], []
    by_signature: dict[tuple[torch.dtype, torch.dtype, torch.device], list[int]] = {}
    for i, (p, g) in enumerate(zip(params, grads)):
        by_signature.setdefault((p.dtype, g.dtype, p.device), []).append(i)
    if low.program.has_group_reductions and len({device for _, _, device in by_signature}) > 1:
        raise ValueError(f"rule '{low.program.name}' reduces over the whole group, whose tensors lie on "
                         f"{sorted(str(d) for d in {p.device for p in params})}; put a group on one device")
    hp_pointers = [h.data_ptr() for h in hparams]
    if low.program.has_quantized_states:
        hp_pointers += [t.data_ptr() for t in _quant_tables(params[0].device)]
    parts = []  # (spec, the tensors it steps, their geometry)
    for (p_dtype, g_dtype, device), idx in by_signature.items():
        spec = KernelSpec(low, dtype_name(p_dtype), dtype_name(g_dtype), target_for(device))
        geometry = [_geometry(low.program, params[i], [states[k * n + i] for k in range(n_states)]) for i in idx] \
            if low.program.has_small_layouts else [None] * len(idx)
        # tensors whose rows each lie in one chunk take every phase in one kernel
        chunk = launch.chunk_elements(spec.target)
        one_pass = [j for j, g in enumerate(geometry) if g is not None and chunk % g[0] == 0] \
            if single_pass_possible(low) else []
        if one_pass:
            parts.append((dataclasses.replace(spec, single_pass=True), [idx[j] for j in one_pass],
                          [geometry[j] for j in one_pass]))
        rest = [j for j in range(len(idx)) if j not in set(one_pass)]
        if rest:
            parts.append((spec, [idx[j] for j in rest], [geometry[j] for j in rest]))
    kernels = []
    for spec, idx, geometry in parts:
        device = params[idx[0]].device
        module = cache.load(source(spec), device)
        pointers = []
        for i in idx:
            pointers += [params[i].data_ptr(), grads[i].data_ptr()]
            pointers += [states[k * n + i].data_ptr() for k in range(n_states)]
            pointers.append(steps[i].data_ptr())
        numels = [params[i].numel() for i in idx]
        geometry = geometry if low.program.has_small_layouts else None
        # by address and size: a new tensor at a freed one's address needs its own chunk tables
        key = (program_key, spec, device, tuple(pointers[:: len(spec.columns)]), tuple(numels), tuple(geometry or ()))
        make = lambda: launch.Plan(spec, numels, len(hp_pointers), device, geometry)  # noqa: E731
        plan = make() if private else _PLANS.get(key, make)
        plan.refresh(pointers, hp_pointers)
        kernels.append((module, spec, plan))
    return kernels, [idx for _, idx, _ in parts]


def _geometry(program: ir.Program, param: torch.Tensor, states: list[torch.Tensor]) -> tuple[int, int]:
    """(elements per row, elements per matrix) of a tensor: its last dim and last two dims (a vector
    is one row), or for a rule with per-block states the block size of the partition, which the
    per-block state's length gives. Checks that every per-row (column, block) state fits, since a
    kernel indexes them without bounds. ``states``: the tensor's storage, in
    ``program.storage_names`` order (a quantized state's scales follow it)."""
    numel = param.numel()
    shape = tuple(param.shape)
    stored = dict(zip(program.storage_names, states))  # a quantized state also stores its scales
    states = [stored[s.name] for s in program.states]
    blocks = [t for s, t in zip(program.states, states) if s.layout == "blocks"]
    if blocks:
        n_blocks = blocks[0].numel()
        if (n_blocks == 0) != (numel == 0) or (numel and numel % n_blocks):
            raise ValueError(f"rule '{program.name}': a parameter of shape {shape} cannot be split into "
                             f"{n_blocks} equal blocks (its per-block state's length); its partition must "
                             "divide it into equal blocks (see fusedopt.partition.Blocks)")
        per_row = numel // n_blocks if n_blocks else 1
        per_matrix = max(numel, 1)
    else:
        per_row = shape[-1] if len(shape) >= 1 else 1
        per_matrix = per_row * (shape[-2] if len(shape) >= 2 else 1)
        per_row, per_matrix = max(per_row, 1), max(per_matrix, 1)
    for spec, t in zip(program.states, states):
        if spec.layout != "full":
            cells = launch.layout_cells(spec.layout, numel, per_row, per_matrix)
            if t.numel() != cells or not t.is_contiguous():
                raise ValueError(f"rule '{program.name}': state '{spec.name}' of a parameter of shape {shape} "
                                 f"has shape {tuple(t.shape)}; its '{spec.layout}' layout needs {cells} "
                                 "contiguous values: load a checkpoint of the same rule, or make the state "
                                 "contiguous")
    return per_row, per_matrix


class EagerStep:
    """An eager fused step bound to one list of tensors, for front ends that call it every step.

    Built once (what :func:`step` does per call: grouping by dtype, pointer tables), then
    :meth:`run` launches again with only the gradients' addresses compared, so a step over ~150
    tensors costs little more than the launches. The caller guarantees that params, states, steps
    and hparams are the same tensors, at the same addresses, as when it was built, and that new
    gradients have the dtype, shape and layout of the ones it was built with.
    """

    def __init__(self, program_key: str, params, grads, states, steps, hparams):
        self.kernels, self.indices = _kernels(program_key, params, grads, states, steps, hparams, private=True)
        self.grad_pointers = [g.data_ptr() for g in grads]
        self.written = [*params, *states, *steps]

    def run(self, grads: list[torch.Tensor] | None = None) -> None:
        """Launch; ``grads``: new gradient tensors (None: the same ones as last time)."""
        if grads is not None:
            pointers = [g.data_ptr() for g in grads]
            if pointers != self.grad_pointers:
                for (_, spec, plan), idx in zip(self.kernels, self.indices):
                    table = list(plan.pointers)
                    n_cols = len(spec.columns)
                    for row, i in enumerate(idx):
                        table[row * n_cols + 1] = pointers[i]
                    plan.refresh(table, plan.hp_pointers)
                self.grad_pointers = pointers
        if self.kernels:
            launch.run(self.kernels)
        _bump_versions(self.written)


def step(program_key: str, params: list[torch.Tensor], grads: list[torch.Tensor], states: list[torch.Tensor],
         steps: list[torch.Tensor], hparams: list[torch.Tensor]) -> None:
    """What the front end calls. Traced by torch.compile it is the custom op; run eagerly it skips
    the dispatcher (its per-tensor bookkeeping is a large share of the host time of a step over
    ~150 tensors) and bumps the version counters of what it wrote, as the op would."""
    if torch.compiler.is_compiling():
        fused_step(program_key, params, grads, states, steps, hparams)
        return
    _launch(program_key, params, grads, states, steps, hparams)
    _bump_versions(params + states + steps)


def _bump_versions(tensors: list[torch.Tensor]) -> None:
    try:
        torch.autograd.graph.increment_version(tensors)
    except TypeError:  # torch releases whose increment_version takes one tensor
        for t in tensors:
            torch.autograd.graph.increment_version(t)


@fused_step.register_fake
def _fused_step_fake(program_key, params, grads, states, steps, hparams) -> None:
    return None


def register(program: ir.Program) -> str:
    """Lower ``program`` and make it callable through fused_step; returns its key. Call eagerly."""
    low = lowered(program)
    key = low.key()
    _PROGRAMS[key] = low
    return key
