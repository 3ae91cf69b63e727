"""Timing, bandwidth and reporting helpers shared by the benchmarks.

* :func:`time_steps`: the first step timed on its own (kernel compile, cold caches), then warmup
  steps (not timed), then ``steps`` timed steps, each with a device sync before and after it
  (``torch.cuda.synchronize``; on a CPU the step is synchronous and ``time.perf_counter`` suffices).
  Reported as the median with a p20-p80 band.
* :func:`copy_bandwidth`: the device's measured copy bandwidth, ``dst.copy_(src)`` over a large
  buffer, counting the bytes read plus the bytes written.
* :func:`bytes_per_step`: the bytes an optimizer step must move at the least, read from the
  optimizer's real tensors after a step: each parameter and every state tensor read and written
  once, each gradient read once. Tensor subclasses that wrap other tensors (torchao's quantized
  states) are counted by the tensors they hold; a state tensor shared by several parameters (a
  quantization map) is counted once.
* :func:`format_table`, :func:`write_results`: the printed table, and CSV + JSON files.
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quantile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default method)."""
    if not values:
        raise ValueError("quantile of no values")
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class Timing:
    first_s: float  # the first step alone, in seconds: compiles and cold caches included
    times_ms: list[float] = field(default_factory=list)  # the timed steps, in milliseconds
    # host time of each timed step: until step() returns, before the device sync (on a GPU, the
    # Python and launch overhead; when it nears times_ms the step is host-bound)
    host_ms: list[float] = field(default_factory=list)

    @property
    def host_median_ms(self) -> float:
        return statistics.median(self.host_ms)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def p20_ms(self) -> float:
        return quantile(self.times_ms, 0.2)

    @property
    def p80_ms(self) -> float:
        return quantile(self.times_ms, 0.8)


def time_steps(step: Callable[[], Any], before_step: Callable[[], Any], device: torch.device,
               steps: int, warmup: int) -> Timing:
    """Time ``step()``; ``before_step()`` (e.g. assigning gradients) runs untimed before each call."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    before_step()
    sync(device)
    t0 = time.perf_counter()
    step()
    sync(device)
    timing = Timing(first_s=time.perf_counter() - t0)
    for _ in range(warmup):
        before_step()
        step()
    for _ in range(steps):
        before_step()
        sync(device)
        t0 = time.perf_counter()
        step()
        t_host = time.perf_counter()
        sync(device)
        timing.times_ms.append((time.perf_counter() - t0) * 1e3)
        timing.host_ms.append((t_host - t0) * 1e3)
    return timing


@dataclass
class CopyBandwidth:
    gbps: float  # (bytes read + bytes written) / median time, in 1e9 bytes per second
    nbytes: int  # size of one buffer
    median_ms: float


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 20, warmup: int = 3) -> CopyBandwidth:
    """Median device-to-device ``dst.copy_(src)`` bandwidth over a buffer of ``nbytes`` (read + write)."""
    n = max(1, nbytes // 4)
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    timing = time_steps(lambda: dst.copy_(src), lambda: None, device, repeats, warmup)
    moved = 2 * n * 4
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    gbps = moved / (timing.median_ms * 1e-3) / 1e9
    return CopyBandwidth(gbps=gbps, nbytes=n * 4, median_ms=timing.median_ms)


@dataclass
class Traffic:
    bytes_per_step: int  # parameters and states read + written, gradients read
    state_bytes: int  # bytes held in optimizer state
    n_params: int  # elements of the parameters that had a gradient

    @property
    def state_bytes_per_param(self) -> float:
        return self.state_bytes / self.n_params if self.n_params else 0.0


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _storage_tensors(t: torch.Tensor) -> Iterable[torch.Tensor]:
    """The plain tensors holding ``t``'s data: ``t`` itself, or, for a wrapper subclass that
    presents one shape and dtype but stores others (torchao's 8-bit and 4-bit optimizer states
    look like float32 tensors and hold uint8 codes and scales), the tensors it wraps, recursively."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is None or type(t) in (torch.Tensor, torch.nn.Parameter):
        yield t
        return
    names, _ = flatten()
    for name in names:
        yield from _storage_tensors(getattr(t, name))


