#!/usr/bin/env bash
# GPU part of the smoothing benchmark, for a machine with one NVIDIA GPU: the matmul peak,
# then CLIP ViT-L/14 in bfloat16, fsjax with chunk sizes 128, 256, 512 (and the
# transformers loop in bfloat16 if torch sees CUDA). Installs nothing and needs no
# network. Hard stop after 235 s; no new fsjax chunk size is compiled after 120 s. Then the
# LLaVA-1.5-7B greedy decode of benchmarks/llava_decode.py (hard stop after 300 s).
#
#   bash benchmarks/gpu_check.sh                           # n = 8192 samples x 1 image
#   bash benchmarks/gpu_check.sh --n 16384 --chunk 256,1024  # later arguments win
#   bash benchmarks/gpu_check.sh --sections peak,throughput,memory  # + memory table
#
# Needs a python (PYTHON, default python3) that imports jax with CUDA, flax, numpy,
# ml_collections, and for the torch row torch + transformers. fsjax itself is imported
# from this checkout, not installed. If ml_collections is missing but a wheel of it lies
# in .whl/ (it is pure Python), it is installed into /tmp/site first. The report is
# also written to $OUT/gpu_benchmark.md when OUT is set.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3

if ! "$PY" -c "import ml_collections" 2>/dev/null; then
  if compgen -G ".whl/ml_collections-*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
      .whl/ml_collections-*.whl || exit 2
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "ml_collections is not importable: carry its wheel in .whl/ (see benchmarks/README.md)" >&2
    exit 2
  fi
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" - <<'EOF' || exit 3
import jax
print("jax", jax.__version__, "backend", jax.default_backend(), jax.devices())
assert jax.default_backend() == "gpu", "JAX does not see a GPU: nothing to benchmark here"
EOF

report=${OUT:-/tmp}/gpu_benchmark.md
timeout 235 "$PY" benchmarks/smoothing_throughput.py --budget 120 --sections peak,throughput \
  "$@" | tee "$report"
status=${PIPESTATUS[0]}
if [ "$status" = 124 ]; then
  echo "gpu_check.sh: stopped at 235 s; the tables printed above are complete" >&2
fi

# LLaVA-1.5-7B greedy decoding (fsjax.llava, random weights, bfloat16; transformers too
# when torch sees CUDA): prefill latency and decode tokens/s, batch 1, 64 new tokens.
# SKIP_LLAVA=1 skips it. JAX must not preallocate: torch shares the GPU in this process.
if [ -z "${SKIP_LLAVA:-}" ]; then
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 300 "$PY" benchmarks/llava_decode.py \
    --size 7b --batch 1 --new-tokens 64 --rounds 3 | tee -a "$report"
  llava_status=${PIPESTATUS[0]}
  [ "$llava_status" = 124 ] && echo "gpu_check.sh: the LLaVA-7B decode stopped at 300 s" >&2
  [ "$status" = 0 ] && status=$llava_status
fi
exit "$status"
