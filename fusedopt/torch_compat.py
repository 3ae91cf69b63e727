"""The built-in rules as torch.optim-compatible classes: torch's signatures, defaults and keys."""

from __future__ import annotations

from typing import Any, Iterable

import torch

from .dtypes import LOW_PRECISION
from .groups import MASTER_WEIGHTS, ParamGroup
from .optim import FusedOptimizer
from . import partition as partitions
from .optimizers import adafactor, adam, adam_mini, adamw, lamb, lion, sgd

# torch.optim's implementation choices: accepted and kept in the groups; fusedopt has one
# implementation (differentiable=True, which fusedopt cannot honour, is refused)
_TORCH_FLAGS = ("foreach", "capturable", "differentiable", "fused")
DECOUPLED = "decoupled_weight_decay"  # torch.optim.Adam's switch to AdamW's decay, kept in its groups


def _value(x: Any) -> float:
    return float(x.item()) if hasattr(x, "item") else float(x)


def _require(cls: str, name: str, value: Any, ok: bool, expected: str) -> None:
    if not ok:
        raise ValueError(f"{cls}: invalid {name} {value!r}; expected {expected}")


def _check_common(cls: str, group: dict[str, Any]) -> None:
    lr = _value(group["lr"])
    _require(cls, "lr", lr, lr >= 0.0, "lr >= 0")
    if "eps" in group:
        eps = _value(group["eps"])
        _require(cls, "eps", eps, eps >= 0.0, "eps >= 0")
    if "betas" in group:
        betas = group["betas"]
        _require(cls, "betas", betas, isinstance(betas, (tuple, list)) and len(betas) == 2, "a pair (beta1, beta2)")
        for i, b in enumerate(betas):
            _require(cls, f"beta{i + 1}", _value(b), 0.0 <= _value(b) < 1.0, "a value in [0, 1)")
    wd = _value(group["weight_decay"])
    _require(cls, "weight_decay", wd, wd >= 0.0, "weight_decay >= 0")
    if group.get("differentiable"):
        raise ValueError(f"{cls}: differentiable=True is not supported: the step runs under torch.no_grad "
                         "(fused kernels have no autograd formula). Fix: leave differentiable=False")


class _AdamFamily(FusedOptimizer):
    aliases = {"betas": ("beta1", "beta2")}
    passthrough = _TORCH_FLAGS

    def _complete_group(self, group: dict[str, Any]) -> None:
        _check_common(type(self).__name__, group)


class Adam(_AdamFamily):
    """torch.optim.Adam, fused (L2 weight decay; amsgrad; maximize). See fusedopt.optimizers.adam.
    ``decoupled_weight_decay=True`` runs AdamW's rule instead, as torch.optim.Adam does."""

    passthrough = (*_TORCH_FLAGS, DECOUPLED)

    def __init__(self, params: Iterable, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad: bool = False, *, maximize: bool = False, max_grad_norm: float | None = None,
                 decoupled_weight_decay: bool = False, backend: str | None = None, **torch_flags):
        if not isinstance(decoupled_weight_decay, bool):
            raise TypeError(f"{type(self).__name__}: decoupled_weight_decay must be a bool, got "
                            f"{decoupled_weight_decay!r}")
        self._decoupled = decoupled_weight_decay  # read by _complete_group, which runs inside __init__
        super().__init__(params, adamw if decoupled_weight_decay else adam, lr=lr, betas=betas, eps=eps,
                         weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize, max_grad_norm=max_grad_norm,
                         decoupled_weight_decay=decoupled_weight_decay, backend=backend, **torch_flags)

    def _complete_group(self, group: dict[str, Any]) -> None:
        super()._complete_group(group)
        given = group.get(DECOUPLED, self._decoupled)
        if given is not self._decoupled:  # a group dict or a checkpoint of the other algorithm
            ours = "decoupled (AdamW's)" if self._decoupled else "L2 (Adam's)"
            raise ValueError(f"{type(self).__name__}: this optimizer applies {ours} weight decay, but a group has "
                             f"{DECOUPLED}={given!r}. Fix: construct it with {DECOUPLED}={given!r} "
                             "(fusedopt.AdamW decouples), or load a checkpoint of the same algorithm")


