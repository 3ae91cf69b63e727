"""The torch.optim front end: :class:`FusedOptimizer` runs any rule over param groups.

Hyperparameters live in 0-d float64 tensors on the parameters' device, so changing a learning rate
(by hand, ``group["lr"] = 0.1``, or through any ``torch.optim.lr_scheduler``) writes data in place and
never changes code: a ``torch.compile``d training step does not recompile. Per-parameter state uses
torch.optim's keys (``step``, ``exp_avg``, ...), so checkpoints move between fusedopt and torch.optim.

This module and fusedopt.window_optimizer are the two places that join the rule side (dsl, ir,
reference) with ``codegen``.
"""

from __future__ import annotations

import functools
import itertools
import math
import numbers
import operator
from itertools import chain
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import torch

from . import grad_factors, groups, ir, quant, reference
from .dsl import CLIP_HPARAM, CLIP_SCALE, SKIP_FLAG, Rule
from .groups import ParamGroup
from .dtypes import LOW_PRECISION, PARAM_DTYPES, storage_dtype

STATE_DTYPE = "state_dtype"  # group keys every optimizer has (see FusedOptimizer)
QUANT_THRESHOLD = "quant_threshold"
from .groups import MASTER_WEIGHTS, NONFINITE, NONFINITE_POLICIES, STOCHASTIC_ROUNDING  # noqa: E402,F401

BACKENDS = ("reference", "triton")

# Which map quantized codes in a checkpoint were made with. The compact form saves QUANT_MAPS in every
# param group that holds codes: the version of the state declarations its codes follow (signed map for
# signed states, unsigned for nonnegative ones); a pickled optimizer keeps it too. A version that
# changed a state's declared signedness lists, under the rule's module-level name, the state and the
# map (True: signed) that codes had before it; codes of an earlier version (no QUANT_MAPS: version 1)
# are decoded with that map and coded again with the current one.
QUANT_MAPS = "quant_maps"
QUANT_MAPS_VERSION = 2
SIGNEDNESS_CHANGES: dict[int, dict[str, dict[str, bool]]] = {
    2: {"fusedopt.optimizers.adafactor.adafactor": {"variance": True}},  # now declared nonnegative
}


class _Prepared(NamedTuple):
    program: ir.Program
    reference: reference.Compiled
    kernel_keys: dict  # device -> key of the registered fused kernel program
    group_wide: bool  # has a reduction over the whole group: every tensor in one call


class _FastGroup:
    """What a group's last eager step launched, replayed while nothing it depends on has changed.

    A step over ~150 tensors otherwise spends milliseconds of Python per call regrouping tensors,
    checking eligibility and rebuilding pointer lists. The replay checks, per step: the same
    parameter objects with the same addresses, shapes and strides, the same state (``opt.state[p]``
    the same dict holding the same tensor objects), the same static options, and gradients that are either
    the same objects or new ones with the same dtype, shape, strides and device (new addresses are
    patched into the device tables). Anything else (a missing gradient, a replaced parameter, a
    cleared or replaced state, a loaded checkpoint) takes the full path, which records the group again.
    """

    def __init__(self, opt: "FusedOptimizer", group: "ParamGroup", options: tuple, calls: list,
                 before: Callable | None = None):
        self.params_list = group["params"]
        self.params = list(self.params_list)
        self.param_layouts = [(p.data_ptr(), p.shape, p.stride()) for p in self.params]
        self.states = [opt.state.get(p) for p in self.params]
        self.state_sizes = tuple(map(len, self.states))
        self.state_values = tuple(chain.from_iterable(map(dict.values, self.states)))
        self.grads = [p.grad for p in self.params]
        self.layouts = [(g.dtype, g.shape, g.stride(), g.device) for g in self.grads]
        self.options = options
        self.calls = calls  # (ops.EagerStep, positions of its tensors in the group)
        self.before = before  # run with the step's gradients before the launches (a clipping factor)
        self.new_grads: list | None = None

    def ready(self, opt: "FusedOptimizer", group: "ParamGroup") -> bool:
        params = group["params"]
        if params is not self.params_list or len(params) != len(self.params) \
                or not all(map(operator.is_, params, self.params)) or opt._static_options(group) != self.options:
            return False
        grads = [p.grad for p in params]
        self.new_grads = None
        if not all(map(operator.is_, grads, self.grads)):
            for g, (dtype, shape, stride, device) in zip(grads, self.layouts):
                if g is None or g.dtype != dtype or g.shape != shape or g.stride() != stride \
                        or g.device != device or g.is_sparse:
                    return False
            self.new_grads = grads
        return ([(p.data_ptr(), p.shape, p.stride()) for p in params] == self.param_layouts
                and self._same_state(opt.state))

    def _same_state(self, state: Mapping) -> bool:
        return (all(map(operator.is_, map(state.get, self.params), self.states))
                and tuple(map(len, self.states)) == self.state_sizes
                and all(map(operator.is_, chain.from_iterable(map(dict.values, self.states)), self.state_values)))

    def run(self) -> None:
        grads = self.new_grads
        if self.before is not None:
            self.before(self.grads if grads is None else grads)
        for call, positions in self.calls:
            call.run(None if grads is None else [grads[i] for i in positions])
        if grads is not None:
            self.grads = grads


