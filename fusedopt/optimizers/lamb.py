"""LAMB (You et al., 2019) with timm's / NVIDIA FusedLAMB's semantics. https://arxiv.org/abs/1904.00962

    m <- beta1 m + (1 - beta1) g;   v <- beta2 v + (1 - beta2) g^2
    u = (m / (1 - beta1^t)) / (sqrt(v) / sqrt(1 - beta2^t) + eps)     (no bias correction if off)
    u <- u + wd * p
    r = ||p|| / ||u|| per tensor (1 where either norm is 0; min(r, 1) with trust_clip);
        r = 1 for tensors with wd = 0 unless always_adapt
    p <- p - lr * r * u

timm clips gradients to a global norm of 1.0 inside the optimizer, over every group; here that is
the ``max_grad_norm`` every fusedopt optimizer accepts (one norm over all groups that clip;
fusedopt.LAMB defaults it to 1.0, as timm). One difference: timm counts steps per group, fusedopt
(as torch.optim) per parameter, so a parameter that misses a step's gradient keeps its own bias
correction.
"""

from ..dsl import eq, lerp, minimum, norm, rule, sqrt, state, where


@rule("lamb")
def lamb(p, g, t, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01,
         bias_correction=True, trust_clip=False, always_adapt=False):
    m = state("exp_avg")
    v = state("exp_avg_sq", nonnegative=True)
    m.set(lerp(m, g, 1 - beta1))
    v.set(beta2 * v + (1 - beta2) * g * g)
    if bias_correction:
        u = (m / (1 - beta1**t)) / (sqrt(v) / sqrt(1 - beta2**t) + eps)
    else:
        u = m / (sqrt(v) + eps)
    u = u + weight_decay * p
    w, n = norm(p), norm(u)
    ratio = where(w > 0, where(n > 0, w / n, 1), 1)
    if trust_clip:
        ratio = minimum(ratio, 1)
    if not always_adapt:
        ratio = where(eq(weight_decay, 0), 1, ratio)
    p.set(p - lr * ratio * u)
