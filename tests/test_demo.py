import itertools
import json
import math
import struct

import pytest
import torch

from fusedopt import demo
from fusedopt.data import VOCAB_SIZE, Corpus, load_corpus
from fusedopt.demo_rules import RULES, builtin_rules, demo_rules
from fusedopt.models import LlamaConfig, LlamaForCausalLM, TinyMLP

TINY_PLAN = demo.Plan(LlamaConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                  intermediate_size=64, max_seq_len=32),
                      batch_size=8, seq_len=32, steps=40, eval_every=20, eval_batches=2,
                      corpus_bytes=64 * 1024)


@pytest.fixture(scope="module")
def corpus():
    return Corpus.build(TINY_PLAN.corpus_bytes)


# ---- data ---------------------------------------------------------------------------------------


def test_corpus_is_deterministic_and_split(corpus):
    again = Corpus.build(TINY_PLAN.corpus_bytes)
    assert torch.equal(corpus.train, again.train) and torch.equal(corpus.val, again.val)
    assert len(corpus.train) + len(corpus.val) == TINY_PLAN.corpus_bytes
    assert len(corpus.val) == TINY_PLAN.corpus_bytes - int(TINY_PLAN.corpus_bytes * 0.9)
    text, _ = load_corpus(TINY_PLAN.corpus_bytes)
    assert bytes(corpus.train.to(torch.uint8).tolist()) + bytes(corpus.val.to(torch.uint8).tolist()) == text
    assert corpus.train.dtype == torch.int64 and int(corpus.train.max()) < VOCAB_SIZE


def test_batches_are_seeded_windows_shifted_by_one(corpus):
    a = corpus.batches("train", 4, 16, seed=7)
    b = corpus.batches("train", 4, 16, seed=7)
    for _ in range(3):
        (xa, ya), (xb, yb) = next(a), next(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xa.shape == ya.shape == (4, 16)
        assert torch.equal(xa[:, 1:], ya[:, :-1])
    x_other, _ = next(corpus.batches("train", 4, 16, seed=8))
    assert not torch.equal(next(corpus.batches("train", 4, 16, seed=7))[0], x_other)
    with pytest.raises(ValueError, match="split"):
        corpus.batches("test", 4, 16, seed=0)


# ---- rules --------------------------------------------------------------------------------------


def test_every_builtin_rule_is_in_the_demo():
    assert set(builtin_rules()) <= set(demo_rules())
    assert {"adamw", "adam", "sgd", "lion"} <= set(RULES)


@pytest.mark.parametrize("name", sorted(demo_rules()))
def test_each_demo_rule_builds_and_steps(name):
    torch.manual_seed(0)
    model = TinyMLP()
    opt = demo_rules()[name].build(model)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(4, 8)).square().mean().backward()
    opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


# ---- training -----------------------------------------------------------------------------------


def test_adamw_loss_decreases(corpus):
    result = demo.train(RULES["adamw"], TINY_PLAN, corpus, torch.device("cpu"), compile=False)
    assert result.error is None and result.compiled == "eager"
    assert len(result.train_curve) == TINY_PLAN.steps and result.val_steps == [0, 20, 40]
    assert abs(result.train_curve[0] - math.log(VOCAB_SIZE)) < 0.2
    assert result.train_loss < result.train_curve[0] - 1.0
    assert result.val_curve[-1] < math.log(VOCAB_SIZE) - 1.0
    n = LlamaForCausalLM(TINY_PLAN.model).num_parameters()
    assert result.state_bytes == 8 * n + 4 * len(list(LlamaForCausalLM(TINY_PLAN.model).parameters()))
    assert result.bytes_per_param == pytest.approx(result.state_bytes / n)
    assert result.tokens_per_s > 0


def test_compile_failure_falls_back_with_one_line_note(monkeypatch, capsys):
    def broken_compile(fn, **kwargs):
        def fail(*args, **kw):
            raise RuntimeError("no compiler here\nsecond line")
        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    torch.manual_seed(0)
    model = LlamaForCausalLM(TINY_PLAN.model)
    opt = RULES["sgd"].build(model)
    step = demo.TrainStep(model, opt, compile=True)
    x = torch.randint(0, VOCAB_SIZE, (2, 9))
    losses = [step(x[:, :-1], x[:, 1:]).item() for _ in range(3)]
    assert step.mode == "eager"
    assert losses[2] < losses[0]
    notes = [line for line in capsys.readouterr().err.splitlines() if line]
    assert notes
    assert all(line.startswith("note: torch.compile of") and "no compiler here" in line for line in notes)
    assert not any("second line" in line for line in notes)


def test_lr_schedule():
    assert demo.lr_factor(1, 100) == pytest.approx(0.1)
    assert demo.lr_factor(10, 100) == pytest.approx(1.0)
    assert demo.lr_factor(100, 100) == pytest.approx(0.1)
    values = [demo.lr_factor(s, 100) for s in range(10, 101)]
    assert all(a >= b for a, b in itertools.pairwise(values))


# ---- the command line ---------------------------------------------------------------------------


@pytest.mark.parametrize("argv, expected", [
    (["--rules", "adamw,nope"], "valid: adamw, adam, sgd, lion"),
    (["--device", "tpu"], "choose from"),
    (["--steps", "0"], "positive integer"),
    (["--bogus"], "unrecognized arguments"),
])
def test_bad_options_give_one_line(argv, expected, capsys):
    with pytest.raises(SystemExit) as exc:
        demo.parse_args(argv, demo_rules())
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and expected in err


def test_quick_demo_writes_table_and_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert demo.main(["--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("rule "))
    for col in ("compiled", "train loss", "val loss", "tokens/s", "state", "B/param", "max RSS (process)"):
        assert col in lines[header]
    rows = {line.split()[0]: line.split() for line in lines[header + 2:header + 4]}
    assert set(rows) == set(demo.QUICK_RULES)
    results = {r["rule"]: r for r in json.loads((tmp_path / "results.json").read_text())["results"]}
    for name, r in results.items():
        assert r["error"] is None and math.isfinite(r["val_loss"]) and r["val_loss"] < math.log(VOCAB_SIZE)
        assert f"{r['bytes_per_param']:.2f}" in rows[name] and f"{r['val_loss']:.3f}" in rows[name]
    # two fp32 moments (AdamW), one momentum buffer (SGD), plus a 4-byte step counter per tensor
    assert results["adamw"]["bytes_per_param"] == pytest.approx(8.0, abs=0.01)
    assert results["sgd"]["bytes_per_param"] == pytest.approx(4.0, abs=0.01)
    png = tmp_path / "demo.png"
    assert str(png) in out
    head = png.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", head[16:24])
    assert (w, h) == (int(demo.FIGSIZE[0] * demo.DPI), int(demo.FIGSIZE[1] * demo.DPI))
