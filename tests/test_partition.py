"""Adam-mini block layouts (fusedopt.partition).

Every tensor of a small Llama-named (GQA) model and a GPT-2-named model gets an exact expected
kind and block count. Where the official package (``pip install adam-mini``, v1.1.x, pure Python)
is importable, the same tiny modules go through one CPU step of ``adam_mini.Adam_mini`` and its
per-parameter state is compared with our layouts: the kind, the number of second-moment values, and
the values themselves (after one step, ``v = (1 - beta2) * mean(g_b ** 2)`` per block, which only
agrees if the blocks cover the same elements). The official crashes that the partition fixes are
shown next to our behaviour.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import warnings

import pytest
import torch
import torch.nn as nn

from fusedopt.partition import (
    Blocks,
    adam_mini_partition,
    match_rule,
    partition_model,
    state_numel,
    summary,
    weight_decay_applies,
)

try:
    from adam_mini import Adam_mini

    OFFICIAL_VERSION = importlib.metadata.version("adam-mini")
except Exception as exc:  # not installed, or fails to import on this machine
    Adam_mini = None
    OFFICIAL_VERSION = None
    _OFFICIAL_SKIP = f"official adam-mini package not importable ({type(exc).__name__}: {exc}); " \
                     f"`pip install adam-mini` to run the comparison"
else:
    _OFFICIAL_SKIP = f"installed adam-mini {OFFICIAL_VERSION} is not 1.1.x, whose rules these tests encode"

needs_official = pytest.mark.skipif(
    Adam_mini is None or not OFFICIAL_VERSION.startswith("1.1."), reason=_OFFICIAL_SKIP)

BETA2 = 0.999

# ---------------------------------------------------------------------------------------------------
# Models: parameter names and shapes, and the layout each tensor must get: (kind, n_blocks).

# Llama with grouped-query attention: dim 64, 8 query heads, 2 key/value heads (head_dim 8),
# vocabulary 32, MLP width 128; HF names, nn.Linear weights stored (out, in).
LLAMA = dict(dim=64, n_heads=8, n_kv_heads=2)
LLAMA_PARAMS = {
    "model.embed_tokens.weight": ((32, 64), "rows", 32),
    "model.layers.0.self_attn.q_proj.weight": ((64, 64), "heads", 8),
    "model.layers.0.self_attn.k_proj.weight": ((16, 64), "heads", 2),
    "model.layers.0.self_attn.v_proj.weight": ((16, 64), "rows", 16),
    "model.layers.0.self_attn.o_proj.weight": ((64, 64), "rows", 64),
    "model.layers.0.mlp.gate_proj.weight": ((128, 64), "rows", 128),
    "model.layers.0.mlp.up_proj.weight": ((128, 64), "rows", 128),
    "model.layers.0.mlp.down_proj.weight": ((64, 128), "rows", 64),
    "model.layers.0.input_layernorm.weight": ((64,), "tensor", 1),
    "model.layers.0.post_attention_layernorm.weight": ((64,), "tensor", 1),
    "model.norm.weight": ((64,), "tensor", 1),
    "lm_head.weight": ((32, 64), "rows", 32),
}

# GPT-2: n_embd 32, 4 heads, vocabulary 50, 16 positions; HF Conv1D weights are stored (in, out),
# so "rows" is one block per *input* feature there. c_attn/c_proj of the attention match no keyword
# ("attn.c_proj" does not contain "attn.proj"), nor does wpe: one scalar each.
GPT2 = dict(dim=32, n_heads=4)
GPT2_PARAMS = {
    "transformer.wte.weight": ((50, 32), "rows", 50),
    "transformer.wpe.weight": ((16, 32), "tensor", 1),
    "transformer.h.0.ln_1.weight": ((32,), "tensor", 1),
    "transformer.h.0.ln_1.bias": ((32,), "per_element", 32),
    "transformer.h.0.attn.c_attn.weight": ((32, 96), "tensor", 1),
    "transformer.h.0.attn.c_attn.bias": ((96,), "per_element", 96),
    "transformer.h.0.attn.c_proj.weight": ((32, 32), "tensor", 1),
    "transformer.h.0.attn.c_proj.bias": ((32,), "per_element", 32),
    "transformer.h.0.ln_2.weight": ((32,), "tensor", 1),
    "transformer.h.0.ln_2.bias": ((32,), "per_element", 32),
    "transformer.h.0.mlp.c_fc.weight": ((32, 128), "rows", 32),
    "transformer.h.0.mlp.c_fc.bias": ((128,), "per_element", 128),
    "transformer.h.0.mlp.c_proj.weight": ((128, 32), "rows", 128),
    "transformer.h.0.mlp.c_proj.bias": ((32,), "per_element", 32),
    "transformer.ln_f.weight": ((32,), "tensor", 1),
    "transformer.ln_f.bias": ((32,), "per_element", 32),
}

MODELS = {"llama": (LLAMA_PARAMS, LLAMA), "gpt2": (GPT2_PARAMS, GPT2)}


def build_module(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> nn.Module:
    """An nn.Module whose named_parameters() are exactly ``shapes`` (dotted names become submodules)."""
    gen = torch.Generator().manual_seed(seed)
    root = nn.Module()
    for name, shape in shapes.items():
        *path, leaf = name.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, nn.Module())
            mod = getattr(mod, part)
        mod.register_parameter(leaf, nn.Parameter(torch.randn(shape, generator=gen)))
    assert [n for n, _ in root.named_parameters()] == list(shapes)
    return root


def model_shapes(params: dict) -> dict[str, tuple[int, ...]]:
    return {name: spec[0] for name, spec in params.items()}


# ---------------------------------------------------------------------------------------------------
# Our layouts, exactly.


@pytest.mark.parametrize("model", MODELS)
def test_every_tensor_gets_the_expected_layout(model):
    params, cfg = MODELS[model]
    parts = partition_model(build_module(model_shapes(params)).named_parameters(), **cfg)
    assert list(parts) == list(params)
    for name, (shape, kind, n_blocks) in params.items():
        numel = math.prod(shape)
        assert (parts[name].kind, parts[name].n_blocks) == (kind, n_blocks), name
        assert parts[name].n_blocks * parts[name].block_numel == numel, name
        assert parts[name].view_shape(shape) == (n_blocks, numel // n_blocks), name


def test_gqa_heads():
    # head_numel = dim * dim // n_heads = dim * head_dim: q has n_heads heads, k has n_kv_heads
    q = adam_mini_partition("model.layers.3.self_attn.q_proj.weight", (64, 64), **LLAMA)
    k = adam_mini_partition("model.layers.3.self_attn.k_proj.weight", (16, 64), **LLAMA)
    assert q == Blocks("heads", 8, 512) and k == Blocks("heads", 2, 512)
    # without GQA k has n_heads heads
    assert adam_mini_partition("wk.weight", (64, 64), dim=64, n_heads=8) == Blocks("heads", 8, 512)
    # a fused query_key_value (3*dim, dim) gets 3 * n_heads heads
    assert adam_mini_partition("attention.query_key_value.weight", (192, 64), dim=64, n_heads=8) \
        == Blocks("heads", 24, 512)


def test_first_match_wins_and_names_are_lower_cased():
    assert match_rule("Encoder.Attention.Query.Bias") == "bias"
    assert adam_mini_partition("Encoder.Attention.Query.Bias", (64,), dim=64, n_heads=8).kind == "per_element"
    # "key" before the row rules: a name with both gets heads
    assert match_rule("mlp.key.weight") == "qk"
    assert adam_mini_partition("MLP.Key.weight", (64, 64), dim=64, n_heads=8).kind == "heads"
    assert match_rule("blocks.0.attn.proj.weight") == "attn_proj"
    assert match_rule("x.feed_forward.w1.weight") == "mlp"
    assert match_rule("decoder.final_layer.weight") == "output"
    assert match_rule("bert.encoder.layer.0.attention.self.value.weight") == "value"
    assert match_rule("blocks.0.attn.qkv.weight") == "other"
    assert adam_mini_partition("blocks.0.attn.qkv.weight", (96, 32), dim=32, n_heads=4) == Blocks("tensor", 1, 3072)
    # the dict keeps the original spelling
    parts = partition_model([("Model.Embed_Tokens.Weight", nn.Parameter(torch.zeros(4, 2)))], dim=8, n_heads=2)
    assert parts == {"Model.Embed_Tokens.Weight": Blocks("rows", 4, 2)}


def test_low_rank_tensors_never_take_row_or_head_rules():
    kw = dict(dim=64, n_heads=8)
    # pitfall (a): 1-D and 0-d tensors
    assert adam_mini_partition("bert.encoder.layer.0.attention.output.LayerNorm.weight", (64,), **kw) \
        == Blocks("tensor", 1, 64)
    assert adam_mini_partition("model.layers.0.self_attn.key_norm.weight", (8,), **kw) == Blocks("tensor", 1, 8)
    # ("k_norm"/"q_norm", as in Qwen3 or OLMo2, match no q/k keyword: "tensor" by the default rule)
    assert match_rule("model.layers.0.self_attn.k_norm.weight") == "other"
    assert adam_mini_partition("flat_param.mlp", (4096,), **kw) == Blocks("tensor", 1, 4096)  # a ZeRO-3 shard
    assert adam_mini_partition("mlp.scale", (), **kw) == Blocks("tensor", 1, 1)
    assert adam_mini_partition("mlp.bias", (), **kw) == Blocks("per_element", 1, 1)
    assert adam_mini_partition("lm_head.bias", (32,), **kw) == Blocks("per_element", 32, 1)
    # pitfall (d): more than 2 dimensions: rows over dim 0
    assert adam_mini_partition("mlp.conv.weight", (4, 3, 2), **kw) == Blocks("rows", 4, 6)
    # pitfall (e): empty tensors have nothing to average
    assert adam_mini_partition("mlp.fc.weight", (0, 64), **kw) == Blocks("per_element", 0, 1)
    assert adam_mini_partition("norm.weight", (0,), **kw) == Blocks("per_element", 0, 1)


def test_bad_head_config_raises_with_the_values_and_the_fix():
    # pitfall (b): the q/k tensor does not split into heads of dim*dim//n_heads elements
    with pytest.raises(ValueError) as info:
        adam_mini_partition("model.layers.0.self_attn.q_proj.weight", (64, 64), dim=48, n_heads=8)
    msg = str(info.value)
    for part in ("model.layers.0.self_attn.q_proj.weight", "(64, 64)", "dim=48", "n_heads=8", "real dim"):
        assert part in msg, (part, msg)
    # the official defaults (2048, 32) left in place for a small model
    with pytest.raises(ValueError, match=r"\(64, 64\).*n_heads"):
        adam_mini_partition("q_proj.weight", (64, 64), dim=2048, n_heads=32)
    # pitfall (c): checked at partition time, for every name, even when no q/k tensor exists
    with pytest.raises(ValueError, match=r"dim=12 is not divisible by n_heads=8.*real hidden size"):
        adam_mini_partition("norm.weight", (12,), dim=12, n_heads=8)
    with pytest.raises(ValueError, match=r"n_heads=8 is not divisible by n_kv_heads=3.*num_key_value_heads"):
        partition_model([("norm.weight", torch.zeros(8))], dim=64, n_heads=8, n_kv_heads=3)
    for bad in (dict(dim=0, n_heads=8), dict(dim=64, n_heads=-8), dict(dim=64.0, n_heads=8),
                dict(dim=64, n_heads=8, n_kv_heads=0), dict(dim=True, n_heads=1)):
        with pytest.raises(ValueError, match="positive int"):
            adam_mini_partition("norm.weight", (4,), **bad)


def test_weight_decay_exclusion():
    assert not weight_decay_applies("model.layers.0.input_layernorm.weight")
    assert not weight_decay_applies("model.norm.weight")
    assert not weight_decay_applies("transformer.h.0.ln_1.weight")
    assert not weight_decay_applies("transformer.ln_f.weight")
    assert not weight_decay_applies("transformer.h.0.mlp.c_fc.bias")
    assert not weight_decay_applies("Encoder.LayerNorm.Weight")  # lower-cased
    assert not weight_decay_applies("vuln_head.weight")  # substring semantics, kept on purpose
    assert weight_decay_applies("model.layers.0.self_attn.q_proj.weight")
    assert weight_decay_applies("transformer.wte.weight")
    assert weight_decay_applies("lm_head.weight")


def test_state_numel_totals():
    parts = partition_model(build_module(model_shapes(LLAMA_PARAMS)).named_parameters(), **LLAMA)
    total = sum(state_numel(parts[n], spec[0]) for n, spec in LLAMA_PARAMS.items())
    # embed 32 + q 8 + k 2 + v 16 + o 64 + gate 128 + up 128 + down 64 + 3 norms + lm_head 32
    assert total == 477
    parts = partition_model(build_module(model_shapes(GPT2_PARAMS)).named_parameters(), **GPT2)
    total = sum(state_numel(parts[n], spec[0]) for n, spec in GPT2_PARAMS.items())
    # wte 50 + wpe/ln_1/c_attn/c_proj/ln_2/ln_f 6 scalars + biases 32+96+32+32+128+32+32 + c_fc 32 + c_proj 128
    assert total == 50 + 6 + 384 + 32 + 128
    assert state_numel(Blocks("per_element", 12, 1), (3, 4)) == 12
    assert state_numel(Blocks("tensor", 1, 12), (3, 4)) == 1
    with pytest.raises(ValueError, match="12 elements"):
        state_numel(Blocks("rows", 3, 4), (3, 5))


def test_blocks_invariants():
    b = Blocks.for_shape("per_element", (3, 4))
    assert b == Blocks("per_element", 12, 1) and b.view_shape((3, 4)) == (12, 1) and b.view_shape((12,)) == (12, 1)
    assert Blocks.for_shape("rows", (3, 4, 5)).view_shape((3, 4, 5)) == (3, 20)
    assert Blocks.for_shape("tensor", (3, 4)).view_shape([3, 4]) == (1, 12)
    assert Blocks.for_shape("heads", (16, 64), head_numel=512).view_shape(torch.Size([16, 64])) == (2, 512)
    with pytest.raises(ValueError, match="cannot be split into heads"):
        Blocks.for_shape("heads", (10, 16), head_numel=128)
    with pytest.raises(ValueError, match="head_numel"):
        Blocks.for_shape("heads", (10, 16))
    with pytest.raises(ValueError, match="0-d"):
        Blocks.for_shape("rows", ())
    with pytest.raises(ValueError, match="kind"):
        Blocks("columns", 1, 1)
    with pytest.raises(ValueError, match="block_numel 1"):
        Blocks("per_element", 3, 2)
    with pytest.raises(ValueError, match="n_blocks 1"):
        Blocks("tensor", 2, 3)
    with pytest.raises(ValueError, match="non-negative int"):
        Blocks("rows", -1, 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        b.kind = "tensor"


def test_requires_grad_false_is_skipped_and_duplicates_rejected():
    module = build_module(model_shapes(LLAMA_PARAMS))
    module.model.embed_tokens.weight.requires_grad_(False)
    parts = partition_model(module.named_parameters(), **LLAMA)
    assert "model.embed_tokens.weight" not in parts and len(parts) == len(LLAMA_PARAMS) - 1
    p = nn.Parameter(torch.zeros(4))
    with pytest.raises(ValueError, match="appears twice"):
        partition_model([("norm.weight", p), ("norm.weight", p)], dim=8, n_heads=2)


def test_user_partition_overrides_the_rules():
    # The README's advice for short runs: one value for the whole Value tensor (wv_names = {}).
    def value_per_tensor(name, shape):
        if "v_proj" in name:
            return Blocks.for_shape("tensor", shape)
        return adam_mini_partition(name, shape, **LLAMA)

    module = build_module(model_shapes(LLAMA_PARAMS))
    parts = partition_model(module.named_parameters(), **LLAMA, partition=value_per_tensor)
    default = partition_model(module.named_parameters(), **LLAMA)
    v = "model.layers.0.self_attn.v_proj.weight"
    assert parts[v] == Blocks("tensor", 1, 1024) and default[v] == Blocks("rows", 16, 64)
    assert {n: b for n, b in parts.items() if n != v} == {n: b for n, b in default.items() if n != v}

    # the function sees every trainable parameter with its shape as a tuple; plain Adam everywhere
    seen = []
    adam = partition_model(module.named_parameters(), **LLAMA,
                           partition=lambda n, s: seen.append((n, s)) or Blocks.for_shape("per_element", s))
    assert seen == [(n, spec[0]) for n, spec in LLAMA_PARAMS.items()]
    assert all(b.kind == "per_element" for b in adam.values())

    with pytest.raises(ValueError, match="describes 8 elements instead of 2048"):
        partition_model(module.named_parameters(), **LLAMA, partition=lambda n, s: Blocks("rows", 2, 4))
    with pytest.raises(TypeError, match="not Blocks"):
        partition_model(module.named_parameters(), **LLAMA, partition=lambda n, s: ("rows", 2))


def test_summary_counts_and_warnings():
    parts = partition_model(build_module(model_shapes(LLAMA_PARAMS)).named_parameters(), **LLAMA)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a complete Llama layer: nothing to warn about
        text = summary(parts)
    assert "heads: 2 tensors, 10 second-moment values, 5120 elements" in text
    assert "rows: 7 tensors, 464 second-moment values" in text
    assert "tensor: 3 tensors, 3 second-moment values, 192 elements" in text
    assert "per_element" not in text
    assert text.splitlines()[-1].startswith("total: 12 tensors, 477 second-moment values")

    # GPT-2 names have no q/k keyword: exactly one warning, naming the component
    parts = partition_model(build_module(model_shapes(GPT2_PARAMS)).named_parameters(), **GPT2)
    with pytest.warns(UserWarning) as record:
        text = summary(parts)
    assert [str(w.message).split(" parameter")[0] for w in record] == ["no query/key"]
    assert len(str(record[0].message).splitlines()) == 1
    assert "per_element: 7 tensors, 384 second-moment values, 384 elements" in text

    # names alone decide, and biases do not count: three warnings
    parts = {"norm.weight": Blocks("tensor", 1, 4), "mlp.bias": Blocks("per_element", 4, 1)}
    with pytest.warns(UserWarning) as record:
        summary(parts)
    assert sorted(str(w.message).split(" parameter")[0] for w in record) == ["no MLP", "no embedding",
                                                                             "no query/key"]


# ---------------------------------------------------------------------------------------------------
# Against the official package (one CPU step of adam_mini.Adam_mini on the same tiny modules).


def official_step(shapes, *, wv_names=None, weight_decay=0.0, **cfg):
    """Run one official step with seeded gradients; returns (module, optimizer)."""
    module = build_module(shapes)
    opt = Adam_mini(named_parameters=module.named_parameters(), weight_decay=weight_decay, verbose=False, **cfg)
    if wv_names is not None:
        opt.wv_names = wv_names
    gen = torch.Generator().manual_seed(1)
    grads = {}
    for name, p in module.named_parameters():
        p.grad = torch.randn(p.shape, generator=gen)
        grads[name] = p.grad.clone()
    opt.step()
    return module, opt, grads


def official_layout(state, p) -> tuple[str, int, torch.Tensor]:
    """(kind, n_blocks, second moment as a flat tensor) from the official per-parameter state."""
    if "v" in state:  # bias branch: full per-element v
        assert state["v"].shape == p.shape
        return "per_element", p.numel(), state["v"].reshape(-1)
    vmean = state["vmean"]
    if "head_per_gpu" in state:
        assert vmean.shape == (state["head_per_gpu"], 1)
        return "heads", vmean.shape[0], vmean.reshape(-1)
    if "neuron_per_gpu" in state:
        assert vmean.shape == (state["neuron_per_gpu"], 1)
        return "rows", vmean.shape[0], vmean.reshape(-1)
    assert vmean.dim() == 0 and "block_numel" in state
    return "tensor", 1, vmean.reshape(-1)


def assert_matches_official(parts, module, opt, grads):
    for name, p in module.named_parameters():
        kind, n_blocks, v = official_layout(opt.state[p], p)
        ours = parts[name]
        assert (ours.kind, ours.n_blocks) == (kind, n_blocks), name
        assert state_numel(ours, p.shape) == v.numel(), name
        # same blocks, not only the same count: v after one step is (1 - beta2) * mean(g_b^2)
        expect = (1 - BETA2) * grads[name].reshape(ours.view_shape(p.shape)).square().mean(dim=1)
        torch.testing.assert_close(v, expect, rtol=1e-5, atol=0, msg=name)


@needs_official
@pytest.mark.parametrize("model", MODELS)
def test_official_package_gives_the_same_blocks(model):
    params, cfg = MODELS[model]
    shapes = model_shapes(params)
    module, opt, grads = official_step(shapes, **cfg)
    parts = partition_model(build_module(shapes).named_parameters(), **cfg)
    assert_matches_official(parts, module, opt, grads)


@needs_official
def test_official_package_with_value_per_tensor_matches_the_user_override():
    shapes = model_shapes(LLAMA_PARAMS)
    module, opt, grads = official_step(shapes, wv_names=set(), **LLAMA)

    def value_per_tensor(name, shape):
        if "v_proj" in name:
            return Blocks.for_shape("tensor", shape)
        return adam_mini_partition(name, shape, **LLAMA)

    parts = partition_model(build_module(shapes).named_parameters(), **LLAMA, partition=value_per_tensor)
    assert_matches_official(parts, module, opt, grads)


@needs_official
@pytest.mark.parametrize("model", MODELS)
def test_official_weight_decay_groups_match(model):
    params, cfg = MODELS[model]
    module = build_module(model_shapes(params))
    opt = Adam_mini(named_parameters=module.named_parameters(), weight_decay=0.1, verbose=False, **cfg)
    official = {group["name"]: group["weight_decay"] > 0 for group in opt.param_groups}
    assert official == {name.lower(): weight_decay_applies(name) for name in params}


@needs_official
def test_official_gqa_heads_and_head_numel():
    cfg = dict(dim=64, n_heads=8, n_kv_heads=2)
    opt = Adam_mini(named_parameters=build_module({"q_proj.weight": (64, 64)}).named_parameters(),
                    verbose=False, **cfg)
    assert opt.head_numel == 64 * 64 // 8 == adam_mini_partition("q_proj.weight", (64, 64), **cfg).block_numel


@needs_official
@pytest.mark.parametrize("name,shape,error,match", [
    # pitfall (a): 1-D tensor matching a row keyword (BERT's attention.output.LayerNorm)
    ("bert.encoder.layer.0.attention.output.LayerNorm.weight", (16,), IndexError, "too many indices"),
    # 1-D tensor matching a q/k keyword: the head view fails
    ("model.layers.0.self_attn.key_norm.weight", (8,), RuntimeError, "invalid for input of size 8"),
    # 0-d tensor matching a row keyword
    ("mlp.scale", (), IndexError, "no dimensions"),
    # pitfall (d): 3-D tensor in the per-row branch
    ("mlp.conv.weight", (4, 3, 2), RuntimeError, "invalid for input of size"),
])
def test_official_crashes_where_we_give_a_layout(name, shape, error, match):
    cfg = dict(dim=16, n_heads=2)
    with pytest.raises(error, match=match):
        official_step({name: shape}, **cfg)
    expected = Blocks("tensor", 1, math.prod(shape)) if len(shape) < 2 else Blocks("rows", shape[0], 6)
    assert adam_mini_partition(name, shape, **cfg) == expected


@needs_official
def test_official_head_config_errors_and_silent_cases():
    # pitfall (b): wrong dim; officially a bare view error inside the first step
    with pytest.raises(RuntimeError, match="invalid for input of size 4096"):
        official_step({"model.layers.0.self_attn.q_proj.weight": (64, 64)}, dim=48, n_heads=8)
    with pytest.raises(ValueError, match=r"\(64, 64\)"):
        adam_mini_partition("model.layers.0.self_attn.q_proj.weight", (64, 64), dim=48, n_heads=8)
    # pitfall (c): n_heads % n_kv_heads is a bare assert in the constructor
    with pytest.raises(AssertionError):
        Adam_mini(named_parameters=build_module({"w": (2,)}).named_parameters(),
                  dim=64, n_heads=8, n_kv_heads=3, verbose=False)
    # pitfall (c): only dim*dim % n_heads is checked, so dim=12, n_heads=8 (head_dim 1.5) runs with
    # 8 "heads" of 18 elements, which align with no head of the model; we refuse the config
    module, opt, _ = official_step({"q_proj.weight": (12, 12)}, dim=12, n_heads=8)
    assert opt.state[module.q_proj.weight]["vmean"].shape == (8, 1)
    with pytest.raises(ValueError, match="dim=12 is not divisible by n_heads=8"):
        adam_mini_partition("q_proj.weight", (12, 12), dim=12, n_heads=8)
