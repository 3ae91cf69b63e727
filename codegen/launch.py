"""Host side of a launch: device tables built once per parameter list, then one launch per step.

A :class:`Plan` holds, on the device: the pointer table (one row per tensor: param, grad, each
state, step), the hyperparameter pointer table, element counts and the (tensor, chunk start) table.
Chunk tables depend only on the element counts and are built once. Pointers are compared with the
last uploaded ones every step (gradients are often new tensors after ``zero_grad(set_to_none=True)``,
though the caching allocator usually hands back the same addresses); when they differ the table is
rewritten through a pinned host buffer with a non-blocking copy, so a step never waits for the GPU.
"""

from __future__ import annotations

import collections
from typing import Sequence

import torch
import triton

from . import config
from .template import QUANT_BLOCK, KernelSpec, tiled_phases

# Elements per block and blocks per program. CUDA figures are untuned defaults; the interpreter
# uses small chunks so that tests cross chunk boundaries with small tensors.
# The interpreter has no warps; num_warps=1 gives it the CUDA default's 8 elements per thread
# (PER_THREAD, see constexprs), so it runs the same code paths.
_CONFIG = {"cuda": dict(BLOCK=1024, ITERS=4, ROWS=32, num_warps=4),
           "interpreter": dict(BLOCK=256, ITERS=2, ROWS=2, num_warps=1)}

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Argument types of every generated fused step and reduction-phase kernel (template.SIGNATURE), for
# compiling one ahead of time without a GPU (tests/cuda_ahead_of_time.py, benchmarks.kernel_profile).
KERNEL_SIGNATURE = {"ptrs": "*i64", "hparams": "*i64", "numels": "*i64", "chunk_tensor": "*i32",
                    "chunk_start": "*i64", "chunk_count": "*i32", "done": "*i32", "acc_tensor": "*fp64",
                    "acc_group": "*fp64", "group_done": "*i32", "n_programs": "i32", "geometry": "*i64",
                    "small_base": "*i64", "acc_small": "*fp64", "BLOCK": "constexpr", "ITERS": "constexpr",
                    "ROWS": "constexpr", "ALIGNED": "constexpr", "PER_THREAD": "constexpr"}

launches = collections.Counter()  # kernel launches by rule name, for tests and monitors


def config_for(target: str) -> dict[str, int]:
    cfg = dict(_CONFIG[target])
    if target == "cuda":
        cfg.update(config.launch_override())
    return cfg


