#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md and the CUDA checks of tests/test_cuda.py, on one CUDA GPU.
#
#   bash scripts/gpu_report.sh OUTDIR [tests|bench|bench-fast|bench-ref|all]    (default: all)
#
# tests:      tests/test_cuda.py and tests/test_networks.py on the GPU machine (all markers)
# bench-fast: scripts/bench.py defaults (DDPM++ CIFAR-10, batch 512, bf16, compile) with and without channels_last,
#             and training with EDM's augmentation (p = 0.12)
# bench-ref:  the reference's settings (fp32 with TF32 off; fp16 autocast without compile)
# Writes OUTDIR/cuda-tests.log and OUTDIR/<setting>.json; PYTHON picks the interpreter (python3).
set -euo pipefail
out=${1:?usage: bash scripts/gpu_report.sh OUTDIR [tests|bench|bench-fast|bench-ref|all]}
what=${2:-all}
py=${PYTHON:-python3}
mkdir -p "$out"
cd "$(dirname "$0")/.."
"$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA GPU visible to torch")'

case $what in tests|all)
  "$py" -m pytest -q -p no:cacheprovider -m "slow or not slow" tests/test_cuda.py tests/test_networks.py 2>&1 | tee "$out/cuda-tests.log"
esac
case $what in bench|bench-fast|all)
  "$py" scripts/bench.py --out "$out/bf16-compile.json"
  "$py" scripts/bench.py --channels-last --out "$out/bf16-compile-channels-last.json"
  "$py" scripts/bench.py --mode train --augment 0.12 --out "$out/bf16-compile-augment.json"
esac
case $what in bench|bench-ref|all)
  "$py" scripts/bench.py --precision fp32 --no-compile --no-tf32 --out "$out/fp32-notf32.json"
  "$py" scripts/bench.py --precision fp16 --no-compile --out "$out/fp16.json"
esac
