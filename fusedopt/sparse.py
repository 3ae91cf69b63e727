"""Eager reference primitives of MicroAdam: block top-k, the 4-bit min/max error-feedback quantizer,
and the sliding window of sparse gradients. Plain torch, written for clarity: these are the oracle
that fused kernels are checked against.

Block top-k (:func:`topk_layout`, :func:`block_topk`). A flat tensor of ``d`` elements is cut into
``n_full = d // block`` full blocks of ``block`` elements and, when ``block`` does not divide ``d``, one
tail block of ``tail = d - n_full * block`` elements. Each full block keeps its ``k_full`` entries of
largest magnitude and the tail keeps its own ``k_tail``::

    k_full = max(1, ceil(density * block))      k_tail = max(1, ceil(density * tail))  (0 if tail == 0)
    k = n_full * k_full + k_tail

(a tensor smaller than ``block`` is a single tail block, so even a 3-element bias keeps one entry).
The product ``density * n`` is rounded to 6 decimals before the ceiling, so 0.07 * 100 gives 7, not
the 8 that the float product 7.000000000000001 would. Indices are **block-local** and stored as
int16, so ``block`` is at most 32767. Column ``c`` of the result belongs to block
``c // k_full`` while ``c < n_full * k_full`` and to the tail block after that; the global coordinate
of column ``c`` is ``block_start[c] + index[c]`` (:func:`column_block_starts`).

Tie-break (deterministic, documented): entries are ranked by ``(-|a_i|, i)``: larger magnitude first
and, among equal magnitudes, the lower index first. ``-0.0`` and ``0.0`` tie. A NaN counts as larger
than every number (so it is selected and propagates instead of hiding in the error feedback).
Within a block the selected indices are returned in **ascending** order, so the result is canonical:
two correct implementations give identical tensors.

Error feedback quantizer (:func:`ef_minmax`, :func:`ef_encode`, :func:`ef_decode`; 4-bit codes as
MicroAdam, or 8-bit ones with 255 in place of 15 below, one per byte, unpacked). The residual
``r`` is cut into quantization blocks of ``q`` elements (the last one partial). Block ``b`` stores its
minimum and maximum rounded to bfloat16, ``lo_b`` and ``hi_b``; everything else is float32::

    unit_b = (float32(hi_b) - float32(lo_b)) / 15
    code_i = clamp(floor((r_i - lo_b) / unit_b + 0.5), 0, 15)     (code_i = 0 when unit_b == 0)
    decode: r_i ~ code_i * unit_b + lo_b

Codes are packed two per byte in the official order: element ``2i`` in the HIGH nibble of byte
``i``, element ``2i + 1`` in the low nibble (an odd length leaves the low nibble of the last byte 0).
Unlike the official code, codes are clamped: because ``lo_b`` and ``hi_b`` are rounded to bf16, a value
at a block extreme can sit just outside ``[lo_b, hi_b]`` and give code 16 or -1 there, which spills
into the neighbouring nibble. Per element the round trip error is at most (:func:`ef_error_bound`)::

    |decode(encode(r))_i - r_i| <= max(unit_b / 2, 2^-8 * A_b) + 2^-20 * A_b,   A_b = max(|min_b|, |max_b|)

``unit_b / 2`` is the rounding to the nearest level when ``r_i`` lies inside ``[lo_b, hi_b]``;
``2^-8 * A_b`` bounds the bf16 rounding of the extremes (bf16 keeps 8 significant bits, so a rounding
to nearest moves a value by at most 2^-8 of its magnitude), which is the whole error of a clamped value
lying outside; ``2^-20 * A_b`` covers the float32 arithmetic (a handful of roundings of 2^-24 each).
A block whose min equals its max (all zeros, for example) has unit 0: codes are 0 and decode to
``lo_b``, exact up to the bf16 rounding of that one value. Non-finite values propagate instead of
becoming garbage codes: a block holding a NaN or an infinity has a non-finite min or max (hence unit),
its non-finite positions get code 0, and the block decodes to non-finite values.

Window (:func:`window_row`, :func:`window_ages`, :func:`window_moments`). A ring buffer of ``m`` rows of
``k`` (int16 block-local index, value) pairs. Step ``t`` (1-based) writes row ``(t - 1) mod m``. At step
``t`` only rows ``r < min(t, m)`` have been written; row ``r`` holds the step ``tau`` with
``(tau - 1) mod m == r`` most recently, whose age is ``t - tau = (t - 1 - r) mod m``. The window sums
scatter each row to its global coordinates::

    M = sum_r beta1^age(r) * value_r      S = sum_r beta2^age(r) * value_r^2
"""