class FusedOptimizer(torch.optim.Optimizer):
    """Runs ``rule`` (a :class:`fusedopt.dsl.Rule`) as a torch.optim.Optimizer.

    Keyword arguments set the rule's hyperparameters and options for every group; a group dict may
    override any of them. ``backend``: "triton" (fused kernels; the default for CUDA parameters) or
    "reference" (the eager interpreter; the default elsewhere).
    """

    # Group keys holding several rule hyperparameters, e.g. {"betas": ("beta1", "beta2")}.
    aliases: Mapping[str, tuple[str, ...]] = {}
    # Keys accepted for torch.optim signature compatibility and stored in groups untouched.
    passthrough: tuple[str, ...] = ()
    # Hyperparameter keys that may be None: _complete_group resolves them (Adafactor's lr, eps1, beta1).
    nullable: tuple[str, ...] = ()
    # States a checkpoint may hold that the group's current options do not use (SGD's momentum buffer
    # while its momentum is 0): loaded as they are, and used again when the options need them.
    unused_states: tuple[str, ...] = ()
    group_type: type = ParamGroup  # a subclass may derive options from written values (see SGD)

    def __init__(self, params: Iterable, rule: Rule, *, backend: str | None = None, **hparams: Any):
        if not isinstance(rule, Rule):
            raise TypeError(f"rule must be a fusedopt Rule (made with @rule), got {type(rule).__name__}")
        if backend not in (None, *BACKENDS):
            raise ValueError(f"backend={backend!r} is not one of {list(BACKENDS)} (or None for automatic)")
        if rule.program().window is not None:
            raise ValueError(f"rule '{rule.name}' declares a window; run it with fusedopt.WindowOptimizer(params, "
                             f"rule) (fusedopt.MicroAdam for the built-in one)")
        self.rule = rule
        self.backend = backend
        self._alias_of = {h: (key, i) for key, names in self.aliases.items() for i, h in enumerate(names)}
        defaults = self._defaults(hparams)
        self._groups: list[ParamGroup] = []
        self._prepared_by_options: dict[tuple, _Prepared] = {}
        self._loading = False  # while a checkpoint's values are written into the groups
        self._fast: dict[int, _FastGroup] = {}  # id(group) -> its replayable eager step
        # (id(group), state_dtype, quant_threshold) -> whether its tensors run as several programs
        self._multi: dict[tuple, bool] = {}
        self._wide: dict[tuple, bool] = {}  # (rule options, matrix) -> the rule reduces over the group
        # id(group) -> {device: {"clip_scale": factor, "nonfinite_flag": 0 or 1}}, computed before the
        # launches of a group that runs as several programs, one copy on each device of the group
        self._factors: dict[int, dict[torch.device, dict[str, torch.Tensor]]] = {}
        super().__init__(params, defaults)
        self._opt_called = True  # step() is never wrapped by LR schedulers (see below)

    # ---- groups ---------------------------------------------------------------------------------

    def _hparam_keys(self) -> list[str]:
        keys = [h for h in self.rule.hparams if h not in self._alias_of]
        return keys + list(self.aliases)

    def _defaults(self, given: Mapping[str, Any]) -> dict[str, Any]:
        defaults: dict[str, Any] = {}
        for key in self._hparam_keys():
            names = self.aliases.get(key)
            defaults[key] = tuple(self.rule.hparams[n] for n in names) if names else self.rule.hparams[key]
        defaults.update({k: v for k, v in self.rule.options.items() if k != ir.MATRIX_OPTION})
        defaults[CLIP_HPARAM] = None  # every rule: None, or a global gradient norm to clip to
        defaults[STATE_DTYPE] = "fp32"  # storage of full-size states: "fp32", "bf16", "q8" or "q4"
        defaults[QUANT_THRESHOLD] = 4096  # tensors with fewer elements keep fp32 states under q8/q4
        defaults[STOCHASTIC_ROUNDING] = False  # bf16/fp16 parameters written with stochastic rounding
        defaults[ir.SR_SEED] = 0  # its seed: steps are reproducible under it
        defaults[MASTER_WEIGHTS] = False  # a float32 copy of each parameter, updated in its place
        defaults[NONFINITE] = "propagate"  # or "skip": a NaN/Inf gradient leaves the skipping groups' step undone
        valid = set(defaults) | set(self.passthrough)
        for key, value in given.items():
            if key not in valid:
                raise TypeError(f"{type(self).__name__}: unknown argument '{key}'; rule '{self.rule.name}' "
                                f"accepts {sorted(valid)}")
            defaults[key] = value
        return defaults

    def _complete_group(self, group: dict[str, Any]) -> None:
        """Hook for subclasses: derive options from hyperparameters, validate values."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = dict(param_group)
        params = group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        for p in params:
            if isinstance(p, torch.Tensor) and (p.is_complex() or p.dtype not in PARAM_DTYPES):
                raise TypeError(f"{type(self).__name__}: parameter of dtype {p.dtype} is not supported; "
                                f"supported are {[str(d) for d in PARAM_DTYPES]} (view complex parameters "
                                "as real with torch.view_as_real before creating the optimizer)")
        group["params"] = params
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        self._check_numbers(group)
        self._complete_group(group)
        self._check_group(group)
        super().add_param_group(group)  # checks leaves and duplicates; nothing is stored on failure
        try:
            converted = groups.held_in_tensors(self.param_groups[-1], [*self._hparam_keys(), ir.SR_SEED, CLIP_HPARAM],
                                               self.group_type)
            self.param_groups[-1] = converted
            self._groups = list(self.param_groups)
            self._prepare_groups()
            converted.on_change = self._on_change
        except BaseException:  # e.g. a device the kernels cannot run on: the group is not kept
            dropped = self.param_groups.pop()
            self._groups = list(self.param_groups)
            self._factors.pop(id(dropped), None)
            self._multi = {k: v for k, v in self._multi.items() if k[0] != id(dropped)}
            raise

    def _check_numbers(self, group: Mapping[str, Any]) -> None:
        """Every hyperparameter a number (or a one-element tensor); None only for keys in
        ``nullable``, which a subclass resolves."""
        for key in self._hparam_keys():
            value = group[key]
            names = self.aliases.get(key)
            if names is not None and not (isinstance(value, (tuple, list)) and len(value) == len(names)):
                raise ValueError(f"{type(self).__name__}: {key}={value!r}; expected {len(names)} numbers "
                                 f"({', '.join(names)})")
            for v in value if names is not None else (value,):
                number = isinstance(v, numbers.Real) and not isinstance(v, bool)
                if not ((v is None and key in self.nullable) or number
                        or (isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_complex())):
                    raise TypeError(f"{type(self).__name__}: {key}={value!r} is not a number. Fix: pass a float "
                                    "(or a one-element tensor)")

    def _check_group(self, group: Mapping[str, Any]) -> None:
        """The front end's own group keys (checked again when a checkpoint loads)."""
        cls = type(self).__name__
        groups.check_step_keys(cls, group)
        for key in self._group_options():
            if not isinstance(group[key], bool):
                raise TypeError(f"{cls}: option '{key}' must be a bool, got {group[key]!r}")
        groups.check_storage(cls, group[STATE_DTYPE])
        groups.check_threshold(cls, group[QUANT_THRESHOLD])

    def _prepare_group(self, group: ParamGroup) -> None:
        """Build every program the group's tensors may run (and check the group runs): when the group
        is added, and again when a static option is written by hand, so that a compiled step finds
        them built (building a rule's program cannot be traced)."""
        if getattr(self, "_loading", True):  # a load writing its values, or a copy being rebuilt
            return
        for matrix in self._matrix_choices():
            for storage in {group[STATE_DTYPE], "fp32"}:
                for master in {bool(group[MASTER_WEIGHTS]), False}:
                    self._prepared(group, matrix, storage, master)
        self._check_group_runs(group)
        rule_options = tuple(group[k] for k in self._group_options())
        for matrix in {None, *self._matrix_choices()}:
            self._reduces_over_group(rule_options, matrix)

    def _on_change(self, group: ParamGroup, key: str) -> None:
        """A value written into a group by hand (ParamGroup.on_change): a static option builds the
        programs it needs now; clipping and skipping, those of every group (several clipping or
        skipping groups share their factors); anything else (a scheduler's own keys) nothing."""
        if key in (CLIP_HPARAM, NONFINITE):
            self._prepare_groups()
        elif key in (STATE_DTYPE, QUANT_THRESHOLD, STOCHASTIC_ROUNDING, MASTER_WEIGHTS, *self._group_options()):
            self._prepare_group(group)

    def _prepare_groups(self) -> None:
        """_prepare_group for every group (a group that clips or skips changes how the others run),
        and the factors that several clipping or skipping groups share, made now rather than in a
        traced step: when a group is added or loaded, and when clipping or skipping is written by hand."""
        if getattr(self, "_loading", True):
            return
        for group in self._groups:
            self._prepare_group(group)
        for runs in (_clips, _skips):
            if _at_least_two(self._groups, runs):
                for group in filter(runs, self._groups):
                    self._make_factors(group)

    def _check_group_runs(self, group: Mapping[str, Any]) -> None:
        """A rule reducing over the whole group in its own update needs the group in one fused call:
        refused here, before any step, when the group's tensors need several programs."""
        kinds = {(p.device, *self._kind_of(group, p)) for p in group["params"]}
        if len(kinds) > 1 and any(self._prepared(group, *kind).group_wide for _, *kind in kinds):
            raise ValueError(f"{type(self).__name__}: rule '{self.rule.name}' reduces over the whole group in its own "
                             "update, which one fused call must see whole, but this group's parameters need "
                             f"{len(kinds)} programs (devices, tensor kinds or state storages: {sorted(map(str, kinds))}). "
                             f"Fix: split the group, or give it one state storage (e.g. {QUANT_THRESHOLD}=0)")

    def _group_options(self) -> list[str]:
        return [k for k in self.rule.options if k != ir.MATRIX_OPTION]

    def _matrix_choices(self) -> tuple:
        """Rules with a `matrix` option get one program for tensors of >= 2 dims and one for the rest."""
        return (False, True) if ir.MATRIX_OPTION in self.rule.options else (None,)

    def _prepared(self, group: Mapping[str, Any], matrix: bool | None = None, storage: str = "fp32",
                  master: bool | None = None) -> "_Prepared":
        """The group's program in every form a step needs; built eagerly, looked up in step()."""
        options = self._options_of(group, matrix, storage, master)
        prepared = self._prepared_by_options.get(options)
        if prepared is None:
            chosen = dict(zip(self._group_options(), options))
            if matrix is not None:
                chosen[ir.MATRIX_OPTION] = matrix
            *_, clip, _, rounding, master, skip = options
            program = self.rule.program(clip=clip or False, state_dtype=storage, stochastic_rounding=rounding,
                                        master_weights=master, skip_nonfinite=skip, **chosen)
            prepared = _Prepared(program, reference.compile_program(program), {}, program.has_group_reductions)
            program.needs_reference, program.uses_blocks, program.has_small_layouts  # computed now, read later
            self._prepared_by_options[options] = prepared
        devices = {p.device for p in group["params"]}
        for device in devices:
            if self._backend_for(device) == "triton" and device not in prepared.kernel_keys \
                    and not prepared.program.needs_reference:
                from codegen import ops  # the front ends are the only modules that reach codegen

                ops.target_for(device)  # a device the kernels cannot run on fails here, not in step()
                prepared.kernel_keys[device] = ops.register(prepared.program)
        return prepared

    def _options_of(self, group: Mapping[str, Any], matrix: bool | None, storage: str,
                    master: bool | None = None) -> tuple:
        """The static choices: the rule's options, the tensor kind, how gradients are clipped, the
        state storage, whether bf16 parameters are rounded stochastically, master weights (``None``:
        the group's choice), and how a non-finite gradient skips the step."""
        rule_options = tuple(group[k] for k in self._group_options())
        multi = self._runs_as_several_programs(group)
        clip = None
        if group.get(CLIP_HPARAM) is not None:
            # clip by a factor computed before the launches where the norm spans several groups or
            # programs, or where the rule reduces over the group itself (a reduction over a reduction)
            by_factor = multi or self._several_clipping_groups() or self._reduces_over_group(rule_options, matrix)
            clip = "scale" if by_factor else "norm"
            if by_factor:
                self._make_factors(group)
        skip = None if group[NONFINITE] == "propagate" else ("flag" if multi or self._several_skipping_groups() else "group")
        if skip == "flag":
            self._make_factors(group)
        master = group[MASTER_WEIGHTS] if master is None else master
        return (*rule_options, matrix, clip, storage, group[STOCHASTIC_ROUNDING], master, skip)

    def _reduces_over_group(self, rule_options: tuple, matrix: bool | None) -> bool:
        """Whether the rule's own update reduces over the group (for matrix None: in any of its
        per-tensor variants). Memoized when a group is added: a compiled step only looks it up."""
        key = (rule_options, matrix)
        wide = self._wide.get(key)
        if wide is None:
            if matrix is None and self._matrix_choices() != (None,):
                wide = any(self._reduces_over_group(rule_options, m) for m in self._matrix_choices())
            else:
                chosen = dict(zip(self._group_options(), rule_options))
                if matrix is not None:
                    chosen[ir.MATRIX_OPTION] = matrix
                wide = self.rule.program(**chosen).has_group_reductions
            self._wide[key] = wide
        return wide

    def _runs_as_several_programs(self, group: Mapping[str, Any]) -> bool:
        """Whether the group's tensors run as several programs (matrix and vector variants, quantized
        and float32 states, several devices). Then a group-wide clipping factor and non-finite flag
        cannot be reductions of one fused step: they are computed on the device before the launches
        (see _update_group_factors) and every program reads them as hyperparameters."""
        key = (id(group), group[STATE_DTYPE], group[QUANT_THRESHOLD], group[MASTER_WEIGHTS])  # changed by hand?
        multi = self._multi.get(key)
        if multi is None:
            kinds = {(p.device, *self._kind_of(group, p)) for p in group["params"]}
            multi = self._multi[key] = len(kinds) > 1
            if multi:
                self._make_factors(group)
        return multi

    def _make_factors(self, group: Mapping[str, Any]) -> None:
        """The group's clipping factor and non-finite flag, one copy per device. Made when the group is
        added (and when a second clipping group is), so that a compiled step finds them; the calls
        from a step only make what a change by hand since then needs."""
        if id(group) not in self._factors:
            self._factors[id(group)] = grad_factors.new_factors(p.device for p in group["params"])

    def _several_clipping_groups(self) -> bool:
        """Whether two or more groups clip (runs for every group every step)."""
        return _at_least_two(self._groups, _clips)

    def _several_skipping_groups(self) -> bool:
        """Whether two or more groups skip non-finite steps: then one flag over all their gradients
        skips them all (a step is skipped for the whole model, as torch.amp.GradScaler skips it)."""
        return _at_least_two(self._groups, _skips)

    def _update_skip_flags(self) -> None:
        """For an optimizer with several skipping groups, before any launch and without a host sync:
        one non-finite flag over the gradients of all of them, written for each."""
        skipping = list(filter(_skips, self._groups))
        for group in skipping:
            self._make_factors(group)
        grad_factors.write_skip_flags(skipping, lambda group: self._factors[id(group)].values())

    def _update_clip_factors(self) -> None:
        """For an optimizer with several clipping groups, before any launch and without a host sync:
        the norm of every gradient of those groups (in float64, as torch.nn.utils.clip_grad_norm_
        over all their parameters), and each group's factor min(1, max_grad_norm / (norm + 1e-6))."""
        clipping = list(filter(_clips, self._groups))
        for group in clipping:
            self._make_factors(group)
        grad_factors.write_clip_factors(clipping, lambda group: self._factors[id(group)].values())

    def _update_group_factors(self, group: Mapping[str, Any], grads: list) -> None:
        """Over every gradient of the group, without a host sync: the clipping factor
        min(1, max_grad_norm / (||g|| + 1e-6)) (as torch.nn.utils.clip_grad_norm_ computes it, the norm
        in float64; over every clipping group when there are several, see _update_clip_factors) and
        the flag that a gradient holds a NaN or an infinity."""
        grads = [g for g in grads if g is not None]
        first, *others = self._factors[id(group)].values()
        if not grads:
            return
        device = first[CLIP_SCALE].device
        if group.get(CLIP_HPARAM) is not None and not self._several_clipping_groups():
            first[CLIP_SCALE].copy_(grad_factors.clip_factor(group[CLIP_HPARAM], grad_factors.total_norm(grads, device)))
        if group[NONFINITE] == "skip" and not self._several_skipping_groups():
            first[SKIP_FLAG].copy_(grad_factors.any_nonfinite(grads, device))
        for copy in others:  # each device's programs read their own copy
            for name, value in first.items():
                copy[name].copy_(value, non_blocking=True)

    def _static_options(self, group: Mapping[str, Any]) -> tuple:
        """Everything static about a group, whatever its tensors."""
        return self._options_of(group, None, group[STATE_DTYPE]) + (group[QUANT_THRESHOLD],)

    def _kind_of(self, group: Mapping[str, Any], p: torch.Tensor) -> tuple[bool | None, str, bool]:
        """The per-tensor static choices: matrix or not (rules with a matrix option), the state
        storage (quantized storage only for tensors of at least quant_threshold elements), and a
        master copy (only of bf16 and fp16 parameters: a float32 one would equal its parameter)."""
        matrix = None if self._matrix_choices() == (None,) else p.dim() >= 2
        storage = group[STATE_DTYPE]
        # one element never quantizes: its codes would not tell q8 from q4 (one byte either way)
        if storage in ir.QUANTIZED and p.numel() < max(group[QUANT_THRESHOLD], 2):
            storage = "fp32"
        # a rule reducing over the group runs it as one program: copies for all its tensors then
        master = bool(group[MASTER_WEIGHTS]) and (
            p.dtype in LOW_PRECISION or self._reduces_over_group(tuple(group[k] for k in self._group_options()), matrix))
        return matrix, storage, master

    def _hparams(self, group: Mapping[str, Any], device: torch.device, program: ir.Program) -> dict:
        out = {}
        for name in program.hparams:
            if name in self._alias_of:
                key, i = self._alias_of[name]
                value = group[key][i]
            elif name in (CLIP_SCALE, SKIP_FLAG):
                value = grad_factors.as_hparam(self._factors[id(group)][device][name])
            else:
                value = group[name]
            if not isinstance(value, torch.Tensor) or value.device != device:
                value = groups.as_hparam_tensor(value, device)
            out[name] = value
        return out

    # ---- step -----------------------------------------------------------------------------------

    def _state_for(self, program: ir.Program, p: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
        st = self.state[p]
        if ir.MASTER in st and ir.MASTER not in program.storage_names:
            del st[ir.MASTER]  # master weights turned off: a copy kept now would be stale when turned on
        if "step" not in st:
            st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        view = self._block_view(p) if program.uses_blocks else None
        for spec in program.states:  # a storage changed by hand (group["state_dtype"] = ...): convert
            if spec.name in st and not _stored_as(spec, st, p, view):
                values = {k: st.pop(k) for k in (spec.name, spec.name + ir.ABSMAX_SUFFIX) if k in st}
                st.update(self._convert_one(spec, p, values, view))
        missing = [n for n in program.storage_names if n not in st]
        if missing:
            fresh = reference.init_state(program, p, g, self._block_view(p) if program.uses_blocks else None)
            for name in missing:
                st[name] = fresh[name]
        return st

    def _backend_for(self, device: torch.device) -> str:
        if self.backend is not None:
            return self.backend
        return "triton" if device.type == "cuda" else "reference"

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimizer step over every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        eager = not torch.compiler.is_compiling()
        work: list[tuple[ParamGroup, Any]] = []
        for group in self._groups:
            fast = self._fast.get(id(group)) if eager else None
            if fast is not None and fast.ready(self, group):
                work.append((group, fast))
                continue
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients "
                                       f"(parameter of shape {tuple(p.shape)}); use dense gradients, e.g. "
                                       "nn.Embedding(..., sparse=False)")
            if params:
                work.append((group, params))
        if self._several_clipping_groups():  # one norm over the clipping groups, before any launch
            self._update_clip_factors()
        if self._several_skipping_groups():  # one non-finite flag over the skipping groups
            self._update_skip_flags()
        for group, item in work:
            if isinstance(item, _FastGroup):
                item.run()
            else:
                self._step_group(group, item, eager)
        return loss

    def _step_group(self, group: ParamGroup, params: list, eager: bool) -> None:
        factors = None
        *_, clip, _, _, _, skip = self._static_options(group)[:-1]
        if clip == "scale" or skip == "flag":
            factors = functools.partial(self._update_group_factors, group)
            factors([p.grad for p in params])
        by_kind: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            by_kind.setdefault((p.device, *self._kind_of(group, p)), []).append(i)
        calls = []
        for (device, *kind), idx in by_kind.items():
            prepared = self._prepared_by_options.get(self._options_of(group, *kind))
            if prepared is None:  # an option was changed by hand (group["amsgrad"] = True)
                prepared = self._prepared(group, *kind)
            if len(by_kind) > 1 and prepared.group_wide:
                raise RuntimeError(f"{type(self).__name__}: rule '{self.rule.name}' reduces over the whole group "
                                   "in its own update, which one fused call must see whole, but this group's "
                                   f"parameters need {len(by_kind)} (devices, tensor kinds or state storages); "
                                   "split the group")
            call = self._step_tensors(prepared, group, device, [params[i] for i in idx], eager)
            calls.append((call, idx))
        if not eager:
            return
        self._fast.pop(id(group), None)
        if len(params) == len(group["params"]) and all(call is not None for call, _ in calls):
            self._fast[id(group)] = _FastGroup(self, group, self._static_options(group), calls, factors)

    def _step_tensors(self, prepared: "_Prepared", group, device: torch.device, params: list, eager: bool = False):
        """Steps ``params``; returns the bound eager call when one fused call did all of it, else None."""
        program = prepared.program
        grads = [p.grad for p in params]
        per_param = [self._state_for(program, p, g) for p, g in zip(params, grads)]
        hparams = self._hparams(group, device, program)
        if self._backend_for(device) == "triton" and not program.needs_reference:
            from codegen import launch, ops

            full = [s.name for s in program.states if s.dtype != "q4" and s.layout == "full"]
            # quantized codes and scales follow the elements' row-major order, as do per-row values:
            # the kernel's flat (memory-order) index finds them only in a contiguous tensor
            row_major = program.has_small_layouts or any(s.quantized for s in program.states)
            fused = [launch.eligible(p, g, [st[name] for name in full], row_major)
                     for p, g, st in zip(params, grads, per_param)]
            if prepared.group_wide and not all(fused):
                fused = [False] * len(fused)  # a group-wide reduction must see every tensor in one call
            if any(fused):
                chosen = [i for i, ok in enumerate(fused) if ok]
                args = (prepared.kernel_keys[device], [params[i] for i in chosen], [grads[i] for i in chosen],
                        [per_param[i][n] for n in program.storage_names for i in chosen],
                        [per_param[i]["step"] for i in chosen], [hparams[h] for h in program.hparams])
                if eager and len(chosen) == len(params):
                    call = ops.EagerStep(*args)
                    call.run()
                    return call
                ops.step(*args)
            # tensors the kernel cannot index flatly (e.g. non-dense views, float64) run eagerly
            rest = [i for i, ok in enumerate(fused) if not ok]
            params, grads, per_param = [params[i] for i in rest], [grads[i] for i in rest], [per_param[i] for i in rest]
            if not params:
                return None
        # float64 parameters compute in float64, as torch.optim does; everything else in float32;
        # a group-wide reduction needs every tensor in one call (in float64 if any is float64)
        any_wide = any(p.dtype == torch.float64 for p in params)
        for wide in (False, True):
            idx = [i for i, p in enumerate(params) if (p.dtype == torch.float64) == wide]
            if prepared.group_wide:
                idx = list(range(len(params))) if wide == any_wide else []
            if idx:
                states = {name: [per_param[i][name] for i in idx] for name in program.storage_names}
                views = [self._block_view(params[i]) for i in idx] if program.uses_blocks else None
                reference.step(prepared.reference, [params[i] for i in idx], [grads[i] for i in idx], states,
                               [per_param[i]["step"] for i in idx], hparams,
                               compute_dtype=torch.float64 if wide else torch.float32, views=views)
        return None

    def _block_view(self, p: torch.Tensor) -> tuple[int, int] | None:
        """The (n_blocks, block_numel) view of ``p`` for rules with block layouts; see AdamMini."""
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch.optim's, but traceable by torch.compile (torch's is marked untraceable)."""
        groups.zero_grad(self._groups, set_to_none)

    # ---- checkpoints ----------------------------------------------------------------------------

    def state_dict(self, dense: bool = False) -> dict[str, Any]:
        """torch.optim's layout; hyperparameter tensors are saved as Python floats.

        Quantized states are saved compact (uint8 codes under the state's name, bfloat16 scales under
        "<name>_absmax"; float32 scales load too). ``dense=True`` gives the form torch.optim (and
        every other library) keeps, so ``torch.optim.AdamW.load_state_dict`` takes it: quantized
        and bf16 states decoded to float32 states of the parameter's shape (as they are stored now,
        before a changed ``state_dtype`` converts them at the next step), and no ``master_param``
        (torch.optim keeps none; loading the dense form starts the copy from the parameter). Either
        form loads back into any fusedopt optimizer of the same rule, whatever its ``state_dtype``.
        Each group of the compact form holds ``quant_maps`` (QUANT_MAPS_VERSION): the version of the
        state declarations its codes follow, so codes saved before a state's declared signedness
        changed are read with the map they were made with (SIGNEDNESS_CHANGES).
        Post-hooks registered with ``register_state_dict_post_hook`` see the form returned."""
        return groups.state_dict_with(self, functools.partial(self._finish_state_dict, dense=dense))

    def _finish_state_dict(self, sd: dict[str, Any], dense: bool) -> None:
        if dense:
            params = [p for group in self._groups for p in group["params"]]
            group_of = {p: group for group in self._groups for p in group["params"]}
            for index, values in list(sd["state"].items()):
                p = params[index]
                program = self._prepared(group_of[p], *self._kind_of(group_of[p], p)).program
                unused = [self._unused_spec(n) for n in self.unused_states if n in values and n not in program.state_names]
                sd["state"][index] = _dense_state([*program.states, *unused], values, tuple(p.shape),
                                                  group_of[p][STATE_DTYPE])
        for group in sd["param_groups"]:
            groups.saved_numbers(group, ints=(ir.SR_SEED,))
            holds_codes = any(k.endswith(ir.ABSMAX_SUFFIX) for i in group["params"] for k in sd["state"].get(i, {}))
            if holds_codes:  # the maps its codes follow (the dense form holds none)
                group[QUANT_MAPS] = QUANT_MAPS_VERSION

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a fusedopt or torch.optim checkpoint of the same algorithm; validated before any change.
        Hooks registered with ``register_load_state_dict_pre_hook``/``_post_hook`` run as in torch.optim
        (pre-hooks get a shallow copy of ``state_dict``)."""
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        temporary: list[dict] = []  # the merged groups the checks see, whose ids key cached answers
        try:
            self._load_state(state_dict, temporary)
        finally:  # a later group could reuse one of their ids
            gone = {id(g) for g in temporary}
            self._multi = {k: v for k, v in self._multi.items() if k[0] not in gone}
            for key in gone:
                self._factors.pop(key, None)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _load_state(self, state_dict: Mapping[str, Any], temporary: list[dict]) -> None:
        saved_groups = state_dict.get("param_groups")
        saved_state = state_dict.get("state")
        if not isinstance(saved_groups, list) or not isinstance(saved_state, Mapping):
            raise ValueError("state_dict must have 'state' (a dict) and 'param_groups' (a list), as "
                             "returned by Optimizer.state_dict()")
        if len(saved_groups) != len(self._groups):
            raise ValueError(f"state_dict has {len(saved_groups)} param groups, this optimizer has "
                             f"{len(self._groups)}")
        index: dict[Any, torch.Tensor] = {}
        new_groups = []
        for i, (mine, saved) in enumerate(zip(self._groups, saved_groups)):
            if not isinstance(saved, Mapping) or not isinstance(saved.get("params"), (list, tuple)):
                raise ValueError(f"param group {i} of the state_dict has no 'params' list")
            if len(saved["params"]) != len(mine["params"]):
                raise ValueError(f"param group {i}: state_dict has {len(saved['params'])} params, this "
                                 f"optimizer has {len(mine['params'])}")
            # storage is this optimizer's choice, not the checkpoint's: states are converted to it
            merged = {**{k: v for k, v in mine.items()},
                      **{k: v for k, v in saved.items() if k not in ("params", STATE_DTYPE, QUANT_THRESHOLD,
                                                                         MASTER_WEIGHTS, QUANT_MAPS)}}
            merged["params"] = mine["params"]
            temporary.append(merged)
            seed = merged.get(ir.SR_SEED)
            if isinstance(seed, float) and seed.is_integer():  # saved as a float before it was saved as an int
                merged[ir.SR_SEED] = int(seed)
            self._check_numbers(merged)
            self._complete_group(merged)
            self._check_group(merged)
            maps = saved.get(QUANT_MAPS, 1)
            if isinstance(maps, bool) or maps not in range(1, QUANT_MAPS_VERSION + 1):
                raise ValueError(f"param group {i} of the state_dict has {QUANT_MAPS}={maps!r}; this fusedopt "
                                 f"reads versions 1 to {QUANT_MAPS_VERSION} (a newer one saved it?)")
            new_groups.append((mine, merged))
            for key_id, p in zip(saved["params"], mine["params"]):
                index[key_id] = (p, self._prepared(merged, *self._kind_of(merged, p)).program, saved.get(STATE_DTYPE),
                                 maps)
        new_state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        for key_id, values in saved_state.items():
            if key_id not in index:
                raise ValueError(f"state_dict has state for parameter id {key_id!r}, which no group lists")
            p, program, saved_storage, maps = index[key_id]
            new_state[p] = self._convert_state(program, p, values, saved_storage, maps)
        self._loading = True  # the groups' programs are built once every value is written
        try:
            for mine, merged in new_groups:
                for key, value in merged.items():
                    if key != "params":
                        mine[key] = value
        finally:
            self._loading = False
        self._prepare_groups()
        self.state.clear()
        self.state.update(new_state)
        self._fast.clear()

    def _convert_state(self, program: ir.Program, p: torch.Tensor, values: Mapping[str, Any],
                       saved_storage: Any = None, maps: int = QUANT_MAPS_VERSION) -> dict:
        """One parameter's saved state in this optimizer's storage. A state may come compact (q8
        codes plus "<name>_absmax") or dense (float, as torch.optim keeps it): either is converted
        to what this program stores, so checkpoints move between storages and libraries.
        ``saved_storage`` is the checkpoint group's state_dtype, where it has one; ``maps`` its
        QUANT_MAPS version."""
        if ir.MASTER not in program.state_names:  # master weights are the loading optimizer's choice
            values = {k: v for k, v in values.items() if k != ir.MASTER}
        # without a saved copy (the dense form, a torch.optim checkpoint) the next step starts it from
        # the parameter as it is then: the model's weights may be loaded after the optimizer
        expected = set(program.state_names) - ({ir.MASTER} - set(values))
        absmax = {n + ir.ABSMAX_SUFFIX for n in expected}
        kept = {n for n in self.unused_states if n in values and n not in expected}
        kept |= {n + ir.ABSMAX_SUFFIX for n in kept if n + ir.ABSMAX_SUFFIX in values}  # kept as stored
        unknown = set(values) - expected - absmax - kept - {"step"}
        missing = expected - set(values)
        if unknown or missing:
            raise ValueError(f"state for a parameter of shape {tuple(p.shape)} does not fit rule "
                             f"'{program.name}': missing {sorted(missing)}, unexpected {sorted(unknown)}; "
                             "load a checkpoint of the same algorithm and options")
        view = self._block_view(p) if program.uses_blocks else None
        out = {}
        for spec in program.states:
            if spec.name in values:
                signed = _saved_signed(self.rule, spec, maps)
                out.update(self._convert_one(spec, p, values, view, saved_storage, signed))
        for name in kept:
            out[name] = values[name].detach().to(p.device, copy=True)
        step = values.get("step")
        if step is None:  # torch.optim.SGD keeps no step: a buffer means at least one step was taken
            step = 1.0 if program.states else 0.0
        out["step"] = torch.as_tensor(float(step), dtype=torch.float32).to(p.device).reshape(())
        return out

    def _unused_spec(self, name: str) -> ir.StateSpec:
        """The declaration of a state the group's current options do not use (SGD's momentum buffer
        at momentum 0), from the rule's program for the options that use it."""
        for values in itertools.product((False, True), repeat=len(self.rule.options)):
            program = self.rule.program(**dict(zip(self.rule.options, values)))
            spec = next((s for s in program.states if s.name == name), None)
            if spec is not None:
                return spec
        raise KeyError(f"rule '{self.rule.name}' declares no state '{name}'")

    @staticmethod
    def _convert_one(spec: ir.StateSpec, p: torch.Tensor, values: Mapping[str, Any], view,
                     saved_storage: Any = None, saved_signed: bool | None = None) -> dict:
        """One state, saved compact (codes plus "<name>_absmax") or dense, in ``spec``'s storage.
        Where the codes alone do not tell q8 from q4 (one element), a storage the rule declares decides,
        else the saved group's state_dtype, else ``spec``'s. Codes are read with the signed map where
        ``saved_signed`` (default: ``spec``'s declaration; see SIGNEDNESS_CHANGES)."""
        value = values[spec.name]
        expected = reference.state_shape(spec, p.shape, view)
        saved_absmax = values.get(spec.name + ir.ABSMAX_SUFFIX)
        # a quantized spec of one element is one the rule declares (state_dtype leaves one element alone)
        preferred = saved_storage if saved_storage in ir.QUANTIZED and not spec.quantized else spec.dtype
        saved_format = _saved_format(value, saved_absmax, expected, preferred) if saved_absmax is not None else None
        if not isinstance(value, torch.Tensor) or (saved_format is None and tuple(value.shape) != expected):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"state '{spec.name}' has shape {shape}; for the parameter of shape "
                             f"{tuple(p.shape)} it must be {expected} (or the codes of a q8 or q4 storage "
                             f"with '{spec.name}{ir.ABSMAX_SUFFIX}')")
        value = value.detach().to(p.device)
        signed = not spec.nonnegative
        if saved_format is not None:  # compact
            scale_dtype = quant.format_for(saved_format).scale_dtype
            saved_signed = signed if saved_signed is None else saved_signed
            if saved_format == spec.dtype and saved_absmax.dtype == scale_dtype and saved_signed == signed:
                # the same storage: the codes as they are (re-encoding is not exact)
                return {spec.name: value.to(torch.uint8, copy=True).contiguous(),
                        spec.name + ir.ABSMAX_SUFFIX: saved_absmax.detach().to(p.device, copy=True)}
            # another format or map, or float32 scales (bitsandbytes' and torchao's): decode, re-encode
            value = quant.decode_state(value, saved_absmax.to(p.device), saved_format,
                                       signed=saved_signed, shape=expected)
        elif not value.is_floating_point():
            raise ValueError(f"state '{spec.name}' holds {value.dtype} without '{spec.name}{ir.ABSMAX_SUFFIX}'; "
                             "a quantized state needs its absmax")
        if spec.quantized:
            codes, scale = quant.encode_state(value, spec.dtype, signed=signed)
            return {spec.name: codes.contiguous(), spec.name + ir.ABSMAX_SUFFIX: scale}
        return {spec.name: value.to(dtype=storage_dtype(spec.dtype, p.dtype), copy=True)}

    # ---- copies and pickles (see groups.pickled_state): caches of built programs and recorded
    # launches hold addresses and are rebuilt at the next step

    _DERIVED = ("_prepared_by_options", "_fast", "_multi", "_wide", "_factors", "_groups")

    def __getstate__(self) -> dict[str, Any]:
        return {**groups.pickled_state(self, self._DERIVED), "_quant_maps": QUANT_MAPS_VERSION}

    def __setstate__(self, state: dict[str, Any]) -> None:
        maps = state.pop("_quant_maps", 1)  # pickled before the version was kept: 1
        groups.restore_optimizer(self, state, self._on_change)
        self.__dict__.setdefault("_prepared_by_options", {})
        self._groups = list(self.param_groups)
        self._fast = {}
        self._multi = {}
        self._wide = {}
        self._factors = {}
        self._prepare_groups()  # built now, not inside the first compiled step (building cannot be traced)
        if maps < QUANT_MAPS_VERSION:
            self._recode_states(maps)

    def _recode_states(self, maps: int) -> None:
        """Codes kept under an earlier QUANT_MAPS version ``maps`` (an optimizer pickled then) whose
        state has changed its declared map since: converted as load_state_dict converts them."""
        for group in self.param_groups:
            for p in group["params"]:
                values = self.state.get(p)
                if not values:
                    continue
                program = self._prepared(group, *self._kind_of(group, p)).program
                if any(s.name in values and s.name + ir.ABSMAX_SUFFIX in values
                       and _saved_signed(self.rule, s, maps) != (not s.nonnegative) for s in program.states):
                    self.state[p] = self._convert_state(program, p, values, group[STATE_DTYPE], maps)


