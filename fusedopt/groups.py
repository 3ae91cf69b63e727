"""Param groups as fusedopt's front ends keep them.

Hyperparameters live in 0-d float64 tensors on the parameters' device. torch's schedulers assign
Python floats (``group["betas"] = (0.95, beta2)`` in OneCycleLR, ``group["lr"] = 0.1`` by hand);
:class:`ParamGroup` writes them into the existing tensors, which keeps the identity of every tensor a
compiled step has captured, so a new value is new data for the kernels and nothing recompiles.
Checkpoints hold the values as Python numbers (:func:`saved_numbers`). :func:`zero_grad` is
torch.optim's, in a form torch.compile traces.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from .ir import SR_SEED  # the seed of stochastic rounding, a group key too
from .ir import STORAGE_DTYPES

# group keys of every front end (FusedOptimizer, WindowOptimizer)
STOCHASTIC_ROUNDING = "stochastic_rounding"  # bf16/fp16 parameters written with stochastic rounding
MASTER_WEIGHTS = "master_weights"  # a float32 copy of each parameter, updated in its place
NONFINITE = "nonfinite"  # what a step does when a gradient holds NaN or Inf
NONFINITE_POLICIES = ("propagate", "skip")
MAX_GRAD_NORM = "max_grad_norm"  # None, or a global gradient norm to clip to


def _check_clip(cls: str, clip: Any) -> None:
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float, torch.Tensor))
                             or not float(clip) > 0):
        raise ValueError(f"{cls}: invalid {MAX_GRAD_NORM} {clip!r}; expected None or a number > 0")


def _check_bool(key: str) -> Callable[[str, Any], None]:
    def check(cls: str, value: Any) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"{cls}: {key} must be a bool, got {value!r}")
    return check


def _check_nonfinite(cls: str, policy: Any) -> None:
    if policy not in NONFINITE_POLICIES:
        raise ValueError(f"{cls}: nonfinite={policy!r}; use 'propagate' (NaN and Inf "
                         "flow into the parameters and states) or 'skip' (the group's step is skipped)")


def _check_seed(cls: str, seed: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, torch.Tensor)) or not 0 <= int(seed) < 2**32 \
            or (isinstance(seed, torch.Tensor) and float(seed) != int(seed)):
        raise ValueError(f"{cls}: sr_seed={seed!r}; expected an int in [0, 2**32)")


STEP_KEY_CHECKS: dict[str, Callable[[str, Any], None]] = {
    MAX_GRAD_NORM: _check_clip, MASTER_WEIGHTS: _check_bool(MASTER_WEIGHTS),
    STOCHASTIC_ROUNDING: _check_bool(STOCHASTIC_ROUNDING), NONFINITE: _check_nonfinite, SR_SEED: _check_seed,
}


def check_storage(cls: str, storage: Any) -> None:
    if storage not in STORAGE_DTYPES:
        raise ValueError(f"{cls}: state_dtype={storage!r} is not supported; use one of {list(STORAGE_DTYPES)}")


def check_threshold(cls: str, threshold: Any) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0:
        raise ValueError(f"{cls}: quant_threshold={threshold!r}; expected an int >= 0 (tensors "
                         "with fewer elements keep float32 states)")


# keys a value written by hand is checked for (FusedOptimizer's storage keys beside the step keys)
HAND_CHECKS = {**STEP_KEY_CHECKS, "state_dtype": check_storage, "quant_threshold": check_threshold}


def check_step_keys(cls: str, group: dict) -> None:
    """Raise for a bad value of the keys every front end shares (``cls`` names the optimizer):
    max_grad_norm, master_weights, stochastic_rounding, nonfinite, sr_seed."""
    for key, check in STEP_KEY_CHECKS.items():
        check(cls, group.get(key) if key == MAX_GRAD_NORM else group[key])


_MISSING = object()


class ParamGroup(dict):
    """A param group whose tensor-valued hyperparameters are updated in place. A value written by
    hand to one of the step keys every front end shares is checked as at construction. Any other
    write (a static option: ``state_dtype``, ``amsgrad``, ...) calls ``on_change(group, key)`` when
    the optimizer set it (it builds the group's programs then, outside any compiled step); if that
    raises, the old value is put back. ``update`` and ``setdefault`` write through ``[]``. The hook
    is the optimizer's: copies and pickles of a group leave it out (the optimizer sets it again)."""

    on_change: Callable[["ParamGroup", str], None] | None = None

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "on_change"}

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def setdefault(self, key: str, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]

    def changed(self, key: str) -> None:
        """Tell the optimizer that ``key``'s value changed (a subclass deriving a static option)."""
        if self.on_change is not None:
            self.on_change(self, key)

    def __setitem__(self, key: str, value: Any) -> None:
        check = HAND_CHECKS.get(key)
        if check is not None:
            check("param group", value)
        current = self.get(key)
        if isinstance(current, torch.Tensor) and value is not None:
            write_scalar(current, value)
            return
        if isinstance(current, tuple) and current and all(isinstance(c, torch.Tensor) for c in current):
            if not isinstance(value, (tuple, list)) or len(value) != len(current):
                raise ValueError(f"param group '{key}' holds {len(current)} values, got {value!r}")
            for c, v in zip(current, value):
                if v is not c:
                    write_scalar(c, v)
            return
        old = self.get(key, _MISSING)
        super().__setitem__(key, value)
        if self.on_change is not None and key != "params":
            try:
                self.on_change(self, key)
            except BaseException:
                if old is _MISSING:
                    super().__delitem__(key)
                else:
                    super().__setitem__(key, old)
                raise


