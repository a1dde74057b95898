"""The matcher's two crop geometries as strategy objects, chosen by `AttentionMatcherConfig.geometry`:

* `AuthorsCrops` ("authors", the default): what Hedlin et al.'s code computes: crops of int(side x frac) px at
  integer offsets placed by the margin rule, maps upsampled without align corners, the four corner crops then
  crops around the running argmax at inference, the argmax pixel + 0.5 as the match (utils/optimize_token.py:256-310,
  474-502; utils/optimize.py:79-82).
* `ContinuousCrops` ("continuous", sdm 0.2's): crops at continuous offsets in normalised align-corners
  coordinates, maps upsampled with align corners, random crops shared by all embeddings at inference.

Each answers the same four questions for `AttentionMatcher`: how maps are upsampled (`align_corners`), how a
source's crop latents are made (`crop_latents`), where an optimisation step's crops and Gaussian targets lie
(`draw`), how the target's maps are gathered over crops (`target_maps`), and how a map cell becomes an image pixel
(`to_pixels`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from sdm.attention.geometry import (
    add_windows,
    crop_images,
    crop_side,
    generator_words,
    margin_crop_offsets,
    margin_offsets,
    paste_maps,
    random_crops,
)
from sdm.devices import upload
from sdm.matching import argmax_2d


class CropGeometry:
    """Base of the geometries; the matcher passes itself (`m`) for its UNet, encoder and settings."""

    name: ClassVar[str]
    align_corners: ClassVar[bool]

    def crop_latents(self, m: Any, pixels: torch.Tensor, side: tuple[int, int], frac: float) -> Callable[[torch.Tensor], torch.Tensor]:
        """offsets of one draw -> the VAE latents of those crops of `pixels` (1 x 3 x H x W)."""
        raise NotImplementedError

    def draw(self, centers_px: torch.Tensor, m: Any, side: tuple[int, int], frac: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimisation step's crops for B points (resized pixels B x 2): (offsets, Gaussian centres B x 2 in map
        pixels of each crop)."""
        raise NotImplementedError

    def target_maps(
        self, m: Any, pixels: torch.Tensor, flat: torch.Tensor, timestep: int, crops: int, frac: float, gen: torch.Generator, store: Any
    ) -> torch.Tensor:
        """Per-layer maps of M embeddings over the target, gathered over `crops` crops: M x layers x H' x W'."""
        raise NotImplementedError

    def to_pixels(self, cells: torch.Tensor, map_hw: tuple[int, int], size: tuple[int, int], image_hw: tuple[int, int]) -> torch.Tensor:
        """N x 2 map cells (x, y) -> N x 2 pixels of the original image of size `image_hw` (H, W); `size` is the
        input size (H', W') the maps were computed at."""
        raise NotImplementedError


