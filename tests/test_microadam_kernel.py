"""The fused MicroAdam step (the kernel codegen/window_template.py generates from the DSL rule
fusedopt/optimizers/microadam.py) against the eager interpreter of the same rule (fusedopt/window_reference.py).

Without a GPU the kernel runs in the Triton interpreter (tests/conftest.py), so most cases use small
blocks (block=64, quant_block=32) to cross block and quantization-block boundaries with small tensors;
one case runs at the defaults (4096, 2048).

What is compared, after every step, between ``MicroAdam(backend="triton")`` and
``MicroAdam(backend="reference")`` fed the same gradients:

* window indices, window values, error codes, error min/max (or the exact error feedback) and step
  counters: **bit for bit**. They depend only on the gradients and the error feedback, never on the
  parameters, and the kernel does the interpreter's float32 operations in its order (decode, add,
  bf16 rounding to nearest even, IEEE division, clamp), so any difference is a bug;
* parameters: within a tolerance derived per element. Both sides start the step from the same
  parameters (the reference is re-synchronised to the fused parameters after each comparison, so
  the bound is per step and does not grow with the step count). The float32 value before the final
  rounding is ``v = theta * (1 - lr*wd) - lr * u``; the two sides' ``u`` can differ by a few float32
  ulps: the CPU ``torch.sqrt`` of float32 is not correctly rounded (off by one ulp for ~15 % of
  inputs; the kernel's ``sqrt_rn`` is), and ``beta**age`` (Python's ``pow``) and the kernel's binary
  exponentiation may round differently in float64. So ``|v_fused - v_ref| <= 2^-20 * (|theta| +
  lr*|u|)`` (a generous 8 float32 ulps of the larger term, plus the rounding of the subtraction), and
  the stored values, one rounding each to the parameter dtype, differ by at most that plus one unit in
  the last place of the stored dtype (bf16: 2^-7 relative, fp32: 2^-23). ``lr*|u|`` is bounded by
  ``|theta_old| + |theta_new|``. A wrong rule (an age off by one, a wrong bias correction) changes
  ``lr*u`` by a fraction of itself, far above 2^-20, and the bf16 cases use lr and magnitudes where
  ``lr*u`` exceeds a bf16 ulp of the parameter; :func:`test_a_wrong_kernel_is_caught` shows that the
  comparison fails for deliberately broken kernels.
"""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from codegen import cache, ops, window_ops, window_template
from fusedopt import window_reference
from fusedopt.microadam import MicroAdam
from window_check import DEVICE, _bits, compare, compiled_against_eager, make_grads, param_tolerance

SMALL = dict(block=64, quant_block=32)
EXACT_STATES = ("window_index", "window_value", "error", "error_min", "error_max")


def kernel_module(opt: MicroAdam):
    """The imported module of the kernel that steps ``opt``'s first group."""
    spec = window_template.WindowKernelSpec(opt.program(opt.param_groups[0]), ops.target_for(torch.device(DEVICE)))
    return cache.load(window_ops.source(spec), torch.device(DEVICE))


# sizes below, at and above block (64) and quant_block (32), odd lengths, several blocks plus a tail
SIZES = [1, 2, 7, 31, 32, 33, 63, 64, 65, 97, 128, 129, 161]


@st.composite
def cases(draw):
    n = draw(st.integers(1, 4))
    sizes = draw(st.lists(st.sampled_from(SIZES), min_size=n, max_size=n))
    dtypes = draw(st.lists(st.sampled_from([torch.float32, torch.bfloat16]), min_size=n, max_size=n))
    kw = dict(
        lr=draw(st.sampled_from([1e-3, 1e-2, 0.1])),
        m=3,
        density=draw(st.sampled_from([0.05, 0.1, 0.3])),
        weight_decay=draw(st.sampled_from([0.0, 0.1])),
        window_dtype=draw(st.sampled_from([torch.bfloat16, None])),
        **SMALL,
    )
    return sizes, dtypes, draw(st.integers(1, 25)), draw(st.integers(0, 2**31 - 1)), draw(st.booleans()), kw


