"""OptimizerMonitor: per-step norms, state memory and peak memory of any torch.optim optimizer.

    monitor = OptimizerMonitor(optimizer, model)      # before the first step
    for x, y in batches:
        loss_fn(model(x), y).backward()
        optimizer.step()
        monitor.record()                              # after step(), before zero_grad()
        optimizer.zero_grad()
    print(monitor.report())
    monitor.plot("monitor.png")

``record()`` computes, per param group, the gradient norm, the update norm ``||p - p_prev||`` (the
monitor keeps a device copy ``p_prev`` of every parameter, so it costs one parameter's worth of
memory), the parameter norm and the ratio update/parameter. The four numbers of every group are
stacked into one small tensor that stays on the parameters' device: no host synchronisation happens
in ``record()``. Every ``flush_every`` records, :meth:`flush` copies the pending rows to the host in
one transfer. ``measure()`` is the pure-tensor part of ``record()``; it can run inside a
``torch.compile(fullgraph=True)`` training step, and its result is handed to ``record(values)``
outside.

The state memory is read from the optimizer's own ``optimizer.state``: every tensor's
``numel * element_size``, by state name and dtype, so it works for torch.optim and fusedopt alike.
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping

import torch
from torch import nn

METRICS = ("grad_norm", "update_norm", "param_norm", "update_ratio")
_TINY = 1e-30


def max_rss_bytes() -> int | None:
    """The process's peak resident set size (ru_maxrss: KiB on Linux, bytes on macOS); None on Windows."""
    try:
        import resource
    except ImportError:
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss) if sys.platform == "darwin" else int(rss) * 1024


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _tensors(value, key: str) -> Iterable[tuple[str, torch.Tensor]]:
    """(label, tensor) for a state value: a tensor, or containers of tensors (labels get a suffix)."""
    if isinstance(value, torch.Tensor):
        yield key, value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from _tensors(v, f"{key}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _tensors(v, f"{key}[{i}]")


def _norm(t: torch.Tensor) -> torch.Tensor:
    """The 2-norm as a float32 0-d tensor (half-precision inputs are accumulated in float32)."""
    t = t.detach()
    if t.dtype in (torch.float16, torch.bfloat16):
        return torch.linalg.vector_norm(t, dtype=torch.float32)
    return torch.linalg.vector_norm(t).float()


def _total(norms: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The 2-norm of per-tensor norms, on ``device`` (the norms of a group may live on several)."""
    if not norms:
        return torch.zeros((), dtype=torch.float32, device=device)
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))


def state_bytes(optimizer: torch.optim.Optimizer) -> dict[tuple[str, str], int]:
    """``numel * element_size`` of every tensor in ``optimizer.state``, summed by (state name, dtype).

    Nothing is left out (step counters included); a tensor held under two keys counts once.
    """
    out: dict[tuple[str, str], int] = defaultdict(int)
    seen: set[int] = set()
    for per_param in optimizer.state.values():
        for key, value in per_param.items():
            for label, t in _tensors(value, str(key)):
                if id(t) in seen:
                    continue
                seen.add(id(t))
                out[(label, str(t.dtype).removeprefix("torch."))] += t.numel() * t.element_size()
    return dict(sorted(out.items()))


class OptimizerMonitor:
    """Watches ``optimizer`` (any torch.optim.Optimizer); ``model`` names parameters in reports.

    Create it before the first ``optimizer.step()``: the first update norm is measured against the
    parameters as they are at construction.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module | None = None,
                 flush_every: int = 50):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if flush_every < 1:
            raise ValueError(f"flush_every must be >= 1, got {flush_every}")
        self.optimizer = optimizer
        self.flush_every = flush_every
        self.names: dict[torch.Tensor, str] = {}
        if model is not None:
            self.names = {p: n for n, p in model.named_parameters()}
        params = self._params()
        self.device = params[0].device if params else torch.device("cpu")
        self._prev = {p: p.detach().clone() for p in params}
        self._pending: list[torch.Tensor] = []
        self._rows: list[torch.Tensor] = []  # flushed (n_groups, len(METRICS)) rows, on the host
        self.steps = 0

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self._params())

    # ---- per-step norms -------------------------------------------------------------------------

    @torch.no_grad()
    def measure(self) -> torch.Tensor:
        """A (num_groups, 4) float32 tensor on the device: grad, update, param norm, update/param.

        Reads gradients as they are now (call after ``step()`` and before ``zero_grad()``) and moves
        each ``p_prev`` to the current parameters. Tensor ops only: no host synchronisation.
        """
        rows = []
        for group in self.optimizer.param_groups:
            params = list(group["params"])
            grad_norms, update_norms, param_norms = [], [], []
            for p in params:
                prev = self._prev.get(p)
                if prev is None:  # a parameter added after the monitor was created
                    prev = self._prev[p] = p.detach().clone()
                if p.grad is not None:
                    grad_norms.append(_norm(p.grad))
                update_norms.append(_norm(p.detach() - prev))
                param_norms.append(_norm(p))
                prev.copy_(p.detach())
            grad_norm, update_norm, param_norm = (_total(n, self.device)
                                                  for n in (grad_norms, update_norms, param_norms))
            ratio = update_norm / param_norm.clamp_min(_TINY)
            rows.append(torch.stack([grad_norm, update_norm, param_norm, ratio]))
        if not rows:
            return torch.zeros((0, len(METRICS)), device=self.device)
        return torch.stack(rows)

    def record(self, values: torch.Tensor | None = None) -> None:
        """Record one step: ``measure()`` now, or ``values`` a compiled step returned from it."""
        self._pending.append(self.measure() if values is None else values.detach())
        self.steps += 1
        if len(self._pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Copy the pending rows to the host (one transfer, one synchronisation)."""
        if self._pending:
            self._rows.extend(torch.stack(self._pending).cpu().unbind(0))
            self._pending = []

    def history(self) -> dict[str, torch.Tensor]:
        """Every recorded step: {metric: float32 tensor (steps, num_groups)}, on the host."""
        self.flush()
        if not self._rows:
            return {m: torch.zeros((0, len(self.optimizer.param_groups))) for m in METRICS}
        width = max(r.shape[0] for r in self._rows)
        table = torch.stack([torch.nn.functional.pad(r, (0, 0, 0, width - r.shape[0]), value=math.nan)
                             for r in self._rows])
        return {m: table[:, :, i] for i, m in enumerate(METRICS)}

    # ---- memory ---------------------------------------------------------------------------------

    def state_bytes(self) -> dict[tuple[str, str], int]:
        """Bytes of every tensor in ``optimizer.state``, by (state name, dtype); see :func:`state_bytes`."""
        return state_bytes(self.optimizer)

    def state_bytes_total(self) -> int:
        return sum(self.state_bytes().values())

    def state_bytes_per_param(self) -> float:
        n = self.num_parameters
        return self.state_bytes_total() / n if n else 0.0

    def state_bytes_by_param(self) -> dict[str, int]:
        """State bytes of each parameter, by its name in ``model`` (or ``param<i>`` without one)."""
        index = {p: i for i, p in enumerate(self._params())}
        out = {}
        for p, per_param in self.optimizer.state.items():
            name = self.names.get(p, f"param{index.get(p, '?')}")
            out[name] = sum(t.numel() * t.element_size()
                            for key, value in per_param.items() for _, t in _tensors(value, str(key)))
        return out

    def peak_memory(self) -> tuple[int, str] | None:
        """(bytes, label): the peak CUDA memory allocated on the parameters' GPU; None off a GPU."""
        if self.device.type != "cuda":
            return None
        return torch.cuda.max_memory_allocated(self.device), f"peak CUDA memory allocated ({self.device})"

    # ---- output ---------------------------------------------------------------------------------

    def report(self, last: int = 10) -> str:
        """Text: per-group norms (last step and mean of the last ``last``), state memory, peak memory."""
        n = self.num_parameters
        lines = [(f"OptimizerMonitor: {type(self.optimizer).__name__}, "
                 f"{len(self.optimizer.param_groups)} param group(s), {n:,} parameters, "
                 f"{self.steps} step(s) recorded")]
        hist = self.history()
        if self.steps:
            lines.append(f"{'group':>5} {'params':>11} {'':>8}" + "".join(f"{m:>14}" for m in METRICS))
            for gi, group in enumerate(self.optimizer.param_groups):
                count = sum(p.numel() for p in group["params"])
                window = min(last, self.steps)
                for label, pick in (("last", lambda c: c[-1]), (f"mean{window}", lambda c: c[-last:].mean())):
                    cells = "".join(f"{pick(hist[m][:, gi]).item():>14.4g}" for m in METRICS)
                    lines.append(f"{gi:>5} {count:>11,} {label:>8}{cells}")
        breakdown = self.state_bytes()
        total = sum(breakdown.values())
        per = total / n if n else 0.0
        lines.append(f"optimizer state: {format_bytes(total)} ({total:,} B) = {per:.3f} B/param")
        for (name, dtype), b in breakdown.items():
            lines.append(f"  {name:<24} {dtype:<10} {b:>14,} B  {b / n if n else 0.0:8.3f} B/param")
        peak = self.peak_memory()
        if peak is not None:
            lines.append(f"{peak[1]}: {format_bytes(peak[0])}")
        return "\n".join(lines)

    def plot(self, path: str) -> str:
        """Write a PNG: the four norms per group against step, and the state memory by name."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        hist = self.history()
        fig, axes = plt.subplots(2, 3, figsize=(15, 8), dpi=100)
        titles = {"grad_norm": "gradient norm", "update_norm": "update norm ||p - p_prev||",
                  "param_norm": "parameter norm", "update_ratio": "update / parameter norm"}
        steps = torch.arange(1, hist[METRICS[0]].shape[0] + 1).numpy()
        for ax, m in zip(axes.flat, METRICS):
            for gi in range(hist[m].shape[1]):
                ax.plot(steps, hist[m][:, gi].numpy(), label=f"group {gi}")
            ax.set_title(titles[m])
            ax.set_xlabel("step")
            if m != "param_norm":
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            if hist[m].shape[1] > 1:
                ax.legend(fontsize=8)
        ax = axes.flat[4]
        breakdown = self.state_bytes()
        n = max(self.num_parameters, 1)
        labels = [f"{k}\n{d}" for k, d in breakdown]
        ax.bar(range(len(labels)), [b / n for b in breakdown.values()], color="tab:blue")
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.set_ylabel("bytes / parameter")
        ax.set_title(f"optimizer state: {format_bytes(sum(breakdown.values()))}")
        ax = axes.flat[5]
        by_param = sorted(self.state_bytes_by_param().items(), key=lambda kv: kv[1], reverse=True)[:12]
        ax.barh(range(len(by_param)), [b for _, b in by_param], color="tab:green")
        ax.set_yticks(range(len(by_param)), [name for name, _ in by_param], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("bytes")
        ax.set_title("state bytes by parameter (largest 12)")
        fig.suptitle(f"OptimizerMonitor: {type(self.optimizer).__name__}")
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return path
