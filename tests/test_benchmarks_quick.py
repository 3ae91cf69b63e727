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
import sys
import types

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


# ---- peer implementations ------------------------------------------------------------------------

PEER_MODULES = ("bitsandbytes", "torchao", "ista_daslab_optimizers")


def _hide_peer_packages(monkeypatch):
    """Make every peer package fail to import, whether or not it is installed on this machine."""
    for name in PEER_MODULES:
        monkeypatch.setitem(sys.modules, name, None)


def _stand_in_modules(monkeypatch, dotted: str, **classes):
    """Put a module ``dotted`` (and empty parents) holding ``classes`` into sys.modules."""
    parts = dotted.split(".")
    for i in range(1, len(parts) + 1):
        module = types.ModuleType(".".join(parts[:i]))
        monkeypatch.setitem(sys.modules, module.__name__, module)
        if i > 1:
            setattr(sys.modules[".".join(parts[:i - 1])], parts[i - 1], module)
    for name, cls in classes.items():
        setattr(sys.modules[dotted], name, cls)


def _recording_adamw(extra: tuple[str, ...], calls: list):
    """torch.optim.AdamW that also accepts the peer-only keywords ``extra`` and records every
    keyword argument it was built with."""
    class Recording(torch.optim.AdamW):
        def __init__(self, params, **kwargs):
            calls.append(dict(kwargs))
            super().__init__(params, **{k: v for k, v in kwargs.items() if k not in extra})
    return Recording


def test_a_missing_peer_is_a_note_and_the_run_goes_on(tmp_path, monkeypatch):
    """A peer named in --impls whose package does not import gives one line on stderr and one under
    the table; the other rows are measured and the run counts no failure."""
    _hide_peer_packages(monkeypatch)
    stdout, stderr = io.StringIO(), io.StringIO()
    argv = ["--quick", "--rules", "adamw", "--impls", "peer-bnb,peer-torchao,torch-foreach",
            "--out", str(tmp_path)]
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        result = bench_step.main(argv)
    assert [(r["rule"], r["impl"]) for r in result["rows"]] == [("adamw", "torch-foreach")]
    assert result["meta"]["failures"] == []
    skipped = result["meta"]["skipped"]
    assert len(skipped) == 2
    assert skipped[0].startswith("peer-bnb: bitsandbytes is not importable")
    assert skipped[1].startswith("peer-torchao: torchao is not importable")
    for note in skipped:
        assert sum(line == f"skipped: {note}" for line in stderr.getvalue().splitlines()) == 1
        assert f"skipped (no row): {note}" in stdout.getvalue().splitlines()