@settings(max_examples=8)
@given(cases())
@example(([33, 129, 1, 64], [torch.bfloat16, torch.float32, torch.float32, torch.bfloat16], 25, 7, True,
          dict(lr=1e-2, m=3, density=0.1, weight_decay=0.1, window_dtype=torch.bfloat16, **SMALL)))
def test_fused_matches_oracle(case):
    sizes, dtypes, steps, seed, ties, kw = case
    compare(sizes, dtypes, steps, seed, ties, **kw)


def test_fused_matches_oracle_at_default_blocks():
    """block=4096, quant_block=2048: a tensor smaller than a block, one with a full block plus a tail
    holding a partial quantization block, bf16 and fp32, past the window wrap (m=2)."""
    compare([5, 4096 + 2048 + 3], [torch.bfloat16, torch.float32], 3, 11, lr=1e-2, m=2, weight_decay=0.1)


def test_fp16_parameters_and_fp32_window():
    compare([65, 40], [torch.float16, torch.float16], 4, 3, lr=1e-2, m=3, density=0.1, window_dtype=None, **SMALL)


def test_exact_error_feedback_and_fp16_window_run_fused():
    """Storage choices are settings of the rule's states, so the kernel generated for them runs them:
    a float32 error feedback (a full-size fp32 state) and an fp16 window."""
    compare([65, 40, 7], [torch.float32, torch.bfloat16, torch.float32], 5, 9, lr=1e-2, m=3, density=0.1,
            exact_error_feedback=True, window_dtype=torch.float16, **SMALL)


# ---- a broken kernel must fail the comparison ---------------------------------------------------

MUTANTS = {
    # ring ages off by one
    "age": [("age = (t - 1 - row_i) % m", "age = (t - row_i) % m")],
    # ties go to the higher index (the selection of the reversed block, reversed back)
    "ties": [("keep, rank = select_topk(tl.where(valid, key, -1), k)",
              "keep, rank = select_topk(tl.flip(tl.where(valid, key, -1), 0), k)\n"
              "        keep = tl.flip(keep, 0)\n"
              "        rank = tl.cumsum(keep.to(tl.int32), axis=0) - 1")],
    # nibbles swapped (in the helper the generated kernel imports)
    "nibbles": [("(even * 16 + odd).to(tl.uint8)", "(odd * 16 + even).to(tl.uint8)")],
    # bias correction with the window mass instead of 1 - beta^t (interpreter / CUDA text)
    "bias": [("-tl.exp2(s_t * tl.log2(s_beta1))", "-tl.exp2(tl.minimum(s_t, m.to(tl.float64)) * tl.log2(s_beta1))"),
             ("libdevice.pow(s_beta1, s_t)", "libdevice.pow(s_beta1, tl.minimum(s_t, m.to(tl.float64)))")],
}


def _mutate(text: str, name: str) -> str:
    applied = [(old, new) for old, new in MUTANTS[name] if text.count(old) == 1]
    assert len(applied) == 1, f"mutation '{name}' no longer applies"
    return text.replace(*applied[0])


def _mutant_source(tmp_path, monkeypatch, name: str):
    """window_ops.source, returning the generated text with the mutation applied (a helper mutation
    imports a mutated copy of codegen/jit_helpers.py instead)."""
    real = window_ops.source
    helpers = None
    if name == "nibbles":
        from codegen import jit_helpers

        path = tmp_path / f"mutant_helpers_{name}.py"
        path.write_text(_mutate(open(jit_helpers.__file__).read(), name))
        monkeypatch.syspath_prepend(str(tmp_path))
        helpers = path.stem

    def source(spec):
        text = real(spec)
        if helpers:
            return text.replace("from codegen.jit_helpers import", f"from {helpers} import")
        return _mutate(text, name)

    return source


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_a_wrong_kernel_is_caught(tmp_path, monkeypatch, name):
    kw = dict(lr=1e-2, m=3, density=0.1, weight_decay=0.1, **SMALL)
    case = ([65, 33], [torch.float32, torch.bfloat16], 6, 5, True)
    compare(*case, **kw)  # the real kernel passes this case
    monkeypatch.setattr(window_ops, "source", _mutant_source(tmp_path, monkeypatch, name))
    with pytest.raises(AssertionError):
        compare(*case, **kw)


