"""MicroAdam (Modoranu et al., NeurIPS 2024): Adam's moments rebuilt from a window of the last m
block top-k gradients, with 4-bit quantized error feedback. https://arxiv.org/abs/2405.15593

Per step, with ``e`` the error feedback and the window's rows written at steps ``t - age``:

    a <- g + e                                  (the gradient plus what earlier steps left out)
    push a: per block, the k entries of largest |a| go to ring row (t - 1) mod m
    e <- a where not kept, 0 where kept         (stored back as 4-bit min/max codes)
    M = sum_rows beta1^age * value              S = sum_rows beta2^age * value^2
    p <- p (1 - lr wd) - lr * (1 - beta1) / (1 - beta1^t) * M / (sqrt((1 - beta2) / (1 - beta2^t) * S) + eps)

(0 where S = 0: no row holds that element). With density 1, an exact error feedback and m >= t this
is AdamW with eps outside the square root. The bias correction keeps ``1 - beta^t`` once the window is
full, as the official code does. ``fusedopt.MicroAdam`` runs this rule and documents the state and
the deliberate differences from the official implementation.
"""

from ..dsl import eq, rule, sqrt, state, where, window


@rule("microadam")
def microadam(p, g, t, lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
    e = state("error", dtype="q4minmax", quant_block=2048)
    w = window("window", m=10, density=0.01, block=4096, dtype="bf16")
    a = g + e
    w.push(a)
    e.set(where(w.kept, 0, a))
    m = w.sum(beta1)
    v = w.sum(beta2, power=2)
    u = (1 - beta1) / (1 - beta1**t) * m / (sqrt((1 - beta2) / (1 - beta2**t) * v) + eps)
    p.set(p * (1 - lr * weight_decay) - lr * where(eq(v, 0), 0, u))
