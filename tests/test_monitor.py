import struct

import pytest
import torch

import fusedopt
from fusedopt.models import TinyMLP
from fusedopt.monitor import METRICS, OptimizerMonitor, state_bytes


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(32, 8, generator=g), torch.randn(32, 4, generator=g)


def _loss(model, x, y):
    return ((model(x) - y) ** 2).mean()


def _optimizers(model):
    fc1, fc2 = list(model.fc1.parameters()), list(model.fc2.parameters())
    return {
        "torch.AdamW, 2 groups": torch.optim.AdamW([{"params": fc1}, {"params": fc2, "lr": 3e-3}], lr=1e-2),
        "torch.SGD": torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        "fusedopt.AdamW": fusedopt.AdamW(model.parameters(), lr=1e-2),
        "fusedopt.Lion, 2 groups": fusedopt.Lion([{"params": fc1}, {"params": fc2, "weight_decay": 0.5}],
                                                 lr=1e-3),
    }


@pytest.mark.parametrize("which", ["torch.AdamW, 2 groups", "torch.SGD", "fusedopt.AdamW",
                                   "fusedopt.Lion, 2 groups"])
def test_norms_equal_independent_computation(which):
    torch.manual_seed(0)
    model = TinyMLP()
    opt = _optimizers(model)[which]
    monitor = OptimizerMonitor(opt, model, flush_every=3)
    x, y = _data()
    expected = []
    for _ in range(7):
        before = [[p.detach().clone() for p in g["params"]] for g in opt.param_groups]
        _loss(model, x, y).backward()
        opt.step()
        rows = []
        for group, old in zip(opt.param_groups, before):
            # float64, one concatenated vector per group: a different computation from the monitor's
            grad = torch.cat([p.grad.double().flatten() for p in group["params"]])
            upd = torch.cat([(p.detach().double() - o.double()).flatten()
                             for p, o in zip(group["params"], old)])
            par = torch.cat([p.detach().double().flatten() for p in group["params"]])
            rows.append([grad.norm(), upd.norm(), par.norm(), upd.norm() / par.norm()])
        expected.append(rows)
        monitor.record()
        opt.zero_grad()
    hist = monitor.history()
    assert monitor.steps == 7
    want = torch.tensor(expected, dtype=torch.float64)  # (steps, groups, metrics)
    for i, m in enumerate(METRICS):
        assert hist[m].shape == (7, len(opt.param_groups))
        torch.testing.assert_close(hist[m].double(), want[:, :, i], rtol=1e-5, atol=1e-8)
    assert (hist["update_norm"] > 0).all()


def test_state_bytes_equal_independent_count():
    torch.manual_seed(0)
    model = TinyMLP()
    n = sum(p.numel() for p in model.parameters())
    x, y = _data()
    for which, opt in _optimizers(model).items():
        monitor = OptimizerMonitor(opt, model)
        _loss(model, x, y).backward()
        opt.step()
        opt.zero_grad()
        expected = {}
        for st in opt.state.values():
            for key, t in st.items():
                if isinstance(t, torch.Tensor):
                    k = (key, str(t.dtype).split(".")[-1])
                    expected[k] = expected.get(k, 0) + t.numel() * t.element_size()
        assert monitor.state_bytes() == expected == state_bytes(opt), which
        assert monitor.state_bytes_total() == sum(expected.values())
        assert monitor.state_bytes_per_param() == pytest.approx(sum(expected.values()) / n)
        assert sum(monitor.state_bytes_by_param().values()) == sum(expected.values())
        assert set(monitor.state_bytes_by_param()) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}


def test_state_bytes_of_known_rules():
    model = TinyMLP()
    n = sum(p.numel() for p in model.parameters())
    x, y = _data()
    cases = [(fusedopt.AdamW(model.parameters()), 8), (fusedopt.AdamW(model.parameters(), amsgrad=True), 12),
             (fusedopt.SGD(model.parameters(), momentum=0.9), 4), (fusedopt.Lion(model.parameters()), 4)]
    for opt, per_param in cases:
        _loss(model, x, y).backward()
        opt.step()
        opt.zero_grad()
        got = state_bytes(opt)
        assert got.pop(("step", "float32")) == 4 * 4  # one 0-d float32 counter per tensor
        assert sum(got.values()) == per_param * n


