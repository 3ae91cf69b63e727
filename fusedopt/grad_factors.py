"""What a step needs to know about a group's gradients before its launches, computed on the device
without a host sync: the global-norm clipping factor and the flag that a gradient holds a NaN or an
infinity. The front ends write these into float64 tensors (:func:`new_factors`) that their kernels
read as hyperparameters (``clip_scale``, ``nonfinite_flag``; see :meth:`fusedopt.dsl.Rule.program`).
"""

from __future__ import annotations

from typing import Iterable

import torch

from .dsl import CLIP_HPARAM, CLIP_SCALE, SKIP_FLAG


def new_factors(devices: Iterable[torch.device]) -> dict[torch.device, dict[str, torch.Tensor]]:
    """One clipping factor (1.0) and one non-finite flag (0.0) per device, each a float64 tensor of
    shape (1,) that the kernels read as a hyperparameter through :func:`as_hparam`. Not 0-d: a compiled
    step that writes a 0-d float64 CPU tensor it closes over loses the write (seen with torch 2.13,
    aot_eager and inductor), which would leave the factor at 1.0 and the flag at 0 under torch.compile."""
    return {device: {CLIP_SCALE: torch.ones(1, dtype=torch.float64, device=device),
                     SKIP_FLAG: torch.zeros(1, dtype=torch.float64, device=device)}
            for device in dict.fromkeys(devices)}


def as_hparam(factor: torch.Tensor) -> torch.Tensor:
    """A factor as the 0-d float64 tensor hyperparameters are: a view, so later writes show through."""
    return factor.view(())


def total_norm(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The 2-norm of every gradient together, in float64, on ``device`` (as
    ``torch.nn.utils.clip_grad_norm_`` takes it, before its float32 rounding)."""
    norms = [n.to(device) for n in torch._foreach_norm(grads, 2, dtype=torch.float64)]
    return torch.linalg.vector_norm(torch.stack(norms))


def clip_factor(limit, norm: torch.Tensor) -> torch.Tensor:
    """``min(1, limit / (norm + 1e-6))``: what clip_grad_norm_ multiplies the gradients by."""
    limit = limit.to(norm.device) if isinstance(limit, torch.Tensor) else limit
    return torch.clamp(limit / (norm + 1e-6), max=1.0)


def any_nonfinite(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """A 0-d bool tensor: some element of some gradient is NaN or infinite (the largest magnitude of
    a tensor is NaN or Inf exactly when one of its elements is)."""
    peaks = torch.stack([n.to(device) for n in torch._foreach_norm(grads, float("inf"))])
    return (~torch.isfinite(peaks)).any()


def _grads_of(groups: list) -> list[torch.Tensor]:
    return [p.grad for g in groups for p in g["params"] if p.grad is not None]


def write_clip_factors(groups: list, copies_of) -> None:
    """One norm over the gradients of every group in ``groups`` (as clip_grad_norm_ over all their
    parameters) and each group's factor for its own ``max_grad_norm`` (a tensor, or a number set by
    hand), written into every per-device copy ``copies_of(group)`` yields. No host sync."""
    grads = _grads_of(groups)
    if not grads:
        return
    total = total_norm(grads, grads[0].device)
    for group in groups:
        factor = clip_factor(group[CLIP_HPARAM], total)
        for copy in copies_of(group):
            copy[CLIP_SCALE].copy_(factor, non_blocking=True)


def write_skip_flags(groups: list, copies_of) -> None:
    """One non-finite flag over the gradients of every group in ``groups``, written into every
    per-device copy ``copies_of(group)`` yields: a NaN or an infinity in any of them skips them all.
    No host sync."""
    grads = _grads_of(groups)
    if not grads:
        return
    flag = any_nonfinite(grads, grads[0].device)
    for group in groups:
        for copy in copies_of(group):
            copy[SKIP_FLAG].copy_(flag, non_blocking=True)
