"""Assembles the source of the fused kernel of a rule with a window (:func:`fusedopt.dsl.window`).

One launch steps every tensor of a group. A (tensor, block) table lists every top-k block of every
tensor (the split of :func:`fusedopt.sparse.topk_layout`: full blocks, then a partial tail with its
own k); program ``pid`` takes blocks ``pid, pid + G, ...`` and does everything for a block in
registers, in the order the rule's semantics fix (:mod:`fusedopt.window_passes`):

1. load p, g and the full-size states of the block (q4minmax states decode their quantization
   blocks, which never straddle two top-k blocks: the kernel needs ``quant_block`` a power of two
   dividing ``block``; q8minmax states likewise), and compute what the push needs;
2. select the block's top-k of ``|score|`` (:func:`codegen.topk.select_topk`: a radix select on the
   float bits, ties to the lower index, compacted in index order: the indices of
   :func:`fusedopt.sparse.block_topk`) and write ring row ``(t - 1) mod m`` of this block;
3. rebuild each window sum over the ``min(t, m)`` written rows, row by row in row order (as the
   eager interpreter adds them). Triton cannot scatter into registers, so each program owns
   ``n_sums * BLOCK`` float32 of scratch in global memory (small enough to stay in L2): zero it, then
   per row gather, add ``beta ** age * value ** power`` and scatter back; a row's indices within a
   block are distinct, and a barrier separates rows;
4. compute the rest and store the parameter (rounded once to its dtype: to nearest, or for bf16
   and fp16 parameters of a program with stochastic rounding as :func:`fusedopt.rounding.to_stochastic`)
   and the states (q4minmax: min/max and clamped codes); the last program to finish a tensor
   advances its int64 step counter.

A program that skips non-finite steps (``Program.skip_when``, the hyperparameter ``nonfinite_flag``
the front end computes before the launch) runs no block when the flag is nonzero: nothing is
written, not even the window row or the step counters. Master weights are a full-size float32 state
the rule reads in place of ``p`` (:func:`fusedopt.dsl.Rule.program`); nothing here is special to them.

Tables, built once per parameter list by :mod:`codegen.window_ops`: per tensor a row of pointers (p,
g, every storage tensor of the rule in program order, the step counter) followed by its element
count, full blocks, tail k, window row length and the dtype codes of p and g (read at run time, so
fp32, bf16 and fp16 tensors share one launch); the group's block, m, k per full block and block count;
pointers to the group's 0-d float64 hyperparameters. The text depends on the program (its math and
storage dtypes) and the target only: never on shapes, m, density or the number of tensors.

Scalars (hyperparameters, t, hoisted subexpressions such as bias corrections) are float64, rounded
to float32 where elementwise math reads them; ``beta ** age`` is computed in float64 by binary
exponentiation. Divisions and square roots are the IEEE ones and multiply-add contraction is off (the
launch passes ``enable_fp_fusion=False``), as in :mod:`codegen.template`.
"""

from __future__ import annotations

import dataclasses

from fusedopt import ir
from fusedopt.window_passes import KEPT, PUSH, SCORE, WindowLowered, lower_window

from .jit_helpers import DTYPE_CODES
from .printer import TritonPrinter, is_boolean
from .template import SR_HELPERS, _Lines, module_header

N_STATIC = 6  # per-tensor columns after the pointers: numel, full blocks, tail k, row length, p and g dtypes
_POINTEE = {"fp32": "tl.float32", "bf16": "tl.bfloat16", "fp16": "tl.float16"}


@dataclasses.dataclass(frozen=True)
class WindowKernelSpec:
    program: ir.Program
    target: str  # "cuda" | "interpreter"

    @property
    def lowered(self) -> WindowLowered:
        return lower_window(self.program)

    @property
    def columns(self) -> tuple[str, ...]:
        """Pointer columns of the tensor table, in order."""
        return (ir.PARAM, ir.GRAD, *self.program.storage_names, ir.STEP)


def supported(program: ir.Program) -> str | None:
    """Why the kernel cannot run ``program`` (None when it can)."""
    block = program.window.block
    for s in program.states:
        if s.dtype in ir.MINMAX_BITS and (s.block & (s.block - 1) or block % s.block):
            return (f"state '{s.name}' has quant_block={s.block}, which is not a power of two dividing the "
                    f"window block {block}")
    return None


def _pointee(program: ir.Program, column: str) -> str:
    for s in program.states:
        if column not in s.storage:
            continue
        if s.layout == "window":
            return "tl.int16" if column.endswith(ir.WINDOW_SUFFIXES[0]) else _POINTEE[s.dtype]
        if s.dtype in ir.MINMAX_BITS:
            return "tl.uint8" if column == s.name else "tl.bfloat16"
        return _POINTEE[s.dtype]
    return "tl.int64" if column == ir.STEP else "tl.int8"  # p and g: cast per dtype code at run time


def _rounded(dtype: str, value: str) -> str:
    if dtype == "bf16":
        return f"to_bf16_rne({value})"
    return f"({value}).to({_POINTEE[dtype]})"


