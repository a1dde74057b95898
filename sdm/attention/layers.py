"""Hedlin et al.'s cross-attention layers: which ``attn2`` layers a UNet has, at which resolution for an input
size, and the paper's choice among them (`hedlin_layers`)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from diffusers import UNet2DConditionModel

from sdm.config import (
    size_pair,
)
from sdm.models import StableDiffusion

_SECTION_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


# ---- layers ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CrossAttentionLayer:
    """One cross-attention layer: its diffusers processor name, spatial size (h, w) and number of heads."""

    name: str
    resolution: tuple[int, int]
    heads: int


def _module_name(processor_name: str) -> str:
    return processor_name.removesuffix(".processor")


def execution_key(name: str) -> tuple[int, ...]:
    """Sort key that puts processor names in the order the UNet runs them (down, mid, up; then by index).

    `unet.attn_processors` lists them in registration order, where the mid block comes last.
    """
    section = name.split(".", 1)[0]
    if section not in _SECTION_ORDER:
        raise ValueError(f"{name!r} is not an attention layer of a UNet2DConditionModel block")
    return (_SECTION_ORDER[section], *(int(n) for n in re.findall(r"\.(\d+)(?=\.|$)", name)))


def _latent_hw(sd: StableDiffusion, image_size: int | tuple[int, int]) -> tuple[int, int]:
    h, w = size_pair(image_size)
    factor = 2 ** (len(sd.vae.config.block_out_channels) - 1)
    return h // factor, w // factor


def _block_resolutions(unet: UNet2DConditionModel, latent_hw: tuple[int, int]) -> dict[str, tuple[int, int]]:
    """(h, w) at which each down, mid and up block runs, e.g. {"down_blocks.0": (64, 64), ...}."""
    h, w = latent_hw
    down = []
    for block in unet.down_blocks:
        down.append((h, w))
        if getattr(block, "downsamplers", None) is not None:
            h, w = (h + 1) // 2, (w + 1) // 2  # stride-2 conv with padding 1
    out = {f"down_blocks.{i}": hw for i, hw in enumerate(down)}
    out["mid_block"] = (h, w)
    # Up block i consumes the skips of down block n-1-i and upsamples to their size, so it runs at it.
    n = len(unet.down_blocks)
    if len(unet.up_blocks) != n:
        raise ValueError("the UNet's down and up paths differ in length; cannot infer layer resolutions")
    for i in range(n):
        out[f"up_blocks.{i}"] = down[n - 1 - i]
    return out


def cross_attention_layers(sd: StableDiffusion, image_size: int | tuple[int, int] = 512) -> list[CrossAttentionLayer]:
    """All cross-attention layers (``attn2`` of transformer blocks) in execution order, with the spatial
    resolution of their attention maps for an input of `image_size` pixels (int or (H, W))."""
    unet = sd.unet
    blocks = _block_resolutions(unet, _latent_hw(sd, image_size))
    modules = dict(unet.named_modules())
    layers = []
    for name in unet.attn_processors:
        module = modules[_module_name(name)]
        if not getattr(module, "is_cross_attention", False):
            continue
        block = "mid_block" if name.startswith("mid_block") else ".".join(name.split(".")[:2])
        layers.append(CrossAttentionLayer(name, blocks[block], int(module.heads)))
    return sorted(layers, key=lambda layer: execution_key(layer.name))


def hedlin_layers(sd: StableDiffusion, image_size: int | tuple[int, int] = 512) -> tuple[str, ...]:
    """Hedlin et al.'s layers: every up-block cross-attention at 1/4 of the latent side (16 x 16 for SD at
    512 px) plus the first one at 1/2 of it (32 x 32): for SD 1.x/2.x all ``attn2`` of ``up_blocks[1]``
    and the first of ``up_blocks[2]``."""
    latent = _latent_hw(sd, image_size)
    quarter = tuple((s + 3) // 4 for s in latent)
    half = tuple((s + 1) // 2 for s in latent)
    ups = [layer for layer in cross_attention_layers(sd, image_size) if layer.name.startswith("up_blocks")]
    chosen = [layer.name for layer in ups if layer.resolution == quarter]
    chosen += [layer.name for layer in ups if layer.resolution == half][:1]
    if not chosen:
        raise ValueError(f"no up-block cross-attention at {quarter} or {half} for image_size {image_size}")
    return tuple(chosen)


__all__ = [
    "CrossAttentionLayer",
    "cross_attention_layers",
    "execution_key",
    "hedlin_layers",
]
