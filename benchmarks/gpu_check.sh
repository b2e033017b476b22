#!/usr/bin/env bash
# The accelerator check in one command: benchmarks/gpu_check.py (one Markdown table: matmul
# peak, ViT-L/14@336 smoothing in float32 and bfloat16 at several chunk sizes, LLaVA-7B-
# shaped prefill / decode / option scoring in bfloat16 at batch 1 and a batch of noise
# samples, certify.fcsb end to end on a batch). Hard stop after 470 s (under 8 minutes);
# no new row starts after --budget seconds (400). Installs nothing, needs no network.
#
#   bash benchmarks/gpu_check.sh                 # on a GPU / TPU
#   bash benchmarks/gpu_check.sh --tiny          # tiny shapes, any device (the suite's test)
#   GPU_CHECK_TINY=1 bash benchmarks/gpu_check.sh
#   bash benchmarks/gpu_check.sh --sections peak,llava --noise-batch 16
#
# Needs a python (PYTHON, default python3) that imports jax (with CUDA / TPU for the full
# run), flax, numpy and ml_collections. fsjax is imported from this checkout, not installed.
# If ml_collections is missing but a wheel of it lies in .whl/ (pure Python), it is
# installed into a temporary folder first. The table also goes to $OUT/gpu_check.md when
# OUT is set.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
# JAX must not preallocate most of the GPU: nothing else shares it here, but a 7B model
# and the ViT-L rows are allocated one after the other.
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}

if ! "$PY" -c "import ml_collections" 2>/dev/null; then
  if compgen -G ".whl/ml_collections-*.whl" >/dev/null; then
    site=$(mktemp -d)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" \
      .whl/ml_collections-*.whl || exit 2
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "ml_collections is not importable: carry its wheel in .whl/ (see benchmarks/README.md)" >&2
    exit 2
  fi
fi

command -v nvidia-smi >/dev/null && \
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2
timeout 470 "$PY" benchmarks/gpu_check.py "$@"
status=$?
[ "$status" = 124 ] && echo "gpu_check.sh: stopped at 470 s" >&2
exit "$status"
