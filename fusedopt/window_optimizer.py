"""The optimizer front end of rules with a window (:func:`fusedopt.dsl.window`), such as MicroAdam.

``WindowOptimizer(params, rule, **hyperparameters)`` runs any such rule. Each param group builds the
rule's program once, with the group's state settings applied (``states={"window": {"m": 20}}``, see
:func:`fusedopt.dsl.configure_states`: a window's m, density, block and value dtype; a state's storage
dtype and quantization block). A step runs, per group, one fused launch over the group's CUDA tensors
(:mod:`codegen.window_ops`) and the eager interpreter (:mod:`fusedopt.window_reference`) for the
rest; both give the same selections, window rows and quantized states, bit for bit.

Every parameter counts its own steps (state ``"step"``, int64); its other states are the program's
storage tensors (``Program.storage_names``): for MicroAdam ``error`` (packed 4-bit codes),
``error_min``, ``error_max``, ``window_index`` and ``window_value``, and with ``master_weights=True``
``master_param`` (bf16 and fp16 parameters only).
"""

from __future__ import annotations

import functools
from itertools import chain
from typing import Any

import torch

from . import dsl, grad_factors, groups, ir, sparse, window_reference
from .dtypes import LOW_PRECISION, storage_dtype
from .groups import MASTER_WEIGHTS, MAX_GRAD_NORM, NONFINITE, STOCHASTIC_ROUNDING

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BACKENDS = (None, "reference", "triton")


def step_defaults(max_grad_norm=None, nonfinite: str = "propagate", stochastic_rounding: bool = False,
                  sr_seed: int = 0, master_weights: bool = False) -> dict[str, Any]:
    """The group keys every window optimizer takes besides the rule's hyperparameters (see
    :class:`WindowOptimizer`)."""
    return {MAX_GRAD_NORM: max_grad_norm, NONFINITE: nonfinite, STOCHASTIC_ROUNDING: stochastic_rounding,
            ir.SR_SEED: sr_seed, MASTER_WEIGHTS: master_weights}


