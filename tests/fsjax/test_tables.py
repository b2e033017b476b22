"""fsjax.tables, the one Markdown table writer, against tables written out by hand."""

import pytest

from fsjax import tables


def test_markdown_by_hand():
  text = tables.markdown(["variant", "ACC", "n"], [["FS", 0.5, 3], ["FS+D+M", 2 / 3, 10]],
                         caption="Table 4.")
  assert text == ("Table 4.\n\n"
                  "| variant | ACC | n |\n"
                  "|---|---|---|\n"
                  "| FS | 0.500 | 3 |\n"
                  "| FS+D+M | 0.667 | 10 |\n")
  assert tables.markdown(["x"], [[0.125]], digits=None) == "| x |\n|---|\n| 0.125 |\n"
  assert tables.markdown(["x"], [[0.125]], digits=1) == "| x |\n|---|\n| 0.1 |\n"


def test_records_take_the_first_rows_keys():
  table = [{"variant": "original", "FCS": 0.25}, {"FCS": 1.0, "variant": "smoothed"}]
  assert tables.records(table, digits=2) == (
      "| variant | FCS |\n|---|---|\n| original | 0.25 |\n| smoothed | 1.00 |\n")
  assert tables.records([], caption="c") == "c\n\n(no rows)\n"


def test_a_ragged_row_is_refused():
  with pytest.raises(ValueError, match=r"rows\[1\] has 1 cells but the header has 2"):
    tables.markdown(["a", "b"], [[1, 2], [3]])
