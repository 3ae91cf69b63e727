"""The README's examples run as written and their rules train without producing NaN."""

from __future__ import annotations

import contextlib
import io
import os
import re

import torch

import fusedopt
from fusedopt.dsl import Rule

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_readme_examples_run_and_their_rules_step():
    blocks = re.findall(r"```python\n(.*?)```", open(README).read(), re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    with contextlib.redirect_stdout(io.StringIO()) as out:
        for block in blocks:
            exec(compile(block, README, "exec"), namespace)
    assert "def fused_step" in out.getvalue()  # the first example prints its kernel
    rules = [r for r in namespace.values() if isinstance(r, Rule)]
    assert len(rules) >= 3
    for r in rules:
        params = [torch.randn(4, 3, requires_grad=True), torch.randn(5, requires_grad=True)]
        before = [p.detach().clone() for p in params]
        front_end = fusedopt.WindowOptimizer if r.program().window is not None else fusedopt.FusedOptimizer
        opt = front_end(params, r)
        for _ in range(2):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
        assert all(torch.isfinite(p).all() and not torch.equal(p, b) for p, b in zip(params, before)), r.name
