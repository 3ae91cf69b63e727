"""Named parameter lists, so that benchmark figures compare across runs and machines.

Each list is ``[(name, shape), ...]`` with the parameter names a Hugging Face checkpoint of the model
uses, in the model's order. Only trainable tensors the optimizer sees are listed: tied embeddings
mean there is no separate ``lm_head.weight``.

* ``llama1b``: Llama-3.2-1B-like. vocab 128256, hidden 2048, 16 layers, 32 heads, 8 kv heads
  (head_dim 64, so k_proj / v_proj have 512 rows), intermediate 8192, RMSNorm weights
  (input_layernorm, post_attention_layernorm, model.norm), no biases, tied embeddings.
  146 tensors, 1,235,814,400 parameters.
* ``gpt2``: GPT-2-124M. vocab 50257, context 1024, width 768, 12 layers, biases, LayerNorms,
  Conv1D weights stored (in, out) as in HF (``attn.c_attn.weight`` is 768 x 2304), tied lm_head.
  148 tensors, 124,439,808 parameters.
* ``tiny``: a handful of small tensors with awkward sizes (1 element, primes, 3-D), for ``--quick``.

:func:`count` and :func:`param_list` allocate nothing; :func:`materialize` makes real tensors.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

Shape = tuple[int, ...]
ParamList = list[tuple[str, Shape]]


def llama1b() -> ParamList:
    vocab, hidden, layers, heads, kv_heads, inter = 128256, 2048, 16, 32, 8, 8192
    head_dim = hidden // heads
    kv = kv_heads * head_dim  # 512
    out: ParamList = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        pre = f"model.layers.{i}."
        out += [
            (pre + "self_attn.q_proj.weight", (hidden, hidden)),  # nn.Linear: (out, in)
            (pre + "self_attn.k_proj.weight", (kv, hidden)),
            (pre + "self_attn.v_proj.weight", (kv, hidden)),
            (pre + "self_attn.o_proj.weight", (hidden, hidden)),
            (pre + "mlp.gate_proj.weight", (inter, hidden)),
            (pre + "mlp.up_proj.weight", (inter, hidden)),
            (pre + "mlp.down_proj.weight", (hidden, inter)),
            (pre + "input_layernorm.weight", (hidden,)),
            (pre + "post_attention_layernorm.weight", (hidden,)),
        ]
    out.append(("model.norm.weight", (hidden,)))
    return out


def gpt2() -> ParamList:
    vocab, ctx, d, layers = 50257, 1024, 768, 12
    out: ParamList = [("transformer.wte.weight", (vocab, d)), ("transformer.wpe.weight", (ctx, d))]
    for i in range(layers):
        pre = f"transformer.h.{i}."
        out += [
            (pre + "ln_1.weight", (d,)),
            (pre + "ln_1.bias", (d,)),
            (pre + "attn.c_attn.weight", (d, 3 * d)),  # Conv1D: (in, out)
            (pre + "attn.c_attn.bias", (3 * d,)),
            (pre + "attn.c_proj.weight", (d, d)),
            (pre + "attn.c_proj.bias", (d,)),
            (pre + "ln_2.weight", (d,)),
            (pre + "ln_2.bias", (d,)),
            (pre + "mlp.c_fc.weight", (d, 4 * d)),
            (pre + "mlp.c_fc.bias", (4 * d,)),
            (pre + "mlp.c_proj.weight", (4 * d, d)),
            (pre + "mlp.c_proj.bias", (d,)),
        ]
    out += [("transformer.ln_f.weight", (d,)), ("transformer.ln_f.bias", (d,))]
    return out


def tiny() -> ParamList:
    # sizes around the interpreter's 512-element chunk (511, 513), a single element, primes, 3-D
    return [
        ("embed.weight", (61, 32)),
        ("layers.0.attn.weight", (32, 32)),
        ("layers.0.attn.bias", (32,)),
        ("layers.0.mlp.weight", (67, 32)),
        ("layers.0.mlp.bias", (511,)),
        ("layers.0.norm.weight", (1,)),
        ("layers.0.conv.weight", (7, 13, 3)),
        ("head.bias", (513,)),
    ]


SHAPES: dict[str, Callable[[], ParamList]] = {"llama1b": llama1b, "gpt2": gpt2, "tiny": tiny}
# (width, attention heads, key/value heads) of each list, for rules that partition by head (Adam-mini)
ARCHITECTURES = {"llama1b": (2048, 32, 8), "gpt2": (768, 12, 12), "tiny": (32, 4, 4)}


def architecture(name: str, scale: float = 1.0) -> dict[str, int]:
    """``dim``, ``n_heads`` and ``n_kv_heads`` of a list, with the width divided as param_list divides it."""
    _check_name(name)
    dim, heads, kv_heads = ARCHITECTURES[name]
    return {"dim": _scaled((dim,), scale)[0], "n_heads": heads, "n_kv_heads": kv_heads}


def _check_name(name: str) -> None:
    if name not in SHAPES:
        raise ValueError(f"unknown parameter list {name!r}; valid: {', '.join(SHAPES)}")


def _scaled(shape: Shape, scale: float) -> Shape:
    if scale == 1.0:
        return shape
    return tuple(max(1, math.ceil(d / scale)) for d in shape)


def param_list(name: str, scale: float = 1.0) -> ParamList:
    """The named list; with ``scale`` > 1 every dimension is divided by it (rounded up)."""
    _check_name(name)
    if not scale >= 1.0:
        raise ValueError(f"scale divides every dimension and must be >= 1, got {scale!r}")
    return [(n, _scaled(s, scale)) for n, s in SHAPES[name]()]


def count(name: str, scale: float = 1.0) -> tuple[int, int]:
    """(total parameters, number of tensors) of a named list; allocates nothing."""
    plist = param_list(name, scale)
    return sum(math.prod(s) for _, s in plist), len(plist)


def materialize(name: str, device: torch.device | str, dtype: torch.dtype, scale: float = 1.0,
                seed: int = 0) -> list[tuple[str, torch.nn.Parameter]]:
    """Real parameters (normal, std 0.02) on ``device``; generated there, so llama1b needs no host copy."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    for pname, shape in param_list(name, scale):
        t = torch.randn(shape, device=device, dtype=torch.float32, generator=gen).mul_(0.02).to(dtype)
        out.append((pname, torch.nn.Parameter(t)))
    return out
