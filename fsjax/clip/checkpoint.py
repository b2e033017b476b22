"""Loading CLIP checkpoints from local files into the Flax tree of ``fsjax.clip.model``.

No network access and no torch needed (torch only reads pickled ``.bin``/``.pt`` files).
Formats, recognised from what the path holds:

* Hugging Face directory: ``config.json`` plus, tried in this order,
  ``model.safetensors``, sharded ``model.safetensors.index.json``,
  ``flax_model.msgpack`` (the HF Flax params dict, serialised without a "params" key),
  ``pytorch_model.bin``. Full ``CLIPModel`` and vision-only
  ``CLIPVisionModelWithProjection`` checkpoints. A Hugging Face cache repository folder
  (``.../hub/models--openai--clip-vit-large-patch14``) resolves to its snapshot.
* OpenCLIP: a ``.safetensors``/``.pt``/``.bin``/``.pth`` file (or a directory holding
  ``open_clip_model.safetensors`` / ``open_clip_pytorch_model.bin``) with OpenCLIP keys
  (``visual.conv1.weight``, ``visual.transformer.resblocks.N.attn.in_proj_weight``, ...,
  ``token_embedding.weight``, ``ln_final``, ``text_projection``, ``logit_scale``). A
  ``state_dict`` wrapper and ``module.`` prefixes are removed. A visual-only state dict
  without the ``visual.`` prefix (how FARE/TeCoA robust encoders are released: the
  ``model.visual`` state dict of OpenCLIP ViT-L-14) loads as a vision-only model. The
  architecture is inferred from the shapes, except the activation and the head width,
  which are arguments.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Mapping

import flax.serialization
import flax.traverse_util
import jax.numpy as jnp
import numpy as np

from fsjax import weights
from fsjax.clip import model as model_lib

_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "flax_model.msgpack",
               "pytorch_model.bin")
_OPENCLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# Buffers that some writers save but that are not parameters (positions, causal masks).
_IGNORED = re.compile(r"(^|\.)(position_ids|attn_mask)$")


def load(path: str | os.PathLike, *, dtype: Any = jnp.float32,
         openclip_hidden_act: str = "quick_gelu",
         openclip_head_width: int = 64) -> tuple[model_lib.CLIP, dict]:
  """Loads a local CLIP checkpoint: ``model, params = load(path)``.

  Args:
    path: a Hugging Face checkpoint directory, a Hugging Face cache repository folder,
      or an OpenCLIP checkpoint file or directory (see the module docstring).
    dtype: compute dtype of the returned model (``jnp.float32`` or ``jnp.bfloat16``).
      Parameters are always returned as float32 (a half-precision checkpoint is upcast);
      the model casts them per operation. Cast the tree yourself to store them in bf16.
    openclip_hidden_act: activation of an OpenCLIP checkpoint, which the file does not
      record. "quick_gelu" (default) is right for OpenAI-pretrained weights and their
      fine-tunes (FARE, TeCoA, ``ViT-L-14`` with ``pretrained="openai"``); LAION-trained
      OpenCLIP models without "-quickgelu" in their name use "gelu".
    openclip_head_width: OpenCLIP attention head width (heads = width / head_width); 64
      for every OpenCLIP ViT and text tower. Ignored for Hugging Face checkpoints.

  Returns:
    ``(model, params)``: a :class:`fsjax.clip.model.CLIP` and its parameter tree.

  Raises:
    ValueError: if the path does not exist or holds no known checkpoint, if a pickle must
      be read without torch, or if parameters are missing, unexpected or mis-shaped (one
      error listing every such parameter with the expected and found shapes).
  """
  path = _resolve(path)
  if os.path.isdir(path):
    if os.path.exists(os.path.join(path, "config.json")):
      directory = weights.hf_directory(path, what="CLIP", weight_files=_HF_WEIGHTS)
      config = model_lib.CLIPConfig.from_hf_dict(directory.config)
      if directory.weights.endswith(".msgpack"):
        flat, sources = _read_flax_msgpack(directory.weights)
      else:
        flat, sources = _hf_torch_to_flax(_read_state_dict(directory.weights))
      return _build(config, flat, sources, dtype=dtype, origin=directory.weights)
    weight_file = next((os.path.join(path, w) for w in _OPENCLIP_WEIGHTS
                        if os.path.exists(os.path.join(path, w))), None)
    if weight_file is None:
      raise ValueError(f"{path} is neither a Hugging Face CLIP directory (config.json + "
                       f"weights) nor an OpenCLIP one ({' or '.join(_OPENCLIP_WEIGHTS)}).")
    path = weight_file
  state = _read_state_dict(path)
  if any(k.startswith(("vision_model.", "text_model.")) for k in state):
    raise ValueError(f"{path} holds Hugging Face CLIP weights, which need their config: pass "
                     "the directory that holds config.json and the weights.")
  state = _openclip_unwrap(state)
  config = _openclip_config(state, hidden_act=openclip_hidden_act,
                            head_width=openclip_head_width, origin=path)
  flat, sources = _openclip_to_flax(state)
  return _build(config, flat, sources, dtype=dtype, origin=path)


def _resolve(path) -> str:
  """:func:`fsjax.weights.resolve` of a CLIP checkpoint path."""
  return weights.resolve(path, what="CLIP checkpoint path")


def _read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a PyTorch-style state dict (names -> numpy arrays) from one weight file.

  safetensors files and shard indexes through :mod:`fsjax.weights`; a single pickle with
  ``torch.load(weights_only=True)``, upcasting bfloat16 to float32.
  """
  if path.endswith(".safetensors") or path.endswith(".index.json"):
    return weights.read_state_dict(path)
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError(
        f"{path} is a PyTorch pickle, and reading it needs torch, which is not installed. "
        "Install torch (CPU is enough), or convert it once elsewhere: "
        "safetensors.torch.save_file(torch.load(path, weights_only=True), "
        "'model.safetensors').") from None
  obj = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path} does not hold a state dict (got {type(obj).__name__}).")
  # numpy has no bfloat16 view of a torch tensor: upcast floats to float32 here.
  return {k: (v.float() if v.is_floating_point() else v).numpy()
          for k, v in obj.items() if hasattr(v, "numpy")}


