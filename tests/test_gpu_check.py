"""benchmarks/gpu_check.sh, the accelerator check, runs end to end on CPU with tiny shapes."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ("peak", "smoothing", "llava prefill", "llava decode", "llava options", "answers",
            "certificate")


def test_gpu_check_tiny_on_cpu(tmp_path):
  # Unoptimised XLA:CPU code: the run is mostly compilation, and this halves its CPU time.
  flags = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
  env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path), JAX_PLATFORMS="cpu",
             XLA_FLAGS=flags)
  out = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--tiny",
                        "--reps", "1", "--budget", "600"],
                       env=env, capture_output=True, text=True, timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [line.split("|")[1:-1] for line in out.stdout.splitlines()
          if line.startswith("| ") and not line.startswith("| section")]
  assert {r[0].strip() for r in rows} == set(SECTIONS)
  for r in rows:  # every row measured: a positive number, never an error or a skip
    if r[2].strip() == "n/a":  # decode: t(N) <= t(1) on a loaded machine, said in the unit
      assert r[0].strip() == "llava decode" and "noise" in r[3], r
      continue
    assert float(r[2].replace(",", "")) > 0, r
  assert (tmp_path / "gpu_check.md").read_text().strip() == out.stdout.strip()


def test_gpu_check_refuses_full_shapes_on_cpu():
  env = dict(os.environ, PYTHON=sys.executable, JAX_PLATFORMS="cpu")
  env.pop("GPU_CHECK_TINY", None)
  out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py")],
                       env=env, capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 2 and "--tiny" in out.stderr
