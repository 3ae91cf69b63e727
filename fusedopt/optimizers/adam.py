"""Adam (Kingma & Ba, 2015), with torch.optim.Adam's semantics. https://arxiv.org/abs/1412.6980

    g <- -g if maximize;  g <- g + wd * p                         (L2 weight decay, coupled)
    m <- lerp(m, g, 1 - beta1);  v <- beta2 v + (1 - beta2) g^2
    vmax <- max(vmax, v) if amsgrad (the max of the raw v, as torch)
    p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

eps sits outside the square root, after the bias correction, as in torch.optim.
"""

from ..dsl import lerp, maximum, rule, sqrt, state


def moments(g, beta1, beta2, amsgrad):
    """Declare and update Adam's states; returns (m, the second moment the step divides by)."""
    m = state("exp_avg")
    v = state("exp_avg_sq", nonnegative=True)
    m.set(lerp(m, g, 1 - beta1))
    v.set(beta2 * v + (1 - beta2) * g * g)
    if not amsgrad:
        return m, v
    vmax = state("max_exp_avg_sq", nonnegative=True)
    vmax.set(maximum(vmax, v))
    return m, vmax


@rule("adam")
def adam(p, g, t, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
         amsgrad=False, maximize=False):
    if maximize:
        g = -g
    g = g + weight_decay * p
    m, second = moments(g, beta1, beta2, amsgrad)
    p.set(p - lr / (1 - beta1**t) * m / (sqrt(second) / sqrt(1 - beta2**t) + eps))
