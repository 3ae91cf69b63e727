import math

import pytest
import torch

from fusedopt.models import LlamaConfig, LlamaForCausalLM, TinyMLP

SMALL = LlamaConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=48, max_seq_len=16)


def test_parameter_names_follow_hugging_face_llama():
    model = LlamaForCausalLM(SMALL)
    names = {n for n, _ in model.named_parameters()}
    per_layer = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                 "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                 "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight"]
    expected = {"model.embed_tokens.weight", "model.norm.weight"}
    expected |= {f"model.layers.{i}.{n}" for i in range(SMALL.num_layers) for n in per_layer}
    assert names == expected  # lm_head.weight is the embedding, listed once under its first name
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "lm_head.weight" in dict(model.named_parameters(remove_duplicate=False))


def test_shapes_and_parameter_count():
    cfg = SMALL
    model = LlamaForCausalLM(cfg)
    p = dict(model.named_parameters())
    hd = cfg.hidden_size // cfg.num_heads
    assert p["model.layers.0.self_attn.q_proj.weight"].shape == (cfg.num_heads * hd, cfg.hidden_size)
    assert p["model.layers.0.self_attn.k_proj.weight"].shape == (cfg.num_kv_heads * hd, cfg.hidden_size)
    assert p["model.layers.0.mlp.down_proj.weight"].shape == (cfg.hidden_size, cfg.intermediate_size)
    d, i, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_kv_heads * hd
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * i + 2 * d
    assert model.num_parameters() == cfg.vocab_size * d + cfg.num_layers * per_layer + d
    assert model.num_parameters() == sum(t.numel() for t in p.values())


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_forward_is_causal_and_starts_near_uniform(positions):
    torch.manual_seed(0)
    cfg = LlamaConfig(**{**SMALL.__dict__, "positions": positions})
    model = LlamaForCausalLM(cfg)
    x = torch.randint(0, cfg.vocab_size, (3, cfg.max_seq_len))
    logits = model(x)
    assert logits.shape == (3, cfg.max_seq_len, cfg.vocab_size)
    changed = x.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % cfg.vocab_size
    torch.testing.assert_close(model(changed)[:, :10], logits[:, :10])  # the future is not seen
    assert not torch.allclose(model(changed)[:, 10:], logits[:, 10:])
    loss = model.loss(x[:, :-1], x[:, 1:])
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.1  # small init: close to uniform


def test_positions_matter():
    torch.manual_seed(0)
    model = LlamaForCausalLM(SMALL)
    x = torch.randint(0, SMALL.vocab_size, (1, 8))
    swapped = x[:, [1, 0, 2, 3, 4, 5, 6, 7]]
    # token 2 sees the same multiset of tokens; only the positions of 0 and 1 differ
    assert not torch.allclose(model(x)[:, 2], model(swapped)[:, 2])


def test_gradients_reach_every_parameter():
    model = LlamaForCausalLM(SMALL)
    x = torch.randint(0, SMALL.vocab_size, (2, 9))
    model.loss(x[:, :-1], x[:, 1:]).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="num_kv_heads"):
        LlamaConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="num_heads"):
        LlamaConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="positions"):
        LlamaConfig(positions="alibi")
    with pytest.raises(ValueError, match="max_seq_len"):
        LlamaForCausalLM(SMALL)(torch.zeros(1, SMALL.max_seq_len + 1, dtype=torch.long))


def test_tiny_mlp():
    model = TinyMLP(8, 16, 4)
    assert [n for n, _ in model.named_parameters()] == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert model(torch.randn(5, 8)).shape == (5, 4)


def test_adam_mini_partition_applies():
    from fusedopt.partition import partition_model

    cfg = SMALL
    model = LlamaForCausalLM(cfg)
    parts = partition_model(model.named_parameters(), dim=cfg.hidden_size, n_heads=cfg.num_heads,
                            n_kv_heads=cfg.num_kv_heads)
    kinds = {name.split(".", 3)[-1] if name.startswith("model.layers.") else name: b.kind
             for name, b in parts.items()}
    assert kinds == {
        "model.embed_tokens.weight": "rows",
        "self_attn.q_proj.weight": "heads",
        "self_attn.k_proj.weight": "heads",
        "self_attn.v_proj.weight": "rows",
        "self_attn.o_proj.weight": "rows",
        "mlp.gate_proj.weight": "rows",
        "mlp.up_proj.weight": "rows",
        "mlp.down_proj.weight": "rows",
        "input_layernorm.weight": "tensor",
        "post_attention_layernorm.weight": "tensor",
        "model.norm.weight": "tensor",
    }
    q = parts["model.layers.0.self_attn.q_proj.weight"]
    k = parts["model.layers.0.self_attn.k_proj.weight"]
    assert (q.n_blocks, k.n_blocks) == (cfg.num_heads, cfg.num_kv_heads)  # one block per head
