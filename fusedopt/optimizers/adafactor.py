"""Adafactor (Shazeer & Stern, 2018) with torch.optim.Adafactor's semantics. https://arxiv.org/abs/1804.04235

    1 - beta2_t = t^beta2_decay;   rho = min(lr, 1/sqrt(t));   alpha = max(eps2, RMS(p)) * rho
    p <- p (1 - lr wd)
    matrices (factored over the last two dims, leading dims batch):
        R <- lerp(R, mean_rows(g^2), 1 - beta2_t);   C <- lerp(C, mean_cols(g^2), 1 - beta2_t)
        V = R C / max(mean_cols(R), eps1)
    vectors:  V <- lerp(V, g^2, 1 - beta2_t)
    U = g / sqrt(max(V, eps1^2));   p <- p - alpha U / max(1, RMS(U) / d)

No momentum (torch has none); eps1 defaults to the machine epsilon of the first parameter's dtype,
as torch does. Row and column factors are (..., n, 1) and (..., 1, m), so checkpoints load into
torch.optim.Adafactor and back.
"""

from ..dsl import lerp, maximum, mean, minimum, rms, rsqrt, rule, sqrt, state


@rule("adafactor")
def adafactor(p, g, t, lr=1e-2, beta2_decay=-0.8, eps1=1.1920928955078125e-07, eps2=1e-3, d=1.0,
              weight_decay=0.0, maximize=False, matrix=False):
    if maximize:
        g = -g
    one_minus_beta2 = t**beta2_decay
    alpha = maximum(eps2, rms(p)) * minimum(lr, 1 / sqrt(t))
    if matrix:
        row = state("row_var", layout="rows")
        col = state("col_var", layout="cols")
        row.set(lerp(row, mean(g * g, over="rows"), one_minus_beta2))
        col.set(lerp(col, mean(g * g, over="cols"), one_minus_beta2))
        variance = row * col / maximum(mean(row, over="cols"), eps1)
    else:
        v = state("variance")
        v.set(lerp(v, g * g, one_minus_beta2))
        variance = v
    update = g * rsqrt(maximum(variance, eps1 * eps1))
    p.set(p * (1 - lr * weight_decay) - alpha * update / maximum(1, rms(update) / d))
