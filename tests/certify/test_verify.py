"""certify.verify re-derives the certificates of a Table 1 run from its records (issue 21.4).

One tiny in-process ``certify.run`` of ``configs/clip_tiny.py`` per mode (fixed n with the
norm-aware rows; sequential), then edits of copies of its ``results.jsonl``. The encoder
is the suite's toy encoder (tests/conftest.py): what is verified is the arithmetic from
recorded statistics to certificates, whatever the encoder; the toy keeps the two runs
to seconds (the tiny CLIP compiles for ~10 s per mode).
"""

import json
import math
import pathlib
import shutil

import jax
import numpy as np
import pytest
from scipy import special
from scipy import stats

from certify import _bounds
from certify import records
from certify import report
from certify import run as run_lib
from certify import verify
from configs import clip_tiny
from fsjax import cpu
from fsjax import smoothing
from fsjax import variants as variants_lib


def _run(tmp_path_factory, toy, name, **certify):
  config = clip_tiny.get_config()
  with config.unlocked():
    config.certify.update(n0=8, n=32, sigmas=(0.25,), eps=(0.125, 0.5), chunk_size=16,
                          sequential_chunk_size=16, norm_aware=True, **certify)
    config.data.update(num_examples=2, batch_size=2)
  workdir = tmp_path_factory.mktemp(name)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(variants_lib, "encoder_variants", lambda config: [("FS", *toy)])
    run_lib.run(config, str(workdir))
  return config, workdir


@pytest.fixture(scope="module")
def fixed(tmp_path_factory, toy):
  return _run(tmp_path_factory, toy, "verify_fixed")


@pytest.fixture(scope="module")
def sequential(tmp_path_factory, toy):
  """The rows certify.run makes in sequential mode (its row maker on two images, written
  as the run writes them; no tables or plots, which the fixed run covers)."""
  config = clip_tiny.get_config()
  with config.unlocked():
    # The mean reference only: each (reference, norm_aware) pair is one more compile.
    config.certify.update(n0=8, n=32, sigmas=(0.25,), eps=(0.125, 0.5), references=("mean",),
                          sequential_chunk_size=16, norm_aware=True, mode="sequential")
  workdir = tmp_path_factory.mktemp("verify_sequential")
  images = np.random.default_rng(0).uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
  with report.rows(workdir / "results.jsonl", config) as write:
    for row in run_lib.certify_images([("FS", *toy)], images, np.array([0, 1]), config,
                                      jax.random.PRNGKey(config.seed)):
      write(row)
  return config, workdir


def _rows(path):
  return [json.loads(l) for l in pathlib.Path(path).read_text().splitlines()]


def _copy(workdir, tmp_path, edit=None):
  """A copy of the run's results.jsonl with ``edit(rows)`` applied (rows re-serialised)."""
  rows = _rows(workdir / "results.jsonl")
  if edit is not None:
    edit(rows)
  out = tmp_path / "results.jsonl"
  out.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return out


def _main(capsys, *paths):
  status = verify.main([str(p) for p in paths])
  out, err = capsys.readouterr()
  return status, out.splitlines(), err.splitlines()


def test_verify_rederives_every_record_of_a_fixed_run(fixed, capsys):
  _, workdir = fixed
  rows = _rows(workdir / "results.jsonl")
  # 2 references x 4 bounds + the norm-aware row, 2 images; every row carries a record.
  assert len(rows) == 18 and all(r["record"]["format"] == records.FORMAT for r in rows)
  assert {r["record"]["kind"] for r in rows} == {"fixed", "norm-aware"}
  status, out, err = _main(capsys, workdir)
  assert status == 0 and not err, (out, err)
  assert out == [out[-1]] and "18 records, every certificate re-derived" in out[-1]
  report_ = verify.verify_file(workdir)
  assert report_.ok and report_.checked == 18
  # Same process, same machine: nearly every number is the same bits (ULPS covers XLA's
  # fused-vs-unfused rounding of the run's jitted bound).
  assert report_.exact >= report_.values - 2, report_


