"""Static profile of generated kernels: compile them for an H100 (sm_90) on any machine, GPU or not,
and count the machine instructions of each kind in the disassembly.

This is not a timing. It shows what a kernel asks of the memory system per loop iteration (global
loads and stores and their widths, shared-memory traffic, barriers), how much float64 work it
does and how many registers (and local-memory stack bytes) a thread needs, which bounds how many
warps an SM keeps in flight, so that a change to the code generator can be compared before and after
without a GPU. The loop body appears twice (unmasked and masked copies), so counts are per kernel,
not per element. Kernels are compiled with the options of the real launch (codegen.launch: its
BLOCK, ITERS and num_warps, no fp fusion).

    python3 -m benchmarks.kernel_profile                       # the default rules, fp32 parameters
    python3 -m benchmarks.kernel_profile --rules adamw8bit,adamw4bit --dtype bf16
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # the interpreter's jit objects cannot be compiled

import torch  # noqa: E402
import triton  # noqa: E402

import fusedopt  # noqa: E402
from codegen import cache, launch  # noqa: E402
from fusedopt.optimizers import adamw, lion, sgd  # noqa: E402

PROGRAMS = {
    "adamw": lambda: adamw.program(),
    "adamw-bf16state": lambda: adamw.program(state_dtype="bf16"),
    "adamw8bit": lambda: adamw.program(state_dtype="q8"),
    "adamw4bit": lambda: adamw.program(state_dtype="q4"),
    "lion": lambda: lion.program(),
    "sgd-momentum": lambda: sgd.program(with_momentum=True),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# instruction classes: (column, SASS opcode prefixes)
CLASSES = (("global loads", ("LDG",)), ("global stores", ("STG",)), ("shared", ("LDS", "STS")),
           ("barriers", ("BAR",)), ("fp64", ("DADD", "DMUL", "DFMA", "DSETP", "DMNMX")),
           ("local", ("LDL", "STL")))


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compiled(program, dtype: torch.dtype) -> tuple[str, dict[str, int]]:
    """The sm_90 disassembly of the fused step kernel generated for ``program``, and its resource
    usage per thread (``registers``, ``stack`` bytes)."""
    from triton.backends.compiler import GPUTarget

    cfg = launch.config_for("cuda")
    module = cache.load(fusedopt.kernel_source(program, dtype, target="cuda"), torch.device("cpu"))
    src = triton.compiler.ASTSource(fn=module.fused_step, signature=launch.KERNEL_SIGNATURE,
                                    constexprs=launch.constexprs(cfg, True))
    options = {"num_warps": cfg["num_warps"], "enable_fp_fusion": False}
    cubin = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["cubin"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_tool("nvdisasm"), "-c", f.name], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    found = {key: re.search(rf"\b{key}:(\d+)", usage) for key in ("REG", "STACK")}
    if found["REG"] is None:
        raise RuntimeError(f"no register count in cuobjdump's report: {usage[-300:]}")
    return text, {"registers": int(found["REG"].group(1)),
                  "stack": int(found["STACK"].group(1)) if found["STACK"] else 0}


def opcodes(disassembly: str) -> collections.Counter:
    """Opcode (with its modifiers, e.g. ``LDG.E.128``) -> count, predicates dropped."""
    found = re.findall(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)", disassembly, re.M)
    return collections.Counter(found)


def profile(counts: collections.Counter, usage: dict[str, int]) -> dict[str, object]:
    row: dict[str, object] = {"instructions": sum(counts.values()), **usage}
    for column, prefixes in CLASSES:
        row[column] = sum(n for op, n in counts.items() if op.startswith(prefixes))
    widths = collections.Counter()
    for op, n in counts.items():
        if op.startswith(("LDG", "STG")):
            widths[op] += n
    row["by width"] = " ".join(f"{op}:{n}" for op, n in sorted(widths.items()))
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks.kernel_profile",
                                     description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--rules", default="adamw,adamw-bf16state,adamw8bit,adamw4bit",
                        help=f"comma-separated, from {', '.join(PROGRAMS)}")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    args = parser.parse_args(argv)
    names = [r for r in args.rules.split(",") if r]
    unknown = [r for r in names if r not in PROGRAMS]
    if unknown:
        parser.error(f"unknown rule(s) {unknown}; choose from {', '.join(PROGRAMS)}")
    columns = ["instructions", "registers", "stack", *(c for c, _ in CLASSES), "by width"]
    print(f"sm_90 fused_step, {args.dtype} parameters, triton {triton.__version__}, torch {torch.__version__}")
    print("| rule | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name in names:
        print(f"[kernel_profile] compiling {name}", file=sys.stderr)
        text, usage = compiled(PROGRAMS[name](), DTYPES[args.dtype])
        row = profile(opcodes(text), usage)
        print(f"| {name} | " + " | ".join(str(row[c]) for c in columns) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
