"""The reference path: how the authors' code computes features (the yardstick of benchmarks/bench.py).

It mirrors SD4Match / DIFT-style feature extraction: float32 weights under float16 autocast; PyTorch SDPA
attention (diffusers' default `AttnProcessor2_0`, standing in for the authors' xformers); the VAE encodes
every image on every call; the ensemble repeats the image batch E times *before* the VAE; the full UNet runs
to its end and the feature block's output is read by a forward hook; nothing is cached. It computes the same
function as `sdm.SDFeaturizer` (bench.py checks that, with the same noise).
"""

from __future__ import annotations

import torch

from sdm.features import SDFeaturizer
from sdm.loss import gaussian_cross_entropy
from sdm.matching import to_feature_coords
from sdm.models import StableDiffusion


def _autocast(device: torch.device) -> torch.autocast:
    """float16 autocast on CUDA (the authors' setting); off elsewhere (CPU smoke runs)."""
    return torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda")


class ReferenceFeaturizer:
    """images B x 3 x H x W in [0, 1] (already at the model's size) + encoder hidden states -> B x C x h x w."""

    def __init__(self, sd: StableDiffusion, *, timestep: int = 50, up_block: int = 1, ensemble: int = 1) -> None:
        self.sd, self.timestep, self.up_block, self.ensemble = sd, timestep, up_block, ensemble
        self.prompts = SDFeaturizer(sd, timestep=timestep, up_block=up_block)  # prompt assembly only

    def encode_prompt(self, prompt, batch_size: int) -> torch.Tensor:
        with _autocast(self.sd.device):
            return self.prompts.encode_prompt(prompt, batch_size)

    def __call__(self, images: torch.Tensor, hidden: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        sd, e, b = self.sd, self.ensemble, images.shape[0]
        captured: list[torch.Tensor] = []
        handle = sd.unet.up_blocks[self.up_block].register_forward_hook(lambda _m, _a, out: captured.append(out))
        try:
            with _autocast(images.device):
                x = (images * 2 - 1).repeat(e, 1, 1, 1)  # ensemble-major, as DIFT's img.repeat(E, 1, 1, 1)
                with torch.no_grad():
                    latents = sd.vae.encode(x).latent_dist.mean * sd.vae.config.scaling_factor
                if noise is None:
                    noise = torch.randn_like(latents)
                t = torch.full((b * e,), self.timestep, device=images.device, dtype=torch.long)
                noisy = sd.scheduler.add_noise(latents, noise.to(latents.dtype), t)
                sd.unet(noisy, t, encoder_hidden_states=hidden.repeat(e, 1, 1))  # to the end, as the authors' code
        finally:
            handle.remove()
        feats = captured[0]
        return feats.view(e, b, *feats.shape[1:]).float().mean(0)


def reference_train_step(
    ref: ReferenceFeaturizer,
    tokens: torch.nn.Parameter,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    src: torch.Tensor,
    trg: torch.Tensor,
    src_kps: torch.Tensor,
    trg_kps: torch.Tensor,
    n_kps: torch.Tensor,
    micro: int | None = None,
) -> float:
    """One Single-prompt training step (Adam, fp16 GradScaler), the batch split in micro-batches of `micro`
    pairs with gradient accumulation when given (the authors' 3 GPUs x 3 pairs on one GPU)."""
    b = src.shape[0]
    micro = micro or b
    total = 0.0
    for s in range(0, b, micro):
        sl = slice(s, min(s + micro, b))
        m = sl.stop - sl.start
        hidden = ref.encode_prompt(tokens, 2 * m)
        feats = ref(torch.cat([src[sl], trg[sl]]), hidden)
        size = tuple(src.shape[-2:])
        hw = tuple(feats.shape[-2:])
        loss = gaussian_cross_entropy(
            feats[:m], feats[m:], to_feature_coords(src_kps[sl], size, hw), to_feature_coords(trg_kps[sl], size, hw), n_kps[sl]
        )
        scaler.scale(loss * m / b).backward()
        total += float(loss.detach()) * m / b
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return total