def _read_flax_msgpack(path: str):
  with open(path, "rb") as f:
    tree = flax.serialization.msgpack_restore(f.read())
  if set(tree) == {"params"}:  # also accept a tree saved with its "params" collection
    tree = tree["params"]
  flat = {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(tree, sep="/").items()}
  return flat, {k: (k, v.shape) for k, v in flat.items()}


def _hf_torch_to_flax(state: Mapping[str, np.ndarray]):
  """HF PyTorch names and layouts -> flat Flax tree ``{"a/b/kernel": array}``.

  Returns the flat tree and, for each Flax path, the source ``(name, shape)``.
  """
  flat, sources = {}, {}
  for key, value in state.items():
    if _IGNORED.search(key):
      continue
    *scope, leaf = key.split(".")
    parent = scope[-1] if scope else ""
    if leaf == "weight":
      if "norm" in parent:  # layer_norm1/2, pre_layrnorm, post_layernorm, final_layer_norm
        leaf = "scale"
      elif parent in ("token_embedding", "position_embedding"):
        leaf = "embedding"
      else:
        leaf = "kernel"
        if value.ndim == 4:  # Conv2d OIHW -> HWIO
          value = value.transpose(2, 3, 1, 0)
        elif value.ndim == 2:  # Linear [out, in] -> [in, out]
          value = value.T
    path = "/".join(scope + [leaf])
    flat[path], sources[path] = value, (key, state[key].shape)
  return flat, sources


