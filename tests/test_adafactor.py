"""Adafactor: row/column layouts and reductions, against torch.optim.Adafactor."""

from __future__ import annotations

import math

import pytest
import torch

import fusedopt
from fusedopt.dsl import RuleError, lerp, mean, rule, state

SHAPES = [(6, 5), (7,), (3, 4, 5), (1, 9), (9, 1), (1,), (2, 1, 3, 4)]


def run_pair(dtype, steps=20, backend="reference", device="cpu", **kwargs):
    """fusedopt's Adafactor on ``device`` against torch's on the CPU, same gradients."""
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES]
    a = [p.clone().to(device).requires_grad_() for p in base]
    b = [p.clone().requires_grad_() for p in base]
    oa = fusedopt.Adafactor(a, backend=backend, **kwargs)
    ob = torch.optim.Adafactor(b, foreach=False, **kwargs)
    for _ in range(steps):
        for x, y in zip(a, b):
            g = torch.randn(x.shape, generator=gen, dtype=dtype)
            x.grad, y.grad = g.clone().to(device), g.clone()
        oa.step()
        ob.step()
    return a, b, oa, ob


@pytest.mark.parametrize("kwargs", [dict(), dict(lr=0.05, weight_decay=0.1), dict(maximize=True, d=2.0)])
def test_trajectory_matches_torch_adafactor_in_float64(kwargs):
    a, b, _, _ = run_pair(torch.float64, **kwargs)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)


def test_trajectory_matches_torch_adafactor_in_float32():
    # 20 steps; the RMS normalisation and the reductions sum in a different order than torch
    a, b, _, _ = run_pair(torch.float32, lr=0.05)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=5e-5, atol=1e-6)


def test_state_has_torch_shapes_and_round_trips_both_ways():
    a, b, oa, ob = run_pair(torch.float64, steps=3)
    for x, y in zip(a, b):
        assert {k: tuple(v.shape) for k, v in oa.state[x].items()} == \
            {k: tuple(v.shape) for k, v in ob.state[y].items()}
    ob.load_state_dict(oa.state_dict())
    oa.load_state_dict(ob.state_dict())
    gen = torch.Generator().manual_seed(9)
    for _ in range(3):
        for x, y in zip(a, b):
            g = torch.randn(x.shape, generator=gen, dtype=torch.float64)
            x.grad, y.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)


def test_wrongly_shaped_factor_is_rejected_on_load():
    a, _, oa, _ = run_pair(torch.float64, steps=1)
    sd = oa.state_dict()
    sd["state"][0]["row_var"] = torch.zeros(6, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"row_var.*\(6, 1\)"):
        oa.load_state_dict(sd)


def test_vectors_and_factored_matrices_run_fused_and_match_torch():
    from codegen import launch
    from kernel_check import any_kernel_device

    device = any_kernel_device()
    before = launch.launches["adafactor"]
    a, b, _, _ = run_pair(torch.float32, steps=20, backend="triton", device=device, lr=0.05)
    # vectors: RMS(p) and RMS(U) are both reductions of old values: one reduction phase, then the update;
    # matrices: row and column means, the new factors and their mean, RMS(U), then the update
    assert launch.launches["adafactor"] - before == 20 * (2 + 4)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.cpu(), y, rtol=5e-5, atol=1e-6)


def test_row_state_set_to_a_full_value_is_a_definition_error():
    with pytest.raises(RuleError, match=r"layout 'rows'.*layout 'full'.*mean\(x, over='rows'\)"):
        @rule("bad_rows")
        def bad_rows(p, g, t, lr=0.1, matrix=False):
            if matrix:
                r = state("r", layout="rows")
                r.set(lerp(r, g * g, 0.1))
            p.set(p - lr * g)