def test_tolerance_is_tight_for_bf16():
    """The bf16 bound is one bf16 ulp plus float32 terms: a step with a changed lr (1.1x) leaves it."""
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(64, generator=gen).to(torch.bfloat16)
    g = torch.randn(64, generator=gen).to(torch.bfloat16)
    out = []
    for lr in (0.1, 0.11):
        p = torch.nn.Parameter(p0.clone())
        p.grad = g.clone()
        MicroAdam([p], lr=lr, m=3, density=0.3, backend="reference", **SMALL).step()
        out.append(p.detach())
    tol = param_tolerance(p0, out[0], torch.bfloat16)
    assert ((out[1].double() - out[0].double()).abs() > tol).any()


# ---- no recompilation, one launch ----------------------------------------------------------------


def _compiled_count(opt) -> int | None:
    caches = getattr(kernel_module(opt).window_step, "device_caches", None)
    if caches is None:  # the interpreter compiles nothing
        return None
    return sum(len(c[0]) for c in caches.values())


def test_changing_lr_changes_data_not_code():
    sizes, dtypes = [65, 33], [torch.float32, torch.bfloat16]
    kw = dict(lr=1e-2, m=3, density=0.1, **SMALL)
    init = [torch.randn(n, generator=torch.Generator().manual_seed(n)).to(d) for n, d in zip(sizes, dtypes)]
    fused = [torch.nn.Parameter(x.to(DEVICE).clone()) for x in init]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in fused]
    opt_f = MicroAdam(fused, backend="triton", **kw)
    opt_r = MicroAdam(ref, backend="reference", **kw)
    grads = make_grads(sizes, dtypes, 6, 0, False)
    keys = compiled = None
    for t, row in enumerate(grads, start=1):
        if t == 4:  # as a scheduler does
            for opt in (opt_f, opt_r):
                opt.param_groups[0]["lr"] = 0.1
        old = [p.detach().clone() for p in ref]
        for pf, pr, g in zip(fused, ref, row):
            pf.grad, pr.grad = g.to(DEVICE), g.to(DEVICE).clone()
        opt_f.step()
        opt_r.step()
        for pf, pr, o, d in zip(fused, ref, old, dtypes):
            assert ((pf.detach().double() - pr.detach().double()).abs() <= param_tolerance(o, pr.detach(), d)).all()
            with torch.no_grad():
                pr.copy_(pf)
        if t == 1:
            keys, compiled = set(window_ops.compile_keys), _compiled_count(opt_f)
    group = opt_f.param_groups[0]
    lr_tensor = opt_f._hparams_on(group, opt_f.program(group), fused[0].device)[0]
    assert float(lr_tensor) == 0.1
    assert window_ops.compile_keys == keys
    assert _compiled_count(opt_f) == compiled
    # not vacuous: a different window dtype is a different kernel
    p = torch.nn.Parameter(torch.zeros(8, device=DEVICE))
    p.grad = torch.ones(8, device=DEVICE)
    MicroAdam([p], backend="triton", window_dtype=torch.float16, **SMALL).step()
    assert len(window_ops.compile_keys) > len(keys)


def test_kernel_takes_no_python_numbers():
    """Every argument is a tensor or a constexpr, so no value (lr, a size) is a specialisation key."""
    fn = kernel_module(MicroAdam([torch.nn.Parameter(torch.zeros(4))], **SMALL)).window_step
    fn = getattr(fn, "fn", fn)
    import inspect

    names = list(inspect.signature(fn).parameters)
    constexprs = {"BLOCK", "KMAX", "ALIGNED"}
    assert set(names[-len(constexprs):]) == constexprs
    assert names[: -len(constexprs)] == ["tensors", "hparams", "group", "block_tensor", "block_index",
                                         "block_count", "done", "scratch"]


class _Counting:
    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


