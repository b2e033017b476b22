"""Loading and saving LLaVA checkpoints in the Hugging Face layout (local files only).

A directory holds ``config.json`` (model_type "llava"), the weights
(``model.safetensors``, sharded ``model.safetensors.index.json`` + shards, or
``pytorch_model.bin``), optionally ``generation_config.json``, tokenizer files and a
chat template (``chat_template.json`` or ``chat_template.jinja``). The three key layouts
transformers 5 itself accepts all load (mllm-facts.md):

* A, an in-memory ``state_dict``: ``model.vision_tower.*``, ``model.multi_modal_projector.*``,
  ``model.language_model.*``, ``lm_head.weight``;
* B, transformers-5 ``save_pretrained``: ``vision_tower.*``, ``multi_modal_projector.*``,
  ``language_model.model.*``, ``language_model.lm_head.weight``;
* C, the hub checkpoints (transformers 4): as B with ``vision_tower.vision_model.*``.

:func:`save` writes layout B (plus config.json, generation_config.json and the
tokenizer), so a model trained in this project round-trips through :func:`load`. A
checkpoint without vision-tower tensors (its vision side is another encoder) loads when
the caller passes that ``encoder`` and its parameters.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from fsjax import encoders as encoders_lib
from fsjax import mllm
from fsjax import weights as weights_lib
from fsjax.clip import checkpoint as clip_checkpoint
from fsjax.clip import model as clip_model
from fsjax.llava import model as model_lib

_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
# Layouts A, B, C -> one canonical naming (B without the language_model.model level).
_RENAMES = (("model.vision_tower.", "vision_tower."),
            ("model.multi_modal_projector.", "multi_modal_projector."),
            ("model.language_model.", "language_model."),
            ("language_model.model.", "language_model."),
            ("language_model.lm_head.", "lm_head."),
            ("vision_tower.vision_model.", "vision_tower."))
# Buffers older writers saved with the weights; not parameters.
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def _canonical(key: str) -> str:
  for old, new in _RENAMES:
    if key.startswith(old):
      key = new + key[len(old):]
  return key


def load(path: str | os.PathLike, *, encoder: encoders_lib.Encoder | None = None,
         encoder_params: Any = None, dtype: Any = jnp.float32,
         param_dtype: Any = jnp.float32,
         system_prompt: str | None = None) -> tuple[model_lib.Llava, dict]:
  """Loads a local LLaVA directory: ``model, params = load(path)``.

  Args:
    path: a Hugging Face LLaVA directory (or cache folder; see the module docstring).
    encoder: the vision side; default the checkpoint's own CLIP tower
      (``vision_feature_layer``, ``vision_feature_select_strategy``). When given, vision
      tensors in the checkpoint are ignored and ``encoder_params`` are used.
    encoder_params: parameters of ``encoder`` (required with it).
    dtype: compute dtype (``jnp.bfloat16`` for the 7B: float32 norms, softmax, logits).
    param_dtype: storage dtype of the returned parameters (bfloat16 halves the memory).
    system_prompt: text before "USER:" in every prompt (None: none, as llava-hf's
      template; the original vicuna_v1 template has a system sentence).

  Returns:
    ``(model, params)``: a :class:`fsjax.llava.model.Llava` and
    ``{"vision": ..., "language": ...}``.

  Raises:
    ValueError: no checkpoint there, another architecture, or tensors that do not fit
      (one error listing every missing, unexpected and mis-shaped tensor).
  """
  directory = weights_lib.hf_directory(path, what="LLaVA", weight_files=_WEIGHTS)
  path, config_file, weights = directory.path, directory.config_file, directory.weights
  config = model_lib.LlavaConfig.from_hf_dict(directory.config, origin=config_file)
  if encoder is not None and encoder_params is None:
    raise ValueError("encoder_params: pass the parameters of the encoder you pass.")
  if encoder is None and config.vision_config is None:
    raise ValueError(f"{config_file} has vision_config null: its vision side is an external "
                     "encoder; pass encoder= and encoder_params=.")
  state = {_canonical(k): v for k, v in clip_checkpoint._read_state_dict(weights).items()  # pylint: disable=protected-access
           if not _IGNORED.search(k)}
  vision_state = {k: v for k, v in state.items() if k.startswith("vision_tower.")}
  language_state = {k: v for k, v in state.items() if not k.startswith("vision_tower.")}

  problems, vision_params = [], encoder_params
  if encoder is None:
    encoder = model_lib.clip_tower_encoder(config, dtype=dtype)
    flat, sources = clip_checkpoint._hf_torch_to_flax(  # pylint: disable=protected-access
        {"vision_model." + k[len("vision_tower."):]: v for k, v in vision_state.items()})
    shapes = clip_model.param_shapes(encoder.model)
    expected = {k: tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(
        {"vision_model": shapes["vision_model"]}, sep="/").items()}
    problems += [f"  vision tower:  {p.strip()}"
                 for p in clip_checkpoint.shape_problems(expected, flat, sources)]
    vision_params = _unflatten(flat, param_dtype) if not problems else None
    width = config.vision_config.hidden_size
  else:
    width = model_lib.token_shape(encoder, encoder_params)[1]
  if config.vision_feature_size is not None and config.vision_feature_size != width:
    problems.append(f"  encoder:       its features have width {width}, the checkpoint's "
                    f"mm_hidden_size is {config.vision_feature_size}")
  config = dataclasses.replace(config, vision_feature_size=width)

  flat, sources = _language_to_flax(language_state)
  expected = {k: tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(
      model_lib.language_param_shapes(config, feature_size=width), sep="/").items()}
  problems += [f"  language side: {p.strip()}"
               for p in clip_checkpoint.shape_problems(expected, flat, sources)]
  if problems:
    raise ValueError(f"{weights} does not match the LLaVA architecture of {config_file} "
                     f"({_describe(config, width)}); {len(problems)} problem(s):\n"
                     + "\n".join(problems))
  params = {"vision": vision_params, "language": _unflatten(flat, param_dtype)}

  tokenizer = None
  if any(os.path.exists(os.path.join(path, f)) for f in _TOKENIZER_FILES):
    import transformers  # pylint: disable=g-import-not-at-top
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
  eos, pad = _generation_ids(path, config)
  model = model_lib.Llava(config=config, encoder=encoder, tokenizer=tokenizer, dtype=dtype,
                          chat_template=_chat_template(path), eos_token_id=eos,
                          pad_token_id=pad, system_prompt=system_prompt)
  return model, params


def _unflatten(flat, dtype):
  return flax.traverse_util.unflatten_dict(
      {k: jnp.asarray(np.asarray(v, np.float32), dtype) for k, v in flat.items()}, sep="/")


def _language_to_flax(state):
  """Canonical HF names -> the flat language tree of :class:`LlavaLanguageModel`."""
  flat, sources = clip_checkpoint._hf_torch_to_flax(state)  # pylint: disable=protected-access
  # The converter makes every 2-D "weight" a transposed Dense kernel; the token embedding
  # is an Embed table [vocab, hidden] instead.
  key = "language_model/embed_tokens/kernel"
  if key in flat:
    flat["language_model/embed_tokens/embedding"] = np.asarray(flat.pop(key)).T
    sources["language_model/embed_tokens/embedding"] = sources.pop(key)
  return flat, sources


def _describe(config, width) -> str:
  t = config.text_config
  return (f"LLaMA: {t.num_hidden_layers} layers, hidden {t.hidden_size}, {t.num_attention_heads}"
          f" heads, {t.num_key_value_heads} KV heads, vocab {t.vocab_size}; image features of "
          f"width {width}")


def _generation_ids(path, config) -> tuple[Any, int]:
  """EOS and pad ids as transformers' generate takes them (generation_config.json first)."""
  gen = {}
  gen_file = os.path.join(path, "generation_config.json")
  if os.path.exists(gen_file):
    with open(gen_file) as f:
      gen = json.load(f)
  text = config.text_config
  eos = gen.get("eos_token_id", text.eos_token_id)
  if eos is None:
    raise ValueError(f"{path}: neither generation_config.json nor text_config has an "
                     "eos_token_id; greedy decoding needs one.")
  eos = tuple(eos) if isinstance(eos, list) else int(eos)
  pad = gen.get("pad_token_id", text.pad_token_id)
  if pad is None:  # transformers then pads with the first EOS id
    pad = eos if isinstance(eos, int) else eos[0]
  return eos, int(pad)


