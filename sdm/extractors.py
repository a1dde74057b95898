"""Feature extractors: what turns images (and a prompt) into feature maps for `sdm.evaluate.evaluate`, and the
explicit per-image store they and the evaluation keep their tensors in (`FeatureStore`, from `sdm.storage`).

- `SDExtractor`: Stable Diffusion features under a prompt module (any conditioning);
- `ModuleExtractor` around `ViTFeatures`: a transformers ViT's patch features (DINO, DINOv2), no prompt;
- `sdm.fusion.FusedExtractor` (SD + DINOv2) and `sdm.inversion.InversionExtractor` (DDIM inversion) follow the
  same `FeatureExtractor` protocol; `sdm.backbones` wraps the SD one for training and evaluation alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from sdm.data import OriginalLoader
from sdm.devices import upload
from sdm.draws import Draws
from sdm.features import SDFeaturizer
from sdm.matching import Similarity
from sdm.prompts import Conditioning, PromptModule, StoredImages, originals_for
from sdm.records import featurizer_record, prompt_record, vit_record
from sdm.storage import FeatureStore


@dataclass(frozen=True)
class ImageBatch:
    """Images for an extractor: `pixels` B x 3 x H x W in [0, 1] (the resized network input), each image's
    category and id, and (optional) `originals`, a loader of the images as stored by id, for prompts that look
    at them (CPM's DINOv2 input). With `load` (ids -> their resized images, n x 3 x H x W), `pixels` may be
    B x 3 x 0 x 0: the images are read when an extractor asks for them (`pixels_at`), for extractors that say
    `images_on_demand`."""

    pixels: torch.Tensor
    categories: list[str]
    ids: list[str]
    originals: OriginalLoader | None = None
    load: Callable[[list[str]], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if self.pixels.dim() != 4 or not len(self.categories) == len(self.ids) == self.pixels.shape[0]:
            raise ValueError(
                f"an ImageBatch needs B x 3 x H x W pixels and B categories and ids; got {tuple(self.pixels.shape)}, "
                f"{len(self.categories)} categories, {len(self.ids)} ids"
            )

    def __len__(self) -> int:
        return len(self.ids)

    def pixels_at(self, idx: list[int]) -> torch.Tensor:
        """The resized images at positions `idx` (n x 3 x H x W): from `pixels`, or read by id when they were left out."""
        if self.pixels.shape[-1] == 0 and self.load is not None:
            return self.load([self.ids[i] for i in idx])
        return self.pixels[idx]

    def originals_for(self, prompt: PromptModule) -> StoredImages | None:
        """The originals a prompt reads (None for prompts that read none)."""
        return originals_for(prompt, self.ids, self.originals)

    def cat(self, other: ImageBatch) -> ImageBatch:
        """This batch followed by `other` (pixels of one size)."""
        return ImageBatch(
            torch.cat([self.pixels, other.pixels]), [*self.categories, *other.categories], [*self.ids, *other.ids], self.originals, self.load
        )


class FeatureExtractor(Protocol):
    """What `evaluate` needs from a feature extractor.

    conditioning: "fixed", "category" or "image" -> `image_features` is used and its features are kept per image;
    "pair" -> `pair_features`. An extractor may set `similarity` ("cosine" when absent, `sdm.matching.Similarity`):
    how `evaluate` scores its features (`similarity_of`).
    """

    conditioning: Conditioning

    def image_features(self, batch: ImageBatch) -> torch.Tensor:
        """B images -> B x C x h x w."""
        ...

    def pair_features(self, src: ImageBatch, trg: ImageBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """B pairs (the same categories on both sides) -> source and target features, each B x C x h x w."""
        ...


def similarity_of(extractor: object) -> Similarity:
    """How an extractor's features are scored: its `similarity` attribute, "cosine" when it has none."""
    return getattr(extractor, "similarity", "cosine")


class SDExtractor:
    """Stable Diffusion features under a prompt module; the VAE posterior is cached per image id.

    Each image's posterior draw and diffusion noise are seeded by its id (`SDFeaturizer`), so an image's features
    are the same in every pair and every batch it appears in, and differ in their noise from every other image's.
    `similarity` is how `evaluate` scores them: "cosine" (the learned prompts' evaluation) or "dot".
    """

    def __init__(
        self,
        featurizer: SDFeaturizer,
        prompt: PromptModule,
        latent_cache: int = 4096,
        similarity: Similarity = "cosine",
        encode_batch: int = 1,
    ) -> None:
        self.featurizer = featurizer
        self.prompt = prompt
        self.conditioning: Conditioning = prompt.conditioning
        self.similarity = similarity  # "dot": the code's config/dift.py (ENABLE_L2_NORM = False); docs/choices.md
        self.store = FeatureStore(latent_cache)  # VAE posteriors by image id
        self.encode_batch = encode_batch  # images per VAE call (`FeatureStore.fetch`); training encodes 8

    @property
    def images_on_demand(self) -> bool:
        """Whether `pair_features` can do without the batch's pixels until it needs them: its prompt does not look at
        them, so it reads only the images whose posteriors are not stored yet (`ImageBatch.pixels_at`). `evaluate`
        then leaves the images out of its batches, and each image is read about once instead of in every pair."""
        return not self.prompt.needs_images

    def latents(self, batch: ImageBatch, generator: Draws | None = None) -> torch.Tensor:
        """B x 4 x h x w VAE latents, encoding only the images not seen before (`posteriors`); the posterior draw
        is seeded by the image id, or fresh from `generator` (training)."""
        posterior = self.posteriors(batch.ids, batch.pixels_at)
        return self.featurizer.sample_latents(posterior, batch.ids, generator)

    def posteriors(self, ids: Sequence[str], images_at: Callable[[list[int]], torch.Tensor]) -> torch.Tensor:
        """B x 2C x h x w posteriors (`SDFeaturizer.encode_posterior`) of the images `ids`, kept in `store` by id.
        `images_at(indices)` gives only the images to encode, so stored ones are never copied or moved. Every VAE
        call encodes `encode_batch` images, padded (`FeatureStore.fetch`): an image's posterior is the same bits
        whichever batch meets it first."""
        return self.store.fetch(list(ids), lambda idx: self.featurizer.encode_posterior(images_at(idx)), self.encode_batch)

    def describe(self) -> dict[str, Any]:
        """Its part of the protocol record: the featurizer's settings and weights, and the prompt."""
        return {**featurizer_record(self.featurizer), **prompt_record(self.prompt)}

    def reset(self) -> None:
        """Forget the stored posteriors (after changing the VAE or the images behind the ids)."""
        self.store.reset()

    @torch.no_grad()
    def image_features(self, batch: ImageBatch) -> torch.Tensor:
        pixels = upload(batch.pixels, self.featurizer.device) if self.prompt.needs_images else None
        prompt = self.prompt.image_prompt(self.featurizer, pixels, batch.categories, batch.originals_for(self.prompt))
        return self.featurizer.features_from_latents(self.latents(batch), prompt, keys=batch.ids)

    @torch.no_grad()
    def pair_features(self, src: ImageBatch, trg: ImageBatch) -> tuple[torch.Tensor, torch.Tensor]:
        p_src, p_trg = pair_prompts(self.featurizer, self.prompt, src, trg)
        b = len(src)
        h_src = self.featurizer.encode_prompt(p_src, b)
        h_trg = h_src if p_trg is p_src else self.featurizer.encode_prompt(p_trg, b)  # CPM: one prompt per pair
        both = src.cat(trg)
        lat = self.latents(both)
        feats = self.featurizer.features_from_latents(lat, torch.cat([h_src, h_trg]), keys=both.ids)  # one UNet batch
        return feats[:b], feats[b:]


def pair_prompts(featurizer: SDFeaturizer, prompt: PromptModule, src: ImageBatch, trg: ImageBatch) -> tuple[Any, Any]:
    """The prompt module's prompts for the source and target sides of B pairs (`PromptModule.pair_prompts`)."""
    dev = featurizer.device
    originals = (src.originals_for(prompt), trg.originals_for(prompt))
    src_px, trg_px = (upload(side.pixels, dev) if prompt.needs_images else None for side in (src, trg))
    return prompt.pair_prompts(featurizer, src_px, trg_px, src.categories, originals)  # type: ignore[arg-type]


def per_image_pair_features(extractor: FeatureExtractor, src: ImageBatch, trg: ImageBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """`pair_features` of an extractor whose features do not depend on the pair: both sides in one batch."""
    feats = extractor.image_features(src.cat(trg))
    return feats[: len(src)], feats[len(src) :]


class ModuleExtractor:
    """Any module mapping images B x 3 x H x W in [0, 1] to B x C x h x w, with no prompt (conditioning "fixed")."""

    conditioning: Conditioning = "fixed"

    def __init__(self, module: nn.Module, device: torch.device | str | None = None) -> None:
        self.module = module.eval()
        self.device = torch.device(device) if device else next(module.parameters()).device

    def describe(self) -> dict[str, Any]:
        """Its part of the protocol record: the module's name and weights (`records.vit_record`)."""
        return vit_record(self.module)

    @torch.no_grad()
    def image_features(self, batch: ImageBatch) -> torch.Tensor:
        return self.module(upload(batch.pixels, self.device))

    def pair_features(self, src: ImageBatch, trg: ImageBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return per_image_pair_features(self, src, trg)


ViTPixels = Literal["imagenet", "vae"]


class ViTFeatures(nn.Module):
    """Patch tokens of a transformers ViT (DINO `ViTModel`, DINOv2 `Dinov2Model`) as a dense map.

    images B x 3 x H x W in [0, 1] -> B x C x h x w: the images resized to (p h) x (p w), p the patch size, with
    (h, w) the `grid` of the call or `image_size / p` on both sides. The paper's Table 2 zero-shot baselines:
    DINO ViT-B/8 and DINOv2 ViT-B/14 (`sdm.encoders.load_dino`).

    pixels: "imagenet": bicubic (antialiased), ImageNet mean and std, as the models were trained; "vae": the
        SD4Match code's FUSE_DINO input, the VAE's input x * 2 - 1 in [-1, 1] resized bilinearly without
        antialiasing, i.e. torchvision 0.14's `TF.resize` of a tensor (`sd_feature_extractor.py:134`).
    """

    def __init__(self, model: nn.Module, image_size: int | None = 224, layer: int | None = None, pixels: ViTPixels = "imagenet") -> None:
        super().__init__()
        patch = int(model.config.patch_size)
        if image_size is not None and image_size % patch:
            raise ValueError(f"image_size {image_size} must be a multiple of the patch size {patch}")
        if pixels not in ("imagenet", "vae"):
            raise ValueError(f"unknown pixels {pixels!r}; choose 'imagenet' or 'vae'")
        self.model = model.requires_grad_(False).eval()
        self.patch, self.image_size, self.layer, self.pixels = patch, image_size, layer, pixels
        self.grid = image_size // patch if image_size is not None else None

    @torch.no_grad()
    def forward(self, images: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        from sdm.encoders import IMAGENET_MEAN, IMAGENET_STD, normalise_images

        if grid is None and self.grid is None:
            raise ValueError("ViTFeatures(image_size=None) needs the grid of each call: vit(images, grid=(h, w))")
        gh, gw = (int(grid[0]), int(grid[1])) if grid is not None else (self.grid, self.grid)
        size = (gh * self.patch, gw * self.patch)
        if self.pixels == "imagenet":
            x = normalise_images(images, size, IMAGENET_MEAN, IMAGENET_STD)
        else:
            x = F.interpolate(images.float() * 2 - 1, size=size, mode="bilinear", align_corners=False, antialias=False)
        x = x.to(next(self.model.parameters()).dtype)
        kwargs: dict[str, Any] = {"interpolate_pos_encoding": True} if "interpolate_pos_encoding" in self.model.forward.__code__.co_varnames else {}
        out = self.model(pixel_values=x, output_hidden_states=self.layer is not None, **kwargs)
        tokens = out.last_hidden_state if self.layer is None else out.hidden_states[self.layer]
        patches = tokens[:, -gh * gw :]  # drop CLS (and register tokens, if any)
        return patches.transpose(1, 2).reshape(x.shape[0], -1, gh, gw).float()


__all__ = [
    "FeatureExtractor", "FeatureStore", "ImageBatch", "ModuleExtractor", "SDExtractor", "ViTFeatures", "ViTPixels", "pair_prompts",
    "per_image_pair_features", "similarity_of",
]
