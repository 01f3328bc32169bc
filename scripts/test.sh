#!/usr/bin/env bash
# Run the test suite; on Linux preload OpenBLAS for MLX's CPU backend when it is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
blas=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3
if [ "$(uname -s)" = "Linux" ] && [ -e "$blas" ]; then
  export LD_PRELOAD="$blas" OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python -m pytest -q "$@"