def _identity(t: torch.Tensor) -> tuple[Any, ...]:
    """Same key for the same data: the same tensor reached from several parameters' states."""
    try:
        address = t.data_ptr()
    except RuntimeError:  # no storage to point at
        address = id(t)
    return (t.device, address, t.dtype, tuple(t.shape), tuple(t.stride()))


def bytes_per_step(optimizer: torch.optim.Optimizer, ring_rows: Mapping[str, int] | None = None) -> Traffic:
    """Least bytes one step of ``optimizer`` must move, from its tensors; call after one step.

    Per parameter with a gradient: read and write the parameter, read the gradient, read and write
    every tensor in its state that lives on the parameter's device (torch.optim keeps a
    non-capturable ``step`` on the host; it moves no device memory). Element sizes are those of the
    actual tensors, so bf16 parameters or fp32 states of bf16 parameters are counted as they are. An
    optimizer that writes only part of its state (MicroAdam: one window row of m) says what its
    state moves through ``state_bytes_moved(p)``; for one that does not, ``ring_rows`` names such
    states (state key -> rows, one of which a step writes): read whole, a row written.

    A state tensor that wraps others (a traceable tensor subclass, such as torchao's quantized
    states) counts the bytes of the tensors it holds, not those of the shape it presents. A tensor
    found in the state of several parameters (bitsandbytes keeps one quantization map for all of
    them) counts once.
    """
    moved_by = getattr(optimizer, "state_bytes_moved", None)
    moved = state = n = 0
    seen: set[tuple[Any, ...]] = set()
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            n += p.numel()
            moved += 2 * _nbytes(p) + _nbytes(p.grad)
            for name, value in optimizer.state.get(p, {}).items():
                if not (isinstance(value, torch.Tensor) and value.device == p.device):
                    continue
                rows = (ring_rows or {}).get(name)
                for t in _storage_tensors(value):
                    key = _identity(t)
                    if key in seen:
                        continue
                    seen.add(key)
                    if not moved_by:
                        moved += _nbytes(t) + _nbytes(t) // rows if rows else 2 * _nbytes(t)
                    state += _nbytes(t)
            if moved_by:
                moved += moved_by(p)
    return Traffic(bytes_per_step=moved, state_bytes=state, n_params=n)


def environment(device: torch.device) -> dict[str, Any]:
    """Device name, versions and a UTC timestamp: written with every result."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu: {platform.processor() or platform.machine()} ({os.cpu_count()} logical cores)"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": name,
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
    }


# ---- results ------------------------------------------------------------------------------------

TORCH_IMPLS = ("torch-foreach", "torch-fused", "torch-compiled")

COLUMNS = (
    "date", "device", "torch", "triton", "shapes", "n_params", "n_tensors", "dtype", "rule", "impl",
    "baseline", "steps", "ms_median", "ms_p20", "ms_p80", "host_ms_median", "first_step_s", "init_s",
    "speedup_vs_torch_foreach", "speedup_vs_torch_fused", "speedup_vs_torch_compiled",
    "bytes_per_step", "gbps", "copy_gbps", "copy_limit_ms", "pct_copy_bw", "state_bytes_per_param",
    "launches_per_step", "grads",
)


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Fill ``speedup_vs_<torch impl>`` = torch median / this median (above 1: this row is faster).

    Each row is compared with the torch rows of the same parameter list and dtype whose rule is the
    row's ``baseline`` rule (its own rule, or adamw for rules torch does not have).
    """
    torch_ms = {(r["shapes"], r["dtype"], r["rule"], r["impl"]): r["ms_median"]
                for r in rows if r["impl"] in TORCH_IMPLS}
    for r in rows:
        for impl in TORCH_IMPLS:
            ref = torch_ms.get((r["shapes"], r["dtype"], r["baseline"], impl))
            key = "speedup_vs_" + impl.replace("-", "_")
            r[key] = ref / r["ms_median"] if ref is not None and r["ms_median"] > 0 else None


