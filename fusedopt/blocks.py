"""Blockwise computations over a flat tensor cut into blocks of ``q`` elements, the last one partial.

Every per-block statistic (an absmax, a min and max) and every per-element use of one (a scale, a
level) goes through :func:`per_block`: the full blocks as a ``[n_full, q]`` view and the partial one
as ``[1, tail]``, concatenated after. Written so, rather than as an index ``i // q`` per element
(``stat[arange(n) // q]``, ``repeat_interleave``) or by padding to whole blocks and slicing
``[:n]`` after, because inductor in torch 2.13 compiles those forms, when a pointwise operation
follows and the last block is partial, into a loop that covers only part of the elements (the rest
read uninitialized memory). Eager results are the same bits either way.
"""

from __future__ import annotations

from typing import Callable

import torch


def split(n: int, q: int) -> tuple[int, int]:
    """``(n_full, tail)``: the number of full blocks and the size of the partial one (0: none)."""
    n_full = n // q  # (not divmod: dynamo does not trace it on symbolic sizes)
    return n_full, n - n_full * q


def per_block(f: Callable[..., torch.Tensor], flat: torch.Tensor, q: int, *stats: torch.Tensor) -> torch.Tensor:
    """``f(blocks, *stats)`` over the blocks of ``flat`` (1-D), flat again: ``blocks`` is ``[rows, q]``
    (the full blocks, then the ``[1, tail]`` partial one) and each statistic holds one value per block,
    passed as ``[rows, 1]`` (in its own dtype). ``f`` returns a tensor of ``blocks``' shape (or one
    that broadcasts to it). An empty ``flat`` gives an empty result of ``flat``'s dtype."""
    n_full, tail = split(flat.numel(), q)
    if n_full == 0 and tail == 0:
        return flat.new_empty((0,))
    parts = []
    if n_full:
        rows = flat[:n_full * q].view(n_full, q)
        parts.append(f(rows, *(s.reshape(-1)[:n_full].reshape(-1, 1) for s in stats)).expand(n_full, q))
    if tail:
        rows = flat[n_full * q:].view(1, tail)
        parts.append(f(rows, *(s.reshape(-1)[n_full:n_full + 1].reshape(1, 1) for s in stats)).expand(1, tail))
    return torch.cat([part.reshape(-1) for part in parts])


def reduce_blocks(f: Callable[[torch.Tensor], torch.Tensor], flat: torch.Tensor, q: int) -> torch.Tensor:
    """``f(blocks)`` reducing each row of ``[rows, q]`` to one value (``dim=1``), over the full blocks
    and then the partial one: one value per block, ``ceil(n / q)`` of them."""
    n_full, tail = split(flat.numel(), q)
    parts = []
    if n_full:
        parts.append(f(flat[:n_full * q].view(n_full, q)).reshape(-1))
    if tail:
        parts.append(f(flat[n_full * q:].view(1, tail)).reshape(-1))
    return torch.cat(parts) if parts else flat.new_empty((0,))