def _clips(group: Mapping[str, Any]) -> bool:
    return group.get(CLIP_HPARAM) is not None


def _skips(group: Mapping[str, Any]) -> bool:
    return group[NONFINITE] == "skip"


def _at_least_two(items: Iterable, predicate: Callable[[Any], bool]) -> bool:
    """Whether two of ``items`` satisfy ``predicate`` (stops at the second: runs every step)."""
    matches = filter(predicate, items)
    return next(matches, None) is not None and next(matches, None) is not None


def _rule_key(rule: Rule) -> str:
    """A rule's module-level name (as it pickles): SIGNEDNESS_CHANGES' key, which another rule given
    the same ``@rule`` name does not share."""
    return f"{rule.fn.__module__}.{rule.fn.__qualname__}"


def _saved_signed(rule: Rule, spec: ir.StateSpec, maps: int) -> bool:
    """Whether the codes of ``spec`` (a state of ``rule``) saved under QUANT_MAPS version ``maps``
    were made with the signed map: the map the earliest later version that changed the state records,
    else the state's declaration."""
    for version in sorted(SIGNEDNESS_CHANGES):
        before = SIGNEDNESS_CHANGES[version].get(_rule_key(rule), {})
        if maps < version and spec.name in before:
            return before[spec.name]
    return not spec.nonnegative


