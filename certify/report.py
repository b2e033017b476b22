"""The one report writer of the experiment programs: rows, tables, settings, figures.

Every program writes the same kinds of files into its workdir:

* ``<name>.jsonl``: one JSON row per measured unit (an image, at a variant, sigma, ...),
  written as it is measured, so an interrupted run keeps what it did;
* ``<stem>.md`` / ``<stem>.csv``: the summary table, the Markdown with a caption saying
  what the numbers are (alpha, n0, n, sigma, number of images);
* ``config.json``: the config the program ran with;
* PNG figures, drawn with matplotlib's Agg backend (no screen needed).

While it runs, a program shows one :class:`SampleProgress` bar: noise samples x images
through the encoder, advanced as each chunk of samples finishes, with tqdm's rate and ETA.

The column vocabulary (docs/vocabulary in the README): ``variant`` (FS, FS+D, FS+M,
FS+D+M, or a row label such as "original" / "smoothed"), ``image`` (index in the evaluated
set), ``sigma``, ``reference`` (clean / mean), ``bound`` (the confidence-bound method:
point, hoeffding, bernstein, betting, clopper-pearson), ``eps`` (a certified l2 radius),
``radius`` (the certified radius of an image), ``linf_budget`` (an attack's budget),
``n0`` / ``n`` (Monte Carlo samples of the two certification stages).
"""

from __future__ import annotations

import contextlib
import csv
import json
import pathlib
from typing import Any, Callable, Hashable, Iterator, Sequence

import numpy as np
import tqdm

from fsjax import tables


def markdown(table: Sequence[dict], *, digits: int = 3, caption: str | None = None) -> str:
  """A Markdown table of ``table``'s rows (columns: the first row's keys, in order)."""
  return tables.records(table, digits=digits, caption=caption)


def write_table(table: Sequence[dict], workdir: str | pathlib.Path, stem: str, *,
                caption: str | None = None, digits: int = 3) -> str:
  """Writes ``stem.md`` (with ``caption``) and ``stem.csv``; returns the Markdown."""
  workdir = pathlib.Path(workdir)
  text = markdown(table, digits=digits, caption=caption)
  (workdir / f"{stem}.md").write_text(text)
  with open(workdir / f"{stem}.csv", "w", newline="") as f:
    if table:
      w = csv.DictWriter(f, fieldnames=list(table[0]))
      w.writeheader()
      w.writerows(table)
  return text


@contextlib.contextmanager
def rows(path: str | pathlib.Path) -> Iterator[Callable[[dict], None]]:
  """``with rows(workdir / "results.jsonl") as write: write(row)``: one JSON line per row."""
  with open(path, "w") as f:
    def write(row: dict) -> None:
      f.write(json.dumps(row) + "\n")
      f.flush()
    yield write


def read_rows(path: str | pathlib.Path) -> list[dict]:
  """The rows of a ``.jsonl`` file written by :func:`rows`."""
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line]


def save_config(config, workdir: str | pathlib.Path, name: str = "config.json") -> None:
  """Writes the config a program ran with (``config.to_json_best_effort``) into workdir."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  text = config.to_json_best_effort(indent=2) if hasattr(config, "to_json_best_effort") \
      else json.dumps(dict(config), indent=2, default=str)
  (workdir / name).write_text(text + "\n")


def monte_carlo_caption(*, sigma: Any, n0: int | None, n: int, alpha: float | None,
                        images: int, bound: str | None = None) -> str:
  """``"sigma = ..., n0 = ..., n = ..., alpha = ..., bound ..., N images"``."""
  sigmas = ", ".join(f"{float(s):g}" for s in (sigma if isinstance(sigma, (list, tuple))
                                               else [sigma]))
  parts = [f"sigma = {sigmas}"]
  if n0 is not None:
    parts.append(f"n0 = {int(n0)}")
  parts.append(f"n = {int(n)}")
  if alpha is not None:
    parts.append(f"alpha = {float(alpha):g}")
  if bound is not None:
    parts.append(f"bound {bound}")
  parts.append(f"{int(images)} images")
  return ", ".join(parts)


def pyplot():
  """matplotlib's pyplot on the Agg backend (files only, no screen)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def image_strip(panels, path: str | pathlib.Path, *, title: str, scale: float = 2.2) -> None:
  """PNG grid of images with captions: ``panels[i]`` is row i, a list of ``(image, text)``.

  The attack tables draw clean | adversarial per row (with what that row's model answered)
  | target; images are ``[H, W, 3]`` in [0, 1].
  """
  plt = pyplot()
  cols = max(len(row) for row in panels)
  size = (scale * cols, (scale + 0.2) * len(panels))
  fig, axes = plt.subplots(len(panels), cols, figsize=size, squeeze=False)
  for ax_row, row in zip(axes, panels):
    for ax in ax_row:
      ax.axis("off")
    for ax, (img, text) in zip(ax_row, row):
      ax.imshow(np.clip(img, 0, 1))
      ax.set_title(text, fontsize=6)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


class SampleProgress:
  """A program's one progress bar over its Monte Carlo: noise samples x images, with an ETA.

  ``with SampleProgress(total, "certify") as progress:``, then for each certify call
  ``progress.task(label, images=B)`` gives the ``progress`` callable the certify
  functions take (advanced by noise samples; the bar counts samples x B). The label is the
  bar's postfix; the first task with a new ``compile_key`` (e.g. variant and batch shape)
  says "compiling" until its first chunk of samples is done, so a long first compilation
  shows something. ``grow(samples)`` adds work found on the way (e.g. audit pairs).
  """

  def __init__(self, total: int, desc: str):
    self.bar = tqdm.tqdm(total=int(total), desc=desc, unit="sample", unit_scale=True,
                         dynamic_ncols=True)
    self._compiled: set[Hashable] = set()

  def task(self, label: str, *, images: int,
           compile_key: Hashable | None = None) -> Callable[[int], None]:
    """Shows ``label``; returns ``advance(samples)``, which adds ``samples x images``."""
    compiling = compile_key is not None and compile_key not in self._compiled
    self._compiled.add(compile_key)
    self.bar.set_postfix_str(f"{label} (compiling first)" if compiling else label)

    def advance(samples: int) -> None:
      nonlocal compiling
      if compiling:  # the first chunk is done: compiled
        self.bar.set_postfix_str(label, refresh=False)
        compiling = False
      self.bar.update(int(samples) * int(images))
    return advance

  def grow(self, samples: int) -> None:
    """Adds ``samples`` (already multiplied by images) to the bar's total."""
    self.bar.total += int(samples)
    self.bar.refresh()

  def __enter__(self) -> "SampleProgress":
    return self

  def __exit__(self, *exc) -> None:
    self.bar.close()