class AdamW(Adam):
    """torch.optim.AdamW, fused (decoupled weight decay). See fusedopt.optimizers.adamw."""

    def __init__(self, params: Iterable, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad: bool = False, *, maximize: bool = False, max_grad_norm: float | None = None,
                 backend: str | None = None, **torch_flags):
        if DECOUPLED in torch_flags:  # as torch.optim.AdamW, which has no such argument
            raise TypeError(f"{type(self).__name__} got an unexpected keyword argument '{DECOUPLED}': its weight "
                            "decay is always decoupled. Fix: drop it, or use fusedopt.Adam for L2 decay")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         maximize=maximize, max_grad_norm=max_grad_norm, decoupled_weight_decay=True,
                         backend=backend, **torch_flags)


class Adam8bit(Adam):
    """Adam with both moments in 8-bit blockwise storage (q8: dynamic maps, blocks of 256, as
    bitsandbytes' Adam8bit); tensors under ``quant_threshold`` elements keep float32 moments.
    About 2 bytes of state per parameter instead of 8. Same arguments as :class:`Adam`."""

    def __init__(self, params: Iterable, *args, state_dtype: str = "q8", **kwargs):
        super().__init__(params, *args, state_dtype=state_dtype, **kwargs)


class AdamW8bit(AdamW):
    """AdamW with both moments in 8-bit blockwise storage (as bitsandbytes' AdamW8bit); see
    :class:`Adam8bit`. Same arguments as :class:`AdamW`."""

    def __init__(self, params: Iterable, *args, state_dtype: str = "q8", **kwargs):
        super().__init__(params, *args, state_dtype=state_dtype, **kwargs)


class AdamW4bit(AdamW):
    """AdamW with both moments in 4-bit blockwise storage (q4: blocks of 128, two codes per byte,
    torchao's 4-bit maps: signed dynamic for m, linear without zero for v, a bf16 scale per block);
    about 1.03 bytes of state per parameter. Same arguments as :class:`AdamW`."""

    def __init__(self, params: Iterable, *args, state_dtype: str = "q4", **kwargs):
        super().__init__(params, *args, state_dtype=state_dtype, **kwargs)


class Lion(_AdamFamily):
    """Lion (google/automl semantics), fused. See fusedopt.optimizers.lion."""

    passthrough = ()

    def __init__(self, params: Iterable, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *,
                 maximize: bool = False, max_grad_norm: float | None = None, state_dtype: str = "fp32",
                 quant_threshold: int = 4096, stochastic_rounding: bool = False, sr_seed: int = 0,
                 master_weights: bool = False, nonfinite: str = "propagate",
                 backend: str | None = None):
        super().__init__(params, lion, lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize,
                         max_grad_norm=max_grad_norm, state_dtype=state_dtype, quant_threshold=quant_threshold,
                         stochastic_rounding=stochastic_rounding, sr_seed=sr_seed,
                         master_weights=master_weights, nonfinite=nonfinite, backend=backend)


class _SGDGroup(ParamGroup):
    """An SGD group keeps a momentum buffer exactly while its momentum is nonzero, as torch.optim.SGD
    decides at each step: writing the momentum (by hand or by a scheduler such as OneCycleLR)
    updates the static option ``with_momentum``."""

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        if key == "momentum" and value is not None:
            with_momentum = _value(value) != 0.0
            if self.get("with_momentum") != with_momentum:
                dict.__setitem__(self, "with_momentum", with_momentum)
                self.changed("with_momentum")  # a static option: its program is built now


