"""The one report writer of the experiment programs: rows, tables, settings, figures.

Every program writes the same kinds of files into its workdir:

* ``<name>.jsonl``: one JSON row per measured unit (an image, at a variant, sigma, ...),
  written as it is measured, so an interrupted run keeps what it did;
* ``<stem>.md`` / ``<stem>.csv``: the summary table, the Markdown with a caption saying
  what the numbers are (alpha, n0, n, sigma, number of images);
* ``config.json``: the config the program ran with;
* PNG figures, drawn with matplotlib's Agg backend (no screen needed).

Nothing half-written, nothing mixed (issue 21):

* every file but the rows is written to a temporary file in the same folder and renamed
  over the old one (:func:`write_text`, :func:`save_figure`): a reader sees the old file
  or the new one, never a torn one;
* a run writes nothing until it is accepted: :func:`rows` checks the folder and writes
  the config file right before the first row (arguments, data and checkpoints are checked
  before that, so a refused run leaves the folder as it was);
* the rows are appended, never truncated. A folder holding rows of a *different* config
  is refused in one line (use another ``--workdir``, or delete the folder), so the
  rows, tables, figures and config file of a folder always describe the same config. A
  re-run with the *same* config appends its rows after the old ones (same config and
  seed: the same numbers), and then replaces the tables and figures;
  ``read_rows(path, key=...)`` keeps the last row per unit;
* resuming: :func:`done_rows` gives the rows an earlier run of the same config left,
  by key, so a program skips what is done (``certify.run``: every (batch, variant,
  sigma) whose rows are all there) and ends with the table an uninterrupted run makes;
* a torn last line (a run killed mid-write) is dropped by :func:`read_rows`, and cut off
  before :func:`rows` appends.

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
import io
import json
import os
import pathlib
import sys
from typing import Any, Callable, Hashable, Iterator, Sequence

import numpy as np
import tqdm

from fsjax import cli
from fsjax import cpu
from fsjax import tables


def markdown(table: Sequence[dict], *, digits: int = 3, caption: str | None = None) -> str:
  """A Markdown table of ``table``'s rows (columns: the first row's keys, in order)."""
  return tables.records(table, digits=digits, caption=caption)


@contextlib.contextmanager
def replacing(path: str | pathlib.Path) -> Iterator[pathlib.Path]:
  """``with replacing(path) as tmp: write tmp``: on success ``tmp`` is renamed over
  ``path`` (``os.replace``, atomic within a folder); on failure it is removed and
  ``path`` is untouched."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def write_text(path: str | pathlib.Path, text: str) -> None:
  """Writes ``text`` to ``path`` atomically (:func:`replacing`)."""
  with replacing(path) as tmp:
    tmp.write_text(text)


def save_figure(fig, path: str | pathlib.Path, **savefig_kwargs) -> None:
  """``fig.savefig`` into ``path`` atomically (format from ``path``'s suffix)."""
  path = pathlib.Path(path)
  with replacing(path) as tmp:
    fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", **savefig_kwargs)


def write_table(table: Sequence[dict], workdir: str | pathlib.Path, stem: str, *,
                caption: str | None = None, digits: int = 3) -> str:
  """Writes ``stem.md`` (with ``caption``) and ``stem.csv`` atomically; returns the Markdown."""
  workdir = pathlib.Path(workdir)
  text = markdown(table, digits=digits, caption=caption)
  out = io.StringIO(newline="")
  if table:
    w = csv.DictWriter(out, fieldnames=list(table[0]))
    w.writeheader()
    w.writerows(table)
  write_text(workdir / f"{stem}.md", text)
  with replacing(workdir / f"{stem}.csv") as tmp:
    tmp.write_text(out.getvalue(), newline="")
  return text


def compute_dtype(config) -> str | None:
  """The encoder's compute dtype as it runs here (``config.encoder.dtype``, ``"auto"``
  resolved by :func:`fsjax.cpu.resolve_dtype`); None for a config without one."""
  encoder = config.get("encoder") if hasattr(config, "get") else None
  dtype = encoder.get("dtype") if hasattr(encoder, "get") else None
  return None if dtype is None else cpu.resolve_dtype(dtype)


