"""Loading OpenFlamingo and MPT from a user's local files; nothing is downloaded.

OpenFlamingo-9B comes in three parts, each loaded from its own path:

* ``checkpoint.pt`` (``openflamingo/OpenFlamingo-9B-vitl-mpt7b``): a torch state dict,
  read with :mod:`fsjax.torch_pickle` (an allow-listed unpickler: no code from the file
  runs). It holds the Perceiver resampler, the gated cross-attention blocks and the
  token embedding (with the rows OpenFlamingo added for ``<|endofchunk|>``, ``<image>``
  and ``<PAD>``: the vocabulary size is taken from it), and possibly the decoder too.
  OpenFlamingo's module wrapping names the same tensors several times
  (``lang_encoder.old_decoder_blocks.N.*`` and
  ``lang_encoder.transformer.blocks.N.decoder_layer.*`` are the decoder blocks;
  ``lang_encoder.gated_cross_attn_layers.N.*`` and
  ``lang_encoder.transformer.blocks.N.gated_cross_attn_layer.*`` the cross-attention):
  the aliases are merged (and must hold equal values). As OpenFlamingo's own
  ``load_state_dict(..., strict=False)``, it is applied on top of the next two parts.
* the MPT-7B Hugging Face folder (``config.json`` plus ``model.safetensors``, sharded
  safetensors, or ``pytorch_model*.bin`` shards with their index, the latter read with
  the same restricted unpickler).
* the vision tower: an OpenCLIP or Hugging Face CLIP ViT-L/14 (anything
  :func:`fsjax.clip.load` reads; FARE / TeCoA files included), used as
  ``ClipEncoder(feature="patch_tokens", layer=-1)``; or any ``(Encoder, params)`` pair.
  ``vision_encoder.*`` entries of ``checkpoint.pt`` (a frozen copy of the tower, absent
  from the released file) are not used.

Every mismatch (missing, unexpected, mis-shaped parameter) is reported in one error that
lists them all with their source names and shapes.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from fsjax import encoders
from fsjax import mllm
from fsjax import weights as weights_lib
from fsjax.clip import checkpoint as clip_checkpoint
from fsjax.clip import encoder as clip_encoder
from fsjax.flamingo import model as model_lib
from fsjax.flamingo import mpt

_MPT_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def to_flax(state: Mapping[str, np.ndarray], expected: Mapping[str, Any], *, origin: str,
            describe: str, dtype: Any = jnp.float32) -> dict:
  """Torch names and layouts -> the parameter tree ``expected``, checking every entry.

  The name rule: dots -> slashes; a ``weight`` becomes ``kernel`` (transposed: torch
  Linear is ``[out, in]``), ``scale`` (LayerNorm) or ``embedding`` (Embedding), whichever
  the expected tree has; other leaves keep their names.

  Args:
    state: torch name -> array.
    expected: the nested tree of the model's parameters (shapes from ``jax.eval_shape``).
    origin: where ``state`` came from (for the error).
    describe: the architecture in words (for the error).
    dtype: the dtype the parameters are stored in.

  Returns:
    The nested parameter tree.

  Raises:
    ValueError: listing every missing, unexpected or mis-shaped parameter.
  """
  shapes = {k: tuple(v.shape) for k, v in
            flax.traverse_util.flatten_dict(expected, sep="/").items()}
  flat, sources = {}, {}
  for key, value in state.items():
    path = key.replace(".", "/")
    if path.endswith("/weight"):
      stem = path[:-len("weight")]
      for leaf in ("kernel", "scale", "embedding"):
        if stem + leaf in shapes:
          path = stem + leaf
          break
      if path.endswith("/kernel") and value.ndim == 2:
        value = value.T
    flat[path], sources[path] = value, (key, tuple(state[key].shape))
  problems = clip_checkpoint.shape_problems(shapes, flat, sources)
  if problems:
    raise ValueError(f"{origin} does not match the architecture ({describe}); "
                     f"{len(problems)} problem(s):\n" + "\n".join(problems))
  params = {k: jnp.asarray(np.asarray(v, np.dtype(dtype))) for k, v in flat.items()}
  return flax.traverse_util.unflatten_dict(params, sep="/")


def _dtype(value, name: str):
  """``"float32"`` / ``"bfloat16"`` (or the jnp dtypes) -> the jnp dtype."""
  if isinstance(value, str):
    if value not in _DTYPES:
      raise ValueError(f"{name}={value!r} must be one of {sorted(_DTYPES)}.")
    return _DTYPES[value]
  if value not in _DTYPES.values():
    raise ValueError(f"{name}={value!r} must be jnp.float32 or jnp.bfloat16.")
  return value


def _read_mpt_folder(path) -> tuple[mpt.MPTConfig, dict[str, np.ndarray], str]:
  try:
    directory = weights_lib.hf_directory(path, what="MPT", weight_files=_MPT_WEIGHTS)
  except ValueError as e:
    raise ValueError(f"lang_encoder: {e} Pass the MPT-7B Hugging Face folder.") from None
  config = mpt.MPTConfig.from_hf_dict(directory.config, origin=directory.config_file)
  state = weights_lib.read_state_dict(directory.weights)
  state.pop("lm_head.weight", None)  # tied to transformer.wte.weight
  return config, state, directory.weights


def _describe_mpt(c: mpt.MPTConfig) -> str:
  return (f"MPT: {c.n_layers} layers, d_model {c.d_model}, {c.n_heads} heads, vocab "
          f"{c.vocab_size}")


def load_mpt(path, *, dtype: Any = jnp.float32) -> tuple[mpt.MPTForCausalLM, dict]:
  """Loads an MPT Hugging Face folder: ``model, params = load_mpt(path)``.

  Args:
    path: folder with ``config.json`` and the weights (or a Hugging Face cache folder).
    dtype: compute dtype; parameters are returned as float32.

  Returns:
    ``(MPTForCausalLM, params)``.
  """
  config, state, origin = _read_mpt_folder(path)
  model = mpt.MPTForCausalLM(config, dtype=dtype)
  params = to_flax(state, _param_shapes(model, jnp.zeros((1, 1), jnp.int32)), origin=origin,
                   describe=_describe_mpt(config))
  return model, params


def _param_shapes(model, *args) -> dict:
  return jax.eval_shape(model.init, jax.random.key(0), *args)["params"]


_ALIASES = (
    # (pattern, canonical): OpenFlamingo's FlamingoLayer wrapping and its two ModuleLists.
    (re.compile(r"^lang_encoder\.old_decoder_blocks\.(\d+)\."), r"lang_encoder.transformer.blocks.\1."),
    (re.compile(r"^lang_encoder\.transformer\.blocks\.(\d+)\.decoder_layer\."),
     r"lang_encoder.transformer.blocks.\1."),
    (re.compile(r"^lang_encoder\.transformer\.blocks\.(\d+)\.gated_cross_attn_layer\."),
     r"lang_encoder.gated_cross_attn_layers.\1."),
)


def deduplicate(state: Mapping[str, np.ndarray], *, origin: str) -> dict[str, np.ndarray]:
  """Maps OpenFlamingo's alias names to one canonical name each (see the module docstring).

  Raises:
    ValueError: if two aliases of one parameter hold different values.
  """
  out, first = {}, {}
  conflicts = []
  for key, value in state.items():
    canonical = key
    for pattern, repl in _ALIASES:
      canonical = pattern.sub(repl, canonical)
    if canonical in out:
      kept = out[canonical]
      if kept is not value and (kept.shape != value.shape or not np.array_equal(kept, value)):
        conflicts.append(f"  {first[canonical]!r} and {key!r}")
      continue
    out[canonical], first[canonical] = value, key
  if conflicts:
    raise ValueError(f"{origin}: names that alias one parameter hold different values:\n"
                     + "\n".join(conflicts))
  return out


def _flamingo_config(ckpt: Mapping[str, np.ndarray], lang: mpt.MPTConfig, *, origin: str,
                     media_token_id: int, eoc_token_id: int) -> model_lib.FlamingoConfig:
  """Infers the resampler and cross-attention sizes from the checkpoint's shapes."""
  def need(key):
    if key not in ckpt:
      raise ValueError(f"{origin} is not an OpenFlamingo checkpoint: no {key!r} (first keys: "
                       f"{sorted(ckpt)[:5]}).")
    return ckpt[key]

  num_latents, vis_dim = need("perceiver.latents").shape
  depth = 1 + max(int(m.group(1)) for k in ckpt
                  if (m := re.match(r"perceiver\.layers\.(\d+)\.", k)))
  inner = need("perceiver.layers.0.0.to_q.weight").shape[0]
  dim_head = 64  # OpenFlamingo's fixed head width; heads = inner / 64
  ff_mult = need("perceiver.layers.0.1.1.weight").shape[0] // vis_dim
  xattn = sorted({int(m.group(1)) for k in ckpt
                  if (m := re.match(r"lang_encoder\.gated_cross_attn_layers\.(\d+)\.", k))})
  if not xattn:
    raise ValueError(f"{origin} has no gated cross-attention layers "
                     "(lang_encoder.gated_cross_attn_layers.N.*).")
  every = xattn[0] + 1
  wanted = [i for i in range(lang.n_layers) if (i + 1) % every == 0]
  if xattn != wanted:
    raise ValueError(f"{origin}: cross-attention before layers {xattn}, which is not every "
                     f"{every}-th of {lang.n_layers} layers ({wanted}).")
  vocab = ckpt.get("lang_encoder.transformer.wte.weight")
  if vocab is not None:
    lang = lang.__class__(**{**lang.__dict__, "vocab_size": vocab.shape[0]})
  return model_lib.FlamingoConfig(lang=lang, media_token_id=media_token_id,
                                  eoc_token_id=eoc_token_id, vis_dim=vis_dim,
                                  cross_attn_every_n_layers=every, perceiver_depth=depth,
                                  num_latents=num_latents, dim_head=dim_head,
                                  heads=inner // dim_head, ff_mult=ff_mult)


def load_tokenizer(path):
  """The gpt-neox-20b tokenizer from a local folder, with OpenFlamingo's special tokens.

  As ``open_flamingo.create_model_and_transforms``: adds ``<|endofchunk|>`` and
  ``<image>``, and ``<PAD>`` when there is no pad token; pads on the left for generation.
  """
  import transformers  # pylint: disable=g-import-not-at-top
  path = os.path.expanduser(os.fspath(path))
  if not os.path.isdir(path):
    raise ValueError(f"tokenizer={path!r} is not a directory; pass the local folder of the "
                     "gpt-neox-20b tokenizer (tokenizer.json ...).")
  tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
  tok.add_special_tokens({"additional_special_tokens": ["<|endofchunk|>", "<image>"]})
  if tok.pad_token is None:
    tok.add_special_tokens({"pad_token": "<PAD>"})
  tok.padding_side = "left"
  return tok


def _vision(vision_encoder, *, dtype) -> tuple[encoders.Encoder, Any]:
  if isinstance(vision_encoder, tuple):
    encoder, params = vision_encoder
    if not isinstance(encoder, encoders.Encoder):
      raise ValueError("vision_encoder=(encoder, params) needs an fsjax.encoders.Encoder, got "
                       f"{type(encoder).__name__}.")
    return encoder, params
  if vision_encoder is None:
    raise ValueError("vision_encoder is required: the path of the OpenCLIP or Hugging Face "
                     "CLIP ViT-L/14 (OpenAI's, or FARE / TeCoA), or an (encoder, params) pair.")
  clip, params = clip_checkpoint.load(vision_encoder, dtype=dtype)
  # OpenFlamingo's features: last-block patch tokens, no final LayerNorm.
  encoder = clip_encoder.ClipEncoder(resolution=clip.config.vision_config.image_size, model=clip,
                                     feature="patch_tokens", layer=-1)
  return encoder, params


def load(checkpoint, *, lang_encoder, vision_encoder=None, tokenizer=None,
         media_token_id: int | None = None, eoc_token_id: int | None = None,
         dtype: Any = jnp.float32, param_dtype: Any = jnp.float32) -> model_lib.OpenFlamingo:
  """Loads OpenFlamingo from local files: ``of = load("checkpoint.pt", lang_encoder=...)``.

  Args:
    checkpoint: OpenFlamingo's ``checkpoint.pt`` (or a ``.safetensors`` of the same
      names), or the folder holding it (a Hugging Face cache folder resolves to its
      snapshot).
    lang_encoder: the MPT Hugging Face folder (``anas-awadalla/mpt-7b`` or
      ``mosaicml/mpt-7b``).
    vision_encoder: a CLIP path for :func:`fsjax.clip.load` (OpenAI ViT-L/14 for
      OpenFlamingo-9B; or FARE / TeCoA), or an ``(Encoder, params)`` pair.
    tokenizer: the gpt-neox-20b tokenizer folder (needed for ``caption`` and for the
      default special token ids), or None.
    media_token_id, eoc_token_id: ids of ``<image>`` and ``<|endofchunk|>``; default from
      the tokenizer (required without one).
    dtype: compute dtype, ``jnp.float32`` or ``jnp.bfloat16``.
    param_dtype: storage dtype of the Flamingo parameters (not the vision encoder's);
      ``jnp.bfloat16`` halves memory (OpenFlamingo-9B: ~16 GB instead of ~31 GB).

  Returns:
    An :class:`~fsjax.flamingo.model.OpenFlamingo`.

  Raises:
    ValueError: for paths that do not exist or hold something else, unsafe pickles, and
      (one error listing all of them) missing, unexpected or mis-shaped parameters.
  """
  dtype, param_dtype = _dtype(dtype, "dtype"), _dtype(param_dtype, "param_dtype")
  checkpoint = os.path.expanduser(os.fspath(checkpoint))
  if os.path.isdir(checkpoint):  # the model's folder (or its Hugging Face cache folder)
    checkpoint = os.path.join(weights_lib.resolve(checkpoint, what="checkpoint"),
                              "checkpoint.pt")
  if not os.path.isfile(checkpoint):
    raise ValueError(f"checkpoint={checkpoint!r} is not a file; pass OpenFlamingo's "
                     "checkpoint.pt. Nothing is ever downloaded.")
  tok = load_tokenizer(tokenizer) if tokenizer is not None else None
  if tok is not None:
    media_token_id = tok.convert_tokens_to_ids("<image>") if media_token_id is None else media_token_id
    eoc_token_id = (tok.convert_tokens_to_ids("<|endofchunk|>") if eoc_token_id is None
                    else eoc_token_id)
  if media_token_id is None or eoc_token_id is None:
    raise ValueError("without a tokenizer, pass media_token_id (<image>) and eoc_token_id "
                     "(<|endofchunk|>).")
  encoder, encoder_params = _vision(vision_encoder, dtype=dtype)
  lang, mpt_state, mpt_origin = _read_mpt_folder(lang_encoder)
  ckpt = deduplicate(weights_lib.read_state_dict(checkpoint), origin=checkpoint)
  ckpt.pop("lang_encoder.lm_head.weight", None)  # tied to the token embedding
  # A frozen copy of the CLIP tower, if saved at all (the released file has none): the
  # vision side is vision_encoder's.
  ckpt = {k: v for k, v in ckpt.items() if not k.startswith("vision_encoder.")}
  config = _flamingo_config(ckpt, lang, origin=checkpoint, media_token_id=media_token_id,
                            eoc_token_id=eoc_token_id)
  if tok is not None and len(tok) > config.lang.vocab_size:
    raise ValueError(f"the tokenizer has {len(tok)} tokens but the embedding only "
                     f"{config.lang.vocab_size} rows: tokenizer and checkpoint do not belong "
                     "together.")
  x = jax.ShapeDtypeStruct((1, encoder.resolution, encoder.resolution, 3), jnp.float32)
  width = jax.eval_shape(lambda p, x: encoder.tokens(p, x), encoder_params, x).shape[-1]
  if width != config.vis_dim:
    raise ValueError(f"vision_encoder gives tokens of width {width}, but {checkpoint}'s "
                     f"resampler takes {config.vis_dim}: use the CLIP tower OpenFlamingo was "
                     "trained with (ViT-L/14, width 1024, for OpenFlamingo-9B).")
  # strict=False on top of the language model, as OpenFlamingo loads it.
  state = {"lang_encoder." + k: v for k, v in mpt_state.items()}
  state.update(ckpt)
  model = model_lib.Flamingo(config, dtype=dtype)
  params = to_flax(state, model_lib.param_shapes(model), origin=f"{checkpoint} + {mpt_origin}",
                   describe=f"OpenFlamingo, {_describe_mpt(config.lang)}, cross-attention every "
                   f"{config.cross_attn_every_n_layers} layers, vision width {config.vis_dim}",
                   dtype=param_dtype)
  return model_lib.OpenFlamingo(model=model, params=params, encoder=encoder,
                                encoder_params=encoder_params, tokenizer=tok)


@mllm.register("openflamingo")
def build(config) -> tuple[model_lib.OpenFlamingo, dict]:
  """``(model, params)``: an :class:`~fsjax.flamingo.model.OpenFlamingo` from a config's sections.

  The registered builder of ``"openflamingo"`` (:func:`fsjax.mllm.build`); ``params`` is
  the model's :attr:`~fsjax.flamingo.model.OpenFlamingo.mllm_params` (``{"vision":
  ..., "language": ...}``, what every MLLM's pure methods take; the model also holds
  them for :meth:`~fsjax.flamingo.model.OpenFlamingo.caption`). Never smoothed
  (:func:`fsjax.mllm.smoothed` smooths it).

  ``config.encoder`` (any :func:`fsjax.encoders.build` encoder) gives the vision side;
  ``config.openflamingo`` the rest: with ``checkpoint`` None, a random init of
  ``architecture`` (a dict of :class:`~fsjax.flamingo.model.FlamingoConfig` fields) seeded
  by ``seed``, for smoke runs; else :func:`load` of ``checkpoint``, ``lang_encoder`` and
  ``tokenizer``; ``prompt_format`` (optional) how a task's prompt is given
  (:attr:`~fsjax.flamingo.model.OpenFlamingo.prompt_format`). See
  ``configs/openflamingo_9b.py``.
  """
  m = config.openflamingo
  dtype = _dtype(m.get("dtype", "float32"), "config.openflamingo.dtype")
  param_dtype = _dtype(m.get("param_dtype", "float32"), "config.openflamingo.param_dtype")
  if m.get("checkpoint") is None:
    architecture = m.get("architecture")
    if architecture is None:
      raise ValueError("config.openflamingo needs a checkpoint path, or an architecture (dict "
                       "of FlamingoConfig fields) for a random init.")
    architecture = architecture.to_dict() if hasattr(architecture, "to_dict") else dict(architecture)
    encoder, encoder_params = encoders.build(config.encoder)
    model, params = model_lib.init(model_lib.FlamingoConfig.from_dict(architecture),
                                   seed=m.get("seed", 0), dtype=dtype)
    params = jax.tree.map(lambda p: p.astype(param_dtype), params)
    tok = load_tokenizer(m.tokenizer) if m.get("tokenizer") else None
    of = model_lib.OpenFlamingo(model=model, params=params, encoder=encoder,
                                encoder_params=encoder_params, tokenizer=tok)
  else:
    for key in ("lang_encoder", "tokenizer"):
      if not m.get(key):
        raise ValueError(f"config.openflamingo.{key} is not set; point it at the local folder "
                         f"(--config.openflamingo.{key}=/path/to/mpt-7b).")
    of = load(m.checkpoint, lang_encoder=m.lang_encoder,
              vision_encoder=encoders.build(config.encoder), tokenizer=m.tokenizer,
              dtype=dtype, param_dtype=param_dtype)
  if m.get("prompt_format"):
    of = of.replace(prompt_format=m.prompt_format)
  return of, of.mllm_params