def num(value: float | None) -> str:
    """A short human form: 3 significant digits, no exponent above 100, '-' for a missing value."""
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}" if abs(value) >= 0.01 else f"{value:.2g}"


def format_table(rows: Iterable[dict[str, Any]], meta: dict[str, Any]) -> str:
    rows = list(rows)
    head = (f"{'params':<8} {'dtype':<5} {'rule':<6} {'impl':<19} {'ms median':>10} {'[p20 - p80]':>19} "
            f"{'host ms':>8} {'first s':>8} {'vs foreach':>10} {'vs fused':>9} {'vs compiled':>11} {'GB/s':>8} "
            f"{'% copy':>7} {'state B/p':>9} {'launch/step':>11}")
    lines = [
        f"device: {meta['device']} | torch {meta['torch']} | triton {meta['triton']} | {meta['date']}",
        f"copy bandwidth: {meta['copy_gbps']:.1f} GB/s (dst.copy_(src), {meta['copy_mib']:.0f} MiB, "
        "read + write)"
        f" | grads: {meta['grads']} | {meta['steps']} timed steps after {meta['warmup']} warmup",
        head,
        "-" * len(head),
    ]
    has_lion_baseline = False
    for r in rows:
        impl = r["impl"]
        if r["baseline"] != r["rule"]:
            impl += " *"
            has_lion_baseline = True
        band = f"[{r['ms_p20']:.3f} - {r['ms_p80']:.3f}]"
        lines.append(
            f"{r['shapes']:<8} {r['dtype']:<5} {r['rule']:<6} {impl:<19} {r['ms_median']:>10.3f} {band:>19} "
            f"{r['host_ms_median']:>8.3f} {r['first_step_s']:>8.3f} {num(r['speedup_vs_torch_foreach']):>10} "
            f"{num(r['speedup_vs_torch_fused']):>9} {num(r['speedup_vs_torch_compiled']):>11} "
            f"{num(r['gbps']):>8} {num(r['pct_copy_bw']) + '%':>7} {r['state_bytes_per_param']:>9.2f} "
            f"{num(r['launches_per_step']):>11}")
    lines.append("host ms = time until step() returns, before the device sync (Python and launch overhead); "
                 "vs X = torch X median / this median (above 1: faster than torch X); "
                 "% copy = bytes the step must move / time / copy bandwidth.")
    if has_lion_baseline:
        lines.append("* torch.optim has no such rule: 'vs' columns compare with torch.optim.AdamW "
                     "(same parameter list and dtype) as a bandwidth reference.")
    for note in meta.get("skipped", []):
        lines.append(f"skipped (no row): {note}")
    for failure in meta.get("failures", []):
        lines.append(f"FAILED (no row): {failure}")
    return "\n".join(lines)


def _unique_stem(out_dir: Path, stem: str) -> str:
    candidate, i = stem, 1
    while (out_dir / f"{candidate}.csv").exists() or (out_dir / f"{candidate}.json").exists():
        candidate, i = f"{stem}-{i}", i + 1
    return candidate


def result_stem(out_dir: Path | str, name: str = "bench_step") -> str:
    """A new ``<name>-<UTC time>`` file stem in ``out_dir``, for one run's results."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return _unique_stem(out_dir, f"{name}-{stamp}")


def write_results(rows: list[dict[str, Any]], meta: dict[str, Any], out_dir: Path | str,
                  name: str = "bench_step", stem: str | None = None) -> tuple[Path, Path]:
    """Write ``<stem>.csv`` (one row per measurement, meta repeated) and ``.json``, replacing what an
    earlier call with the same stem wrote (a run saves its rows after each one; default: a new stem)."""
    out_dir = Path(out_dir)
    stem = stem or result_stem(out_dir, name)
    csv_path, json_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.json"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({**{k: meta.get(k) for k in COLUMNS if k in meta}, **r})
    with open(json_path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2, default=str)
        f.write("\n")
    return csv_path, json_path


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
