"""The rules the demo trains with, and their settings for a small language model.

One entry per built-in rule of :mod:`fusedopt.optimizers`. A rule that has no entry here still joins
the demo (see :func:`demo_rules`), run through :class:`fusedopt.FusedOptimizer` with its defaults;
add an entry to give it tuned hyperparameters or a special constructor (e.g. one that needs
``model.named_parameters()``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from . import optimizers
from .dsl import Rule
from .microadam import MicroAdam
from .window_optimizer import WindowOptimizer
from .optim import FusedOptimizer
from .partition import Blocks
from .torch_compat import LAMB, SGD, Adafactor, Adam, AdamMini, AdamW, Lion


@dataclass(frozen=True)
class DemoRule:
    """How the demo builds an optimizer for ``model``; ``settings`` is shown in the table."""

    name: str
    build: Callable[[nn.Module], torch.optim.Optimizer]
    settings: str


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and embeddings; none on 1-D tensors (norm weights, biases)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adam_mini_for(model: nn.Module, **kwargs) -> AdamMini:
    """Adam-mini with the model's own head layout; models without a Llama config get one block per
    output row (one per tensor for vectors)."""
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "num_heads"):
        return AdamMini(model.named_parameters(), dim=cfg.hidden_size, n_heads=cfg.num_heads,
                        n_kv_heads=cfg.num_kv_heads, **kwargs)

    def by_rows(name, shape):
        return Blocks.for_shape("rows" if len(shape) >= 2 else "tensor", shape)

    return AdamMini(model.named_parameters(), dim=1, n_heads=1, partition=by_rows, **kwargs)


RULES: dict[str, DemoRule] = {
    rule.name: rule
    for rule in (
        DemoRule("adamw", lambda m: AdamW(decay_groups(m, 0.1), lr=3e-3, betas=(0.9, 0.95)),
                 "lr 3e-3, betas (0.9, 0.95), wd 0.1"),
        DemoRule("adam", lambda m: Adam(m.parameters(), lr=3e-3, betas=(0.9, 0.95)),
                 "lr 3e-3, betas (0.9, 0.95)"),
        DemoRule("sgd", lambda m: SGD(m.parameters(), lr=0.1, momentum=0.9),
                 "lr 0.1, momentum 0.9"),
        DemoRule("lion", lambda m: Lion(decay_groups(m, 1.0), lr=3e-4, betas=(0.9, 0.99)),
                 "lr 3e-4, betas (0.9, 0.99), wd 1.0"),
        DemoRule("lamb", lambda m: LAMB(decay_groups(m, 0.1), lr=3e-2, betas=(0.9, 0.95)),
                 "lr 3e-2, betas (0.9, 0.95), wd 0.1, clip 1.0"),
        DemoRule("adam_mini", lambda m: adam_mini_for(m, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1),
                 "lr 3e-3, betas (0.9, 0.95), wd 0.1 (not on norms)"),
        DemoRule("adafactor", lambda m: Adafactor(m.parameters()), "torch's defaults (lr 1e-2)"),
        DemoRule("adamw8bit", lambda m: AdamW(decay_groups(m, 0.1), lr=3e-3, betas=(0.9, 0.95), state_dtype="q8"),
                 "as adamw, 8-bit moments (tensors >= 4096 elements)"),
        DemoRule("microadam", lambda m: MicroAdam(m.parameters(), lr=1e-2, betas=(0.9, 0.95)),
                 "lr 1e-2, betas (0.9, 0.95), window 10, density 1 %"),
    )
}


def builtin_rules() -> dict[str, Rule]:
    """Every rule exported by :mod:`fusedopt.optimizers`, by rule name."""
    found = (getattr(optimizers, name) for name in optimizers.__all__)
    return {r.name: r for r in found if isinstance(r, Rule)}


def _default_build(rule: Rule) -> Callable[[nn.Module], torch.optim.Optimizer]:
    front_end = WindowOptimizer if rule.program().window is not None else FusedOptimizer
    return lambda model: front_end(model.parameters(), rule)


def demo_rules() -> dict[str, DemoRule]:
    """The tuned entries of :data:`RULES`, then any other built-in rule with its default settings."""
    out = dict(RULES)
    for name, rule in builtin_rules().items():
        if name not in out:
            out[name] = DemoRule(name, _default_build(rule), "rule defaults")
    return out
