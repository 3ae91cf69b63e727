"""One fused, multi-tensor MicroAdam step: one Triton launch over every parameter of a group.

The oracle is the eager step of :mod:`fusedopt.microadam` (built on :mod:`fusedopt.sparse`); the kernel
reproduces it operation for operation in float32 (float64 for the scalars), so selections, window rows
and error codes are bit-exact and parameters match up to the rounding of the stored dtype.

**Work split.** A tensor of ``d`` elements is cut into top-k blocks as
:func:`fusedopt.sparse.topk_layout` describes (``n_full`` full blocks, then a partial tail with its own
k). A (tensor, block) table lists every block of every tensor of the group; a program takes blocks
``pid, pid + G, pid + 2G, ...`` of it (``G`` = grid size, at most a few programs per SM on a GPU), and
handles each block wholly in registers:

1. loads the block of ``g`` and the error feedback of the quantization blocks inside it (``quant_block``
   is a power of two dividing ``block``, so they never straddle two top-k blocks): two 4-bit codes per
   byte (``tl.interleave`` of the high and low nibbles, the official order), ``code * unit + lo``, and
   ``a = g + Q^-1(e)``;
2. selects the block's top-k of ``|a|`` as :mod:`codegen.topk` does: the bits of ``|a|`` as an int32 key,
   a 31-step radix select of the k-th largest key, every key above it plus the first ties in index
   order (ties to the lower index), compacted in index order by a prefix count: the same ascending
   indices as :func:`fusedopt.sparse.block_topk`;
3. writes ring row ``(t - 1) mod m`` of this block (int16 block-local indices, window-dtype values) and
   zeroes the selected entries of ``a``;
4. takes min and max per quantization block (a ``[BLOCK // QBLOCK, QBLOCK]`` view; a NaN makes both
   NaN, as ``torch.amin`` does), rounds them to bf16, and requantizes the residual into clamped 4-bit
   codes, packed two per byte;
5. rebuilds ``M`` and ``S`` over the ``min(t, m)`` window rows of the block, in row order as the oracle
   does (float addition is not associative). Triton cannot scatter into registers, so each program
   owns a scratch region of ``2 * BLOCK`` float32 in global memory (``G * 32 KiB`` in all at the default
   block, small enough to stay in L2): zero it, then per row gather, add ``beta^age * value`` (and
   ``beta^age * value^2``) and scatter back; indices within a row of a block are distinct, so a row has
   no write conflicts, and a barrier separates rows (and the window-row write from the first read);
6. ``u = c1 * M / (sqrt(c2 * S) + eps)`` (0 where ``S == 0``), ``p = p * (1 - lr * wd) - lr * u``,
   rounded once to the parameter's dtype. The last program to finish a tensor (an atomic counter per
   tensor, as :mod:`codegen.template` does) advances the tensor's step counter.

**Tables.** A tensor table (int64, one row per tensor: the eight pointers, then the element count,
full blocks, tail k, window row length and the dtype codes of param and grad), a hyperparameter
table (pointers to the group's 0-d float64 tensors lr, beta1, beta2, eps, weight_decay), group
constants (block, m, k per full block, block count) and the (tensor, block) table all live on the
device and are built once per parameter list (:class:`MicroAdamPlan`); pointers are compared every
step and re-uploaded when one moved. The kernel takes only tensors and constexprs (block size,
quantization block, the largest k, the window dtype, alignment), so neither a new lr nor a new
parameter list recompiles it. The param and grad dtypes are read per tensor at run time (a uniform
branch), so a group mixing fp32, bf16 and fp16 tensors is still one launch.

**Scalars.** ``beta^t`` and ``beta^age`` are computed in float64 by binary exponentiation (within a
few float64 ulps of the host's ``beta ** t``; the float32 values the update uses round the same
except within ~2^-29 relative of a float32 rounding boundary), bias corrections in float64, then
rounded to float32 where the oracle multiplies a float32 tensor by a Python float. Divisions and
square roots are the IEEE ones (``div_rn``, ``sqrt_rn``) and multiply-add contraction is off, so the
float32 sequence is the oracle's. bf16 results are rounded to nearest even on the bits (the
interpreter's own conversion truncates).
"""