def _openclip_unwrap(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Strips DDP ``module.`` prefixes; adds ``visual.`` to a bare visual state dict."""
  state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
  if "conv1.weight" in state and not any(k.startswith("visual.") for k in state):
    state = {"visual." + k: v for k, v in state.items()}
  return state


def _openclip_config(state, *, hidden_act, head_width, origin) -> model_lib.CLIPConfig:
  """Infers the architecture of an OpenCLIP state dict from its shapes."""
  def need(key):
    if key not in state:
      raise ValueError(f"{origin} is not a CLIP checkpoint in a known format: no {key!r} "
                       f"(first keys: {sorted(state)[:5]}).")
    return state[key]

  def tower(prefix):
    blocks = {int(m.group(1)) for k in state
              if (m := re.match(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.", k))}
    width = need(prefix + "transformer.resblocks.0.ln_1.weight").shape[0]
    if width % head_width:
      raise ValueError(f"{origin}: width {width} is not a multiple of "
                       f"openclip_head_width={head_width}.")
    return dict(hidden_size=width, num_hidden_layers=max(blocks) + 1,
                num_attention_heads=width // head_width,
                intermediate_size=need(prefix + "transformer.resblocks.0.mlp.c_fc.weight").shape[0],
                hidden_act=hidden_act, layer_norm_eps=1e-5)  # torch LayerNorm default eps

  patch = need("visual.conv1.weight").shape[-1]
  grid = math.isqrt(need("visual.positional_embedding").shape[0] - 1)
  projection_dim = need("visual.proj").shape[1]
  vision = model_lib.CLIPVisionConfig(image_size=grid * patch, patch_size=patch,
                                      projection_dim=projection_dim, **tower("visual."))
  if "token_embedding.weight" not in state:
    return model_lib.CLIPConfig(vision, None, projection_dim=projection_dim)
  vocab = need("token_embedding.weight").shape[0]
  # OpenCLIP pools at the highest token id (end-of-text, the last id of CLIP's vocabulary);
  # "first eos_token_id" with eos = vocab - 1 picks the same position for its tokenizer.
  text = model_lib.CLIPTextConfig(
      vocab_size=vocab, max_position_embeddings=need("positional_embedding").shape[0],
      projection_dim=need("text_projection").shape[1], bos_token_id=vocab - 2,
      eos_token_id=vocab - 1, pad_token_id=0, **tower(""))
  return model_lib.CLIPConfig(vision, text, projection_dim=projection_dim)


_OPENCLIP_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2",
                   "attn.out_proj": "self_attn/out_proj", "mlp.c_fc": "mlp/fc1",
                   "mlp.c_proj": "mlp/fc2"}
_OPENCLIP_TOP = {
    "visual.class_embedding": "vision_model/embeddings/class_embedding",
    "visual.positional_embedding": "vision_model/embeddings/position_embedding/embedding",
    "visual.conv1.weight": "vision_model/embeddings/patch_embedding/kernel",
    "visual.proj": "visual_projection/kernel",  # stored [width, out] already: no transpose
    "token_embedding.weight": "text_model/embeddings/token_embedding/embedding",
    "positional_embedding": "text_model/embeddings/position_embedding/embedding",
    "text_projection": "text_projection/kernel",
    "logit_scale": "logit_scale",
}
_OPENCLIP_LN = {"visual.ln_pre": "vision_model/pre_layrnorm",
                "visual.ln_post": "vision_model/post_layernorm",
                "ln_final": "text_model/final_layer_norm"}


def _openclip_to_flax(state: Mapping[str, np.ndarray]):
  """OpenCLIP names and layouts -> flat Flax tree, and the source of each Flax path."""
  flat, sources = {}, {}

  def put(path, value, key):
    flat[path], sources[path] = value, (key, state[key].shape)

  for key, value in state.items():
    if _IGNORED.search(key):
      continue
    # "...resblocks.N.mlp.c_fc.weight", and the fused "...resblocks.N.attn.in_proj_weight".
    m = re.match(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+?)[._](weight|bias)$", key)
    if key in _OPENCLIP_TOP:
      if key == "visual.conv1.weight" and value.ndim == 4:
        value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
      put(_OPENCLIP_TOP[key], value, key)
    elif (ln := key.rsplit(".", 1)[0]) in _OPENCLIP_LN and key.endswith((".weight", ".bias")):
      put(f"{_OPENCLIP_LN[ln]}/{'scale' if key.endswith('weight') else 'bias'}", value, key)
    elif m:
      tower = "vision_model" if m.group(1) else "text_model"
      prefix, module, leaf = f"{tower}/encoder/layers/{m.group(2)}", m.group(3), m.group(4)
      is_ln = module.startswith("ln_")
      new_leaf = "bias" if leaf == "bias" else "scale" if is_ln else "kernel"
      if new_leaf == "kernel":
        value = value.T  # Linear [out, in] -> [in, out]
      if module == "attn.in_proj" and value.shape[-1] % 3 == 0:
        # Fused [q; k; v] (rows of torch.nn.MultiheadAttention's weight; columns once transposed).
        for name, part in zip("qkv", np.split(value, 3, axis=-1)):
          put(f"{prefix}/self_attn/{name}_proj/{new_leaf}", part, key)
      elif module in _OPENCLIP_BLOCK:
        put(f"{prefix}/{_OPENCLIP_BLOCK[module]}/{new_leaf}", value, key)
      else:
        put(key, value, key)  # unknown: reported as unexpected under its own name
    else:
      put(key, value, key)
  return flat, sources


def _build(config, flat, sources, *, dtype, origin):
  """Checks the flat tree against the model's parameter shapes and builds ``params``."""
  model = model_lib.CLIP(config, dtype=dtype)
  expected = {k: tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(
      model_lib.param_shapes(model), sep="/").items()}
  problems = shape_problems(expected, flat, sources)
  if problems:
    raise ValueError(f"{origin} does not match the CLIP architecture "
                     f"({_describe(config)}); {len(problems)} problem(s):\n" + "\n".join(problems))
  params = {k: jnp.asarray(np.asarray(v, np.float32)) for k, v in flat.items()}
  return model, flax.traverse_util.unflatten_dict(params, sep="/")


def shape_problems(expected: Mapping[str, tuple], flat: Mapping[str, Any],
                   sources: Mapping[str, tuple]) -> list[str]:
  """One line per missing, mis-shaped or unexpected parameter (empty when all match).

  Args:
    expected: flat Flax path -> expected shape.
    flat: flat Flax path -> array read from the checkpoint.
    sources: flat Flax path -> ``(checkpoint key, checkpoint shape)`` it came from.
  """
  problems = []
  for path, shape in sorted(expected.items()):
    if path not in flat:
      problems.append(f"  missing    {path}: expected {shape}, found nothing")
    elif tuple(flat[path].shape) != shape:
      key, src_shape = sources[path]
      problems.append(f"  mis-shaped {path}: expected {shape}, found "
                      f"{tuple(flat[path].shape)} (from {key!r} of shape {tuple(src_shape)})")
  for path in sorted(set(flat) - set(expected)):
    key, src_shape = sources[path]
    problems.append(f"  unexpected {path}: expected nothing, found {tuple(flat[path].shape)} "
                    f"(from {key!r} of shape {tuple(src_shape)})")
  return problems


def _describe(config: model_lib.CLIPConfig) -> str:
  v = config.vision_config
  s = (f"vision: {v.num_hidden_layers} layers, width {v.hidden_size}, {v.num_attention_heads} "
       f"heads, patch {v.patch_size}, image {v.image_size}")
  if config.text_config is not None:
    t = config.text_config
    s += (f"; text: {t.num_hidden_layers} layers, width {t.hidden_size}, vocab "
          f"{t.vocab_size}")
  return s + f"; projection {config.projection_dim}"
