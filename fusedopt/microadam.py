"""MicroAdam (Modoranu et al., NeurIPS 2024) as an eager ``torch.optim.Optimizer``.

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
* Bias corrections and ``beta^age`` are computed on the host in float64 (the official host uses float32).

State per parameter (``k`` from :func:`fusedopt.sparse.topk_layout`, ``nq = ceil(d / quant_block)``):

=================  ==================================  =====================================
``step``           int64 scalar                        steps taken by this parameter (on the
                                                       parameter's device when the fused kernel
                                                       steps it, on the host otherwise)
``window_index``   int16 [m, k]                        block-local indices of each row
``window_value``   ``window_dtype`` [m, k] (bf16)      selected values of ``a`` (not raw g)
``error_codes``    uint8 [ceil(d / 2)]                 4-bit error-feedback codes, 2 per byte
``error_min``      bf16 [nq]                           per-quantization-block minimum
``error_max``      bf16 [nq]                           per-quantization-block maximum
``error_feedback`` compute dtype [d]                   only with ``exact_error_feedback=True``,
                                                       instead of the three ``error_*`` above
=================  ==================================  =====================================

At the defaults (m=10, density 0.01) this is 0.5 (codes) + 0.4 (window) + 0.002 (min/max) B/param:
see :func:`state_bytes`. The selected values are stored in bf16; for float32 parameters the rounding
``a - bf16(a)`` (at most 2^-8 |a|) is dropped, not fed back (the official ``a`` is bf16 already, so it
has no such rounding to lose).
"""

from __future__ import annotations

import math
from itertools import chain

import torch

from fusedopt import sparse

DEFAULT_BLOCK = 4096
DEFAULT_QUANT_BLOCK = 2048

_COMPUTE = {torch.float64: torch.float64}  # every other float dtype computes in float32


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return _COMPUTE.get(dtype, torch.float32)


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
    k = sparse.topk_layout(numel, block, density).k
    return m * k * (2 + window_value_bytes) + (numel + 1) // 2 + 4 * math.ceil(numel / quant_block) + 8


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_FUSED_STATES = ("window_index", "window_value", "error_codes", "error_min", "error_max", "step")


def _kernel_supports(group: dict) -> bool:
    """Can the fused kernel run this group (see the ``backend`` argument of :class:`MicroAdam`)?"""
    q, block = group["quant_block"], group["block"]
    return (
        not group["exact_error_feedback"]
        and group["window_dtype"] in (None, *_KERNEL_DTYPES)
        and q & (q - 1) == 0
        and block % q == 0
    )


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
    if window_dtype is not None and window_dtype not in (
        torch.bfloat16,
        torch.float16,
        torch.float32,
        torch.float64,
    ):
        raise ValueError(
            f"window_dtype must be a float dtype or None (the compute dtype), got {window_dtype!r}"
        )


