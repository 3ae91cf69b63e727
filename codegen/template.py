"""Assembles the source of one multi-tensor Triton kernel module for a lowered program.

One program instance handles one chunk of one tensor. It reads, from device tables built once per
parameter list (see :mod:`codegen.launch`): a row of raw pointers (parameter, gradient, each state,
the step counter), the tensor's element count, and the chunk's start. Pointers loaded from memory
lose their alignment facts, so when the host has checked that every pointer is 16-byte aligned
(``ALIGNED``) the kernel restores them with ``tl.multiple_of``: on an H100 this is the difference
between 74 % and 94 % of copy bandwidth. Offsets are int64, so tensors beyond 2**31 elements work.

Hyperparameters are read through a table of pointers to the param group's own 0-d float64
tensors, so changing a learning rate changes data, never code. The step counter is incremented
once per tensor: every program reads the old value; the last program of a tensor to finish (an
atomic counter per tensor) writes the new one and resets the counter.

The kernel is specialised on dtypes and constexprs only, never on shapes or tensor counts.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from fusedopt import ir, quant
from fusedopt.passes import Lowered

from .printer import TritonPrinter, is_boolean

TRITON_DTYPES = {"fp32": "tl.float32", "bf16": "tl.bfloat16", "fp16": "tl.float16", "q8": "tl.uint8",
                 "q4": "tl.uint8"}
QUANT_BLOCK = 256  # elements per scale of a q8 state (fusedopt.quant.Q8.block); BLOCK must be a multiple
QUANT4_BLOCK = 128  # elements per scale of a q4 state (fusedopt.quant.Q4.block)
QUANT_BUCKET_BITS = 16  # buckets of float32 values for finding a q8 code (see _q8_store_source)
TORCH_TO_NAME = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}
_ITEMSIZE = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """Everything the text of a kernel depends on."""

    lowered: Lowered
    param_dtype: str  # "fp32" | "bf16" | "fp16"
    grad_dtype: str
    target: str  # "cuda" | "interpreter"
    # every phase in one kernel, each program on its own rows (see single_pass_possible)
    single_pass: bool = False

    @property
    def columns(self) -> tuple[str, ...]:
        """Pointer-table columns, in order."""
        return (ir.PARAM, ir.GRAD, *self.lowered.program.storage_names, ir.STEP)

    def dtype_of(self, column: str) -> str:
        if column == ir.PARAM:
            return self.param_dtype
        if column == ir.GRAD:
            return self.grad_dtype
        if column == ir.STEP:
            return "fp32"
        if column not in self.lowered.program.state_names:  # the scales of a quantized state
            return "bf16"
        return next(s.dtype for s in self.lowered.program.states if s.name == column)


# float32 -> bfloat16 with round-to-nearest-even, as torch does it (NaN becomes 0x7FC0). In the CPU
# interpreter, whose own conversion truncates, it is done on the bits; a GPU converts in one
# instruction (cvt.rn.bf16x2.f32 packs two), and only NaN needs a select to get torch's bits.
_BF16_RNE = {"interpreter": """

@triton.jit
def _to_bf16_rne(x):
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    rounded = tl.where(x != x, 0x7FC0, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)""", "cuda": """

@triton.jit
def _to_bf16_rne(x):
    nan = tl.full(x.shape, 0x7FC0, tl.uint16).to(tl.bfloat16, bitcast=True)
    return tl.where(x != x, nan, x.to(tl.bfloat16, fp_downcast_rounding="rtne"))"""}


# The tables a kernel with quantized states reads, in the order codegen.ops appends their pointers
# to the hyperparameter table: per map (q8 signed and unsigned, then q4) its values and its
# encoder's bucket table (codegen.ops.bucket_table; an even grid's codes need none, see _even_grid).
QUANT_TABLES = (("qmap_s", "float32"), ("qbucket_s", "int32"),
                ("qmap_u", "float32"), ("qbucket_u", "int32"),
                ("q4map_s", "float32"), ("q4bucket_s", "int32"),
                ("q4map_u", "float32"), ("q4bucket_u", "int32"))


def _scaled_blocks(signature: str, block: int) -> list[str]:
    """The start of a requantizing helper: per block of ``block`` values of x, ``scale`` (its largest
    magnitude rounded up to bfloat16, at most the largest bfloat16: fusedopt.quant.bf16_ceil on the
    bits; ``scale_bits`` are its float32 bits), ``finite`` (false where it holds NaN or Inf) and
    ``y`` = x / scale, flat (0 where not finite; x / 1 for an all-zero block).

    One integer reduction gives both the absmax and finiteness: the bits of |x| order as |x| does,
    and Inf and NaN lie above every finite value. The division is _over_scale's, one reciprocal
    per block instead of a division per element."""
    return [
        "", "", "@triton.jit", f"def {signature}:",
        f"    blocks = tl.reshape(x, [BLOCK // {block}, {block}])",
        "    amax_bits = tl.max(blocks.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=1)",
        "    finite = amax_bits < 0x7F800000",
        "    scale_bits = (tl.minimum(amax_bits, 0x7F7F0000) + 0xFFFF) & -0x10000",
        "    scale = scale_bits.to(tl.float32, bitcast=True)",
        "    y = _over_scale(blocks, tl.where(scale > 0.0, scale, 1.0))",
        "    y = tl.reshape(tl.where(finite[:, None], y, 0.0), [BLOCK])",
    ]


# x / scale per row of a [rows, block] tile, with one correctly rounded reciprocal per row instead of
# an IEEE division per element: both are first multiplied by the power of two that brings the scale
# into [1, 2) (exact; the exponent is clamped to +-126, so a subnormal scale lands in [2^-7, 1) and
# the largest in [2, 4)), then q = x * r is corrected once with the exact residual x - q * scale
# (two fmas). With r = RN(1 / scale) this correction gives RN(x / scale) (Markstein's theorem)
# wherever the quotient is not tiny; tests/test_block_quotient.py checks it against division over
# every bfloat16 scale. A quotient below about 2^-100 may differ from the division in its last bits,
# which no code can see: the smallest midpoint of any map is above 1e-7.
_OVER_SCALE = """