class SGD(FusedOptimizer):
    """torch.optim.SGD, fused (momentum, dampening, nesterov, maximize). See fusedopt.optimizers.sgd.

    A group's momentum may be changed between steps, from or to 0 as well (the step then keeps or
    ignores its buffer, as torch's). One difference: a buffer first created after the group's first
    step starts at ``(1 - dampening) * d`` where torch starts it at ``d``; with dampening 0 (the
    default) both are ``d``."""

    passthrough = ("foreach", "differentiable", "fused")
    group_type = _SGDGroup
    unused_states = ("momentum_buffer",)  # kept while the momentum is 0, as torch keeps it

    def __init__(self, params: Iterable, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov: bool = False, *, maximize: bool = False, max_grad_norm: float | None = None,
                 backend: str | None = None, **torch_flags):
        super().__init__(params, sgd, lr=lr, momentum=momentum, dampening=dampening,
                         weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                         max_grad_norm=max_grad_norm, backend=backend, **torch_flags)

    def _complete_group(self, group: dict[str, Any]) -> None:
        cls = type(self).__name__
        _check_common(cls, group)
        momentum, dampening = _value(group["momentum"]), _value(group["dampening"])
        _require(cls, "momentum", momentum, momentum >= 0.0, "momentum >= 0")
        if group["nesterov"]:
            _require(cls, "nesterov", True, momentum > 0 and dampening == 0,
                     "momentum > 0 and dampening == 0 for Nesterov momentum")
        # momentum == 0 keeps no buffer, as torch.optim.SGD; any other value keeps one.
        group["with_momentum"] = momentum != 0.0


class LAMB(_AdamFamily):
    """LAMB with timm's semantics (per-tensor trust ratio; global gradient clipping to 1.0 by
    default). See fusedopt.optimizers.lamb."""

    passthrough = ()

    def __init__(self, params: Iterable, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, *,
                 bias_correction: bool = True, trust_clip: bool = False, always_adapt: bool = False,
                 max_grad_norm: float | None = 1.0, state_dtype: str = "fp32", quant_threshold: int = 4096,
                 stochastic_rounding: bool = False, sr_seed: int = 0,
                 master_weights: bool = False, nonfinite: str = "propagate", backend: str | None = None):
        super().__init__(params, lamb, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         bias_correction=bias_correction, trust_clip=trust_clip, always_adapt=always_adapt,
                         max_grad_norm=max_grad_norm, state_dtype=state_dtype, quant_threshold=quant_threshold,
                         stochastic_rounding=stochastic_rounding, sr_seed=sr_seed,
                         master_weights=master_weights, nonfinite=nonfinite, backend=backend)


