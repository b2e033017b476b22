"""The one Markdown table writer of the project: programs, task metrics and benchmarks.

:func:`markdown` lays out a header and rows of cells; :func:`records` the rows of a table
of dicts (the columns: the first row's keys, in order), as the programs write their
``<stem>.md`` files. Floats get ``digits`` decimals (``None``: ``str``); every other cell
is ``str``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence


def cell(value: Any, digits: int | None = 3) -> str:
  """One cell: a float with ``digits`` decimals (``None``: as ``str``), else ``str``."""
  if digits is not None and isinstance(value, float):
    return f"{value:.{digits}f}"
  return str(value)


def markdown(header: Sequence[Any], rows: Sequence[Sequence[Any]], *,
             digits: int | None = 3, caption: str | None = None) -> str:
  """A Markdown table: the header line, the separator, one line per row.

  Args:
    header: the column names.
    rows: the rows, each with one cell per column.
    digits: decimals of float cells (``None``: ``str`` of the float).
    caption: a paragraph above the table (then an empty line), or None.

  Returns:
    The table, ending with a newline.

  Raises:
    ValueError: a row has more or fewer cells than the header.
  """
  for i, row in enumerate(rows):
    if len(row) != len(header):
      raise ValueError(f"rows[{i}] has {len(row)} cells but the header has {len(header)} "
                       f"columns ({list(header)}): give one cell per column.")
  lines = [caption, ""] if caption else []
  lines += ["| " + " | ".join(str(h) for h in header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(cell(v, digits) for v in row) + " |" for row in rows]
  return "\n".join(lines) + "\n"


def records(table: Sequence[Mapping[str, Any]], *, digits: int | None = 3,
            caption: str | None = None) -> str:
  """:func:`markdown` of a table of dicts: the columns are the first row's keys, in order.

  An empty table is the caption and ``(no rows)``.
  """
  if not table:
    return "\n".join(([caption, ""] if caption else []) + ["(no rows)"]) + "\n"
  columns = list(table[0])
  return markdown(columns, [[row[c] for c in columns] for row in table], digits=digits,
                  caption=caption)
