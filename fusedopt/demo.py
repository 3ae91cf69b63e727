"""``python -m fusedopt.demo`` (``make demo``): one small language model trained with every rule.

The same Llama-style byte-level model, from the same seed on the same data (Python's own standard
library source), is trained once per built-in rule with the training step under ``torch.compile``,
on CUDA (fused Triton kernels) when there is a GPU and on the CPU (the reference backend) otherwise.
At the end a table compares the rules (final losses, tokens/s, optimizer state bytes, peak memory)
and a PNG with the loss curves and the state memory per rule is written to ``--out``.

How the step is compiled, best first; the first that works is used and the table says which:

- ``step``: forward, backward, ``opt.step()`` and ``opt.zero_grad()`` in one
  ``torch.compile(fullgraph=True)`` graph (needs ``torch._dynamo.config.trace_autograd_ops``);
- ``fwd+bwd,opt``: the loss (forward, with its compiled backward) and ``opt.step()`` compiled
  separately;
- ``fwd+bwd``: the loss compiled, ``opt.step()`` eager;
- ``eager``: nothing compiled (``--no-compile``, or torch.compile does not work here).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import torch

from .data import DEFAULT_BUDGET, VOCAB_SIZE, Corpus
from .demo_rules import DemoRule, demo_rules
from .models import LlamaConfig, LlamaForCausalLM
from .monitor import format_bytes, max_rss_bytes, state_bytes

SEED = 0
DEVICES = ("auto", "cpu", "cuda")
QUICK_RULES = ("adamw", "sgd")
FIGSIZE = (13.0, 5.0)  # inches, at DPI: the PNG is 1300 x 500 pixels
DPI = 100


@dataclass(frozen=True)
class Plan:
    """What one run trains: model size, batch shape, steps, evaluation."""

    model: LlamaConfig
    batch_size: int
    seq_len: int
    steps: int
    eval_every: int
    eval_batches: int
    corpus_bytes: int = DEFAULT_BUDGET

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


def _llama(hidden: int, layers: int, intermediate: int, seq: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=hidden, num_layers=layers, num_heads=4,
                       num_kv_heads=2, intermediate_size=intermediate, max_seq_len=seq)


PLANS = {
    # about a minute per rule on two CPU cores, compilation included
    "cpu": Plan(_llama(160, 2, 432, 128), batch_size=16, seq_len=128, steps=150, eval_every=25,
                eval_batches=4),
    "cuda": Plan(_llama(256, 4, 688, 256), batch_size=32, seq_len=256, steps=300, eval_every=50,
                 eval_batches=8),
    # CI-sized: well under a minute on a CPU once torch.compile's cache is warm
    "quick": Plan(_llama(64, 1, 172, 64), batch_size=8, seq_len=64, steps=20, eval_every=10, eval_batches=2,
                  corpus_bytes=256 * 1024),
}


def lr_factor(step: int, steps: int) -> float:
    """Linear warmup over the first 10 % of steps, then cosine decay to 10 % of the peak."""
    warmup = max(1, steps // 10)
    if step <= warmup:
        return step / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---- the training step ------------------------------------------------------------------------


class TrainStep:
    """``step(x, y) -> loss`` (a detached device tensor), compiled as far as this platform allows.

    The first step runs eagerly: it creates the optimizer's state, which a compiled step would
    otherwise see appear and be traced again for.

    The first compiled form that fails (at its first call, where torch.compile traces) is dropped
    for the next one with a one-line note on stderr; see the module docstring for the order.
    """

    def __init__(self, model: LlamaForCausalLM, opt: torch.optim.Optimizer, compile: bool):
        self.model, self.opt = model, opt
        whole = compile and hasattr(torch._dynamo.config, "trace_autograd_ops")
        self.whole = torch.compile(self._eager, fullgraph=True) if whole else None
        self.loss = torch.compile(model.loss, fullgraph=True) if compile else model.loss
        self.opt_step = torch.compile(opt.step, fullgraph=True) if compile else opt.step
        self.compiled_loss = self.compiled_opt = compile
        self.calls = 0

    @property
    def mode(self) -> str:
        if self.whole is not None:
            return "step"
        if self.compiled_loss:
            return "fwd+bwd,opt" if self.compiled_opt else "fwd+bwd"
        return "eager"

    def _eager(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = self.model.loss(x, y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()
        return loss.detach()

    def _give_up(self, what: str, exc: Exception, instead: str) -> None:
        first = (str(exc).strip().splitlines() or [""])[0][:120]
        print(f"\nnote: torch.compile of {what} failed ({type(exc).__name__}: {first}); {instead}",
              file=sys.stderr, flush=True)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 1:  # the first step creates the optimizer's state: eager, so that the
            return self._eager(x, y)  # compiled step is traced once, with the state in place
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"torch\._dynamo")  # notes while tracing
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.")
            return self._call(x, y)

    def _call(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.whole is not None:
            try:
                with torch._dynamo.config.patch(trace_autograd_ops=True):
                    return self.whole(x, y)
            except Exception as exc:  # noqa: BLE001 - any compile failure falls back
                self._give_up("the whole step", exc, "compiling the loss and opt.step() separately")
                self.whole = None
                self.opt.zero_grad()
        try:
            loss = self.loss(x, y)
        except Exception as exc:
            if not self.compiled_loss:
                raise
            self._give_up("the loss", exc, "running eagerly")
            self.loss, self.compiled_loss = self.model.loss, False
            self.opt_step, self.compiled_opt = self.opt.step, False
            loss = self.loss(x, y)
        loss.backward()
        try:
            self.opt_step()
        except Exception as exc:
            if not self.compiled_opt:
                raise
            self._give_up("opt.step()", exc, "running it eagerly")
            self.opt_step, self.compiled_opt = self.opt.step, False
            self.opt_step()
        self.opt.zero_grad()
        return loss.detach()


# ---- one run ------------------------------------------------------------------------------------


@dataclass
class RunResult:
    rule: str
    settings: str
    compiled: str = ""
    train_curve: list[float] = field(default_factory=list)  # loss at every step
    val_steps: list[int] = field(default_factory=list)
    val_curve: list[float] = field(default_factory=list)
    train_loss: float = math.nan  # final, on fixed training batches
    val_loss: float = math.nan
    tokens_per_s: float = math.nan
    state_bytes: int = 0
    state_breakdown: dict[str, int] = field(default_factory=dict)
    bytes_per_param: float = math.nan
    peak_bytes: int | None = None
    compile_seconds: float = 0.0  # the first compiled step (tracing and code generation)
    seconds: float = 0.0
    error: str | None = None


class Progress:
    """A plain-text progress bar, redrawn in place with \\r on a terminal; one line otherwise."""

    def __init__(self, label: str, total: int, stream=None):
        self.label, self.total = label, total
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.start = time.perf_counter()

    def _line(self, step: int, info: str) -> str:
        width = 24
        done = int(width * step / self.total)
        elapsed = time.perf_counter() - self.start
        bar = "#" * done + "." * (width - done)
        return f"{self.label:<8} [{bar}] {step:>4}/{self.total}  {info}  {elapsed:5.0f}s"

    def update(self, step: int, info: str) -> None:
        if self.tty:
            self.stream.write("\r" + self._line(step, info) + "\033[K")
            self.stream.flush()

    def close(self, step: int, info: str) -> None:
        line = self._line(step, info)
        self.stream.write(f"\r{line}\033[K\n" if self.tty else f"{line}\n")
        self.stream.flush()


@torch.no_grad()
def evaluate(model: LlamaForCausalLM, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Mean loss over ``batches`` (a device tensor: no host synchronisation)."""
    return torch.stack([model.loss(x, y) for x, y in batches]).mean()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Clock:
    """Wall time of the timed training steps only (evaluation is left out); syncs at start and stop."""

    def __init__(self, device: torch.device):
        self.device, self.seconds, self.steps, self._t0 = device, 0.0, 0, None

    def start(self) -> None:
        _sync(self.device)
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self._t0 is not None:
            _sync(self.device)
            self.seconds += time.perf_counter() - self._t0
            self._t0 = None

    def tokens_per_s(self, tokens_per_step: int) -> float:
        """Over the stopped stretches, plus the running one (unsynchronised: an estimate) if any."""
        seconds = self.seconds + (time.perf_counter() - self._t0 if self._t0 is not None else 0.0)
        return self.steps * tokens_per_step / seconds if seconds > 0 else math.nan