def constexprs(cfg: dict[str, int], aligned: bool) -> dict[str, int | bool]:
    """The compile-time arguments of a generated kernel under launch configuration ``cfg``:
    PER_THREAD is how many consecutive elements of a block each thread holds."""
    return {"BLOCK": cfg["BLOCK"], "ITERS": cfg["ITERS"], "ROWS": cfg["ROWS"], "ALIGNED": aligned,
            "PER_THREAD": max(cfg["BLOCK"] // (32 * cfg["num_warps"]), 1)}


def chunk_elements(target: str) -> int:
    cfg = config_for(target)
    return cfg["BLOCK"] * cfg["ITERS"]


def _dense(t: torch.Tensor) -> bool:
    """True when the tensor's elements fill one contiguous block of memory (any dim order)."""
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def eligible(param: torch.Tensor, grad: torch.Tensor, states: Sequence[torch.Tensor], row_major: bool = False) -> bool:
    """Can the kernel update this tensor in place by flat indexing? (Otherwise: reference backend.)
    ``states``: the full-size ones. ``row_major``: the rule has per-row (column, block) values, which
    are found from an element's flat index in row-major order, so every tensor must be contiguous."""
    if param.dtype not in KERNEL_DTYPES or grad.dtype not in KERNEL_DTYPES:
        return False
    if row_major and not (param.is_contiguous() and grad.is_contiguous() and param.numel() > 0):
        return False  # (an empty matrix still has per-row or per-column states: the reference keeps them)
    if param.is_contiguous() and grad.is_contiguous() and all(t.is_contiguous() for t in states):
        return all(t.shape == param.shape and t.device == param.device for t in (grad, *states))
    if not _dense(param):
        return False
    return all(t.stride() == param.stride() and t.device == param.device and t.shape == param.shape
               for t in (grad, *states))


def _upload(dest: torch.Tensor, values: list[int]) -> None:
    host = torch.tensor(values, dtype=torch.int64).reshape(dest.shape)
    if dest.device.type == "cuda":
        # the caching host allocator keeps the pinned block alive until the copy has run
        dest.copy_(host.pin_memory(), non_blocking=True)
    else:
        dest.copy_(host)


class Plan:
    """Device tables for one parameter list and one kernel."""

    def __init__(self, spec: KernelSpec, numels: Sequence[int], n_hparams: int, device: torch.device,
                 geometry: Sequence[tuple[int, int]] | None = None):
        """``geometry``: per tensor (elements per row or block, elements per matrix), for rules
        with per-row, per-column or per-block values."""
        cfg = config_for(spec.target)
        chunk = cfg["BLOCK"] * cfg["ITERS"]
        if spec.lowered.program.has_quantized_states and cfg["BLOCK"] % QUANT_BLOCK:
            raise ValueError(f"rule '{spec.lowered.program.name}' has quantized states, which a program requantizes "
                             f"in whole blocks of {QUANT_BLOCK}: BLOCK={cfg['BLOCK']} must be a multiple of it "
                             "(see FUSEDOPT_LAUNCH)")
        # an empty tensor still gets one (fully masked) program, so that its step advances
        counts = [max(1, triton.cdiv(n, chunk)) for n in numels]
        chunk_tensor = [i for i, c in enumerate(counts) for _ in range(c)]
        chunk_start = [j * chunk for c in counts for j in range(c)]

        def on_device(values, dtype):
            return torch.tensor(values, dtype=dtype).to(device)

        self.n_cols = len(spec.columns)
        self.numels = on_device(list(numels), torch.int64)
        self.chunk_tensor = on_device(chunk_tensor, torch.int32)
        self.chunk_start = on_device(chunk_start, torch.int64)
        self.chunk_count = on_device(counts, torch.int32)
        self.done = torch.zeros(len(numels), dtype=torch.int32, device=device)
        # reduction accumulators, at their identity (0 for sums, -inf for maxima); the final phase
        # resets them after reading, so they are ready for the next step
        reductions = spec.lowered.reductions
        per_tensor = [_IDENTITY[r.op] for r in reductions if r.over == "tensor"]
        per_group = [_IDENTITY[r.op] for r in reductions if r.over == "group"]
        self.acc_tensor = on_device(per_tensor * len(numels) or [0.0], torch.float64)
        self.acc_group = on_device(per_group or [0.0], torch.float64)
        self.group_done = torch.zeros(1, dtype=torch.int32, device=device)
        geometry = list(geometry or [(1, 1)] * len(numels))
        self.geometry = on_device([list(g) for g in geometry] or [[1, 1]], torch.int64)
        self._small_buffers(spec, numels, geometry, device)
        # phases that reduce over columns run over tiles of ROWS rows and BLOCK columns instead
        self.tiled = tiled_phases(spec.lowered)
        if self.tiled:
            tile_tensor, tile_start = tiles(numels, geometry, cfg["ROWS"], cfg["BLOCK"])
            self.tile_tensor = on_device(tile_tensor, torch.int32)
            self.tile_start = on_device(tile_start, torch.int64)
            self.tile_grid = len(tile_tensor)
        self.phases = 0 if spec.single_pass else spec.lowered.n_phases
        self.ptr_table = torch.zeros((len(numels), self.n_cols), dtype=torch.int64, device=device)
        self.hp_table = torch.zeros(max(1, n_hparams), dtype=torch.int64, device=device)
        self.grid = len(chunk_tensor)
        self.config = cfg
        self.pointers: list[int] = []
        self.hp_pointers: list[int] = []
        self.aligned = False

    def _small_buffers(self, spec: KernelSpec, numels, geometry, device) -> None:
        """One float64 buffer holding, per tensor, every per-row (column, block) reduction and stored
        value of the rule, at the offsets in ``small_base``; ``small_init`` holds the identities the
        reductions start from, copied in before each step (None when the rule has none)."""
        small = spec.lowered.small
        bases, init = [], []
        for numel, (per_row, per_matrix) in zip(numels, geometry):
            row = []
            for r in small:
                row.append(len(init))
                init += [_IDENTITY.get(r.op, 0.0)] * layout_cells(r.layout, numel, per_row, per_matrix)
            bases.append(row or [0])
        init.append(0.0)  # never empty; a fully masked program of an empty tensor may address one past
        self.small_base = torch.tensor(bases or [[0]], dtype=torch.int64).to(device)
        self.acc_small = torch.tensor(init, dtype=torch.float64).to(device)
        reduced = any(r.op != "store" for r in small)
        self.small_init = self.acc_small.clone() if reduced else None

    def refresh(self, pointers: list[int], hp_pointers: list[int]) -> None:
        """Rewrite the pointer tables if any pointer moved (cheap comparison of Python ints)."""
        if pointers != self.pointers:
            _upload(self.ptr_table, pointers)
            self.pointers = pointers
            # the step column (last) is read as a scalar and needs no alignment
            data = list(pointers)
            del data[self.n_cols - 1:: self.n_cols]
            self.aligned = not any(map((15).__and__, data))
        if hp_pointers != self.hp_pointers:
            _upload(self.hp_table, hp_pointers or [0])
            self.hp_pointers = hp_pointers


class PlanCache:
    """Plans keyed by kernel and parameter addresses; the least recently used are dropped."""

    def __init__(self, capacity: int = 64):
        self.capacity = capacity
        self.plans: collections.OrderedDict = collections.OrderedDict()

    def get(self, key, make) -> Plan:
        plan = self.plans.pop(key, None)
        if plan is None:
            plan = make()
        self.plans[key] = plan
        while len(self.plans) > self.capacity:
            self.plans.popitem(last=False)
        return plan


_IDENTITY = {"sum": 0.0, "mean": 0.0, "max": float("-inf")}


def tiles(numels, geometry, rows: int, block: int) -> tuple[list[int], list[int]]:
    """(tensor, first element) of every tile of ``rows`` rows and ``block`` columns of every matrix; an
    empty tensor gets one fully masked tile (which still writes its per-tensor values), so a launch is
    never empty either."""
    tile_tensor: list[torch.Tensor] = []
    tile_start: list[torch.Tensor] = []
    for i, (numel, (per_row, per_matrix)) in enumerate(zip(numels, geometry)):
        if numel == 0:
            tile_start.append(torch.zeros(1, dtype=torch.int64))
            tile_tensor.append(torch.full((1,), i, dtype=torch.int64))
            continue
        matrices = torch.arange(numel // per_matrix, dtype=torch.int64) * per_matrix
        first_rows = torch.arange(0, per_matrix // per_row, rows, dtype=torch.int64) * per_row
        first_cols = torch.arange(0, per_row, block, dtype=torch.int64)
        starts = (matrices[:, None, None] + first_rows[None, :, None] + first_cols[None, None, :]).flatten()
        tile_start.append(starts)
        tile_tensor.append(torch.full_like(starts, i))
    if not tile_start:
        return [0], [numels[0] if numels else 0]
    return torch.cat(tile_tensor).tolist(), torch.cat(tile_start).tolist()


def layout_cells(layout: str, numel: int, per_row: int, per_matrix: int) -> int:
    """How many values a tensor of ``numel`` elements has in ``layout`` (see template.LAYOUT_INDEX)."""
    if layout in ("scalar", "tensor"):
        return 1  # an empty tensor has its per-tensor value too
    if numel == 0:
        return 0
    return {"full": numel, "rows": numel // per_row, "blocks": numel // per_row, "batch": numel // per_matrix,
            "cols": numel // per_matrix * per_row}[layout]


def run(kernels: Sequence[tuple[object, KernelSpec, Plan]]) -> None:
    """Every reduction phase, then the updating phase: one launch per phase and dtype signature.

    Tensors of one group with different dtypes run as separate kernels (one per signature), phase
    by phase, so that a group-wide reduction sums over all of them before any final phase reads it:
    every kernel of the step then shares the first plan's group accumulators and completion counter,
    which the last program of the final phase (of all kernels) resets.
    """
    if not kernels:
        return
    first = kernels[0][2]
    n_programs = sum(plan.grid for _, _, plan in kernels)
    for _, _, plan in kernels:
        if plan.small_init is not None:  # per-row reductions start from their identities
            plan.acc_small.copy_(plan.small_init)
    phases = max(plan.phases for _, _, plan in kernels)
    for phase in range(phases + 1):  # reduction phases in step, then every updating kernel
        for module, spec, plan in kernels:
            if plan.phases <= phase < phases:
                continue
            kernel = getattr(module, f"reduce_phase_{phase}") if phase < plan.phases else module.fused_step
            cfg = plan.config
            grid, chunk_tensor, chunk_start = plan.grid, plan.chunk_tensor, plan.chunk_start
            if phase in plan.tiled:
                grid, chunk_tensor, chunk_start = plan.tile_grid, plan.tile_tensor, plan.tile_start
            kernel[(grid,)](
                plan.ptr_table, plan.hp_table, plan.numels, chunk_tensor, chunk_start,
                plan.chunk_count, plan.done, plan.acc_tensor, first.acc_group, first.group_done, n_programs,
                plan.geometry, plan.small_base, plan.acc_small,
                **constexprs(cfg, plan.aligned), num_warps=cfg["num_warps"],
            )
            launches[spec.lowered.program.name] += 1
