"""The Triton block top-k kernel (codegen/topk.py) against its oracle, fusedopt.sparse.block_topk.

Runs in the Triton interpreter without a GPU (tests/conftest.py sets TRITON_INTERPRET=1), on the GPU
when there is one. Values are compared bit for bit, so NaN, infinities and signed zeros count.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from codegen.topk import block_topk
from fusedopt import sparse

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
SPECIAL = [0.0, -0.0, 0.5, -0.5, 1.0, -1.0, 3.0, -3.0, float("inf"), float("-inf"), float("nan"), 1e-40]


def check_against_oracle(a: torch.Tensor, block: int, density: float) -> None:
    index, value = block_topk(a.to(DEVICE), block, density)
    ref_index, ref_value = sparse.block_topk(a, block, density)
    assert index.dtype == torch.int16 and value.dtype == a.dtype
    assert index.cpu().tolist() == ref_index.tolist()
    bits = BITS[a.dtype]
    assert torch.equal(value.cpu().view(bits), ref_value.view(bits))


@st.composite
def cases(draw):
    block = draw(st.sampled_from([1, 2, 3, 7, 64, 100, 257, 1000, 4096]))
    numel = draw(st.integers(1, 3 * block + 5))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    density = draw(st.sampled_from([0.001, 0.01, 0.05, 0.3, 0.5, 1.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    if draw(st.booleans()):  # mostly ties, with the special values mixed in
        pool = torch.tensor(SPECIAL[: draw(st.integers(2, len(SPECIAL)))])
        a = pool[torch.randint(len(pool), (numel,), generator=gen)]
    else:
        a = torch.randn(numel, generator=gen) * 10.0 ** draw(st.integers(-30, 30))
    return a.to(dtype), block, density


@given(cases())
def test_kernel_matches_oracle(case):
    """Odd sizes below, at and above the block, one to a few blocks plus a tail, three dtypes."""
    check_against_oracle(*case)


@pytest.mark.parametrize("numel", [1, 4095, 4096, 4097, 3 * 4096 + 1001])
def test_kernel_matches_oracle_default_block(numel):
    gen = torch.Generator().manual_seed(numel)
    a = torch.randn(numel, generator=gen)
    check_against_oracle(a, 4096, 0.01)
    check_against_oracle((a * 2).round(), 4096, 0.01)  # few levels: the threshold falls inside a tie


def test_ties_go_to_the_lower_index():
    """The property fails for a tie rule other than the documented one: ties to the higher index
    would return [2, 3] here."""
    index, value = block_topk(torch.tensor([2.0, -2.0, 2.0, -2.0, 1.0], device=DEVICE), 5, 0.4)
    assert index.cpu().tolist() == [0, 1]
    assert value.cpu().tolist() == [2.0, -2.0]


def test_float64_is_refused():
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        block_topk(torch.zeros(4, dtype=torch.float64), 4, 0.5)
