"""Adafactor (Shazeer & Stern, 2018): torch.optim.Adafactor's semantics by default, HF transformers'
(``transformers.optimization.Adafactor``) with ``hf=True``. https://arxiv.org/abs/1804.04235

torch.optim.Adafactor (hf=False, the default):
    1 - beta2_t = t^beta2_decay;   rho = min(lr, 1/sqrt(t));   alpha = max(eps2, RMS(p)) * rho
    matrices (factored over the last two dims, leading dims batch):
        R <- lerp(R, mean_rows(g^2), 1 - beta2_t);   C <- lerp(C, mean_cols(g^2), 1 - beta2_t)
        V = R C / max(mean_cols(R), eps1)
    vectors:  V <- lerp(V, g^2, 1 - beta2_t)
    U = g / sqrt(max(V, eps1^2));   u = alpha U / max(1, RMS(U) / d)
    p <- p (1 - lr wd) - u                    (decay by the raw lr, not by alpha)

HF transformers (hf=True):
    rho = min(1e-6 t if warmup_init else 1e-2, 1/sqrt(t)) if relative_step else lr
    lr_t = max(eps2, RMS(p)) * rho if scale_parameter else rho
    beta2_t = 1 - t^beta2_decay;   q = g^2 + eps1            (eps1 inside the square, as the paper)
    matrices: R <- beta2_t R + (1 - beta2_t) mean_rows(q);   C <- beta2_t C + (1 - beta2_t) mean_cols(q)
              U = g rsqrt(R / mean_cols(R)) rsqrt(C)        (no clamps)
    vectors:  V <- beta2_t V + (1 - beta2_t) q;   U = g rsqrt(V)
    u = lr_t U / max(1, RMS(U) / d)
    p <- p (1 - wd lr_t) - u                  (decay by lr_t: relative step and RMS(p) scale included)

First moment (use_first_moment, either variant): m <- beta1 m + (1 - beta1) u; then u <- m. This is
HF's exp_avg: an EMA of the clipped, lr-scaled update, no bias correction, weight decay outside it.
torch has no momentum; with hf=False the same EMA is taken of torch's u = alpha U / max(1, RMS(U)/d).

Everywhere: RMS(p) is of p before the step; g <- -g first if maximize; a tensor is factored when it has
two or more dims (option ``matrix``, set per tensor by the front end).

    torch.optim.Adafactor          transformers Adafactor         here
    lr (default 1e-2)              lr (None)                      hparam lr
    beta2_decay=-0.8               decay_rate=-0.8                hparam beta2_decay (1 - beta2_t = t^it)
    eps=(None: finfo.eps, 1e-3)    eps=(1e-30, 1e-3)              hparams eps1, eps2 (placement: option hf)
    d=1.0                          clip_threshold=1.0             hparam d
    weight_decay=0.0               weight_decay=0.0               hparam weight_decay (scaling: option hf)
    -                              beta1=None                     option use_first_moment, hparam beta1
    -                              relative_step=True             option relative_step (hf only)
    (always scales by RMS(p))      scale_parameter=True           option scale_parameter (False: hf only)
    -                              warmup_init=False              option warmup_init (needs relative_step)
    maximize=False                 -                              option maximize
    row_var, col_var / variance    exp_avg_sq_row, _col / _sq     states row_var, col_var / variance
    -                              exp_avg                        state exp_avg (full layout)

States keep torch's names and shapes: row and column factors are (..., n, 1) and (..., 1, m), so
checkpoints load into torch.optim.Adafactor and back (HF's factors drop the kept dim and use other
names). The class fusedopt.Adafactor resolves the defaults (eps1, lr, relative_step) per variant.

The second moments are declared nonnegative (torch's lerp weight t^beta2_decay and HF's beta2_t lie
in [0, 1], g^2 and q = g^2 + eps1 are >= 0), so under state_dtype "q8" or "q4" a vector's variance is
stored with the unsigned map. The row and column factors are not full-size and keep float32 under
any state_dtype. Checkpoints saved before this declaration hold the variance coded with the signed
map; fusedopt.optim.SIGNEDNESS_CHANGES lists it, and loading decodes them with that map.
"""