class Adafactor(FusedOptimizer):
    """torch.optim.Adafactor by default; HF transformers' Adafactor with ``hf=True``. Matrices (factored
    row and column second moments) and vectors run as two fused programs; the math of both variants
    and the argument mapping are in fusedopt.optimizers.adafactor. ``max_grad_norm`` clips over the
    whole group: the factor is computed on the device before the two programs read it.

    torch's arguments keep their meaning: ``lr`` None means torch's 1e-2; ``eps=(eps1, eps2)`` with
    eps1 None meaning the machine epsilon of the group's first parameter's dtype (float32's with
    ``master_weights=True``: the update runs on the float32 copy), resolved when the group is added. HF's names map to
    torch's: decay_rate is ``beta2_decay`` (1 - beta2_t = t^decay_rate), clip_threshold is ``d``.

    ``beta1``: None keeps no first moment; a float keeps HF's ``exp_avg`` (an EMA of the clipped,
    lr-scaled update), in either variant. With ``hf=True``: eps1 sits inside the square
    (g^2 + eps1) and None means HF's 1e-30; weight decay is scaled by the step's lr_t;
    ``relative_step`` (default True, as HF) takes lr_t from the step, min(1e-2, 1/sqrt(t)), or
    min(1e-6 t, 1/sqrt(t)) with ``warmup_init``, and then ``lr`` must not be given (the group's lr
    holds NaN, unused); ``relative_step=False`` needs an ``lr``; ``scale_parameter`` (default True)
    multiplies lr_t by max(eps2, RMS(p)). HF's recipe for external schedules is
    ``Adafactor(params, hf=True, relative_step=False, scale_parameter=False, lr=1e-3)``.
    """

    aliases = {"eps": ("eps1", "eps2")}
    passthrough = ("foreach",)
    nullable = ("lr", "eps", "beta1")
    _HF_NAMES = {"decay_rate": "beta2_decay", "clip_threshold": "d"}

    def __init__(self, params: Iterable, lr: float | None = None, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0,
                 weight_decay=0.0, *, maximize: bool = False, beta1: float | None = None, hf: bool = False,
                 relative_step: bool | None = None, scale_parameter: bool | None = None,
                 warmup_init: bool = False, max_grad_norm: float | None = None, backend: str | None = None,
                 **torch_flags):
        for name, ours in self._HF_NAMES.items():
            if name in torch_flags:
                value = torch_flags[name]
                raise TypeError(f"Adafactor: {name} is HF's name for {ours}, got {name}={value!r}. "
                                f"Fix: pass {ours}={value!r} (same meaning)")
        if not hf:  # torch's rho = min(lr, 1/sqrt(t)) is neither relative_step=True nor False
            for name, value, torch_value in (("relative_step", relative_step, None),
                                             ("scale_parameter", scale_parameter, True),
                                             ("warmup_init", warmup_init, False)):
                if value is not None and value != torch_value:
                    raise self._bad(f"{name} is an option of HF transformers' variant",
                                    f"{name}={value!r} with hf=False",
                                    f"pass hf=True as well, or leave {name} unset for "
                                    "torch.optim.Adafactor's semantics")
        # the None defaults are resolved per group, for the group's variant, in _complete_group
        super().__init__(params, adafactor, lr=lr, beta2_decay=beta2_decay, eps=eps, d=d,
                         weight_decay=weight_decay, beta1=beta1, maximize=maximize, hf=hf,
                         relative_step=relative_step, scale_parameter=scale_parameter,
                         warmup_init=warmup_init, use_first_moment=None, max_grad_norm=max_grad_norm,
                         backend=backend, **torch_flags)

    @staticmethod
    def _bad(problem: str, got: str, fix: str) -> ValueError:
        return ValueError(f"Adafactor: {problem}, got {got}. Fix: {fix}")

    def _complete_group(self, group: dict[str, Any]) -> None:
        """Resolve the None defaults for the group's variant and check the combination. This runs again
        on the group's own output when a checkpoint loads, so every resolved value must pass it."""
        cls = type(self).__name__
        hf = group["hf"]
        if group["relative_step"] is None:
            group["relative_step"] = bool(hf)
        if group["scale_parameter"] is None:
            group["scale_parameter"] = True
        for name, value in (("relative_step", True), ("scale_parameter", False), ("warmup_init", True)):
            if not hf and group[name] is value:  # values torch.optim.Adafactor has no formula for
                raise self._bad(f"{name} is an option of HF transformers' variant",
                                f"{name}={value!r} with hf=False", "set hf=True in this group as well")
        relative = group["relative_step"] is True
        if group["warmup_init"] is True and not relative:
            raise self._bad("warmup_init=True ramps the relative step size and needs relative_step=True",
                            f"relative_step={group['relative_step']!r}",
                            "pass relative_step=True (or drop warmup_init)")
        self._complete_lr(group, bool(hf) and relative)
        decay, d = _value(group["beta2_decay"]), _value(group["d"])
        _require(cls, "beta2_decay", decay, decay <= 0.0, "beta2_decay <= 0")
        if hf:
            _require(cls, "d", d, d > 0.0, "d (HF's clip_threshold) > 0")
        else:
            _require(cls, "d", d, d >= 1.0, "d >= 1")
        wd = _value(group["weight_decay"])
        _require(cls, "weight_decay", wd, wd >= 0.0, "weight_decay >= 0")
        eps1, eps2 = group["eps"]
        if eps1 is None:
            params = group["params"]
            computed = params[0].dtype if params else torch.float32
            if group[MASTER_WEIGHTS] and computed in LOW_PRECISION:  # the update runs on the float32 copy
                computed = torch.float32
            eps1 = 1e-30 if hf else torch.finfo(computed).eps
        group["eps"] = (eps1, eps2)
        _require(cls, "eps", group["eps"], _value(eps1) >= 0.0 and _value(eps2) >= 0.0, "non-negative eps")
        self._complete_beta1(group)

    def _complete_lr(self, group: dict[str, Any], relative: bool) -> None:
        lr = group["lr"]
        given = lr is not None and _value(lr) == _value(lr)  # NaN: what a relative-step group stores
        if relative:
            if given:
                raise self._bad("relative_step=True computes the learning rate from the step and ignores lr "
                                "(HF refuses both)", f"lr={_value(lr)!r}",
                                "drop lr, or pass relative_step=False (and scale_parameter=False for an "
                                "external schedule)")
            group["lr"] = float("nan")
            return
        if lr is None:
            if group["hf"]:
                raise self._bad("relative_step=False takes its learning rate from lr", "lr=None",
                                "pass lr=..., e.g. lr=1e-3, or relative_step=True")
            lr = group["lr"] = 1e-2  # torch.optim.Adafactor's default
        _require(type(self).__name__, "lr", _value(lr), _value(lr) >= 0.0, "lr >= 0")

    def _complete_beta1(self, group: dict[str, Any]) -> None:
        beta1, first = group["beta1"], group["use_first_moment"]
        if first is None:  # at construction: a first moment exactly when beta1 is given, as HF
            first = group["use_first_moment"] = beta1 is not None
        if beta1 is None:
            if first:
                raise self._bad("use_first_moment=True needs beta1", "beta1=None", "pass beta1=..., e.g. 0.9")
            group["beta1"] = 0.0  # unused
        elif not (isinstance(beta1, (int, float, torch.Tensor)) and 0.0 <= _value(beta1) < 1.0):
            raise self._bad("beta1 is the first moment's decay and must be None or in [0, 1)",
                            f"beta1={beta1!r}", "pass e.g. beta1=0.9, or beta1=None for no first moment")


