"""MicroAdam (Modoranu et al., NeurIPS 2024): the optimizer that runs the DSL rule
:mod:`fusedopt.optimizers.microadam` (a :class:`fusedopt.window_optimizer.WindowOptimizer`).

MicroAdam keeps no dense moments. Per parameter (``d`` elements, flat) and step ``t``:

1. error-feedback add: ``a = g + Q^-1(e)``;
2. block-wise top-k of ``|a|`` (:func:`fusedopt.sparse.block_topk`): ``k`` (int16 index, value) pairs;
3. write them to ring row ``(t - 1) mod m`` of the window;
4. zero the selected coordinates of ``a``; what is left is the residual;
5. quantize the residual into the error feedback ``e`` (4-bit min/max codes, :mod:`fusedopt.sparse`);
6. decoupled weight decay: ``theta *= 1 - lr * weight_decay``;
7. rebuild the moments from the window (:func:`fusedopt.sparse.window_moments`)::

       M = sum_rows beta1^age * value      S = sum_rows beta2^age * value^2
       c1 = (1 - beta1) / (1 - beta1^t)    c2 = (1 - beta2) / (1 - beta2^t)
       u = c1 * M / (sqrt(c2 * S) + eps)   (0 where S = 0: no row holds a nonzero value there)

8. ``theta -= lr * u``.

With ``density=1``, unquantized error feedback and ``m >= t`` this is exactly AdamW (Adam when
``weight_decay=0``), with eps outside the square root. Once ``t > m`` the bias correction still uses
``1 - beta^t``, not the mass of the m rows left in the window, as the official code does: a coordinate
selected at every step with the same value gets ``|u|`` near 6.5 instead of 1 after ~1000 steps
(beta2 = 0.999), so MicroAdam usually wants a smaller lr than AdamW.

Deliberate differences from the official implementation:

* The top-k block size is a fixed ``block=4096`` instead of half the shared memory of an SM (20864
  on an A100, 29056 on an H100), so a trajectory does not depend on the GPU model. 4096 is a power
  of two (a Triton program can load a whole block with one ``tl.arange``), keeps the window-sum
  accumulators of one block (2 x 4096 float32 = 32 KiB) in shared memory on any recent GPU, and
  keeps ``ceil(0.01 * 4096) = 41`` entries per block (1.001 % of it, close to the nominal density).
* ``quant_block=2048`` divides ``block``, so a kernel that holds one top-k block in registers holds
  whole quantization blocks and can requantize them without another pass; the min/max then cost
  4/2048 B/param. (The official scripts use 100000 or 64.)
* 4-bit codes are clamped to [0, 15]; the official code can write 16 or -1 into a nibble.
* Each parameter counts its own steps (state ``"step"``); the official counter is global, so a
  parameter that skipped steps (grad None) would get wrong ages and bias corrections.
* float32, bfloat16 and float16 parameters are supported (float64 too, computed in float64 for exact
  checks); the math runs in float32, the parameter is rounded once per step. The official code is
  bf16-only and rounds the error-feedback add, ``u`` and the parameter update separately.
* ``p.grad`` is left as the gradient (the official code overwrites it with ``u``).
* Bias corrections and ``beta^age`` are computed in float64 (the official host uses float32).

State per parameter (``k`` from :func:`fusedopt.sparse.topk_layout`, ``nq = ceil(d / quant_block)``):

=================  ==================================  =====================================
``step``           int64 scalar                        steps taken by this parameter (on the
                                                       parameter's device when the fused kernel
                                                       steps it, on the host otherwise)
``window_index``   int16 [m, k]                        block-local indices of each row
``window_value``   ``window_dtype`` [m, k] (bf16)      selected values of ``a`` (not raw g)
``error``          uint8 [ceil(d / 2)]                 4-bit error-feedback codes, 2 per byte;
                                                       with ``exact_error_feedback=True`` the
                                                       error feedback itself, float32 (float64
                                                       for float64 parameters), shaped like p
``error_min``      bf16 [nq]                           per-quantization-block minimum (4-bit only)
``error_max``      bf16 [nq]                           per-quantization-block maximum (4-bit only)
=================  ==================================  =====================================

At the defaults (m=10, density 0.01) this is 0.5 (codes) + 0.4 (window) + 0.002 (min/max) B/param:
see :func:`state_bytes`. The selected values are stored in bf16; for float32 parameters the rounding
``a - bf16(a)`` (at most 2^-8 |a|) is dropped, not fed back (the official ``a`` is bf16 already, so it
has no such rounding to lose).
"""

from __future__ import annotations

import torch

from . import dsl, sparse
from .optimizers.microadam import microadam
from .window_optimizer import WindowOptimizer, step_defaults
from .window_optimizer import state_bytes as _program_state_bytes

DEFAULT_BLOCK = 4096
DEFAULT_QUANT_BLOCK = 2048
WINDOW_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", None: "fp32"}


def _settings(m: int, density: float, block: int, quant_block: int, exact_error_feedback: bool,
              window_dtype: torch.dtype | None) -> dict:
    error = {"dtype": "fp32"} if exact_error_feedback else {"dtype": "q4minmax", "quant_block": quant_block}
    return {"window": {"m": m, "density": density, "block": block, "dtype": WINDOW_DTYPES[window_dtype]},
            "error": error}


