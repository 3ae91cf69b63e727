"""AdamW (Loshchilov & Hutter, 2019), with torch.optim.AdamW's semantics. https://arxiv.org/abs/1711.05101

Adam with decoupled weight decay applied to the parameter before the adaptive step:

    p <- p (1 - lr wd) - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

with m, v (and vmax for amsgrad) updated as in Adam from the undecayed gradient.
"""

from ..dsl import rule, sqrt
from .adam import moments


@rule("adamw")
def adamw(p, g, t, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2,
          amsgrad=False, maximize=False):
    if maximize:
        g = -g
    m, second = moments(g, beta1, beta2, amsgrad)
    p.set(p * (1 - lr * weight_decay)
          - lr / (1 - beta1**t) * m / (sqrt(second) / sqrt(1 - beta2**t) + eps))
