"""What longer GSB training buys: certified radius against the booster's training length.

For each length k (``--lengths``, default 1, 4 and 16 times the config's training), trains
the booster with every stage's epochs multiplied by k (warm-up, denoiser, mapper: the
same data, batch sizes and learning rates, the schedules stretched over the longer run)
into ``WORKDIR/x<k>`` with ``train.gsb``, then certifies ``--images`` test images with
``certify.run`` (betting bound, both references, the config's sigmas and eps) into
``WORKDIR/x<k>/table1``. Prints one Markdown table (per length and sigma: steps, training
time, the average certified radius R(cos >= 0.5) of FS, FS+D, FS+M and FS+D+M with the mean
reference, the gain FS+D+M / FS, and FS+D+M with the paper's clean reference) and writes
``WORKDIR/booster_length.md`` and ``booster_length.png`` (R against k).

Everything resumes: a length already trained or certified is read back, so Ctrl-C and the
same command again continue where it stopped. Training time is the wall clock of the
``train.gsb`` calls that trained it (summed when a length was resumed).

    python benchmarks/booster_length.py --config configs/default.py --workdir runs/booster_length
    python benchmarks/booster_length.py --config configs/default.py --workdir runs/booster_length \\
        --lengths=1,4 --images=8
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from benchmarks import common  # noqa: E402
from certify import report  # noqa: E402
from certify import run as certify_run  # noqa: E402
from fsjax import cli  # noqa: E402
from fsjax import gsb as gsb_lib  # noqa: E402
from train import gsb as train_gsb  # noqa: E402

VARIANTS = ("FS", "FS+D", "FS+M", "FS+D+M")
TIMING_FILE = "timing.json"


def scaled(config, k: int):
  """``config`` with every GSB stage's epochs multiplied by ``k``."""
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise ValueError(f"--lengths: each length must be an integer >= 1, got {k!r}.")
  config = config.copy_and_resolve_references()
  config.unlock()
  stages = gsb_lib.resolved_gsb_config(config)
  for stage, keys in (("denoiser", ("epochs", "warmup_epochs")), ("mapper", ("epochs",))):
    for key in keys:
      config.gsb[stage][key] = int(stages[stage][key]) * k
  return config


def certify_config(config, checkpoint: str, images: int):
  """The certification config of one length: ``images`` test images, betting only."""
  config = config.copy_and_resolve_references()
  config.unlock()
  config.gsb.checkpoint = checkpoint
  config.data.num_examples = images
  config.data.batch_size = min(int(config.data.batch_size), images)
  config.certify.bounds = ("betting",)
  config.certify.norm_aware = False
  config.certify.mode = "fixed"
  return config


def train(config, workdir: pathlib.Path) -> dict:
  """Trains (or resumes, or reads back) one length; returns its steps and seconds."""
  timing_file = workdir / TIMING_FILE
  timing = json.loads(timing_file.read_text()) if timing_file.exists() else {"seconds": 0.0}
  if not timing.get("finished"):
    start = time.perf_counter()
    try:
      train_gsb.train_and_evaluate(config, str(workdir))
    finally:  # interrupted too: the time it spent counts when the length resumes
      timing["seconds"] += time.perf_counter() - start
      report.write_text(timing_file, json.dumps(timing))
    timing["finished"] = True
    report.write_text(timing_file, json.dumps(timing))
  steps = {name: train_gsb._final_step(str(workdir), name) or 0  # pylint: disable=protected-access
           for name in train_gsb.STAGES}
  return {"steps": steps, "seconds": timing["seconds"]}


def radii(table: list[dict]) -> dict[tuple[str, float, str], float]:
  """``{(variant, sigma, reference): R(cos >= c)}`` of the betting rows of a summary."""
  out = {}
  for r in table:
    if r["bound"] == "betting":
      out[(r["variant"], float(r["sigma"]), r["reference"])] = next(
          v for k, v in r.items() if k.startswith("R("))
  return out