def state_bytes(
    numel: int,
    m: int = 10,
    density: float = 0.01,
    block: int = DEFAULT_BLOCK,
    quant_block: int = DEFAULT_QUANT_BLOCK,
    window_value_bytes: int = 2,
) -> int:
    """Bytes of MicroAdam state for one parameter of ``numel`` elements, from the shapes alone
    (nothing is allocated): window ``m * k * (2 + window_value_bytes)``, codes ``ceil(numel / 2)``,
    min and max ``2 * 2 * ceil(numel / quant_block)`` and the 8-byte step."""
    sparse.check_quant_block(quant_block)
    dtype = {2: torch.bfloat16, 4: torch.float32}[window_value_bytes]
    program = dsl.configure_states(microadam.program(), _settings(m, density, block, quant_block, False, dtype))
    return _program_state_bytes(program, numel)


def _check_args(lr, m, density, block, quant_block, betas, eps, weight_decay, window_dtype) -> None:
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise ValueError(f"a tensor lr must hold one floating-point number, got {lr!r}")
    elif not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr >= 0.0:
        raise ValueError(f"lr must be a number >= 0, got {lr!r}")
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"m (window length) must be an int >= 1, got {m!r}; the paper uses m=10")
    sparse.check_topk_args(block, density)
    sparse.check_quant_block(quant_block)
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if window_dtype not in WINDOW_DTYPES:
        raise ValueError(
            f"window_dtype must be torch.bfloat16, torch.float16, torch.float32 or None (float32 and None: the "
            f"compute dtype, float64 for float64 parameters), got {window_dtype!r}"
        )



class MicroAdam(WindowOptimizer):
    """MicroAdam: Adam moments rebuilt from a window of ``m`` block-top-k gradients, with 4-bit
    quantized error feedback (see the module docstring for the update and the state).

    Args:
        params: parameters or param groups.
        lr: learning rate.
        m: window length (rows of the ring buffer).
        density: fraction of each top-k block kept per step, in (0, 1].
        block: top-k block size, at most 32767 (indices are int16).
        quant_block: error-feedback quantization block, even.
        betas, eps: as Adam (eps is added outside the square root).
        weight_decay: decoupled, ``theta *= 1 - lr * weight_decay`` before the update.
        exact_error_feedback: keep the error feedback unquantized in the compute dtype (for tests and
            ablations; costs 4 B/param instead of 0.5).
        window_dtype: dtype of the stored window values: bf16 (the default, the official storage), fp16,
            or float32 / ``None``: the compute dtype (float32, float64 for float64 parameters).
        backend: "triton" runs each group as one fused multi-tensor launch of the kernel generated
            from the rule (:mod:`codegen.window_template`; the same selections, window and error
            codes as the eager interpreter, bit for bit); "reference" runs the eager interpreter
            (:mod:`fusedopt.window_reference`). ``None`` (the default) picks "triton" for CUDA
            parameters of groups the kernel supports and "reference" otherwise. The kernel needs a
            4-bit ``quant_block`` that is a power of two dividing ``block`` (the defaults qualify);
            with ``backend="triton"`` any other group is an error. Float64 or non-contiguous
            parameters of a fused group are stepped by the eager interpreter.
        max_grad_norm: None, or clip the gradients to this global norm before the step, as
            ``torch.nn.utils.clip_grad_norm_`` over every clipping group's parameters (the factor is
            computed on the device; the selection and the error feedback see the clipped gradient).
        nonfinite: "propagate" (as the official code) or "skip": a NaN or Inf anywhere in the gradients
            of the groups that skip leaves their parameters, error feedback, window and step counters
            as they were.
        stochastic_rounding, sr_seed: write bf16 and fp16 parameters rounded stochastically (unbiased; the
            bits are a function of the seed, the step and the element), so that updates below half a
            bf16 step survive on average.
        master_weights: keep a float32 copy of each parameter (state ``master_param``, 4 B/param)
            that the update reads and writes in place of the parameter; the parameter receives it
            rounded (stochastically with ``stochastic_rounding``).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-4,
        m: int = 10,
        density: float = 0.01,
        block: int = DEFAULT_BLOCK,
        quant_block: int = DEFAULT_QUANT_BLOCK,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        exact_error_feedback: bool = False,
        window_dtype: torch.dtype | None = torch.bfloat16,
        backend: str | None = None,
        max_grad_norm: float | None = None,
        nonfinite: str = "propagate",
        stochastic_rounding: bool = False,
        sr_seed: int = 0,
        master_weights: bool = False,
    ):
        _check_args(lr, m, density, block, quant_block, betas, eps, weight_decay, window_dtype)
        defaults = {
            "lr": lr,
            "m": m,
            "density": density,
            "block": block,
            "quant_block": quant_block,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "exact_error_feedback": bool(exact_error_feedback),
            "window_dtype": window_dtype,
            **step_defaults(max_grad_norm, nonfinite, stochastic_rounding, sr_seed, master_weights),
        }
        self._setup(params, microadam, backend, defaults)

    def check_group(self, group: dict) -> None:
        _check_args(*(group[n] for n in ("lr", "m", "density", "block", "quant_block", "betas", "eps",
                                         "weight_decay", "window_dtype")))

    def hparam_keys(self) -> tuple[str, ...]:
        return ("lr", "betas", "eps", "weight_decay")

    def state_settings(self, group: dict) -> dict:
        return _settings(group["m"], group["density"], group["block"], group["quant_block"],
                         group["exact_error_feedback"], group["window_dtype"])

    def hparam_values(self, group: dict) -> dict:
        beta1, beta2 = group["betas"]
        return {"lr": group["lr"], "beta1": beta1, "beta2": beta2, "eps": group["eps"],
                "weight_decay": group["weight_decay"]}