from __future__ import annotations

import dataclasses
import math

import torch

from . import blocks
from .rounding import bf16_nearest

INT16_MAX = 32767
EF_LEVELS = 15  # 4-bit codes 0..15


def ef_levels(bits: int) -> int:
    """Steps between a quantization block's min and max: 15 for 4-bit codes, 255 for 8-bit ones."""
    if bits not in (4, 8):
        raise ValueError(f"min/max codes have 4 or 8 bits, got {bits!r}")
    return 2**bits - 1

# ---- block top-k ---------------------------------------------------------------------------------


def _ceil_fraction(density: float, n: int) -> int:
    return math.ceil(round(density * n, 6))


@dataclasses.dataclass(frozen=True)
class TopkLayout:
    """How a flat tensor of ``numel`` elements splits into top-k blocks, and how many entries each keeps."""

    numel: int
    block: int
    n_full: int  # number of full blocks
    k_full: int  # entries kept per full block
    tail: int  # elements in the partial last block (0 when block divides numel)
    k_tail: int  # entries kept in the tail block (0 when tail == 0)

    @property
    def k(self) -> int:
        """Entries kept per step over the whole tensor (one window row)."""
        return self.n_full * self.k_full + self.k_tail


def check_topk_args(block: int, density: float) -> None:
    """Raise ``ValueError`` for a top-k block size or density that the layout cannot use."""
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive int, got {block!r}")
    if block > INT16_MAX:
        raise ValueError(
            f"block={block} is too large: block-local indices are stored as int16, so block must be at most "
            f"{INT16_MAX}; use a smaller block (4096 is the default)"
        )
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise ValueError(f"density must be a number in (0, 1], got {density!r}; 0.01 keeps 1 % of each block")


def topk_layout(numel: int, block: int, density: float) -> TopkLayout:
    """The block split of ``numel`` elements into full blocks of ``block`` plus a tail, with the number
    of entries each keeps: ``max(1, ceil(density * size))`` (see the module docstring)."""
    check_topk_args(block, density)
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 1:
        raise ValueError(f"numel must be a positive int, got {numel!r}")
    n_full, tail = divmod(numel, block)
    k_full = min(block, max(1, _ceil_fraction(density, block))) if n_full else 0
    k_tail = min(tail, max(1, _ceil_fraction(density, tail))) if tail else 0
    return TopkLayout(numel, block, n_full, k_full, tail, k_tail)


def column_block_starts(layout: TopkLayout, device=None) -> torch.Tensor:
    """int64 [k]: the global coordinate where the block of each column starts."""
    full = (
        torch.arange(layout.n_full, dtype=torch.int64, device=device).repeat_interleave(layout.k_full)
        * layout.block
    )
    tail = torch.full((layout.k_tail,), layout.n_full * layout.block, dtype=torch.int64, device=device)
    return torch.cat([full, tail])


def _select_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (int64, ascending per row) of the k entries of largest magnitude in each row of x,
    ties to the lower index: a stable descending sort keeps equal keys in index order."""
    key = x.abs()
    order = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :k]
    return order.sort(dim=1).values


def block_topk(a: torch.Tensor, block: int, density: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise top-k by magnitude of the flat tensor ``a``.

    Returns ``(index, value)``: int16 [k] block-local indices (ascending within each block) and the
    selected values of ``a`` (same dtype as ``a``), laid out block by block as :class:`TopkLayout`
    describes. Ties in ``|a|`` go to the lower index."""
    flat = a.reshape(-1)
    layout = topk_layout(flat.numel(), block, density)
    parts = []
    if layout.n_full:
        rows = flat[: layout.n_full * block].view(layout.n_full, block)
        parts.append(_select_rows(rows, layout.k_full).reshape(-1))
    if layout.k_tail:
        rows = flat[layout.n_full * block :].view(1, layout.tail)
        parts.append(_select_rows(rows, layout.k_tail).reshape(-1))
    local = torch.cat(parts)
    value = flat[column_block_starts(layout, flat.device) + local]
    return local.to(torch.int16), value