class WindowOptimizer(torch.optim.Optimizer):
    """Runs a rule with a window. ``rule``: a :class:`fusedopt.dsl.Rule` that declares one window;
    hyperparameters: the rule's (defaults from the rule); ``states``: per-group state settings;
    ``backend``: "triton" (one fused launch per group and device; an error where the kernel cannot
    run the group's program), "reference" (eager) or None: "triton" for CUDA tensors whose program
    the kernel runs, "reference" for the rest. Float64 or non-contiguous parameters of a fused group
    are stepped eagerly.

    As :class:`fusedopt.FusedOptimizer`, every group also takes:

    * ``max_grad_norm``: None, or clip the gradients as ``torch.nn.utils.clip_grad_norm_`` over the
      parameters of every group that clips, before the step (the factor is computed on the device
      before the launches, no host sync; the kernel multiplies each gradient by it);
    * ``nonfinite``: "propagate" (as torch.optim) or "skip": a NaN or Inf in any gradient of the
      groups that skip leaves all their parameters, states, windows and step counters as they were
      (one flag computed on the device before the launches; the kernel then steps no block);
    * ``stochastic_rounding`` (and its ``sr_seed``): bf16 and fp16 parameters are written rounded
      stochastically (:mod:`fusedopt.rounding`), reproducibly under the seed;
    * ``master_weights``: a float32 copy of each bf16 or fp16 parameter (state ``master_param``) that
      the rule reads and updates in place of ``p``; the parameter receives its new value rounded (a
      bf16 one stochastically with ``stochastic_rounding``). Float32 parameters keep none (it would
      equal them) and step as without it. A checkpoint without it starts it from ``p``.
    """

    def __init__(self, params, rule: dsl.Rule, backend: str | None = None,
                 states: dict[str, dict[str, Any]] | None = None, max_grad_norm=None, nonfinite: str = "propagate",
                 stochastic_rounding: bool = False, sr_seed: int = 0, master_weights: bool = False, **hparams):
        storage_keys = sorted({"state_dtype", "quant_threshold"} & set(hparams))
        if storage_keys:
            raise ValueError(f"{type(self).__name__} takes no {storage_keys}: the storage of a state beside a window "
                             "is the rule's (state(..., dtype='q4minmax')), or is chosen per state with "
                             "states={'error': {'dtype': 'q8minmax'}} (fp32, bf16, q4minmax or q8minmax)")
        unknown = sorted(set(hparams) - set(getattr(rule, "hparams", {})))
        if unknown:
            raise ValueError(f"rule '{rule.name}' has no hyperparameter(s) {unknown}; it has {sorted(rule.hparams)}")
        self._setup(params, rule, backend, {**rule.hparams, **hparams, "states": dict(states or {}),
                                            **step_defaults(max_grad_norm, nonfinite, stochastic_rounding,
                                                            sr_seed, master_weights)})

    def _setup(self, params, rule: dsl.Rule, backend: str | None, defaults: dict) -> None:
        """Check the rule and the backend, build the param groups from ``defaults`` and check every
        group's program (so mistakes surface at construction, not inside a step)."""
        if not isinstance(rule, dsl.Rule):
            raise TypeError(f"rule must be a fusedopt.dsl.Rule, got {rule!r}")
        if rule.program().window is None:
            raise ValueError(f"rule '{rule.name}' declares no window; run it with fusedopt.FusedOptimizer")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be 'triton', 'reference' or None (by device), got {backend!r}")
        self.rule = rule
        self.backend = backend
        self._programs: dict[tuple, ir.Program] = {}
        self._plans: dict[tuple, window_reference.WindowPlan] = {}
        self._kernel_keys: dict[ir.Program, str] = {}
        self._loading = False  # while a checkpoint's values are written into the groups
        # id(group) -> (group, {device: {"clip_scale": factor, "nonfinite_flag": 0 or 1}}): float64
        # tensors (grad_factors.new_factors) written before each step's launches, read by the kernels
        self._factors: dict[int, tuple[dict, dict[torch.device, dict[str, torch.Tensor]]]] = {}
        self._opt_called = True  # step() is never wrapped by LR schedulers (see the end of the module)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        """As torch.optim's (defaults, leaves, duplicates), then the group's values and program are
        checked, its hyperparameters put in device tensors (see fusedopt.groups: a scheduler's new
        lr is new data, never a recompile) and, where it runs fused, its kernel built. A group that
        fails is not kept."""
        super().add_param_group(param_group)
        try:
            group = self.param_groups[-1]
            for p in group["params"]:
                if not p.is_floating_point():
                    raise ValueError(f"{type(self).__name__} optimizes floating-point parameters, got one of dtype {p.dtype}")
            groups.check_step_keys(type(self).__name__, group)
            self._prepare_group(group)
            self.param_groups[-1] = groups.held_in_tensors(group, (*self.hparam_keys(), ir.SR_SEED, MAX_GRAD_NORM))
            self.param_groups[-1].on_change = self._on_change
        except BaseException:
            self.param_groups.pop()
            raise
        self._refresh_groups()

    def _on_change(self, group: dict, key: str) -> None:
        """A value written into a group by hand (ParamGroup.on_change): build what it needs now."""
        self._prepare_group(group)

    def _prepare_group(self, group: dict) -> None:
        """Check the group's values and build its programs (and kernels, where they run fused): when
        the group is added, and again when an option is written by hand (groups.ParamGroup.on_change),
        so that a compiled step finds them built. With master weights a group has two programs: with
        the float32 copy for its bf16 and fp16 parameters, without it for the others."""
        if getattr(self, "_loading", True):  # a load writing its values, or a copy being rebuilt
            return
        self.check_group(group)
        for master in {bool(group[MASTER_WEIGHTS]), False}:
            program = self._program_for(group, master)
            problem = _kernel_problem(program)
            if self.backend == "triton" and problem:
                raise ValueError(f"backend='triton' cannot run this group: {problem}")
            if not problem and any(self._backend_for(p) == "triton" for p in group["params"]):
                self._kernel_key(program)

    def _refresh_groups(self) -> None:
        """After the groups changed: steps read this copy of the list (dynamo's handling of
        Optimizer.param_groups, which marks torch's own groups capturable, does not take a group with
        its own __setitem__), and every group has its clipping factor and non-finite flag on each of
        its devices, made here rather than inside a traced step."""
        self._groups = list(self.param_groups)
        factors = {}
        for group in self._groups:
            kept = getattr(self, "_factors", {}).get(id(group))
            if kept is None or kept[0] is not group:
                kept = (group, grad_factors.new_factors(p.device for p in group["params"]))
            factors[id(group)] = kept
        self._factors = factors

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch.optim's, but traceable by torch.compile (torch's is marked untraceable)."""
        groups.zero_grad(self._groups, set_to_none)

    # ---- what a group runs -----------------------------------------------------------------------

    def check_group(self, group: dict) -> None:
        """Raise ValueError for a param group's values that cannot work (subclasses check theirs)."""

    def hparam_keys(self) -> tuple[str, ...]:
        """The group keys that hold hyperparameters (numbers, or tuples of them), kept in tensors."""
        return tuple(self.rule.hparams)

    def state_settings(self, group: dict) -> dict[str, dict[str, Any]]:
        """The group's state settings (subclasses map their own arguments here)."""
        return group["states"]

    def hparam_values(self, group: dict) -> dict[str, float | torch.Tensor]:
        """The group's value of each hyperparameter of the rule (subclasses map their arguments)."""
        return {name: group[name] for name in self.rule.hparams}

    def _program_key(self, group: dict, master: bool) -> tuple:
        settings = self.state_settings(group)
        flags = (group[MAX_GRAD_NORM] is not None, group[NONFINITE] == "skip", group[STOCHASTIC_ROUNDING],
                 bool(master))
        # in the settings' own order (not sorted: dynamo cannot sort tuples inside a compiled step); the
        # same settings written in another order only build the same program twice
        return tuple((name, tuple(values.items())) for name, values in settings.items()), flags

    def program(self, group: dict, p: torch.Tensor | None = None) -> ir.Program:
        """The program that steps ``p`` (or, without ``p``, the group's bf16 parameters): the rule with
        the group's state settings, clipping, non-finite policy, stochastic rounding and master
        weights, which only bf16 and fp16 parameters keep (a float32 copy of a float32 parameter would
        equal it). Built once per choice, so that a compiled step only looks it up."""
        return self._program_for(group, group[MASTER_WEIGHTS] and (p is None or p.dtype in LOW_PRECISION))

    def _program_for(self, group: dict, master: bool) -> ir.Program:
        key = self._program_key(group, master)
        program = self._programs.get(key)
        if program is None:
            settings, flags = self.state_settings(group), key[1]
            clip, skip, rounding, master = flags
            base = self.rule.program(clip="scale" if clip else False, skip_nonfinite="flag" if skip else None,
                                     stochastic_rounding=rounding, master_weights=master)
            program = dsl.configure_states(base, settings)
            self._plans[key] = window_reference.plan(program)  # every form a step reads, built now
            self._programs[key] = program
        return program

    def _plan(self, group: dict, p: torch.Tensor) -> window_reference.WindowPlan:
        """The program of ``p`` lowered and flattened (built with it by :meth:`program`): a step only
        looks it up."""
        program = self.program(group, p)
        return self._plans[self._program_key(group, ir.MASTER in program.storage_names)]

    def _kernel_key(self, program: ir.Program) -> str:
        key = self._kernel_keys.get(program)
        if key is None:
            from codegen import window_ops  # the front ends are the only modules that reach codegen

            key = self._kernel_keys[program] = window_ops.register(program)
        return key

    def _backend_for(self, p: torch.Tensor) -> str:
        if self.backend is not None:
            return self.backend
        return "triton" if p.device.type == "cuda" else "reference"

    def _fused(self, program: ir.Program, p: torch.Tensor) -> bool:
        if self._backend_for(p) != "triton":
            return False
        if program not in self._kernel_keys:  # a group added after construction
            if _kernel_problem(program):
                return False
            self._kernel_key(program)
        grad = p.grad if p.grad is not None else p
        return (p.dtype in _KERNEL_DTYPES and grad.dtype in _KERNEL_DTYPES and p.is_contiguous()
                and grad.is_contiguous() and grad.shape == p.shape and grad.device == p.device and p.numel() > 0)

    # ---- state -----------------------------------------------------------------------------------

    def _state_of(self, program: ir.Program, p: torch.Tensor, fused: bool) -> dict:
        state = self.state[p]
        if ir.MASTER in state and ir.MASTER not in program.storage_names:
            del state[ir.MASTER]  # master weights turned off: a copy kept now would be stale when turned on
        if not state:
            state.update(window_reference.init_state(program, p))
            # the fused kernel reads and advances the counter on the device; the eager code on the host
            state["step"] = torch.zeros((), dtype=torch.int64, device=p.device if fused else "cpu")
        elif ir.MASTER in program.storage_names and ir.MASTER not in state:
            # master weights turned on, or a checkpoint without them: the copy starts from the parameter
            state[ir.MASTER] = p.detach().to(dtype=storage_dtype("fp32", p.dtype), copy=True)
        for name, (shape, dtype) in _storage_shapes(program, p.numel(), p.shape, p.dtype).items():
            value = state.get(name)
            if value is None or tuple(value.shape) != tuple(shape) or value.dtype != dtype:
                found = None if value is None else (tuple(value.shape), value.dtype)
                raise ValueError(f"state '{name}' of a parameter of {p.numel()} elements is {found}, but the group's "
                                 f"settings need {(tuple(shape), dtype)}: the window (m, block, density, value "
                                 "dtype) and the error feedback's storage (quant_block, exact or quantized) cannot "
                                 "change once a parameter has state. Fix: set them before the first step, or "
                                 "start a new optimizer")
        return state

    # Pickles and copies (see groups.pickled_state): built programs, kernel keys and factors are rebuilt
    _DERIVED = ("_programs", "_plans", "_kernel_keys", "_factors", "_groups")

    def __getstate__(self) -> dict:
        return groups.pickled_state(self, self._DERIVED)

    def __setstate__(self, state: dict) -> None:
        # (torch's load_state_dict calls this too, on this very optimizer, while _loading)
        groups.restore_optimizer(self, state, self._on_change)
        self.__dict__.setdefault("_programs", {})
        self.__dict__.setdefault("_plans", {})
        self.__dict__.setdefault("_kernel_keys", {})
        self._refresh_groups()
        if not self._loading:  # a copy or an unpickled optimizer: its programs built now, not in a compiled step
            for group in self.param_groups:
                self._prepare_group(group)

    def state_bytes_moved(self, p: torch.Tensor) -> int:
        """Least bytes a step moves for ``p``'s state: the whole window is read and one row of it
        written; every other state is read and written. (For benchmarks' bandwidth figures.)"""
        group = next((g for g in self.param_groups if any(q is p for q in g["params"])), None)
        state = self.state.get(p, {})
        if group is None or not state:
            return 0
        window = self.program(group, p).window
        moved = 0
        for name, value in state.items():
            if isinstance(value, torch.Tensor) and value.device == p.device and name != "step":
                size = value.numel() * value.element_size()
                moved += size + (size // window.m if name in window.storage else size)
        return moved

    def state_dict(self) -> dict:
        """torch.optim's layout; hyperparameter tensors are saved as Python floats (before torch's
        post-hooks run)."""
        def finish(sd: dict) -> None:
            for group in sd["param_groups"]:
                groups.saved_numbers(group, ints=(ir.SR_SEED,))

        return groups.state_dict_with(self, finish)

    def load_state_dict(self, state_dict: dict) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, but every state keeps its own dtype (the base
        class casts floating-point states to the parameter's dtype) and is copied, so stepping never
        writes into the loaded dictionary; hyperparameters go back into device tensors. As in
        FusedOptimizer, ``master_weights`` stays this optimizer's choice (a checkpoint without the
        float32 copy starts it from the parameter) and keys a checkpoint lacks (one saved before they
        existed) keep the group's current values; the step keys (clipping, non-finite policy,
        stochastic rounding) are checked before anything changes."""
        saved_groups = state_dict.get("param_groups")
        if not isinstance(saved_groups, list) or len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(saved_groups) if isinstance(saved_groups, list) else 'no list of'} "
                             f"param groups, this optimizer has {len(self.param_groups)}")
        merged_groups = []
        for saved, mine in zip(saved_groups, self.param_groups):
            merged = {**{k: v for k, v in mine.items() if k != "params"},
                      **{k: v for k, v in saved.items() if k != MASTER_WEIGHTS}}
            seed = merged[ir.SR_SEED]
            if isinstance(seed, float) and seed.is_integer():
                merged[ir.SR_SEED] = int(seed)
            groups.check_step_keys(type(self).__name__, {**merged, "params": mine["params"]})
            merged_groups.append(merged)
        originals = list(self.param_groups)
        self._loading = True  # nothing is built until every value is written (__setstate__ included)
        try:
            super().load_state_dict({**state_dict, "param_groups": merged_groups})
            # the values go into the groups this optimizer had (numbers into their hyperparameter
            # tensors, keys in their order): a compiled step reads the same objects after a load
            for mine, loaded in zip(originals, self.param_groups):
                for key, value in loaded.items():
                    if key != "params":
                        mine[key] = value
        finally:
            self._loading = False
        self.param_groups[:] = originals
        self._refresh_groups()
        for group in originals:
            self._prepare_group(group)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        group_of = chain.from_iterable([g] * len(g["params"]) for g in self.param_groups)
        for saved_id, p, group in zip(saved_ids, params, group_of):
            saved = state_dict["state"].get(saved_id)
            if saved is None:
                continue
            shapes = window_reference.storage_shapes(self.program(group, p), p.numel(), p.shape, p.dtype)
            for key in [k for k in self.state[p] if k not in shapes and k != "step"]:
                del self.state[p][key]  # a master copy this optimizer does not keep
            for key, (_, dtype) in shapes.items():
                if key in saved:
                    self.state[p][key] = saved[key].to(device=p.device, dtype=dtype, copy=True)
            if "step" in saved:
                self.state[p]["step"] = saved["step"].to(device="cpu", dtype=torch.int64, copy=True)

    # ---- step ------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._update_factors()
        for group in self._groups:
            fused: list[tuple[ir.Program, list[torch.Tensor]]] = []  # one launch per program (and device)
            values = None  # the hyperparameters (tensors), read once per group for eager steps
            for p in group["params"]:
                if p.grad is None or p.numel() == 0:  # an empty parameter has nothing to select or update
                    continue
                if p.grad.is_sparse:
                    raise ValueError(f"{type(self).__name__} does not take sparse gradients (parameter of shape "
                                     f"{tuple(p.shape)}); use dense ones, e.g. nn.Embedding(..., sparse=False)")
                program = self.program(group, p)
                if self._fused(program, p):
                    same = next((ps for prog, ps in fused if prog is program), None)
                    if same is None:
                        fused.append((program, [p]))
                    else:
                        same.append(p)
                    continue
                state = self._state_of(program, p, fused=False)
                if state["step"].device.type != "cpu":
                    state["step"] = state["step"].cpu()
                if values is None or values[1] != p.device:
                    values = dict(zip(program.hparams, self._hparams_on(group, program, p.device))), p.device
                window_reference.step(program, p, p.grad, state, state["step"], values[0], self._plan(group, p))
            for program, ps in fused:
                self._step_fused(group, program, ps)
        return loss

    def _update_factors(self) -> None:
        """Before any launch, on the device: one gradient norm over every group that clips (as
        clip_grad_norm_ over all their parameters) and each such group's factor; one non-finite flag over
        every group that skips (a NaN or Inf in any of them skips them all)."""
        grad_factors.write_clip_factors([g for g in self._groups if g[MAX_GRAD_NORM] is not None],
                                        lambda group: self._factors[id(group)][1].values())
        grad_factors.write_skip_flags([g for g in self._groups if g[NONFINITE] == "skip"],
                                      lambda group: self._factors[id(group)][1].values())

    def _hparams_on(self, group: dict, program: ir.Program, device: torch.device) -> list[torch.Tensor]:
        """The program's hyperparameters as 0-d float64 tensors on ``device``, in its order: the
        group's own tensors (see fusedopt.groups: a scheduler's new lr is written into them, so a
        compiled step sees new data and compiles nothing), copied only for another device; a plain
        number (a subclass's hparam_values may return one) becomes a new tensor. ``sr_seed`` is the
        group's; ``clip_scale`` and ``nonfinite_flag`` are this step's factors."""
        values = self.hparam_values(group)
        factors = self._factors[id(group)][1]
        out = []
        for name in program.hparams:
            if name in values:
                v = values[name]
            elif name == ir.SR_SEED:
                v = group[ir.SR_SEED]
            else:
                v = grad_factors.as_hparam(factors[device][name] if device in factors
                                           else next(iter(factors.values()))[name])
            if isinstance(v, torch.Tensor):
                v = v.reshape(())
                out.append(v if (v.dtype, v.device) == (torch.float64, device) else v.to(device, torch.float64))
            else:
                out.append(torch.tensor(float(v), dtype=torch.float64, device=device))
        return out

    def _step_fused(self, group: dict, program: ir.Program, params: list[torch.Tensor]) -> None:
        """One launch of the fused kernel over ``params`` (all on one device; else one per device)."""
        from codegen import window_ops

        key = self._kernel_key(program)
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for p in params:
            by_device.setdefault(p.device, []).append(p)
        for device, ps in by_device.items():
            states = []
            for p in ps:
                state = self._state_of(program, p, fused=True)
                if state["step"].device != device:
                    state["step"] = state["step"].to(device)
                states.append(state)
            window_ops.step(key, ps, [p.grad for p in ps],
                            [s[name] for name in program.storage_names for s in states],
                            [s["step"] for s in states], self._hparams_on(group, program, device))


@functools.lru_cache(maxsize=4096)
def _storage_shapes(program: ir.Program, numel: int, shape: torch.Size, dtype: torch.dtype) -> dict:
    return window_reference.storage_shapes(program, numel, shape, dtype)


def _kernel_problem(program: ir.Program) -> str | None:
    """Why the fused kernel cannot run ``program``, or None."""
    from codegen import window_template

    return window_template.supported(program)


def state_bytes(program: ir.Program, numel: int) -> int:
    """Bytes of state for one parameter of ``numel`` elements, from the shapes alone (nothing is
    allocated), the 8-byte step counter included."""
    return window_reference.state_bytes(program, numel) + 8


# LR schedulers wrap ``optimizer.step`` in a closure over a weakref that dynamo cannot trace; this marker
# tells them the step is already tracked (they only read ``_opt_called``, set in __init__).
WindowOptimizer.step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