class AdamMini(_AdamFamily):
    """Adam-mini (official v1.1.1 math): takes ``model.named_parameters()`` and the model's ``dim``,
    ``n_heads`` and ``n_kv_heads``; blocks come from :func:`fusedopt.partition.adam_mini_partition`
    (or ``partition=``, a function (name, shape) -> Blocks). Weight decay is off for names containing
    "norm", "ln" or "bias", as the official code. See fusedopt.optimizers.adam_mini."""

    passthrough = ()

    def __init__(self, named_parameters: Iterable, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *,
                 dim: int, n_heads: int, n_kv_heads: int | None = None, partition=None,
                 max_grad_norm: float | None = None, state_dtype: str = "fp32", quant_threshold: int = 4096,
                 stochastic_rounding: bool = False, sr_seed: int = 0,
                 master_weights: bool = False, nonfinite: str = "propagate", backend: str | None = None):
        named = [(n, p) for n, p in named_parameters if p.requires_grad]
        if not named or not all(isinstance(n, str) for n, _ in named):
            raise TypeError("AdamMini takes model.named_parameters(): (name, parameter) pairs")
        blocks = partitions.partition_model(named, dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads,
                                            partition=partition)
        self._views = {p: blocks[n].view_shape(tuple(p.shape)) for n, p in named}
        decay = [p for n, p in named if partitions.weight_decay_applies(n)]
        no_decay = [p for n, p in named if not partitions.weight_decay_applies(n)]
        groups = [g for g in ({"params": decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        super().__init__(groups, adam_mini, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         max_grad_norm=max_grad_norm, state_dtype=state_dtype, quant_threshold=quant_threshold,
                         stochastic_rounding=stochastic_rounding, sr_seed=sr_seed,
                         master_weights=master_weights, nonfinite=nonfinite, backend=backend)

    def _block_view(self, p: torch.Tensor) -> tuple[int, int]:
        return self._views[p]
