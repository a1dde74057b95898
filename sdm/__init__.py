"""sdm: semantic keypoint matching with Stable Diffusion features (SD4Match, Hedlin et al.).

The public API is small::

    sd = sdm.load_stable_diffusion()            # or sdm.tiny_stable_diffusion() offline
    featurizer = sdm.SDFeaturizer(sd, timestep=50, ensemble=8)
    feats = featurizer(images, "a photo of a cat")   # B x C x h x w
    matches = sdm.matching.kernel_soft_argmax(src, trg, query_xy)

Submodules: `matching`, `loss`, `metrics`, `data`, `prompts` (prompt modules), `encoders` (DINOv2, CLIP
vision), `prompt_files` (saving and loading prompts), `released` (the authors' released prompts), `backbones`,
`train`, `evaluate`, `attention`, `viz`.
"""

from sdm import loss, matching, metrics
from sdm.features import SDFeaturizer
from sdm.models import StableDiffusion, load_stable_diffusion, sd21_architecture, tiny_stable_diffusion

__all__ = [
    "SDFeaturizer",
    "StableDiffusion",
    "load_stable_diffusion",
    "loss",
    "matching",
    "metrics",
    "sd21_architecture",
    "tiny_stable_diffusion",
]
__version__ = "0.2.0"
