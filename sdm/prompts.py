"""Prompts for the UNet: zero-shot (empty, template, implicit captioner) and learned (Single, Class, CPM).

Every prompt is a `PromptModule` chosen by name from `PROMPTS`. Its `conditioning` says what it depends on,
which decides how features can be cached during evaluation:

- "fixed":    the same prompt for every image (empty, Single)
- "category": one prompt per category (template, Class)
- "image":    computed from the image itself (implicit captioner, CPM conditioned on each image alone)
- "pair":     computed from both images of a pair (CPM), so features are per pair

A prompt is anything `SDFeaturizer.encode_prompt` accepts: strings, learned vectors B x N x D (N <= 75) or
encoder hidden states B x 77 x D. docs/specification.md ("Prompt assembly", "CPM") is the specification; docs/choices.md
lists where sdm offers another reading than the authors' code (github ActiveVisionLab/SD4Match, 3d7b09e).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from sdm.config import CPM_ABLATIONS, LEARNED, PROMPT_KINDS, CPMConfig, PromptKind, TemplateWords
from sdm.data import OriginalLoader, category_label
from sdm.encoders import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    EncoderName,
    PromptEncoders,
    dino_pixels,
    normalise_images,
)
from sdm.features import PromptInput, SDFeaturizer, derived_seed
from sdm.storage import FeatureStore

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
    `uses`: the frozen encoders of `PromptEncoders` it is built from (callers load only those).
    """

    kind: ClassVar[str]
    conditioning: ClassVar[Conditioning]
    uses: ClassVar[tuple[EncoderName, ...]] = ()

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


# ---- zero-shot ---------------------------------------------------------------------------------------------
class EmptyPrompt(PromptModule):
    """The empty string (the DIFT setting)."""

    kind = "empty"
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


# ---- learned -----------------------------------------------------------------------------------------------
def learned_vectors(featurizer: SDFeaturizer, n_tokens: int, count: int, seed: int) -> torch.Tensor:
    """Initial vectors of `count` learned prompts: token embeddings of random vocabulary ids, or, for 77 learned
    hidden states, torch.rand (hidden_state.py:60)."""
    if n_tokens == featurizer.sd.tokenizer.model_max_length:
        gen = torch.Generator().manual_seed(derived_seed(seed, "hidden_state"))
        return torch.rand(count, n_tokens, featurizer.sd.embed_dim, generator=gen)
    return random_token_vectors(featurizer, n_tokens, count=count, seed=seed)


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

    @classmethod
    def build(cls, featurizer: SDFeaturizer, opts: BuildOptions) -> PromptModule:
        return cls(learned_vectors(featurizer, opts.n_tokens, 1, opts.seed))

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

    @classmethod
    def build(cls, featurizer: SDFeaturizer, opts: BuildOptions) -> PromptModule:
        if not opts.categories:
            raise ValueError("the Class prompt needs the list of categories")
        return cls(learned_vectors(featurizer, opts.n_tokens, len(opts.categories), opts.seed), sorted(opts.categories))

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


