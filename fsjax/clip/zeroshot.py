"""Zero-shot class prototypes from CLIP's text tower (Radford et al., 2021, section 3.1.4)."""

from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fsjax import encoders
from fsjax.clip import checkpoint
from fsjax.clip import model as model_lib

_CHUNK = 256  # texts per forward pass; fixed so that one compilation serves every chunk


def text_prototypes(model: model_lib.CLIP, params, checkpoint_dir: str | os.PathLike,
                    class_names: Sequence[str], *,
                    templates: Sequence[str] = ("a photo of a {}.",)) -> jax.Array:
  """Unit class prototypes for zero-shot classification, ``[K, projection_dim]`` float32.

  CLIP's recipe: embed every ``template.format(class_name)``, L2-normalise, average over
  the templates of each class, L2-normalise again.

  Args:
    model: a CLIP with a text tower (from :func:`fsjax.clip.load`).
    params: its parameters.
    checkpoint_dir: local directory holding the tokenizer files (``vocab.json`` +
      ``merges.txt``, or ``tokenizer.json``), read with
      ``transformers.CLIPTokenizer.from_pretrained(..., local_files_only=True)``.
    class_names: the K class names.
    templates: prompt templates, each with one ``{}``.

  Returns:
    ``[K, projection_dim]`` float32, unit rows.
  """
  text_config = model.config.text_config
  if text_config is None:
    raise ValueError("text_prototypes needs a CLIP with a text tower; this one is vision-only.")
  if not class_names or not templates or any("{}" not in t for t in templates):
    raise ValueError("class_names must be non-empty and templates non-empty, each with one '{}'.")
  import transformers  # pylint: disable=g-import-not-at-top  (heavy; only needed here)
  directory = checkpoint._resolve(checkpoint_dir)  # pylint: disable=protected-access
  tokenizer = transformers.CLIPTokenizer.from_pretrained(directory, local_files_only=True)
  if text_config.eos_token_id != 2 and tokenizer.eos_token_id != text_config.eos_token_id:
    # Pooling looks for eos_token_id: a mismatch would silently pool at position 0.
    raise ValueError(f"tokenizer eos id {tokenizer.eos_token_id} differs from the model's "
                     f"eos_token_id {text_config.eos_token_id}; use the checkpoint's tokenizer.")
  texts = [t.format(c) for c in class_names for t in templates]
  tokens = tokenizer(texts, padding="max_length", truncation=True,
                     max_length=text_config.max_position_embeddings, return_tensors="np")
  ids, mask = tokens["input_ids"], tokens["attention_mask"]
  encode = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m, method="encode_text"))
  chunks = []
  for start in range(0, len(texts), _CHUNK):
    i, m = ids[start:start + _CHUNK], mask[start:start + _CHUNK]
    pad = _CHUNK - len(i) if len(texts) > _CHUNK else 0  # keep one shape across chunks
    i, m = np.pad(i, ((0, pad), (0, 0))), np.pad(m, ((0, pad), (0, 0)))
    chunks.append(encode(params, i, m)[:len(i) - pad])
  z = jnp.concatenate(chunks).astype(jnp.float32)
  z = encoders.unit(z).reshape(len(class_names), len(templates), -1).mean(axis=1)
  return encoders.unit(z)