from __future__ import annotations

import collections
from typing import Sequence

import torch
import triton
import triton.language as tl

from fusedopt import sparse

from codegen import launch, ops
from codegen.launch import _upload
from codegen.topk import select_topk

# columns of the tensor table
P_PARAM, P_GRAD, P_WINDEX, P_WVALUE, P_CODES, P_EMIN, P_EMAX, P_STEP = range(8)
C_NUMEL, C_NFULL, C_KTAIL, C_KROW, C_PDTYPE, C_GDTYPE = range(8, 14)
N_COLS = 14
N_POINTERS = 8
HPARAMS = ("lr", "beta1", "beta2", "eps", "weight_decay")

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
KERNEL_DTYPES = tuple(DTYPE_CODES)
WINDOW_DTYPES = KERNEL_DTYPES

# programs per SM on a GPU (untuned); the interpreter runs few programs so that tests reuse scratch
_PROGRAMS_PER_SM = 4
_INTERPRETER_PROGRAMS = 3

launches = launch.launches  # counted under "microadam"
compile_keys: set[tuple] = set()  # every (constexprs, dtypes) signature launched, for tests


def supported(block: int, quant_block: int) -> bool:
    """Can the fused kernel run a group with this block split? ``quant_block`` must be a power of two
    that divides ``block`` (a program then holds whole quantization blocks)."""
    return quant_block & (quant_block - 1) == 0 and block % quant_block == 0


def kmax(block: int, density: float) -> int:
    """Entries kept by a full block; a tail block (smaller) never keeps more."""
    return sparse.topk_layout(block, block, density).k_full


# ---- kernel --------------------------------------------------------------------------------------


