"""What the benchmark scripts share: progress on stderr, Markdown tables on stdout."""

from __future__ import annotations

import sys
import time
from typing import Any

from fsjax import tables


def log(msg: str) -> None:
  """Progress to stderr, so that stdout holds only the Markdown report."""
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
  """:func:`fsjax.tables.markdown` with every cell as ``str`` (no final newline)."""
  return tables.markdown(header, rows, digits=None).rstrip("\n")
