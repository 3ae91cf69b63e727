"""Adam-mini (Zhang et al., 2024), the official v1.1.1 update. https://arxiv.org/abs/2406.16793

Adam's full first moment, but one second moment per block of the parameter (a head of q/k, an
output row of embeddings, v, o and MLP weights, the whole tensor for norms; one per element for
biases), as fusedopt.partition lays them out:

    v_b <- beta2 v_b + (1 - beta2) mean_b(g^2)
    m <- lerp(m, g, 1 - beta1)
    p <- p (1 - lr wd) - lr / (1 - beta1^t) * m / (sqrt(v_b) / sqrt(1 - beta2^t) + eps)

About 4 bytes of state per parameter instead of Adam's 8.
"""

from ..dsl import lerp, mean, rule, sqrt, state


@rule("adam_mini")
def adam_mini(p, g, t, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
    m = state("exp_avg")
    v = state("vmean", layout="blocks")
    v.set(beta2 * v + (1 - beta2) * mean(g * g, over="blocks"))
    m.set(lerp(m, g, 1 - beta1))
    p.set(p * (1 - lr * weight_decay) - lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps))
