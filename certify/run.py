r"""The paper's Table 1 (feature certification) for the configured encoder(s).

  python -m certify.run --config configs/default.py --workdir /tmp/fsjax_certify
  python -m certify.run --config configs/default.py --workdir DIR --mode=prediction  # Table 2

For each encoder variant (the base encoder "FS"; with ``config.gsb.checkpoint`` also
"FS+D", "FS+M", "FS+D+M", the Table 6 ablation), each sigma and each image, one two-stage
Monte Carlo run gives every bound for both references (``clean``: the paper's u = f(x);
``mean``: the mean-direction certificate). The table averages over images:

* ``B@eps``: the bound on ``<f_s(x'), u>`` for ``||x' - x|| <= eps`` (the paper's FCSB
  average, negative values included, as the paper averages them);
* ``cert@eps``: the fraction of images whose cosine is certified (B >= 0);
* ``R``: the average certified radius for ``cos >= config.certify.cos`` (uncertified
  images count as radius 0).

Rows with bound ``point`` are the paper's plug-in estimates, NOT certificates. Writes
``results.jsonl`` (one row per image, variant, sigma, reference, bound), ``table.md``,
``table.csv`` and ``fcsb.png`` into the workdir.
"""

from __future__ import annotations

import collections
import csv
import json
import os
import pathlib
from typing import Any, Iterable

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from certify import _closed_form
from certify import _feature
from fsjax import cli
from fsjax import data as data_lib
from fsjax import encoders as encoders_lib



def encoder_variants(config) -> list[tuple[str, encoders_lib.Encoder, Any]]:
  """``[(name, encoder, params)]``: the base encoder, plus the GSB ablation if configured."""
  encoder, params = encoders_lib.build(config.encoder)
  variants = [("FS", encoder, params)]
  gsb = config.get("gsb")
  if gsb is not None and gsb.get("checkpoint"):
    from fsjax import gsb as gsb_lib  # pylint: disable=g-import-not-at-top
    variants += gsb_lib.ablation_variants(
        encoder, params, gsb_lib.checkpoint.load(gsb.checkpoint, config=config), config)
  return variants


def certify_images(variants, images: np.ndarray, labels: np.ndarray, config,
                   key: jax.Array) -> Iterable[dict]:
  """Yields one result row per (variant, sigma, image, reference, bound)."""
  c = config.certify
  eps = np.asarray(c.eps, np.float32)
  for v, (name, encoder, params) in enumerate(variants):
    for sigma in c.sigmas:
      # The same noise for every variant and image batch position: fold in sigma's index.
      k = jax.random.fold_in(key, int(round(sigma * 1e6)))
      out = _feature.score_deficits(params, images, encoder=encoder, sigma=sigma, key=k,
                                    n=c.n, n0=c.n0, alpha=c.alpha, bounds=tuple(c.bounds),
                                    chunk_size=c.chunk_size)
      for reference in c.references:
        for bound in c.bounds:
          deficit = out[reference][bound]
          inner = np.asarray(_closed_form.bound_from_deficit(deficit[:, None], eps, sigma))
          radius = np.asarray(_closed_form.radius_from_deficit(deficit, sigma, c.cos))
          for i in range(images.shape[0]):
            yield {"encoder": name, "sigma": float(sigma), "reference": reference,
                   "bound": bound, "certificate": bound != "point",
                   "label": int(labels[i]), "score": float(1.0 - deficit[i]),
                   "score_deficit": float(deficit[i]),
                   "inner_product_bound": dict(zip(map(float, eps), map(float, inner[i]))),
                   "radius": float(radius[i]), "cos": float(c.cos)}
    del v


def summarise(rows: list[dict], eps: Iterable[float]) -> list[dict]:
  """Averages result rows over images; one summary row per (encoder, sigma, ref, bound)."""
  groups = collections.defaultdict(list)
  for r in rows:
    groups[(r["encoder"], r["sigma"], r["reference"], r["bound"])].append(r)
  table = []
  for (enc, sigma, ref, bound), rs in groups.items():
    row = {"encoder": enc, "sigma": sigma, "reference": ref,
           "bound": bound if bound != "point" else "point (estimate)", "images": len(rs)}
    for e in eps:
      b = np.array([r["inner_product_bound"][float(e)] for r in rs])
      row[f"B@{e:g}"] = float(b.mean())
      row[f"cert@{e:g}"] = float((b >= 0).mean())
    row[f"R(cos>={rs[0]['cos']:g})"] = float(np.mean([max(r["radius"], 0.0) for r in rs]))
    table.append(row)
  return table


def write_table(table: list[dict], workdir: pathlib.Path, stem: str = "table") -> str:
  """Writes ``stem.md`` and ``stem.csv``; returns the Markdown."""
  cols = list(table[0])
  fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)
  md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  md += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in table]
  text = "\n".join(md) + "\n"
  (workdir / f"{stem}.md").write_text(text)
  with open(workdir / f"{stem}.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=cols)
    w.writeheader()
    w.writerows(table)
  return text


def plot(table: list[dict], eps, path: pathlib.Path) -> None:
  """PNG: average bound B against eps, one panel per sigma, one line per row."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  sigmas = sorted({r["sigma"] for r in table})
  fig, axes = plt.subplots(1, len(sigmas), figsize=(5 * len(sigmas), 4), squeeze=False)
  for ax, sigma in zip(axes[0], sigmas):
    for r in table:
      if r["sigma"] != sigma:
        continue
      style = "--" if r["bound"].startswith("point") else "-"
      ax.plot(eps, [r[f"B@{e:g}"] for e in eps], style, marker="o", ms=3,
              label=f"{r['encoder']} {r['reference']} {r['bound']}")
    ax.axhline(0.0, color="gray", lw=0.5)
    ax.set(title=f"sigma = {sigma:g}", xlabel="eps (l2, [0,1] pixels)",
           ylabel="average bound on cosine")
    ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run(config, workdir: str) -> list[dict]:
  """Certifies ``config.data`` images with every variant; writes results; returns the table."""
  if config.certify.get("distributed"):
    jax.distributed.initialize()
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  variants = encoder_variants(config)
  dataset = data_lib.from_config(config.data)
  key = jax.random.PRNGKey(config.seed)
  rows = []
  with open(workdir / "results.jsonl", "w") as f:
    for batch in tqdm.tqdm(dataset, desc="certify", unit="batch"):
      for row in certify_images(variants, batch["image"], batch["label"], config, key):
        rows.append(row)
        f.write(json.dumps(row) + "\n")
  table = summarise(rows, config.certify.eps)
  print(write_table(table, workdir))
  plot(table, list(config.certify.eps), workdir / "fcsb.png")
  return table


def main(config, workdir: str, mode: str = "feature") -> None:
  if mode == "prediction":
    from certify import table2  # pylint: disable=g-import-not-at-top
    table2.run_prediction(config, workdir)
  else:
    run(config, workdir)


if __name__ == "__main__":
  cli.run(main, workdir_help="Where results are written.", define_extra=lambda: flags.DEFINE_enum(
      "mode", "feature", ["feature", "prediction"],
      "feature: Table 1 (and the GSB ablation); prediction: Table 2 (certify.table2; run "
      "python -m train.head first)."))
