"""Prompts for the UNet: zero-shot (empty, template, implicit captioner) and learned (Single, Class, CPM).

Every prompt is a `PromptModule` chosen by name from `PROMPTS`. Its `conditioning` says what it depends on,
which decides how features can be cached during evaluation:

- "fixed":    the same prompt for every image (empty, Single)
- "category": one prompt per category (template, Class)
- "image":    computed from the image itself (implicit captioner, CPM conditioned on each image alone)
- "pair":     computed from both images of a pair (CPM), so features are per pair

A prompt is anything `SDFeaturizer.encode_prompt` accepts: strings, learned vectors B x N x D (N <= 75) or
encoder hidden states B x 77 x D. DESIGN.md ("Prompt assembly", "CPM") is the specification; docs/choices.md
lists where sdm offers another reading than the authors' code (github ActiveVisionLab/SD4Match, 3d7b09e).
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from sdm.data import category_label
from sdm.features import PromptInput, SDFeaturizer, derived_seed

Conditioning = Literal["fixed", "category", "image", "pair"]
PromptKind = Literal["empty", "template", "captioner", "single", "class", "cpm"]

TEMPLATE = "a photo of a {}"
# "raw": the dataset's category name with PF-Willow's condition dropped, as the authors' prompt.py:38-52 does
# ("pottedplant", "car(G)" -> "car"); "readable": three names spelt as words (sdm's own option).
TemplateWords = Literal["raw", "readable"]
# Category names of the datasets written as words, for the "readable" template.
_CATEGORY_WORDS = {"pottedplant": "potted plant", "tvmonitor": "tv monitor", "diningtable": "dining table"}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def category_text(name: str, words: TemplateWords = "raw") -> str:
    """Dataset category name -> the word(s) of the template prompt.

    "raw" (the authors' code): "car(G)" -> "car", "pottedplant" -> "pottedplant".
    "readable": also "pottedplant" -> "potted plant", "tvmonitor" -> "tv monitor", "diningtable" -> "dining table".
    """
    base = category_label(name)
    if words == "raw":
        return base
    base = base.replace("_", " ")
    return _CATEGORY_WORDS.get(base, base)


def seeded_linear(n_in: int, n_out: int, seed: int) -> nn.Linear:
    """nn.Linear with PyTorch's default initialisation, drawn from `seed` instead of the global generator (so
    training is reproducible from its seed)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Linear(n_in, n_out)


