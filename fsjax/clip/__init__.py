"""CLIP in Flax linen: the model, local checkpoint loaders, the encoder, zero-shot prototypes.

``model, params = fsjax.clip.load(path)``, then
``model.apply({"params": params}, pixel_values, method="encode_image")``. Importing this
package registers the "clip" builder of :mod:`fsjax.encoders`.
"""

from fsjax.clip.checkpoint import load
from fsjax.clip.encoder import CLIP_MEAN
from fsjax.clip.encoder import CLIP_STD
from fsjax.clip.encoder import ClipEncoder
from fsjax.clip.encoder import build_clip_encoder
from fsjax.clip.model import CLIP
from fsjax.clip.model import CLIPConfig
from fsjax.clip.model import CLIPTextConfig
from fsjax.clip.model import CLIPVisionConfig
from fsjax.clip.model import init
from fsjax.clip.zeroshot import text_prototypes

__all__ = [
    "CLIP", "CLIPConfig", "CLIPTextConfig", "CLIPVisionConfig", "CLIP_MEAN", "CLIP_STD",
    "ClipEncoder", "build_clip_encoder", "init", "load", "text_prototypes",
]
