"""Static profile of generated kernels: compile them for an H100 (sm_90) on any machine, GPU or not,
and count the machine instructions of each kind in the disassembly.

This is not a timing. It shows what a kernel asks of the memory system per loop iteration (global
loads and stores and their widths, shared-memory traffic, barriers) and how much float64 work it
does, so that a change to the code generator can be compared before and after without a GPU. The
loop body appears twice (unmasked and masked copies), so counts are per kernel, not per element.

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
           ("barriers", ("BAR",)), ("fp64", ("DADD", "DMUL", "DFMA", "DSETP", "DMNMX")))


def sass(program, dtype: torch.dtype) -> str:
    """The sm_90 disassembly of the fused step kernel generated for ``program``."""
    from triton.backends.compiler import GPUTarget

    cfg = launch.config_for("cuda")
    module = cache.load(fusedopt.kernel_source(program, dtype, target="cuda"), torch.device("cpu"))
    src = triton.compiler.ASTSource(fn=module.fused_step, signature=launch.KERNEL_SIGNATURE, constexprs={
        "BLOCK": cfg["BLOCK"], "ITERS": cfg["ITERS"], "ROWS": cfg["ROWS"], "ALIGNED": True})
    options = {"num_warps": cfg["num_warps"]}
    cubin = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["cubin"]
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, "-c", f.name], capture_output=True, text=True, check=True).stdout


def opcodes(disassembly: str) -> collections.Counter:
    """Opcode (with its modifiers, e.g. ``LDG.E.128``) -> count, predicates dropped."""
    found = re.findall(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)", disassembly, re.M)
    return collections.Counter(found)


def profile(counts: collections.Counter) -> dict[str, object]:
    row: dict[str, object] = {"instructions": sum(counts.values())}
    for column, prefixes in CLASSES:
        row[column] = sum(n for op, n in counts.items() if op.startswith(prefixes))
    widths = collections.Counter()
    for op, n in counts.items():
        if op.startswith(("LDG", "STG")):
            widths[op] += n
    row["by width"] = " ".join(f"{op}:{n}" for op, n in sorted(widths.items()))
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", default="adamw,adamw-bf16state,adamw8bit,adamw4bit",
                        help=f"comma-separated, from {', '.join(PROGRAMS)}")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    args = parser.parse_args(argv)
    names = [r for r in args.rules.split(",") if r]
    unknown = [r for r in names if r not in PROGRAMS]
    if unknown:
        parser.error(f"unknown rule(s) {unknown}; choose from {', '.join(PROGRAMS)}")
    columns = ["instructions", *(c for c, _ in CLASSES), "by width"]
    print(f"sm_90 fused_step, {args.dtype} parameters, triton {triton.__version__}, torch {torch.__version__}")
    print("| rule | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name in names:
        print(f"[kernel_profile] compiling {name}", file=sys.stderr)
        row = profile(opcodes(sass(PROGRAMS[name](), DTYPES[args.dtype])))
        print(f"| {name} | " + " | ".join(str(row[c]) for c in columns) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
