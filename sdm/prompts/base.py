"""What every prompt kind shares: `PromptModule`, the build options, the images as stored, and the registry
(`PROMPTS`, `register_prompt`, `build_prompt`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal

import torch
from PIL import Image
from torch import nn

from sdm.config import LEARNED, PROMPT_KINDS, CPMConfig, PromptKind, TemplateWords, enrol
from sdm.data import OriginalLoader, category_label
from sdm.encoders import (
    EncoderName,
    PromptEncoders,
)
from sdm.features import PromptInput, SDFeaturizer

Conditioning = Literal["fixed", "category", "image", "pair"]

TEMPLATE = "a photo of a {}"
# "raw": the dataset's category name with PF-Willow's condition dropped, as the authors' prompt.py:38-52 does
# ("pottedplant", "car(G)" -> "car"); "readable": three names spelt as words (sdm's own option).
# Category names of the datasets written as words, for the "readable" template.
_CATEGORY_WORDS = {"pottedplant": "potted plant", "tvmonitor": "tv monitor", "diningtable": "dining table"}



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


# Original images (before the resize to the featurizer's size): PIL images, or 3 x H x W tensors in [0, 1].
Originals = Sequence[Image.Image | torch.Tensor]


class StoredImages(Sequence[Image.Image]):
    """The images as stored for `ids`, each decoded by `load` only when it is read, so that a prompt that keeps
    what it computes from them per image (CPM's DINOv2 descriptors, `DinoDescriptor.stored`) decodes only the
    images it has not seen."""

    def __init__(self, ids: Sequence[str], load: OriginalLoader) -> None:
        self.ids = list(ids)
        self.load = load

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> Image.Image:  # type: ignore[override]
        return self.load(self.ids[i])


def originals_for(prompt: PromptModule, ids: Sequence[str], load: Callable[[str], Image.Image] | None) -> StoredImages | None:
    """The images as stored for `ids` when `prompt` looks at them (`needs_originals`), else None.

    `load`: image id -> PIL image (`PairDataset.original_image`); a clear error when the prompt needs it and none
    is given. The images are decoded when read (`StoredImages`).
    """
    if not prompt.needs_originals:
        return None
    if load is None:
        raise ValueError(f"the {prompt.kind!r} prompt looks at the images as stored: pass originals=dataset.original_image")
    return StoredImages(ids, load)


@dataclass
class BuildOptions:
    """What `build_prompt` passes to a prompt class's `build` (see `build_prompt` for each field)."""

    categories: list[str] | None = None
    encoders: PromptEncoders = field(default_factory=PromptEncoders)
    cpm: CPMConfig | None = None
    n_tokens: int = 75
    seed: int = 0
    template: str = TEMPLATE
    template_words: TemplateWords = "raw"


class PromptModule(nn.Module):
    """Base class. Subclasses set `kind` and `conditioning` and implement `image_prompt` or `pair_prompts`.

    `needs_originals`: the prompt looks at the images as stored, not at the resized featurizer input (CPM's
    DINOv2 input); callers then pass `originals` (datasets give them by id: `PairDataset.original_image`).
    `needs_images`: the prompt looks at the resized featurizer input (`images`). True unless a subclass says
    otherwise; the extractors pass None instead, without copying the images to the GPU, to prompts that do not.
    `uses`: the frozen encoders of `PromptEncoders` it is built from (callers load only those).
    """

    kind: ClassVar[str]
    conditioning: ClassVar[Conditioning]
    uses: ClassVar[tuple[EncoderName, ...]] = ()

    @property
    def needs_originals(self) -> bool:
        return False

    @property
    def needs_images(self) -> bool:
        return True

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
        """What `build_prompt` needs to rebuild this module (saved beside the weights; `options` reads it back)."""
        return {}

    @classmethod
    def options(cls, config: dict[str, Any]) -> dict[str, Any]:
        """The `BuildOptions` fields that a saved `config()` stands for: the same names by default; a kind whose
        saved names differ maps them here, so saving and loading a kind is defined in its own class."""
        known = {f.name for f in fields(BuildOptions)}
        return {k: v for k, v in config.items() if k in known}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The learned tensors (frozen encoders such as DINOv2 are not saved)."""
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def linear_layers(self) -> list[nn.Module]:
        """The prompt's learned linear layers, trained at the linear learning rate (none by default)."""
        return []

    @classmethod
    def build(cls, featurizer: SDFeaturizer, opts: BuildOptions) -> PromptModule:
        """A new prompt of this kind, initialised as the paper does (on the CPU; `build_prompt` moves it)."""
        raise NotImplementedError

    def parameter_groups(self, lr: float, lr_linear: float) -> list[dict[str, Any]]:
        """Optimizer groups: learned token vectors at `lr`, the layers of `linear_layers` at `lr_linear`; each in
        the order of `parameters()`."""
        ids = {id(p) for layer in self.linear_layers() for p in layer.parameters()}
        linear = [p for p in self.parameters() if p.requires_grad and id(p) in ids]
        tokens = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        return [g for g in ({"params": tokens, "lr": lr}, {"params": linear, "lr": lr_linear}) if g["params"]]


# ---- registry ----------------------------------------------------------------------------------------------
PROMPTS: dict[str, type[PromptModule]] = {}  # filled by the kinds' modules (sdm.prompts imports them all)


def register_prompt(cls: type[PromptModule], learned: bool = False) -> type[PromptModule]:
    """Adds a prompt kind (a `PromptModule` subclass with its `kind`, `conditioning`, `build`, `config` and, when
    its saved names differ from `BuildOptions`, `options`). `build_prompt`, `load_prompt`, `sdm.load_method` and the
    command line then take `cls.kind`; `learned` kinds can be trained (`sdm train --prompt`)."""
    enrol(PROMPTS, cls.kind, cls, PROMPT_KINDS, *([LEARNED] if learned else []))
    return cls


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
    opts = BuildOptions(categories, encoders or PromptEncoders(), cpm, n_tokens, seed, template, template_words)
    module = PROMPTS[kind].build(featurizer, opts)
    return module.to(featurizer.device)

__all__ = ["PROMPTS", "TEMPLATE", "BuildOptions", "Conditioning", "Originals", "PromptModule", "StoredImages", "build_prompt", "category_text", "originals_for", "register_prompt", "seeded_linear"]
