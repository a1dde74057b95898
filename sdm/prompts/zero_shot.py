"""Zero-shot prompts: the empty prompt, the template "a photo of a {category}" and the implicit captioner."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from sdm.config import TemplateWords
from sdm.draws import derived_seed
from sdm.encoders import (
    CLIP_MEAN,
    CLIP_STD,
    EncoderName,
    normalise_images,
)
from sdm.features import PromptInput, SDFeaturizer
from sdm.prompts.base import (
    TEMPLATE,
    BuildOptions,
    Conditioning,
    Originals,
    PromptModule,
    category_text,
    register_prompt,
    seeded_linear,
)


class EmptyPrompt(PromptModule):
    """The empty string (the DIFT setting)."""

    kind = "empty"
    needs_images = False  # its prompt does not depend on the pixels
    conditioning: ClassVar[Conditioning] = "fixed"

    @classmethod
    def build(cls, featurizer: SDFeaturizer, opts: BuildOptions) -> PromptModule:
        return cls()

    def image_prompt(
        self, featurizer: SDFeaturizer, images: torch.Tensor | None, categories: list[str], originals: Originals | None = None
    ) -> PromptInput:
        return [""]


class TemplatePrompt(PromptModule):
    """"a photo of a {category}"; `words` "raw" (the authors') or "readable" category names (`category_text`)."""

    kind = "template"
    needs_images = False  # its prompt does not depend on the pixels
    conditioning: ClassVar[Conditioning] = "category"

    @classmethod
    def build(cls, featurizer: SDFeaturizer, opts: BuildOptions) -> PromptModule:
        return cls(opts.template, opts.template_words)

    def __init__(self, template: str = TEMPLATE, words: TemplateWords = "raw") -> None:
        super().__init__()
        if words not in ("raw", "readable"):
            raise ValueError(f"template words must be 'raw' (the authors' code) or 'readable'; got {words!r}")
        self.template = template
        self.words: TemplateWords = words

    def image_prompt(
        self, featurizer: SDFeaturizer, images: torch.Tensor | None, categories: list[str], originals: Originals | None = None
    ) -> PromptInput:
        return [self.template.format(category_text(c, self.words)) for c in categories]

    def config(self) -> dict[str, Any]:
        return {"template": self.template, "words": self.words}

    @classmethod
    def options(cls, config: dict[str, Any]) -> dict[str, Any]:
        return {"template": config.get("template", TEMPLATE), "template_words": config.get("words", "raw")}


class ImplicitCaptioner(PromptModule):
    """SD+DINO's implicit captioner: the CLIP image embedding of the image, projected to 77 x D and added to the
    empty prompt's encoding through a learned gate (zero at start, so it begins as the empty prompt).

    `clip`: a `transformers.CLIPVisionModelWithProjection` (frozen).
    """

    kind = "captioner"
    conditioning: ClassVar[Conditioning] = "image"
    uses: ClassVar[tuple[EncoderName, ...]] = ("clip",)

    @classmethod
    def build(cls, featurizer: SDFeaturizer, opts: BuildOptions) -> PromptModule:
        if opts.encoders.clip is None:
            raise ValueError("the implicit captioner needs a CLIP vision model: PromptEncoders(clip=...)")
        return cls(opts.encoders.clip, featurizer.sd.embed_dim, seed=opts.seed)

    def __init__(self, clip: nn.Module, embed_dim: int, image_size: int = 224, seed: int = 0) -> None:
        super().__init__()
        self.clip = clip.requires_grad_(False).eval()
        self.image_size = image_size
        width = int(clip.config.projection_dim)
        self.proj = seeded_linear(width, 77 * embed_dim, derived_seed(seed, "captioner.proj"))
        self.gate = nn.Parameter(torch.zeros(77, embed_dim))

    def linear_layers(self) -> list[nn.Module]:
        return [self.proj]

    def image_prompt(
        self, featurizer: SDFeaturizer, images: torch.Tensor | None, categories: list[str], originals: Originals | None = None
    ) -> PromptInput:
        if images is None:
            raise ValueError("the implicit captioner needs the images")
        with torch.no_grad():
            pixels = normalise_images(images, self.image_size, CLIP_MEAN, CLIP_STD).to(self.proj.weight.dtype)
            emb = self.clip(pixel_values=pixels).image_embeds
        caption = self.proj(emb).view(emb.shape[0], 77, -1)
        empty = featurizer.encode_text([""]).to(caption.dtype)
        return empty + torch.tanh(self.gate) * caption

    def config(self) -> dict[str, Any]:
        return {"image_size": self.image_size}


for _kind in (EmptyPrompt, TemplatePrompt, ImplicitCaptioner):
    register_prompt(_kind)

__all__ = ["EmptyPrompt", "ImplicitCaptioner", "TemplatePrompt"]
