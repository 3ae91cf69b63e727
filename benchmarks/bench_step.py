"""One optimizer step over a model-sized parameter list: fusedopt against torch.optim, same process.

    PYTHONPATH=$PWD python3 -m benchmarks.bench_step [--shapes llama1b,gpt2] [--rules adamw,adam,...]
        [--steps 20] [--warmup 3] [--dtype fp32|bf16] [--impls ...] [--grads fixed|fresh]
        [--quick] [--out DIR]

For every parameter list and rule: fusedopt (``backend="triton"``: one fused launch per group and
step; on a CPU ``backend="reference"``, and with ``--quick`` also the Triton interpreter) and torch.optim with
``foreach=True``, ``fused=True`` and a ``torch.compile``d ``opt.step`` (the last two on CUDA by
default). SGD runs with momentum 0.9. torch.optim has no Lion: Lion rows are compared with
torch.optim.AdamW as a bandwidth reference. The table goes to stdout, progress to stderr, and a CSV
and a JSON file to ``--out``. See benchmarks/README.md.

Peer implementations (``peer-bnb``: bitsandbytes, ``peer-torchao``: torchao, ``peer-official``: the
ista-daslab-optimizers MicroAdam) are other packages' optimizers for the same rules, with the
fusedopt row's hyperparameters. They are measured when their package imports (by default on CUDA,
or when named in ``--impls``); a missing package, or a rule the package has no counterpart for, is
one line on stderr and under the table, not a failure.

Gradients: one set of random gradients is generated per parameter list before timing. Before each
step (untimed) ``p.grad`` is assigned again: with ``--grads fixed`` (default) the same tensors, so
every step sees the same addresses; with ``--grads fresh`` a new clone of them, as after
``zero_grad(set_to_none=True)`` and a backward pass (the caching allocator often returns the same
addresses; when it does not, fusedopt rewrites its pointer table before the launch).
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib
import os
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Sequence

import torch

# Without CUDA, Triton kernels run in its interpreter, which must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import fusedopt  # noqa: E402

from . import harness, shapes  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IMPLS = ("fusedopt-triton", "fusedopt-reference", "torch-foreach", "torch-fused", "torch-compiled")


class RuleSpec:
    def __init__(self, fused: type, torch_cls: type | None, baseline: str, named: bool = False, **kwargs: Any):
        self.fused = fused  # the fusedopt class
        self.named = named  # takes named parameters and the model's width and heads (Adam-mini)
        self.torch_cls = torch_cls  # the torch.optim class, None if torch has no such rule
        self.baseline = baseline  # the rule whose torch rows this rule's ratios are taken against
        self.kwargs = kwargs  # hyperparameters, shared by both sides


RULES = {
    "adamw": RuleSpec(fusedopt.AdamW, torch.optim.AdamW, "adamw", lr=1e-3, weight_decay=1e-2),
    "adam": RuleSpec(fusedopt.Adam, torch.optim.Adam, "adam", lr=1e-3),
    "sgd": RuleSpec(fusedopt.SGD, torch.optim.SGD, "sgd", lr=1e-3, momentum=0.9),
    "lion": RuleSpec(fusedopt.Lion, None, "adamw", lr=1e-4, weight_decay=1e-1),
    "lamb": RuleSpec(fusedopt.LAMB, None, "adamw", lr=1e-3),  # two reduction phases + global clipping
    "adafactor": RuleSpec(fusedopt.Adafactor, torch.optim.Adafactor, "adafactor", lr=1e-2),
    # MicroAdam: sparse window and 4-bit error feedback (about 0.9 B/param); run with --dtype bf16 as the paper
    "microadam": RuleSpec(fusedopt.MicroAdam, None, "adamw", lr=1e-4),
    # the same writing bf16 (or fp16) parameters with stochastic rounding (the kernel's hash per element)
    "microadam-sr": RuleSpec(fusedopt.MicroAdam, None, "adamw", lr=1e-4, stochastic_rounding=True),
    "adam-mini": RuleSpec(fusedopt.AdamMini, None, "adamw", named=True, lr=1e-3, weight_decay=1e-2),
    # 8-bit and bf16 moments: torch has neither, so ratios are against its float32 AdamW
    "adamw8bit": RuleSpec(fusedopt.AdamW8bit, None, "adamw", lr=1e-3, weight_decay=1e-2),
    "adamw4bit": RuleSpec(fusedopt.AdamW4bit, None, "adamw", lr=1e-3, weight_decay=1e-2),
    "adamw-bf16state": RuleSpec(fusedopt.AdamW, None, "adamw", lr=1e-3, weight_decay=1e-2, state_dtype="bf16"),
    "adamw-bf16state-sr": RuleSpec(fusedopt.AdamW, None, "adamw", lr=1e-3, weight_decay=1e-2, state_dtype="bf16",
                                   stochastic_rounding=True),
}
# torch.optim classes without a fused=True implementation: no torch-fused row for them
NO_TORCH_FUSED = {"adafactor"}


# ---- peers: other packages' optimizers, measured when they import -------------------------------

_ADAM_KEYS = ("lr", "betas", "eps", "weight_decay")


def _take(hp: dict[str, Any], *names: str, **renamed: str) -> dict[str, Any]:
    """The fusedopt hyperparameters ``names`` as they are, and ``renamed`` (peer name = fusedopt name)."""
    return {**{n: hp[n] for n in names}, **{peer: hp[ours] for peer, ours in renamed.items()}}


class Peer:
    """An optimizer package other than torch and fusedopt, with its classes for some of the rules.

    ``classes`` maps a rule to the class name and a function from the fusedopt row's
    hyperparameters (its optimizer's ``defaults``) to the peer's keyword arguments, so that both rows
    run the same update with the same settings.
    """

    def __init__(self, package: str, modules: tuple[str, ...],
                 classes: dict[str, tuple[str, Callable[[dict[str, Any]], dict[str, Any]]]],
                 writes_grad: bool = False, compiles: bool = False, ring_states: tuple[str, ...] = ()):
        self.package = package  # the distribution's name, for the notes
        self.modules = modules  # where the classes live, tried in order (older layouts last)
        self.classes = classes
        self.writes_grad = writes_grad  # its step overwrites p.grad: it gets a fresh clone every step
        self.compiles = compiles  # its step runs torch.compile'd code: Dynamo is reset after its row
        self.ring_states = ring_states  # states of m rows (the "m" hyperparameter), one written per step


PEERS = {
    # 32-bit states for the float rules; 8-bit blockwise states (blocks of 256) for AdamW8bit, with
    # float32 ones for tensors under min_8bit_size elements, as fusedopt's quant_threshold.
    "peer-bnb": Peer("bitsandbytes", ("bitsandbytes.optim",), {
        "adamw": ("AdamW", lambda hp: _take(hp, *_ADAM_KEYS)),
        "adam": ("Adam", lambda hp: _take(hp, *_ADAM_KEYS)),
        "sgd": ("SGD", lambda hp: _take(hp, "lr", "momentum", "dampening", "weight_decay", "nesterov")),
        "lion": ("Lion", lambda hp: _take(hp, "lr", "betas", "weight_decay")),
        "adamw8bit": ("AdamW8bit", lambda hp: _take(hp, *_ADAM_KEYS, min_8bit_size="quant_threshold")),
    }),
    # blocks of 256 (8-bit) and 128 (4-bit), as fusedopt's q8 and q4; tensors under 4096 elements keep
    # float32 states there too. Its step compiles each parameter's update with torch.compile.
    "peer-torchao": Peer("torchao", ("torchao.optim", "torchao.prototype.low_bit_optim"), {
        "adamw8bit": ("AdamW8bit", lambda hp: {**_take(hp, *_ADAM_KEYS), "block_size": 256}),
        "adamw4bit": ("AdamW4bit", lambda hp: {**_take(hp, *_ADAM_KEYS), "block_size": 128}),
    }, compiles=True),
    # the authors' CUDA implementation; it writes the update into p.grad; its window is the states
    # I (indices) and V (values), m rows each, of which a step writes one (as fusedopt's window)
    "peer-official": Peer("ista-daslab-optimizers", ("ista_daslab_optimizers",), {
        "microadam": ("MicroAdam", lambda hp: _take(hp, *_ADAM_KEYS, "m", k_init="density",
                                                    quant_block_size="quant_block")),
    }, writes_grad=True, ring_states=("I", "V")),
}
ALL_IMPLS = IMPLS + tuple(PEERS)


def load_peer(impl: str) -> tuple[ModuleType | None, str]:
    """The first of the peer's modules that imports, or None and why none did."""
    errors = []
    for name in PEERS[impl].modules:
        try:
            return importlib.import_module(name), ""
        except Exception as exc:  # an installed package may fail to import (no CUDA, a broken build)
            errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    return None, errors[0]


@functools.lru_cache(maxsize=None)
def _fused_defaults(rule: str) -> tuple[tuple[str, Any], ...]:
    spec = RULES[rule]
    if spec.named:
        raise ValueError(f"no peer takes named parameters ({rule})")
    return tuple(spec.fused([torch.nn.Parameter(torch.zeros(1))], backend="reference", **spec.kwargs)
                 .defaults.items())


def fused_hyperparameters(rule: str) -> dict[str, Any]:
    """The hyperparameters of the rule's fusedopt row, defaults included: the ``defaults`` of a
    fusedopt optimizer built with the row's arguments over one CPU element (built once per rule)."""
    return dict(_fused_defaults(rule))


DEFAULT_OUT = Path(__file__).resolve().parent / "out"


def _usage_error(message: str) -> None:
    """One line on stderr, exit status 2 (as argparse's own usage errors)."""
    print(f"bench_step: {message}", file=sys.stderr)
    raise SystemExit(2)


def _choices(value: str, valid: Sequence[str], flag: str, many: bool = True) -> list[str]:
    """Split a comma-separated option; exit with one line naming the valid values on a bad one."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in valid]
    if bad or not items or (not many and len(items) != 1):
        what = (f"unknown {flag} value {', '.join(repr(b) for b in bad)}" if bad
                else f"{flag} needs {'one or more values' if many else 'exactly one value'}, got {value!r}")
        _usage_error(f"{what}; valid values: {', '.join(valid)}" + (" (comma-separated)" if many else ""))
    return items


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_step",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", help=f"comma-separated parameter lists from {', '.join(shapes.SHAPES)} "
                        "(default llama1b,gpt2; tiny with --quick)")
    parser.add_argument("--rules", default=",".join(RULES),
                        help=f"comma-separated rules from {', '.join(RULES)} (default: all)")
    parser.add_argument("--impls", help=f"comma-separated implementations from {', '.join(ALL_IMPLS)} "
                        "(default: fusedopt-triton, every torch one and every peer whose package imports on "
                        "CUDA; fusedopt-reference, fusedopt-triton (interpreter, --quick only) and "
                        "torch-foreach on a CPU)")
    parser.add_argument("--steps", type=int, help="timed steps (default 20; 3 with --quick)")
    parser.add_argument("--warmup", type=int,
                        help="untimed steps after the first one (default 3; 0 with --quick)")
    parser.add_argument("--dtype", default="fp32", help=f"parameter and gradient dtype: {', '.join(DTYPES)}")
    parser.add_argument("--grads", default="fixed", help="fixed: the same gradient tensors every step; "
                        "fresh: a new clone before every step (untimed)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="divide every dimension of the parameter lists by this (for small machines)")
    parser.add_argument("--copy-mib", type=float, help="buffer size of the copy bandwidth measurement "
                        "(default 1024 on CUDA, 32 on a CPU, 8 with --quick)")
    parser.add_argument("--cpu-threads", type=int, help="torch intra-op threads when running on a CPU "
                        "(default 1 with --quick, which keeps a smoke run steady on a busy machine; "
                        "else torch's)")
    parser.add_argument("--quick", action="store_true",
                        help="a seconds-long smoke run: tiny parameter list, few steps, small copy buffer")
    parser.add_argument("--out", default=str(DEFAULT_OUT),
                        help="folder for the CSV and JSON (default %(default)s)")
    args = parser.parse_args(argv)

    default_shapes = "tiny" if args.quick else "llama1b,gpt2"
    args.shape_names = _choices(args.shapes or default_shapes, list(shapes.SHAPES), "--shapes")
    args.rule_names = _choices(args.rules, list(RULES), "--rules")
    args.dtype_name = _choices(args.dtype, list(DTYPES), "--dtype", many=False)[0]
    args.grads = _choices(args.grads, ["fixed", "fresh"], "--grads", many=False)[0]
    args.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.impls:
        args.impl_names = _choices(args.impls, ALL_IMPLS, "--impls")
    elif args.device.type == "cuda":
        args.impl_names = ["fusedopt-triton", "torch-foreach", "torch-fused", "torch-compiled"]
        args.impl_names += [impl for impl in PEERS if load_peer(impl)[0] is not None]
    else:
        # the interpreter runs each program in Python: seconds per step already at gpt2 size
        args.impl_names = (["fusedopt-reference", "fusedopt-triton", "torch-foreach"] if args.quick
                           else ["fusedopt-reference", "torch-foreach"])
    if args.steps is None:
        args.steps = 3 if args.quick else 20
    if args.warmup is None:
        args.warmup = 0 if args.quick else 3
    if args.steps < 1 or args.warmup < 0:
        _usage_error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    if not args.scale >= 1.0:
        _usage_error(f"--scale divides dimensions and must be >= 1, got {args.scale}")
    if args.copy_mib is None:
        args.copy_mib = 8.0 if args.quick else (1024.0 if args.device.type == "cuda" else 32.0)
    return args


def _make_optimizer(rule: str, impl: str, named: list[tuple[str, torch.nn.Parameter]],
                    model: dict[str, int]) -> torch.optim.Optimizer:
    spec = RULES[rule]
    params = [p for _, p in named]
    if impl.startswith("fusedopt-") and spec.named:
        return spec.fused(named, backend=impl.removeprefix("fusedopt-"), **model, **spec.kwargs)
    if impl.startswith("fusedopt-"):
        return spec.fused(params, backend=impl.removeprefix("fusedopt-"), **spec.kwargs)
    if impl in PEERS:
        module, why = load_peer(impl)
        if module is None:
            raise ImportError(f"{PEERS[impl].package}: {why}")
        class_name, peer_kwargs = PEERS[impl].classes[rule]
        return getattr(module, class_name)(params, **peer_kwargs(fused_hyperparameters(rule)))
    if spec.torch_cls is None:
        raise ValueError(f"torch.optim has no {rule}")
    flags = {"torch-foreach": dict(foreach=True), "torch-fused": dict(fused=True),
             "torch-compiled": dict(foreach=True)}[impl]
    return spec.torch_cls(params, **spec.kwargs, **flags)


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(rule: str, impl: str, named: list[tuple[str, torch.nn.Parameter]], grads: list[torch.Tensor],
            args: argparse.Namespace, model: dict[str, int]) -> dict[str, Any]:
    """One row: a fresh optimizer over the named parameters, timed; its state is dropped afterwards.
    ``model``: the list's width and heads, for rules that partition by head."""
    params = [p for _, p in named]
    peer = PEERS.get(impl)
    fresh_grads = args.grads == "fresh" or (peer is not None and peer.writes_grad)
    if peer is not None:
        fused_hyperparameters(rule)  # built here, outside the construction time of the peer's optimizer
    t0 = time.perf_counter()
    opt = _make_optimizer(rule, impl, named, model)
    init_s = time.perf_counter() - t0  # fusedopt lowers its rule and registers the kernel here
    step: Callable[[], Any] = opt.step
    if impl == "torch-compiled":
        @torch.compile(fullgraph=False)
        def compiled_step() -> None:
            opt.step()

        step = compiled_step

    if fresh_grads:
        def before_step() -> None:
            for p, g in zip(params, grads):
                p.grad = g.clone()
    else:
        def before_step() -> None:
            for p, g in zip(params, grads):
                p.grad = g

    launch_counter = None
    if impl == "fusedopt-triton":
        from codegen import launch  # imports triton: after TRITON_INTERPRET is settled

        launch_counter = launch.launches
    launches_before = sum(launch_counter.values()) if launch_counter is not None else 0
    timing = harness.time_steps(step, before_step, args.device, args.steps, args.warmup)
    launches = (sum(launch_counter.values()) - launches_before) if launch_counter is not None else None
    rows = int(fused_hyperparameters(rule).get("m", 0)) if peer is not None and peer.ring_states else 0
    traffic = harness.bytes_per_step(opt, {name: rows for name in peer.ring_states} if rows else None)

    for p in params:
        p.grad = None
    if _compiles(impl):
        torch._dynamo.reset()  # compiled graphs may hold the optimizer's state

    spec = RULES[rule]
    return {
        "rule": rule,
        "impl": impl,
        "baseline": spec.baseline,
        "steps": args.steps,
        "ms_median": timing.median_ms,
        "ms_p20": timing.p20_ms,
        "ms_p80": timing.p80_ms,
        "host_ms_median": timing.host_median_ms,
        "first_step_s": timing.first_s,
        "init_s": init_s,
        "bytes_per_step": traffic.bytes_per_step,
        "state_bytes_per_param": traffic.state_bytes_per_param,
        "launches_per_step": None if launches is None else launches / (1 + args.warmup + args.steps),
        "grads": "fresh" if fresh_grads else "fixed",
    }


def _compiles(impl: str) -> bool:
    return impl == "torch-compiled" or (impl in PEERS and PEERS[impl].compiles)


def _peer_rules(impl: str, rules: Sequence[str]) -> tuple[list[str], str | None]:
    """The rules among ``rules`` that peer ``impl`` can run here, and a one-line note on what it
    cannot (its package does not import, or has no class for a rule), None if nothing is left out."""
    peer = PEERS[impl]
    module, why = load_peer(impl)
    if module is None:
        return [], f"{impl}: {peer.package} is not importable ({why}); no {impl} rows"
    runnable = [r for r in rules if r in peer.classes and hasattr(module, peer.classes[r][0])]
    missing = [r for r in rules if r not in runnable]
    if not missing:
        return runnable, None
    absent = [f"{r} ({peer.classes[r][0]} is not in {module.__name__})" if r in peer.classes else r
              for r in missing]
    return runnable, f"{impl}: {peer.package} has no counterpart for {', '.join(absent)}; no rows for them"


def _plan(args: argparse.Namespace) -> tuple[list[tuple[str, str]], list[str]]:
    """(rule, impl) pairs to measure per parameter list, torch baselines included once each; and a
    note for every requested peer that leaves rules out."""
    notes: list[str] = []
    peer_rules: dict[str, list[str]] = {}
    for impl in args.impl_names:
        if impl in PEERS:
            peer_rules[impl], note = _peer_rules(impl, args.rule_names)
            if note:
                notes.append(note)
    plan: list[tuple[str, str]] = []
    for rule in args.rule_names:
        spec = RULES[rule]
        torch_rule = rule if spec.torch_cls is not None else spec.baseline
        for impl in args.impl_names:
            if impl in PEERS and rule not in peer_rules[impl]:
                continue
            pair = (rule, impl) if impl.startswith(("fusedopt-", "peer-")) else (torch_rule, impl)
            if impl == "torch-fused" and pair[0] in NO_TORCH_FUSED:
                continue
            if pair not in plan:
                plan.append(pair)
    return plan, notes


def run(args: argparse.Namespace, on_row: Callable[[list[dict[str, Any]], dict[str, Any]], None] | None = None
        ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    device, dtype = args.device, DTYPES[args.dtype_name]
    meta = harness.environment(device)
    harness.progress(f"bench_step: {meta['device']}, torch {meta['torch']}, triton {meta['triton']}")
    copy = harness.copy_bandwidth(device, int(args.copy_mib * 2**20))
    harness.progress(f"copy bandwidth: {copy.gbps:.1f} GB/s ({copy.nbytes / 2**20:.0f} MiB buffer)")
    meta.update(copy_gbps=copy.gbps, copy_mib=copy.nbytes / 2**20, steps=args.steps, warmup=args.warmup,
                grads=args.grads, dtype=args.dtype_name, scale=args.scale,
                cpu_threads=torch.get_num_threads() if device.type == "cpu" else None,
                method="median of timed steps, device sync before and after each; first step timed alone",
                failures=[], skipped=[])
    plan, meta["skipped"] = _plan(args)
    for note in meta["skipped"]:
        harness.progress(f"skipped: {note}")
    rows: list[dict[str, Any]] = []
    total = len(plan) * len(args.shape_names)
    done = 0
    for shape_name in args.shape_names:
        n_params, n_tensors = shapes.count(shape_name, args.scale)
        harness.progress(f"{shape_name}: {n_tensors} tensors, {n_params:,} parameters ({args.dtype_name}), "
                         f"materializing on {device}")
        named = shapes.materialize(shape_name, device, dtype, args.scale)
        params = [p for _, p in named]
        gen = torch.Generator(device=device).manual_seed(1)
        grads = [torch.randn(p.shape, device=device, dtype=torch.float32, generator=gen).mul_(1e-2).to(dtype)
                 for p in params]
        for rule, impl in plan:
            done += 1
            harness.progress(f"[{done}/{total}] {shape_name} {rule} {impl} ...")
            try:
                row = measure(rule, impl, named, grads, args, shapes.architecture(shape_name, args.scale))
            except Exception as exc:  # one failing implementation must not cost the rest of a long run
                message = f"{shape_name} {args.dtype_name} {rule} {impl}: {type(exc).__name__}: {exc}"
                meta["failures"].append(message.splitlines()[0])
                harness.progress(f"    FAILED {message}")
                for p in params:
                    p.grad = None
                if _compiles(impl):
                    torch._dynamo.reset()
                row = None
            _release(device)  # after measure() returned: its optimizer and state are unreachable now
            if row is None:
                continue
            row.update(shapes=shape_name, n_params=n_params, n_tensors=n_tensors, dtype=args.dtype_name)
            row["gbps"] = row["bytes_per_step"] / (row["ms_median"] * 1e-3) / 1e9
            row["copy_limit_ms"] = row["bytes_per_step"] / (copy.gbps * 1e9) * 1e3
            row["pct_copy_bw"] = 100.0 * row["gbps"] / copy.gbps
            row.update({k: meta[k] for k in ("date", "device", "torch", "triton")}, copy_gbps=copy.gbps)
            rows.append(row)
            harness.progress(f"    median {row['ms_median']:.3f} ms, first step {row['first_step_s']:.2f} s, "
                             f"{harness.num(row['pct_copy_bw'])} % of copy bandwidth")
            if on_row is not None:  # a run cut short (a time limit) keeps the rows measured so far
                on_row(rows, meta)
        del named, params, grads
        _release(device)
    harness.add_ratios(rows)
    return rows, meta


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.device.type == "cpu" and (args.cpu_threads or args.quick):
        torch.set_num_threads(args.cpu_threads or 1)
    stem = harness.result_stem(args.out)
    try:
        rows, meta = run(args, on_row=lambda rows, meta: harness.write_results(rows, meta, args.out, stem=stem))
    finally:
        torch.set_num_threads(threads)
    print(harness.format_table(rows, meta))
    csv_path, json_path = harness.write_results(rows, meta, args.out, stem=stem)
    harness.progress(f"wrote {csv_path} and {json_path}")
    return {"rows": rows, "meta": meta, "csv": csv_path, "json": json_path}


if __name__ == "__main__":
    sys.exit(1 if main()["meta"]["failures"] else 0)
