"""benchmarks/matmul_threads.py: the shapes it parses, what it measures, its table."""

import os
import subprocess
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "benchmarks")
sys.path.insert(0, BENCHMARKS)

import matmul_threads  # noqa: E402  pylint: disable=wrong-import-position


def test_parse_shapes():
  assert matmul_threads.parse_shapes("592x512x1376, 8X4X2") == [(592, 512, 1376), (8, 4, 2)]
  for bad in ("592x512", "0x4x4", "ax4x4", "4x4x4x4"):
    with pytest.raises(ValueError, match="--shapes"):
      matmul_threads.parse_shapes(bad)


def test_measure_is_the_rate_of_each_frameworks_product():
  """One GFLOP/s figure per shape, positive and finite, for each framework; torch's thread
  count is restored after."""
  import torch  # pylint: disable=import-outside-toplevel
  threads = torch.get_num_threads()
  shapes = [(16, 32, 8), (32, 64, 32)]
  for name in matmul_threads.FRAMEWORKS:
    rates = matmul_threads.measure(name, shapes, reps=2, threads=1)
    assert len(rates) == 2 and all(0 < v < 1e6 for v in rates), (name, rates)
  assert torch.get_num_threads() == threads
  with pytest.raises(ValueError, match="framework"):
    matmul_threads.measure("numpy", shapes, reps=1, threads=1)


def test_table_gains_are_the_ratio_of_the_core_counts():
  shapes = [(4, 4, 4)]
  results = {1: {"fsjax": [100.0], "torch": [200.0]}, 2: {"fsjax": [150.0], "torch": [380.0]}}
  table = matmul_threads.table(shapes, results)
  row = table.splitlines()[-1]
  assert row.startswith("| [4, 4] x [4, 4] | 100 | 200 | 150 | 380 | 1.50x | 1.90x |")
  assert "fsjax gain 1 -> 2" in table.splitlines()[0]
  one = matmul_threads.table(shapes, {1: results[1]})  # one core count: no gain columns
  assert "gain" not in one and one.splitlines()[-1] == "| [4, 4] x [4, 4] | 100 | 200 |"


def test_the_script_runs_one_child_per_core_count():
  """The command as a user runs it (tiny shapes): one row per shape, a column per
  framework and core count that this process may use, core counts beyond them named as
  not run."""
  available = len(os.sched_getaffinity(0))
  out = subprocess.run(
      [sys.executable, os.path.join(BENCHMARKS, "matmul_threads.py"), "--shapes", "8x8x8",
       "--reps", "1", "--rounds", "1", "--cores", f"1,{available + 1}"],
      capture_output=True, text=True, check=True, timeout=300).stdout
  lines = [l for l in out.splitlines() if l.startswith("| [8, 8]")]
  assert len(lines) == 1 and lines[0].count("|") == 4  # shape, fsjax 1 core, torch 1 core
  assert f"Not run: {available + 1} cores" in out


def test_bad_arguments_are_refused_before_any_child():
  run = lambda *a: subprocess.run(
      [sys.executable, os.path.join(BENCHMARKS, "matmul_threads.py"), *a],
      capture_output=True, text=True, check=False, timeout=120)
  for args, said in ((("--cores", "0"), "at least 1"), (("--cores", "x"), "core counts"),
                     (("--reps", "0"), "--reps"), (("--rounds", "0"), "--rounds"),
                     (("--shapes", "1x2"), "--shapes")):
    done = run(*args)
    assert done.returncode == 2 and said in done.stderr, (args, done.stderr)
    assert "Traceback" not in done.stderr
