"""Every environment knob of codegen, read in one place."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """FUSEDOPT_CACHE_DIR, else ~/.cache/fusedopt: where generated kernel modules are written."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fusedopt"
    return Path(os.environ.get("FUSEDOPT_CACHE_DIR", default))


def dump_dir() -> Path | None:
    """FUSEDOPT_DUMP_DIR: if set, every kernel module is also written there as <key>.py."""
    value = os.environ.get("FUSEDOPT_DUMP_DIR")
    return Path(value) if value else None


def interpreting() -> bool:
    """TRITON_INTERPRET=1 runs kernels on the CPU with Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def launch_override() -> dict[str, int]:
    """FUSEDOPT_LAUNCH="BLOCK=2048,ITERS=2,num_warps=8": replaces the CUDA launch configuration (for tuning).

    BLOCK (elements per block) must be a power of two; BLOCK * ITERS elements make one program's chunk;
    ROWS rows of BLOCK columns make one program's tile in the phases that reduce over columns.
    """
    value = os.environ.get("FUSEDOPT_LAUNCH", "").strip()
    if not value:
        return {}
    out = {}
    for item in value.split(","):
        key, _, number = item.partition("=")
        key = key.strip()
        if key not in ("BLOCK", "ITERS", "ROWS", "num_warps") or not number.strip().isdigit() or int(number) < 1:
            raise ValueError(f"FUSEDOPT_LAUNCH={value!r}: expected comma-separated BLOCK=, ITERS=, ROWS=, num_warps= "
                             f"with positive integers, got {item!r}")
        out[key] = int(number)
    if "BLOCK" in out and out["BLOCK"] & (out["BLOCK"] - 1):
        raise ValueError(f"FUSEDOPT_LAUNCH={value!r}: BLOCK must be a power of two, got {out['BLOCK']}")
    return out
