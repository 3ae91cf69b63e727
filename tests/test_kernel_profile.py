"""benchmarks.kernel_profile compiles generated kernels for sm_90 without a GPU and counts their
instructions by kind; the counts are read from the disassembly, never asserted as performance."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_profile_table_has_a_row_per_rule_with_counts():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT
    run = subprocess.run([sys.executable, "-m", "benchmarks.kernel_profile", "--rules", "adamw,adamw8bit"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if run.returncode != 0 and any(w in run.stderr for w in ("ptxas", "nvdisasm", "No such file", "backend")):
        pytest.skip(f"this Triton cannot compile for CUDA here: {run.stderr[-300:]}")
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    header = [c.strip() for c in lines[1].strip("|").split("|")]
    rows = {}
    for line in lines[3:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells))
    assert set(rows) == {"adamw", "adamw8bit"}
    for row in rows.values():
        assert int(row["instructions"]) > int(row["global loads"]) > 0 and int(row["global stores"]) > 0
        assert "LDG" in row["by width"] and "STG" in row["by width"]
        assert int(row["registers"]) > 0 and int(row["stack"]) >= 0 and int(row["local"]) >= 0
    # the 8-bit moments read their maps and bucket tables: more loads than the fp32 moments
    assert int(rows["adamw8bit"]["global loads"]) > int(rows["adamw"]["global loads"])


def test_unknown_rule_is_refused():
    run = subprocess.run([sys.executable, "-m", "benchmarks.kernel_profile", "--rules", "adamw9bit"], cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "unknown rule(s) ['adamw9bit']" in run.stderr
