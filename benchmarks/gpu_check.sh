#!/usr/bin/env bash
# GPU part of the smoothing benchmark, for a machine with one NVIDIA GPU: CLIP ViT-L/14 in
# bfloat16, fsjax with chunk sizes 128, 256, 512 (and the transformers loop in bfloat16 if
# torch sees CUDA), the bf16 matmul peak, and the memory-vs-n table. Installs nothing and
# needs no network. Hard stop after 235 s; no new fsjax variant is compiled after 120 s.
#
#   bash benchmarks/gpu_check.sh                 # defaults (n = 8192, 1 image)
#   bash benchmarks/gpu_check.sh --n 16384       # extra arguments go to the script
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
timeout 235 "$PY" benchmarks/smoothing_throughput.py --budget 120 "$@" | tee "$report"
status=${PIPESTATUS[0]}
[ "$status" = 124 ] && echo "gpu_check.sh: stopped at the 235 s limit; the tables above are complete" >&2
exit "$status"