def _chat_template(path) -> str | None:
  json_file = os.path.join(path, "chat_template.json")
  if os.path.exists(json_file):
    with open(json_file) as f:
      return json.load(f)["chat_template"]
  jinja = os.path.join(path, "chat_template.jinja")
  if os.path.exists(jinja):
    with open(jinja) as f:
      return f.read()
  return None


def save(path: str | os.PathLike, model: model_lib.Llava, params: dict, *,
         save_vision: bool | None = None) -> None:
  """Writes ``model`` and ``params`` in the transformers-5 ``save_pretrained`` layout.

  ``config.json``, ``generation_config.json``, ``model.safetensors`` (layout B keys,
  torch layouts: Linear weights ``[out, in]``), the tokenizer and the chat template.
  The vision tower's tensors are written when the encoder is the checkpoint's own CLIP
  tower (``save_vision`` default); for another encoder the config gets
  ``vision_config: null`` and ``mm_hidden_size``, and :func:`load` then needs that
  encoder and its parameters.
  """
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  path = os.fspath(os.path.expanduser(path))
  os.makedirs(path, exist_ok=True)
  config = model.config
  own_tower = (config.vision_config is not None and hasattr(model.encoder, "model")
               and getattr(model.encoder.model.config, "vision_config", None)
               == config.vision_config)
  save_vision = own_tower if save_vision is None else save_vision
  # The projector's input width is the feature width D, whatever the encoder.
  width = int(np.shape(params["language"]["multi_modal_projector"]["linear_1"]["kernel"])[0])
  config = dataclasses.replace(config, vision_feature_size=width)
  if not save_vision:
    config = dataclasses.replace(config, vision_config=None)
  tensors = {}
  for key, value in flax.traverse_util.flatten_dict(params["language"], sep="/").items():
    tensors[_language_key(key)] = _to_torch_layout(key, value)
  if save_vision:
    for key, value in flax.traverse_util.flatten_dict(
        params["vision"]["vision_model"], sep="/").items():
      tensors["vision_tower." + _vision_key(key)] = _to_torch_layout(key, value)
  safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                              os.path.join(path, "model.safetensors"),
                              metadata={"format": "pt"})
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config.to_hf_dict() | {"dtype": "float32"}, f, indent=2)
  eos = model.eos_token_id
  with open(os.path.join(path, "generation_config.json"), "w") as f:
    json.dump({"bos_token_id": config.text_config.bos_token_id,
               "eos_token_id": eos if isinstance(eos, int) else list(eos),
               "pad_token_id": model.pad_token_id}, f, indent=2)
  if model.tokenizer is not None:
    model.tokenizer.save_pretrained(path)
  if model.chat_template is not None:
    with open(os.path.join(path, "chat_template.json"), "w") as f:
      json.dump({"chat_template": model.chat_template}, f)