def test_state_bytes_counts_nested_and_shared_tensors_once():
    p = torch.nn.Parameter(torch.zeros(10))
    opt = torch.optim.SGD([p], lr=0.1)
    shared = torch.zeros(3, dtype=torch.float64)
    opt.state[p] = {"a": shared, "b": shared, "q": (torch.zeros(4, dtype=torch.uint8), {"s": torch.zeros(2)}),
                    "n": 3.0}
    # "b" is the tensor "a" holds: counted once; the float "n" holds no memory of its own
    assert state_bytes(opt) == {("a", "float64"): 24, ("q[0]", "uint8"): 4, ("q[1].s", "float32"): 8}


def test_record_does_not_synchronise(monkeypatch):
    torch.manual_seed(0)
    model = TinyMLP()
    opt = fusedopt.AdamW(model.parameters(), lr=1e-2)
    monitor = OptimizerMonitor(opt, model, flush_every=1000)
    x, y = _data()

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation inside record()")

    for _ in range(3):
        _loss(model, x, y).backward()
        opt.step()
        with monkeypatch.context() as m:
            for name in ("item", "cpu", "tolist", "numpy", "__float__", "__bool__", "__int__"):
                m.setattr(torch.Tensor, name, forbidden)
            monitor.record()
        opt.zero_grad()
    assert len(monitor.history()["grad_norm"]) == 3  # flushing (one .cpu()) is allowed, outside record()


def test_flush_every_n_records():
    model = TinyMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = OptimizerMonitor(opt, flush_every=4)
    x, y = _data()
    for i in range(1, 10):
        _loss(model, x, y).backward()
        opt.step()
        monitor.record()
        opt.zero_grad()
        assert len(monitor._pending) == i % 4
        assert len(monitor._rows) == i - i % 4


def test_measure_traces_into_a_fullgraph_compiled_step():
    torch.manual_seed(0)
    model = TinyMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = OptimizerMonitor(opt, model)
    eager_model = TinyMLP()
    eager_model.load_state_dict(model.state_dict())
    eager_opt = torch.optim.SGD(eager_model.parameters(), lr=0.1)
    eager_monitor = OptimizerMonitor(eager_opt, eager_model)
    measure = torch.compile(monitor.measure, fullgraph=True, backend="eager")  # dynamo: no graph breaks
    x, y = _data()
    for _ in range(3):
        runs = ((model, opt, monitor, measure), (eager_model, eager_opt, eager_monitor, None))
        for mdl, o, mon, fn in runs:
            _loss(mdl, x, y).backward()
            o.step()
            mon.record(fn() if fn else None)
            o.zero_grad()
    for m in METRICS:
        torch.testing.assert_close(monitor.history()[m], eager_monitor.history()[m])


def test_report_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    torch.manual_seed(0)
    model = TinyMLP()
    opt = fusedopt.AdamW(model.parameters(), lr=1e-2)
    monitor = OptimizerMonitor(opt, model)
    x, y = _data()
    for _ in range(5):
        _loss(model, x, y).backward()
        opt.step()
        monitor.record()
        opt.zero_grad()
    text = monitor.report()
    assert "5 step(s) recorded" in text
    last = monitor.history()["grad_norm"][-1, 0].item()
    assert f"{last:.4g}" in text
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert key in text
    n = sum(p.numel() for p in model.parameters())
    total = monitor.state_bytes_total()
    assert f"{total:,} B" in text and f"{total / n:.3f} B/param" in text
    path = monitor.plot(str(tmp_path / "monitor.png"))
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", head[16:24]) == (1500, 800)


def test_rejects_non_optimizers():
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        OptimizerMonitor(object())
    with pytest.raises(ValueError, match="flush_every"):
        OptimizerMonitor(torch.optim.SGD(TinyMLP().parameters(), lr=0.1), flush_every=0)


def test_exported():
    assert fusedopt.OptimizerMonitor is OptimizerMonitor


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_norms_of_other_dtypes(dtype):
    torch.manual_seed(0)
    model = TinyMLP().to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = OptimizerMonitor(opt)
    x, y = (t.to(dtype) for t in _data())
    before = [p.detach().double().clone() for p in model.parameters()]
    _loss(model, x, y).backward()
    opt.step()
    monitor.record()
    grad = torch.cat([p.grad.double().flatten() for p in model.parameters()]).norm()
    upd = torch.cat([(p.detach().double() - b).flatten() for p, b in zip(model.parameters(), before)]).norm()
    hist = monitor.history()
    assert hist["grad_norm"].dtype == torch.float32
    torch.testing.assert_close(hist["grad_norm"][0, 0].double(), grad, rtol=1e-5, atol=0)
    torch.testing.assert_close(hist["update_norm"][0, 0].double(), upd, rtol=1e-5, atol=0)
