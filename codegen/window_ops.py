"""Host side of the window kernels (:mod:`codegen.window_template`): device tables, the launch, and the
torch custom op ``fusedopt::window_step``.

A program travels through the op as its key, registered here first (:func:`register`), as
:mod:`codegen.ops` does for the other rules. Tables are built once per parameter list
(:class:`WindowPlan`); each step compares the pointers as Python ints and re-uploads a table only when
one moved. The kernel takes only tensors and constexprs (the padded block, the padded largest k, the
alignment flag), so neither a new lr nor another parameter list, m or density recompiles it.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch
import triton

from fusedopt import ir, sparse

from . import cache, launch, ops
from .jit_helpers import DTYPE_CODES
from .launch import _upload
from .template import TORCH_TO_NAME
from .window_template import N_STATIC, WindowKernelSpec, render, supported

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# programs per SM on a GPU (untuned); the interpreter runs few programs so that tests reuse scratch
_PROGRAMS_PER_SM = 4
_INTERPRETER_PROGRAMS = 3

_PROGRAMS: dict[str, ir.Program] = {}
_PLANS = launch.PlanCache()
launches = launch.launches  # counted by rule name
compile_keys: set[tuple] = set()  # every (program, constexprs) launched, for tests


def register(program: ir.Program) -> str:
    """Make ``program`` callable through :func:`step`; returns its key. Raises ValueError naming the
    reason when the kernel cannot run it (see :func:`codegen.window_template.supported`)."""
    problem = supported(program)
    if problem:
        raise ValueError(f"rule '{program.name}' cannot run as a fused window kernel: {problem}; "
                         "use backend='reference'")
    key = program.key()
    _PROGRAMS[key] = program
    return key


@functools.lru_cache(maxsize=None)
def source(spec: WindowKernelSpec) -> str:
    return render(spec)


def kmax(block: int, density: float) -> int:
    """Entries kept by a full block; a tail block (smaller) never keeps more."""
    return sparse.topk_layout(block, block, density).k_full


def eligible(p: torch.Tensor, grad: torch.Tensor) -> bool:
    """Can the kernel update this parameter by flat indexing?"""
    return (p.dtype in KERNEL_DTYPES and grad.dtype in KERNEL_DTYPES and p.is_contiguous()
            and grad.is_contiguous() and grad.shape == p.shape and grad.device == p.device and p.numel() > 0)


def _max_programs(device: torch.device, target: str) -> int:
    if target == "interpreter":
        return _INTERPRETER_PROGRAMS
    return torch.cuda.get_device_properties(device).multi_processor_count * _PROGRAMS_PER_SM


class WindowPlan:
    """Device tables for one parameter list of one group."""

    def __init__(self, numels: Sequence[int], window: ir.StateSpec, n_sums: int, n_pointers: int,
                 device: torch.device, target: str):
        layouts = [sparse.topk_layout(n, window.block, window.density) for n in numels]
        counts = [lay.n_full + (1 if lay.tail else 0) for lay in layouts]
        self.static = [[lay.numel, lay.n_full, lay.k_tail, lay.k] for lay in layouts]
        n_blocks = sum(counts)
        self.block = window.block
        self.block_size = triton.next_power_of_2(window.block)
        self.n_pointers = n_pointers

        def on_device(values, dtype):
            return torch.tensor(values, dtype=dtype).to(device)

        self.block_tensor = on_device([i for i, c in enumerate(counts) for _ in range(c)], torch.int32)
        self.block_index = on_device([j for c in counts for j in range(c)], torch.int32)
        self.block_count = on_device(counts, torch.int32)
        self.done = torch.zeros(len(numels), dtype=torch.int32, device=device)
        self.group = on_device([window.block, window.m, kmax(window.block, window.density), n_blocks], torch.int64)
        self.grid = max(1, min(n_blocks, _max_programs(device, target)))
        self.scratch = torch.zeros(max(1, self.grid * n_sums * self.block_size), dtype=torch.float32, device=device)
        self.tensors = torch.zeros((len(numels), n_pointers + N_STATIC), dtype=torch.int64, device=device)
        self.hp_table = torch.zeros(1, dtype=torch.int64, device=device)
        self.rows: list[int] = []
        self.hp_pointers: list[int] = []
        self.aligned = False

    def refresh(self, rows: list[int], hp_pointers: list[int]) -> None:
        """Re-upload the tables when a pointer moved (a comparison of Python ints otherwise)."""
        if rows != self.rows:
            _upload(self.tensors, rows)
            self.rows = rows
            width = self.n_pointers + N_STATIC
            pointers = [rows[i * width + c] for i in range(len(rows) // width) for c in range(self.n_pointers)]
            self.aligned = self.block % 32 == 0 and not any(map((15).__and__, pointers))
        if hp_pointers != self.hp_pointers:
            if self.hp_table.numel() != max(1, len(hp_pointers)):
                self.hp_table = torch.zeros(max(1, len(hp_pointers)), dtype=torch.int64, device=self.done.device)
            if hp_pointers:
                _upload(self.hp_table, hp_pointers)
            self.hp_pointers = hp_pointers


def step(program_key: str, params: list[torch.Tensor], grads: list[torch.Tensor], states: list[torch.Tensor],
         steps: list[torch.Tensor], hparams: list[torch.Tensor]) -> None:
    """One step of the registered window program over every tensor, as one launch. ``states``: the
    program's storage tensors (``Program.storage_names``), storage-major; ``steps``: int64 0-d counters
    on the parameters' device; ``hparams``: 0-d float64 tensors in ``Program.hparams`` order.

    Traced by torch.compile this is the custom op ``fusedopt::window_step`` (opaque to the compiler: it
    builds pointer tables from real addresses); run eagerly it launches directly."""
    if torch.compiler.is_compiling():
        window_step_op(program_key, params, grads, states, steps, hparams)
        return
    _launch(program_key, params, grads, states, steps, hparams)
    ops._bump_versions([*params, *states, *steps])


@torch.library.custom_op("fusedopt::window_step", mutates_args=("params", "states", "steps"))
def window_step_op(program_key: str, params: list[torch.Tensor], grads: list[torch.Tensor],
                   states: list[torch.Tensor], steps: list[torch.Tensor], hparams: list[torch.Tensor]) -> None:
    """One fused step of a rule with a window (see :func:`step`); parameters, states and step counters
    are updated in place."""
    _launch(program_key, params, grads, states, steps, hparams)


@window_step_op.register_fake
def _window_step_fake(program_key, params, grads, states, steps, hparams) -> None:
    return None


def _launch(program_key, params, grads, states, steps, hparams) -> None:
    if not params:
        return
    program = _PROGRAMS[program_key]
    device = params[0].device
    target = ops.target_for(device)
    spec = WindowKernelSpec(program, target)
    names = program.storage_names
    n = len(params)
    if len(states) != len(names) * n or len(steps) != n or len(hparams) != len(program.hparams):
        raise ValueError(f"rule '{program.name}': {len(states)} state tensors, {len(steps)} step counters and "
                         f"{len(hparams)} hyperparameters for {n} parameters; expected {len(names) * n}, {n} and "
                         f"{len(program.hparams)}")
    rows = []
    for i, (p, g) in enumerate(zip(params, grads)):
        if not eligible(p, g) or p.device != device:
            raise ValueError(f"parameter {i} (shape {tuple(p.shape)}, {p.dtype}, grad {g.dtype}) cannot be "
                             "stepped by the fused kernel: it needs contiguous fp32/bf16/fp16 tensors on one device")
        rows += [p.data_ptr(), g.data_ptr(), *(states[s * n + i].data_ptr() for s in range(len(names))),
                 steps[i].data_ptr()]
        rows += [0, 0, 0, 0, DTYPE_CODES[TORCH_TO_NAME[str(p.dtype)]], DTYPE_CODES[TORCH_TO_NAME[str(g.dtype)]]]
    width = len(spec.columns) + N_STATIC
    numels = [p.numel() for p in params]
    window = program.window
    n_sums = len(spec.lowered.sums)
    key = (program_key, device, tuple(numels), tuple(rows[::width]))
    plan = _PLANS.get(key, lambda: WindowPlan(numels, window, n_sums, len(spec.columns), device, target))
    for i, static in enumerate(plan.static):
        rows[i * width + len(spec.columns): i * width + len(spec.columns) + 4] = static
    plan.refresh(rows, [h.data_ptr() for h in hparams])
    module = cache.load(source(spec), device)
    constexprs = dict(BLOCK=plan.block_size, KMAX=triton.next_power_of_2(kmax(window.block, window.density)),
                      ALIGNED=plan.aligned)
    compile_keys.add((program_key, tuple(sorted(constexprs.items()))))
    extra = {} if target == "interpreter" else dict(num_warps=8 if plan.block_size >= 2048 else 4)
    module.window_step[(plan.grid,)](
        plan.tensors, plan.hp_table, plan.group, plan.block_tensor, plan.block_index, plan.block_count,
        plan.done, plan.scratch, enable_fp_fusion=False, **constexprs, **extra,
    )
    launches[program.name] += 1


__all__ = ["eligible", "register", "source", "step"]