def _language_key(flax_path: str) -> str:
  """``language_model/layers/0/mlp/up_proj/kernel`` -> layout B's torch name."""
  parts = flax_path.split("/")
  leaf = parts[-1]
  if leaf in ("kernel", "scale", "embedding"):
    leaf = "weight"
  name = ".".join(parts[:-1] + [leaf])
  if name.startswith("language_model."):
    return "language_model.model." + name[len("language_model."):]
  if name.startswith("lm_head."):
    return "language_model." + name
  return name


def _vision_key(flax_path: str) -> str:
  parts = flax_path.split("/")
  leaf = parts[-1]
  if leaf in ("kernel", "scale", "embedding"):
    leaf = "weight"
  return ".".join(parts[:-1] + [leaf])


def _to_torch_layout(flax_path: str, value) -> np.ndarray:
  a = np.asarray(jax.device_get(value), np.float32)
  if flax_path.endswith("/kernel"):
    return a.transpose(3, 2, 0, 1) if a.ndim == 4 else a.T  # HWIO -> OIHW; [in, out] -> [out, in]
  return a


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _external_tower(checkpoint: str) -> bool:
  """Whether a LLaVA directory was trained on another tower (``vision_config: null``)."""
  path = os.path.join(os.path.expanduser(checkpoint), "config.json")
  if not os.path.isfile(path):
    return False
  with open(path) as f:
    return json.load(f).get("vision_config", {}) is None


