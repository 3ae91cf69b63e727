"""The requantizing kernels divide each block by its scale with one reciprocal per block and an fma
correction per element (codegen.template._OVER_SCALE). That is only right if it returns the IEEE
quotient x / scale wherever a code can tell: here the emitted helper itself runs over every positive
finite bfloat16 scale, against torch's division, on values that land on and next to the midpoints
of the q8 and q4 maps (where a quotient one unit off would change a code), and a helper without the
correction is shown to fail the same check."""

from __future__ import annotations

import pytest
import torch

from codegen import cache, template
from fusedopt import quant
from kernel_check import KERNEL_DEVICES, require_kernel_device

COLS = 64  # values per scale
# every positive finite bfloat16, as a scale: 0x0001 (2^-133) .. 0x7F7F (3.39e38), padded to 2^15 rows
SCALES = torch.arange(1, 0x7F80, dtype=torch.int32)
ROWS = 1 << 15

_KERNEL = """

@triton.jit
def over_scale_kernel(x_ptr, s_ptr, out_ptr, ROWS: tl.constexpr, COLS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    at = rows[:, None] * COLS + tl.arange(0, COLS)[None, :]
    tl.store(out_ptr + at, _over_scale(tl.load(x_ptr + at), tl.load(s_ptr + rows)))
"""


def _module(helper: str, device: torch.device):
    return cache.load("import triton\nimport triton.language as tl\n" + helper + _KERNEL, device)


def _cases(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, scale): per scale, random |x| <= scale, +-scale itself, and x = scale * midpoint rounded,
    with its float32 neighbours, for midpoints of all four maps."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.ones(ROWS, dtype=torch.float32)
    scale[: SCALES.numel()] = (SCALES << 16).view(torch.float32)
    mids = torch.cat([quant.midpoints(quant.Q8.code(s)) for s in (True, False)]
                     + [quant.midpoints(quant.Q4.code(s)) for s in (True, False)]).to(torch.float32)
    pick = mids[torch.randint(0, mids.numel(), (ROWS, COLS // 2), generator=gen)]
    near = (pick * scale[:, None]).to(torch.float32)
    step = torch.randint(-1, 2, near.shape, generator=gen).to(torch.float32)  # -1, 0, +1 units
    near = torch.where(step > 0, torch.nextafter(near, torch.full_like(near, float("inf"))),
                       torch.where(step < 0, torch.nextafter(near, torch.zeros_like(near)), near))
    uniform = (torch.rand(ROWS, COLS // 2 - 2, generator=gen) * 2 - 1) * scale[:, None]
    x = torch.cat([near, uniform, scale[:, None], -scale[:, None]], dim=1).contiguous()
    return x, scale


def _mismatches(helper: str, device: str, seed: int) -> tuple[int, int]:
    """(quotients that differ from x / scale where |x / scale| >= 2^-100, values compared)."""
    x, scale = _cases(seed)
    out = torch.empty_like(x)
    module = _module(helper, torch.device(device))
    xd, sd, od = x.to(device), scale.to(device), out.to(device)
    per_program = 1024 if device == "cpu" else 16  # the interpreter runs programs one after another
    module.over_scale_kernel[(ROWS // per_program,)](xd, sd, od, ROWS=per_program, COLS=COLS)
    got = od.cpu()
    exact = x / scale[:, None]
    seen = exact.abs() >= 2.0**-100
    return int((got != exact)[seen].sum()), int(seen.sum())


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_block_quotient_is_the_ieee_quotient_for_every_bf16_scale(device):
    require_kernel_device(device)
    bad, compared = _mismatches(template._OVER_SCALE, device, seed=0)
    assert compared > 0.99 * ROWS * COLS
    assert bad == 0, f"{bad} of {compared} quotients differ from x / scale"


def test_a_quotient_without_the_correction_is_caught():
    """The check can fail: x * (1 / scale) alone is off by one unit for a fraction of the values."""
    require_kernel_device("cpu")
    wrong = template._OVER_SCALE.replace("return tl.fma(tl.fma(-q, s, xs), r, q)", "return q")
    assert wrong != template._OVER_SCALE
    bad, compared = _mismatches(wrong, "cpu", seed=0)
    assert bad > 0.01 * compared
