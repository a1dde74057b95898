"""Stable Diffusion feature maps: VAE latent, DDPM noise at timestep t, UNet stopped after one up block.

docs/specification.md, "Feature extraction" and "Prompt assembly for learned prompts", is the specification.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from sdm.config import size_pair
from sdm.devices import upload
from sdm.draws import BatchRows, Draws, content_keys, keyed_normal
from sdm.models import StableDiffusion

ImageInput = torch.Tensor | Sequence[Image.Image] | Image.Image
PromptInput = str | Sequence[str] | torch.Tensor

MAX_LEARNED_TOKENS = 75  # 77 CLIP positions minus BOS and EOS


class _StopForward(Exception):
    """Raised by a forward hook to end the UNet's forward once the wanted block has run."""

    def __init__(self, output: torch.Tensor) -> None:
        super().__init__()
        self.output = output


@contextlib.contextmanager
def _stop_after(module: nn.Module) -> Iterator[None]:
    """Within the context, the forward of the enclosing model ends right after `module` has run.

    Use with `capture_stop`: ``with _stop_after(unet.up_blocks[1]): out = capture_stop(unet, ...)``.
    The hook is removed on exit, so the model is untouched afterwards.
    """

    def hook(_module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
        raise _StopForward(output)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def run_until(model: nn.Module, block: nn.Module, *args, **kwargs) -> torch.Tensor:
    """Runs `model(*args, **kwargs)` and returns the output of its sub-module `block`, skipping the rest."""
    with _stop_after(block):
        try:
            model(*args, **kwargs)
        except _StopForward as stop:
            return stop.output
    raise RuntimeError(f"{type(block).__name__} did not run during the forward of {type(model).__name__}")


def to_pixel_tensor(images: ImageInput, size: tuple[int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Images -> B x 3 x H x W in [-1, 1], resized to `size` = (H, W) (bilinear, aspect ratio not kept).

    Accepts a float tensor B x 3 x H x W (or 3 x H x W) with values in [0, 1], or a list of PIL images.
    """
    if isinstance(images, torch.Tensor):
        x = images.unsqueeze(0) if images.dim() == 3 else images
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"images must be B x 3 x H x W in [0, 1]; got a tensor of shape {tuple(images.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"images must be a float tensor in [0, 1]; got dtype {x.dtype} (divide uint8 by 255)")
        x = upload(x, device, torch.float32)
    elif isinstance(images, Image.Image):
        return to_pixel_tensor([images], size, device, dtype)
    else:
        if len(images) == 0:
            raise ValueError("images is empty")
        arrays = []
        for im in images:
            if not isinstance(im, Image.Image):
                raise TypeError(f"images must be a tensor or a list of PIL images; got a list holding {type(im).__name__}")
            im = im.convert("RGB").resize((size[1], size[0]), Image.BILINEAR)
            arrays.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1))
        x = upload(torch.stack(arrays), device)
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return (x * 2.0 - 1.0).clamp(-1.0, 1.0).to(dtype)


LatentMode = Literal["sample", "mean"]


class SDFeaturizer:
    """Dense Stable Diffusion features of images under a prompt (a plain class: the models stay `sd`'s, shared by
    every featurizer made from it; move them with `sd.to`).

    ``featurizer(images, prompt)`` returns B x C x h x w: the output of ``unet.up_blocks[up_block]``
    (SD2-1 at 768 px, up_block 1: 1280 x 48 x 48), averaged over `ensemble` noise draws.

    Latent (`latent`): "sample" (default, the authors' `latent_dist.sample()`, sd_feature_extractor.py:76), one
    posterior draw per image shared by its ensemble copies; "mean" uses the posterior mean instead.

    Noise: without a `generator`, every image gets its own `ensemble` noise maps (and posterior draw), seeded by
    `image_seed(seed, key)` where `key` is the image id passed as `keys` (or, when none is given, a hash of the
    image's pixels; `add_noise` and `sample_latents` called on their own hash the latent instead). So the draws are independent between images, as in the authors' code (a fresh
    `randn_like` per image and ensemble member, sd_feature_extractor.py:111), yet reproducible and independent
    of the other images in the batch. Pass a `torch.Generator` (or `BatchRows`) to draw fresh noise at every call
    (training).

    The UNet stops after the feature block (a forward hook), so nothing after it is computed.
    """

    def __init__(
        self,
        sd: StableDiffusion,
        *,
        image_size: int | tuple[int, int] = 768,
        timestep: int = 50,
        up_block: int = 1,
        ensemble: int = 1,
        seed: int = 0,
        latent: LatentMode = "sample",
    ) -> None:
        n_up = len(sd.unet.up_blocks)
        if not 0 <= up_block < n_up:
            raise ValueError(f"up_block must be in 0..{n_up - 1}; got {up_block}")
        n_t = sd.scheduler.config.num_train_timesteps
        if not 0 <= timestep < n_t:
            raise ValueError(f"timestep must be in 0..{n_t - 1}; got {timestep}")
        if ensemble < 1:
            raise ValueError(f"ensemble must be >= 1; got {ensemble}")
        if latent not in ("sample", "mean"):
            raise ValueError(f"latent must be 'sample' (the authors' code) or 'mean'; got {latent!r}")
        self.sd = sd
        self.image_size = size_pair(image_size)
        self.timestep = int(timestep)
        self.up_block = int(up_block)
        self.ensemble = int(ensemble)
        self.seed = int(seed)
        self.latent: LatentMode = latent

    # ---- images -------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.sd.device

    def encode_posterior(self, images: ImageInput) -> torch.Tensor:
        """Images -> the VAE posterior B x 2C x H/8 x W/8: mean and standard deviation stacked along channels
        (not yet scaled). It depends on nothing else: cache it per image, then `sample_latents`."""
        return self._posterior(self.pixels(images))

    def pixels(self, images: ImageInput) -> torch.Tensor:
        """Images -> the VAE input B x 3 x H x W in [-1, 1] at `image_size`."""
        return to_pixel_tensor(images, self.image_size, self.device, self.sd.vae.dtype)

    @torch.no_grad()
    def _posterior(self, pixels: torch.Tensor) -> torch.Tensor:
        posterior = self.sd.vae.encode(pixels).latent_dist
        return torch.cat([posterior.mean, posterior.std], dim=1)

    def sample_latents(
        self, posterior: torch.Tensor, keys: Sequence[str] | None = None, generator: Draws | None = None
    ) -> torch.Tensor:
        """Posterior B x 2C x h x w -> latents B x C x h x w (x scaling factor): one draw per image (`latent`
        "sample", seeded per key or from `generator`) or the mean (`latent` "mean")."""
        mean, std = posterior.chunk(2, dim=1)
        if self.latent == "mean":
            return mean * self.sd.vae.config.scaling_factor
        eps = self._draws(mean, tuple(mean.shape[1:]), keys, generator, "latent")
        return (mean + std * eps.to(mean.device, mean.dtype)) * self.sd.vae.config.scaling_factor

    @torch.no_grad()
    def encode_images(self, images: ImageInput, keys: Sequence[str] | None = None) -> torch.Tensor:
        """Images -> VAE latents B x 4 x H/8 x W/8 (a posterior draw, or the mean; x scaling factor).

        `keys`: one id per image for its seeded draw (default: a hash of the image's pixels).
        """
        x = self.pixels(images)
        return self.sample_latents(self._posterior(x), content_keys(x) if keys is None else keys)

    def add_noise(
        self, latents: torch.Tensor, generator: Draws | None = None, keys: Sequence[str] | None = None
    ) -> torch.Tensor:
        """B x 4 x h x w -> (B * ensemble) x 4 x h x w, DDPM-noised to `timestep` (image-major order).

        Noise: from `generator` when given, else `ensemble` draws seeded per image key (default keys: a hash of
        each latent), independent between images and between ensemble members.
        """
        b, e = latents.shape[0], self.ensemble
        noise = self._draws(latents, (e, *latents.shape[1:]), keys, generator, "noise")
        noise = noise.reshape(b * e, *latents.shape[1:]).to(latents.device, latents.dtype)
        rep = latents.repeat_interleave(e, dim=0)
        t = torch.full((b * e,), self.timestep, device=latents.device, dtype=torch.long)
        return self.sd.scheduler.add_noise(rep, noise, t)

    def _draws(
        self, like: torch.Tensor, shape: tuple[int, ...], keys: Sequence[str] | None, generator: Draws | None, purpose: str
    ) -> torch.Tensor:
        """B x *shape standard normal float32 draws for the B items of `like`: from `generator` when given, else
        seeded per key (`keyed_normal`; default keys: a hash of each item of `like`)."""
        if isinstance(generator, BatchRows):
            if generator.stop - generator.start != like.shape[0]:
                raise ValueError(f"BatchRows {generator.start}:{generator.stop} for {like.shape[0]} items")
            g = generator.generator
            return torch.randn((generator.total, *shape), generator=g, device=g.device, dtype=torch.float32)[generator.start : generator.stop]
        if generator is not None:
            return torch.randn((like.shape[0], *shape), generator=generator, device=generator.device, dtype=torch.float32)
        keys = content_keys(like) if keys is None else list(keys)
        if len(keys) != like.shape[0]:
            raise ValueError(f"{len(keys)} image keys for {like.shape[0]} images")
        return keyed_normal(keys, shape, self.seed, purpose, like.device)

    # ---- prompts ------------------------------------------------------------------------------------------
    def encode_prompt(self, prompt: PromptInput, batch_size: int | None = None) -> torch.Tensor:
        """Any prompt form -> encoder hidden states (B x 77 x D) for the UNet.

        Args:
            prompt: a string or list of strings (tokenized, padded to 77); learned token vectors
                B x N x D with N <= 75 (assembled as docs/specification.md says, gradients reach them); or ready
                encoder hidden states B x 77 x D (returned as they are). A batch of one is broadcast.
            batch_size: expand a single prompt to this batch size.
        """
        if isinstance(prompt, str):
            prompt = [prompt]
        if isinstance(prompt, torch.Tensor):
            if prompt.dim() == 2:
                prompt = prompt.unsqueeze(0)
            if prompt.dim() != 3 or prompt.shape[-1] != self.sd.embed_dim:
                raise ValueError(
                    f"a prompt tensor must be B x N x {self.sd.embed_dim} (N <= {MAX_LEARNED_TOKENS} learned vectors, "
                    f"or N = 77 encoder hidden states); got {tuple(prompt.shape)}"
                )
            n = prompt.shape[1]
            if n == self.sd.text.length:
                hidden = prompt.to(self.sd.dtype)
            elif 1 <= n <= MAX_LEARNED_TOKENS:
                hidden = self.encode_learned(prompt)
            else:
                raise ValueError(
                    f"a prompt tensor has N = {n} vectors; learned prompts have 1..{MAX_LEARNED_TOKENS} "
                    "and encoder hidden states exactly 77"
                )
        else:
            prompt = list(prompt)
            if not prompt or not all(isinstance(p, str) for p in prompt):
                raise ValueError("a text prompt must be a string or a non-empty list of strings")
            hidden = self.encode_text(prompt)
        if batch_size is not None and hidden.shape[0] != batch_size:
            if hidden.shape[0] != 1:
                raise ValueError(f"prompt batch {hidden.shape[0]} does not match image batch {batch_size}")
            hidden = hidden.expand(batch_size, -1, -1)
        return hidden

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """List of B strings -> B x 77 x D (the text encoder's last hidden state, after its final layer norm)."""
        return self.sd.text.encode_text(texts, self.device)

    def special_token_embeddings(self) -> torch.Tensor:
        """77 x D embedding-layer outputs (token + position) of [BOS, pad x 76]; EOS goes where the prompt ends.

        Row 0 is BOS at position 0; row i > 0 is the pad token at position i. `eos_embeddings()` holds
        EOS at every position.
        """
        return self.sd.text.special("pad")

    def eos_embeddings(self) -> torch.Tensor:
        """77 x D embedding-layer outputs of the EOS token at every position 0..76."""
        return self.sd.text.special("eos")

    def assemble_learned(self, learned: torch.Tensor) -> torch.Tensor:
        """B x N x D learned vectors -> B x 77 x D sequence [BOS, learned, EOS at N+1, pad...] of
        embedding-layer outputs (the learned vectors already include their position)."""
        return self.sd.text.assemble(learned)

    def encode_learned(self, learned: torch.Tensor) -> torch.Tensor:
        """B x N x D learned vectors (N <= 75) -> B x 77 x D encoder hidden states, differentiable in `learned`
        (the model's text side, `sdm.text.ClipText.encode_learned`)."""
        return self.sd.text.encode_learned(learned)

    def token_embeddings(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Embedding-layer outputs of token ids placed at positions 1..N: B x N ids -> B x N x D.

        This is how learned prompts are initialised (random vocabulary ids at positions 1..N).
        """
        return self.sd.text.token_embeddings(token_ids)

    # ---- features -----------------------------------------------------------------------------------------
    def unet_features(self, noisy: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Noisy latents (M x 4 x h x w) and hidden states (M x 77 x D) -> output of the feature block."""
        unet = self.sd.unet
        t = torch.full((noisy.shape[0],), self.timestep, device=noisy.device, dtype=torch.long)
        return run_until(unet, unet.up_blocks[self.up_block], noisy, t, encoder_hidden_states=hidden.to(unet.dtype))

    def features_from_latents(
        self,
        latents: torch.Tensor,
        prompt: PromptInput,
        generator: Draws | None = None,
        keys: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """VAE latents B x 4 x h x w -> features B x C x h' x w' averaged over the ensemble (noise: `add_noise`)."""
        b = latents.shape[0]
        hidden = self.encode_prompt(prompt, batch_size=b)
        noisy = self.add_noise(latents.to(self.sd.unet.dtype), generator, keys)
        hidden = hidden.repeat_interleave(self.ensemble, dim=0)
        feats = self.unet_features(noisy, hidden)
        return feats.view(b, self.ensemble, *feats.shape[1:]).mean(dim=1)

    def __call__(
        self,
        images: ImageInput,
        prompt: PromptInput,
        generator: Draws | None = None,
        keys: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """Images (B x 3 x H x W in [0, 1], or a list of PIL images) and a prompt -> B x C x h x w features.

        `keys`: one id per image seeding its posterior draw and noise (default: a hash of the image's pixels);
        `generator`: fresh draws instead (training).
        """
        x = self.pixels(images)
        if generator is None and keys is None:
            keys = content_keys(x)  # one key for both draws: the latent's hash could differ between batch sizes
        latents = self.sample_latents(self._posterior(x), keys, generator)
        return self.features_from_latents(latents, prompt, generator, keys)


__all__ = [
    "MAX_LEARNED_TOKENS",
    "ImageInput",
    "PromptInput",
    "SDFeaturizer",
    "run_until",
    "to_pixel_tensor",
]
