"""The benchmark suite runs end to end (``--quick``, on CPU here) and reports what it promises.

No timing is asserted: only that every expected row is there, that its numbers are finite and
positive, and that the bytes each rule must move are counted from the real tensors.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math

import pytest
import torch

from benchmarks import bench_step, harness, shapes

RULES = ("adamw", "adam", "sgd", "lion")
STATE_BYTES_PER_PARAM = {"adamw": 8.0, "adam": 8.0, "sgd": 4.0, "lion": 4.0}  # fp32 states


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_out")
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        result = bench_step.main(["--quick", "--rules", "adamw,adam,sgd,lion", "--out", str(out)])
    return result, stdout.getvalue(), stderr.getvalue()


def _expected_pairs(device_type: str) -> set[tuple[str, str]]:
    if device_type == "cuda":
        fused, torch_impls = ("fusedopt-triton",), ("torch-foreach", "torch-fused", "torch-compiled")
    else:
        fused, torch_impls = ("fusedopt-reference", "fusedopt-triton"), ("torch-foreach",)
    pairs = {(rule, impl) for rule in RULES for impl in fused}
    pairs |= {(rule, impl) for rule in ("adamw", "adam", "sgd") for impl in torch_impls}
    return pairs


def test_parameter_list_counts_match_the_architectures():
    assert shapes.count("llama1b") == (1_235_814_400, 146)
    assert shapes.count("gpt2") == (124_439_808, 148)


def test_parameter_lists_use_hf_names_and_tied_embeddings():
    llama = dict(shapes.param_list("llama1b"))
    assert llama["model.embed_tokens.weight"] == (128256, 2048)
    assert llama["model.layers.0.self_attn.k_proj.weight"] == (512, 2048)
    assert llama["model.layers.15.mlp.down_proj.weight"] == (2048, 8192)
    assert "model.norm.weight" in llama and "lm_head.weight" not in llama
    gpt = dict(shapes.param_list("gpt2"))
    assert gpt["transformer.h.0.attn.c_attn.weight"] == (768, 2304)
    assert gpt["transformer.h.11.mlp.c_fc.weight"] == (768, 3072)
    assert gpt["transformer.wpe.weight"] == (1024, 768)
    assert "transformer.ln_f.bias" in gpt and "lm_head.weight" not in gpt


def test_materialize_matches_the_count_at_any_scale():
    named = shapes.materialize("gpt2", "cpu", torch.bfloat16, scale=64)
    n_params, n_tensors = shapes.count("gpt2", scale=64)
    assert len(named) == n_tensors and sum(p.numel() for _, p in named) == n_params
    assert all(p.dtype == torch.bfloat16 and p.requires_grad for _, p in named)


def test_quick_run_reports_every_rule_and_implementation(quick_run):
    result, _, _ = quick_run
    device_type = result["meta"]["device_type"]
    rows = result["rows"]
    assert result["meta"]["failures"] == []
    pairs = [(r["rule"], r["impl"]) for r in rows]
    assert len(pairs) == len(set(pairs))
    assert set(pairs) == _expected_pairs(device_type)
    assert all(r["shapes"] == "tiny" and r["dtype"] == "fp32" for r in rows)


def test_quick_run_numbers_are_finite_and_positive(quick_run):
    result, _, _ = quick_run
    n_params, n_tensors = shapes.count("tiny")
    for r in result["rows"]:
        for key in ("ms_median", "ms_p20", "ms_p80", "first_step_s", "gbps", "copy_gbps", "copy_limit_ms",
                    "pct_copy_bw", "bytes_per_step"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["rule"], r["impl"], key, r[key])
        assert r["ms_p20"] <= r["ms_median"] <= r["ms_p80"]
        assert r["n_params"] == n_params and r["n_tensors"] == n_tensors
        # fp32: parameter read + written, gradient read, each state read + written (+ 0-d step counters)
        state = STATE_BYTES_PER_PARAM[r["rule"]]
        assert r["state_bytes_per_param"] == pytest.approx(state, abs=0.01)
        least = (3 * 4 + 2 * state) * n_params
        assert least <= r["bytes_per_step"] <= least + 16 * n_tensors


def test_fused_step_is_one_launch_per_step(quick_run):
    result, _, _ = quick_run
    for r in result["rows"]:
        if r["impl"] == "fusedopt-triton":
            assert r["launches_per_step"] == 1.0, r
        else:
            assert r["launches_per_step"] is None


def test_ratios_use_adamw_as_the_reference_for_lion(quick_run):
    result, _, _ = quick_run
    rows = result["rows"]
    torch_ms = {(r["rule"], r["impl"]): r["ms_median"] for r in rows if r["impl"].startswith("torch-")}
    for r in rows:
        baseline = "adamw" if r["rule"] == "lion" else r["rule"]
        assert r["baseline"] == baseline
        for impl in harness.TORCH_IMPLS:
            ratio = r["speedup_vs_" + impl.replace("-", "_")]
            if (baseline, impl) in torch_ms:
                assert ratio == pytest.approx(torch_ms[(baseline, impl)] / r["ms_median"])
            else:
                assert ratio is None


def test_quick_run_writes_table_csv_and_json(quick_run):
    result, stdout, stderr = quick_run
    rows = result["rows"]
    for r in rows:
        expected = [r["shapes"], r["dtype"], r["rule"], r["impl"]]
        assert any(line.split()[:4] == expected for line in stdout.splitlines())
    assert "torch.optim.AdamW" in stdout  # the note on Lion's reference
    assert f"[{len(rows)}/{len(rows)}]" in stderr  # progress goes to stderr

    with open(result["csv"], newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows)
    for c, r in zip(csv_rows, rows):
        assert (c["rule"], c["impl"]) == (r["rule"], r["impl"])
        assert c["device"] and c["torch"] == torch.__version__ and c["date"]
        assert float(c["ms_median"]) > 0 and math.isfinite(float(c["pct_copy_bw"]))

    with open(result["json"]) as f:
        data = json.load(f)
    for key in ("date", "device", "torch", "triton", "copy_gbps", "steps"):
        assert data["meta"][key], key
    assert [(d["rule"], d["impl"]) for d in data["rows"]] == [(r["rule"], r["impl"]) for r in rows]


@pytest.mark.parametrize("argv, bad, valid", [
    (["--rules", "adamw,adafactorr"], "adafactorr", "adamw, adam, sgd, lion"),
    (["--shapes", "llama70b"], "llama70b", "llama1b, gpt2, tiny"),
    (["--dtype", "fp16"], "fp16", "fp32, bf16"),
])
def test_unknown_choice_is_one_line_listing_valid_values(argv, bad, valid, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_step.parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and bad in err and valid in err


def test_a_failing_implementation_is_reported_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    make = bench_step._make_optimizer

    def broken(rule, impl, named, model):
        if rule == "adam":
            raise RuntimeError("deliberately broken")
        return make(rule, impl, named, model)

    monkeypatch.setattr(bench_step, "_make_optimizer", broken)
    argv = ["--quick", "--rules", "adam,sgd", "--impls", "torch-foreach", "--out", str(tmp_path)]
    result = bench_step.main(argv)
    assert [(r["rule"], r["impl"]) for r in result["rows"]] == [("sgd", "torch-foreach")]
    assert result["meta"]["failures"] == ["tiny fp32 adam torch-foreach: RuntimeError: deliberately broken"]
    assert "FAILED (no row): tiny fp32 adam torch-foreach" in capsys.readouterr().out