@triton.jit
def _to_bf16_rne(x):
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    rounded = tl.where(x != x, 0x7FC0, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _power(base, n):
    """base ** n for a float64 base and an int64 n >= 0, by binary exponentiation."""
    result = tl.full([], 1.0, tl.float64)
    b = base
    e = n
    while e > 0:
        result = tl.where((e & 1) == 1, result * b, result)
        b = b * b
        e = e >> 1
    return result


@triton.jit
def _load_float(base, offs, mask, dtype_code):
    """float32 values of a tensor whose dtype (0 fp32, 1 bf16, 2 fp16) is known only at run time."""
    if dtype_code == 0:
        x = tl.load(base.to(tl.pointer_type(tl.float32)) + offs, mask=mask, other=0.0)
    elif dtype_code == 1:
        x = tl.load(base.to(tl.pointer_type(tl.bfloat16)) + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        x = tl.load(base.to(tl.pointer_type(tl.float16)) + offs, mask=mask, other=0.0).to(tl.float32)
    return x


@triton.jit
def _store_float(base, offs, x, mask, dtype_code):
    if dtype_code == 0:
        tl.store(base.to(tl.pointer_type(tl.float32)) + offs, x, mask=mask)
    elif dtype_code == 1:
        tl.store(base.to(tl.pointer_type(tl.bfloat16)) + offs, _to_bf16_rne(x), mask=mask)
    else:
        tl.store(base.to(tl.pointer_type(tl.float16)) + offs, x.to(tl.float16), mask=mask)


@triton.jit
def microadam_step(
    tensors,  # int64 [n, N_COLS]
    hparams,  # int64 [5]: pointers to 0-d float64 lr, beta1, beta2, eps, weight_decay
    group,  # int64 [4]: block, m, k_full, number of blocks
    block_tensor,  # int32 [blocks]: tensor of each block
    block_index,  # int32 [blocks]: index of the block within its tensor
    block_count,  # int32 [n]: blocks per tensor
    done,  # int32 [n]: blocks finished this step (reset by the last)
    scratch,  # float32 [grid, 2, BLOCK]
    BLOCK: tl.constexpr,  # next power of two >= block
    QBLOCK: tl.constexpr,  # quantization block (a power of two dividing block)
    KMAX: tl.constexpr,  # next power of two >= the entries of a full block
    WDTYPE: tl.constexpr,  # window values: 0 fp32, 1 bf16, 2 fp16
    ALIGNED: tl.constexpr,  # param, grad and codes pointers 16-byte aligned and block % 32 == 0
):
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    block = tl.load(group + 0)
    m = tl.load(group + 1)
    k_full = tl.load(group + 2)
    n_blocks = tl.load(group + 3).to(tl.int32)

    lr = tl.load(tl.load(hparams + 0).to(tl.pointer_type(tl.float64)))
    beta1 = tl.load(tl.load(hparams + 1).to(tl.pointer_type(tl.float64)))
    beta2 = tl.load(tl.load(hparams + 2).to(tl.pointer_type(tl.float64)))
    eps = tl.load(tl.load(hparams + 3).to(tl.pointer_type(tl.float64)))
    wd = tl.load(tl.load(hparams + 4).to(tl.pointer_type(tl.float64)))
    lr32 = lr.to(tl.float32)
    eps32 = eps.to(tl.float32)
    decay32 = (1.0 - lr * wd).to(tl.float32)

    lane = tl.arange(0, BLOCK)
    half = tl.arange(0, BLOCK // 2)
    qlane = tl.arange(0, BLOCK // QBLOCK)
    col = tl.arange(0, KMAX)
    acc_m = scratch + pid.to(tl.int64) * (2 * BLOCK)
    acc_s = acc_m + BLOCK
    if WDTYPE == 0:
        wtype = tl.float32
    elif WDTYPE == 1:
        wtype = tl.bfloat16
    else:
        wtype = tl.float16

    for b in range(pid, n_blocks, n_programs):
        tid = tl.load(block_tensor + b).to(tl.int64)
        j = tl.load(block_index + b).to(tl.int64)
        row = tensors + tid * 14
        p_base = tl.load(row + 0)
        g_base = tl.load(row + 1)
        windex = tl.load(row + 2).to(tl.pointer_type(tl.int16))
        wvalue = tl.load(row + 3).to(tl.pointer_type(wtype))
        codes = tl.load(row + 4).to(tl.pointer_type(tl.uint8))
        emin = tl.load(row + 5).to(tl.pointer_type(tl.bfloat16))
        emax = tl.load(row + 6).to(tl.pointer_type(tl.bfloat16))
        step_ptr = tl.load(row + 7).to(tl.pointer_type(tl.int64))
        numel = tl.load(row + 8)
        n_full = tl.load(row + 9)
        k_tail = tl.load(row + 10)
        k_row = tl.load(row + 11)
        p_dtype = tl.load(row + 12)
        g_dtype = tl.load(row + 13)
        start = j * block
        if ALIGNED:
            codes = tl.multiple_of(codes, 16)
            start = tl.multiple_of(start, 32)
        size = tl.minimum(numel - start, block)
        k = tl.where(j < n_full, k_full, k_tail)
        valid = lane < size
        t = tl.load(step_ptr) + 1
        offs = start + lane

        # 1. a = g + Q^-1(e), e decoded from this block's codes and its quantization blocks' min/max
        g = _load_float(g_base, offs, valid, g_dtype)
        packed = tl.load(codes + start // 2 + half, mask=2 * half < size, other=0).to(tl.int32)
        code = tl.interleave(packed >> 4, packed & 15).to(tl.float32)
        first_q = start // QBLOCK
        qvalid = qlane * QBLOCK < size
        lo = tl.load(emin + first_q + qlane, mask=qvalid, other=0.0).to(tl.float32)
        hi = tl.load(emax + first_q + qlane, mask=qvalid, other=0.0).to(tl.float32)
        unit = tl.div_rn(hi - lo, 15.0)
        e = tl.reshape(tl.reshape(code, [BLOCK // QBLOCK, QBLOCK]) * unit[:, None] + lo[:, None], [BLOCK])
        a = g + e

        # 2. top-k of |a|: radix select of the k-th largest key, ties to the lower index
        key = a.to(tl.int32, bitcast=True) & 0x7FFFFFFF
        keep, rank = select_topk(tl.where(valid, key, -1), k)

        # 3. window row (t - 1) mod m, compacted in index order
        slot = (t - 1) % m
        column = slot * k_row + j * k_full + rank
        tl.store(windex + column, lane.to(tl.int16), mask=keep)
        if WDTYPE == 1:
            tl.store(wvalue + column, _to_bf16_rne(a), mask=keep)
        else:
            tl.store(wvalue + column, a.to(wtype), mask=keep)
        r = tl.where(keep, 0.0, a)

        # 4. min/max per quantization block (bf16), then clamped 4-bit codes, two per byte
        r2 = tl.reshape(r, [BLOCK // QBLOCK, QBLOCK])
        valid2 = tl.reshape(valid, [BLOCK // QBLOCK, QBLOCK])
        lo_new = tl.min(tl.where(valid2, r2, float("inf")), axis=1)
        hi_new = tl.max(tl.where(valid2, r2, float("-inf")), axis=1)
        has_nan = tl.max(((r2 != r2) & valid2).to(tl.int32), axis=1) > 0
        lo_new = _to_bf16_rne(tl.where(has_nan, float("nan"), lo_new))
        hi_new = _to_bf16_rne(tl.where(has_nan, float("nan"), hi_new))
        tl.store(emin + first_q + qlane, lo_new, mask=qvalid)
        tl.store(emax + first_q + qlane, hi_new, mask=qvalid)
        lo = lo_new.to(tl.float32)
        unit = tl.div_rn(hi_new.to(tl.float32) - lo, 15.0)
        safe = tl.where(unit > 0.0, unit, 1.0)
        q = tl.floor(tl.div_rn(r2 - lo[:, None], safe[:, None]) + 0.5)
        q = tl.where((unit[:, None] > 0.0) & (tl.abs(q) < float("inf")), q, 0.0)
        q = tl.minimum(tl.maximum(q, 0.0), 15.0)
        q = tl.where(valid, tl.reshape(q, [BLOCK]), 0.0).to(tl.int32)
        even, odd = tl.split(tl.reshape(q, [BLOCK // 2, 2]))
        tl.store(codes + start // 2 + half, (even * 16 + odd).to(tl.uint8), mask=2 * half < size)

        # 5. M and S over the window rows of this block, row by row in the program's scratch
        tl.debug_barrier()  # the previous block's reads of the scratch, this block's window row
        tl.store(acc_m + lane, tl.zeros([BLOCK], tl.float32))
        tl.store(acc_s + lane, tl.zeros([BLOCK], tl.float32))
        tl.debug_barrier()
        cmask = col < k
        for row_i in range(tl.minimum(t, m)):
            age = (t - 1 - row_i) % m
            w1 = _power(beta1, age).to(tl.float32)
            w2 = _power(beta2, age).to(tl.float32)
            entry = row_i * k_row + j * k_full + col
            idx = tl.load(windex + entry, mask=cmask, other=0).to(tl.int32)
            val = tl.load(wvalue + entry, mask=cmask, other=0.0).to(tl.float32)
            old_m = tl.load(acc_m + idx, mask=cmask, other=0.0)
            old_s = tl.load(acc_s + idx, mask=cmask, other=0.0)
            tl.store(acc_m + idx, old_m + val * w1, mask=cmask)
            tl.store(acc_s + idx, old_s + (val * val) * w2, mask=cmask)
            tl.debug_barrier()
        M = tl.load(acc_m + lane)
        S = tl.load(acc_s + lane)

        # 6. the update, weight decay first, rounded once to the parameter's dtype
        c1 = ((1.0 - beta1) / (1.0 - _power(beta1, t))).to(tl.float32)
        c2 = ((1.0 - beta2) / (1.0 - _power(beta2, t))).to(tl.float32)
        u = tl.div_rn(c1 * M, tl.sqrt_rn(c2 * S) + eps32)
        u = tl.where(S == 0.0, 0.0, u)
        theta = _load_float(p_base, offs, valid, p_dtype)
        theta = theta * decay32
        _store_float(p_base, offs, theta - lr32 * u, valid, p_dtype)

        # the last block of this tensor to finish advances its step counter
        if tl.atomic_add(done + tid, 1) == tl.load(block_count + tid) - 1:
            tl.store(step_ptr, t)
            tl.store(done + tid, 0)


# ---- host side -----------------------------------------------------------------------------------


def _max_programs(device: torch.device, target: str) -> int:
    if target == "interpreter":
        return _INTERPRETER_PROGRAMS
    return torch.cuda.get_device_properties(device).multi_processor_count * _PROGRAMS_PER_SM


class MicroAdamPlan:
    """Device tables for one parameter list of one group: built once, pointers refreshed per step."""

    def __init__(self, numels: Sequence[int], block: int, density: float, m: int, device: torch.device,
                 target: str):
        layouts = [sparse.topk_layout(n, block, density) for n in numels]
        counts = [lay.n_full + (1 if lay.tail else 0) for lay in layouts]
        self.static = [[lay.numel, lay.n_full, lay.k_tail, lay.k] for lay in layouts]
        n_blocks = sum(counts)
        self.block_size = triton.next_power_of_2(block)
        self.block = block

        def on_device(values, dtype):
            return torch.tensor(values, dtype=dtype).to(device)

        self.block_tensor = on_device([i for i, c in enumerate(counts) for _ in range(c)], torch.int32)
        self.block_index = on_device([j for c in counts for j in range(c)], torch.int32)
        self.block_count = on_device(counts, torch.int32)
        self.done = torch.zeros(len(numels), dtype=torch.int32, device=device)
        self.group = on_device([block, m, kmax(block, density), n_blocks], torch.int64)
        self.grid = max(1, min(n_blocks, _max_programs(device, target)))
        self.scratch = torch.zeros(self.grid * 2 * self.block_size, dtype=torch.float32, device=device)
        self.tensors = torch.zeros((len(numels), N_COLS), dtype=torch.int64, device=device)
        self.hp_table = torch.zeros(len(HPARAMS), dtype=torch.int64, device=device)
        self.rows: list[int] = []
        self.hp_pointers: list[int] = []
        self.aligned = False

    def refresh(self, rows: list[int], hp_pointers: list[int]) -> None:
        """Re-upload the tables when a pointer moved (a comparison of Python ints otherwise)."""
        if rows != self.rows:
            _upload(self.tensors, rows)
            self.rows = rows
            data = [rows[i * N_COLS + c] for i in range(len(rows) // N_COLS) for c in (P_PARAM, P_GRAD, P_CODES)]
            self.aligned = self.block % 32 == 0 and not any(map((15).__and__, data))
        if hp_pointers != self.hp_pointers:
            _upload(self.hp_table, hp_pointers)
            self.hp_pointers = hp_pointers


_PLANS = launch.PlanCache()


def eligible(p: torch.Tensor, grad: torch.Tensor) -> bool:
    """Can the kernel update this parameter by flat indexing?"""
    return (p.dtype in KERNEL_DTYPES and grad.dtype in KERNEL_DTYPES and p.is_contiguous()
            and grad.is_contiguous() and grad.shape == p.shape and grad.device == p.device and p.numel() > 0)


def step(params: list[torch.Tensor], grads: list[torch.Tensor], window_index: list[torch.Tensor],
         window_value: list[torch.Tensor], error_codes: list[torch.Tensor], error_min: list[torch.Tensor],
         error_max: list[torch.Tensor], steps: list[torch.Tensor], hparams: list[torch.Tensor], *,
         m: int, density: float, block: int, quant_block: int) -> None:
    """One MicroAdam step over every tensor, as one launch. ``hparams``: 0-d float64 tensors lr, beta1,
    beta2, eps, weight_decay on the parameters' device; ``steps``: int64 0-d counters on that device.
    The states are those of :class:`fusedopt.microadam.MicroAdam` (window values fp32, bf16 or fp16).

    Traced by torch.compile this is the custom op ``fusedopt::microadam_step`` (opaque to the compiler:
    it builds pointer tables from real addresses); run eagerly it launches directly."""
    args = (params, grads, window_index, window_value, error_codes, error_min, error_max, steps, hparams)
    if torch.compiler.is_compiling():
        microadam_step_op(*args, m, density, block, quant_block)
    else:
        _launch(*args, m=m, density=density, block=block, quant_block=quant_block)
        # as the op would: autograd sees that these tensors changed
        ops._bump_versions([*params, *window_index, *window_value, *error_codes, *error_min, *error_max, *steps])


@torch.library.custom_op("fusedopt::microadam_step", mutates_args=(
    "params", "window_index", "window_value", "error_codes", "error_min", "error_max", "steps"))
def microadam_step_op(params: list[torch.Tensor], grads: list[torch.Tensor], window_index: list[torch.Tensor],
                      window_value: list[torch.Tensor], error_codes: list[torch.Tensor],
                      error_min: list[torch.Tensor], error_max: list[torch.Tensor], steps: list[torch.Tensor],
                      hparams: list[torch.Tensor], m: int, density: float, block: int, quant_block: int) -> None:
    """One fused MicroAdam step (see :func:`step`); the parameters, window, error feedback and step
    counters are updated in place."""
    _launch(params, grads, window_index, window_value, error_codes, error_min, error_max, steps, hparams,
            m=m, density=density, block=block, quant_block=quant_block)


@microadam_step_op.register_fake
def _microadam_step_fake(params, grads, window_index, window_value, error_codes, error_min, error_max, steps,
                         hparams, m, density, block, quant_block) -> None:
    return None


def _launch(params, grads, window_index, window_value, error_codes, error_min, error_max, steps, hparams, *,
            m: int, density: float, block: int, quant_block: int) -> None:
    if not params:
        return
    if not supported(block, quant_block):
        raise ValueError(f"the fused MicroAdam kernel needs quant_block a power of two dividing block, got "
                         f"block={block}, quant_block={quant_block}; use backend='reference'")
    device = params[0].device
    target = ops.target_for(device)
    wdtype = window_value[0].dtype
    if wdtype not in WINDOW_DTYPES or any(v.dtype != wdtype for v in window_value):
        raise ValueError(f"the fused MicroAdam kernel stores window values as float32, bfloat16 or float16 "
                         f"(one dtype per group), got {sorted({str(v.dtype) for v in window_value})}")
    rows = []
    for i, (p, g) in enumerate(zip(params, grads)):
        if not eligible(p, g) or p.device != device:
            raise ValueError(f"parameter {i} (shape {tuple(p.shape)}, {p.dtype}, grad {g.dtype}) cannot be "
                             "stepped by the fused kernel: it needs contiguous fp32/bf16/fp16 tensors on one device")
        states = (window_index[i], window_value[i], error_codes[i], error_min[i], error_max[i], steps[i])
        rows += [p.data_ptr(), g.data_ptr(), *(s.data_ptr() for s in states)]
        rows += [0, 0, 0, 0, DTYPE_CODES[p.dtype], DTYPE_CODES[g.dtype]]  # static columns below
    numels = [p.numel() for p in params]
    key = ("microadam", device, block, density, m, tuple(numels), tuple(rows[::N_COLS]))
    plan = _PLANS.get(key, lambda: MicroAdamPlan(numels, block, density, m, device, target))
    for i, static in enumerate(plan.static):
        rows[i * N_COLS + C_NUMEL: i * N_COLS + C_KROW + 1] = static
    plan.refresh(rows, [h.data_ptr() for h in hparams])
    constexprs = dict(BLOCK=plan.block_size, QBLOCK=quant_block,
                      KMAX=triton.next_power_of_2(kmax(block, density)),
                      WDTYPE=DTYPE_CODES[wdtype], ALIGNED=plan.aligned)
    compile_keys.add(tuple(sorted(constexprs.items())))
    extra = {} if target == "interpreter" else dict(num_warps=8 if plan.block_size >= 2048 else 4)
    microadam_step[(plan.grid,)](
        plan.tensors, plan.hp_table, plan.group, plan.block_tensor, plan.block_index, plan.block_count,
        plan.done, plan.scratch, enable_fp_fusion=False, **constexprs, **extra,
    )
    launches["microadam"] += 1