def scatter_columns(
    index: torch.Tensor, value: torch.Tensor, layout: TopkLayout, out: torch.Tensor
) -> torch.Tensor:
    """``out[global coordinate of column c] = value[c]`` for every column (in place; returns ``out``)."""
    pos = column_block_starts(layout, out.device) + index.to(torch.int64)
    out[pos] = value.to(out.dtype)
    return out


# ---- 4-bit min/max error feedback ----------------------------------------------------------------


def check_quant_block(q: int) -> None:
    """Raise ``ValueError`` unless ``q`` is an even int >= 2 (codes are packed two per byte)."""
    if isinstance(q, bool) or not isinstance(q, int) or q < 2 or q % 2:
        raise ValueError(
            f"quant_block must be an even int >= 2 (two 4-bit codes share a byte), got {q!r}; "
            "use a divisor of the top-k block such as 2048"
        )


def ef_minmax(r: torch.Tensor, q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per quantization block of ``q`` elements: the min and max of ``r``, rounded to bfloat16."""
    check_quant_block(q)
    flat = r.reshape(-1).to(torch.float32)
    lo = blocks.reduce_blocks(lambda b: b.amin(dim=1), flat, q)
    hi = blocks.reduce_blocks(lambda b: b.amax(dim=1), flat, q)
    # rounded on the bits first: compiled, the codes are then computed from the same bf16 values
    return bf16_nearest(lo).to(torch.bfloat16), bf16_nearest(hi).to(torch.bfloat16)


def ef_unit(lo: torch.Tensor, hi: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """float32 step between neighbouring levels: (hi - lo) / 15 (8-bit codes: / 255) from the bf16 values."""
    return (hi.to(torch.float32) - lo.to(torch.float32)) / ef_levels(bits)


def ef_codes(r: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, q: int, clamp: bool = True,
             bits: int = 4) -> torch.Tensor:
    """Unpacked codes (int64, one per element) of ``r``. ``clamp=False`` gives the official formula,
    which can leave [0, 15]; it exists so that tests can show what the clamp prevents."""
    levels = ef_levels(bits)

    def codes(x: torch.Tensor, lo_b: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
        safe = torch.where(unit > 0, unit, torch.ones_like(unit))
        code = torch.floor((x - lo_b) / safe + 0.5)
        code = torch.where((unit > 0) & code.isfinite(), code, torch.zeros_like(code))
        return code.clamp(0, levels) if clamp else code

    code = blocks.per_block(codes, r.reshape(-1).to(torch.float32), q, lo.to(torch.float32), ef_unit(lo, hi, bits))
    return code.to(torch.int64)


def pack_nibbles(code: torch.Tensor) -> torch.Tensor:
    """uint8 [ceil(n/2)]: code ``2i`` in the high nibble of byte ``i``, code ``2i+1`` in the low nibble."""
    if code.numel() and (int(code.min()) < 0 or int(code.max()) > EF_LEVELS):
        raise ValueError(f"4-bit codes must lie in [0, 15], got [{int(code.min())}, {int(code.max())}]")
    return _pack(code)


def unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The ``numel`` int64 codes stored in ``packed`` (inverse of :func:`pack_nibbles`)."""
    b = packed.reshape(-1).to(torch.int64)
    if numel % 2 == 0:
        return torch.stack([b >> 4, b & 15], dim=1).reshape(-1)[:numel]
    # an odd count: the last byte holds one code (no slice of a longer result: see fusedopt.blocks)
    return torch.cat([torch.stack([b[:-1] >> 4, b[:-1] & 15], dim=1).reshape(-1), b[-1:] >> 4])


def _pack(code: torch.Tensor) -> torch.Tensor:
    c = code.reshape(-1).to(torch.int64)
    even = c.numel() - c.numel() % 2
    pairs = c[:even].view(-1, 2)
    packed = pairs[:, 0] * 16 + pairs[:, 1]
    if even < c.numel():  # an odd count: the last code alone in a high nibble (no padding: see fusedopt.blocks)
        packed = torch.cat([packed, c[even:] * 16])
    return packed.to(torch.uint8)


def ef_encode(r: torch.Tensor, q: int, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize the residual ``r``: returns ``(codes, lo bf16, hi bf16)``; 4-bit codes are packed
    (uint8 [ceil(d/2)]), 8-bit ones are one byte each (uint8 [d])."""
    lo, hi = ef_minmax(r, q)
    codes = ef_codes(r, lo, hi, q, bits=bits)  # clamped to [0, 15], so packing needs no check (nor a host sync)
    return (_pack(codes) if bits == 4 else codes.to(torch.uint8)), lo, hi


def ef_decode(packed: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, q: int, numel: int,
              bits: int = 4) -> torch.Tensor:
    """float32 [numel]: ``code * unit + lo`` per element (``lo`` where the block's unit is 0)."""
    check_quant_block(q)
    code = (unpack_nibbles(packed, numel) if bits == 4 else packed.reshape(-1)[:numel]).to(torch.float32)
    return blocks.per_block(lambda c, lo_b, unit: c * unit + lo_b, code, q, lo.to(torch.float32), ef_unit(lo, hi, bits))


def ef_error_bound(r: torch.Tensor, q: int, bits: int = 4) -> torch.Tensor:
    """float32 [d]: the per-element bound on ``|ef_decode(ef_encode(r)) - r|`` derived in the module
    docstring, ``max(unit/2, 2^-8 A) + 2^-20 A`` with ``A`` the block's largest exact magnitude."""
    flat = r.reshape(-1).to(torch.float32)
    lo, hi = ef_minmax(flat, q)

    def bound(x: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
        a = x.abs().amax(dim=1, keepdim=True)
        return torch.maximum(unit / 2, a * 2.0**-8) + a * 2.0**-20

    return blocks.per_block(bound, flat, q, ef_unit(lo, hi, bits))


# ---- window --------------------------------------------------------------------------------------


def window_row(t: int, m: int) -> int:
    """The ring row that step ``t`` (1-based) writes: ``(t - 1) mod m``."""
    if t < 1 or m < 1:
        raise ValueError(f"steps count from 1 and the window has m >= 1 rows, got t={t}, m={m}")
    return (t - 1) % m


def window_ages(t: int, m: int) -> list[tuple[int, int]]:
    """``[(row, age), ...]`` for the rows read at step ``t``: rows ``r < min(t, m)``, age
    ``(t - 1 - r) mod m`` (the row was written at step ``t - age``)."""
    window_row(t, m)
    return [(r, (t - 1 - r) % m) for r in range(min(t, m))]


def window_sum(
    index: torch.Tensor,
    value: torch.Tensor,
    t: int | torch.Tensor,
    layout: TopkLayout,
    beta: float | torch.Tensor,
    power: int = 1,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``sum_r beta^age(r) * value_r^power`` in ``dtype`` [numel] at step ``t``, from the ring ``index``
    (int16 [m, k]) and ``value`` ([m, k], any float dtype); rows are added in row order.

    ``t`` and ``beta`` may be tensors (a compiled step reads them so): then every row is added, the rows
    not written yet (``r >= t``) as zeros, which leaves the sum unchanged (a sum that starts at +0 is
    never -0, so adding +0 changes no bit)."""
    starts = column_block_starts(layout, index.device)
    out = torch.zeros(layout.numel, dtype=dtype, device=index.device)
    if isinstance(t, torch.Tensor):
        m = index.shape[0]
        t = t.to(device=index.device, dtype=torch.int64).reshape(())
        beta = torch.as_tensor(beta, dtype=torch.float64, device=index.device).reshape(())
        rows = [(r, beta ** ((t - 1 - r) % m), r < t) for r in range(m)]
    else:
        rows = [(r, beta**age, None) for r, age in window_ages(t, index.shape[0])]
    for r, weight, written in rows:
        val = value[r].to(dtype)
        term = val
        for _ in range(power - 1):
            term = term * val
        term = term * weight
        if written is not None:  # a row not written yet adds 0, whatever it holds
            term = torch.where(written, term, torch.zeros_like(term))
        out.index_add_(0, starts + index[r].to(torch.int64), term)
    return out


def window_moments(
    index: torch.Tensor,
    value: torch.Tensor,
    t: int,
    layout: TopkLayout,
    beta1: float,
    beta2: float,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M, S)``: the window sums of the module docstring (:func:`window_sum` with powers 1 and 2)."""
    return (window_sum(index, value, t, layout, beta1, 1, dtype),
            window_sum(index, value, t, layout, beta2, 2, dtype))
