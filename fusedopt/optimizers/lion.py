"""Lion (Chen et al., 2023), the official google/automl semantics. https://arxiv.org/abs/2302.06675

    p <- p (1 - lr wd) - lr * sign(beta1 m + (1 - beta1) g)      (sign(0) = 0)
    m <- beta2 m + (1 - beta2) g                                  (after the parameter step)

No bias correction and no eps. The authors suggest an lr 3-10x smaller and a weight decay 3-10x
larger than for AdamW.
"""

from ..dsl import rule, sign, state


@rule("lion")
def lion(p, g, t, lr=1e-4, beta1=0.9, beta2=0.99, weight_decay=0.0, maximize=False):
    if maximize:
        g = -g
    m = state("exp_avg")
    p.set(p * (1 - lr * weight_decay) - lr * sign(beta1 * m + (1 - beta1) * g))
    m.set(beta2 * m + (1 - beta2) * g)
