"""The conditional prompting module (CPM): a prompt computed from DINOv2 descriptors of the image pair."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import asdict
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from sdm.config import CPMConfig
from sdm.data import OriginalLoader
from sdm.devices import upload
from sdm.draws import derived_seed
from sdm.encoders import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EncoderName,
    dino_pixels,
    normalise_images,
)
from sdm.features import PromptInput, SDFeaturizer
from sdm.prompts.base import (
    BuildOptions,
    Conditioning,
    Originals,
    PromptModule,
    StoredImages,
    register_prompt,
    seeded_linear,
)
from sdm.prompts.learned import random_token_vectors
from sdm.storage import FeatureStore


class DinoDescriptor(nn.Module):
    """Frozen DINOv2 (transformers `Dinov2Model`): pixels B x 3 x S x S (`pixels` or `resized_pixels`) -> patch
    tokens B x P x C (P = (S / 14)^2, 256 at 224 px) or the pooled CLS token B x 1 x C."""

    # Descriptors kept by `stored`: patch tokens of DINOv2-B are 256 x 768 float32 (0.8 MB) an image.
    cache_size: ClassVar[int] = 256

    def __init__(self, dino: nn.Module, image_size: int = 224, resize: int = 256) -> None:
        super().__init__()
        self.dino = dino.requires_grad_(False).eval()
        self.image_size = image_size
        self.resize = resize
        self.width = int(dino.config.hidden_size)
        self.n_patches = (image_size // int(dino.config.patch_size)) ** 2
        self.store = FeatureStore(self.cache_size)
        self._source: OriginalLoader | None = None  # the loader whose ids the store's keys are

    def pixels(self, originals: Originals) -> torch.Tensor:
        """Images as stored -> B x 3 x S x S through the dinov2-base processor (`dino_pixels`)."""
        return torch.stack([dino_pixels(im, self.resize, self.image_size) for im in originals])

    def resized_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W in [0, 1] -> B x 3 x S x S squashed (bicubic) and ImageNet-normalised."""
        return normalise_images(images, self.image_size, IMAGENET_MEAN, IMAGENET_STD)

    def stored(self, originals: StoredImages, descriptor: Literal["patch", "global"] = "patch") -> torch.Tensor:
        """Descriptors of images as stored (B x P x C, as `forward`), each image run through DINOv2 on its own and
        kept by id: the authors compute DINOv2 once per image, a batch of one, and reuse the output for every pair
        (pre_compute_dino_feature.py:54-65). An image's descriptors then do not depend on the batch it comes in,
        and only images not kept are decoded. The store is emptied when the images come from another loader (an
        other dataset); its keys hold the device and autocast dtype the descriptors were computed under."""
        if self._source is None or originals.load != self._source:  # bound methods: equal for the same dataset
            self.store.reset()
            self._source = originals.load
        device = next(self.dino.parameters()).device
        autocast = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        keys: list[Hashable] = [(i, descriptor, str(device), autocast) for i in originals.ids]
        return self.store.fetch(keys, lambda idx: self(self.pixels([originals[k] for k in idx]), descriptor))

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor, descriptor: Literal["patch", "global"] = "patch") -> torch.Tensor:
        device = next(self.dino.parameters()).device
        out = self.dino(pixel_values=upload(pixels, device, self.dino.dtype))
        if descriptor == "global":
            return out.pooler_output.float().unsqueeze(1)
        return out.last_hidden_state[:, 1:].float()