def test_row_states_need_the_matrix_option():
    with pytest.raises(RuleError, match="matrix"):
        @rule("no_matrix")
        def no_matrix(p, g, t, lr=0.1):
            r = state("r", layout="rows")
            r.set(mean(g * g, over="rows"))
            p.set(p - lr * g / (r + 1))


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_max_grad_norm_equals_clip_grad_norm_then_torch_adafactor(backend):
    """Matrices and vectors run as two programs; the clipping norm spans both."""
    from kernel_check import any_kernel_device

    device = any_kernel_device() if backend == "triton" else "cpu"
    gen = torch.Generator().manual_seed(5)
    base = [torch.randn(s, generator=gen) for s in SHAPES]
    a = [p.clone().to(device).requires_grad_() for p in base]
    b = [p.clone().requires_grad_() for p in base]
    oa = fusedopt.Adafactor(a, lr=0.05, max_grad_norm=0.5, backend=backend)
    ob = torch.optim.Adafactor(b, lr=0.05, foreach=False)
    for _ in range(5):
        for x, y in zip(a, b):
            g = torch.randn(x.shape, generator=gen) * 2
            x.grad, y.grad = g.clone().to(device), g.clone()
        torch.nn.utils.clip_grad_norm_(b, 0.5)
        oa.step()
        ob.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(x.cpu(), y, rtol=5e-5, atol=1e-6)


def test_kernel_source_shows_the_factored_kernels():
    text = fusedopt.kernel_source(fusedopt.optimizers.adafactor, matrix=True)
    assert all(f"def reduce_phase_{k}" in text for k in range(3)) and "def fused_step" in text
    assert "def fused_step" in fusedopt.kernel_source(fusedopt.optimizers.adafactor, matrix=False)


# ---- HF transformers' variant (hf=True) and the first moment ------------------------------------

HF_SHAPES = [(7,), (6, 5), (3, 4, 5), (1, 9)]
HF_NAMES = {"decay_rate": "beta2_decay", "clip_threshold": "d"}  # HF's argument names -> fusedopt's


def _rms(x):
    return x.pow(2).mean().sqrt().item()


def oracle_step(p, g, st, variant="hf", lr=None, eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8,
                beta1=None, weight_decay=0.0, scale_parameter=True, relative_step=True, warmup_init=False,
                mutation=None):
    """One Adafactor step on p in place, transcribed from the two implementations: variant "hf" is
    transformers.optimization.Adafactor (4.3, HF's argument names and defaults), "torch" is
    torch.optim.Adafactor (4.2; relative_step and scale_parameter unused) plus HF's first moment.
    ``mutation`` makes a deliberately wrong HF step, to show the comparison catches it."""
    eps1, eps2 = eps
    t = st["step"] = st.get("step", 0) + 1
    rms_p = _rms(p)
    if variant == "hf":
        rho = (min(1e-6 * t if warmup_init else 1e-2, 1 / math.sqrt(t))) if relative_step else lr
        lr_t = max(eps2, rms_p) * rho if scale_parameter else rho
        decay_lr = rho if mutation == "decay_without_scale" else lr_t
    else:
        lr_t, decay_lr = max(eps2, rms_p) * min(lr, 1 / math.sqrt(t)), lr
    beta2 = 1.0 - t**decay_rate
    inside = variant == "hf" and mutation != "eps_outside"
    q = g * g + eps1 if inside else g * g
    if g.dim() >= 2:
        row = st.setdefault("row_var", torch.zeros(g.shape[:-1], dtype=g.dtype))
        col = st.setdefault("col_var", torch.zeros(g.shape[:-2] + g.shape[-1:], dtype=g.dtype))
        row.mul_(beta2).add_(q.mean(dim=-1), alpha=1 - beta2)
        col.mul_(beta2).add_(q.mean(dim=-2), alpha=1 - beta2)
        row_mean = row.mean(dim=-1, keepdim=True)
        if variant == "torch":
            row_mean = row_mean.clamp(min=eps1)
        inv_sqrt_v = (row / row_mean).rsqrt().unsqueeze(-1) * col.unsqueeze(-2).rsqrt()
    else:
        v = st.setdefault("variance", torch.zeros_like(g))
        v.mul_(beta2).add_(q, alpha=1 - beta2)
        inv_sqrt_v = v.rsqrt()
    if variant == "torch":
        inv_sqrt_v = inv_sqrt_v.clamp(max=1 / eps1)  # 1 / sqrt(max(V, eps1^2))
    u = g / (1 / inv_sqrt_v + eps1) if mutation == "eps_outside" else inv_sqrt_v * g
    clip = max(1.0, _rms(u) / clip_threshold)
    u = u * lr_t if mutation == "momentum_before_clip" else u / clip * lr_t
    if beta1 is not None:
        m = st.setdefault("exp_avg", torch.zeros_like(g))
        m.mul_(beta1).add_(u, alpha=1 - beta1)
        u = m / clip if mutation == "momentum_before_clip" else m
    if weight_decay != 0:
        p.add_(p, alpha=-weight_decay * decay_lr)
    p.add_(-u)


