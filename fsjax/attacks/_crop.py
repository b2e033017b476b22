"""RandomResizedCrop as a differentiable, jit-friendly function of the pixels.

M-Attack and FOA-Attack crop the adversarial image and the target image afresh every step
(torchvision's ``RandomResizedCrop(size, scale=(0.5, 0.9))``, default aspect ratios
[3/4, 4/3]) and resize the crop back to the input size. Here the crop box is a traced,
continuous ``(top, left, height, width)`` and the resampling is bilinear
``jax.image.scale_and_translate``, so the crop is differentiable in the pixels and
compiles once for any box.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp


@functools.partial(jax.jit, static_argnames=("batch", "height", "width", "scale", "ratio"))
def sample_crop_boxes(key: jax.Array, batch: int, height: int, width: int, *,
                      scale: tuple[float, float] = (0.5, 0.9),
                      ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> jax.Array:
  """Samples one RandomResizedCrop box per image.

  The area fraction ``s ~ U(scale)``; the aspect ratio ``r = w / h`` is log-uniform on the
  part of ``ratio`` where a box of area ``s * H * W`` fits in the image. Given ``s``
  this is exactly torchvision's rejection sampling; unlike torchvision (which weighs
  ``s`` by how often it fits, and after 10 misses falls back to the whole image) the area
  always lies in ``scale``. If no ratio in ``ratio`` fits (extreme image aspect), the
  nearest fitting ratio is used. The offsets are uniform over the positions that keep
  the box inside the image; all four numbers are continuous (no rounding to pixels).

  Args:
    key: PRNG key.
    batch: B, the number of boxes.
    height: H of the images.
    width: W of the images.
    scale: bounds of the area fraction, ``0 < lo <= hi <= 1``.
    ratio: bounds of the aspect ratio w / h, ``0 < lo <= hi``.

  Returns:
    ``[B, 4]`` float32 boxes ``(top, left, crop_height, crop_width)`` in pixels.
  """
  k_s, k_r, k_t, k_l = jax.random.split(key, 4)
  s = jax.random.uniform(k_s, (batch,), jnp.float32, scale[0], scale[1])
  # w = sqrt(s H W r) <= W  <=>  r <= W / (s H);  h = sqrt(s H W / r) <= H  <=>  r >= s W / H.
  fit_lo, fit_hi = jnp.log(s * width / height), jnp.log(width / (s * height))
  lo = jnp.maximum(math.log(ratio[0]), fit_lo)
  hi = jnp.minimum(math.log(ratio[1]), fit_hi)
  u = jax.random.uniform(k_r, (batch,), jnp.float32)
  nearest = jnp.clip(0.5 * (math.log(ratio[0]) + math.log(ratio[1])), fit_lo, fit_hi)
  log_r = jnp.where(lo <= hi, lo + u * (hi - lo), nearest)
  area = s * height * width
  h = jnp.minimum(jnp.sqrt(area * jnp.exp(-log_r)), height)
  w = jnp.minimum(jnp.sqrt(area * jnp.exp(log_r)), width)
  top = jax.random.uniform(k_t, (batch,), jnp.float32) * (height - h)
  left = jax.random.uniform(k_l, (batch,), jnp.float32) * (width - w)
  return jnp.stack([top, left, h, w], axis=-1)


@jax.jit
def crop_and_resize(x: jax.Array, boxes: jax.Array) -> jax.Array:
  """Crops each image to its box and resizes the crop (bilinear) back to ``[H, W]``.

  Args:
    x: ``[B, H, W, C]`` images.
    boxes: ``[B, 4]`` boxes ``(top, left, crop_height, crop_width)`` inside the images.

  Returns:
    ``[B, H, W, C]``, differentiable in ``x``.
  """
  _, height, width, channels = x.shape

  def one(image, box):
    top, left, h, w = box[0], box[1], box[2], box[3]
    # Output coordinate = input coordinate * scale + translation (half-pixel centres):
    # the box [top, top + h] x [left, left + w] fills the whole output.
    scale = jnp.stack([height / h, width / w])
    translation = -jnp.stack([top, left]) * scale
    return jax.image.scale_and_translate(image, (height, width, channels), (0, 1), scale,
                                         translation, method="linear", antialias=True)

  return jax.vmap(one)(x, boxes).astype(x.dtype)


def random_resized_crop(key: jax.Array, x: jax.Array, *,
                        scale: tuple[float, float] = (0.5, 0.9),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> jax.Array:
  """``[B, H, W, C]`` -> ``[B, H, W, C]``: an independent random resized crop per image."""
  boxes = sample_crop_boxes(key, x.shape[0], x.shape[1], x.shape[2], scale=scale,
                            ratio=ratio)
  return crop_and_resize(x, boxes)


def check_crop(scale, ratio) -> None:
  """Raises ValueError for crop bounds RandomResizedCrop cannot honour."""
  if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
    raise ValueError(f"scale={scale!r} must be (lo, hi) with 0 < lo <= hi <= 1: the "
                     "fraction of the image area a crop keeps (paper: (0.5, 0.9)).")
  if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
    raise ValueError(f"ratio={ratio!r} must be (lo, hi) with 0 < lo <= hi: the crop's "
                     "aspect ratio width / height (default (3/4, 4/3)).")