@triton.jit
def _over_scale(x, scale):
    exponent = (scale.to(tl.int32, bitcast=True) >> 23) & 0xFF
    power = (tl.minimum(tl.maximum(254 - exponent, 1), 253) << 23).to(tl.float32, bitcast=True)
    s = (scale * power)[:, None]
    r = tl.div_rn(1.0, scale * power)[:, None]
    xs = x * power[:, None]
    q = xs * r
    return tl.fma(tl.fma(-q, s, xs), r, q)"""


# Scales go to and from bfloat16 on the bits (exact: a scale is a bfloat16 value), which the CPU
# interpreter's own conversions are not for subnormals; a non-finite block stores NaN (0x7FC0).
_SCALE_STORED = "tl.where(finite, scale_bits >> 16, 0x7FC0).to(tl.uint16).to(tl.bfloat16, bitcast=True)"

# The store of a run of blocks' scales (``stored``, one per row of the [rows, block] tile it was
# reduced from, so every lane of the LANES lanes holding a row holds its scale). Stored as a [rows]
# vector, Triton would give the store a layout of its own and move the scales there through shared
# memory, with a barrier on each side. As a [rows, LANES] tile whose pointers run along the lanes,
# the store's layout is the reduction's, LANES lanes per row, and the first lane of each row stores
# its scale (the other lanes' pointers, past the row's scale, are masked off).
_STORE_SCALES = """

