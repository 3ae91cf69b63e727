"""Adam-mini: block layouts from the partition, trajectories against the official package."""

from __future__ import annotations

import pytest
import torch

import fusedopt
from test_partition import GPT2, GPT2_PARAMS, LLAMA, LLAMA_PARAMS, build_module, model_shapes

adam_mini_pkg = pytest.importorskip("adam_mini", reason="the official package: pip install adam-mini==1.1.1")

MODELS = {"llama-gqa": (LLAMA_PARAMS, LLAMA), "gpt2": (GPT2_PARAMS, GPT2)}


def train_both(params, cfg, steps=20, lr=1e-2, weight_decay=0.1, backend=None):
    ours_model, official_model = build_module(model_shapes(params)), build_module(model_shapes(params))
    ours = fusedopt.AdamMini(ours_model.named_parameters(), lr=lr, weight_decay=weight_decay, backend=backend, **cfg)
    official = adam_mini_pkg.Adam_mini(named_parameters=official_model.named_parameters(), lr=lr,
                                       weight_decay=weight_decay, verbose=False, **cfg)
    gen = torch.Generator().manual_seed(3)
    for _ in range(steps):
        for (_, a), (_, b) in zip(ours_model.named_parameters(), official_model.named_parameters()):
            g = torch.randn(a.shape, generator=gen)
            a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        official.step()
    return ours_model, official_model, ours


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("model", MODELS)
def test_trajectory_matches_the_official_adam_mini(model, backend):
    """20 steps; with the fused kernels (under the interpreter on a CPU) as with the reference."""
    if backend == "triton":
        from kernel_check import any_kernel_device

        if any_kernel_device() != "cpu":
            pytest.skip("the official package steps CPU tensors here")
    params, cfg = MODELS[model]
    ours_model, official_model, _ = train_both(params, cfg, backend=backend)
    for (name, a), (_, b) in zip(ours_model.named_parameters(), official_model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6, msg=name)


def test_state_is_about_four_bytes_per_parameter():
    params, cfg = MODELS["llama-gqa"]
    ours_model, _, ours = train_both(params, cfg, steps=1)
    n = sum(p.numel() for p in ours_model.parameters())
    state_bytes = sum(t.numel() * t.element_size() for st in ours.state.values() for k, t in st.items() if k != "step")
    assert 4.0 <= state_bytes / n <= 4.05
    q = dict(ours_model.named_parameters())["model.layers.0.self_attn.q_proj.weight"]
    assert ours.state[q]["vmean"].shape == (8, 1)  # one second moment per head


def test_block_layout_without_a_partition_is_a_clear_error():
    p = torch.zeros(4, 4, requires_grad=True)
    opt = fusedopt.FusedOptimizer([p], fusedopt.optimizers.adam_mini)
    p.grad = torch.ones(4, 4)
    with pytest.raises(ValueError, match="partition"):
        opt.step()


def test_a_user_partition_overrides_the_official_rules():
    from fusedopt.partition import Blocks

    params, cfg = MODELS["llama-gqa"]
    model = build_module(model_shapes(params))
    opt = fusedopt.AdamMini(model.named_parameters(), partition=lambda name, shape: Blocks.for_shape("tensor", shape),
                            **cfg)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    assert all(st["vmean"].shape == (1, 1) for st in opt.state.values())