class DinoDescriptor(nn.Module):
    """Frozen DINOv2 (transformers `Dinov2Model`): pixels B x 3 x S x S (`pixels` or `resized_pixels`) -> patch
    tokens B x P x C (P = (S / 14)^2, 256 at 224 px) or the pooled CLS token B x 1 x C."""

    # Descriptors kept by `stored`: patch tokens of DINOv2-B are 256 x 768 float32 (0.8 MB) an image.
    cache_size: ClassVar[int] = 256

    def __init__(self, dino: nn.Module, image_size: int = 224, resize: int = 256) -> None:
        super().__init__()
        self.dino = dino.requires_grad_(False).eval()
        self.image_size = image_size
        self.resize = resize
        self.width = int(dino.config.hidden_size)
        self.n_patches = (image_size // int(dino.config.patch_size)) ** 2
        self.store = FeatureStore(self.cache_size)
        self._source: OriginalLoader | None = None  # the loader whose ids the store's keys are

    def pixels(self, originals: Originals) -> torch.Tensor:
        """Images as stored -> B x 3 x S x S through the dinov2-base processor (`dino_pixels`)."""
        return torch.stack([dino_pixels(im, self.resize, self.image_size) for im in originals])

    def resized_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W in [0, 1] -> B x 3 x S x S squashed (bicubic) and ImageNet-normalised."""
        return normalise_images(images, self.image_size, IMAGENET_MEAN, IMAGENET_STD)

    def stored(self, originals: StoredImages, descriptor: Literal["patch", "global"] = "patch") -> torch.Tensor:
        """Descriptors of images as stored (B x P x C, as `forward`), each image run through DINOv2 on its own and
        kept by id: the authors compute DINOv2 once per image, a batch of one, and reuse the output for every pair
        (pre_compute_dino_feature.py:54-65). An image's descriptors then do not depend on the batch it comes in,
        and only images not kept are decoded. The store is emptied when the images come from another loader (an
        other dataset); its keys hold the device and autocast dtype the descriptors were computed under."""
        if self._source is None or originals.load != self._source:  # bound methods: equal for the same dataset
            self.store.reset()
            self._source = originals.load
        device = next(self.dino.parameters()).device
        autocast = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        keys: list[Hashable] = [(i, descriptor, str(device), autocast) for i in originals.ids]
        return self.store.fetch(keys, lambda idx: self(self.pixels([originals[k] for k in idx]), descriptor))

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
    uses: ClassVar[tuple[EncoderName, ...]] = ("dino",)

    @classmethod
    def build(cls, featurizer: SDFeaturizer, opts: BuildOptions) -> PromptModule:
        if opts.encoders.dino is None:
            raise ValueError("CPM needs DINOv2: PromptEncoders(dino=sdm.encoders.load_dino()) (or tiny_dinov2() offline)")
        cfg, seed, d = opts.cpm or CPMConfig(), opts.seed, featurizer.sd.embed_dim
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
        dino = DinoDescriptor(opts.encoders.dino, cfg.dino_size, cfg.dino_resize)
        return cls(dino, d, init_global, init_pos, init_alpha, cfg, seed=seed)

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

    def linear_layers(self) -> list[nn.Module]:  # g_d and g_n (learning rate 1e-3 in the paper)
        return [layer for layer in (self.g_d, self.g_n) if layer is not None]

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
            if isinstance(originals, StoredImages):
                return self.dino.stored(originals, self.cfg.descriptor)
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
        self, featurizer: SDFeaturizer, src: torch.Tensor | None, trg: torch.Tensor | None, categories: list[str],
        originals: tuple[Originals, Originals] | None = None,
    ) -> tuple[PromptInput, PromptInput]:  # fmt: skip
        if self.cfg.condition == "image":
            return super().pair_prompts(featurizer, src, trg, categories, originals)
        src_o, trg_o = originals if originals is not None else (None, None)
        both = torch.cat([self.descriptors(src, src_o), self.descriptors(trg, trg_o)], dim=-1)
        prompt = self._prompt(both)
        return prompt, prompt  # the same prompt for both images of the pair (train_cpm.py:160-161)

    def config(self) -> dict[str, Any]:
        return {"cpm": asdict(self.cfg)}

    @classmethod
    def options(cls, config: dict[str, Any]) -> dict[str, Any]:
        return {"cpm": CPMConfig(**config["cpm"])}


# ---- registry ----------------------------------------------------------------------------------------------
PROMPTS: dict[str, type[PromptModule]] = {
    cls.kind: cls for cls in (EmptyPrompt, TemplatePrompt, ImplicitCaptioner, SinglePrompt, ClassPrompt, CPMPrompt)
}


def register_prompt(cls: type[PromptModule], learned: bool = False) -> type[PromptModule]:
    """Adds a prompt kind (a `PromptModule` subclass with its `kind`, `conditioning`, `build`, `config` and, when
    its saved names differ from `BuildOptions`, `options`). `build_prompt`, `load_prompt`, `sdm.load_method` and the
    command line then take `cls.kind`; `learned` kinds can be trained (`sdm train --prompt`)."""
    PROMPTS[cls.kind] = cls
    for names, wanted in ((PROMPT_KINDS, True), (LEARNED, learned)):
        if wanted and cls.kind not in names:
            names.append(cls.kind)
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


__all__ = [  # CPM_ABLATIONS, CPMConfig and LEARNED (sdm.config) are re-exported: build_prompt takes them
    "CPM_ABLATIONS",
    "LEARNED",
    "PROMPTS",
    "TEMPLATE",
    "BuildOptions",
    "CPMConfig",
    "CPMPrompt",
    "ClassPrompt",
    "Conditioning",
    "DinoDescriptor",
    "EmptyPrompt",
    "ImplicitCaptioner",
    "Originals",
    "PromptModule",
    "SinglePrompt",
    "StoredImages",
    "TemplatePrompt",
    "build_prompt",
    "category_text",
    "learned_vectors",
    "originals_for",
    "random_token_vectors",
    "register_prompt",
    "seeded_linear",
]
