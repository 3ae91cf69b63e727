"""A byte-level corpus that every machine has, with no download: Python's own standard library.

The text is the source of the top-level modules of the running interpreter's standard library
(``Lib/*.py``), read in sorted file order up to a fixed byte budget, so a given Python version always
yields the same bytes. Where the sources are not installed (some minimal distributions ship only
bytecode), the help topics of ``pydoc_data`` are used instead. Tokens are bytes: a vocabulary of 256.
"""

from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass

import torch

VOCAB_SIZE = 256
DEFAULT_BUDGET = 2 * 1024 * 1024
MIN_BYTES = 64 * 1024


def stdlib_files() -> list[str]:
    """The standard library's top-level ``*.py`` files, sorted by name."""
    root = sysconfig.get_paths()["stdlib"]
    try:
        names = sorted(n for n in os.listdir(root) if n.endswith(".py"))
    except OSError:
        return []
    return [os.path.join(root, n) for n in names]


def _pydoc_topics() -> bytes:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")


def load_corpus(budget: int = DEFAULT_BUDGET) -> tuple[bytes, str]:
    """Up to ``budget`` bytes of text and a one-line description of where they came from."""
    if budget < 2:
        raise ValueError(f"budget must be at least 2 bytes, got {budget}")
    chunks, total, used = [], 0, 0
    for path in stdlib_files():
        if total >= budget:
            break
        try:
            with open(path, "rb") as f:
                data = f.read(budget - total)
        except OSError:
            continue
        chunks.append(data)
        total += len(data)
        used += 1
    if total >= min(budget, MIN_BYTES):
        return b"".join(chunks), f"{used} stdlib source files of Python {sysconfig.get_python_version()}"
    text = _pydoc_topics()[:budget]
    return text, f"pydoc help topics of Python {sysconfig.get_python_version()}"


@dataclass
class Corpus:
    """Token ids (one per byte) split into a training and a validation part."""

    train: torch.Tensor
    val: torch.Tensor
    source: str

    @classmethod
    def build(cls, budget: int = DEFAULT_BUDGET, val_fraction: float = 0.1) -> Corpus:
        """The first ``1 - val_fraction`` of the corpus trains, the rest validates (no shuffling)."""
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        text, source = load_corpus(budget)
        ids = torch.frombuffer(bytearray(text), dtype=torch.uint8).to(torch.int64)
        cut = int(len(ids) * (1.0 - val_fraction))
        return cls(train=ids[:cut], val=ids[cut:], source=source)

    def batches(self, split: str, batch_size: int, seq_len: int, seed: int) -> Batches:
        """An endless, seeded stream of random windows of ``split`` ("train" or "val")."""
        if split not in ("train", "val"):
            raise ValueError(f"split={split!r} is not one of ['train', 'val']")
        return Batches(self.train if split == "train" else self.val, batch_size, seq_len, seed)


class Batches:
    """Random windows ``(x, y)`` of shape (batch_size, seq_len), y being x shifted by one token.

    The same seed gives the same windows on every machine (a CPU torch.Generator picks the offsets).
    """

    def __init__(self, ids: torch.Tensor, batch_size: int, seq_len: int, seed: int):
        if len(ids) < seq_len + 2:
            raise ValueError(f"the split has {len(ids)} tokens, fewer than seq_len + 2 = {seq_len + 2}")
        self.ids = ids
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        high = len(self.ids) - self.seq_len - 1
        starts = torch.randint(0, high, (self.batch_size,), generator=self.generator)
        window = starts[:, None] + torch.arange(self.seq_len + 1)
        chunk = self.ids[window]
        return chunk[:, :-1], chunk[:, 1:]
