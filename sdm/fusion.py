"""Stable Diffusion features fused with DINOv2 patch features (the SD4Match paper's "SD+DINO*" rows; Zhang et al.,
NeurIPS 2023).

The default, `FusionConfig()`, is what the SD4Match code computes with `config/fuseDino.py`
(`src/stable_diffusion/sd_feature_extractor.py:131-138`): dinov2-base sees the VAE's own input (values in [-1, 1],
no ImageNet normalisation) resized to (14 h) x (14 w), so that its patch grid equals the SD grid h x w; both maps
are L2-normalised per location (x / (|x| + 1e-6), `utils/matching.py:11-13`) and concatenated with weights 0.5 and
0.5; the matchers then score the fused vectors by their raw inner product (`ENABLE_L2_NORM = False`,
`utils/matching.py:47-49, 156-158, 195-197`). docs/choices.md lists the other settings (sdm 0.3's fusion among them).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from sdm.devices import upload
from sdm.extractors import ImageBatch, ViTFeatures, ViTPixels
from sdm.matching import SIMILARITIES, Similarity
from sdm.prompts import Conditioning
from sdm.records import vit_record

L2_EPS = 1e-6  # the code's L2normalization: x / (|x| + 1e-6) (utils/matching.py:13)


@dataclass(frozen=True)
class FusionConfig:
    """How SD and DINOv2 features are fused; every default is the SD4Match code's FUSE_DINO.

    dino_input: "vae": DINOv2 on x * 2 - 1, resized bilinearly without antialiasing (the code's); "imagenet":
        bicubic, ImageNet mean and std (how DINOv2 was trained; sdm 0.3).
    dino_size: DINOv2's input side in pixels (a multiple of its patch size); None: patch x the SD grid (the code's:
        672 px for the 48 x 48 SD map of a 768-px input).
    grid: where the maps are concatenated: "sd": the SD grid (the code's; a DINOv2 map of another grid is resized
        to it); "finer": the finer of the two grids, the other map resized (bilinear, align corners; sdm 0.3).
    weights: (SD, DINOv2) factors after the L2 normalisation; (0.5, 0.5) the code's.
    similarity: how the matchers score fused vectors: "dot" (the code's) or "cosine" (sdm 0.3).

    sdm 0.3's fusion at 768 px: FusionConfig(dino_input="imagenet", dino_size=756, grid="finer", weights=(1.0, 1.0),
    similarity="cosine").
    """

    dino_input: ViTPixels = "vae"
    dino_size: int | None = None
    grid: Literal["sd", "finer"] = "sd"
    weights: tuple[float, float] = (0.5, 0.5)
    similarity: Similarity = "dot"

    def __post_init__(self) -> None:
        if self.grid not in ("sd", "finer"):
            raise ValueError(f"unknown fusion grid {self.grid!r}; choose 'sd' or 'finer'")
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"unknown similarity {self.similarity!r}; choose one of {SIMILARITIES}")
        if len(self.weights) != 2:
            raise ValueError(f"weights are (SD, DINOv2); got {self.weights}")


def fuse_features(
    feature_maps: list[torch.Tensor],
    weights: list[float] | tuple[float, ...] | None = None,
    grid: tuple[int, int] | None = None,
) -> torch.Tensor:
    """B x C_i x h_i x w_i maps -> B x sum(C_i) x H x W: each map resized to `grid` (default: the largest of the
    maps' grids; bilinear, align corners, so the coordinate convention of `sdm.matching` holds), L2-normalised per
    location as the SD4Match code does (x / (|x| + 1e-6)) and scaled by its weight (default 1)."""
    if not feature_maps:
        raise ValueError("no feature maps to fuse")
    weights = list(weights) if weights is not None else [1.0] * len(feature_maps)
    if len(weights) != len(feature_maps):
        raise ValueError(f"{len(weights)} weights for {len(feature_maps)} feature maps")
    if len({f.shape[0] for f in feature_maps}) != 1 or any(f.dim() != 4 for f in feature_maps):
        raise ValueError(f"feature maps must be B x C x h x w with one B; got {[tuple(f.shape) for f in feature_maps]}")
    size = tuple(grid) if grid is not None else max((tuple(f.shape[-2:]) for f in feature_maps), key=lambda s: s[0] * s[1])
    out = []
    for f, w in zip(feature_maps, weights):
        f = f.float()
        if tuple(f.shape[-2:]) != size:
            f = F.interpolate(f, size=size, mode="bilinear", align_corners=True)
        out.append(w * f / (f.norm(dim=1, keepdim=True) + L2_EPS))  # normalised after resizing: every cell the same norm
    return torch.cat(out, dim=1)


class DinoFusion:
    """A frozen DINOv2 and a `FusionConfig`: SD features B x C x h x w and their images B x 3 x H x W in [0, 1]
    -> fused features B x (C + C_dino) x h' x w'. Used in training (`sdm.backbones`) and evaluation
    (`FusedExtractor`), so a prompt is scored on the features it was trained on."""

    def __init__(self, dino: nn.Module, config: FusionConfig | None = None) -> None:
        if isinstance(dino, ViTFeatures):
            raise TypeError("pass the DINOv2 model itself (e.g. sdm.encoders.load_dino(...)); its input is set by FusionConfig")
        self.config = config or FusionConfig()
        self.vit = ViTFeatures(dino, image_size=self.config.dino_size, pixels=self.config.dino_input)

    @property
    def device(self) -> torch.device:
        return next(self.vit.parameters()).device

    def dino_features(self, images: torch.Tensor, sd_grid: tuple[int, int]) -> torch.Tensor:
        """B x 3 x H x W in [0, 1] -> DINOv2 patch features B x C x h x w (h x w = `sd_grid` unless dino_size)."""
        return self.vit(upload(images, self.device), grid=None if self.config.dino_size is not None else sd_grid)

    def __call__(self, sd_features: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        sd_grid = (int(sd_features.shape[-2]), int(sd_features.shape[-1]))
        dino = self.dino_features(images, sd_grid).to(sd_features.device)
        grid = sd_grid if self.config.grid == "sd" else None
        return fuse_features([sd_features, dino], self.config.weights, grid)


class FusedExtractor:
    """A feature extractor for `sdm.evaluate.evaluate`: an SD extractor (`SDExtractor`, any prompt) fused with
    DINOv2 (`DinoFusion`). Its `similarity` tells `evaluate` how to score the fused vectors.

    Args:
        sd_extractor: anything with the `FeatureExtractor` methods; its `conditioning` is kept.
        dino: the DINOv2 model (transformers `Dinov2Model`, e.g. `sdm.encoders.load_dino("facebook/dinov2-base")`).
        config: `FusionConfig()` (the SD4Match code's FUSE_DINO) unless given.
    """

    def __init__(self, sd_extractor: object, dino: nn.Module, config: FusionConfig | None = None) -> None:
        self.sd_extractor = sd_extractor
        self.fusion = DinoFusion(dino, config)
        self.conditioning: Conditioning = sd_extractor.conditioning  # type: ignore[attr-defined]
        self.similarity: Similarity = self.fusion.config.similarity

    @property
    def vit(self) -> ViTFeatures:
        return self.fusion.vit

    def describe(self) -> dict[str, Any]:
        """Its part of the protocol record: the SD extractor's, the ViT's (random weights if either has them) and
        the fusion settings."""
        inner = getattr(self.sd_extractor, "describe", dict)()
        return {**inner, **vit_record(self.vit, inner.get("random_weights", False)), "fusion": json.loads(json.dumps(asdict(self.fusion.config)))}

    @torch.no_grad()
    def image_features(self, batch: ImageBatch) -> torch.Tensor:
        return self.fusion(self.sd_extractor.image_features(batch), batch.pixels)  # type: ignore[attr-defined]

    @torch.no_grad()
    def pair_features(self, src: ImageBatch, trg: ImageBatch) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = self.sd_extractor.pair_features(src, trg)  # type: ignore[attr-defined]
        if s.shape[-2:] == t.shape[-2:]:  # both images of all pairs through DINOv2 in one batch
            both = self.fusion(torch.cat([s, t]), torch.cat([src.pixels, trg.pixels]))
            return both[: s.shape[0]], both[s.shape[0] :]
        return self.fusion(s, src.pixels), self.fusion(t, trg.pixels)


__all__ = ["DinoFusion", "FusedExtractor", "FusionConfig", "fuse_features"]