def run_against_oracle(dtype, hf_kwargs, *, variant="hf", backend="reference", shapes=HF_SHAPES, steps=20,
                       mutation=None, device="cpu"):
    """fusedopt.Adafactor given HF's arguments (renamed) next to the float64 oracle, same gradients."""
    gen = torch.Generator().manual_seed(3)
    base = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    params = [b.to(device).requires_grad_() for b in base]
    kwargs = {HF_NAMES.get(k, k): v for k, v in hf_kwargs.items()}
    opt = fusedopt.Adafactor(params, backend=backend, hf=variant == "hf", **kwargs)
    ref = [b.double().clone() for b in base]
    ref_states = [{} for _ in base]
    for _ in range(steps):
        for p, r, st in zip(params, ref, ref_states):
            g = torch.randn(p.shape, generator=gen, dtype=dtype)
            p.grad = g.to(device)
            oracle_step(r, g.double(), st, variant=variant, mutation=mutation, **hf_kwargs)
        opt.step()
    return params, ref, opt, ref_states


def assert_matches_oracle(params, ref, opt, ref_states, rtol, atol):
    for p, r, st in zip(params, ref, ref_states):
        mine, what = opt.state[p], f"param of shape {tuple(p.shape)}"
        assert set(mine) == set(st), (what, sorted(mine), sorted(st))
        assert mine["step"].item() == st["step"]
        torch.testing.assert_close(p.detach().cpu().double(), r, rtol=rtol, atol=atol,
                                   msg=lambda m, w=what: f"{w}: {m}")
        for name in set(st) - {"step"}:  # factors hold a kept dim here, not in HF's layout
            torch.testing.assert_close(mine[name].cpu().double().reshape(st[name].shape), st[name], rtol=rtol,
                                       atol=atol * _rms(st[name]),
                                       msg=lambda m, w=what, n=name: f"{w}, {n}: {m}")