@triton.jit
def _store_scales(absmax_ptr, first_block, stored, n, BLOCK: tl.constexpr, QB: tl.constexpr,
                  LANES: tl.constexpr):
    index = first_block + tl.arange(0, BLOCK // QB)[:, None]
    lane = tl.arange(0, LANES)[None, :]
    tl.store(absmax_ptr + index + lane, tl.broadcast_to(stored[:, None], [BLOCK // QB, LANES]),
             mask=(lane == 0) & (index * QB < n))"""


def _scale_load(col: str, block: int, mask: str, other: str) -> str:
    """The float32 scale of the block of element ``offs`` of quantized state ``col``."""
    stored = f"tl.load(ptr_{col}{ir.ABSMAX_SUFFIX} + offs // {block}{mask}{other})"
    return f"(({stored}.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True))"


def _q8_store_source() -> str:
    """A jit helper: requantize BLOCK new values of a q8 state in registers and store codes and scales.

    Per block of 256: scale = max |x| rounded up to bfloat16; y = x / scale (x / 1 for an all-zero
    block); the code is the number of map midpoints strictly below y. It takes one table read, no
    search: the top QUANT_BUCKET_BITS bits of y (sign, exponent, leading mantissa bits) pick its
    bucket of values, whose entry (codegen.ops.bucket_table) holds the count of midpoints below the
    bucket and the low bits of the one midpoint (rounded down to float32, which is exact:
    fusedopt.quant.midpoints_below_f32) that may lie inside it; y is above that midpoint exactly
    when its own low bits are larger (complemented on both sides for a negative y, where larger bits
    mean a smaller value). A block holding NaN or Inf stores scale NaN and the codes of 0, so it
    decodes to NaN. The same rounding as fusedopt.quant.encode_state, bit for bit. MASKED is False
    where the caller knows every offset is inside the tensor: the codes are then stored without a
    mask, as vector stores."""
    lines = _scaled_blocks("_q8_store(x, codes_ptr, absmax_ptr, qbucket, offs, first_block, n, "
                           "BLOCK: tl.constexpr, MASKED: tl.constexpr)", QUANT_BLOCK) + _bucket_code()
    lines += _store_codes("offs", "code.to(tl.uint8)", "offs < n") + [
        f"    _store_scales(absmax_ptr, first_block, {_SCALE_STORED}, n, BLOCK, {QUANT_BLOCK}, 32)",
    ]
    return "\n".join(lines)


def _bucket_code() -> list[str]:
    """Lines of a requantizing helper: ``code``, the count of map midpoints below ``y``, from one read
    of the map's bucket table ``qbucket`` (see _q8_store_source)."""
    shift = 32 - QUANT_BUCKET_BITS
    return [f"    entry = tl.load(qbucket + (y.to(tl.uint32, bitcast=True) >> {shift}))",
            "    bits = y.to(tl.int32, bitcast=True)",
            f"    low = (bits ^ (bits >> 31)) & {(1 << shift) - 1:#x}  # complemented where y < 0",
            "    code = (entry & 0xFF) + (low > (entry >> 8)).to(tl.int32)"]


def _store_codes(index: str, value: str, mask: str) -> list[str]:
    """Lines of a requantizing helper that store its codes: masked, or (MASKED false) as vectors."""
    return ["    if MASKED:",
            f"        tl.store(codes_ptr + {index}, {value}, mask={mask})",
            "    else:",
            f"        tl.store(codes_ptr + {index}, {value})"]


def _q4_store_source(signed: bool) -> str:
    """The q4 counterpart of _q8_store for the signed or the unsigned map: blocks of 128, 16 codes
    (the count of the 15 midpoints below y: in closed form for an even grid, see _even_grid, else
    from the map's bucket table ``qbucket`` as _q8_store does), two codes per byte (element 2i in the
    low nibble of byte i); codes past the end of the tensor are 0, as fusedopt.quant.pack_nibbles
    pads."""
    kind = "s" if signed else "u"
    code_map = quant.Q4.code(signed)
    lines = _scaled_blocks(f"_q4_store_{kind}(x, codes_ptr, absmax_ptr, qbucket, offs, first_block, n, "
                           "BLOCK: tl.constexpr, RUN: tl.constexpr, MASKED: tl.constexpr)", QUANT4_BLOCK)
    grid = _even_grid(code_map)
    if grid is not None:  # an even grid: the count of midpoints below y in closed form
        inverse, offset = grid
        lines.append(f"    code = tl.minimum(tl.maximum(tl.ceil(y * {inverse!r} - {offset!r}), 0.0), "
                     f"{float(code_map.numel() - 1)!r}).to(tl.int32)")
    else:
        lines += _bucket_code()
    lines += [
        "    if MASKED:",
        "        code = tl.where(offs < n, code, 0)",
        "    low, high = tl.split(tl.reshape(code, [BLOCK // 2, 2]))",
        f"    byte = _byte_runs(first_block * {QUANT4_BLOCK // 2}, BLOCK, RUN)",
    ] + _store_codes("byte", "tl.reshape((low | (high << 4)).to(tl.uint8), [BLOCK // (2 * RUN), RUN])",
                     "byte * 2 < n") + [
        f"    _store_scales(absmax_ptr, first_block, {_SCALE_STORED}, n, BLOCK, {QUANT4_BLOCK}, "
        f"{QUANT4_BLOCK} // (2 * RUN))",
    ]
    return "\n".join(lines)


# The bytes of BLOCK 4-bit codes from byte ``first``, as [BLOCK // (2 * RUN), RUN] runs. Triton lays
# out a q4 kernel's blocks with one 16-byte vector of parameters per thread (4 float32 or 8 bfloat16
# elements, so 2 or 4 code bytes), and runs of that length let each thread move its codes with one
# access. As a flat run of BLOCK // 2 bytes it would give the access 4 bytes per thread, which for
# float32 parameters moves the codes through shared memory (with barriers) to and from the registers.
_BYTE_RUNS = """

@triton.jit
def _byte_runs(first, BLOCK: tl.constexpr, RUN: tl.constexpr):
    return first + (tl.arange(0, BLOCK // (2 * RUN)) * RUN)[:, None] + tl.arange(0, RUN)[None, :]


@triton.jit
def _nibbles(codes_ptr, first, n, BLOCK: tl.constexpr, RUN: tl.constexpr, MASKED: tl.constexpr):
    byte = _byte_runs(first // 2, BLOCK, RUN)
    if MASKED:
        packed = tl.load(codes_ptr + byte, mask=byte * 2 < n, other=0)
    else:
        packed = tl.load(codes_ptr + byte)
    packed = tl.reshape(packed, [BLOCK // 2])
    return tl.reshape(tl.join(packed & 15, packed >> 4), [BLOCK]).to(tl.int32)"""


def _code_bytes_per_thread(spec: KernelSpec) -> int:
    """RUN of _byte_runs: the code bytes of one 16-byte vector of parameters."""
    return 16 // _ITEMSIZE[spec.param_dtype] // 2


def _even_grid(code_map) -> tuple[float, float] | None:
    """(1 / h, v0 / h + 1/2) when the map is the even grid v0 + c * h (c = 0 .. N-1) with h a power of
    two, else None. Then the midpoints are v0 + (c + 1/2) h, and the count of those strictly below a
    float32 y is ceil(y / h - (v0 / h + 1/2)) clamped to [0, N - 1], exactly: y / h is a product by a
    power of two, and the subtraction is exact where y / h is at least half the offset (Sterbenz's
    lemma, and above 2 * offset both are multiples of the ulp of y / h); below that the exact
    difference is negative, so any rounding of it keeps the count at 0. A y on a midpoint gives an
    integer, whose ceiling counts only the midpoints below it. torchao's 4-bit map for the second
    moment, k / 16 for k = 1..16, is such a grid."""
    values = [float(v) for v in code_map.tolist()]
    h = values[1] - values[0]
    if h <= 0 or math.frexp(h)[0] != 0.5 or any(v != values[0] + c * h for c, v in enumerate(values)):
        return None
    offset = values[0] / h + 0.5
    if offset * 4 != int(offset * 4):  # keep the subtraction exact: a multiple of a quarter
        return None
    return 1.0 / h, offset


def _even_grid_values(code_map) -> tuple[float, float] | None:
    """(v0 / h, h) when the map is an even grid (see _even_grid) whose every value float32 computes
    exactly as (c + v0 / h) * h, the closed-form decode; else None. torchao's k / 16 is (c + 1) / 16."""
    grid = _even_grid(code_map)
    if grid is None:
        return None
    step, first = 1.0 / grid[0], grid[1] - 0.5
    closed = (torch.arange(code_map.numel(), dtype=torch.float32) + first) * step
    return (first, step) if torch.equal(closed.view(torch.int32), code_map.view(torch.int32)) else None


# the jit helper that writes a parameter of this dtype with stochastic rounding
SR_HELPERS = {"bf16": "to_bf16_sr", "fp16": "to_fp16_sr"}


def _rounds_stochastically(spec: KernelSpec) -> bool:
    return spec.lowered.program.stochastic_rounding and spec.param_dtype in SR_HELPERS


# Per element offset ``offs``: the index of its value in a tensor of each layout, and whether it is
# the first element of its row, column or block (the one that writes a per-row value or adds it to a
# reduction). g_n: elements per row (or block); g_rn: per matrix (rows times g_n; a leading index
# counts matrices, as torch.optim.Adafactor treats them).
LAYOUT_INDEX = {"full": "offs", "rows": "offs // g_n", "blocks": "offs // g_n", "cols": "offs // g_rn * g_n + offs % g_n",
                "batch": "offs // g_rn", "scalar": "offs * 0"}
LAYOUT_OWNER = {"full": None, "rows": "(offs % g_n == 0)", "blocks": "(offs % g_n == 0)", "cols": "(offs % g_rn < g_n)",
                "batch": "(offs % g_rn == 0)", "scalar": "(offs == 0)"}
AXIS_LENGTH = {"rows": "g_n", "blocks": "g_n", "cols": "(g_rn // g_n)"}


def _layout(spec: KernelSpec, name: str) -> str:
    return spec.lowered.layouts.get(name, "full")


def _code_lookup(state: ir.State, col: str, mask: str, other: str, whole_blocks: bool,
                 run: int) -> tuple[str, int]:
    """The map value (float32, before scaling) of each element at ``offs`` of quantized state
    ``col``, and the elements per scale of its format (``whole_blocks``: see _load; ``run``: see
    _byte_runs)."""
    if state.dtype == "q4":
        table = "q4map_u" if state.nonnegative else "q4map_s"
        if whole_blocks:
            nibble = f"_nibbles(ptr_{col}, start + i * BLOCK, n, BLOCK, {run}, {bool(mask)})"
        else:
            nibble = f"((tl.load(ptr_{col} + offs // 2{mask}{other}) >> ((offs % 2) * 4).to(tl.uint8)) & 15)"
        grid = _even_grid_values(quant.Q4.code(not state.nonnegative))
        if grid is not None:  # the map's values in closed form: no table read
            first, step = grid
            return f"(({nibble}).to(tl.float32) + {first!r}) * {step!r}", QUANT4_BLOCK
        return f"tl.load({table} + {nibble}.to(tl.int32))", QUANT4_BLOCK
    table = "qmap_u" if state.nonnegative else "qmap_s"
    return f"tl.load({table} + tl.load(ptr_{col} + offs{mask}{other}).to(tl.int32))", QUANT_BLOCK


def _load(spec: KernelSpec, col: str, mask: str, whole_blocks: bool = False) -> str:
    """The float32 value of column ``col`` at ``offs``; q8 and q4 states are decoded through their
    maps. ``whole_blocks``: offs is the run of BLOCK elements from ``start + i * BLOCK``, which
    starts a quantization block, so each block's scale is loaded once (_scaled) rather than once
    per element."""
    state = next((s for s in spec.lowered.program.states if s.name == col), None)
    if state is not None and state.quantized:
        other = ", other=0" if mask else ""
        value, block = _code_lookup(state, col, mask, other, whole_blocks, _code_bytes_per_thread(spec))
        if whole_blocks:
            return (f"_scaled({value}, ptr_{col}{ir.ABSMAX_SUFFIX}, (start + i * BLOCK) // {block}, n, "
                    f"BLOCK, {block})")
        return f"({value} * {_scale_load(col, block, mask, other)})"
    layout = _layout(spec, col)
    return f"tl.load(ptr_{col} + {LAYOUT_INDEX[layout]}{_unless_scalar(layout, mask)}).to(tl.float32)"


# A store of a full-size column in a kernel whose blocks are laid out with PER_THREAD consecutive
# elements per thread (_holds_runs: 2-byte values or q8 codes ask for it), but Triton stores at
# most 16 bytes (V elements) per thread and instruction, so for a wider run it would first move the
# values through shared memory (with a barrier on each side) into a layout of one 16-byte vector
# per thread. Split instead into PER_THREAD // V tiles of [BLOCK // PER_THREAD, V] (tile k holds
# vector k of every thread's run), each tile's store has the layout the registers hold: one vector
# per thread. For 2 or 4 vectors per run (_run_tiles; with 2 its last two tiles repeat the first
# two, unused); otherwise the plain store. Which instruction writes an element changes; what is
# written does not.
_STORE_RUNS = """

@triton.jit
def _run_tiles(x, RUNS: tl.constexpr, K: tl.constexpr, V: tl.constexpr):
    if K == 2:
        t0, t1 = tl.split(tl.permute(tl.reshape(x, [RUNS, 2, V]), [0, 2, 1]))
        return t0, t1, t0, t1
    else:
        even, odd = tl.split(tl.permute(tl.reshape(x, [RUNS, 2, 2, V]), [0, 3, 1, 2]))
        t0, t2 = tl.split(even)
        t1, t3 = tl.split(odd)
        return t0, t1, t2, t3


@triton.jit
def _store_runs(ptr, first, x, mask, BLOCK: tl.constexpr, PER_THREAD: tl.constexpr, V: tl.constexpr,
                MASKED: tl.constexpr):
    K: tl.constexpr = PER_THREAD // V
    RUNS: tl.constexpr = BLOCK // PER_THREAD
    if (PER_THREAD == 2 * V) or (PER_THREAD == 4 * V):
        row = first + (tl.arange(0, RUNS) * PER_THREAD)[:, None] + tl.arange(0, V)[None, :]
        x0, x1, x2, x3 = _run_tiles(x, RUNS, K, V)
        if MASKED:
            m0, m1, m2, m3 = _run_tiles(mask, RUNS, K, V)
            tl.store(ptr + row, x0, mask=m0)
            tl.store(ptr + row + V, x1, mask=m1)
            if K == 4:
                tl.store(ptr + row + 2 * V, x2, mask=m2)
                tl.store(ptr + row + 3 * V, x3, mask=m3)
        else:
            tl.store(ptr + row, x0)
            tl.store(ptr + row + V, x1)
            if K == 4:
                tl.store(ptr + row + 2 * V, x2)
                tl.store(ptr + row + 3 * V, x3)
    else:
        offs = first + tl.arange(0, BLOCK)
        if MASKED:
            tl.store(ptr + offs, x, mask=mask)
        else:
            tl.store(ptr + offs, x)"""


def _holds_runs(spec: KernelSpec) -> bool:
    """Whether Triton lays out the kernel's blocks in runs of PER_THREAD elements per thread: where
    a full-size column holds 2-byte values (16 bytes make 8 of them) or q8 codes. (Float32 columns
    alone give 4 per thread, and so do a q4 state's packed codes beside float32 parameters.)"""
    low = spec.lowered
    columns = [spec.param_dtype, spec.grad_dtype] + [
        s.dtype for s in low.program.states if _layout(spec, s.name) == "full"]
    return any(dtype in ("bf16", "fp16", "q8") for dtype in columns)


# Decoding a run of whole quantization blocks: the map values times their block's scale, loaded
# once per block (a [BLOCK // QB] vector, broadcast along each block's row) instead of per element.
_SCALED = """

@triton.jit
def _scaled(values, absmax_ptr, first_block, n, BLOCK: tl.constexpr, QB: tl.constexpr):
    index = first_block + tl.arange(0, BLOCK // QB)
    stored = tl.load(absmax_ptr + index, mask=index * QB < n, other=0)
    scale = (stored.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return tl.reshape(tl.reshape(values, [BLOCK // QB, QB]) * scale[:, None], [BLOCK])"""


def _unless_scalar(layout: str, mask: str) -> str:
    """A per-tensor value is at index 0, which exists even for an empty tensor: never masked."""
    return "" if layout == "scalar" else mask


def _load_small(spec: KernelSpec, name: str, mask: str) -> str:
    """A stored or reduced per-row (column, block) value, float32, for each element at ``offs``."""
    r = next(r for r in spec.lowered.reductions if r.name == name)
    value = f"tl.load(acc_small + b_{name} + {LAYOUT_INDEX[r.layout]}{_unless_scalar(r.layout, mask)})"
    if r.op == "mean":
        value = f"({value} / {AXIS_LENGTH[r.over]})"
    return f"{value}.to(tl.float32)"


def _used(exprs) -> set[str]:
    return {n for e in exprs for n in ir.free_names(e)}


def _load_inputs(out: "_Lines", spec: KernelSpec, indent: int, used: set[str], level: int, mask: str,
                 whole_blocks: bool = False) -> None:
    """Loads of the tensors and stored values that the expressions of phase ``level`` read
    (``whole_blocks``: see _load)."""
    prog = spec.lowered.program
    for col in (ir.PARAM, ir.GRAD, *prog.state_names):
        if col in used:
            out.add(indent, f"v_{col} = {_load(spec, col, mask, whole_blocks)}")
    for r in spec.lowered.small:
        if r.phase < level and r.name in used:
            out.add(indent, f"v_{r.name} = {_load_small(spec, r.name, mask)}")


class _Lines:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, indent: int, text: str) -> None:
        self.lines.append("    " * indent + text)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def module_header(out: _Lines, titles: list[str], listing: str, target: str) -> None:
    """The comment block (titles, then ``listing`` quoted line by line) and the imports that open
    every generated kernel module."""
    for title in titles:
        out.add(0, f"# {title}")
    out.add(0, "# Generated: deterministic text, and the cache key. Do not edit.")
    for line in listing.splitlines():
        out.add(0, f"#   {line}")
    out.add(0, "import triton")
    out.add(0, "import triton.language as tl")
    if target == "cuda":
        out.add(0, "from triton.language.extra import libdevice")


def render(spec: KernelSpec) -> str:
    low = spec.lowered
    prog = low.program
    scalar = TritonPrinter("scalar", spec.target)
    element = TritonPrinter("element", spec.target)
    out = _Lines()
    module_header(out, [f"fusedopt kernel for rule '{prog.name}' (program {prog.key()[:16]})",
                        f"param {spec.param_dtype}, grad {spec.grad_dtype}, target {spec.target}"],
                  prog.pretty(), spec.target)
    imports_at = len(out.lines)
    stores_bf16 = any(spec.dtype_of(target) == "bf16" for target, _ in low.outputs)
    if stores_bf16:
        out.lines += _BF16_RNE[spec.target].splitlines()
    if prog.has_quantized_states:
        out.lines += (_SCALED + _OVER_SCALE + _STORE_SCALES).splitlines()
    if _holds_runs(spec):
        out.lines += _STORE_RUNS.splitlines()
    if any(s.dtype == "q8" for s in prog.states):
        out.lines += _q8_store_source().splitlines()
    if any(s.dtype == "q4" for s in prog.states):
        out.lines += _BYTE_RUNS.splitlines()
    for signed in (True, False):
        if any(s.dtype == "q4" and s.nonnegative != signed for s in prog.states):
            out.lines += _q4_store_source(signed).splitlines()
    if not spec.single_pass:
        for phase in range(low.n_phases):
            _kernel(out, spec, scalar, element, phase)
    _kernel(out, spec, scalar, element, None)
    helpers = scalar.helpers | element.helpers | ({SR_HELPERS[spec.param_dtype]} if _rounds_stochastically(spec) else set())
    if helpers:
        out.lines.insert(imports_at, f"from codegen.jit_helpers import {', '.join(sorted(helpers))}")
    return out.text()


def single_pass_possible(lowered: Lowered) -> bool:
    """Whether a program's phases can all run in one kernel, for tensors whose rows (or blocks) each lie
    in one program's chunk: every reduction and stored value is per row or per block of values per
    row, per block or per element, so a program reduces, stores and updates its own rows and reads
    nothing another program writes. It then reads its chunk once from memory (later phases find it
    in cache) and the step is one launch instead of one per phase."""
    return bool(lowered.reductions) and all(
        r.small and r.layout in ("rows", "blocks") and r.arg_layout in ("full", "rows", "blocks")
        for r in lowered.reductions)


def _body(out: _Lines, spec: KernelSpec, element: TritonPrinter, masked: bool) -> None:
    """Loads, elementwise math and stores of one block."""
    low = spec.lowered
    prog = low.program
    mask = ", mask=mask" if masked else ""
    used = _used([e for _, e in low.temps] + [e for _, e in low.outputs])
    _load_inputs(out, spec, 3, used, low.n_phases, mask, whole_blocks=True)
    for name, expr in low.temps:
        out.add(3, f"v_{name} = {element(expr)}")
    per_element = {ir.PARAM, ir.GRAD, *prog.state_names, *(n for n, _ in low.temps), *low.layouts}
    for target, expr in low.outputs:
        value = element(expr)
        if not ir.free_names(expr) & per_element:  # a per-tensor constant: broadcast it to the block
            value = f"tl.broadcast_to({value}, [BLOCK])"
        if spec.dtype_of(target) in ir.QUANTIZED:
            if masked:
                value = f"tl.where(mask, {value}, 0.0)"
            state = next(s for s in prog.states if s.name == target)
            kind = "u" if state.nonnegative else "s"
            indent = 3
            if low.skip_flag is not None:  # a skipped step keeps the codes (re-encoding may move them)
                out.add(3, f"if s_{low.skip_flag} == 0:")
                indent = 4
            pointers = f"ptr_{target}, ptr_{target}{ir.ABSMAX_SUFFIX}"
            if state.dtype == "q4":
                out.add(indent, f"_q4_store_{kind}({value}, {pointers}, q4bucket_{kind}, offs, "
                                f"(start + i * BLOCK) // {QUANT4_BLOCK}, n, BLOCK, "
                                f"{_code_bytes_per_thread(spec)}, {masked})")
            else:
                out.add(indent, f"_q8_store({value}, {pointers}, qbucket_{kind}, offs, "
                                f"(start + i * BLOCK) // {QUANT_BLOCK}, n, BLOCK, {masked})")
            continue
        owner = LAYOUT_OWNER[_layout(spec, target)]
        if owner is not None:  # a per-row (column, block) state: its first element writes it
            written = f"_to_bf16_rne({value})" if spec.dtype_of(target) == "bf16" else f"({value}).to(tl.float32)"
            where = f"{owner} & mask" if masked and _layout(spec, target) != "scalar" else owner
            out.add(3, f"tl.store(ptr_{target} + {LAYOUT_INDEX[_layout(spec, target)]}, {written}, mask={where})")
            continue
        if target == ir.PARAM and _rounds_stochastically(spec):
            value = f"{SR_HELPERS[spec.param_dtype]}({value}, s_{ir.SR_SEED}, s_{ir.STEP}, n, offs)"
        elif spec.dtype_of(target) == "bf16":
            value = f"_to_bf16_rne({value})"
        else:
            value = f"({value}).to({TRITON_DTYPES[spec.dtype_of(target)]})"
        if _holds_runs(spec):
            vector = 16 // _ITEMSIZE[spec.dtype_of(target)]
            out.add(3, f"_store_runs(ptr_{target}, start + i * BLOCK, {value}, {'mask' if masked else 'None'}, "
                       f"BLOCK, PER_THREAD, {vector}, {masked})")
        else:
            out.add(3, f"tl.store(ptr_{target} + offs, {value}{mask})")


SIGNATURE = ("ptrs, hparams, numels, chunk_tensor, chunk_start, chunk_count, done, acc_tensor, acc_group, "
             "group_done, n_programs, geometry, small_base, acc_small, "
             "BLOCK: tl.constexpr, ITERS: tl.constexpr, ROWS: tl.constexpr, ALIGNED: tl.constexpr, "
             "PER_THREAD: tl.constexpr")
KERNEL_ARGS = tuple(a.split(":")[0].strip() for a in SIGNATURE.split(","))


def reduction_slot(spec: KernelSpec, name: str) -> str:
    """Where a reduction's running value lives: a per-tensor row or the group table."""
    r = next(r for r in spec.lowered.reductions if r.name == name)
    same = [x.name for x in spec.lowered.reductions if x.over == r.over]
    if r.over == "tensor":
        return f"acc_tensor + tid * {len(same)} + {same.index(name)}"
    return f"acc_group + {same.index(name)}"


def _kernel(out: _Lines, spec: KernelSpec, scalar: TritonPrinter, element: TritonPrinter, phase: int | None):
    """One kernel: reduction phase ``phase``, or the final, updating phase when phase is None."""
    low = spec.lowered
    prog = low.program
    cols = spec.columns
    final = phase is None
    level = low.n_phases if final else phase
    out.add(0, "")
    out.add(0, "")
    out.add(0, "@triton.jit")
    out.add(0, f"def {'fused_step' if final else f'reduce_phase_{phase}'}({SIGNATURE}):")
    out.add(1, "pid = tl.program_id(0)")
    out.add(1, "tid = tl.load(chunk_tensor + pid)")
    out.add(1, "start = tl.load(chunk_start + pid)")
    out.add(1, "n = tl.load(numels + tid)")
    out.add(1, f"row = ptrs + tid * {len(cols)}")
    for i, col in enumerate(cols):
        out.add(1, f"ptr_{col} = tl.load(row + {i}).to(tl.pointer_type({TRITON_DTYPES[spec.dtype_of(col)]}))")
    out.add(1, "if ALIGNED:")
    for col in cols[:-1]:
        out.add(2, f"ptr_{col} = tl.multiple_of(ptr_{col}, 16)")
    out.add(2, "start = tl.multiple_of(start, 16)")
    if prog.has_small_layouts:
        out.add(1, "# the tensor's row length (or block size), its matrix size, and its per-row buffers")
        out.add(1, "g_n = tl.load(geometry + tid * 2)")
        out.add(1, "g_rn = tl.load(geometry + tid * 2 + 1)")
        for k, r in enumerate(low.small):
            out.add(1, f"b_{r.name} = tl.load(small_base + tid * {len(low.small)} + {k})")
    out.add(1, "# hyperparameters, the step and the size, float64, once per program")
    for i, name in enumerate(prog.hparams):
        out.add(1, f"s_{name} = tl.load(tl.load(hparams + {i}).to(tl.pointer_type(tl.float64)))")
    if prog.has_quantized_states:  # the maps and their bucket tables follow the hyperparameters
        h = len(prog.hparams)
        for k, (name, dtype) in enumerate(QUANT_TABLES):
            out.add(1, f"{name} = tl.load(hparams + {h + k}).to(tl.pointer_type(tl.{dtype}))")
    out.add(1, f"s_{ir.STEP} = tl.load(ptr_{ir.STEP}).to(tl.float64) + 1.0")
    out.add(1, f"s_{ir.NUMEL} = n.to(tl.float64)")
    done_reductions = [r for r in low.reductions if r.phase < level and not r.small]
    for r in done_reductions:
        out.add(1, f"s_{r.name} = tl.load({reduction_slot(spec, r.name)}).to(tl.float64)")
    scalars = [(n, e) for n, e in low.scalars if low.available_in(n) <= level]
    for name, expr in scalars:
        out.add(1, f"s_{name} = {scalar(expr)}")
    booleans: frozenset[str] = frozenset()
    for name, expr in scalars:
        if is_boolean(expr, booleans):
            booleans |= {name}
    for name in (*prog.hparams, ir.STEP, ir.NUMEL, *(r.name for r in done_reductions), *(n for n, _ in scalars)):
        cast = "" if name in booleans else ".to(tl.float32)"
        out.add(1, f"v_{name} = s_{name}{cast}")
    if not final:
        _reduce_body(out, spec, element, phase)
        return
    if spec.single_pass:
        for p in range(low.n_phases):
            out.add(1, f"# phase {p}, on this program's own rows; the barrier makes its results visible")
            _reduce_body(out, spec, element, p)
            out.add(1, "tl.debug_barrier()")
        out.add(1, "# the update")
    out.add(1, "for i in range(ITERS):")
    out.add(2, "offs = start + i * BLOCK + tl.arange(0, BLOCK)")
    # A mask whose value is unknown per 16-byte group blocks vectorised access, so blocks that lie
    # wholly inside the tensor take an unmasked copy of the body; only the tail is masked.
    out.add(2, "if start + (i + 1) * BLOCK <= n:")
    _body(out, spec, element, masked=False)
    out.add(2, "else:")
    out.add(3, "mask = offs < n")
    _body(out, spec, element, masked=True)
    out.add(1, "# the last program of this tensor to finish advances its step counter (and resets its")
    out.add(1, "# reduction accumulators); the last program of all resets the group accumulators")
    out.add(1, "if tl.atomic_add(done + tid, 1) == tl.load(chunk_count + tid) - 1:")
    if low.skip_flag is not None:  # a skipped step does not count
        out.add(2, f"tl.store(ptr_{ir.STEP}, tl.where(s_{low.skip_flag} != 0, s_{ir.STEP} - 1.0, s_{ir.STEP})"
                   ".to(tl.float32))")
    else:
        out.add(2, f"tl.store(ptr_{ir.STEP}, s_{ir.STEP}.to(tl.float32))")
    out.add(2, "tl.store(done + tid, 0)")
    for r in low.reductions:
        if r.over == "tensor":
            out.add(2, f"tl.store({reduction_slot(spec, r.name)}, {_INIT[r.op]})")
    group = [r for r in low.reductions if r.over == "group"]
    if group:
        out.add(1, "if tl.atomic_add(group_done, 1) == n_programs - 1:")
        for r in group:
            out.add(2, f"tl.store({reduction_slot(spec, r.name)}, {_INIT[r.op]})")
        out.add(2, "tl.store(group_done, 0)")


_INIT = {"sum": "0.0", "mean": "0.0", "max": "float('-inf')"}
# The cell a block's values reduce to is the same for the whole block when the block lies in one row
# (block, matrix): then one atomic adds the block's partial result instead of one per element.
_ONE_CELL = {"rows": "g_n", "blocks": "g_n", "batch": "g_rn"}


def _weight(r) -> str | None:
    """How many elements of the reduced axis the first element of a cell of the argument's layout
    stands for: a per-row value reduced over rows counts once per element of the row."""
    if r.op == "max":
        return None
    constant = {"rows": ("rows", "blocks", "batch", "scalar"), "blocks": ("rows", "blocks", "batch", "scalar"),
                "cols": ("cols", "batch", "scalar")}[r.over]
    return AXIS_LENGTH[r.over] if r.arg_layout in constant else None


def tiled_phases(lowered: Lowered) -> frozenset[int]:
    """Reduction phases with a reduction kept per column. Their programs take tiles of ROWS rows and
    BLOCK columns (chunk tables from codegen.launch.tiles): a column's partial result is summed in
    registers down the tile's rows, then added with one atomic per column, where a program over a
    contiguous chunk would need one atomic per element."""
    return frozenset(r.phase for r in lowered.small if r.layout == "cols" and r.op != "store")


def _reduce_body(out: _Lines, spec: KernelSpec, element: TritonPrinter, phase: int) -> None:
    """Partial reductions of this program's chunk (or tile), added atomically to the accumulators,
    and the per-row (column, block) values this phase stores."""
    low = spec.lowered
    tiled = phase in tiled_phases(low)
    reductions = [r for r in low.reductions if r.phase == phase]
    whole = [r for r in reductions if not r.small]
    columns = [r for r in reductions if tiled and r.layout == "cols" and r.op != "store"]
    for r in whole + columns:
        out.add(1, f"acc_{r.name} = tl.full([BLOCK], {_INIT[r.op]}, tl.float64)")
    if tiled:
        out.add(1, "# a tile: ROWS rows of BLOCK columns of one matrix, from column c0 of the row at start")
        out.add(1, "c0 = start % g_n")
        out.add(1, "in_row = c0 + tl.arange(0, BLOCK) < g_n")
        out.add(1, "end = tl.minimum((start // g_rn + 1) * g_rn, n)  # of the matrix: rows past it are masked")
        out.add(1, "for i in range(ROWS):")
        out.add(2, "offs = start + i * g_n + tl.arange(0, BLOCK)")
        out.add(2, "mask = in_row & (offs < end)")
    else:
        out.add(1, "for i in range(ITERS):")
        out.add(2, "offs = start + i * BLOCK + tl.arange(0, BLOCK)")
        out.add(2, "mask = offs < n")
    _load_inputs(out, spec, 2, _used([r.arg for r in reductions]), phase, ", mask=mask")
    for r in reductions:
        value = f"tl.broadcast_to({element(r.arg)}, [BLOCK])"
        if r.op == "store":
            keep = LAYOUT_OWNER[r.layout] if r.layout == "scalar" else f"mask & {LAYOUT_OWNER[r.layout]}"
            out.add(2, f"tl.store(acc_small + b_{r.name} + {LAYOUT_INDEX[r.layout]}, {value}.to(tl.float64), "
                       f"mask={keep})")
        elif r in columns:
            keep, part = _contribution(r, f"{value}.to(tl.float64)")
            if r.op == "max":
                out.add(2, f"acc_{r.name} = tl.maximum(acc_{r.name}, tl.where({keep}, {part}, float('-inf')))")
            else:
                out.add(2, f"acc_{r.name} += tl.where({keep}, {part}, 0.0)")
        elif r.small:
            _small_reduction(out, r, f"{value}.to(tl.float64)", tiled)
        elif r.op == "sum":
            out.add(2, f"acc_{r.name} += tl.where(mask, {value}.to(tl.float64), 0.0)")
        else:
            out.add(2, f"acc_{r.name} = tl.maximum(acc_{r.name}, tl.where(mask, {value}.to(tl.float64), float('-inf')))")
    for r in whole:
        atomic = "tl.atomic_add" if r.op == "sum" else "tl.atomic_max"
        combine = "tl.sum" if r.op == "sum" else "tl.max"
        # float64 partial sums and atomics, as the reference: float32 atomics flush subnormal values
        # to zero (a squared norm of tiny updates would vanish), float32 sums lose digits
        out.add(1, f"{atomic}({reduction_slot(spec, r.name)}, {combine}(acc_{r.name}, axis=0))")
    if columns:
        out.add(1, "offs = start + tl.arange(0, BLOCK)  # the tile's columns, in its first row")
        for r in columns:
            atomic = "tl.atomic_max" if r.op == "max" else "tl.atomic_add"
            out.add(1, f"{atomic}(acc_small + b_{r.name} + {LAYOUT_INDEX['cols']}, acc_{r.name}, "
                       "mask=in_row & (offs < n))")


def _contribution(r, value: str) -> tuple[str, str]:
    """Which elements add to a per-row (column, block) reduction, and what each adds: the first
    element of each cell of the argument's layout, weighted by the elements it stands for."""
    weight = _weight(r)
    owner = LAYOUT_OWNER[r.arg_layout]
    return (f"mask & {owner}" if owner else "mask"), (f"{value} * {weight}" if weight is not None else value)


def _small_reduction(out: _Lines, r, value: str, tiled: bool) -> None:
    """One block's contribution to a per-row (column, block) reduction, added atomically: with one
    atomic when the block lies in one cell of the result, else one per contributing element."""
    keep, value = _contribution(r, value)
    identity = "float('-inf')" if r.op == "max" else "0.0"
    atomic, combine = ("tl.atomic_max", "tl.max") if r.op == "max" else ("tl.atomic_add", "tl.sum")
    out.add(2, f"part = tl.where({keep}, {value}, {identity})")
    target = f"acc_small + b_{r.name}"
    cell = _ONE_CELL.get(r.layout)
    if r.layout == "scalar":
        out.add(2, f"{atomic}({target}, {combine}(part, axis=0))")
    elif cell is not None and tiled:  # a tile's row lies in one row and one matrix
        out.add(2, "first = start + i * g_n")
        out.add(2, f"{atomic}({target} + first // {cell}, {combine}(part, axis=0), mask=first < end)")
    elif cell is not None:
        out.add(2, "first = start + i * BLOCK")
        out.add(2, "last = tl.minimum(first + BLOCK, n) - 1")
        out.add(2, f"if first // {cell} == last // {cell}:")
        out.add(3, f"{atomic}({target} + first // {cell}, {combine}(part, axis=0), mask=first <= last)")
        out.add(2, "else:")
        out.add(3, f"{atomic}({target} + {LAYOUT_INDEX[r.layout]}, part, mask={keep})")
    else:
        out.add(2, f"{atomic}({target} + {LAYOUT_INDEX[r.layout]}, part, mask={keep})")
