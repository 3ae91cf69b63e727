"""Test configuration shared by every test file.

* Without CUDA, Triton kernels run in the interpreter: ``TRITON_INTERPRET=1`` must be set before
  anything imports triton, so it is set here, first. (``import torch`` does not import triton.)
* Hypothesis profiles: ``ci`` (bounded and derandomized; the default when ``CI=true``) and ``dev``
  (more examples; the default otherwise). ``HYPOTHESIS_PROFILE=<name>`` picks one explicitly.
* ``@pytest.mark.gpu`` tests are skipped when no CUDA device is present.
"""

from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# Tests use small tensors, where intra-op threads only add synchronisation (and, on a shared
# machine, contention that makes a 4096-element op take milliseconds).
torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))
for path in (ROOT, TESTS):  # `import fusedopt` and `import strategies` work from any directory
    if path not in sys.path:
        sys.path.insert(0, path)

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
_default_profile = "ci" if os.environ.get("CI", "").lower() in ("1", "true", "yes") else "dev"
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", _default_profile))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