class MicroAdam(torch.optim.Optimizer):
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
        window_dtype: dtype of the stored window values; ``None`` means the compute dtype (float32,
            float64 for float64 parameters). The default bf16 is the official storage.
        backend: "triton" runs each group as one fused multi-tensor launch
            (:mod:`codegen.microadam_kernel`, same results as the eager code: bit-exact selections,
            window and error codes); "reference" runs the eager code below. ``None`` (the default)
            picks "triton" for CUDA parameters of groups the kernel supports and "reference"
            otherwise. The kernel needs 4-bit error feedback (not ``exact_error_feedback``), a
            float32, bfloat16 or float16 window, and ``quant_block`` a power of two dividing ``block``
            (the defaults qualify); with ``backend="triton"`` any other group is an error. Float64 or
            non-contiguous parameters of a fused group are stepped by the eager code.
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
        }
        if backend not in (None, "reference", "triton"):
            raise ValueError(f"backend must be 'triton', 'reference' or None (by device), got {backend!r}")
        self.backend = backend
        self._hparam_tensors: dict[int, tuple[tuple, list[torch.Tensor]]] = {}
        self._opt_called = True  # step() is never wrapped by LR schedulers (see the end of the module)
        super().__init__(params, defaults)
        for group in self.param_groups:
            _check_args(
                *(group[n] for n in ("lr", "m", "density", "block", "quant_block", "betas", "eps")),
                group["weight_decay"],
                group["window_dtype"],
            )
            if backend == "triton" and not _kernel_supports(group):
                raise ValueError(
                    "backend='triton' needs 4-bit error feedback (exact_error_feedback=False), a float32, "
                    "bfloat16 or float16 window_dtype (or None) and quant_block a power of two dividing block; "
                    f"got exact_error_feedback={group['exact_error_feedback']}, window_dtype="
                    f"{group['window_dtype']}, block={group['block']}, quant_block={group['quant_block']}"
                )
            for p in group["params"]:
                if not p.is_floating_point():
                    raise ValueError(
                        f"MicroAdam optimizes floating-point parameters, got one of dtype {p.dtype}"
                    )

    # ---- state -----------------------------------------------------------------------------------

    @staticmethod
    def _state_dtypes(group: dict, p: torch.Tensor) -> dict[str, torch.dtype]:
        cd = _compute_dtype(p.dtype)
        out = {"step": torch.int64, "window_index": torch.int16, "window_value": group["window_dtype"] or cd}
        if group["exact_error_feedback"]:
            out["error_feedback"] = cd
        else:
            out.update(error_codes=torch.uint8, error_min=torch.bfloat16, error_max=torch.bfloat16)
        return out

    def _init_state(self, group: dict, p: torch.Tensor, layout: sparse.TopkLayout) -> dict:
        d, m, dev = p.numel(), group["m"], p.device
        dtypes = self._state_dtypes(group, p)
        state = self.state[p]
        # the fused kernel reads and advances the counter on the device; the eager code on the host
        step_device = dev if self._fused(group, p) else "cpu"
        state["step"] = torch.zeros((), dtype=torch.int64, device=step_device)
        state["window_index"] = torch.zeros((m, layout.k), dtype=torch.int16, device=dev)
        state["window_value"] = torch.zeros((m, layout.k), dtype=dtypes["window_value"], device=dev)
        if group["exact_error_feedback"]:
            state["error_feedback"] = torch.zeros(d, dtype=dtypes["error_feedback"], device=dev)
        else:
            nq = math.ceil(d / group["quant_block"])
            state["error_codes"] = torch.zeros((d + 1) // 2, dtype=torch.uint8, device=dev)
            state["error_min"] = torch.zeros(nq, dtype=torch.bfloat16, device=dev)
            state["error_max"] = torch.zeros(nq, dtype=torch.bfloat16, device=dev)
        return state

    def state_bytes_moved(self, p: torch.Tensor) -> int:
        """Least bytes a step moves for ``p``'s state: the whole window is read, one row of it is
        written; the error feedback is read and written. (For benchmarks' bandwidth figures.)"""
        state = self.state.get(p, {})
        m = next((g["m"] for g in self.param_groups if any(q is p for q in g["params"])), 1)
        moved = 0
        for name, value in state.items():
            if isinstance(value, torch.Tensor) and value.device == p.device:
                size = value.numel() * value.element_size()
                moved += size + (size // m if name.startswith("window_") else size)
        return moved

    def load_state_dict(self, state_dict: dict) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, but every state keeps its own dtype (the base
        class casts each state but ``step`` to the dtype of a floating-point parameter) and is copied,
        so stepping never writes into the loaded dictionary."""
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        groups = chain.from_iterable([g] * len(g["params"]) for g in self.param_groups)
        for saved_id, p, group in zip(saved_ids, params, groups):
            saved = state_dict["state"].get(saved_id)
            if saved is None:
                continue
            for key, dtype in self._state_dtypes(group, p).items():
                if key in saved:
                    device = "cpu" if key == "step" else p.device
                    self.state[p][key] = saved[key].to(device=device, dtype=dtype, copy=True)

    # ---- step ------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            fused = []
            for p in group["params"]:
                if p.grad is None or p.numel() == 0:  # an empty parameter has nothing to select or update
                    continue
                if p.grad.is_sparse:
                    raise ValueError(f"MicroAdam does not take sparse gradients (parameter of shape "
                                     f"{tuple(p.shape)}); use dense ones, e.g. nn.Embedding(..., sparse=False)")
                if self._fused(group, p):
                    fused.append(p)
                else:
                    self._step_param(group, p)
            if fused:
                self._step_fused(group, fused)
        return loss

    def _backend_for(self, p: torch.Tensor) -> str:
        if self.backend is not None:
            return self.backend
        return "triton" if p.device.type == "cuda" else "reference"

    def _fused(self, group: dict, p: torch.Tensor) -> bool:
        """Does the fused kernel step this parameter? (The group must be supported, the tensors flat.)"""
        if self._backend_for(p) != "triton" or not _kernel_supports(group):
            return False
        grad = p.grad if p.grad is not None else p
        return (
            p.dtype in _KERNEL_DTYPES
            and grad.dtype in _KERNEL_DTYPES
            and p.is_contiguous()
            and grad.is_contiguous()
            and grad.shape == p.shape
            and grad.device == p.device
            and p.numel() > 0
        )

    def _state_of(self, group: dict, p: torch.Tensor) -> tuple[dict, sparse.TopkLayout]:
        d, m = p.numel(), group["m"]
        layout = sparse.topk_layout(d, group["block"], group["density"])
        state = self.state[p]
        if not state:
            state = self._init_state(group, p, layout)
        if tuple(state["window_index"].shape) != (m, layout.k):
            raise ValueError(
                f"the window of a parameter of {d} elements has shape {tuple(state['window_index'].shape)}, but "
                f"m={m}, block={group['block']}, density={group['density']} need {(m, layout.k)}; "
                "m, block and density cannot change once a parameter has state"
            )
        return state, layout

    def _hparams_on(self, group: dict, device: torch.device) -> list[torch.Tensor]:
        """The group's lr, beta1, beta2, eps and weight_decay as 0-d float64 tensors on ``device``, kept
        for the life of the group and rewritten in place when a value changes (so a new lr is new data
        for the kernel, never new code). A tensor lr (float64, on ``device``) is passed as it is: the
        form for torch.compile, where an lr scheduler fills the tensor and nothing recompiles."""
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            lr = lr.reshape(())
            if lr.dtype != torch.float64 or lr.device != device:
                lr = lr.to(device=device, dtype=torch.float64)
        consts = (*map(float, group["betas"]), float(group["eps"]), float(group["weight_decay"]))
        if torch.compiler.is_compiling():
            tensor_lr = lr if isinstance(lr, torch.Tensor) else torch.tensor(float(lr), dtype=torch.float64,
                                                                             device=device)
            return [tensor_lr, *(torch.tensor(v, dtype=torch.float64, device=device) for v in consts)]
        values = (None if isinstance(lr, torch.Tensor) else float(lr), *consts)
        key = id(group)
        cached = self._hparam_tensors.get(key)
        if cached is None or cached[1][0].device != device:
            tensors = [torch.tensor(v or 0.0, dtype=torch.float64, device=device) for v in values]
            self._hparam_tensors[key] = (values, tensors)
        else:
            old, tensors = cached
            if old != values:
                for t, v, o in zip(tensors, values, old):
                    if v is not None and v != o:
                        t.fill_(v)
                self._hparam_tensors[key] = (values, tensors)
        return [lr, *tensors[1:]] if isinstance(lr, torch.Tensor) else tensors

    def _step_fused(self, group: dict, params: list[torch.Tensor]) -> None:
        """One launch of the fused kernel over ``params`` (all on one device; else one per device)."""
        from codegen import microadam_kernel

        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for p in params:
            by_device.setdefault(p.device, []).append(p)
        for device, ps in by_device.items():
            states = []
            for p in ps:
                state, _ = self._state_of(group, p)
                if state["step"].device != device:
                    state["step"] = state["step"].to(device)
                states.append(state)
            microadam_kernel.step(
                ps,
                [p.grad for p in ps],
                *([s[name] for s in states] for name in _FUSED_STATES),
                self._hparams_on(group, device),
                m=group["m"],
                density=group["density"],
                block=group["block"],
                quant_block=group["quant_block"],
            )

    def _step_param(self, group: dict, p: torch.Tensor) -> None:
        d, m, q = p.numel(), group["m"], group["quant_block"]
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        state, layout = self._state_of(group, p)
        if state["step"].device.type != "cpu":
            state["step"] = state["step"].cpu()
        cd = _compute_dtype(p.dtype)

        # 1. error-feedback add
        a = p.grad.detach().reshape(-1).to(cd)
        if group["exact_error_feedback"]:
            a = a + state["error_feedback"]
        else:
            a = a + sparse.ef_decode(state["error_codes"], state["error_min"], state["error_max"], q, d).to(
                cd
            )

        # 2-3. block top-k into ring row (t - 1) mod m
        state["step"] += 1
        t = int(state["step"])
        row = sparse.window_row(t, m)
        index, value = sparse.block_topk(a, layout.block, group["density"])
        state["window_index"][row] = index
        state["window_value"][row] = value.to(state["window_value"].dtype)

        # 4-5. zero the selected coordinates; the residual becomes the error feedback
        sparse.scatter_columns(index, torch.zeros_like(value), layout, a)
        if group["exact_error_feedback"]:
            state["error_feedback"].copy_(a)
        else:
            codes, lo, hi = sparse.ef_encode(a, q)
            state["error_codes"].copy_(codes)
            state["error_min"].copy_(lo)
            state["error_max"].copy_(hi)

        # 6-8. decoupled weight decay, then the update rebuilt from the window
        M, S = sparse.window_moments(
            state["window_index"], state["window_value"], t, layout, beta1, beta2, cd
        )
        c1 = (1.0 - beta1) / (1.0 - beta1**t)
        c2 = (1.0 - beta2) / (1.0 - beta2**t)
        u = c1 * M / (torch.sqrt(c2 * S) + eps)
        u = torch.where(S == 0, torch.zeros_like(u), u)  # no 0/0 at eps = 0; a NaN still propagates
        theta = p.detach().reshape(-1).to(cd)
        if wd != 0.0:
            theta = theta * (1.0 - lr * wd)
        p.copy_((theta - lr * u).view_as(p))


# LR schedulers wrap ``optimizer.step`` in a closure over a weakref that dynamo cannot trace; this marker
# tells them the step is already tracked (they only read ``_opt_called``, set in __init__).
MicroAdam.step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