def report_rows(results: list[dict], sigmas: list[float]) -> tuple[list[str], list[list]]:
  """The Markdown table's header and rows: one row per (length, sigma)."""
  header = (["length", "D steps (warm-up + L_D)", "M steps", "train time", "sigma"]
            + [f"R {v}" for v in VARIANTS] + ["gain FS+D+M / FS", "R FS+D+M (clean ref.)"])
  rows = []
  for res in results:
    s, R = res["steps"], res["radii"]
    for sigma in sigmas:
      fs, boosted = R.get(("FS", sigma, "mean")), R.get(("FS+D+M", sigma, "mean"))
      rows.append([f"{res['k']}x", f"{s['warmup']} + {s['denoiser']}", s["mapper"],
                   f"{res['seconds'] / 60:.1f} min", f"{sigma:g}"]
                  + [_fmt(R.get((v, sigma, "mean"))) for v in VARIANTS]
                  + [f"{boosted / fs:.2f}x" if fs and boosted is not None else "-",
                     _fmt(R.get(("FS+D+M", sigma, "clean")))])
  return header, rows


def _fmt(x) -> str:
  return "-" if x is None else f"{x:.3f}"


def plot(results: list[dict], sigmas: list[float], path: pathlib.Path) -> None:
  """PNG: R(cos >= 0.5) (mean reference) of each variant against the training length."""
  plt = report.pyplot()
  fig, axes = plt.subplots(1, len(sigmas), figsize=(5 * len(sigmas) + 2, 3.5), squeeze=False)
  ks = [res["k"] for res in results]
  for ax, sigma in zip(axes[0], sigmas):
    for v in VARIANTS:
      ax.plot(ks, [res["radii"].get((v, sigma, "mean"), float("nan")) for res in results],
              marker="o", label=v)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [f"{k}x" for k in ks])
    ax.set_xlabel("training length (x the config's epochs)")
    ax.set_ylabel("average certified radius, cos >= 0.5")
    ax.set_title(f"sigma = {sigma:g} (mean reference, betting)")
    ax.grid(alpha=0.3)
  axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5))
  fig.tight_layout()
  report.save_figure(fig, path)
  plt.close(fig)


def main(config, workdir: str, lengths: list[str], images: int) -> None:
  ks = [int(k) for k in lengths]
  for k in ks:
    scaled(config, k)  # every length checked before anything trains
  if images < 1:
    raise ValueError(f"--images must be >= 1, got {images}.")
  workdir = pathlib.Path(workdir)
  sigmas = [float(s) for s in config.certify.sigmas]
  results = []
  for k in ks:
    here = workdir / f"x{k}"
    common.log(f"length {k}x: training the booster in {here}")
    config_k = scaled(config, k)
    trained = train(config_k, here)
    common.log(f"length {k}x: trained ({trained['seconds'] / 60:.1f} min); certifying "
               f"{images} images")
    table = certify_run.run(certify_config(config_k, str(here), images), str(here / "table1"))
    results.append({"k": k, **trained, "radii": radii(table)})
  header, rows = report_rows(results, sigmas)
  c = config.certify
  text = (f"Booster training length against certified radius: {images} "
          f"{config.data.name} test images, n0 = {c.n0}, n = {c.n}, alpha = {c.alpha}, "
          f"betting bound.\n\n" + common.markdown_table(header, rows) + "\n")
  report.write_text(workdir / "booster_length.md", text)
  plot(results, sigmas, workdir / "booster_length.png")
  print(text)
  common.log(f"wrote {workdir / 'booster_length.md'} and {workdir / 'booster_length.png'}")


def _define_flags() -> None:
  flags.DEFINE_list("lengths", ["1", "4", "16"],
                    "Training lengths, as multiples of the config's GSB epochs.")
  flags.DEFINE_integer("images", 16, "Test images to certify per length.")


if __name__ == "__main__":
  cli.run(main, workdir_help="Where each length's booster and certificates go.",
          define_extra=_define_flags)