def _config_text(config) -> str:
  """The config as JSON, plus ``compute_dtype`` (:func:`compute_dtype`): the same config
  file says "auto" on every machine, while the numbers depend on what it resolved to."""
  if hasattr(config, "to_json_best_effort"):
    data = json.loads(config.to_json_best_effort())
  else:
    data = json.loads(json.dumps(dict(config), default=str))
  dtype = compute_dtype(config)
  if dtype is not None:
    data["compute_dtype"] = dtype
  return json.dumps(data, indent=2) + "\n"


def _has_rows(path: pathlib.Path) -> bool:
  """Whether ``path`` holds a complete row (its first line; a torn one does not count)."""
  if not path.exists():
    return False
  with open(path, "rb") as f:
    line = f.readline()
  return line.endswith(b"\n") and bool(line.strip())


def check_workdir(config, rows_path: str | pathlib.Path, config_name: str = "config.json"
                  ) -> None:
  """Refuses (ValueError, one line) a folder whose ``rows_path`` holds rows of another
  config than ``config`` (or of an unknown one: no ``config_name`` beside them)."""
  rows_path = pathlib.Path(rows_path)
  if not _has_rows(rows_path):
    return
  saved = rows_path.parent / config_name
  fix = (f"use another --workdir, or delete {rows_path.parent} to start again")
  if not saved.exists():
    raise ValueError(f"{rows_path} holds rows but no {config_name} says which config made "
                     f"them: {fix}.")
  try:
    differ = cli.config_differences(json.loads(saved.read_text()),
                                    json.loads(_config_text(config)), prefix="")
  except json.JSONDecodeError:
    differ = [f"{config_name} is not JSON"]
  if differ:
    shown = "; ".join(differ[:3]) + (f"; {len(differ) - 3} more" if len(differ) > 3 else "")
    raise ValueError(f"{rows_path.parent} holds results of a different config "
                     f"({config_name} differs: {shown}); appending would mix two runs: "
                     f"{fix}.")


def save_config(config, workdir: str | pathlib.Path, name: str = "config.json") -> None:
  """Writes the config a program ran with (``config.to_json_best_effort``) atomically."""
  write_text(pathlib.Path(workdir) / name, _config_text(config))


def _drop_torn_tail(path: pathlib.Path) -> None:
  """Cuts a torn last line (no newline: the writer was killed mid-row) off ``path``."""
  if not path.exists() or path.stat().st_size == 0:
    return
  with open(path, "rb+") as f:
    f.seek(-1, os.SEEK_END)
    if f.read(1) == b"\n":
      return
    f.seek(0)
    data = f.read()
    keep = data.rfind(b"\n") + 1
    f.truncate(keep)
  print(f"{path}: dropped a torn last row ({len(data) - keep} bytes; the run that wrote it "
        "was killed mid-write)", file=sys.stderr)


@contextlib.contextmanager
def rows(path: str | pathlib.Path, config=None, *, config_name: str = "config.json"
         ) -> Iterator[Callable[[dict], None]]:
  """``with rows(workdir / "results.jsonl", config) as write: write(row)``: one JSON line
  per row, appended (never truncated) and flushed as it is written.

  With ``config``: first :func:`check_workdir` (a folder holding rows of another config
  is refused), then ``config_name`` is written beside the rows. Call it once the run is
  accepted (arguments, data and checkpoints checked), so a refused run writes nothing.
  """
  path = pathlib.Path(path)
  if config is not None:
    check_workdir(config, path, config_name)
    save_config(config, path.parent, config_name)
  path.parent.mkdir(parents=True, exist_ok=True)
  _drop_torn_tail(path)
  with open(path, "a") as f:
    def write(row: dict) -> None:
      f.write(json.dumps(row) + "\n")
      f.flush()
    yield write


def read_rows(path: str | pathlib.Path, key: Sequence[str] | None = None) -> list[dict]:
  """The rows of a ``.jsonl`` file written by :func:`rows`, in order.

  A torn last line (no final newline: the writer was killed mid-row) is dropped; a bad
  line elsewhere is a ValueError naming the file and line. With ``key`` (column names,
  e.g. ``("image", "variant", "sigma", "reference", "bound")``) only the last row of each
  key is kept, at the place of the key's first row (a re-run appends its rows again).
  """
  path = pathlib.Path(path)
  lines = path.read_text().split("\n")
  lines.pop()  # "" after the final newline, or the torn last line
  out = []
  for i, line in enumerate(lines):
    if not line:
      continue
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{i + 1}: not a JSON row ({e.msg}); the file is damaged: "
                       "delete that line or the file") from None
  if key is None:
    return out
  last = {}
  for r in out:
    last[tuple(r.get(k) for k in key)] = r  # dict keeps the first insertion's place
  return list(last.values())


