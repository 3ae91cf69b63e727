"""Block layouts for a per-block second moment, following Adam-mini.

Adam-mini (Zhang et al. 2024) keeps Adam's full-size first moment ``m`` but replaces the
per-element second moment ``v`` with one scalar per *block* of a parameter tensor; the block's ``v``
is an EMA of ``mean(g_b**2)`` over the block. Which block layout a tensor gets is decided by its
name. This module computes those layouts without touching any tensor data, so the kernels, the
memory accounting and the tests can share one description:

* :class:`Blocks`: how one tensor is split: ``kind``, ``n_blocks``, ``block_numel``, and the 2-D
  ``(n_blocks, block_numel)`` view that a per-block reduction runs over.
* :func:`adam_mini_partition`: the rules of the official implementation, v1.1.1
  (``adam_mini.Adam_mini``), with its pitfalls fixed (listed in the function's docstring).
* :func:`partition_model`: one :class:`Blocks` per trainable named parameter, with an optional
  user rule in place of the default.
* :func:`weight_decay_applies`: the official weight-decay exclusion by name.
* :func:`state_numel` and :func:`summary`: second-moment sizes and a per-kind count, with warnings
  for transformer components that were not found.

The module needs no torch: shapes are tuples of ints (``torch.Size`` works too) and a parameter
only has to expose ``.shape`` and ``.requires_grad``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "KINDS",
    "BIAS_NAMES",
    "QK_NAMES",
    "EMBED_NAMES",
    "OUTPUT_NAMES",
    "VALUE_NAMES",
    "MLP_NAMES",
    "ATTN_PROJ_NAMES",
    "ROW_RULES",
    "Blocks",
    "match_rule",
    "adam_mini_partition",
    "weight_decay_applies",
    "partition_model",
    "state_numel",
    "summary",
]

KINDS = ("per_element", "heads", "rows", "tensor")

# Keyword sets of the official v1.1.1 code (substring tests on the lower-cased parameter name).
BIAS_NAMES = frozenset({"bias"})
QK_NAMES = frozenset({"k_proj", "q_proj", "wq", "wk", "query", "key"})
EMBED_NAMES = frozenset({"embed", "embd", "wte"})
OUTPUT_NAMES = frozenset({"lm_head", "output", "final_layer"})
VALUE_NAMES = frozenset({"v_proj", "wv", "value"})
MLP_NAMES = frozenset({"feed_forward", "linear", "mlp"})
ATTN_PROJ_NAMES = frozenset({"o_proj", "wo", "attn.proj"})

# The row rules in the order the official code tests them. Order does not change the result (all of
# them give one block per row); it only decides which category :func:`match_rule` reports.
ROW_RULES: tuple[tuple[str, frozenset[str]], ...] = (
    ("embed", EMBED_NAMES),
    ("output", OUTPUT_NAMES),
    ("value", VALUE_NAMES),
    ("mlp", MLP_NAMES),
    ("attn_proj", ATTN_PROJ_NAMES),
)

# Names excluded from weight decay (official: "norm", "ln" or "bias" anywhere in the lower-cased name).
NO_DECAY_NAMES = ("norm", "ln", "bias")

Shape = Sequence[int]
PartitionFn = Callable[[str, tuple[int, ...]], "Blocks"]


def _shape(shape: Shape) -> tuple[int, ...]:
    try:
        out = tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(f"shape must be a sequence of ints (a tuple or torch.Size), got {shape!r}") from None
    if any(s < 0 for s in out):
        raise ValueError(f"shape {out} has a negative dimension")
    return out


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


@dataclass(frozen=True)
class Blocks:
    """How one parameter tensor is split into blocks that share one second-moment value.

    ``kind``:

    * ``"per_element"``: every element is its own block (plain Adam): ``n_blocks = numel``,
      ``block_numel = 1``.
    * ``"heads"``: the tensor is viewed as ``(numel // head_numel, head_numel)``; one block per row
      (one per attention head for q/k projections).
    * ``"rows"``: one block per index of dim 0: view ``(shape[0], numel // shape[0])``.
    * ``"tensor"``: one block for the whole tensor: ``n_blocks = 1``, ``block_numel = numel``.

    In every case ``n_blocks * block_numel == numel`` and the second moment holds ``n_blocks``
    values. :meth:`for_shape` builds one from a shape.
    """

    kind: str
    n_blocks: int
    block_numel: int

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Blocks.kind must be one of {KINDS}, got {self.kind!r}")
        for field in ("n_blocks", "block_numel"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"Blocks.{field} must be a non-negative int, got {value!r}")
        if self.kind == "per_element" and self.block_numel != 1:
            raise ValueError(f"per_element blocks have block_numel 1, got {self.block_numel}")
        if self.kind == "tensor" and self.n_blocks != 1:
            raise ValueError(f"a 'tensor' block layout has n_blocks 1, got {self.n_blocks}")

    @property
    def numel(self) -> int:
        """Number of elements of the tensor this layout describes."""
        return self.n_blocks * self.block_numel

    @classmethod
    def for_shape(cls, kind: str, shape: Shape, *, head_numel: int | None = None) -> Blocks:
        """The layout of ``kind`` for a tensor of ``shape``.

        ``head_numel`` is required for ``"heads"`` (and only used there); the tensor's numel must be
        a multiple of it. ``"rows"`` needs at least one dimension.
        """
        shape = _shape(shape)
        numel = _numel(shape)
        if kind == "per_element":
            return cls("per_element", numel, 1)
        if kind == "tensor":
            return cls("tensor", 1, numel)
        if kind == "rows":
            if not shape:
                raise ValueError("a 0-d tensor has no rows; use kind 'tensor' or 'per_element'")
            rows = shape[0]
            return cls("rows", rows, numel // rows if rows else _numel(shape[1:]))
        if kind == "heads":
            if head_numel is None or isinstance(head_numel, bool) or int(head_numel) != head_numel \
                    or head_numel <= 0:
                raise ValueError(f"kind 'heads' needs a positive int head_numel, got {head_numel!r}")
            head_numel = int(head_numel)
            if numel % head_numel:
                raise ValueError(f"a tensor of shape {shape} ({numel} elements) cannot be split into heads of "
                                 f"{head_numel} elements")
            return cls("heads", numel // head_numel, head_numel)
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")

    def view_shape(self, shape: Shape) -> tuple[int, int]:
        """The 2-D ``(n_blocks, block_numel)`` view of a tensor of ``shape`` (per_element:
        ``(numel, 1)``); a per-block reduction is a mean over dim 1 of this view.

        Raises ``ValueError`` when ``shape`` does not have this layout's number of elements.
        """
        shape = _shape(shape)
        numel = _numel(shape)
        if numel != self.numel:
            raise ValueError(f"{self} describes {self.numel} elements; shape {shape} has {numel}")
        return (self.n_blocks, self.block_numel)


def _has_any(name: str, keywords: Iterable[str]) -> bool:
    return any(k in name for k in keywords)


def match_rule(name: str) -> str:
    """The official rule a name selects, before any shape check: ``"bias"``, ``"qk"``, one of the
    row categories (``"embed"``, ``"output"``, ``"value"``, ``"mlp"``, ``"attn_proj"``), or
    ``"other"``. First match wins, on the lower-cased name."""
    lname = name.lower()
    if _has_any(lname, BIAS_NAMES):
        return "bias"
    if _has_any(lname, QK_NAMES):
        return "qk"
    for category, keywords in ROW_RULES:
        if _has_any(lname, keywords):
            return category
    return "other"


def _positive_int(what: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{what} must be a positive int, got {value!r}; pass the model config's value")
    return value


def _check_heads(dim: int, n_heads: int, n_kv_heads: int | None) -> tuple[int, int, int]:
    dim = _positive_int("dim", dim)
    n_heads = _positive_int("n_heads", n_heads)
    n_kv = n_heads if n_kv_heads is None else _positive_int("n_kv_heads", n_kv_heads)
    if dim % n_heads:
        raise ValueError(f"dim={dim} is not divisible by n_heads={n_heads}, so there is no integer head "
                         f"dimension; pass the model's real hidden size and number of attention heads "
                         f"(e.g. config.hidden_size and config.num_attention_heads)")
    if n_heads % n_kv:
        raise ValueError(f"n_heads={n_heads} is not divisible by n_kv_heads={n_kv}; pass the model's real "
                         f"number of key/value heads (e.g. config.num_key_value_heads), or None when "
                         f"it has no grouped-query attention")
    return dim, n_heads, n_kv


def adam_mini_partition(name: str, shape: Shape, *, dim: int, n_heads: int,
                        n_kv_heads: int | None = None) -> Blocks:
    """The Adam-mini block layout of parameter ``name`` with ``shape`` (official v1.1.1 rules).

    Rules, tested on the lower-cased name by substring, first match wins:

    1. ``"bias"`` -> ``per_element`` (plain Adam).
    2. q/k ``{"k_proj", "q_proj", "wq", "wk", "query", "key"}`` -> ``heads`` with
       ``head_numel = dim * dim // n_heads`` (= dim * head_dim), view ``(numel // head_numel,
       head_numel)``. Under grouped-query attention a ``k_proj`` of shape
       ``(n_kv_heads * head_dim, dim)`` therefore gets ``n_kv_heads`` blocks, and a fused
       ``query_key_value`` of shape ``(3 * dim, dim)`` gets ``3 * n_heads``.
    3. embedding ``{"embed", "embd", "wte"}``, output ``{"lm_head", "output", "final_layer"}``,
       value ``{"v_proj", "wv", "value"}``, MLP ``{"feed_forward", "linear", "mlp"}``, attention
       projection ``{"o_proj", "wo", "attn.proj"}`` -> ``rows``: one block per index of dim 0.
       That is one per output neuron for ``nn.Linear`` (``(out, in)``) and one per token for
       embeddings, but one per *input* feature for weights stored ``(in, out)`` such as HF GPT-2's
       ``Conv1D``.
    4. everything else (norm weights, GPT-2 ``wpe``, ``attn.c_attn``, ``attn.c_proj``) -> ``tensor``.

    Substring matching is kept as in the official code, coarse as it is: ``"key"``, ``"value"``,
    ``"linear"`` and ``"output"`` can hit unrelated names (BERT's ``attention.output.dense`` and
    ``output.dense`` get per-row blocks, which happens to be the intended rule). Pass a ``partition``
    function to :func:`partition_model` to change any of it.

    Differences from the official code (each a crash or a silent mistake there):

    a. Tensors with fewer than 2 dimensions never take the per-row or per-head rule: a 1-D or 0-d
       tensor goes to ``tensor`` (``per_element`` if its name contains "bias"). Officially a 1-D
       tensor whose name matches a row keyword crashes ("IndexError: too many indices for tensor of
       dimension 1"), e.g. BERT's ``attention.output.LayerNorm.weight`` or a flattened ZeRO-3 shard,
       and a 1-D q/k-named tensor such as ``key_norm.weight`` fails its head view.
    b. A q/k tensor whose numel is not a multiple of ``head_numel`` raises ``ValueError`` naming the
       parameter, its shape, ``dim`` and ``n_heads``. Officially it fails inside the first step
       with a bare view error, and when it happens to divide (a wrong ``dim``/``n_heads``, such as
       the defaults 2048/32 left in place) the head blocks are silently wrong. Always pass the
       model's real ``dim``/``n_heads``/``n_kv_heads``.
    c. ``dim % n_heads != 0`` and ``n_heads % n_kv_heads != 0`` raise ``ValueError`` with the values
       and the fix, here at partition time, for every name. Officially the first is an ``assert`` on
       ``dim * dim % n_heads`` (weaker) at the first step and the second an ``assert`` in the
       constructor; both vanish under ``python -O``.
    d. Row layouts of tensors with more than 2 dimensions view them as
       ``(shape[0], numel // shape[0])`` (officially such tensors crash in the per-row branch).
    e. Empty tensors (numel 0) get ``per_element`` with zero blocks: there is nothing to average, and
       a ``tensor`` block would divide by zero.
    """
    shape = _shape(shape)
    _, n_heads, _ = _check_heads(dim, n_heads, n_kv_heads)
    numel = _numel(shape)
    rule = match_rule(name)
    if rule == "bias" or numel == 0:
        return Blocks.for_shape("per_element", shape)
    if len(shape) < 2 or rule == "other":
        return Blocks.for_shape("tensor", shape)
    if rule == "qk":
        head_numel = dim * dim // n_heads
        if numel % head_numel:
            raise ValueError(
                f"parameter {name!r} of shape {shape} matches the query/key rule, but its {numel} elements "
                f"do not split into heads of dim*dim//n_heads = {dim}*{dim}//{n_heads} = {head_numel} "
                f"elements (dim={dim}, n_heads={n_heads}); pass the model's real dim (hidden size) and "
                f"n_heads (number of attention heads), or a partition function for this parameter")
        return Blocks.for_shape("heads", shape, head_numel=head_numel)
    return Blocks.for_shape("rows", shape)


def weight_decay_applies(name: str) -> bool:
    """Whether decoupled weight decay applies to ``name``: False when the lower-cased name contains
    "norm", "ln" or "bias" (the official exclusion). These are substring tests, kept as they are:
    "ln" matches GPT-2's "ln_1"/"ln_f" but also any other name with those two letters in a row
    (e.g. "vuln_head.weight"), so check the result for unusual names."""
    lname = name.lower()
    return not any(k in lname for k in NO_DECAY_NAMES)


def partition_model(named_parameters: Iterable[tuple[str, object]], *, dim: int, n_heads: int,
                    n_kv_heads: int | None = None,
                    partition: PartitionFn | None = None) -> dict[str, Blocks]:
    """One :class:`Blocks` per trainable parameter, keyed by its name (as given, not lower-cased).

    ``named_parameters`` is e.g. ``model.named_parameters()``; parameters with
    ``requires_grad=False`` are skipped. ``partition(name, shape) -> Blocks``, when given, decides
    every layout instead of :func:`adam_mini_partition` (``dim``/``n_heads``/``n_kv_heads`` are still
    validated). Each result must describe the tensor's number of elements. Nothing is printed; see
    :func:`summary`.
    """
    _check_heads(dim, n_heads, n_kv_heads)
    out: dict[str, Blocks] = {}
    for name, param in named_parameters:
        if not getattr(param, "requires_grad", True):
            continue
        if name in out:
            raise ValueError(f"parameter name {name!r} appears twice")
        shape = _shape(param.shape)
        if partition is None:
            blocks = adam_mini_partition(name, shape, dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads)
        else:
            blocks = partition(name, shape)
            if not isinstance(blocks, Blocks):
                raise TypeError(f"partition({name!r}, {shape}) returned {type(blocks).__name__}, not Blocks")
            if blocks.numel != _numel(shape):
                raise ValueError(f"partition({name!r}, {shape}) returned {blocks}, which describes "
                                 f"{blocks.numel} elements instead of {_numel(shape)}")
        out[name] = blocks
    return out


def state_numel(blocks: Blocks, shape: Shape) -> int:
    """Number of second-moment values for a tensor of ``shape`` with layout ``blocks``:
    ``per_element``: numel; ``heads``/``rows``: n_blocks; ``tensor``: 1. Bytes of state are this
    times the state dtype's size (plus the full-size first moment)."""
    blocks.view_shape(shape)  # checks that the layout fits the shape
    return blocks.n_blocks


# Components whose absence :func:`summary` warns about (name-based, like the official count).
_EXPECTED = (
    ("embed", "embedding", EMBED_NAMES),
    ("qk", "query/key", QK_NAMES),
    ("mlp", "MLP", MLP_NAMES),
)


def summary(partitions: Mapping[str, Blocks]) -> str:
    """A per-kind count of tensors, blocks and elements, one line per kind that occurs.

    Like the official optimizer's first-step check, warns (``warnings.warn``, one line each) when no
    embedding, no query/key or no MLP parameter was found. A parameter counts for a component when
    its lower-cased name contains one of that component's keywords and not "bias" (the official
    count goes by name, whatever layout the tensor finally got).
    """
    lines = []
    for kind in KINDS:
        layouts = [b for b in partitions.values() if b.kind == kind]
        if layouts:
            lines.append(f"{kind}: {len(layouts)} tensors, {sum(b.n_blocks for b in layouts)} second-moment "
                         f"values, {sum(b.numel for b in layouts)} elements")
    total = sum(b.numel for b in partitions.values())
    state = sum(b.n_blocks for b in partitions.values())
    lines.append(f"total: {len(partitions)} tensors, {state} second-moment values, {total} elements")
    names = [n.lower() for n in partitions if not _has_any(n.lower(), BIAS_NAMES)]
    for _, label, keywords in _EXPECTED:
        if not any(_has_any(n, keywords) for n in names):
            warnings.warn(f"no {label} parameter found (names containing any of {sorted(keywords)}); "
                          f"check the parameter names or pass a partition function", stacklevel=2)
    return "\n".join(lines)
