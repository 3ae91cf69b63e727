"""Exact block-wise top-k by magnitude as one Triton kernel (the selection of MicroAdam).

Same contract as :func:`fusedopt.sparse.block_topk`, which is its oracle: the flat tensor is cut into
blocks as :func:`fusedopt.sparse.topk_layout` describes, each block keeps its k entries of largest
``|a|`` with ties going to the lower index, and the kept block-local indices come out ascending (int16)
with their values.

One program per block. The block is loaded once and never sorted:

1. **Key.** For a float ``x`` (bf16 and fp16 are widened to float32 exactly), the bits of ``|x|``
   read as an int32 order non-negative floats exactly as their values: ``0 <= key`` and
   ``|x| < |y|  <=>  key(x) < key(y)``. ``-0.0`` and ``0.0`` share key 0; NaNs (0x7F80_0001 and up)
   are above +inf, so a NaN counts as the largest magnitude, as in the oracle. Padding lanes get -1.
2. **Threshold (radix select on the key bits).** ``T`` is the largest key with at least k keys
   ``>= T``, i.e. the k-th largest key. It is built from the top bit down: bit ``b`` is set when
   ``count(key >= T | 2^b) >= k``. 31 block-wide counts, no data movement.
3. **Ties.** Every key ``> T`` is kept; the remaining ``k - count(key > T)`` places go to the keys
   equal to ``T`` in index order (a prefix count over the block).
4. **Output.** The kept lanes are compacted in index order by a prefix count, so the output of block
   ``j`` is already ascending, at columns ``j * k_full ...``.

A NaN payload other than the canonical one orders by its bits; the oracle treats all NaNs as equal.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedopt import sparse

_KEY_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def select_topk(key, k):
    """Which lanes hold the k largest keys (int32, -1 for padding), ties to the lower index, and each
    kept lane's rank among the kept ones in index order (steps 2 to 4 of the module docstring)."""
    threshold = tl.full([], 0, tl.int32)
    for i in range(31):
        candidate = threshold | (1 << (30 - i))
        count = tl.sum((key >= candidate).to(tl.int32), axis=0)
        threshold = tl.where(count >= k, candidate, threshold)
    above = key > threshold
    need = k - tl.sum(above.to(tl.int32), axis=0)
    tie = key == threshold
    keep = above | (tie & (tl.cumsum(tie.to(tl.int32), axis=0) <= need))
    return keep, tl.cumsum(keep.to(tl.int32), axis=0) - 1


@triton.jit
def _block_topk_kernel(
    a_ptr,
    index_ptr,
    value_ptr,
    numel,
    block,
    n_full,
    k_full,
    k_tail,
    BLOCK_SIZE: tl.constexpr,
):
    j = tl.program_id(0)
    start = j.to(tl.int64) * block
    size = tl.minimum(numel - start, block).to(tl.int32)
    k = tl.where(j < n_full, k_full, k_tail)
    lane = tl.arange(0, BLOCK_SIZE)
    valid = lane < size
    x = tl.load(a_ptr + start + lane, mask=valid, other=0.0)
    key = x.to(tl.float32).to(tl.int32, bitcast=True) & 0x7FFFFFFF
    key = tl.where(valid, key, -1)

    keep, rank = select_topk(key, k)
    column = j.to(tl.int64) * k_full + rank
    tl.store(index_ptr + column, lane.to(tl.int16), mask=keep)
    tl.store(value_ptr + column, x, mask=keep)


def block_topk(a: torch.Tensor, block: int, density: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index int16 [k], value [k])`` of the block top-k of the flat ``a``, computed by the kernel;
    equal to :func:`fusedopt.sparse.block_topk` (see the module docstring)."""
    if a.dtype not in _KEY_DTYPES:
        raise TypeError(
            f"the top-k kernel reads float32, bfloat16 or float16 tensors, got {a.dtype}; "
            "convert the tensor (MicroAdam computes in float32) or use fusedopt.sparse.block_topk"
        )
    flat = a.reshape(-1).contiguous()
    layout = sparse.topk_layout(flat.numel(), block, density)
    index = torch.empty(layout.k, dtype=torch.int16, device=flat.device)
    value = torch.empty(layout.k, dtype=flat.dtype, device=flat.device)
    n_blocks = layout.n_full + (1 if layout.tail else 0)
    largest = block if layout.n_full else layout.tail
    _block_topk_kernel[(n_blocks,)](
        flat,
        index,
        value,
        flat.numel(),
        block,
        layout.n_full,
        layout.k_full,
        layout.k_tail,
        BLOCK_SIZE=triton.next_power_of_2(largest),
    )
    return index, value
