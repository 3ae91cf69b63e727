"""The Triton printer, kernel template and kernel cache: text, determinism, keys, files."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest
import sympy
import torch

import fusedopt
from codegen import cache, ops
from codegen.printer import TritonPrinter
from fusedopt.optimizers import adam, adamw, lion, sgd

x, y, lr = sympy.symbols("x y lr")


@pytest.mark.parametrize("expr,element,scalar", [
    (x + y, "(v_x + v_y)", "(s_x + s_y)"),
    (x * y, "(v_x * v_y)", "(s_x * s_y)"),
    (x / y, "tl.div_rn(v_x, v_y)", "(s_x / s_y)"),
    (sympy.sqrt(x), "tl.sqrt_rn(v_x)", "libdevice.sqrt(s_x)"),
    (x**2, "(v_x * v_x)", "(s_x * s_x)"),
    (-x, "(-v_x)", "(-s_x)"),
    (sympy.Rational(1, 2) * x, "(tl.full([], 0.5, tl.float32) * v_x)", "(0.5 * s_x)"),
    (lr**x, "real_power(v_lr, v_x)", "libdevice.pow(s_lr, s_x)"),
    (2**x, "tl.exp2(v_x * tl.log2(tl.full([], 2.0, tl.float32)))", "libdevice.pow(2.0, s_x)"),
    (x**5, "(v_x * tl.exp2(tl.full([], 4.0, tl.float32) * tl.log2(tl.abs(v_x))))", "libdevice.pow(s_x, 5.0)"),
    (x**6, "tl.exp2(tl.full([], 6.0, tl.float32) * tl.log2(tl.abs(v_x)))", "libdevice.pow(s_x, 6.0)"),
    (x**sympy.Rational(3, 2), "tl.exp2(tl.full([], 1.5, tl.float32) * tl.log2(v_x))", "libdevice.pow(s_x, 1.5)"),
    (sympy.Abs(x), "tl.abs(v_x)", "tl.abs(s_x)"),
    (sympy.Max(x, y), "tl.maximum(v_x, v_y, propagate_nan=tl.PropagateNan.ALL)",
     "tl.maximum(s_x, s_y, propagate_nan=tl.PropagateNan.ALL)"),
    (sympy.Piecewise((x, y > 0), (y, True)), "tl.where((v_y > tl.full([], 0.0, tl.float32)), v_x, v_y)",
     "tl.where((s_y > 0.0), s_x, s_y)"),
])
def test_printer_emits_one_rule_per_node(expr, element, scalar):
    assert TritonPrinter("element", "cuda")(expr) == element
    assert TritonPrinter("scalar", "cuda")(expr) == scalar


def test_element_constants_are_float32_and_scalars_float64():
    text = TritonPrinter("element", "cuda")(x * 3 + 1)
    assert "tl.full([], 3.0, tl.float32)" in text and "tl.full([], 1.0, tl.float32)" in text
    assert TritonPrinter("scalar", "cuda")(x * 3) == "(3.0 * s_x)"


def test_unsupported_node_names_the_node():
    with pytest.raises(NotImplementedError, match="sin"):
        TritonPrinter("element", "cuda")(sympy.sin(x))


def test_interpreter_target_needs_no_libdevice():
    text = TritonPrinter("scalar", "interpreter")(sympy.sqrt(lr**x))
    assert "libdevice" not in text and text == "tl.sqrt(real_power(s_lr, s_x))"


PROGRAMS = [adam.program(), adam.program(amsgrad=True), adamw.program(maximize=True), lion.program(),
            sgd.program(with_momentum=True, nesterov=True), sgd.program()]


@pytest.mark.parametrize("target", ["cuda", "interpreter"])
@pytest.mark.parametrize("program", PROGRAMS, ids=lambda p: p.name + str(p.options))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_kernel_module_parses_and_carries_alignment_hints(target, program, dtype):
    text = fusedopt.kernel_source(program, dtype, target=target)
    ast.parse(text)
    assert text.count("tl.multiple_of(") >= 3  # param, grad and the chunk start at least
    assert "@triton.jit" in text and "def fused_step(" in text


def test_kernel_text_does_not_depend_on_shapes_or_tensor_count():
    big = fusedopt.AdamW([torch.zeros(1000, requires_grad=True), torch.zeros(3, requires_grad=True)])
    small = fusedopt.AdamW([torch.zeros(1, requires_grad=True)])
    assert fusedopt.kernel_source(big, target="interpreter") == fusedopt.kernel_source(small, target="interpreter")


def test_kernel_source_accepts_optimizer_rule_and_program_alike():
    opt = fusedopt.Adam([torch.zeros(4, requires_grad=True)], amsgrad=True)
    assert fusedopt.kernel_source(opt) == fusedopt.kernel_source(adam, amsgrad=True) \
        == fusedopt.kernel_source(adam.program(amsgrad=True))
    with pytest.raises(TypeError, match="kernel_source takes"):
        fusedopt.kernel_source("adam")


def test_kernel_source_of_an_optimizer_is_what_its_first_parameter_runs():
    """The parameter's dtype and its storage after quant_threshold, not float32 and the group's
    state_dtype."""
    half = fusedopt.AdamW([torch.zeros(64, 80, dtype=torch.bfloat16, requires_grad=True)], state_dtype="q4",
                          stochastic_rounding=True)
    program = adamw.program(state_dtype="q4", stochastic_rounding=True)
    assert fusedopt.kernel_source(half) == fusedopt.kernel_source(program, torch.bfloat16) \
        != fusedopt.kernel_source(program, torch.float32)
    small = fusedopt.AdamW8bit([torch.zeros(100, requires_grad=True)])  # under quant_threshold: float32 states
    assert fusedopt.kernel_source(small) == fusedopt.kernel_source(adamw.program())
    for bad in ("bf16", torch.float64):
        with pytest.raises(ValueError, match="has no fused kernel; pass one of"):
            fusedopt.kernel_source(adamw, bad)


def test_kernel_text_is_identical_across_processes():
    code = ("import fusedopt, torch; from fusedopt.optimizers import adamw;"
            "print(fusedopt.kernel_source(adamw, torch.bfloat16, amsgrad=True))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    outs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": root}
        outs.append(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                   check=True).stdout)
    assert outs[0] == outs[1] and "def fused_step" in outs[0]


def test_cache_key_same_rule_same_file_and_dtype_changes_key(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSEDOPT_CACHE_DIR", str(tmp_path / "cache"))
    cpu = torch.device("cpu")
    a = fusedopt.kernel_source(adamw, torch.float32, target="interpreter")
    b = fusedopt.kernel_source(adamw, torch.float32, target="interpreter")
    c = fusedopt.kernel_source(adamw, torch.bfloat16, target="interpreter")
    assert cache.cache_key(a, cpu) == cache.cache_key(b, cpu) != cache.cache_key(c, cpu)
    assert cache.module_path(cache.cache_key(a, cpu)) == cache.module_path(cache.cache_key(b, cpu))


def test_kernel_files_are_written_imported_and_dumped(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSEDOPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FUSEDOPT_DUMP_DIR", str(tmp_path / "dump"))
    source = fusedopt.kernel_source(lion, torch.float16, target="interpreter") + "# test-only variant\n"
    module = cache.load(source, torch.device("cpu"))
    key = cache.cache_key(source, torch.device("cpu"))
    path = cache.module_path(key)
    assert path.read_text() == source and module.__file__ == str(path)
    assert (tmp_path / "dump" / f"{key}.py").read_text() == source
    assert cache.load(source, torch.device("cpu")) is module
    assert not list(path.parent.glob(".tmp-*"))  # the atomic write left no temporary behind


def test_hoisted_scalars_are_computed_once_per_program_not_per_element():
    text = fusedopt.kernel_source(adamw, target="cuda")
    loop = text.split("for i in range(ITERS):")[1].split("# the last program")[0]
    assert "libdevice.pow" not in loop and "s_" not in loop.replace("ptr_", "")
    assert "libdevice.pow(s_beta1, s_t)" in text.split("for i in range(ITERS):")[0]


def test_registered_program_keys_are_stable():
    assert ops.register(adamw.program()) == ops.register(adamw.program())
    assert ops.register(adamw.program()) != ops.register(adamw.program(amsgrad=True))