def test_default_impls_take_the_peers_that_import_on_cuda_only(monkeypatch):
    _hide_peer_packages(monkeypatch)
    _stand_in_modules(monkeypatch, "bitsandbytes.optim", AdamW8bit=torch.optim.AdamW)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert bench_step.parse_args([]).impl_names == [
        "fusedopt-triton", "torch-foreach", "torch-fused", "torch-compiled", "peer-bnb"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not any(impl.startswith("peer-") for impl in bench_step.parse_args([]).impl_names)


def test_peer_rows_through_stand_in_modules(tmp_path, monkeypatch):
    """The wiring of peer rows, with stand-ins: neither bitsandbytes, torchao nor
    ista-daslab-optimizers is used here. The stand-in classes are torch.optim.AdamW (and SGD for
    MicroAdam) that record their keyword arguments, so this says nothing about those packages'
    speed or numerics. It checks that a peer row is planned only for the rules its module has a
    class for (the others are one note per peer), that the class gets the fusedopt row's
    hyperparameters under the peer's names, that the row has every column of the other rows with
    ratios against torch and state bytes counted from the stand-in's state tensors, that torchao's
    older module layout is found, and that a peer whose step writes into p.grad gets a fresh copy
    of the gradients at every step."""
    _hide_peer_packages(monkeypatch)
    bnb_calls, ao_calls, micro_calls, grads_intact = [], [], [], []

    class WritesIntoGrad(torch.optim.SGD):
        def __init__(self, params, m, lr, quant_block_size, k_init, betas, eps, weight_decay):
            micro_calls.append(dict(m=m, lr=lr, quant_block_size=quant_block_size, k_init=k_init,
                                    betas=betas, eps=eps, weight_decay=weight_decay))
            super().__init__(params, lr=lr)

        def step(self, closure=None):
            super().step(closure)
            for group in self.param_groups:
                for p in group["params"]:
                    grads_intact.append(bool(torch.isfinite(p.grad).all()))
                    p.grad.fill_(float("nan"))  # as the official MicroAdam, which leaves its update there

    _stand_in_modules(monkeypatch, "bitsandbytes.optim",
                      AdamW8bit=_recording_adamw(("min_8bit_size",), bnb_calls))
    # only the older layout, and without AdamW4bit
    _stand_in_modules(monkeypatch, "torchao.prototype.low_bit_optim",
                      AdamW8bit=_recording_adamw(("block_size",), ao_calls))
    _stand_in_modules(monkeypatch, "ista_daslab_optimizers", MicroAdam=WritesIntoGrad)

    stdout, stderr = io.StringIO(), io.StringIO()
    argv = ["--quick", "--rules", "adamw8bit,adamw4bit,microadam",
            "--impls", "peer-bnb,peer-torchao,peer-official,torch-foreach", "--out", str(tmp_path)]
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        result = bench_step.main(argv)

    rows = {(r["rule"], r["impl"]): r for r in result["rows"]}
    assert result["meta"]["failures"] == []
    assert set(rows) == {("adamw", "torch-foreach"), ("adamw8bit", "peer-bnb"), ("adamw8bit", "peer-torchao"),
                         ("microadam", "peer-official")}
    assert result["meta"]["skipped"] == [
        "peer-bnb: bitsandbytes has no counterpart for adamw4bit, microadam; no rows for them",
        "peer-torchao: torchao has no counterpart for adamw4bit (AdamW4bit is not in "
        "torchao.prototype.low_bit_optim), microadam; no rows for them",
        "peer-official: ista-daslab-optimizers has no counterpart for adamw8bit, adamw4bit; no rows for them",
    ]

    adamw = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    assert bnb_calls == [dict(adamw, min_8bit_size=4096)]
    assert ao_calls == [dict(adamw, block_size=256)]
    assert micro_calls == [dict(m=10, lr=1e-4, quant_block_size=2048, k_init=0.01, betas=(0.9, 0.999),
                                eps=1e-8, weight_decay=0.0)]
    assert grads_intact and all(grads_intact)

    torch_row = rows[("adamw", "torch-foreach")]
    n_params = shapes.count("tiny")[0]
    for key in (("adamw8bit", "peer-bnb"), ("adamw8bit", "peer-torchao"), ("microadam", "peer-official")):
        r = rows[key]
        assert set(r) == set(torch_row)
        assert r["baseline"] == "adamw" and r["launches_per_step"] is None
        assert r["speedup_vs_torch_foreach"] == pytest.approx(torch_row["ms_median"] / r["ms_median"])
        for column in ("ms_median", "gbps", "pct_copy_bw", "bytes_per_step"):
            assert math.isfinite(r[column]) and r[column] > 0, (key, column)
        table = stdout.getvalue().splitlines()
        assert any(line.split()[:4] == ["tiny", "fp32", key[0], key[1]] for line in table)
    for key in (("adamw8bit", "peer-bnb"), ("adamw8bit", "peer-torchao")):
        # the stand-in's two float32 moments (its 0-d step counters are on the same device here)
        assert rows[key]["state_bytes_per_param"] == pytest.approx(8.0, abs=0.01)
        assert rows[key]["bytes_per_step"] >= (3 * 4 + 2 * 8) * n_params
        assert rows[key]["grads"] == "fixed"
    assert rows[("microadam", "peer-official")]["state_bytes_per_param"] == 0.0  # SGD without momentum
    assert rows[("microadam", "peer-official")]["grads"] == "fresh"


class _Packed(torch.Tensor):
    """A wrapper subclass that presents a float32 tensor and holds uint8 codes and float32 scales,
    the layout of torchao's quantized optimizer states."""

    @staticmethod
    def __new__(cls, codes, scale):
        return torch.Tensor._make_wrapper_subclass(cls, codes.shape, dtype=torch.float32, device=codes.device)

    def __init__(self, codes, scale):
        self.codes, self.scale = codes, scale

    def __tensor_flatten__(self):
        return ["codes", "scale"], None

    @staticmethod
    def __tensor_unflatten__(inner, ctx, outer_size, outer_stride):
        return _Packed(inner["codes"], inner["scale"])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(f"_Packed does not compute ({func})")


def test_state_bytes_count_wrapped_tensors_and_shared_tensors_once():
    """bytes_per_step counts what a wrapper subclass holds, not the float32 shape it shows, and a
    tensor in several parameters' states (bitsandbytes' quantization maps) once."""
    p1, p2 = torch.zeros(1024), torch.zeros(512)
    p1.grad, p2.grad = torch.zeros(1024), torch.zeros(512)
    qmap = torch.zeros(256)
    packed = _Packed(torch.zeros(1024, dtype=torch.uint8), torch.zeros(4))
    state = {p1: {"m": packed, "qmap": qmap}, p2: {"m": torch.zeros(512), "qmap": qmap}}
    opt = types.SimpleNamespace(param_groups=[{"params": [p1, p2]}], state=state)
    traffic = harness.bytes_per_step(opt)
    state = (1024 + 4 * 4) + 512 * 4 + 256 * 4
    assert traffic.state_bytes == state
    assert traffic.bytes_per_step == 3 * 4 * (1024 + 512) + 2 * state


def test_ring_states_are_read_whole_and_one_row_written():
    """A peer's window of m rows (the official MicroAdam's I and V) moves as fusedopt's does."""
    p = torch.zeros(1000)
    p.grad = torch.zeros(1000)
    window = {"I": torch.zeros(10, 20, dtype=torch.int16), "V": torch.zeros(10, 20, dtype=torch.bfloat16)}
    opt = types.SimpleNamespace(param_groups=[{"params": [p]}], state={p: {**window, "e": torch.zeros(500, dtype=torch.uint8)}})
    traffic = harness.bytes_per_step(opt, {"I": 10, "V": 10})
    assert traffic.bytes_per_step == 3 * 4000 + 2 * (400 + 40) + 2 * 500
    assert harness.bytes_per_step(opt).bytes_per_step == 3 * 4000 + 2 * 800 + 2 * 500
    assert traffic.state_bytes == 800 + 500


def test_a_run_cut_short_keeps_the_rows_it_measured(tmp_path, monkeypatch):
    """Rows are saved as they are measured: a time limit that stops the run keeps them on disk."""
    real = bench_step.measure
    calls = []

    def stop_after_two(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the run stops here, as when a timeout kills the process
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(bench_step, "measure", stop_after_two)
    with pytest.raises(KeyboardInterrupt), contextlib.redirect_stderr(io.StringIO()):
        bench_step.main(["--quick", "--rules", "adamw", "--impls", "fusedopt-reference,torch-foreach,fusedopt-triton",
                         "--out", str(tmp_path)])
    [saved] = tmp_path.glob("*.csv")
    with open(saved) as f:
        rows = list(csv.DictReader(f))
    assert [r["impl"] for r in rows] == ["fusedopt-reference", "torch-foreach"]