class AuthorsCrops(CropGeometry):
    name = "authors"
    align_corners = False

    def crop_latents(self, m: Any, pixels: torch.Tensor, side: tuple[int, int], frac: float) -> Callable[[torch.Tensor], torch.Tensor]:
        return m._crop_bank(pixels, side)

    def draw(self, centers_px: torch.Tensor, m: Any, side: tuple[int, int], frac: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        map_h, map_w = m.map_size
        offsets = margin_crop_offsets(centers_px, tuple(m.config.image_size), frac, m.config.crop_margin, gen)
        # their new_pixel = (x - x0) / crop side, times the map side, on the grid arange(side)
        q = (centers_px - offsets) / torch.tensor([side[1], side[0]])
        return offsets, q * torch.tensor([map_w, map_h])

    def target_maps(
        self, m: Any, pixels: torch.Tensor, flat: torch.Tensor, timestep: int, crops: int, frac: float, gen: torch.Generator, store: Any
    ) -> torch.Tensor:
        """Hedlin et al.'s inference (utils/optimize_token.py:256-310), for every embedding at once: crops centred
        (with the margin rule) on the four corners, then on the argmax of the maps gathered so far; fresh noise for
        each; each crop's per-layer maps upsampled to the crop side and added where the crop lies; the per-pixel
        mean over the crops covering it. The running argmax and the offsets stay on the matcher's device (the random
        words come from the CPU generator, as `margin_crop_offsets` draws them), so the host queues all crops without
        waiting for the GPU."""
        size = tuple(m.config.image_size)
        if tuple(m.map_size) != size:
            raise ValueError("geometry 'authors' pastes crops in image pixels: leave map_size at image_size")
        h, w = size
        side = crop_side(size, frac)
        n, layers = flat.shape[0], len(m.layers)
        sums = torch.zeros(n, layers, h, w, device=m.device)
        counts = torch.zeros(n, 1, h, w, device=m.device)
        corners = m._upload(torch.tensor([[0.0, 0.0], [0.0, float(h)], [float(w), 0.0], [float(w), float(h)]]))  # (x, y) as the code
        crop_latents = m._crop_bank(pixels, side)
        for it in tqdm(range(crops), desc="attention maps", disable=not m.config.progress, leave=False):
            if it < 4:
                locs = corners[it].expand(n, 2)
            else:
                running = torch.nan_to_num(sums / counts).mean(dim=1)  # uncovered pixels (0 / 0) count as 0
                locs = argmax_2d(running) + 0.5
            words = m._upload(generator_words(2 * n, gen).view(n, 2))
            offsets = margin_offsets(locs, size, frac, m.config.crop_margin, words)
            noisy = m._noisy(crop_latents(offsets), timestep, gen)
            for chunk in m._chunks(n):
                maps = m._unet_maps(noisy[chunk], flat[chunk], timestep, store, per_layer=True, size=side)
                add_windows(sums[chunk], counts[chunk], maps, offsets[chunk])
        return sums / counts.clamp_min(1.0)

    def to_pixels(self, cells: torch.Tensor, map_hw: tuple[int, int], size: tuple[int, int], image_hw: tuple[int, int]) -> torch.Tensor:
        # the code's pixel of the argmax + 0.5 on the resized image (utils/optimize.py:79-82), then per axis back to
        # the original image: x = x' * W / W'
        (h, w), (size_h, size_w) = image_hw, size
        return (cells.float() + 0.5) * cells.new_tensor([w / size_w, h / size_h])


class ContinuousCrops(CropGeometry):
    name = "continuous"
    align_corners = True

    def crop_latents(self, m: Any, pixels: torch.Tensor, side: tuple[int, int], frac: float) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda offsets: m._encode(crop_images(pixels, offsets, frac))  # new offsets at every draw: nothing kept

    def draw(self, centers_px: torch.Tensor, m: Any, side: tuple[int, int], frac: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        (size_h, size_w), (map_h, map_w) = m.config.image_size, m.map_size
        centers = centers_px / torch.tensor([size_w - 1, size_h - 1])  # normalised align-corners coordinates
        offsets = random_crops(centers.shape[0], frac, gen)
        # The Gaussian moves with the crop: centre in the crop frame q = (p - o) / s, in map pixels.
        return offsets, (centers - offsets) / frac * torch.tensor([map_w - 1, map_h - 1])

    def target_maps(
        self, m: Any, pixels: torch.Tensor, flat: torch.Tensor, timestep: int, crops: int, frac: float, gen: torch.Generator, store: Any
    ) -> torch.Tensor:
        """`crops` random continuous crops shared by all embeddings (one crop: the whole image), one noise draw per
        crop, maps pasted back with align corners."""
        frac = 1.0 if crops == 1 else frac
        offsets = random_crops(crops, frac, gen)
        latents = torch.cat([m._encode(crop_images(pixels, offsets[c], frac)) for c in m._chunks(crops)])
        noisy = m._noisy(latents, timestep, gen)  # one noise draw per crop, shared by all embeddings
        n, layers = flat.shape[0], len(m.layers)
        # Items are (embedding, crop) pairs, crop-minor: item i uses embedding i // crops and crop i % crops.
        acc = torch.zeros(n, layers, *m.map_size, device=m.device)
        _, coverage = paste_maps(torch.zeros(crops, *m.map_size, device=m.device), offsets, frac)
        for chunk in m._chunks(n * crops):
            idx = torch.arange(chunk.start, chunk.stop)
            emb_idx, crop_idx = idx // crops, idx % crops
            emb_dev = upload(emb_idx, m.device)
            maps = m._unet_maps(noisy[upload(crop_idx, noisy.device)], flat[emb_dev], timestep, store, per_layer=True)
            pasted, _ = paste_maps(maps.flatten(0, 1), offsets[crop_idx].repeat_interleave(layers, dim=0), frac)
            acc.index_add_(0, emb_dev, pasted.view(-1, layers, *m.map_size))
        return acc / coverage.sum(0).clamp_min(1.0)

    def to_pixels(self, cells: torch.Tensor, map_hw: tuple[int, int], size: tuple[int, int], image_hw: tuple[int, int]) -> torch.Tensor:
        # map cell -> normalised [0, 1] -> original pixels (align corners on the resized image, then per-axis resize
        # back: x = x' * W / W')
        (map_h, map_w), (h, w), (size_h, size_w) = map_hw, image_hw, size
        norm = cells / cells.new_tensor([map_w - 1, map_h - 1])
        return norm * cells.new_tensor([(size_w - 1) * w / size_w, (size_h - 1) * h / size_h])


GEOMETRIES: dict[str, CropGeometry] = {g.name: g for g in (AuthorsCrops(), ContinuousCrops())}

__all__ = ["GEOMETRIES", "AuthorsCrops", "ContinuousCrops", "CropGeometry"]