def render(spec: WindowKernelSpec) -> str:
    prog = spec.program
    low = spec.lowered
    w = prog.window
    scalar = TritonPrinter("scalar", spec.target)
    element = TritonPrinter("element", spec.target)
    cols = spec.columns
    out = _Lines()
    module_header(out, [f"fusedopt window kernel for rule '{prog.name}' (program {prog.key()[:16]}), target "
                        f"{spec.target}"], low.text(), spec.target)
    imports_at = len(out.lines)
    out.add(0, "from codegen.topk import select_topk")
    out.add(0, "")
    out.add(0, "")
    out.add(0, "@triton.jit")
    out.add(0, "def window_step(tensors, hparams, group, block_tensor, block_index, block_count, done, scratch,")
    out.add(0, "                BLOCK: tl.constexpr, KMAX: tl.constexpr, ALIGNED: tl.constexpr):")
    out.add(1, "pid = tl.program_id(0)")
    out.add(1, "n_programs = tl.num_programs(0)")
    for i, name in enumerate(("block", "m", "k_full")):
        out.add(1, f"{name} = tl.load(group + {i})")
    out.add(1, "n_blocks = tl.load(group + 3).to(tl.int32)")
    out.add(1, "# hyperparameters, float64, read through pointers to the group's tensors")
    for i, name in enumerate(prog.hparams):
        out.add(1, f"s_{name} = tl.load(tl.load(hparams + {i}).to(tl.pointer_type(tl.float64)))")
    if prog.skip_when is not None:
        out.add(1, "# a non-finite gradient in the group: no block is stepped, the step counters stay")
        out.add(1, f"n_blocks = tl.where({scalar(prog.skip_when)} != 0, 0, n_blocks)")
    out.add(1, "lane = tl.arange(0, BLOCK)")
    out.add(1, "col = tl.arange(0, KMAX)")
    for i, s in enumerate(low.sums):
        out.add(1, f"acc_{s.name} = scratch + pid.to(tl.int64) * {len(low.sums)} * BLOCK + {i} * BLOCK")
    out.add(1, "for b in range(pid, n_blocks, n_programs):")
    out.add(2, "tid = tl.load(block_tensor + b).to(tl.int64)")
    out.add(2, "j = tl.load(block_index + b).to(tl.int64)")
    out.add(2, f"row = tensors + tid * {len(cols) + N_STATIC}")
    for i, c in enumerate(cols):
        cast = "" if c in (ir.PARAM, ir.GRAD) else f".to(tl.pointer_type({_pointee(prog, c)}))"
        out.add(2, f"ptr_{c} = tl.load(row + {i}){cast}")
    for i, name in enumerate(("numel", "n_full", "k_tail", "k_row", "p_dtype", "g_dtype")):
        out.add(2, f"{name} = tl.load(row + {len(cols) + i})")
    out.add(2, "start = j * block")
    aligned = [c for c in cols[2:-1] if not c.endswith(("_min", "_max", *ir.WINDOW_SUFFIXES))]
    out.add(2, "if ALIGNED:  # the host checked 16-byte aligned storage and block % 32 == 0")
    for c in aligned:
        out.add(3, f"ptr_{c} = tl.multiple_of(ptr_{c}, 16)")
    out.add(3, "start = tl.multiple_of(start, 32)")
    out.add(2, "size = tl.minimum(numel - start, block)")
    out.add(2, "k = tl.where(j < n_full, k_full, k_tail)")
    out.add(2, "valid = lane < size")
    out.add(2, f"t = tl.load(ptr_{ir.STEP}) + 1")
    out.add(2, "offs = start + lane")
    out.add(2, f"s_{ir.STEP} = t.to(tl.float64)")
    out.add(2, f"s_{ir.NUMEL} = numel.to(tl.float64)")
    booleans: frozenset[str] = frozenset()
    for name, expr in low.lowered.scalars:
        out.add(2, f"s_{name} = {scalar(expr)}")
        if is_boolean(expr, booleans):
            booleans |= {name}
    for name in (*prog.hparams, ir.STEP, ir.NUMEL, *(n for n, _ in low.lowered.scalars)):
        out.add(2, f"v_{name} = s_{name}" + ("" if name in booleans else ".to(tl.float32)"))

    out.add(2, "# 1. loads and what the push needs")
    out.add(2, "v_p = load_float(ptr_p, offs, valid, p_dtype)")
    out.add(2, "v_g = load_float(ptr_g, offs, valid, g_dtype)")
    for s in prog.states:
        if s.layout == "window":
            continue
        if s.dtype in ir.MINMAX_BITS:
            codes, lo, hi = s.storage
            out.add(2, f"v_{s.name} = decode_minmax(ptr_{codes}, ptr_{lo}, ptr_{hi}, start, size, BLOCK, {s.block}, "
                       f"{ir.MINMAX_BITS[s.dtype]})")
        else:
            out.add(2, f"v_{s.name} = tl.load(ptr_{s.name} + offs, mask=valid, other=0.0).to(tl.float32)")
    for name, expr in low.temps(before=True):
        out.add(2, f"v_{name} = {element(expr)}")
    out.add(2, f"v_{SCORE} = {element(low.expression(SCORE))}")
    out.add(2, f"v_{PUSH} = {element(low.expression(PUSH))}")

    index, value = w.storage
    out.add(2, "# 2. top-k of |score| (ties to the lower index), written to ring row (t - 1) mod m")
    out.add(2, f"key = tl.broadcast_to(v_{SCORE}, [BLOCK]).to(tl.int32, bitcast=True) & 0x7FFFFFFF")
    out.add(2, "keep, rank = select_topk(tl.where(valid, key, -1), k)")
    out.add(2, "column = ((t - 1) % m) * k_row + j * k_full + rank")
    out.add(2, f"tl.store(ptr_{index} + column, lane.to(tl.int16), mask=keep)")
    out.add(2, f"tl.store(ptr_{value} + column, {_rounded(w.dtype, f'tl.broadcast_to(v_{PUSH}, [BLOCK])')}, mask=keep)")
    out.add(2, f"v_{KEPT} = tl.where(keep, 1.0, 0.0)")

    if low.sums:
        out.add(2, "# 3. the window sums, row by row in this program's scratch")
        out.add(2, "tl.debug_barrier()  # the previous block's reads of the scratch; this block's row")
        for s in low.sums:
            out.add(2, f"tl.store(acc_{s.name} + lane, tl.zeros([BLOCK], tl.float32))")
        out.add(2, "tl.debug_barrier()")
        out.add(2, "cmask = col < k")
        out.add(2, "for row_i in range(tl.minimum(t, m)):")
        out.add(3, "age = (t - 1 - row_i) % m")
        out.add(3, "entry = row_i * k_row + j * k_full + col")
        out.add(3, f"idx = tl.load(ptr_{index} + entry, mask=cmask, other=0).to(tl.int32)")
        out.add(3, f"val = tl.load(ptr_{value} + entry, mask=cmask, other=0.0).to(tl.float32)")
        for s in low.sums:
            term = "(" + " * ".join(["val"] * s.power) + ")" if s.power > 1 else "val"
            out.add(3, f"weight = power({scalar(s.beta)}, age).to(tl.float32)")
            out.add(3, f"old = tl.load(acc_{s.name} + idx, mask=cmask, other=0.0)")
            out.add(3, f"tl.store(acc_{s.name} + idx, old + {term} * weight, mask=cmask)")
        out.add(3, "tl.debug_barrier()")
        for s in low.sums:
            out.add(2, f"v_{s.name} = tl.load(acc_{s.name} + lane)")

    out.add(2, "# 4. the rest of the rule, and the stores")
    for name, expr in low.temps(before=False):
        out.add(2, f"v_{name} = {element(expr)}")
    for target, expr in low.outputs():
        value_text = f"tl.broadcast_to({element(expr)}, [BLOCK])"
        if target == ir.PARAM and prog.stochastic_rounding:  # bf16 and fp16 parameters; fp32 ones as they are
            out.add(2, f"v_new_p = {value_text}")
            for i, (dtype, helper) in enumerate(SR_HELPERS.items()):
                out.add(2, f"{'if' if i == 0 else 'elif'} p_dtype == {DTYPE_CODES[dtype]}:")
                out.add(3, f"tl.store(ptr_p.to(tl.pointer_type({_POINTEE[dtype]})) + offs, "
                           f"{helper}(v_new_p, s_{ir.SR_SEED}, t, numel, offs), mask=valid)")
            out.add(2, "else:")
            out.add(3, "store_float(ptr_p, offs, v_new_p, valid, p_dtype)")
            continue
        if target == ir.PARAM:
            out.add(2, f"store_float(ptr_p, offs, {value_text}, valid, p_dtype)")
            continue
        s = next(s for s in prog.states if s.name == target)
        if s.dtype in ir.MINMAX_BITS:
            codes, lo, hi = s.storage
            out.add(2, f"encode_minmax({value_text}, valid, ptr_{codes}, ptr_{lo}, ptr_{hi}, start, size, BLOCK, "
                       f"{s.block}, {ir.MINMAX_BITS[s.dtype]})")
        else:
            out.add(2, f"tl.store(ptr_{target} + offs, {_rounded(s.dtype, value_text)}, mask=valid)")
    out.add(2, "# the last block of this tensor to finish advances its step counter")
    out.add(2, "if tl.atomic_add(done + tid, 1) == tl.load(block_count + tid) - 1:")
    out.add(3, f"tl.store(ptr_{ir.STEP}, t)")
    out.add(3, "tl.store(done + tid, 0)")
    helpers = {"decode_minmax", "encode_minmax", "load_float", "power", "store_float", "to_bf16_rne",
               *(SR_HELPERS.values() if prog.stochastic_rounding else ()), *scalar.helpers, *element.helpers}
    out.lines.insert(imports_at, f"from codegen.jit_helpers import {', '.join(sorted(helpers))}")
    return out.text()


__all__ = ["DTYPE_CODES", "N_STATIC", "WindowKernelSpec", "render", "supported"]