def test_records_hold_what_rederives_the_numbers_independently(fixed):
  """The recorded sums give each row's deficit by the textbook formulas (numpy / scipy,
  not certify), and the deficit gives the row's bounds by Theorem 3.2."""
  config, workdir = fixed
  c = config.certify
  for row in _rows(workdir / "results.jsonl"):
    rec = row["record"]
    assert (rec["n0"], rec["n"], rec["alpha"], rec["sigma"]) == (c.n0, c.n, c.alpha, 0.25)
    assert rec["noise"]["sigma_key"] == records.key_data(
        smoothing.sigma_key(jax.random.PRNGKey(config.seed), 0.25))
    assert rec["provenance"]["compute_dtype"] == "float32"
    assert rec["provenance"]["params_sha256"].startswith("sha256:")
    assert "[0, 1]" in rec["sigma_convention"]
    if rec["kind"] != "fixed":
      assert rec["statistics"] == {"deficit": row["score_deficit"],
                                   "norm_upper": row["norm_upper"]}
      continue
    s, n, alpha = rec["statistics"], rec["n"], rec["alpha"]
    mean_deficit = (1.0 - s["center"]) - s["total"] / n
    var = max(s["total_sq"] - s["total"] ** 2 / n, 0.0) / (n - 1)
    log_term = math.log(2.0 / alpha)
    if row["bound"] == "betting":
      # Leading run of cells whose bet-averaged wealth reaches 1 / alpha.
      lc = records.decode_array(s["log_capital"]).astype(np.float64)
      assert lc.shape == (_bounds.NUM_BETS, _bounds.BETTING_GRID)
      wealth = special.logsumexp(lc, axis=0) - math.log(lc.shape[0])
      leading = int(np.cumprod(wealth >= math.log(1.0 / alpha)).sum())
      z = np.linspace(-_bounds.BETTING_Z, _bounds.BETTING_Z, _bounds.BETTING_GRID)
      want = stats.norm.cdf(-z[leading - 1]) if leading else 1.0
    else:
      want = mean_deficit + {
          "point": 0.0, "hoeffding": math.sqrt(math.log(1.0 / alpha) / (2.0 * n)),
          "bernstein": math.sqrt(2.0 * var * log_term / n) + 7.0 * log_term / (3.0 * (n - 1)),
      }[row["bound"]]
      want = min(max(want, 1e-12), 1.0)
    assert row["score_deficit"] == pytest.approx(want, rel=1e-5, abs=1e-7), row["bound"]
    for e, b in row["inner_product_bound"].items():
      want_b = 2 * stats.norm.cdf(stats.norm.isf(row["score_deficit"]) - float(e) / 0.25) - 1
      assert b == pytest.approx(want_b, abs=1e-5)


def test_flags_an_edited_bound(fixed, tmp_path, capsys):
  _, workdir = fixed
  rows = _rows(workdir / "results.jsonl")
  fixed_row = next(i for i, r in enumerate(rows) if r["bound"] == "bernstein")
  norm_row = next(i for i, r in enumerate(rows) if r.get("cosine_kind") == "norm-aware")

  def edit(rows):
    rows[fixed_row]["inner_product_bound"]["0.125"] += 1e-3
    rows[norm_row]["radius"] += 1e-3

  status, out, _ = _main(capsys, _copy(workdir, tmp_path, edit))
  assert status == 1
  assert len(out) == 3, out  # one line per mismatched row, then the summary
  assert f":{fixed_row + 1}: " in out[0] and "inner_product_bound" in out[0]
  assert f":{norm_row + 1}: " in out[1] and "radius" in out[1] and "norm-aware" in out[1]
  assert "2 problem(s)" in out[2]


def test_flags_edited_statistics(fixed, tmp_path, capsys):
  _, workdir = fixed
  rows = _rows(workdir / "results.jsonl")
  bernstein = next(i for i, r in enumerate(rows) if r["bound"] == "bernstein")
  betting = next(i for i, r in enumerate(rows) if r["bound"] == "betting"
                 and r["record"]["kind"] == "fixed")

  def edit(rows):
    rows[bernstein]["record"]["statistics"]["total_sq"] += 1e-2
    lc = records.decode_array(rows[betting]["record"]["statistics"]["log_capital"])
    # No wealth reaches 1 / alpha: no cell rejected, deficit 1 (the run's is below).
    rows[betting]["record"]["statistics"]["log_capital"] = records.encode_array(
        np.full_like(lc, -1.0))

  status, out, _ = _main(capsys, _copy(workdir, tmp_path, edit))
  assert status == 1 and len(out) == 3, out
  for line, index in zip(out, sorted([bernstein, betting])):
    assert f":{index + 1}: " in line and "score_deficit (1 - L from the statistics)" in line


def test_torn_last_line_is_reported_and_skipped(fixed, tmp_path, capsys):
  _, workdir = fixed
  path = _copy(workdir, tmp_path)
  with open(path, "a") as f:
    f.write('{"variant": "FS", "image": 9, "rec')
  status, out, err = _main(capsys, path)
  assert status == 0 and "18 records" in out[-1]
  assert len(err) == 1 and "torn" in err[0] and ":19:" in err[0]