HF_CASES = {
    "hf-defaults": dict(),  # relative step, scaled by RMS(p), eps1 = 1e-30, no first moment
    "beta1-weight-decay": dict(beta1=0.9, weight_decay=0.1),
    "lr-unscaled-eps-inside": dict(relative_step=False, scale_parameter=False, lr=0.05, eps=(1e-3, 1e-3),
                                   beta1=0.5),
    "lr-scaled-clipping": dict(relative_step=False, lr=0.3, clip_threshold=0.5, decay_rate=-0.6,
                               weight_decay=0.05, eps=(1e-4, 1e-2)),
    "warmup-init-beta1": dict(warmup_init=True, beta1=0.9, weight_decay=0.2, eps=(1e-3, 1e-3)),
    "relative-unscaled": dict(scale_parameter=False, beta1=0.0),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_hf_variant_matches_a_transcription_of_transformers_adafactor_in_float64(case):
    assert_matches_oracle(*run_against_oracle(torch.float64, HF_CASES[case]), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("case", ["hf-defaults", "lr-unscaled-eps-inside", "warmup-init-beta1"])
def test_hf_variant_matches_in_float32(case):
    assert_matches_oracle(*run_against_oracle(torch.float32, HF_CASES[case]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["hf-defaults", "beta1-weight-decay", "lr-unscaled-eps-inside"])
def test_hf_variant_runs_fused(case):
    from codegen import launch
    from kernel_check import any_kernel_device

    device = any_kernel_device()
    before = launch.launches["adafactor"]
    out = run_against_oracle(torch.float32, HF_CASES[case], backend="triton", shapes=[(7,), (130,), (6, 5)],
                             device=device)
    assert launch.launches["adafactor"] - before == 20 * (2 + 4)  # the vectors' launches, the matrix's
    assert_matches_oracle(*out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mutation", ["eps_outside", "momentum_before_clip", "decay_without_scale"])
def test_the_oracle_comparison_catches_a_wrong_variant(mutation):
    """Each mutation is a plausible misreading of HF's step; the float64 comparison must reject it."""
    kwargs = dict(relative_step=False, lr=0.05, beta1=0.9, weight_decay=0.1, eps=(1e-3, 1e-3))
    run = run_against_oracle(torch.float64, kwargs)
    assert_matches_oracle(*run, rtol=1e-12, atol=1e-14)  # the right oracle passes with these arguments
    wrong = run_against_oracle(torch.float64, kwargs, mutation=mutation)
    with pytest.raises(AssertionError, match="not close"):
        assert_matches_oracle(*wrong, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("beta1", [None, 0.9])
def test_first_moment_on_torch_semantics(beta1):
    """hf=False with beta1: HF's EMA of torch's clipped, alpha-scaled update, decay outside it. beta1=None
    checks the oracle's torch branch itself (fusedopt's torch semantics equal torch.optim's, tests above)."""
    kwargs = dict(lr=0.05, weight_decay=0.1, eps=(1e-7, 1e-3), beta1=beta1)
    assert_matches_oracle(*run_against_oracle(torch.float64, kwargs, variant="torch"), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kwargs", [
    dict(hf=True, beta1=0.9),
    dict(hf=True, beta1=0.9, relative_step=False, scale_parameter=False, lr=0.02),
    dict(beta1=0.8, lr=0.05),
])
def test_state_dict_round_trip_with_a_first_moment(kwargs):
    gen = torch.Generator().manual_seed(5)
    base = [torch.randn(s, generator=gen, dtype=torch.float64) for s in HF_SHAPES]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in HF_SHAPES] for _ in range(6)]
    a = [b.clone().requires_grad_() for b in base]
    oa = fusedopt.Adafactor(a, **kwargs)

    def steps(params, opt, gs):
        for step_grads in gs:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()

    steps(a, oa, grads[:3])
    sd = oa.state_dict()
    for i, shape in enumerate(HF_SHAPES):
        assert tuple(sd["state"][i]["exp_avg"].shape) == shape
    assert sd["param_groups"][0]["use_first_moment"] is True
    b = [p.detach().clone().requires_grad_() for p in a]
    ob = fusedopt.Adafactor(b, **kwargs)
    ob.load_state_dict(sd)
    steps(a, oa, grads[3:])
    steps(b, ob, grads[3:])
    for x, y in zip(a, b):
        assert torch.equal(x, y)
        for name in oa.state[x]:
            assert torch.equal(oa.state[x][name], ob.state[y][name]), name


def test_a_first_moment_checkpoint_switches_the_optimizer_to_it():
    a, b = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    oa = fusedopt.Adafactor([a], hf=True, beta1=0.9)
    a.grad = torch.randn(4, 3)
    oa.step()
    ob = fusedopt.Adafactor([b], hf=True)
    ob.load_state_dict(oa.state_dict())  # as torch.optim: the checkpoint's hyperparameters win
    assert ob.param_groups[0]["use_first_moment"] is True and "exp_avg" in ob.state[b]


def test_hf_defaults_resolve_to_transformers_defaults():
    p = torch.zeros(3, 2, requires_grad=True)
    group = fusedopt.Adafactor([p], hf=True).param_groups[0]
    assert (group["relative_step"], group["scale_parameter"], group["warmup_init"]) == (True, True, False)
    assert group["eps"][0].item() == 1e-30 and group["eps"][1].item() == 1e-3
    assert group["lr"].isnan() and group["use_first_moment"] is False
    torch_group = fusedopt.Adafactor([p]).param_groups[0]
    assert torch_group["lr"].item() == 1e-2 and torch_group["eps"][0].item() == torch.finfo(torch.float32).eps
    options = ("hf", "relative_step", "scale_parameter", "warmup_init", "use_first_moment")
    assert [torch_group[k] for k in options] == [False, False, True, False, False]


BAD = [
    (dict(hf=True, lr=1e-3), ValueError,
     r"relative_step=True computes the learning rate.*got lr=0\.001\. Fix: drop lr"),
    (dict(hf=True, relative_step=False), ValueError, r"relative_step=False takes .*got lr=None\. Fix: pass lr="),
    (dict(hf=True, relative_step=False, lr=1e-3, warmup_init=True), ValueError,
     r"warmup_init=True .*needs relative_step=True, got relative_step=False\. Fix:"),
    (dict(relative_step=True), ValueError,
     r"relative_step is an option of HF.*got relative_step=True with hf=False\. Fix: pass hf=True"),
    (dict(relative_step=False), ValueError, r"got relative_step=False with hf=False\. Fix: pass hf=True"),
    (dict(scale_parameter=False), ValueError, r"got scale_parameter=False with hf=False\. Fix: pass hf=True"),
    (dict(warmup_init=True), ValueError, r"got warmup_init=True with hf=False\. Fix: pass hf=True"),
    (dict(beta1=1.0), ValueError, r"beta1 .* in \[0, 1\), got beta1=1\.0\. Fix:"),
    (dict(hf=True, beta1=-0.1), ValueError, r"got beta1=-0\.1\. Fix:"),
    (dict(hf=True, decay_rate=-0.8), TypeError,
     r"decay_rate is HF's name for beta2_decay.*Fix: pass beta2_decay=-0\.8"),
    (dict(clip_threshold=1.0), TypeError, r"clip_threshold is HF's name for d.*Fix: pass d=1\.0"),
]


@pytest.mark.parametrize("kwargs,error,match", BAD, ids=[str(k) for k, _, _ in BAD])
def test_bad_combinations_are_refused_at_construction(kwargs, error, match):
    with pytest.raises(error, match=r"^Adafactor: .*" + match):
        fusedopt.Adafactor([torch.zeros(3, 2, requires_grad=True)], **kwargs)


@pytest.mark.parametrize("group,match", [
    (dict(hf=True, lr=0.1), r"got lr=0\.1\. Fix: drop lr"),
    (dict(relative_step=True), r"got relative_step=True with hf=False\. Fix: set hf=True in this group"),
    (dict(hf=True, beta1=2.0), r"got beta1=2\.0"),
])
def test_bad_combinations_in_a_param_group_are_refused(group, match):
    with pytest.raises(ValueError, match=r"^Adafactor: .*" + match):
        fusedopt.Adafactor([{"params": [torch.zeros(2, requires_grad=True)], **group}])


def test_hf_only_options_are_rule_errors_without_hf():
    with pytest.raises(RuleError, match=r"relative_step.*Fix: also set hf=True"):
        fusedopt.optimizers.adafactor.program(relative_step=True)
    with pytest.raises(RuleError, match=r"warmup_init.*Fix: set relative_step=True"):
        fusedopt.optimizers.adafactor.program(hf=True, warmup_init=True)
