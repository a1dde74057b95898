"""sdm: semantic keypoint matching with Stable Diffusion features (SD4Match, Hedlin et al.).

The public API is small::

    sd = sdm.load_stable_diffusion()            # or sdm.tiny_stable_diffusion() offline
    featurizer = sdm.SDFeaturizer(sd, timestep=50, ensemble=8)
    feats = featurizer(images, "a photo of a cat")   # B x C x h x w
    matches = sdm.matching.kernel_soft_argmax(src, trg, query_xy)
    dataset = sdm.load_dataset("pfwillow", "data/PF-Willow")
    result = sdm.load_method("runs/single").evaluate(dataset)   # any method by name (a run folder: its best prompt)
    from sdm.train import train
    train(sdm.TrainConfig(prompt="cpm"), sd, sdm.load_dataset("spair", "data/SPair-71k", split="trn"))

Submodules: `config` (every setting, importable without torch), `matching`, `loss`, `metrics`, `data`, `prompts`
(prompt modules), `encoders` (DINOv2, CLIP vision), `prompt_files` (saving and loading prompts), `released` (the
authors' released prompts), `backbones`, `train`, `evaluate`, `attention`, `viz`.

The names load on first use (PEP 562), so `import sdm` and the command line's `--help` cost no torch import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sdm.config import VERSION
from sdm.lazy import lazy_names

if TYPE_CHECKING:
    from sdm import loss, matching, metrics
    from sdm.config import TrainConfig
    from sdm.data import load_dataset
    from sdm.features import SDFeaturizer
    from sdm.methods import load_method
    from sdm.models import (
        StableDiffusion,
        load_stable_diffusion,
        sd14_architecture,
        sd21_architecture,
        tiny_stable_diffusion,
    )

# public name -> the module that defines it (a submodule's own name: the submodule)
_HOMES = {
    "SDFeaturizer": "sdm.features",
    "StableDiffusion": "sdm.models",
    "load_stable_diffusion": "sdm.models",
    "load_method": "sdm.methods",
    "load_dataset": "sdm.data",
    "TrainConfig": "sdm.config",
    "sd14_architecture": "sdm.models",
    "sd21_architecture": "sdm.models",
    "tiny_stable_diffusion": "sdm.models",
    "loss": "sdm.loss",
    "matching": "sdm.matching",
    "metrics": "sdm.metrics",
}
__version__ = VERSION
__all__ = [
    "SDFeaturizer",
    "StableDiffusion",
    "TrainConfig",
    "load_dataset",
    "load_method",
    "load_stable_diffusion",
    "loss",
    "matching",
    "metrics",
    "sd14_architecture",
    "sd21_architecture",
    "tiny_stable_diffusion",
]


__getattr__, __dir__ = lazy_names("sdm", _HOMES, globals())