def _fixed_batches(corpus: Corpus, split: str, plan: Plan, seed: int, device: torch.device) -> list:
    stream = corpus.batches(split, plan.batch_size, plan.seq_len, seed)
    return [tuple(t.to(device) for t in next(stream)) for _ in range(plan.eval_batches)]


def train(rule: DemoRule, plan: Plan, corpus: Corpus, device: torch.device, compile: bool = True,
          log_every: int = 5) -> RunResult:
    """Train a fresh model (seed ``SEED``) with ``rule`` for ``plan.steps`` steps."""
    result = RunResult(rule.name, rule.settings)
    started = time.perf_counter()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(plan.model).to(device)
    opt = rule.build(model)
    base_lrs = [float(g["lr"]) for g in opt.param_groups]
    step_fn = TrainStep(model, opt, compile)
    batches = corpus.batches("train", plan.batch_size, plan.seq_len, seed=SEED + 1)
    val_set = _fixed_batches(corpus, "val", plan, SEED + 2, device)
    losses: list[torch.Tensor] = []
    vals = [evaluate(model, val_set)]
    result.val_steps.append(0)
    skip = min(5, max(2, plan.steps // 2))  # the eager first step, compile, any recompile: untimed
    clock = _Clock(device)
    progress = Progress(rule.name, plan.steps)
    for step in range(1, plan.steps + 1):
        for group, base in zip(opt.param_groups, base_lrs):
            group["lr"] = base * lr_factor(step, plan.steps)
        x, y = (t.to(device, non_blocking=True) for t in next(batches))
        if step == 2 or step == skip + 1:
            clock.stop()
            clock.start()
        losses.append(step_fn(x, y))
        if step == 2:  # the first compiled step: timed apart
            clock.stop()
            result.compile_seconds, clock.seconds = clock.seconds, 0.0
        clock.steps += step > skip
        if step % plan.eval_every == 0 or step == plan.steps:
            clock.stop()
            vals.append(evaluate(model, val_set))
            result.val_steps.append(step)
            if step > skip and step < plan.steps:
                clock.start()
        if progress.tty and (step % log_every == 0 or step == 1):
            rate = clock.tokens_per_s(plan.tokens_per_step)
            progress.update(step, f"loss {losses[-1].item():6.3f}  val {vals[-1].item():6.3f}  "
                                  + ("compiling the step..." if step == 1 and step_fn.mode != "eager" else
                                     f"{rate:9,.0f} tok/s" if not math.isnan(rate) else "        - tok/s"))
    clock.stop()
    _finish(result, model, opt, step_fn, losses, vals, clock.tokens_per_s(plan.tokens_per_step),
            _fixed_batches(corpus, "train", plan, SEED + 3, device), device)
    result.seconds = time.perf_counter() - started
    how = result.compiled if result.compiled == "eager" else \
        f"{result.compiled}, first compiled step {result.compile_seconds:.0f}s"
    progress.close(plan.steps, f"loss {result.train_curve[-1]:6.3f}  val {result.val_loss:6.3f}  "
                               f"{result.tokens_per_s:9,.0f} tok/s  [{how}]")
    return result


def _finish(result: RunResult, model, opt, step_fn: TrainStep, losses, vals, tokens_per_s: float,
            train_set, device: torch.device) -> None:
    """Fill in the figures of a finished run (the one place that reads losses back to the host)."""
    result.compiled = step_fn.mode
    result.train_curve = torch.stack(losses).float().cpu().tolist()
    result.val_curve = torch.stack(vals).float().cpu().tolist()
    result.val_loss = result.val_curve[-1]
    result.train_loss = evaluate(model, train_set).item()
    result.tokens_per_s = tokens_per_s
    breakdown = state_bytes(opt)
    result.state_breakdown = {f"{k}:{d}": b for (k, d), b in breakdown.items()}
    result.state_bytes = sum(breakdown.values())
    result.bytes_per_param = result.state_bytes / model.num_parameters()
    result.peak_bytes = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else max_rss_bytes()


# ---- output -------------------------------------------------------------------------------------


def peak_label(device: torch.device) -> str:
    return "peak CUDA mem" if device.type == "cuda" else "max RSS (process)"


def table(results: Sequence[RunResult], device: torch.device) -> str:
    """The comparison table, one row per rule."""
    head = ["rule", "compiled", "train loss", "val loss", "tokens/s", "state", "B/param", peak_label(device),
            "settings"]
    rows = []
    for r in results:
        if r.error is not None:
            rows.append([r.rule, "failed", "", "", "", "", "", "", r.error[:100]])
            continue
        rows.append([r.rule, r.compiled, f"{r.train_loss:.3f}", f"{r.val_loss:.3f}", f"{r.tokens_per_s:,.0f}",
                     format_bytes(r.state_bytes), f"{r.bytes_per_param:.2f}",
                     format_bytes(r.peak_bytes) if r.peak_bytes is not None else "n/a",
                     r.settings])
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    right = {2, 3, 4, 5, 6, 7}

    def fmt(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))

    lines = [fmt(head), "  ".join("-" * w for w in widths)] + [fmt(row) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def _smooth(values: Sequence[float], window: int = 10) -> list[float]:
    """Trailing mean over up to ``window`` values."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot(results: Sequence[RunResult], path: str, title: str) -> str:
    """Two panels: training (smoothed) and validation loss per rule; state bytes/param per rule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.error is None]
    colors = plt.get_cmap("tab10").colors
    fig, (ax_loss, ax_mem) = plt.subplots(1, 2, figsize=FIGSIZE, dpi=DPI,
                                          gridspec_kw={"width_ratios": [3, 2]})
    for i, r in enumerate(ok):
        c = colors[i % len(colors)]
        steps = range(1, len(r.train_curve) + 1)
        ax_loss.plot(steps, r.train_curve, color=c, alpha=0.15, linewidth=0.8)
        ax_loss.plot(steps, _smooth(r.train_curve), color=c, linewidth=1.5,
                     label=f"{r.rule}: validation {r.val_loss:.3f}")
        ax_loss.plot(r.val_steps, r.val_curve, color=c, linestyle="--", marker="o", markersize=4)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("cross-entropy (nats per byte)")
    ax_loss.set_title("loss (solid: training, mean of 10 steps; dashed: validation)", fontsize=10)
    if ok:
        finals = [v for r in ok for v in r.val_curve + r.train_curve[len(r.train_curve) // 10:]]
        lo, hi = min(finals), max(finals)
        ax_loss.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(fontsize=9)

    names = [r.rule for r in ok]
    per_param = [r.bytes_per_param for r in ok]
    bars = ax_mem.bar(names, per_param, color=[colors[i % len(colors)] for i in range(len(ok))])
    crowded = len(ok) > 5
    for bar, r in zip(bars, ok):
        label = f"{r.bytes_per_param:.2f}" if crowded else f"{r.bytes_per_param:.2f} B/param\n{format_bytes(r.state_bytes)}"
        ax_mem.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                        fontsize=8, xytext=(0, 2), textcoords="offset points")
    if crowded:
        ax_mem.tick_params(axis="x", labelrotation=35, labelsize=8)
    ax_mem.set_ylabel("optimizer state bytes per parameter")
    ax_mem.set_title("optimizer state memory")
    ax_mem.set_ylim(0, max(per_param + [1.0]) * 1.25)
    ax_mem.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ---- command line -------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + error
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def parse_args(argv: Sequence[str] | None, rules: dict[str, DemoRule]) -> argparse.Namespace:
    parser = _Parser(prog="python -m fusedopt.demo",
                     description="Train one small language model with every built-in rule, side by side.")
    parser.add_argument("--rules", default=None,
                        help=f"comma-separated rules to train, or 'all' (default: all; with --quick: "
                             f"{','.join(QUICK_RULES)}); valid: {', '.join(rules)}")
    parser.add_argument("--steps", type=_positive_int, default=None, help="training steps per rule")
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="auto: cuda when available, else cpu")
    parser.add_argument("--out", default="demo_out",
                        help="folder for the PNG and results.json (default: demo_out)")
    parser.add_argument("--quick", action="store_true", help="a tiny model and a few steps (CI-sized)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="run the step eagerly")
    parser.add_argument("--threads", type=_positive_int, default=None,
                        help="CPU threads (default: half the cores; a small model gains little from more, "
                             "and a busy machine loses much)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available; valid here: auto, cpu")
    chosen = args.rules or ("all" if not args.quick else ",".join(QUICK_RULES))
    if chosen == "all":
        args.rules = list(rules)
    else:
        args.rules = [r.strip() for r in chosen.split(",") if r.strip()]
        unknown = [r for r in args.rules if r not in rules]
        if unknown or not args.rules:
            parser.error(f"--rules: unknown rule(s) {', '.join(unknown) or '(none given)'}; "
                         f"valid: {', '.join(rules)} or all")
    return args


class _NoProfilerNote(logging.Filter):
    """Drops dynamo's "Profiler record function ... will be ignored" (torch.optim's step wrapper)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "will be ignored" not in record.getMessage()


def main(argv: Sequence[str] | None = None) -> int:
    rules = demo_rules()
    args = parse_args(argv, rules)
    threads = torch.get_num_threads()
    dynamo_log, quiet = logging.getLogger("torch._dynamo.variables.ctx_manager"), _NoProfilerNote()
    dynamo_log.addFilter(quiet)
    try:
        return _run(args, rules)
    finally:
        torch.set_num_threads(threads)
        dynamo_log.removeFilter(quiet)


def _header(device: torch.device, plan: Plan, corpus: Corpus, args: argparse.Namespace) -> str:
    cfg = plan.model
    where = f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else \
        f"cpu, {torch.get_num_threads()} thread(s)"
    backend = "fused Triton kernels" if device.type == "cuda" else "reference interpreter (no GPU)"
    return "\n".join([
        f"fusedopt demo on {where}, torch {torch.__version__}",
        (f"model: Llama-style, {LlamaForCausalLM(cfg).num_parameters():,} parameters (hidden "
         f"{cfg.hidden_size}, {cfg.num_layers} layer(s), {cfg.num_heads} heads / {cfg.num_kv_heads} kv, "
         f"SwiGLU {cfg.intermediate_size}, tied lm_head)"),
        f"data: {len(corpus.train):,} train / {len(corpus.val):,} validation bytes from {corpus.source}",
        (f"run: {plan.steps} steps x {plan.batch_size} x {plan.seq_len} tokens per rule, step "
         f"{'under torch.compile' if args.compile else 'eager'}, optimizer backend: {backend}"),
        f"rules: {', '.join(args.rules)}",
    ])


def _run(args: argparse.Namespace, rules: dict[str, DemoRule]) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else \
        torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 2) // 2))
    plan = PLANS["quick" if args.quick else device.type]
    if args.steps is not None:
        plan = replace(plan, steps=args.steps, eval_every=min(plan.eval_every, args.steps))
    corpus = Corpus.build(plan.corpus_bytes)
    print(_header(device, plan, corpus, args), flush=True)
    results = []
    for name in args.rules:
        try:
            results.append(train(rules[name], plan, corpus, device, compile=args.compile))
        except Exception as exc:  # noqa: BLE001 - report the rule as failed and go on with the others
            first = (str(exc).strip().splitlines() or [""])[0]
            print(f"\n{name}: failed: {type(exc).__name__}: {first}", file=sys.stderr, flush=True)
            results.append(RunResult(name, rules[name].settings, error=f"{type(exc).__name__}: {first}"))
    print()
    print(table(results, device))
    print("tokens/s leave out the first steps (eager state creation, compilation)"
          + ("; max RSS is the whole process's peak so far" if device.type == "cpu" else ""))
    os.makedirs(args.out, exist_ok=True)
    n_params = LlamaForCausalLM(plan.model).num_parameters()
    title = (f"fusedopt demo: {n_params / 1e6:.2f}M-parameter byte-level Llama, {plan.steps} steps, "
             f"{device.type}{', compiled' if args.compile else ', eager'}")
    png = plot(results, os.path.join(args.out, "demo.png"), title)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"device": str(device), "plan": asdict(plan), "parameters": n_params,
                   "results": [asdict(r) for r in results]}, f, indent=1)
    print(f"\nwrote {os.path.abspath(png)} and results.json")
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
