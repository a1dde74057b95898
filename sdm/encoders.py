"""Frozen image encoders that prompts (and the sd+dino backbone) use: DINOv2 for CPM, CLIP vision for the
implicit captioner; their loaders (hub id or folder, or "tiny" random-weight models of the same classes) and
their input preprocessing."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from sdm.devices import upload

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalise_images(
    images: torch.Tensor, size: int | tuple[int, int], mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """B x 3 x H x W in [0, 1] -> B x 3 x size x size (or size = (h, w)), bicubic (antialiased), normalised by
    `mean` and `std`."""
    size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    x = F.interpolate(images.float(), size=size, mode="bicubic", align_corners=False, antialias=True)
    m = upload(torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1), x.device)  # not x.new_tensor: a blocking copy to a GPU
    s = upload(torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1), x.device)
    return (x.clamp(0, 1) - m) / s


def dino_pixels(image: Image.Image | torch.Tensor, resize: int = 256, crop: int = 224) -> torch.Tensor:
    """One image as the dinov2-base image processor prepares it -> 3 x crop x crop, ImageNet-normalised.

    Shortest side to `resize` (the other int(resize * long / short)), bicubic (PIL); centre crop, top-left at
    ((H - crop) // 2, (W - crop) // 2); x / 255; (x - mean) / std. `image`: a PIL image or 3 x H x W in [0, 1]
    (converted to 8 bits first, as the processor sees a decoded file).
    """
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"an original image tensor must be 3 x H x W in [0, 1]; got {tuple(image.shape)}")
        array = (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        image = Image.fromarray(array)
    image = image.convert("RGB")
    w, h = image.size
    if w <= h:
        size = (resize, int(resize * h / w))
    else:
        size = (int(resize * w / h), resize)
    image = image.resize(size, Image.Resampling.BICUBIC)
    top, left = (size[1] - crop) // 2, (size[0] - crop) // 2
    x = torch.from_numpy(np.asarray(image, dtype=np.float32)[top : top + crop, left : left + crop] / 255.0)
    x = x.permute(2, 0, 1)
    return (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


EncoderName = Literal["dino", "clip"]  # the fields of PromptEncoders


@dataclass
class PromptEncoders:
    """Frozen image encoders some prompts need: DINOv2 for CPM, CLIP vision for the implicit captioner."""

    dino: nn.Module | None = None
    clip: nn.Module | None = None

    def only(self, names: Iterable[EncoderName]) -> PromptEncoders:
        """A copy holding only the encoders named (a prompt's `uses`), so that a run records only what it used."""
        keep = set(names)
        return PromptEncoders(**{f.name: getattr(self, f.name) if f.name in keep else None for f in fields(self)})


def tiny_dinov2(seed: int = 0) -> nn.Module:
    """DINOv2's class with a toy config and random weights (patch 14, 224 px -> 256 patches, width 32)."""
    from transformers import Dinov2Config, Dinov2Model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=224, patch_size=14)
        return Dinov2Model(cfg).eval()


def tiny_clip_vision(seed: int = 0) -> nn.Module:
    """CLIP's vision tower with a projection, toy config and random weights."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cfg = CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=224, patch_size=32, projection_dim=16
        )
        return CLIPVisionModelWithProjection(cfg).eval()


def encoder_name(model: nn.Module | None) -> str | None:
    """The hub id or folder an image encoder was loaded from; "random weights (tiny)" for the toy ones."""
    if model is None:
        return None
    config = getattr(model, "config", None)
    if config is None:
        return type(model).__name__
    return getattr(config, "_name_or_path", "") or "random weights (tiny)"


def load_dino(name: str = "facebook/dinov2-base", device: torch.device | str | None = None) -> nn.Module:
    """The one loader of the DINO-family ViTs (DINOv2 for CPM, the sd+dino backbone and the baselines; DINO
    ViT-B/8 for the Table 2 baseline): "tiny" -> `tiny_dinov2()` (random weights, offline), else a transformers
    `AutoModel` by hub id or folder (`Dinov2Model` for "facebook/dinov2-base", `ViTModel` for "facebook/dino-vitb8")."""
    if name == "tiny":
        return tiny_dinov2().to(device or "cpu")
    from transformers import AutoModel

    try:
        return AutoModel.from_pretrained(name).to(device or "cpu").eval()
    except Exception as err:
        raise RuntimeError(
            f"Could not load {name!r}: {err}\nDownload it where there is network (`hf download {name}`) and pass the "
            "folder, or set HF_HUB_OFFLINE=1 with a filled cache; name 'tiny' gives random weights offline."
        ) from err


def load_clip_vision(name: str, device: torch.device | str | None = None) -> nn.Module:
    """By name: "tiny" -> `tiny_clip_vision()` (random weights), else a CLIPVisionModelWithProjection by id or folder."""
    if name == "tiny":
        return tiny_clip_vision().to(device or "cpu")
    from transformers import CLIPVisionModelWithProjection

    return CLIPVisionModelWithProjection.from_pretrained(name).to(device or "cpu").eval()


__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "EncoderName",
    "PromptEncoders",
    "dino_pixels",
    "encoder_name",
    "load_clip_vision",
    "load_dino",
    "normalise_images",
    "tiny_clip_vision",
    "tiny_dinov2",
]