def test_one_launch_per_step(monkeypatch):
    """Four tensors of three dtypes, several blocks each: one launch per step, no eager fallback."""
    monkeypatch.setattr(window_reference, "step", lambda *a: pytest.fail("the eager step ran"))
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float32]
    params = [torch.nn.Parameter(torch.randn(n, device=DEVICE).to(d)) for n, d in zip([130, 64, 5, 97], dtypes)]
    opt = MicroAdam(params, lr=1e-2, m=3, density=0.1, backend="triton", **SMALL)
    module = kernel_module(opt)
    counting = _Counting(module.window_step)
    monkeypatch.setattr(module, "window_step", counting)
    before = window_ops.launches["microadam"]
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    assert len(counting.grids) == 3
    assert window_ops.launches["microadam"] - before == 3
    assert all(int(opt.state[p]["step"]) == 3 for p in params)


# ---- the backend argument ------------------------------------------------------------------------


def test_backend_choice_and_errors():
    p = torch.nn.Parameter(torch.zeros(4))
    with pytest.raises(ValueError, match="backend must be"):
        MicroAdam([p], backend="cuda")
    with pytest.raises(ValueError, match="backend='triton' cannot run this group: .*quant_block=6, which is not a "
                                         "power of two dividing the window block 96"):
        MicroAdam([p], backend="triton", block=96, quant_block=6)
    assert MicroAdam([p]).backend is None  # by device: CUDA tensors fused, the rest eager


def test_float64_and_non_contiguous_parameters_fall_back_to_the_eager_step():
    kw = dict(lr=1e-2, m=3, density=0.1, **SMALL)
    shapes = [(8, 9), (9, 8), (40,)]
    init = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)]
    fused = [torch.nn.Parameter(init[0].double().to(DEVICE)), torch.nn.Parameter(init[1].to(DEVICE).t()),
             torch.nn.Parameter(init[2].to(DEVICE))]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in fused]
    opt_f = MicroAdam(fused, backend="triton", **kw)
    opt_r = MicroAdam(ref, backend="reference", **kw)
    for _ in range(2):
        for pf, pr in zip(fused, ref):
            pf.grad = torch.randn_like(pf)
            pr.grad = pf.grad.clone()
        opt_f.step()
        opt_r.step()
    assert torch.equal(fused[0], ref[0]) and torch.equal(fused[1], ref[1])  # the same eager code
    assert opt_f.state[fused[2]]["step"].device == fused[2].device  # fused: the counter on the device
    for name in EXACT_STATES:
        assert torch.equal(_bits(opt_f.state[fused[2]][name]), _bits(opt_r.state[ref[2]][name]))


def test_state_dict_round_trip_with_the_fused_backend():
    kw = dict(lr=1e-2, m=3, density=0.1, backend="triton", **SMALL)
    gen = torch.Generator().manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(70, generator=gen).to(DEVICE))]
    opt = MicroAdam(a, **kw)
    grads = [torch.randn(70, generator=gen).to(DEVICE) for _ in range(5)]
    for g in grads[:2]:
        a[0].grad = g
        opt.step()
    b = [torch.nn.Parameter(a[0].detach().clone())]
    opt_b = MicroAdam(b, **kw)
    opt_b.load_state_dict(opt.state_dict())
    for g in grads[2:]:
        a[0].grad, b[0].grad = g, g.clone()
        opt.step()
        opt_b.step()
    assert torch.equal(a[0], b[0])
    assert int(opt_b.state[b[0]]["step"]) == 5


# ---- torch.compile -------------------------------------------------------------------------------


@pytest.mark.parametrize("lr", ["float", "tensor"])
def test_compiled_step_is_one_graph_without_recompiles(lr):
    """opt.step() and opt.zero_grad() compiled together with fullgraph=True (aot_eager:
    functionalized, so ``mutates_args`` and the fake impl are exercised) run the custom op
    fusedopt::window_step: the first two steps compile (the first creates the state), then 20 steps
    with a cosine schedule compile nothing, whether lr was given as a float (the group keeps it in a
    tensor) or as a tensor; the trajectory is the eager fused one, bit for bit."""
    def setup():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1)).to(DEVICE)
        rate = 0.01 if lr == "float" else torch.tensor(0.01, dtype=torch.float64, device=DEVICE)
        return model, MicroAdam(model.parameters(), lr=rate, m=3, density=0.1, backend="triton", **SMALL)

    x, y = torch.randn(32, 8, device=DEVICE), torch.randn(32, 1, device=DEVICE)
    (eager, _), (compiled, _) = compiled_against_eager(setup, x, y, steps=22)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)
