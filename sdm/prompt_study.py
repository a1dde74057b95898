"""Looking into learned prompts: their encoder hidden states per category or pair, images Stable Diffusion
generates from them, and the statistics of those images (notebook 06)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def image_stats(images: list[Any]) -> list[dict[str, Any]]:
    """Per PIL image: mean and std of its pixels in [0, 1] and its (H, W), for the results JSON of notebook 06."""
    arrays = [np.asarray(im, dtype=np.float32) / 255 for im in images]
    return [{"mean": float(a.mean()), "std": float(a.std()), "size": list(a.shape[:2])} for a in arrays]


@torch.no_grad()
def category_embeddings(featurizer: Any, module: Any, category: str) -> torch.Tensor:
    """The UNet's encoder hidden states (1 x 77 x D) of a Class prompt for one category."""
    return featurizer.encode_prompt(module.image_prompt(featurizer, None, [category]))


@torch.no_grad()
def pair_embeddings(featurizer: Any, module: Any, pairs: Any, pair: Any) -> torch.Tensor:
    """The UNet's encoder hidden states (1 x 77 x D) of a pair-conditioned (CPM) prompt for one pair of `pairs`,
    with the original images CPM's DINOv2 reads."""
    from sdm.extractors import ImageBatch, pair_prompts

    src = ImageBatch(pair.src_image[None], [pair.category], [pair.src_id], pairs.original_image)
    trg = ImageBatch(pair.trg_image[None], [pair.category], [pair.trg_id], pairs.original_image)
    return featurizer.encode_prompt(pair_prompts(featurizer, module, src, trg)[0])


def generate_images(
    sd: Any,
    prompt_embeds: torch.Tensor,
    *,
    size: int = 768,
    steps: int = 50,
    guidance_scale: float = 7.5,
    seed: int = 0,
    negative_prompt_embeds: torch.Tensor | None = None,
) -> list[Any]:
    """Images Stable Diffusion generates from encoder hidden states (B x 77 x D, e.g. `featurizer.encode_prompt`
    of a learned prompt): diffusers' `StableDiffusionPipeline` built from the bundle's parts with a DDIM
    scheduler of the same noise schedule. Classifier-free guidance uses the empty prompt as the negative.
    Returns B PIL images."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=sd.vae,
        text_encoder=sd.text_encoder,
        tokenizer=sd.tokenizer,
        unet=sd.unet,
        scheduler=DDIMScheduler.from_config(sd.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    embeds = prompt_embeds.to(device=sd.device, dtype=sd.dtype)
    if negative_prompt_embeds is None and guidance_scale > 1:
        from sdm.features import SDFeaturizer

        negative_prompt_embeds = SDFeaturizer(sd).encode_text([""]).expand(embeds.shape[0], -1, -1)
    if negative_prompt_embeds is not None:
        negative_prompt_embeds = negative_prompt_embeds.to(device=sd.device, dtype=sd.dtype)
    generator = torch.Generator(device=sd.device).manual_seed(seed)
    with torch.no_grad():
        out = pipe(
            prompt_embeds=embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=generator,
            output_type="pil",
        )
    return list(out.images)


__all__ = ["category_embeddings", "generate_images", "image_stats", "pair_embeddings"]
