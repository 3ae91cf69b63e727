"""Content-addressed kernel cache: generated text -> a real, imported Python module.

Triton's ``@jit`` reads a kernel's source from its file, so kernels cannot be exec'd from strings:
each module is written atomically (temp file + ``os.replace``) to
``<cache_dir>/<key[:2]>/fusedopt_<key>.py`` and imported from there. The key hashes the text with
the triton and torch versions and the device capability.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import torch
import triton

from . import config

_MODULES: dict[str, ModuleType] = {}


def device_tag(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda-sm{major}{minor}"
    return f"{device.type}-interpreter"


def cache_key(source: str, device: torch.device) -> str:
    material = "\n".join([source, f"triton {triton.__version__}", f"torch {torch.__version__}", device_tag(device)])
    return hashlib.sha256(material.encode()).hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".py")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def module_path(key: str) -> Path:
    return config.cache_dir() / key[:2] / f"fusedopt_{key}.py"


def load(source: str, device: torch.device) -> ModuleType:
    """The imported module for ``source`` (written to the cache first if it is not there)."""
    key = cache_key(source, device)
    module = _MODULES.get(key)
    if module is not None:
        return module
    path = module_path(key)
    if not path.exists() or path.read_text() != source:
        _write_atomic(path, source)
    dump = config.dump_dir()
    if dump is not None:
        _write_atomic(dump / f"{key}.py", source)
    name = f"fusedopt_kernel_{key}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    _MODULES[key] = module
    return module