from ..dsl import RuleError, lerp, maximum, mean, minimum, rms, rsqrt, rule, sqrt, state


def _torch_update(p, g, t, lr, beta2_decay, eps1, eps2, d, matrix):
    """torch.optim.Adafactor's scaled, clipped update u and the factor p is decayed by's lr."""
    one_minus_beta2 = t**beta2_decay
    alpha = maximum(eps2, rms(p)) * minimum(lr, 1 / sqrt(t))
    if matrix:
        row = state("row_var", layout="rows", nonnegative=True)
        col = state("col_var", layout="cols", nonnegative=True)
        row.set(lerp(row, mean(g * g, over="rows"), one_minus_beta2))
        col.set(lerp(col, mean(g * g, over="cols"), one_minus_beta2))
        variance = row * col / maximum(mean(row, over="cols"), eps1)
    else:
        v = state("variance", nonnegative=True)
        v.set(lerp(v, g * g, one_minus_beta2))
        variance = v
    update = g * rsqrt(maximum(variance, eps1 * eps1))
    return alpha * update / maximum(1, rms(update) / d), lr


def _hf_update(p, g, t, lr, beta2_decay, eps1, eps2, d, matrix, relative_step, scale_parameter, warmup_init):
    """HF transformers' scaled, clipped update u and its lr_t (which also scales the weight decay)."""
    if relative_step:
        lr = minimum(1e-6 * t if warmup_init else 1e-2, 1 / sqrt(t))
    if scale_parameter:
        lr = maximum(eps2, rms(p)) * lr
    beta2 = 1 - t**beta2_decay
    q = g * g + eps1
    if matrix:
        row = state("row_var", layout="rows", nonnegative=True)
        col = state("col_var", layout="cols", nonnegative=True)
        row.set(beta2 * row + (1 - beta2) * mean(q, over="rows"))
        col.set(beta2 * col + (1 - beta2) * mean(q, over="cols"))
        update = rsqrt(row / mean(row, over="cols")) * rsqrt(col) * g
    else:
        v = state("variance", nonnegative=True)
        v.set(beta2 * v + (1 - beta2) * q)
        update = rsqrt(v) * g
    return update / maximum(1, rms(update) / d) * lr, lr


def _check_options(hf, relative_step, scale_parameter, warmup_init):
    hf_only = [name for name, on in (("relative_step", relative_step), ("warmup_init", warmup_init),
                                      ("scale_parameter=False", not scale_parameter)) if on]
    if hf_only and not hf:
        raise RuleError(f"rule 'adafactor': {', '.join(hf_only)} belong(s) to HF transformers' variant, "
                        "not to torch.optim.Adafactor's. Fix: also set hf=True")
    if warmup_init and not relative_step:
        raise RuleError("rule 'adafactor': warmup_init ramps the relative step size and needs relative_step. "
                        "Fix: set relative_step=True, or drop warmup_init")


@rule("adafactor")
def adafactor(p, g, t, lr=1e-2, beta2_decay=-0.8, eps1=1.1920928955078125e-07, eps2=1e-3, d=1.0,
              weight_decay=0.0, beta1=0.9, maximize=False, matrix=False, hf=False, relative_step=False,
              scale_parameter=True, warmup_init=False, use_first_moment=False):
    _check_options(hf, relative_step, scale_parameter, warmup_init)
    if maximize:
        g = -g
    if hf:
        u, decay_lr = _hf_update(p, g, t, lr, beta2_decay, eps1, eps2, d, matrix,
                                 relative_step, scale_parameter, warmup_init)
    else:
        u, decay_lr = _torch_update(p, g, t, lr, beta2_decay, eps1, eps2, d, matrix)
    if use_first_moment:
        m = state("exp_avg")
        m.set(beta1 * m + (1 - beta1) * u)
        u = m
    p.set(p * (1 - decay_lr * weight_decay) - u)
