"""Compile every built-in kernel for an H100 (sm_90) without a GPU; print PTX load/store widths.

Run in a subprocess without TRITON_INTERPRET (the interpreter's jit objects cannot be compiled).
Prints one JSON object: {kernel id: {"aligned": {...}, "unaligned": {...}}} with counts of vector
(v4) and scalar global loads and stores, or {"error": ...} if this Triton cannot target CUDA here.
"""

from __future__ import annotations

import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import triton  # noqa: E402

import fusedopt  # noqa: E402
from codegen import cache, launch  # noqa: E402
from fusedopt.dsl import absolute, amax, rule  # noqa: E402
from fusedopt.optimizers import adafactor, adam, adam_mini, adamw, lamb, lion, sgd  # noqa: E402

SIGNATURE = launch.KERNEL_SIGNATURE
PROGRAMS = {"adam-amsgrad": adam.program(amsgrad=True), "adamw": adamw.program(), "lion": lion.program(),
            "sgd-nesterov": sgd.program(with_momentum=True, nesterov=True)}


def widths(ptx: str) -> dict[str, int]:
    return {"v4_loads": len(re.findall(r"ld\.global(?:\.\w+)*\.v4", ptx)),
            "v4_stores": len(re.findall(r"st\.global(?:\.\w+)*\.v4", ptx)), "barriers": _barriers(ptx)}


def _barriers(ptx: str) -> int:
    return len(re.findall(r"\bbar\.sync\b", ptx))


def main() -> None:
    from triton.backends.compiler import GPUTarget

    cfg = launch.config_for("cuda")
    out = {}
    for name, program in PROGRAMS.items():
        for dtype in (torch.float32, torch.bfloat16):
            source = fusedopt.kernel_source(program, dtype, target="cuda")
            fn = cache.load(source, torch.device("cpu")).fused_step
            entry = {}
            for aligned in (True, False):
                src = triton.compiler.ASTSource(fn=fn, signature=SIGNATURE, constexprs=launch.constexprs(cfg, aligned))
                kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32))
                entry["aligned" if aligned else "unaligned"] = widths(kernel.asm["ptx"])
            out[f"{name}-{str(dtype).split('.')[1]}"] = entry
    # quantized moments: how the codes are stored (vectors in the unmasked body, bytes in the tail)
    for fmt in ("q8", "q4"):
        source = fusedopt.kernel_source(adamw.program(state_dtype=fmt), torch.float32, target="cuda")
        src = triton.compiler.ASTSource(fn=cache.load(source, torch.device("cpu")).fused_step, signature=SIGNATURE,
                                        constexprs=launch.constexprs(cfg, True))
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
        out[f"adamw-{fmt}-float32"] = {kind: len(re.findall(rf"st\.global\.{kind}\s", ptx))
                                      for kind in ("b8", "b16", "v2.b32", "b32", "v4.b32")}
        out[f"adamw-{fmt}-float32"]["barriers"] = _barriers(ptx)
    # rules with reductions (float64 atomic sums and maxima): every phase kernel compiles too
    compiled = {}
    # ... the q8 requantization and stochastic rounding helpers, and per-row (column, block) values
    others = {"lamb_clip": lamb.program(clip=True), "max_scaled": max_scaled.program(),
              "adamw_q8_sr": adamw.program(state_dtype="q8", stochastic_rounding=True),
              "adamw_sr_fp16": adamw.program(stochastic_rounding=True),
              "adafactor_factored": adafactor.program(matrix=True), "adam_mini": adam_mini.program(),
              "adafactor_hf_bf16_rows": adafactor.program(matrix=True, hf=True, state_dtype="bf16"),
              "adamw_q8_skip_nonfinite": adamw.program(state_dtype="q8", skip_nonfinite="group")}
    for name, program in others.items():
        dtype = torch.float16 if name.endswith("fp16") else torch.bfloat16 if program.stochastic_rounding \
            else torch.float32
        module = cache.load(fusedopt.kernel_source(program, dtype, target="cuda"), torch.device("cpu"))
        names = [n for n in dir(module) if n.startswith("reduce_phase_")] + ["fused_step"]
        for n in names:
            src = triton.compiler.ASTSource(fn=getattr(module, n), signature=SIGNATURE,
                                            constexprs=launch.constexprs(cfg, True))
            triton.compile(src, target=GPUTarget("cuda", 90, 32))
        compiled[f"{name}_kernels_compiled"] = sorted(names)
    # every phase in one kernel, for tensors whose blocks fit a program's chunk
    import dataclasses

    from codegen import ops

    spec = dataclasses.replace(ops.kernel_spec(adam_mini.program(), torch.float32, torch.float32, "cuda"),
                               single_pass=True)
    module = cache.load(ops.source(spec), torch.device("cpu"))
    triton.compile(triton.compiler.ASTSource(fn=module.fused_step, signature=SIGNATURE,
                                              constexprs=launch.constexprs(cfg, True)),
        target=GPUTarget("cuda", 90, 32))
    compiled["adam_mini_single_pass_kernels_compiled"] = sorted(n for n in dir(module) if n.startswith(("reduce", "fused")))
    # MicroAdam's kernel, generated from its rule (dtype codes read at run time), at its default block sizes
    from codegen import window_ops, window_template
    from fusedopt import dsl
    from fusedopt.optimizers import microadam

    window_signature = {"tensors": "*i64", "hparams": "*i64", "group": "*i64", "block_tensor": "*i32",
                        "block_index": "*i32", "block_count": "*i32", "done": "*i32", "scratch": "*fp32",
                        "BLOCK": "constexpr", "KMAX": "constexpr", "ALIGNED": "constexpr"}
    variants = []
    # every step option: clipping factor, non-finite flag, stochastic rounding, master weights
    with_options = microadam.program(clip="scale", skip_nonfinite="flag", stochastic_rounding=True, master_weights=True)
    for window_dtype, base in (("fp32", microadam.program()), ("bf16", microadam.program()), ("bf16-options", with_options)):
        program = dsl.configure_states(base, {"window": {"dtype": window_dtype.split("-")[0]}})
        module = cache.load(window_ops.source(window_template.WindowKernelSpec(program, "cuda")), torch.device("cpu"))
        for aligned in (True, False):
            triton.compile(triton.compiler.ASTSource(fn=module.window_step, signature=window_signature,
                                                     constexprs=dict(BLOCK=4096, KMAX=64, ALIGNED=aligned)),
                           target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8, enable_fp_fusion=False))
            variants.append(f"window-{window_dtype}-aligned{int(aligned)}")
    compiled["microadam_variants_compiled"] = variants
    print(json.dumps({"kernels": out, **compiled}))


@rule("max_scaled")
def max_scaled(p, g, t, lr=0.1):
    p.set(p - lr * g / (amax(absolute(g), over="group") + amax(absolute(p), over="tensor") + 1.0))


if __name__ == "__main__":
    try:
        main()
    except Exception as exc:  # report, so that the test can tell a missing toolchain from a bug
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
