"""What a step needs to know about a group's gradients before its launches, computed on the device
without a host sync: the global-norm clipping factor and the flag that a gradient holds a NaN or an
infinity. The front ends write these into 0-d float64 tensors that their kernels read as
hyperparameters (``clip_scale``, ``nonfinite_flag``; see :meth:`fusedopt.dsl.Rule.program`).
"""

from __future__ import annotations

import torch


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
