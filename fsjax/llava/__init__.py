"""LLaVA-1.5 in Flax: load a local Hugging Face checkpoint, answer about images.

  model, params = fsjax.llava.load("/path/to/llava-1.5-7b-hf", dtype=jnp.bfloat16)
  model.generate(params, images, "Describe this image in one concise sentence.")
  smoothed, sparams = fsjax.mllm.smoothed(model, params, sigma=0.25, n=8)   # through FS
  smoothed.generate(sparams, images, "...", key=jax.random.key(0))  # fresh noise per call

``images`` are ``[B, H, W, 3]`` in [0, 1]. The vision side is any
:class:`fsjax.encoders.Encoder` (``load(path, encoder=..., encoder_params=...)`` or
``model.with_encoder(...)``); see :mod:`fsjax.llava.model`.
"""

from fsjax.llava.checkpoint import build
from fsjax.llava.checkpoint import load
from fsjax.llava.checkpoint import save
from fsjax.llava.llama import LlamaConfig
from fsjax.llava.model import Llava
from fsjax.llava.model import LlavaConfig
from fsjax.llava.model import LlavaLanguageModel
from fsjax.llava.model import clip_tower_encoder
from fsjax.llava.model import init_language
from fsjax.llava.model import language_param_shapes
from fsjax.llava.model import make_mesh
from fsjax.llava.model import param_shardings
from fsjax.llava.prompt import format_prompt

__all__ = [
    "LlamaConfig", "Llava", "build", "LlavaConfig", "LlavaLanguageModel",
    "clip_tower_encoder", "format_prompt", "init_language", "language_param_shapes", "load",
    "make_mesh", "param_shardings", "save",
]