def test_damaged_line_and_old_rows_get_one_clear_line_each(fixed, tmp_path, capsys):
  _, workdir = fixed

  def edit(rows):
    for r in rows[:4]:
      del r["record"]

  path = _copy(workdir, tmp_path, edit)
  lines = path.read_text().splitlines()
  lines[6] = lines[6][:40]  # a damaged row in the middle
  path.write_text("\n".join(lines) + "\n")
  status, out, _ = _main(capsys, path)
  assert status == 1 and len(out) == 3, out
  assert ":7: not a JSON row" in out[0]
  assert "4 row(s) carry no record (lines 1, 2, 3, 4)" in out[1] and "re-run" in out[1]


def test_missing_folder_is_one_line(tmp_path, capsys):
  status, out, err = _main(capsys, tmp_path / "nothing")
  assert status == 1 and not out and len(err) == 1 and "no results.jsonl" in err[0]


def test_sequential_rows(sequential, tmp_path, capsys):
  """Sequential rows: the anytime bounds must be cells of the sequence's grid, and the
  certificate follows from them; an off-grid bound (row and record edited alike) is no
  sequential run's."""
  _, workdir = sequential
  rows = _rows(workdir / "results.jsonl")
  assert len(rows) == 4 and {r["record"]["kind"] for r in rows} == {"sequential"}
  assert {r["cosine_kind"] for r in rows} == {"inner product", "norm-aware"}
  assert {r["record"]["noise"]["chunk_size"] for r in rows} == {16}
  status, out, _ = _main(capsys, workdir)
  assert status == 0 and "4 records" in out[-1], out

  def edit(rows):
    d = rows[0]["score_deficit"] * 0.999
    rows[0]["score_deficit"] = rows[0]["record"]["statistics"]["deficit"] = d

  status, out, _ = _main(capsys, _copy(workdir, tmp_path, edit))
  assert status == 1 and ":1: " in out[0] and "no cell of the confidence sequence's grid" in out[0]


def test_compute_dtype_in_config_json_and_caption(fixed, monkeypatch):
  _, workdir = fixed
  assert json.loads((workdir / "config.json").read_text())["compute_dtype"] == "float32"
  assert "Encoder compute dtype: float32" in (workdir / "table.md").read_text()
  config = clip_tiny.get_config()
  with config.unlocked():
    config.encoder.dtype = "auto"
  for backend, want in (("cpu", "float32"), ("gpu", "bfloat16")):
    monkeypatch.setattr(cpu, "preferred_dtype", lambda b=None, w=want: w)
    assert report.compute_dtype(config) == want
    assert json.loads(report._config_text(config))["compute_dtype"] == want  # pylint: disable=protected-access
    assert f"compute dtype: {want} (config.encoder.dtype = auto)" in run_lib.caption(config, 2)
  assert cpu.resolve_dtype("bfloat16") == "bfloat16"


def test_fcsb_plot_has_short_legends(monkeypatch, tmp_path):
  """fcsb.png: a headline row and one row per variant; no panel holds more than bounds x
  references lines, and no legend more than 8 entries (4 variants, 4 bounds + norm)."""
  eps = [0.125, 0.5]
  table = []
  for v in ("FS", "FS+D", "FS+M", "FS+D+M"):
    for s in (0.25, 0.5):
      for ref in ("clean", "mean"):
        for b in ("point (estimate)", "hoeffding", "bernstein", "betting"):
          table.append({"variant": v, "sigma": s, "reference": ref, "bound": b,
                        "B@0.125": 0.5, "B@0.5": 0.1, "R(cos>=0.5)": 0.1})
      table.append({**table[-1], "bound": "betting + norm"})
  figures = []
  monkeypatch.setattr(report, "save_figure", lambda fig, path, **kw: figures.append(fig))
  run_lib.plot(table, eps, tmp_path / "fcsb.png")
  (fig,) = figures
  axes = fig.axes
  assert len(axes) == 2 * 5  # 2 sigmas x (headline + 4 variants)
  assert max(len(ax.lines) - 1 for ax in axes) == 9  # 4 bounds x 2 references + norm (- y=0)
  legends = [ax.get_legend() for ax in axes if ax.get_legend() is not None]
  assert [len(l.get_texts()) for l in legends] == [4, 7]


def test_array_encoding_round_trips_and_refuses_a_wrong_shape():
  a = np.random.RandomState(0).randn(4, 3).astype(np.float32)
  d = records.encode_array(a)
  assert np.array_equal(records.decode_array(json.loads(json.dumps(d))), a)
  with pytest.raises(ValueError, match="needs 40"):
    records.decode_array({**d, "shape": [10]})


def test_workdir_copy_is_verified_as_a_folder(fixed, tmp_path, capsys):
  _, workdir = fixed
  shutil.copy(workdir / "results.jsonl", tmp_path / "results.jsonl")
  status, out, _ = _main(capsys, tmp_path, workdir / "results.jsonl")
  assert status == 0 and len(out) == 2
