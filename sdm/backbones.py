"""Backbones: what turns the UNet's features under a prompt into the features that are matched, in training
(`sdm.train.train`, `TrainConfig.backbone`) and in evaluation (`Backbone.extractor`), so that a prompt is scored
on the features it was trained on.

- "sd": the Stable Diffusion features themselves (SD4Match).
- "sd+dino": SD features fused with DINOv2 patch features as the SD4Match code's FUSE_DINO computes them
  (`sdm.fusion.FusionConfig`: DINOv2 on the VAE input at 14 x the SD grid, both L2-normalised, concatenated with
  weights 0.5 and 0.5, scored by the inner product in evaluation). DINOv2 stays frozen; the prompt is trained
  through the SD half (with the cosine loss of docs/specification.md, which the weights do not change), so it learns what
  DINOv2 does not already give. The code fuses only in evaluation; training on fused features is sdm's own.

A new backbone is a class with `needs_images`, `featurizer`, `features` and `extractor`, plus one line in
`BACKBONES`; one on another diffusion model (SDXL, say) returns its own featurizer from `featurizer`, which
`train` and `evaluate` then use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from sdm.config import BACKBONE_NAMES, BackboneName, enrol
from sdm.encoders import PromptEncoders
from sdm.extractors import FeatureExtractor
from sdm.features import SDFeaturizer
from sdm.fusion import DinoFusion, FusedExtractor, FusionConfig

if TYPE_CHECKING:
    from sdm.models import StableDiffusion


class Backbone(Protocol):
    needs_images: bool  # whether `features` reads the images (training then loads them at every step)
    needs_dino: bool  # whether it is built from `PromptEncoders.dino` (the CLI loads --dino then)

    @classmethod
    def build(cls, encoders: PromptEncoders | None, image_size: int) -> Backbone:
        """The backbone for SD inputs of `image_size` pixels, taking frozen encoders from `encoders`."""
        ...

    def featurizer(self, sd: StableDiffusion, **settings: Any) -> SDFeaturizer:
        """The featurizer under the prompt, from the loaded model and `SDFeaturizer`'s settings (image_size,
        timestep, up_block, ensemble, seed); training builds its training and validation featurizers here."""
        ...

    def features(self, sd_features: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """SD features B x C x h x w (in the prompt's autograd graph) and the images B x 3 x H x W in [0, 1]
        -> the matched features B x C' x h' x w'."""
        ...

    def extractor(self, sd_extractor: FeatureExtractor) -> FeatureExtractor:
        """The same features for `sdm.evaluate.evaluate`, around an SD extractor of the prompt."""
        ...


class StableDiffusionOnly:
    needs_images = False
    needs_dino = False

    @classmethod
    def build(cls, encoders: PromptEncoders | None, image_size: int) -> StableDiffusionOnly:
        return cls()

    def featurizer(self, sd: StableDiffusion, **settings: Any) -> SDFeaturizer:
        return SDFeaturizer(sd, **settings)

    def features(self, sd_features: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        return sd_features

    def extractor(self, sd_extractor: FeatureExtractor) -> FeatureExtractor:
        return sd_extractor


class StableDiffusionDino(StableDiffusionOnly):
    needs_images = True
    needs_dino = True

    def __init__(self, dino: nn.Module, config: FusionConfig | None = None) -> None:
        self.dino = dino
        self.fusion = DinoFusion(dino, config)

    @classmethod
    def build(cls, encoders: PromptEncoders | None, image_size: int) -> StableDiffusionDino:
        if encoders is None or encoders.dino is None:
            raise ValueError(
                "backbone 'sd+dino' needs DINOv2: pass encoders=PromptEncoders(dino=sdm.encoders.load_dino(...)) "
                "(the CLI loads --dino)"
            )
        return cls(encoders.dino)  # the default fusion does not depend on the input size: DINOv2 follows the SD grid

    def features(self, sd_features: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        return self.fusion(sd_features, images)

    def extractor(self, sd_extractor: FeatureExtractor) -> FeatureExtractor:
        return FusedExtractor(sd_extractor, self.dino, self.fusion.config)  # type: ignore[return-value]


BACKBONES: dict[str, type[Backbone]] = {
    "sd": StableDiffusionOnly,
    "sd+dino": StableDiffusionDino,
}


def register_backbone(name: str, cls: type[Backbone]) -> type[Backbone]:
    """Adds a backbone (a `Backbone` class); `TrainConfig(backbone=name)`, `sdm train --backbone` and
    `sdm.load_method(..., backbone=name)` then take it."""
    enrol(BACKBONES, name, cls, BACKBONE_NAMES)
    return cls


def backbone_class(name: str) -> type[Backbone]:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid: {', '.join(BACKBONES)}")
    return BACKBONES[name]


def build_backbone(name: str, encoders: PromptEncoders | None = None, image_size: int = 768) -> Backbone:
    """The registered backbone `name` for SD inputs of `image_size` pixels."""
    return backbone_class(name).build(encoders, image_size)


__all__ = ["BACKBONES", "Backbone", "BackboneName", "backbone_class", "build_backbone", "register_backbone"]