def _normalise(images: torch.Tensor, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    x = F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    m = x.new_tensor(mean).view(1, 3, 1, 1)
    s = x.new_tensor(std).view(1, 3, 1, 1)
    return (x.clamp(0, 1) - m) / s


# Original images (before the resize to the featurizer's size): PIL images, or 3 x H x W tensors in [0, 1].
Originals = Sequence[Image.Image | torch.Tensor]


def originals_for(prompt: PromptModule, ids: Sequence[str], load: Callable[[str], Image.Image] | None) -> list[Image.Image] | None:
    """The images as stored for `ids` when `prompt` looks at them (`needs_originals`), else None.

    `load`: image id -> PIL image (`PairDataset.original_image`); a clear error when the prompt needs it and none
    is given.
    """
    if not prompt.needs_originals:
        return None
    if load is None:
        raise ValueError(f"the {prompt.kind!r} prompt looks at the images as stored: pass originals=dataset.original_image")
    return [load(i) for i in ids]


class PromptModule(nn.Module):
    """Base class. Subclasses set `kind` and `conditioning` and implement `image_prompt` or `pair_prompts`.

    `needs_originals`: the prompt looks at the images as stored, not at the resized featurizer input (CPM's
    DINOv2 input); callers then pass `originals` (datasets give them by id: `PairDataset.original_image`).
    """

    kind: ClassVar[str]
    conditioning: ClassVar[Conditioning]

    @property
    def needs_originals(self) -> bool:
        return False

    def image_prompt(
        self, featurizer: SDFeaturizer, images: torch.Tensor | None, categories: list[str], originals: Originals | None = None
    ) -> PromptInput:
        """Prompt for a batch of images on their own (conditioning other than "pair").

        images: B x 3 x H x W in [0, 1] (may be None for "fixed" and "category"); categories: B names;
        originals: the B images as stored (only prompts with `needs_originals` use them).
        """
        raise NotImplementedError(f"the {self.kind!r} prompt depends on both images: call pair_prompts")

    def pair_prompts(
        self,
        featurizer: SDFeaturizer,
        src: torch.Tensor | None,
        trg: torch.Tensor | None,
        categories: list[str],
        originals: tuple[Originals, Originals] | None = None,
    ) -> tuple[PromptInput, PromptInput]:
        """Prompts for the source and the target images of B pairs (B x 3 x H x W in [0, 1]); `originals`:
        (source originals, target originals), for prompts with `needs_originals`."""
        src_o, trg_o = originals if originals is not None else (None, None)
        return self.image_prompt(featurizer, src, categories, src_o), self.image_prompt(featurizer, trg, categories, trg_o)

    def config(self) -> dict[str, Any]:
        """What `build_prompt` needs to rebuild this module (saved beside the weights)."""
        return {}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The learned tensors (frozen encoders such as DINOv2 are not saved)."""
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def parameter_groups(self, lr: float, lr_linear: float) -> list[dict[str, Any]]:
        """Optimizer groups: learned token vectors at `lr`, linear layers (CPM's g_d, g_n) at `lr_linear`."""
        linear = [p for n, p in self.named_parameters() if p.requires_grad and n.startswith(("g_d.", "g_n.", "proj."))]
        ids = {id(p) for p in linear}
        tokens = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        return [g for g in ({"params": tokens, "lr": lr}, {"params": linear, "lr": lr_linear}) if g["params"]]


# ---- zero-shot ---------------------------------------------------------------------------------------------
class EmptyPrompt(PromptModule):
    """The empty string (the DIFT setting)."""

    kind = "empty"
    conditioning: ClassVar[Conditioning] = "fixed"

    def image_prompt(
        self, featurizer: SDFeaturizer, images: torch.Tensor | None, categories: list[str], originals: Originals | None = None
    ) -> PromptInput:
        return [""]


class TemplatePrompt(PromptModule):
    """"a photo of a {category}"; `words` "raw" (the authors') or "readable" category names (`category_text`)."""

    kind = "template"
    conditioning: ClassVar[Conditioning] = "category"

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


class ImplicitCaptioner(PromptModule):
    """SD+DINO's implicit captioner: the CLIP image embedding of the image, projected to 77 x D and added to the
    empty prompt's encoding through a learned gate (zero at start, so it begins as the empty prompt).

    `clip`: a `transformers.CLIPVisionModelWithProjection` (frozen).
    """

    kind = "captioner"
    conditioning: ClassVar[Conditioning] = "image"

    def __init__(self, clip: nn.Module, embed_dim: int, image_size: int = 224, seed: int = 0) -> None:
        super().__init__()
        self.clip = clip.requires_grad_(False).eval()
        self.image_size = image_size
        width = int(clip.config.projection_dim)
        self.proj = seeded_linear(width, 77 * embed_dim, derived_seed(seed, "captioner.proj"))
        self.gate = nn.Parameter(torch.zeros(77, embed_dim))

    def image_prompt(
        self, featurizer: SDFeaturizer, images: torch.Tensor | None, categories: list[str], originals: Originals | None = None
    ) -> PromptInput:
        if images is None:
            raise ValueError("the implicit captioner needs the images")
        with torch.no_grad():
            pixels = _normalise(images, self.image_size, CLIP_MEAN, CLIP_STD).to(self.proj.weight.dtype)
            emb = self.clip(pixel_values=pixels).image_embeds
        caption = self.proj(emb).view(emb.shape[0], 77, -1)
        empty = featurizer.encode_text([""]).to(caption.dtype)
        return empty + torch.tanh(self.gate) * caption

    def config(self) -> dict[str, Any]:
        return {"image_size": self.image_size}


# ---- learned -----------------------------------------------------------------------------------------------
def random_token_vectors(featurizer: SDFeaturizer, n: int, count: int = 1, first_position: int = 1, seed: int = 0) -> torch.Tensor:
    """`count` x n embedding-layer outputs of random vocabulary ids at positions first_position.. (how learned
    prompts start). Ids are uniform over [0, vocab_size), special tokens included, as the authors' code draws
    them (src/stable_diffusion/hidden_state.py:65)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(featurizer.sd.tokenizer.vocab_size, (count, n), generator=g).to(featurizer.device)
    pos = torch.arange(first_position, first_position + n, device=featurizer.device).unsqueeze(0).expand(count, -1)
    with torch.no_grad():
        return featurizer.sd.text_encoder.embeddings(input_ids=ids, position_ids=pos).float()


class SinglePrompt(PromptModule):
    """One universal learned prompt of `n_tokens` (75) vectors."""

    kind = "single"
    conditioning: ClassVar[Conditioning] = "fixed"

    def __init__(self, init: torch.Tensor) -> None:
        super().__init__()
        self.tokens = nn.Parameter(init.clone().float())  # 1 x N x D

    def image_prompt(
        self, featurizer: SDFeaturizer, images: torch.Tensor | None, categories: list[str], originals: Originals | None = None
    ) -> PromptInput:
        return self.tokens

    def config(self) -> dict[str, Any]:
        return {"n_tokens": self.tokens.shape[1]}


class ClassPrompt(PromptModule):
    """One learned 75-vector prompt per category, picked by the pair's category."""

    kind = "class"
    conditioning: ClassVar[Conditioning] = "category"

    def __init__(self, init: torch.Tensor, categories: list[str]) -> None:
        super().__init__()
        if init.shape[0] != len(categories):
            raise ValueError(f"{init.shape[0]} initial prompts for {len(categories)} categories")
        self.categories = list(categories)
        self.index = {c: i for i, c in enumerate(self.categories)}
        self.tokens = nn.Parameter(init.clone().float())  # C x N x D

    def image_prompt(
        self, featurizer: SDFeaturizer, images: torch.Tensor | None, categories: list[str], originals: Originals | None = None
    ) -> PromptInput:
        unknown = sorted({c for c in categories if c not in self.index})
        if unknown:
            raise ValueError(f"no learned prompt for categories {unknown}; this Class prompt knows {self.categories}")
        idx = torch.tensor([self.index[c] for c in categories], device=self.tokens.device)
        return self.tokens[idx]

    def config(self) -> dict[str, Any]:
        return {"n_tokens": self.tokens.shape[1], "categories": self.categories}


@dataclass
class CPMConfig:
    """The conditional prompting module and its ablations (the paper's Fig. 3a), as the authors' code builds
    them (src/stable_diffusion/hybrid_captioner.py, "Pair-DINO-Feat-G25-C50" and its siblings).

    descriptor: "patch" (DINOv2 patch tokens `last_hidden_state[:, 1:]`, 256 x 768; the code's "Feat") or "global"
        (DINOv2's `pooler_output`, projected by g_d and broadcast to the n_cond tokens, no pooling; "Head").
    condition: "pair" (both images' descriptors concatenated along channels, one prompt for the pair; "Pair")
        or "image" (each image alone, its own prompt; "Img").
    global_prompt: prepend the n_global learned global vectors ("G25"; False is "G0").
    use_gn: g_n (linear along the patch axis) before pooling. None: the code's rule, g_n only for patch
        descriptors of a pair. True for "image" or False for "pair" are sdm's own variants (not in the code).
    form: "authors": theta_cond = tanh(A) * (pool(g_n(g_d(F))) + P), A, P and the global vectors drawn from
        U[0, 1) (hybrid_captioner.py:51,73-77,166-167); "paper": theta_cond = pool(g_n(g_d(F))) * A + P with A
        zero and P from vocabulary embeddings (the paper's equation; sdm's CPM before this option existed).
    dino_input: "original": the image as stored through the dinov2-base image processor (shortest side 256,
        bicubic; centre crop 224; ImageNet mean/std; pre_compute_dino_feature.py:49,59-65); "resized": the
        featurizer's resized input squashed to dino_size (sdm's earlier behaviour).
    """

    n_global: int = 25
    n_cond: int = 50
    descriptor: Literal["patch", "global"] = "patch"
    condition: Literal["pair", "image"] = "pair"
    global_prompt: bool = True
    use_gn: bool | None = None
    form: Literal["authors", "paper"] = "authors"
    dino_input: Literal["original", "resized"] = "original"
    dino_size: int = 224
    dino_resize: int = 256
    gn_width: int = 256

    def __post_init__(self) -> None:
        choices = {"descriptor": ("patch", "global"), "condition": ("pair", "image"), "form": ("authors", "paper"),
                   "dino_input": ("original", "resized")}
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ValueError(f"CPMConfig.{name} must be one of {valid}; got {getattr(self, name)!r}")
        if self.descriptor == "global" and self.use_gn:
            raise ValueError("g_n mixes patches; the global descriptor has none (use_gn must be None or False)")
        if self.n_cond + (self.n_global if self.global_prompt else 0) > 75:
            raise ValueError(f"{self.n_global} global + {self.n_cond} conditional vectors exceed CLIP's 75 free positions")

    @property
    def gn(self) -> bool:
        """Whether g_n is applied (see `use_gn`)."""
        if self.descriptor == "global":
            return False
        return self.condition == "pair" if self.use_gn is None else self.use_gn


# The cases of the paper's Fig. 3a as CPMConfig overrides. All but "no-gn" are configurations of the authors'
# code ([Pair|Img]-DINO-[Feat|Head]-G[25|0]-C50); "no-gn" (pair, patches, no g_n) is sdm's own extra.
CPM_ABLATIONS: dict[str, dict[str, Any]] = {
    "patch-pair": {},
    "patch-image": {"condition": "image"},
    "global-pair": {"descriptor": "global"},
    "global-image": {"descriptor": "global", "condition": "image"},
    "no-global-prompt": {"global_prompt": False},
    "no-gn": {"use_gn": False},
}


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


class DinoDescriptor(nn.Module):
    """Frozen DINOv2 (transformers `Dinov2Model`): pixels B x 3 x S x S (`pixels` or `resized_pixels`) -> patch
    tokens B x P x C (P = (S / 14)^2, 256 at 224 px) or the pooled CLS token B x 1 x C."""

    def __init__(self, dino: nn.Module, image_size: int = 224, resize: int = 256) -> None:
        super().__init__()
        self.dino = dino.requires_grad_(False).eval()
        self.image_size = image_size
        self.resize = resize
        self.width = int(dino.config.hidden_size)
        self.n_patches = (image_size // int(dino.config.patch_size)) ** 2

    def pixels(self, originals: Originals) -> torch.Tensor:
        """Images as stored -> B x 3 x S x S through the dinov2-base processor (`dino_pixels`)."""
        return torch.stack([dino_pixels(im, self.resize, self.image_size) for im in originals])

    def resized_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W in [0, 1] -> B x 3 x S x S squashed (bicubic) and ImageNet-normalised."""
        return _normalise(images, self.image_size, IMAGENET_MEAN, IMAGENET_STD)

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor, descriptor: Literal["patch", "global"] = "patch") -> torch.Tensor:
        device = next(self.dino.parameters()).device
        out = self.dino(pixel_values=pixels.to(device, self.dino.dtype))
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

    @property
    def conditioning(self) -> Conditioning:  # type: ignore[override]
        return "pair" if self.cfg.condition == "pair" else "image"

    @property
    def needs_originals(self) -> bool:
        return self.cfg.dino_input == "original"

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
        self,
        featurizer: SDFeaturizer,
        src: torch.Tensor | None,
        trg: torch.Tensor | None,
        categories: list[str],
        originals: tuple[Originals, Originals] | None = None,
    ) -> tuple[PromptInput, PromptInput]:
        if self.cfg.condition == "image":
            return super().pair_prompts(featurizer, src, trg, categories, originals)
        src_o, trg_o = originals if originals is not None else (None, None)
        both = torch.cat([self.descriptors(src, src_o), self.descriptors(trg, trg_o)], dim=-1)
        prompt = self._prompt(both)
        return prompt, prompt  # the same prompt for both images of the pair (train_cpm.py:160-161)

    def config(self) -> dict[str, Any]:
        return {"cpm": asdict(self.cfg)}


# ---- registry ----------------------------------------------------------------------------------------------
@dataclass
class PromptEncoders:
    """Frozen image encoders some prompts need: DINOv2 for CPM, CLIP vision for the implicit captioner."""

    dino: nn.Module | None = None
    clip: nn.Module | None = None


def load_dinov2(name: str = "facebook/dinov2-base", *, device: torch.device | str | None = None) -> nn.Module:
    """DINOv2 ViT-B/14 through transformers (hub id or folder)."""
    from transformers import Dinov2Model

    try:
        return Dinov2Model.from_pretrained(name).to(device or "cpu").eval()
    except Exception as err:
        raise RuntimeError(
            f"Could not load DINOv2 from {name!r}: {err}\nDownload it where there is network (`hf download {name}`) "
            "and pass the folder, or set HF_HUB_OFFLINE=1 with a filled cache; `tiny_dinov2()` works offline."
        ) from err


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


def load_dino(name: str, device: torch.device | str | None = None) -> nn.Module:
    """By name: "tiny" -> `tiny_dinov2()` (random weights), else DINOv2 by hub id or folder."""
    return tiny_dinov2().to(device or "cpu") if name == "tiny" else load_dinov2(name, device=device)


def load_clip_vision(name: str, device: torch.device | str | None = None) -> nn.Module:
    """By name: "tiny" -> `tiny_clip_vision()` (random weights), else a CLIPVisionModelWithProjection by id or folder."""
    if name == "tiny":
        return tiny_clip_vision().to(device or "cpu")
    from transformers import CLIPVisionModelWithProjection

    return CLIPVisionModelWithProjection.from_pretrained(name).to(device or "cpu").eval()


PROMPTS: dict[str, type[PromptModule]] = {
    cls.kind: cls for cls in (EmptyPrompt, TemplatePrompt, ImplicitCaptioner, SinglePrompt, ClassPrompt, CPMPrompt)
}
LEARNED: tuple[str, ...] = ("captioner", "single", "class", "cpm")


def build_prompt(
    kind: PromptKind,
    featurizer: SDFeaturizer,
    *,
    categories: list[str] | None = None,
    encoders: PromptEncoders | None = None,
    cpm: CPMConfig | None = None,
    n_tokens: int = 75,
    seed: int = 0,
    template: str = TEMPLATE,
    template_words: TemplateWords = "raw",
) -> PromptModule:
    """Builds a prompt of the registry, initialised as the paper does, on the featurizer's device.

    Args:
        kind: one of `PROMPTS`.
        categories: the category names (Class prompt).
        encoders: DINOv2 (CPM) or CLIP vision (captioner).
        cpm: CPM settings and ablations.
        n_tokens: learned vectors of Single / Class.
        seed: every random initial value (vocabulary ids, CPM's tensors and linear layers, the captioner's
            projection) is drawn from generators seeded by it, never from the global generator.
        template, template_words: the template prompt's text and category names ("raw" as the authors).
    """
    if kind not in PROMPTS:
        raise ValueError(f"unknown prompt {kind!r}; choose one of {sorted(PROMPTS)}")
    encoders = encoders or PromptEncoders()
    d = featurizer.sd.embed_dim
    module: PromptModule
    if kind == "empty":
        module = EmptyPrompt()
    elif kind == "template":
        module = TemplatePrompt(template, template_words)
    elif kind in ("single", "class"):
        count = 1
        if kind == "class":
            if not categories:
                raise ValueError("the Class prompt needs the list of categories")
            count = len(categories)
        if n_tokens == featurizer.sd.tokenizer.model_max_length:  # learned hidden states: torch.rand (hidden_state.py:60)
            init = torch.rand(count, n_tokens, d, generator=torch.Generator().manual_seed(derived_seed(seed, "hidden_state")))
        else:
            init = random_token_vectors(featurizer, n_tokens, count=count, seed=seed)
        module = SinglePrompt(init) if kind == "single" else ClassPrompt(init, sorted(categories or []))
    elif kind == "captioner":
        if encoders.clip is None:
            raise ValueError("the implicit captioner needs a CLIP vision model: PromptEncoders(clip=...)")
        module = ImplicitCaptioner(encoders.clip, d, seed=seed)
    else:
        if encoders.dino is None:
            raise ValueError("CPM needs DINOv2: PromptEncoders(dino=load_dinov2()) (or tiny_dinov2() offline)")
        cfg = cpm or CPMConfig()
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
        dino = DinoDescriptor(encoders.dino, cfg.dino_size, cfg.dino_resize)
        module = CPMPrompt(dino, d, init_global, init_pos, init_alpha, cfg, seed=seed)
    return module.to(featurizer.device)


# ---- save / load -------------------------------------------------------------------------------------------
@dataclass
class PromptMetadata:
    """Saved beside the weights as JSON."""

    kind: str
    model: str
    embed_dim: int
    shapes: dict[str, list[int]]
    config: dict[str, Any] = field(default_factory=dict)
    step: int | None = None
    train_config: dict[str, Any] | None = None
    random_weights: bool = False
    source: dict[str, Any] | None = None  # where an imported prompt came from (the authors' release)
    trained_on: dict[str, Any] | None = None  # training data and image encoder (`sdm.data.dataset_record` + "dino")
    run: dict[str, Any] | None = None  # the training run it comes from: id (kept across resumes) and folder


def atomic_write(path: Path, write: Callable[[str], Any]) -> None:
    """Calls `write(tmp)` on a temporary file in the same folder, then renames it to `path`, so a crash never
    leaves half a file (prompts, training checkpoints and logs all go through here)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide checkpoints from colleagues
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_prompt(
    module: PromptModule,
    path: str | Path,
    featurizer: SDFeaturizer,
    *,
    step: int | None = None,
    train_config: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
    trained_on: dict[str, Any] | None = None,
    run: dict[str, Any] | None = None,
) -> Path:
    """Writes `<path>.safetensors` (learned tensors) and `<path>.json` (metadata), each atomically.

    Returns the safetensors path.
    """
    base = Path(path)
    base = base.with_suffix("") if base.suffix in (".safetensors", ".json") else base
    state = {k: v.contiguous().cpu() for k, v in module.trainable_state().items()}
    meta = PromptMetadata(
        kind=module.kind,
        model=featurizer.sd.name,
        embed_dim=featurizer.sd.embed_dim,
        shapes={k: list(v.shape) for k, v in state.items()},
        config=module.config(),
        step=step,
        train_config=train_config,
        random_weights=featurizer.sd.random_weights,
        source=source,
        trained_on=trained_on,
        run=run,
    )
    weights = base.with_name(base.name + ".safetensors")
    atomic_write(weights, lambda tmp: save_file(state, tmp, metadata={"kind": module.kind}))
    atomic_write(base.with_name(base.name + ".json"), lambda tmp: Path(tmp).write_text(json.dumps(asdict(meta), indent=2)))
    return weights


def read_metadata(path: str | Path) -> PromptMetadata:
    base = Path(path)
    base = base.with_suffix("") if base.suffix in (".safetensors", ".json") else base
    meta_path = base.with_name(base.name + ".json")
    if not meta_path.is_file():
        raise FileNotFoundError(f"no prompt metadata at {meta_path} (a prompt is saved as <name>.safetensors + <name>.json)")
    try:
        return PromptMetadata(**json.loads(meta_path.read_text()))
    except (json.JSONDecodeError, TypeError) as err:
        raise ValueError(f"{meta_path} is not the metadata of a saved prompt ({err})") from err


# Tensor names of CPM prompts saved before the authors' form existed (sdm 0.1): they load with form "paper".
_LEGACY_CPM_NAMES = {"omega_alpha": "alpha_cond", "omega_pos": "positional_embedding", "global_tokens": "global_embeds"}


def _upgrade_legacy(meta: PromptMetadata, state: dict[str, torch.Tensor], where: Path) -> dict[str, torch.Tensor]:
    """Prompts saved by sdm 0.1 keep computing what they computed: CPM with the paper's equation on the resized
    image, the template with readable category names."""
    cfg = meta.config
    if "template" in cfg and "words" not in cfg:
        cfg["words"] = "readable"
    if "cpm" in cfg and "form" not in cfg["cpm"]:
        if cfg["cpm"].get("descriptor") == "global":
            raise ValueError(
                f"the CPM prompt at {where} was saved by sdm 0.1 with its own global-descriptor ablation (g_n on one "
                "token, then pooling), which sdm no longer computes: retrain it (the authors' global descriptor is "
                "CPMConfig(descriptor='global'))"
            )
        cfg["cpm"] = {**cfg["cpm"], "form": "paper", "dino_input": "resized"}
        state = {_LEGACY_CPM_NAMES.get(k, k): v for k, v in state.items()}
        for k in ("alpha_cond", "positional_embedding"):
            if k in state and state[k].dim() == 2:
                state[k] = state[k].unsqueeze(0)
    return state


def check_fits(module: PromptModule, state: dict[str, torch.Tensor], what: str, model: str, embed_dim: int, featurizer: SDFeaturizer) -> None:
    """Raises ValueError naming every tensor whose saved shape differs from what `module` needs."""
    expected = {k: list(v.shape) for k, v in module.trainable_state().items()}
    got = {k: list(v.shape) for k, v in state.items()}
    problems = [f"{k}: saved {got.get(k)} vs model {expected.get(k)}" for k in sorted(set(expected) | set(got)) if got.get(k) != expected.get(k)]
    if problems:
        raise ValueError(
            f"{what} (trained for {model!r}, D = {embed_dim}) does not fit this model "
            f"({featurizer.sd.name!r}, D = {featurizer.sd.embed_dim}):\n  " + "\n  ".join(problems)
        )


def load_state(module: PromptModule, state: dict[str, torch.Tensor]) -> PromptModule:
    """Copies `state` (names of `trainable_state`) into the module's parameters."""
    params = dict(module.named_parameters())
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)
    return module


def load_prompt(path: str | Path, featurizer: SDFeaturizer, *, encoders: PromptEncoders | None = None) -> PromptModule:
    """Rebuilds a saved prompt for `featurizer`'s model and loads its weights.

    Raises ValueError naming every tensor whose saved shape differs from what this model needs (e.g. a prompt
    trained for SD2-1, D = 1024, loaded into a model with D = 768). Prompts saved by sdm 0.1 load with the
    computation they were trained with (see `_upgrade_legacy`).
    """
    meta = read_metadata(path)
    base = Path(path)
    base = base.with_suffix("") if base.suffix in (".safetensors", ".json") else base
    state = _upgrade_legacy(meta, load_file(str(base.with_name(base.name + ".safetensors"))), base)
    cfg = meta.config
    module = build_prompt(
        meta.kind,  # type: ignore[arg-type]
        featurizer,
        categories=cfg.get("categories"),
        encoders=encoders,
        cpm=CPMConfig(**cfg["cpm"]) if "cpm" in cfg else None,
        n_tokens=cfg.get("n_tokens", 75),
        template=cfg.get("template", TEMPLATE),
        template_words=cfg.get("words", "raw"),
    )
    check_fits(module, state, f"the {meta.kind!r} prompt at {base}", meta.model, meta.embed_dim, featurizer)
    return load_state(module, state)


# ---- the authors' released prompts -------------------------------------------------------------------------
# Folder names of the authors' pretrained_prompts.zip (train_simple_prompt.py:55-67, train_cpm.py:51).
_RELEASED_SIMPLE = re.compile(r"^(?P<kind>Single|Class)_(?P<dataset>[a-z0-9]+)_sd(?P<sd>[\d-]+)_(?P<form>TokenEmbeds(?P<n>\d+)|HiddenState)$")
_RELEASED_CPM = re.compile(
    r"^CPM_(?P<dataset>[a-z0-9]+)_sd(?P<sd>[\d-]+)_(?P<mode>Pair|Img)-(?P<enc>DINO|CLIP)-(?P<feat>Feat|Head)-G(?P<g>\d+)-C(?P<c>\d+)$"
)
# The authors' CPM state-dict names -> sdm's (hybrid_captioner.py:49-77; "linear" is the Img and Head modes' g_d).
_RELEASED_CPM_NAMES = {
    "global_embeds": "global_embeds",
    "positional_embedding": "positional_embedding",
    "alpha_cond": "alpha_cond",
    "linear_C.weight": "g_d.weight",
    "linear_C.bias": "g_d.bias",
    "linear.weight": "g_d.weight",
    "linear.bias": "g_d.bias",
    "linear_N.weight": "g_n.weight",
    "linear_N.bias": "g_n.bias",
}


@dataclass
class ReleasedPrompt:
    """One prompt of the authors' release, parsed from its folder name."""

    name: str  # e.g. "CPM_spair_sd2-1_Pair-DINO-Feat-G25-C50"
    kind: Literal["single", "class", "cpm"]
    dataset: str  # the training dataset ("spair", "pfpascal")
    sd_version: str  # "2-1"
    file: str  # "caption.pt" or "ckpt.pt"
    hidden_state: bool = False  # Single/Class "HiddenState": encoder hidden states, not token embeddings
    n_tokens: int = 75
    cpm: CPMConfig | None = None


def parse_released_name(name: str) -> ReleasedPrompt:
    """Folder name of the authors' release -> what it holds; a ValueError for names of no known form."""
    m = _RELEASED_SIMPLE.match(name)
    if m:
        hidden = m["form"] == "HiddenState"
        return ReleasedPrompt(
            name, m["kind"].lower(), m["dataset"], m["sd"], "caption.pt", hidden_state=hidden,  # type: ignore[arg-type]
            n_tokens=77 if hidden else int(m["n"]),
        )
    m = _RELEASED_CPM.match(name)
    if m:
        if m["enc"] != "DINO":
            raise ValueError(f"{name}: CPM prompts conditioned on CLIP features are not supported (only DINOv2, as the paper)")
        g, c = int(m["g"]), int(m["c"])
        cfg = CPMConfig(
            n_global=g if g else 25, n_cond=c, global_prompt=g > 0,
            descriptor="patch" if m["feat"] == "Feat" else "global", condition="pair" if m["mode"] == "Pair" else "image",
        )
        return ReleasedPrompt(name, "cpm", m["dataset"], m["sd"], "ckpt.pt", cpm=cfg)
    raise ValueError(
        f"{name!r} is not a folder name of the authors' released prompts; expected e.g. Single_spair_sd2-1_TokenEmbeds75, "
        "Class_pfpascal_sd2-1_TokenEmbeds75, Single_spair_sd2-1_HiddenState or CPM_spair_sd2-1_Pair-DINO-Feat-G25-C50"
    )


def list_released(path: str | Path) -> list[str]:
    """Names of the authors' prompt folders in `path`: pretrained_prompts.zip, the folder it unzips to, or one
    prompt folder."""
    path = Path(path)
    names: set[str] = set()
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            members = zf.namelist()
        names = {Path(m).parent.name for m in members if Path(m).name in ("caption.pt", "ckpt.pt")}
    elif path.is_dir():
        files = [*path.glob("caption.pt"), *path.glob("ckpt.pt"), *path.glob("*/caption.pt"), *path.glob("*/ckpt.pt"), *path.glob("*/*/caption.pt"), *path.glob("*/*/ckpt.pt")]
        names = {f.parent.name for f in files}
    else:
        raise FileNotFoundError(f"no released prompts at {path}: pass pretrained_prompts.zip, the folder it unzips to, or one prompt folder")
    return sorted(names)


def _read_released(path: Path, entry: ReleasedPrompt) -> Any:
    """torch.load of the prompt's file (tensors only, mapped to the CPU: the authors saved some on a GPU)."""
    if path.is_file():
        with zipfile.ZipFile(path) as zf:
            member = next((m for m in zf.namelist() if Path(m).parent.name == entry.name and Path(m).name == entry.file), None)
            if member is None:
                raise FileNotFoundError(f"{path} has no {entry.name}/{entry.file}")
            data = io.BytesIO(zf.read(member))
        return torch.load(data, map_location="cpu", weights_only=True)
    candidates = [path / entry.file] if path.name == entry.name else [*path.glob(f"{entry.name}/{entry.file}"), *path.glob(f"*/{entry.name}/{entry.file}")]
    found = [c for c in candidates if c.is_file()]
    if not found:
        raise FileNotFoundError(f"{entry.file} not found for {entry.name} under {path}")
    return torch.load(found[0], map_location="cpu", weights_only=True)


def _check_special_rows(t: torch.Tensor, n: int, featurizer: SDFeaturizer, where: str) -> None:
    """Rows 0 and n + 1 of a TokenEmbeds tensor are the text encoder's BOS and EOS embedding-layer outputs."""
    bos = featurizer.special_token_embeddings()[0].float().cpu()
    eos = featurizer.eos_embeddings()[n + 1].float().cpu()
    err = max((t[0] - bos).abs().max().item(), (t[n + 1] - eos).abs().max().item())
    if err > 1e-3 * max(1.0, bos.abs().max().item()):
        raise ValueError(
            f"{where}: rows 0 and {n + 1} should be this model's BOS and EOS embeddings but differ by up to {err:.3g}: "
            f"the prompt was made for another text encoder than {featurizer.sd.name!r}"
        )


def import_sd4match(
    path: str | Path,
    featurizer: SDFeaturizer,
    *,
    name: str | None = None,
    encoders: PromptEncoders | None = None,
) -> tuple[PromptModule, ReleasedPrompt]:
    """Loads one of the authors' released prompts (pretrained_prompts.zip of github ActiveVisionLab/SD4Match)
    as an sdm prompt module computing what their code computes.

    Args:
        path: pretrained_prompts.zip, the folder it unzips to, or one prompt folder (holding caption.pt or ckpt.pt).
        name: which prompt folder, e.g. "CPM_spair_sd2-1_Pair-DINO-Feat-G25-C50" (needed when `path` holds several).
        encoders: DINOv2 for CPM prompts.

    Returns (module, what the folder name says). Single/Class "TokenEmbeds" tensors (C x 77 x D embedding-layer
    outputs) become the learned vectors 1..N after checking that rows 0 and N + 1 are this model's BOS and EOS;
    "HiddenState" tensors are used as the UNet's encoder hidden states; CPM state dicts map onto `CPMPrompt`.
    Raises ValueError naming what does not fit (unknown names, missing keys, shapes, another text encoder).
    """
    path = Path(path)
    names = list_released(path)
    if name is None:
        if len(names) != 1:
            raise ValueError(f"{path} holds {len(names)} prompts; choose one with name=...: {', '.join(names) or 'none found'}")
        name = names[0]
    elif name not in names:
        raise ValueError(f"no prompt {name!r} in {path}; it holds: {', '.join(names) or 'none'}")
    entry = parse_released_name(name)
    data = _read_released(path, entry)
    d = featurizer.sd.embed_dim
    where = f"{name}/{entry.file}"
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a dict of tensors, found {type(data).__name__}")
    if entry.kind == "cpm":
        unknown = sorted(k for k in data if k not in _RELEASED_CPM_NAMES and not k.startswith("text_model_embeddings."))
        if unknown:
            raise ValueError(f"{where}: unknown tensors {unknown}; a CPM checkpoint holds {sorted(set(_RELEASED_CPM_NAMES))}")
        state = {_RELEASED_CPM_NAMES[k]: v.float() for k, v in data.items() if k in _RELEASED_CPM_NAMES}
        module = build_prompt("cpm", featurizer, encoders=encoders, cpm=entry.cpm)
        check_fits(module, state, f"the released prompt {where}", f"SD {entry.sd_version}", int(state.get("alpha_cond", torch.zeros(1)).shape[-1]), featurizer)
        return load_state(module, state), entry
    tensors = {k: v.float() for k, v in data.items()}
    for k, t in tensors.items():
        if t.dim() != 3 or t.shape[0] != 1 or t.shape[1] != 77:
            raise ValueError(f"{where}: tensor {k!r} has shape {list(t.shape)}; expected [1, 77, D]")
        if t.shape[2] != d:
            raise ValueError(
                f"{where}: D = {t.shape[2]} (SD {entry.sd_version}) but {featurizer.sd.name!r} has D = {d}: load the model it was made for"
            )
    if entry.kind == "single":
        if set(tensors) != {"dataset"}:
            raise ValueError(f"{where}: a Single prompt holds one tensor named 'dataset'; found {sorted(tensors)}")
        keys = ["dataset"]
    else:
        keys = sorted(tensors)
    stacked = torch.cat([tensors[k] for k in keys])  # C x 77 x D
    if entry.hidden_state:
        init = stacked
    else:
        for k in keys:
            _check_special_rows(tensors[k][0], entry.n_tokens, featurizer, f"{where}[{k!r}]")
        init = stacked[:, 1 : entry.n_tokens + 1]
    module = SinglePrompt(init) if entry.kind == "single" else ClassPrompt(init, keys)
    return module.to(featurizer.device), entry
