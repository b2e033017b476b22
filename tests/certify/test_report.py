"""certify.report's files: atomic writes, appended rows, torn lines, one config per folder."""

import json
import os

import ml_collections
import pytest

from certify import report


def _config(n=4):
  return ml_collections.ConfigDict(dict(seed=0, certify=dict(n=n, sigmas=(0.25, 0.5))))


def _files(folder):
  return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_write_text_replaces_whole_or_not_at_all(tmp_path):
  path = tmp_path / "table.md"
  report.write_text(path, "old\n")
  with pytest.raises(RuntimeError):
    with report.replacing(path) as tmp:
      tmp.write_text("half of the ne")
      raise RuntimeError("killed")
  assert _files(tmp_path) == {"table.md": b"old\n"}  # old file kept, no temporary left
  report.write_text(path, "new\n")
  assert _files(tmp_path) == {"table.md": b"new\n"}


def test_write_table_and_figure_leave_no_temporaries(tmp_path):
  text = report.write_table([{"a": 1, "b": 0.5}], tmp_path, "t", caption="c")
  assert (tmp_path / "t.md").read_text() == text
  assert (tmp_path / "t.csv").read_text().splitlines() == ["a,b", "1,0.5"]
  plt = report.pyplot()
  fig = plt.figure(figsize=(1, 1))
  report.save_figure(fig, tmp_path / "f.png", dpi=20)
  plt.close(fig)
  assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert sorted(_files(tmp_path)) == ["f.png", "t.csv", "t.md"]


def test_rows_append_and_write_the_config_with_the_first_rows(tmp_path):
  path = tmp_path / "results.jsonl"
  with report.rows(path, _config()) as write:
    write({"image": 0, "b": 1.0})
  assert json.loads((tmp_path / "config.json").read_text())["certify"]["n"] == 4
  with report.rows(path, _config()) as write:  # the same config: appended, not truncated
    write({"image": 0, "b": 2.0})
    write({"image": 1, "b": 3.0})
  assert [r["b"] for r in report.read_rows(path)] == [1.0, 2.0, 3.0]
  assert report.read_rows(path, key=("image",)) == [{"image": 0, "b": 2.0},
                                                   {"image": 1, "b": 3.0}]


def test_another_config_is_refused_and_changes_nothing(tmp_path):
  path = tmp_path / "results.jsonl"
  with report.rows(path, _config(4)) as write:
    write({"image": 0})
  before = _files(tmp_path)
  with pytest.raises(ValueError, match=r"different config \(config.json differs: certify.n: "
                     r"4 in the workdir, 8 now\); appending .*another --workdir, or delete"):
    with report.rows(path, _config(8)):
      pass
  assert _files(tmp_path) == before
  path.write_text("")  # no rows yet: any config may start here
  with report.rows(path, _config(8)) as write:
    write({"image": 0})
  assert json.loads((tmp_path / "config.json").read_text())["certify"]["n"] == 8


def test_rows_without_their_config_are_refused(tmp_path):
  (tmp_path / "audit.jsonl").write_text('{"image": 0}\n')
  with pytest.raises(ValueError, match="no audit_config.json says which config"):
    report.check_workdir(_config(), tmp_path / "audit.jsonl", "audit_config.json")


def test_a_torn_last_row_is_dropped_and_cut_before_appending(tmp_path, capsys):
  path = tmp_path / "results.jsonl"
  path.write_text('{"image": 0}\n{"image": 1}\n{"ima')  # killed mid-write
  assert report.read_rows(path) == [{"image": 0}, {"image": 1}]
  with report.rows(path) as write:
    write({"image": 2})
  assert path.read_text() == '{"image": 0}\n{"image": 1}\n{"image": 2}\n'
  assert "dropped a torn last row (5 bytes" in capsys.readouterr().err
  # A complete JSON object without its newline is torn too (rows() writes both at once).
  path.write_text('{"image": 0}\n{"image": 1}')
  assert report.read_rows(path) == [{"image": 0}]


def test_a_damaged_middle_row_is_named(tmp_path):
  path = tmp_path / "results.jsonl"
  path.write_text('{"image": 0}\n{"ima\n{"image": 2}\n')
  with pytest.raises(ValueError, match=r"results.jsonl:2: not a JSON row"):
    report.read_rows(path)


def test_nothing_is_created_before_the_first_row(tmp_path):
  folder = tmp_path / "new"
  report.check_workdir(_config(), folder / "results.jsonl")
  assert not folder.exists()
  with report.rows(folder / "results.jsonl", _config()):
    pass
  assert sorted(os.listdir(folder)) == ["config.json", "results.jsonl"]


def test_done_rows_are_the_rows_as_written_by_key(tmp_path):
  """What a resumed run skips: the last row per key, float keys of the bound columns
  restored (JSON made them strings), a torn last row dropped, nothing without a file."""
  path = tmp_path / "results.jsonl"
  assert report.done_rows(path, ("image",)) == {}
  rows = [{"image": 0, "bound": "betting", "inner_product_bound": {0.125: 0.5, 0.5: -0.25},
           "record": {"reference": "mean"}},
          {"image": 1, "bound": "betting", "inner_product_bound": {0.125: 0.1, 0.5: -0.7}}]
  with report.rows(path) as write:
    for r in rows:
      write(r)
  with open(path, "a") as f:
    f.write('{"image": 2, "bou')  # killed mid-row
  done = report.done_rows(path, ("image", "bound"))
  assert done == {(0, "betting"): rows[0], (1, "betting"): rows[1]}
  assert [report.as_read(r) for r in rows] == rows
  assert list(done[(0, "betting")]["inner_product_bound"]) == [0.125, 0.5]