class CPMPrompt(PromptModule):
    """Conditional prompting module: [n_global learned vectors ; n_cond vectors conditioned on the image pair].

    Pair of patch descriptors F (256 x 2C) -> g_d (to D) -> g_n (along patches, 256 -> 256) -> adaptive max pool
    to n_cond -> theta_cond = tanh(A) * (. + P) (`CPMConfig.form`). Tensor names and shapes follow the authors'
    checkpoints: global_embeds 1 x 25 x D, positional_embedding (P) and alpha_cond (A) 1 x 50 x D, g_d
    (`linear_C`), g_n (`linear_N`).
    """

    kind = "cpm"
    uses: ClassVar[tuple[EncoderName, ...]] = ("dino",)

    @classmethod
    def build(cls, featurizer: SDFeaturizer, opts: BuildOptions) -> PromptModule:
        if opts.encoders.dino is None:
            raise ValueError("CPM needs DINOv2: PromptEncoders(dino=sdm.encoders.load_dino()) (or tiny_dinov2() offline)")
        cfg, seed, d = opts.cpm or CPMConfig(), opts.seed, featurizer.sd.embed_dim
        init_global: torch.Tensor | None
        if cfg.form == "authors":  # torch.rand, hybrid_captioner.py:51,73,77
            def uniform(name: str, n: int) -> torch.Tensor:
                return torch.rand(1, n, d, generator=torch.Generator().manual_seed(derived_seed(seed, name)))

            init_global = uniform("cpm.global_embeds", cfg.n_global) if cfg.global_prompt else None
            init_pos, init_alpha = uniform("cpm.positional_embedding", cfg.n_cond), uniform("cpm.alpha_cond", cfg.n_cond)
        else:  # the paper's equation as sdm first built it: gate at zero, vocabulary embeddings elsewhere
            init_global = random_token_vectors(featurizer, cfg.n_global, seed=seed) if cfg.global_prompt else None
            first = cfg.n_global + 1 if cfg.global_prompt else 1
            init_pos = random_token_vectors(featurizer, cfg.n_cond, first_position=first, seed=seed + 1)
            init_alpha = torch.zeros(1, cfg.n_cond, d)
        dino = DinoDescriptor(opts.encoders.dino, cfg.dino_size, cfg.dino_resize)
        return cls(dino, d, init_global, init_pos, init_alpha, cfg, seed=seed)

    def __init__(
        self,
        dino: DinoDescriptor,
        embed_dim: int,
        init_global: torch.Tensor | None,
        init_pos: torch.Tensor,
        init_alpha: torch.Tensor,
        cfg: CPMConfig,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.dino = dino
        n_in = dino.n_patches if cfg.descriptor == "patch" else 1
        width = dino.width * (2 if cfg.condition == "pair" else 1)
        self.g_d = seeded_linear(width, embed_dim, derived_seed(seed, "cpm.g_d"))
        self.g_n = seeded_linear(n_in, cfg.gn_width, derived_seed(seed, "cpm.g_n")) if cfg.gn else None
        self.alpha_cond = nn.Parameter(init_alpha.clone().float().view(1, cfg.n_cond, embed_dim))
        self.positional_embedding = nn.Parameter(init_pos.clone().float().view(1, cfg.n_cond, embed_dim))
        self.global_embeds = nn.Parameter(init_global.clone().float().view(1, cfg.n_global, embed_dim)) if init_global is not None else None

    def linear_layers(self) -> list[nn.Module]:  # g_d and g_n (learning rate 1e-3 in the paper)
        return [layer for layer in (self.g_d, self.g_n) if layer is not None]

    @property
    def conditioning(self) -> Conditioning:  # type: ignore[override]
        return "pair" if self.cfg.condition == "pair" else "image"

    @property
    def needs_originals(self) -> bool:
        return self.cfg.dino_input == "original"

    @property
    def needs_images(self) -> bool:
        return self.cfg.dino_input == "resized"

    def condition_tokens(self, descriptors: torch.Tensor) -> torch.Tensor:
        """B x P x C descriptors (P = 1 for the global descriptor) -> B x n_cond x D conditional vectors."""
        f = self.g_d(descriptors)  # B x P x D
        if self.cfg.descriptor == "patch":
            f = f.transpose(1, 2)  # B x D x P
            if self.g_n is not None:
                f = self.g_n(f)
            f = F.adaptive_max_pool1d(f, self.cfg.n_cond).transpose(1, 2)  # B x n_cond x D
        else:
            f = f.expand(-1, self.cfg.n_cond, -1)  # the code broadcasts one projected vector to every token
        if self.cfg.form == "authors":
            return torch.tanh(self.alpha_cond) * (f + self.positional_embedding)
        return f * self.alpha_cond + self.positional_embedding

    def _prompt(self, descriptors: torch.Tensor) -> torch.Tensor:
        theta = self.condition_tokens(descriptors)
        if self.global_embeds is None:
            return theta
        return torch.cat([self.global_embeds.expand(theta.shape[0], -1, -1), theta], dim=1)

    def descriptors(self, images: torch.Tensor | None, originals: Originals | None) -> torch.Tensor:
        """DINOv2 descriptors B x P x C of B images, from `originals` or (dino_input "resized") `images`."""
        if self.cfg.dino_input == "original":
            if originals is None:
                raise ValueError(
                    "CPM's DINOv2 input is the original image (CPMConfig.dino_input='original', as the authors' "
                    "pre_compute_dino_feature.py): pass originals=... (PairDataset.original_image(id) gives them), "
                    "or build the prompt with CPMConfig(dino_input='resized')"
                )
            if isinstance(originals, StoredImages):
                return self.dino.stored(originals, self.cfg.descriptor)
            pixels = self.dino.pixels(originals)
        else:
            if images is None:
                raise ValueError("CPM needs the images")
            pixels = self.dino.resized_pixels(images)
        return self.dino(pixels, self.cfg.descriptor)

    def image_prompt(
        self, featurizer: SDFeaturizer, images: torch.Tensor | None, categories: list[str], originals: Originals | None = None
    ) -> PromptInput:
        if self.cfg.condition == "pair":
            return super().image_prompt(featurizer, images, categories)
        return self._prompt(self.descriptors(images, originals))

    def pair_prompts(
        self, featurizer: SDFeaturizer, src: torch.Tensor | None, trg: torch.Tensor | None, categories: list[str],
        originals: tuple[Originals, Originals] | None = None,
    ) -> tuple[PromptInput, PromptInput]:  # fmt: skip
        if self.cfg.condition == "image":
            return super().pair_prompts(featurizer, src, trg, categories, originals)
        src_o, trg_o = originals if originals is not None else (None, None)
        both = torch.cat([self.descriptors(src, src_o), self.descriptors(trg, trg_o)], dim=-1)
        prompt = self._prompt(both)
        return prompt, prompt  # the same prompt for both images of the pair (train_cpm.py:160-161)

    def config(self) -> dict[str, Any]:
        return {"cpm": asdict(self.cfg)}

    @classmethod
    def options(cls, config: dict[str, Any]) -> dict[str, Any]:
        return {"cpm": CPMConfig(**config["cpm"])}


register_prompt(CPMPrompt, learned=True)

__all__ = ["CPMPrompt", "DinoDescriptor"]
