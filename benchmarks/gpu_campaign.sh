#!/usr/bin/env bash
# One device call: environment, the GPU tests, then benchmarks. Usage (repository root):
#   bash benchmarks/gpu_campaign.sh tests,bits,gpt2,llama1b,layouts,peers,tune [OUTDIR]
# peers: bitsandbytes and torchao beside fusedopt, installed from the wheels in .whl/ (`make
# peer-wheels` where the package index is reachable; carry .whl to the GPU machine).
# Logs and result files go to OUTDIR (default $OUT, else benchmarks/out); the summary is printed last.
# BUDGET (default 540 s) bounds every part together, so one 600 s device call ends with its summary:
# each command's timeout is cut to the time left, a part with under 30 s left is skipped, and
# bench_step saves its rows after each one, so a row measured before a timeout is kept.
set -uo pipefail
parts=${1:-tests,gpt2}
out=${2:-${OUT:-benchmarks/out}}
budget=${BUDGET:-540}
mkdir -p "$out"
limit() { local left=$(( budget - SECONDS )); (( left < $1 )) || left=$1; echo $(( left > 1 ? left : 1 )); }
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 FUSEDOPT_CACHE_DIR=${FUSEDOPT_CACHE_DIR:-/tmp/fusedopt-cache}
{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader
  python3 -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__)"
} | tee "$out/env.txt"
for part in ${parts//,/ }; do
  if (( budget - SECONDS < 30 )); then echo "part $part skipped: the ${budget} s budget is spent"; continue; fi
  case $part in
    tests) timeout $(limit 300) python3 -m pytest -m gpu -q --tb=short -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log" | tail -25 ;;
    bits) # kernel against reference, bit for bit, on CUDA: quantized states, stochastic rounding (bf16
          # and fp16), and MicroAdam with every step option (these tests pick CUDA when it is there)
          timeout $(limit 300) python3 -m pytest -q --tb=short -p no:cacheprovider tests/test_quantized_states.py \
            tests/test_stochastic_rounding.py tests/test_window_precision.py 2>&1 | tee "$out/cuda_bits.log" | tail -25 ;;
    gpt2|llama1b) timeout $(limit 420) python3 -m benchmarks.bench_step --shapes "$part" ${BENCH_ARGS:-} --out "$out" \
                    > "$out/bench_$part.txt" 2> "$out/bench_$part.err"; echo "bench $part rc=$?"; tail -5 "$out/bench_$part.err" ;;
    layouts) for shapes in gpt2 llama1b; do  # per-row/column/block rules (fp32) and MicroAdam (bf16, as the paper)
               timeout $(limit 420) python3 -m benchmarks.bench_step --shapes $shapes --rules adafactor,adam-mini \
                 --out "$out" > "$out/bench_layouts_$shapes.txt" 2>> "$out/bench_layouts.err"
               timeout $(limit 420) python3 -m benchmarks.bench_step --shapes $shapes --rules microadam,microadam-sr,adamw --dtype bf16 \
                 --impls fusedopt-triton,torch-fused --out "$out" > "$out/bench_microadam_$shapes.txt" \
                 2>> "$out/bench_layouts.err"
             done; tail -5 "$out/bench_layouts.err" ;;
    peers) if ls .whl/*.whl > /dev/null 2>&1; then
             python3 -m pip install -q --no-deps --no-index --target /tmp/fusedopt-peers .whl/*.whl 2>&1 | tail -2
             for shapes in gpt2 llama1b; do
               PYTHONPATH=$PWD:/tmp/fusedopt-peers timeout $(limit 420) python3 -m benchmarks.bench_step --shapes $shapes \
                 --rules adamw,adamw8bit,adamw4bit --impls fusedopt-triton,torch-fused,peer-bnb,peer-torchao \
                 --out "$out" > "$out/bench_peers_$shapes.txt" 2>> "$out/bench_peers.err"
             done; tail -5 "$out/bench_peers.err"
           else echo "peers: no wheels in .whl/ (make peer-wheels)"; fi ;;
    tune) # launch configurations per rule: TUNE_RULES (default adamw8bit,adamw4bit; fp32 adamw was swept
          # on 2026-11-23) over the default, 4 elements per thread (half the registers, twice the warps),
          # and longer chunks or single-warp programs (the per-program float64 prologue, about 800
          # instructions per warp, shared by more elements);
          # TUNE_ARGS go to bench_step as well (e.g. TUNE_ARGS="--dtype bf16")
          rules=${TUNE_RULES:-adamw8bit,adamw4bit}
          for r in ${rules//,/ }; do
          for cfg in BLOCK=1024,ITERS=4,num_warps=4 BLOCK=1024,ITERS=16,num_warps=4 BLOCK=512,ITERS=8,num_warps=4 \
                     BLOCK=1024,ITERS=4,num_warps=8 BLOCK=256,ITERS=16,num_warps=1 BLOCK=2048,ITERS=2,num_warps=8; do
            FUSEDOPT_LAUNCH=$cfg timeout $(limit 120) python3 -m benchmarks.bench_step --shapes llama1b --rules $r \
              --impls fusedopt-triton --steps 10 --warmup 2 ${TUNE_ARGS:-} --out "$out/tune" 2>> "$out/tune.err" \
              | grep "fusedopt-triton" \
              | sed "s/^/$cfg  /" | tee -a "$out/tune.txt"
          done; done ;;
    *) echo "unknown part $part" ;;
  esac
done
for f in "$out"/bench_*.txt "$out"/tune.txt; do [ -f "$f" ] && cat "$f"; done
for f in "$out"/bench_step-*.csv; do  # rows saved, also by a run its timeout cut short
  [ -f "$f" ] && echo "$f: $(( $(wc -l < "$f") - 1 )) rows"
done
