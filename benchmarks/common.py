"""What the benchmark scripts share: progress on stderr, Markdown tables on stdout."""

from __future__ import annotations

import sys
import time
from typing import Any


def log(msg: str) -> None:
  """Progress to stderr, so that stdout holds only the Markdown report."""
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)