def _numeric_keys(value: Any) -> Any:
  """``value`` with the keys of its dicts that JSON turned from floats into strings
  (``{"0.5": B}`` of ``inner_product_bound``) turned back into floats."""
  if isinstance(value, dict):
    out = {}
    for k, v in value.items():
      try:
        k = float(k) if isinstance(k, str) else k
      except ValueError:
        pass
      out[k] = _numeric_keys(v) if isinstance(v, dict) else v
    return out
  return value


def as_read(row: dict) -> dict:
  """``row`` as :func:`done_rows` reads it back from the file (JSON's round trip, float
  keys restored): a run that resumes and one that does not then summarise the same
  values, bit for bit."""
  return {k: _numeric_keys(v) for k, v in json.loads(json.dumps(row)).items()}


def done_rows(path: str | pathlib.Path, key: Sequence[str]) -> dict[tuple, dict]:
  """What a resumed run may skip: the rows ``path`` holds, ``{(row[k] for k in key): row}``
  (the last row of each key; each as :func:`as_read` gives it), ``{}`` without a file.

  Resuming is safe only for the same config: call :func:`check_workdir` first (it
  refuses a folder holding another config's rows). A program then skips the units whose
  keys are all present, certifies the others, and builds its tables from
  ``{**done, **new}`` in its own canonical order, so an interrupted and resumed run ends
  with the same table as an uninterrupted one.
  """
  path = pathlib.Path(path)
  if not path.exists():
    return {}
  return {tuple(r.get(k) for k in key): as_read(r) for r in read_rows(path)}


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


# Judged outcomes of an answer in an image strip: its caption's colour and its frame.
OUTCOMES = {"correct": "tab:green", "attacked": "tab:red", "other": "tab:orange"}
OUTCOMES_LEGEND = ("framed: adversarial images; green = correct answer, red = the "
                   "attacker's target, orange = neither")


def image_strip(panels, path: str | pathlib.Path, *, title: str, scale: float = 2.8,
                fontsize: float = 9) -> None:
  """PNG grid of images with captions: ``panels[i]`` is row i, a list of ``(image, text)``
  or ``(image, text, outcome)``.

  The attack tables draw clean | adversarial per row (with what that row's model answered)
  | target; images are ``[H, W, 3]`` in [0, 1]. A panel with an ``outcome`` (a key of
  :data:`OUTCOMES`: the judged answer, e.g. "attacked" where the attacker's target won) is
  framed and captioned in that colour, and the legend (:data:`OUTCOMES_LEGEND`) goes under
  the title.
  """
  plt = pyplot()
  cols = max(len(row) for row in panels)
  lines = max(str(p[1]).count("\n") + 1 for row in panels for p in row)
  size = (scale * cols, (scale + 0.3 + 0.22 * lines * fontsize / 9) * len(panels))
  fig, axes = plt.subplots(len(panels), cols, figsize=size, squeeze=False)
  framed = False
  for ax_row, row in zip(axes, panels):
    for ax in ax_row:
      ax.axis("off")
    for ax, panel in zip(ax_row, row):
      img, text, outcome = (tuple(panel) + (None,))[:3]
      if outcome is not None and outcome not in OUTCOMES:
        raise ValueError(f"outcome={outcome!r} must be one of {sorted(OUTCOMES)} or None.")
      ax.imshow(np.clip(img, 0, 1))
      colour = OUTCOMES.get(outcome, "black")
      ax.set_title(text, fontsize=fontsize, color=colour)
      if outcome is not None:
        framed = True
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
          spine.set_color(colour)
          spine.set_linewidth(4)
  fig.suptitle(f"{title}\n{OUTCOMES_LEGEND}" if framed else title, fontsize=fontsize + 2)
  fig.tight_layout()
  save_figure(fig, path, dpi=100)
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
