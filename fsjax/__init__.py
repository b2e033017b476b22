"""fsjax: certified feature-space robustness for the vision encoders of multimodal LLMs."""

from fsjax import clip
from fsjax import efficientnet
from fsjax import encoders
from fsjax import gsb
from fsjax import smoothing

__version__ = "0.1.0"
