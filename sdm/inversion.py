"""Deterministic DDIM inversion of a latent to timestep t, as an alternative to DDPM noising for features.

diffusers' `DDIMScheduler.add_noise` is the same closed form as `DDPMScheduler.add_noise`
(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, identical source in diffusers 0.42), so "DDIM noising" would change
nothing. What DDIM does differently is its *deterministic* inversion: the clean latent is carried to
timestep t along the model's own ODE, each step re-using the UNet's noise prediction,

    x0_hat = (x_s - sqrt(1 - abar_s) eps) / sqrt(abar_s),   x_s' = sqrt(abar_s') x0_hat + sqrt(1 - abar_s') eps,

over timesteps 0 = s_0 < s_1 < ... < s_S = t. The clean latent is taken as x at s_0 = 0 (abar_0 = 0.99915
for SD2-1), as inversion code usually does. Epsilon, v and sample predictions are converted to (x0, eps).
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from sdm.devices import upload
from sdm.extractors import ImageBatch, pair_prompts
from sdm.features import PromptInput, SDFeaturizer
from sdm.prompts import Conditioning, PromptModule
from sdm.records import featurizer_record, prompt_record


def inversion_timesteps(timestep: int, steps: int) -> list[int]:
    """0 = s_0 < ... < s_S = timestep, evenly spaced and rounded (fewer when timestep < steps)."""
    if timestep < 0 or steps < 1:
        raise ValueError(f"need timestep >= 0 and steps >= 1; got {timestep}, {steps}")
    return sorted({round(i * timestep / steps) for i in range(steps + 1)})


def _x0_eps(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    sa, sb = a.sqrt(), (1 - a).sqrt()
    if prediction_type == "epsilon":
        return (x - sb * out) / sa, out
    if prediction_type == "v_prediction":
        return sa * x - sb * out, sa * out + sb * x
    if prediction_type == "sample":
        return out, (x - sa * out) / sb
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


@torch.no_grad()
def ddim_invert(
    featurizer: SDFeaturizer, latents: torch.Tensor, prompt: PromptInput, timestep: int | None = None, steps: int = 10
) -> torch.Tensor:
    """Clean VAE latents B x 4 x h x w -> deterministic DDIM inversion to `timestep` (default: the featurizer's).

    Args:
        featurizer: supplies the UNet, the noise schedule and prompt encoding.
        prompt: any prompt form `SDFeaturizer.encode_prompt` accepts (a batch of one is broadcast); the UNet is
            conditioned on it at every inversion step.
        steps: UNet evaluations (full forward passes) on the way from 0 to `timestep`.
    """
    sd = featurizer.sd
    timestep = featurizer.timestep if timestep is None else int(timestep)
    n_t = sd.scheduler.config.num_train_timesteps
    if not 0 <= timestep < n_t:
        raise ValueError(f"timestep must be in 0..{n_t - 1}; got {timestep}")
    hidden = featurizer.encode_prompt(prompt, batch_size=latents.shape[0]).to(sd.unet.dtype)
    alphas = sd.scheduler.alphas_cumprod.to(device=latents.device, dtype=torch.float32)
    prediction = sd.scheduler.config.prediction_type
    ts = inversion_timesteps(timestep, steps)
    x = latents.float()
    for s, s_next in itertools.pairwise(ts):
        t = torch.full((x.shape[0],), s, device=x.device, dtype=torch.long)
        out = sd.unet(x.to(sd.unet.dtype), t, encoder_hidden_states=hidden).sample.float()
        x0, eps = _x0_eps(out, x, alphas[s], prediction)
        x = alphas[s_next].sqrt() * x0 + (1 - alphas[s_next]).sqrt() * eps
    return x.to(latents.dtype)


def inverted_features(featurizer: SDFeaturizer, latents: torch.Tensor, prompt: PromptInput, steps: int = 10) -> torch.Tensor:
    """Features of the DDIM-inverted latents at the featurizer's timestep and up block (no ensemble: the
    inversion is deterministic). B x 4 x h x w -> B x C x h' x w'."""
    hidden = featurizer.encode_prompt(prompt, batch_size=latents.shape[0])
    noisy = ddim_invert(featurizer, latents, hidden, featurizer.timestep, steps)
    with torch.no_grad():
        return featurizer.unet_features(noisy.to(featurizer.sd.unet.dtype), hidden)


class InversionExtractor:
    """A feature extractor for `sdm.evaluate.evaluate` that replaces the DDPM noise draw by DDIM inversion."""

    def __init__(self, featurizer: SDFeaturizer, prompt: PromptModule, steps: int = 10) -> None:
        self.featurizer = featurizer
        self.prompt = prompt
        self.steps = int(steps)
        self.conditioning: Conditioning = prompt.conditioning

    def describe(self) -> dict[str, Any]:
        """Its part of the protocol record: the featurizer's settings and weights, and the prompt (the inversion's
        steps are not recorded, as before)."""
        return {**featurizer_record(self.featurizer), **prompt_record(self.prompt)}

    @torch.no_grad()
    def image_features(self, batch: ImageBatch) -> torch.Tensor:
        images = upload(batch.pixels, self.featurizer.device)
        prompt = self.prompt.image_prompt(self.featurizer, images, batch.categories, batch.originals_for(self.prompt))
        return inverted_features(self.featurizer, self.featurizer.encode_images(images, batch.ids), prompt, self.steps)

    @torch.no_grad()
    def pair_features(self, src: ImageBatch, trg: ImageBatch) -> tuple[torch.Tensor, torch.Tensor]:
        p_src, p_trg = pair_prompts(self.featurizer, self.prompt, src, trg)
        # encode_images copies the pixels to the GPU itself, through page-locked memory (features.to_pixel_tensor)
        return (
            inverted_features(self.featurizer, self.featurizer.encode_images(src.pixels, src.ids), p_src, self.steps),
            inverted_features(self.featurizer, self.featurizer.encode_images(trg.pixels, trg.ids), p_trg, self.steps),
        )


__all__ = [
    "InversionExtractor",
    "ddim_invert",
    "inversion_timesteps",
    "inverted_features",
]
