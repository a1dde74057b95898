"""SD+DINO-style fused features (Zhang et al., NeurIPS 2023, as the SD4Match paper's "SD+DINO*" rows use them).

Stable Diffusion features and a ViT's patch features (DINOv2) are each L2-normalised per location (along
channels), resized to a common grid (bilinear, align corners, so the coordinate convention of `sdm.matching`
holds) and concatenated along channels, optionally weighted. The cosine similarity of two fused vectors is then
the weighted mean of the two models' cosine similarities.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sdm.data import OriginalLoader
from sdm.prompts import Conditioning


def fuse_features(
    feature_maps: list[torch.Tensor], weights: list[float] | tuple[float, ...] | None = None, grid: tuple[int, int] | None = None
) -> torch.Tensor:
    """B x C_i x h_i x w_i maps -> B x sum(C_i) x H x W: each map L2-normalised per location, resized to `grid`
    (default: the largest of the maps' grids) and scaled by its weight (default 1)."""
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
        out.append(w * F.normalize(f, dim=1))  # normalised after resizing, so every cell has unit norm
    return torch.cat(out, dim=1)


class FusedExtractor:
    """A feature extractor for `sdm.evaluate.evaluate`: an SD extractor (`SDExtractor`, any prompt) fused with a
    prompt-free image model (e.g. `ViTFeatures` over DINOv2) by `fuse_features`.

    Args:
        sd_extractor: anything with the `FeatureExtractor` methods; its `conditioning` is kept.
        vit: module mapping images B x 3 x H x W in [0, 1] to B x C x h x w.
        weights: (SD weight, ViT weight); (1, 1) as in SD+DINO.
        grid: common (h, w); None: the larger of the two grids.
    """

    def __init__(
        self,
        sd_extractor: object,
        vit: nn.Module,
        *,
        weights: tuple[float, float] = (1.0, 1.0),
        grid: tuple[int, int] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.sd_extractor = sd_extractor
        self.vit = vit.eval()
        self.weights = tuple(weights)
        self.grid = grid
        self.conditioning: Conditioning = sd_extractor.conditioning  # type: ignore[attr-defined]
        self.device = torch.device(device) if device else next(vit.parameters()).device

    @torch.no_grad()
    def vit_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.vit(images.to(self.device)).float()

    def fuse(self, sd_feats: torch.Tensor, vit_feats: torch.Tensor) -> torch.Tensor:
        return fuse_features([sd_feats, vit_feats.to(sd_feats.device)], self.weights, self.grid)

    @torch.no_grad()
    def image_features(
        self, images: torch.Tensor, categories: list[str], ids: list[str], originals: OriginalLoader | None = None
    ) -> torch.Tensor:
        sd_feats = self.sd_extractor.image_features(images, categories, ids, originals)  # type: ignore[attr-defined]
        return self.fuse(sd_feats, self.vit_features(images))

    @torch.no_grad()
    def pair_features(
        self,
        src: torch.Tensor,
        trg: torch.Tensor,
        categories: list[str],
        src_ids: list[str],
        trg_ids: list[str],
        originals: OriginalLoader | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = self.sd_extractor.pair_features(src, trg, categories, src_ids, trg_ids, originals)  # type: ignore[attr-defined]
        v = self.vit_features(torch.cat([src, trg]))
        return self.fuse(s, v[: src.shape[0]]), self.fuse(t, v[src.shape[0] :])
