"""Opt-in speed settings: half precision, channels-last, fused projections, `torch.compile`. They change how the
features are computed, never what (tests/test_speed.py)."""

from __future__ import annotations

import importlib
from typing import Literal

import torch
from torch import nn

from sdm.models import StableDiffusion


def optimize(
    sd: StableDiffusion,
    *,
    dtype: torch.dtype | None = None,
    channels_last: bool = True,
    fuse_qkv: bool = True,
    compile: bool = False,
    compile_mode: str | None = None,
    compile_scope: Literal["blocks", "resnets"] = "blocks",
    dynamic: bool | None = None,
) -> StableDiffusion:
    """Opt-in speed settings for feature extraction and prompt training; modifies `sd` in place, returns it.

    Nothing here changes what is computed, only how (benchmarks/README.md has the measured gains):

    - `dtype`: cast VAE, UNet and text encoder (e.g. ``torch.bfloat16`` on a GPU; the authors ran fp16
      autocast). None keeps the current dtype.
    - `channels_last`: NHWC memory format for the VAE's and the UNet's convolutions. It pays for features and
      evaluation; for training pass False (cuDNN then converts layouts around every group norm of the backward:
      benchmarks/README.md, third round).
    - `fuse_qkv`: one matrix product for the query, key and value of every self-attention (key and value of
      every cross-attention) in the UNet and the VAE (diffusers' `fuse_qkv_projections`). The fused weights
      stay frozen.
    - `compile`: `torch.compile` the VAE encoder, every down block, the mid block and the *children* of every
      up block (resnets, transformers, upsamplers). The up blocks themselves stay eager, so the forward hook
      that stops the UNet after the feature block (`run_until`) never runs inside compiled code. Each module
      compiles on its first call (tens of seconds on a GPU), and once more with a dynamic batch size when a
      second batch size appears (dynamo's recompile limit is raised to 64 for that).
    - `compile_mode`: passed to `torch.compile` (None, "max-autotune", "reduce-overhead", ...).
    - `compile_scope`: "blocks" (above), or "resnets": only the VAE encoder and the UNet's resnets, down- and
      upsamplers, leaving every transformer (and the attention processors `sdm.attention` installs) eager.
    - `dynamic`: passed to `torch.compile` for the UNet's modules (the VAE encoder keeps the default: specialise,
      then one dynamic-batch graph). ``False`` compiles one UNet graph per batch size, the setting
      `sdm.attention.compile_for_matcher` uses: the matcher's processors trace into the graphs, and inductor
      (torch 2.13, CPU) failed on the dynamic-batch graph of their backward.

    With the defaults on CPU in float32 (no `dtype`, no `compile`) the features equal the plain ones to
    float rounding (tests/test_speed.py: relative error < 1e-5).
    """
    modules = sd.modules()
    if dtype is not None:
        sd.to(dtype=dtype)
    if fuse_qkv:
        for model in (sd.unet, sd.vae):
            if not getattr(model, "_sdm_fused_qkv", False):
                model.fuse_qkv_projections()
                model._sdm_fused_qkv = True
    if channels_last:
        sd.vae.to(memory_format=torch.channels_last)
        sd.unet.to(memory_format=torch.channels_last)
    for module in modules:  # new fused projections are created trainable: keep the model frozen
        module.requires_grad_(False)
    if compile:
        # The blocks share a few forward functions (one per block class) that recompile per block width and,
        # once, for a dynamic batch size: allow that many specialisations before dynamo falls back to eager.
        dynamo_config = importlib.import_module("torch._dynamo").config
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
        dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 1024)
        kwargs: dict = {"mode": compile_mode} if compile_mode else {}
        sd.vae.encoder.compile(**kwargs)
        if dynamic is not None:
            kwargs["dynamic"] = dynamic
        targets: list[nn.Module] = []
        if compile_scope == "resnets":
            from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D

            targets += [m for m in sd.unet.modules() if isinstance(m, (ResnetBlock2D, Downsample2D, Upsample2D))]
        else:
            targets += list(sd.unet.down_blocks)
            if sd.unet.mid_block is not None:
                targets.append(sd.unet.mid_block)
            for block in sd.unet.up_blocks:
                targets += list(block.children())  # ModuleLists: their items
        for module in targets:
            for sub in module if isinstance(module, nn.ModuleList) else [module]:
                sub.compile(**kwargs)
    return sd


__all__ = ["optimize"]
