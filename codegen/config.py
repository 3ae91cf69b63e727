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