def _dense_state(specs: Iterable[ir.StateSpec], values: Mapping[str, Any], shape, storage: str) -> dict[str, Any]:
    """One parameter's saved state in torch.optim's form: every state of ``specs`` that is stored
    with scales (whatever ``storage``, the group's state_dtype, now asks for) decoded to float32, bf16
    and fp16 states widened to float32, and no master copy. One element's codes are read as the
    storage the rule declares for the state, else as ``storage``."""
    out = {k: v for k, v in values.items() if k != ir.MASTER}
    for spec in specs:
        absmax = out.pop(spec.name + ir.ABSMAX_SUFFIX, None)
        if absmax is not None:
            fmt = _saved_format(out[spec.name], absmax, shape, spec.dtype if spec.quantized else storage)
            out[spec.name] = quant.decode_state(out[spec.name], absmax, fmt, signed=not spec.nonnegative, shape=shape)
        elif isinstance(out.get(spec.name), torch.Tensor) and out[spec.name].dtype in (torch.bfloat16, torch.float16):
            out[spec.name] = out[spec.name].to(torch.float32)
    return out


def _stored_as(spec: ir.StateSpec, st: Mapping[str, torch.Tensor], p: torch.Tensor, view) -> bool:
    """Whether ``st`` keeps the state ``spec`` in ``spec``'s storage (dtype, shape, scales)."""
    value, scales = st.get(spec.name), st.get(spec.name + ir.ABSMAX_SUFFIX)
    shape = reference.state_shape(spec, p.shape, view)
    if not spec.quantized:
        return scales is None and value.dtype == storage_dtype(spec.dtype, p.dtype) and tuple(value.shape) == shape
    fmt = quant.format_for(spec.dtype)
    return (scales is not None and value.dtype == torch.uint8 and tuple(value.shape) == quant.codes_shape(shape, fmt)
            and scales.dtype == fmt.scale_dtype and tuple(scales.shape) == (-(-math.prod(shape) // fmt.block),))


def _saved_format(codes: Any, absmax: Any, shape: tuple[int, ...], preferred: str) -> str:
    """Which quantized storage saved ``codes`` and ``absmax`` for a state of ``shape``. Where both
    fit (a one-element state), ``preferred`` (the storage it loads into) decides."""
    n = math.prod(shape)
    fits = [fmt.name for fmt in (quant.Q8, quant.Q4)
            if isinstance(codes, torch.Tensor) and isinstance(absmax, torch.Tensor) and codes.dtype == torch.uint8
            and absmax.dtype in quant.SCALE_DTYPES and tuple(codes.shape) == quant.codes_shape(shape, fmt)
            and tuple(absmax.shape) == (-(-n // fmt.block),)]
    if len(fits) == 1 or preferred in fits:
        return preferred if preferred in fits else fits[0]
    if fits:
        raise ValueError(f"a one-element state saved compact could be q8 or q4 codes; load it into an optimizer "
                         f"with the state_dtype it was saved with (then state_dict(dense=True) converts it)")
    raise ValueError(f"a state of shape {shape} comes with an absmax, so it must hold the uint8 codes and the "
                     f"float32 or bfloat16 scales of a q8 or q4 storage; got {getattr(codes, 'dtype', codes)!r} "
                     f"{tuple(getattr(codes, 'shape', ()))} and {tuple(getattr(absmax, 'shape', ()))} scales")


# LR schedulers wrap `optimizer.step` in a closure over a weakref that dynamo cannot trace; this
# marker tells them the step is already tracked (they only read `_opt_called`, set in __init__).
FusedOptimizer.step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]


def _first_param(obj: Any) -> torch.Tensor | None:
    """The first parameter of an optimizer's first group (None for anything else)."""
    from .window_optimizer import WindowOptimizer

    if isinstance(obj, (FusedOptimizer, WindowOptimizer)) and obj.param_groups[0]["params"]:
        return obj.param_groups[0]["params"][0]
    return None


def _program_of(obj: Any, what: str, options: Mapping[str, bool]) -> ir.Program:
    from .window_optimizer import WindowOptimizer

    if isinstance(obj, WindowOptimizer):
        if options:
            raise TypeError("options come from the optimizer's param group; pass a rule to choose them")
        return obj.program(obj.param_groups[0])
    if isinstance(obj, FusedOptimizer):
        if options:
            raise TypeError("options come from the optimizer's param group; pass a rule to choose them")
        group = obj.param_groups[0]
        first = _first_param(obj)
        if first is not None:  # what that tensor runs: its kind and its storage (quant_threshold)
            return obj._prepared(group, *obj._kind_of(group, first)).program
        return obj._prepared(group, obj._matrix_choices()[-1], group[STATE_DTYPE]).program
    if isinstance(obj, Rule):
        return obj.program(**options)
    if isinstance(obj, ir.Program):
        return obj
    raise TypeError(f"{what} takes a FusedOptimizer, a WindowOptimizer, a Rule or a Program, got {type(obj).__name__}")


def kernel_source(obj: Any, param_dtype: torch.dtype | None = None, grad_dtype: torch.dtype | None = None,
                  target: str = "cuda", **options: bool) -> str:
    """The exact text of the fused kernel module for a rule, a program, or the first parameter of an
    optimizer's first group (its kind, storage and, unless ``param_dtype`` is given, dtype).

    Needs no GPU. ``param_dtype``: float32 (the default for a rule), bfloat16 or float16;
    ``grad_dtype``: the parameter's by default. ``target``: "cuda" (what runs on NVIDIA GPUs) or
    "interpreter" (what runs on CPU tensors under TRITON_INTERPRET=1). ``options`` select a rule's
    static options (e.g. amsgrad=True). A rule with a window has one kernel for all parameter dtypes
    (``param_dtype`` is ignored).
    """
    from codegen import launch, ops

    program = _program_of(obj, "kernel_source", options)
    first = _first_param(obj)
    if param_dtype is None:
        param_dtype = first.dtype if first is not None and first.dtype in launch.KERNEL_DTYPES else torch.float32
    for name, dtype in (("param_dtype", param_dtype), ("grad_dtype", grad_dtype)):
        if dtype is not None and dtype not in launch.KERNEL_DTYPES:
            raise ValueError(f"kernel_source: {name}={dtype!r} has no fused kernel; pass one of "
                             f"{list(launch.KERNEL_DTYPES)} (float64 parameters run on the reference backend)")
    if program.window is not None:  # one kernel for every parameter dtype: it reads them at run time
        from codegen import window_ops, window_template

        return window_ops.source(window_template.WindowKernelSpec(program, target))
    if program.needs_reference:
        raise NotImplementedError(f"rule '{program.name}' ({dict(program.options)}) reduces over blocks without a "
                                  "per-block state (or mixes block and row/column layouts), so it runs on the "
                                  "reference backend: there is no fused kernel to show")
    spec = ops.kernel_spec(program, param_dtype, grad_dtype or param_dtype, target)
    return ops.source(spec)


def phases(obj: Any, **options: bool) -> str:
    """What each kernel of a step computes, for a rule, a program or an optimizer's first group: the
    reductions (and stored per-row values) of every reduction phase, then the updates. Each phase is
    one launch over every tensor of a group."""
    from .passes import lower
    from .window_passes import lower_window

    program = _program_of(obj, "phases", options)
    return lower_window(program).text() if program.window is not None else lower(program).phases()