def write_scalar(dest: torch.Tensor, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"a hyperparameter holds one number, got a tensor of shape {tuple(value.shape)}")
        dest.copy_(value.detach().reshape(()))
    else:
        dest.fill_(float(value))


def as_hparam_tensor(value: Any, device: torch.device) -> torch.Tensor:
    """``value`` (a number or a one-element tensor) as a new 0-d float64 tensor on ``device``."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"a tensor hyperparameter must hold one number, got shape {tuple(value.shape)}")
        return value.detach().to(device=device, dtype=torch.float64).reshape(()).clone()
    return torch.tensor(float(value), dtype=torch.float64, device=device)


def held_in_tensors(group: dict, keys: Iterable[str], cls: type = ParamGroup) -> ParamGroup:
    """A copy of ``group`` as ``cls`` with the hyperparameters under ``keys`` (numbers, one-element
    tensors, or tuples of them) in 0-d float64 tensors on the device of the group's first parameter."""
    params = group["params"]
    device = params[0].device if params else torch.device("cpu")
    keys = set(keys)
    out = cls()
    for key, value in group.items():
        if key in keys and value is not None:
            value = tuple(as_hparam_tensor(v, device) for v in value) if isinstance(value, (tuple, list)) \
                else as_hparam_tensor(value, device)
        dict.__setitem__(out, key, value)
    return out


def saved_numbers(group: dict, ints: Iterable[str] = ()) -> None:
    """In a checkpoint's copy of a group, hyperparameter tensors become Python floats (ints for the
    keys in ``ints``), as torch.optim saves them."""
    ints = set(ints)
    for key, value in group.items():
        if isinstance(value, torch.Tensor):
            group[key] = int(value.item()) if key in ints else value.item()
        elif isinstance(value, tuple) and value and all(isinstance(v, torch.Tensor) for v in value):
            group[key] = tuple(v.item() for v in value)


def zero_grad(param_groups: Iterable[dict], set_to_none: bool = True) -> None:
    """torch.optim.Optimizer.zero_grad over ``param_groups``, traceable by torch.compile (torch's
    is marked untraceable)."""
    for group in param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                if p.grad.grad_fn is not None:
                    p.grad.detach_()
                else:
                    p.grad.requires_grad_(False)
                p.grad.zero_()


def pickled_state(opt: torch.optim.Optimizer, derived: Iterable[str]) -> dict:
    """What a front end pickles and deep-copies: its whole ``__dict__`` (torch.optim keeps only
    defaults, state and param groups; the rule, the backend and a subclass's settings must come
    along) less the ``derived`` caches, rebuilt after loading, and the hooks, which torch.optim
    drops too."""
    skip = set(derived)
    return {k: v for k, v in opt.__dict__.items() if k not in skip and not k.endswith("_hooks")}


def restore_optimizer(opt: torch.optim.Optimizer, state: dict, on_change: Callable[[ParamGroup, str], None]) -> None:
    """torch.optim's ``__setstate__`` (empty hooks), without the ``differentiable`` default it adds,
    which this optimizer's groups never had; each group's ``on_change`` hook set again (groups
    pickle without it) and, for an optimizer pickled before loads flagged themselves, ``_loading``."""
    had = "differentiable" in (state.get("defaults") or opt.__dict__.get("defaults", {}))
    torch.optim.Optimizer.__setstate__(opt, state)
    if not had:
        opt.defaults.pop("differentiable", None)
    opt.__dict__.setdefault("_loading", False)
    for group in opt.param_groups:
        if isinstance(group, ParamGroup):
            group.on_change = on_change


def state_dict_with(opt: torch.optim.Optimizer, finish: Callable[[dict], None]) -> dict:
    """torch.optim's ``state_dict`` of ``opt``, then ``finish(state_dict)`` (the front end's own
    conversions), then the post-hooks registered with ``register_state_dict_post_hook``, which so
    see the dictionary as it is returned."""
    hooks = opt._optimizer_state_dict_post_hooks
    opt._optimizer_state_dict_post_hooks = type(hooks)()
    try:
        sd = torch.optim.Optimizer.state_dict(opt)
    finally:
        opt._optimizer_state_dict_post_hooks = hooks  # the same dict: hook handles still remove
    finish(sd)
    for hook in hooks.values():
        result = hook(opt, sd)
        if result is not None:
            sd = result
    return sd
