"""fusedopt: optimizer update rules written once, run as fused multi-tensor kernels."""

from . import dsl, ir, passes, reference
from .dsl import Rule, RuleError, configure_states, rule, state, window
from .microadam import MicroAdam
from .monitor import OptimizerMonitor
from .optim import FusedOptimizer, kernel_source, phases
from .window_optimizer import WindowOptimizer
from .torch_compat import LAMB, SGD, Adafactor, Adam, Adam8bit, AdamMini, AdamW, AdamW4bit, AdamW8bit, Lion

__all__ = [
    "Adafactor",
    "Adam",
    "AdamMini",
    "AdamW",
    "AdamW4bit",
    "AdamW8bit",
    "Adam8bit",
    "FusedOptimizer",
    "LAMB",
    "Lion",
    "MicroAdam",
    "OptimizerMonitor",
    "Rule",
    "RuleError",
    "SGD",
    "dsl",
    "kernel_source",
    "ir",
    "passes",
    "phases",
    "reference",
    "rule",
    "state",
    "window",
    "WindowOptimizer",
    "configure_states",
]
__version__ = "0.1.0"
