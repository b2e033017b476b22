"""OpenFlamingo-9B in Flax: MPT decoder, Perceiver resampler, gated cross-attention.

``of = fsjax.flamingo.load("checkpoint.pt", lang_encoder="mpt-7b/", vision_encoder=
"ViT-L-14.pt", tokenizer="gpt-neox-20b/")`` then ``of.caption(images)``; swap the vision
encoder (smoothed, GSB, FARE, TeCoA) with ``of.replace(encoder=..., encoder_params=...)``.
"""

from fsjax.flamingo.checkpoint import build
from fsjax.flamingo.checkpoint import deduplicate
from fsjax.flamingo.checkpoint import load
from fsjax.flamingo.checkpoint import load_mpt
from fsjax.flamingo.checkpoint import load_tokenizer
from fsjax.flamingo.model import CAPTION_PROMPT
from fsjax.flamingo.model import Flamingo
from fsjax.flamingo.model import FlamingoCache
from fsjax.flamingo.model import FlamingoConfig
from fsjax.flamingo.model import OpenFlamingo
from fsjax.flamingo.model import generate
from fsjax.flamingo.model import init
from fsjax.flamingo.model import param_shapes
from fsjax.flamingo.mpt import MPTConfig
from fsjax.flamingo.mpt import MPTForCausalLM
from fsjax.flamingo.resampler import GatedCrossAttentionBlock
from fsjax.flamingo.resampler import PerceiverResampler

__all__ = [
    "CAPTION_PROMPT", "Flamingo", "FlamingoCache", "FlamingoConfig", "GatedCrossAttentionBlock",
    "MPTConfig", "MPTForCausalLM", "OpenFlamingo", "PerceiverResampler", "build",
    "deduplicate", "generate", "init", "load", "load_mpt", "load_tokenizer", "param_shapes",
]