@mllm.register("llava")
def build(config) -> tuple[model_lib.Llava, dict]:
  """``(model, params)`` from a config (``configs/llava15_7b.py``, ``configs/llava_tiny.py``).

  The registered builder of ``"llava"`` (:func:`fsjax.mllm.build`); never smoothed
  (:func:`fsjax.mllm.smoothed`, e.g. with ``**config.smoothing``, smooths it).

  * ``config.llava.checkpoint``: a local LLaVA directory (:func:`load`); None means a
    random init of ``config.llava.architecture`` (an HF LLaVA config dict) with a
    word-level tokenizer of ``config.llava.words``, for smoke runs. A directory trained
    on another tower (``vision_config: null``, e.g. ``train.llava``'s embedded model)
    loads with ``config.encoder`` as its vision side.
  * ``config.encoder.checkpoint``: when set, the vision side is that encoder
    (``fsjax.encoders.build(config.encoder)``: e.g. a FARE/TeCoA OpenCLIP tower at 224
    px, penultimate layer, CLS dropped) instead of the checkpoint's own tower.
  * ``config.llava.system_prompt``: the text before "USER:" (default none).
  """
  c = config.llava
  for name in ("dtype", "param_dtype"):
    if c[name] not in _DTYPES:
      raise ValueError(f"config.llava.{name}={c[name]!r} must be one of {sorted(_DTYPES)}.")
  dtype, param_dtype = _DTYPES[c.dtype], _DTYPES[c.param_dtype]
  encoder = encoder_params = None
  if config.get("encoder") is not None and config.encoder.get("checkpoint"):
    encoder, encoder_params = encoders_lib.build(config.encoder)
  elif c.get("checkpoint") and _external_tower(c.checkpoint):
    encoder, encoder_params = encoders_lib.build(config.encoder)
  elif config.get("encoder") is not None and config.encoder.get("name") != "clip" \
      and not c.get("checkpoint"):
    raise ValueError(
        f"config.llava.checkpoint is not set: a LLaVA on config.encoder.name="
        f"{config.encoder.name!r} must be trained first; train it with `python -m "
        "train.llava --config ... --workdir DIR` and pass --config.llava.checkpoint=DIR.")
  if c.checkpoint:
    model, params = load(c.checkpoint, encoder=encoder, encoder_params=encoder_params,
                         dtype=dtype, param_dtype=param_dtype)
  else:
    if c.get("architecture") is None:
      raise ValueError("config.llava needs a checkpoint directory, or an architecture (an HF "
                       "LLaVA config dict) for a random init.")
    arch = c.architecture.to_dict() if hasattr(c.architecture, "to_dict") else dict(c.architecture)
    llava_config = model_lib.LlavaConfig.from_hf_dict(arch | {"model_type": "llava"})
    if encoder is None:
      encoder = model_lib.clip_tower_encoder(llava_config, dtype=dtype)
      clip_params = clip_model.init(encoder.model.config, seed=c.seed)[1]
      encoder_params = {"vision_model": clip_params["vision_model"]}
    width = model_lib.token_shape(encoder, encoder_params)[1]
    llava_config = dataclasses.replace(llava_config, vision_feature_size=width)
    language = model_lib.init_language(llava_config, seed=c.seed, dtype=param_dtype)
    from fsjax.llava import prompt as prompt_lib  # pylint: disable=g-import-not-at-top
    tokenizer = prompt_lib.word_level_tokenizer(
        list(c.words), vocab_size=llava_config.text_config.vocab_size,
        image_token_id=llava_config.image_token_id)
    text = llava_config.text_config
    model = model_lib.Llava(config=llava_config, encoder=encoder, tokenizer=tokenizer,
                            dtype=dtype, eos_token_id=text.eos_token_id,
                            pad_token_id=text.pad_token_id or 0)
    params = {"vision": encoder_params, "language": language}
  model = dataclasses.replace(model, system_prompt=c.get("system_prompt"))
  return model, params
