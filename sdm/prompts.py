"""Prompts for the UNet: zero-shot (empty, template, implicit captioner) and learned (Single, Class, CPM).

Every prompt is a `PromptModule` chosen by name from `PROMPTS`. Its `conditioning` says what it depends on,
which decides how features can be cached during evaluation:

- "fixed":    the same prompt for every image (empty, Single)
- "category": one prompt per category (template, Class)
- "image":    computed from the image itself (implicit captioner, CPM conditioned on each image alone)
- "pair":     computed from both images of a pair (CPM), so features are per pair

A prompt is anything `SDFeaturizer.encode_prompt` accepts: strings, learned vectors B x N x D (N <= 75) or
encoder hidden states B x 77 x D. DESIGN.md ("Prompt assembly", "CPM") is the specification.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from sdm.data import category_label
from sdm.features import PromptInput, SDFeaturizer

Conditioning = Literal["fixed", "category", "image", "pair"]
PromptKind = Literal["empty", "template", "captioner", "single", "class", "cpm"]

TEMPLATE = "a photo of a {}"
# Category names of the datasets written as words, for the text template.
_CATEGORY_WORDS = {"pottedplant": "potted plant", "tvmonitor": "tv monitor", "diningtable": "dining table"}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def category_text(name: str) -> str:
    """Dataset category name -> words for a text prompt: "car(G)" -> "car", "pottedplant" -> "potted plant"."""
    base = category_label(name).replace("_", " ")
    return _CATEGORY_WORDS.get(base, base)


def _normalise(images: torch.Tensor, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    x = F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    m = x.new_tensor(mean).view(1, 3, 1, 1)
    s = x.new_tensor(std).view(1, 3, 1, 1)
    return (x.clamp(0, 1) - m) / s


class PromptModule(nn.Module):
    """Base class. Subclasses set `kind` and `conditioning` and implement `image_prompt` or `pair_prompts`."""

    kind: ClassVar[str]
    conditioning: ClassVar[Conditioning]

    def image_prompt(self, featurizer: SDFeaturizer, images: torch.Tensor | None, categories: list[str]) -> PromptInput:
        """Prompt for a batch of images on their own (conditioning other than "pair").

        images: B x 3 x H x W in [0, 1] (may be None for "fixed" and "category"); categories: B names.
        """
        raise NotImplementedError(f"the {self.kind!r} prompt depends on both images: call pair_prompts")

    def pair_prompts(
        self, featurizer: SDFeaturizer, src: torch.Tensor | None, trg: torch.Tensor | None, categories: list[str]
    ) -> tuple[PromptInput, PromptInput]:
        """Prompts for the source and the target images of B pairs (B x 3 x H x W in [0, 1])."""
        return self.image_prompt(featurizer, src, categories), self.image_prompt(featurizer, trg, categories)

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

    def image_prompt(self, featurizer: SDFeaturizer, images: torch.Tensor | None, categories: list[str]) -> PromptInput:
        return [""]


class TemplatePrompt(PromptModule):
    """"a photo of a {category}" with normalised category names."""

    kind = "template"
    conditioning: ClassVar[Conditioning] = "category"

    def __init__(self, template: str = TEMPLATE) -> None:
        super().__init__()
        self.template = template

    def image_prompt(self, featurizer: SDFeaturizer, images: torch.Tensor | None, categories: list[str]) -> PromptInput:
        return [self.template.format(category_text(c)) for c in categories]

    def config(self) -> dict[str, Any]:
        return {"template": self.template}


class ImplicitCaptioner(PromptModule):
    """SD+DINO's implicit captioner: the CLIP image embedding of the image, projected to 77 x D and added to the
    empty prompt's encoding through a learned gate (zero at start, so it begins as the empty prompt).

    `clip`: a `transformers.CLIPVisionModelWithProjection` (frozen).
    """

    kind = "captioner"
    conditioning: ClassVar[Conditioning] = "image"

    def __init__(self, clip: nn.Module, embed_dim: int, image_size: int = 224) -> None:
        super().__init__()
        self.clip = clip.requires_grad_(False).eval()
        self.image_size = image_size
        width = int(clip.config.projection_dim)
        self.proj = nn.Linear(width, 77 * embed_dim)
        self.gate = nn.Parameter(torch.zeros(77, embed_dim))

    def image_prompt(self, featurizer: SDFeaturizer, images: torch.Tensor | None, categories: list[str]) -> PromptInput:
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
    prompts start). Special tokens are excluded."""
    tok = featurizer.sd.tokenizer
    g = torch.Generator().manual_seed(seed)
    special = torch.tensor(sorted({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}))
    vocab = torch.tensor([i for i in range(len(tok)) if i not in set(special.tolist())])
    ids = vocab[torch.randint(len(vocab), (count, n), generator=g)].to(featurizer.device)
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

    def image_prompt(self, featurizer: SDFeaturizer, images: torch.Tensor | None, categories: list[str]) -> PromptInput:
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

    def image_prompt(self, featurizer: SDFeaturizer, images: torch.Tensor | None, categories: list[str]) -> PromptInput:
        unknown = sorted({c for c in categories if c not in self.index})
        if unknown:
            raise ValueError(f"no learned prompt for categories {unknown}; this Class prompt knows {self.categories}")
        idx = torch.tensor([self.index[c] for c in categories], device=self.tokens.device)
        return self.tokens[idx]

    def config(self) -> dict[str, Any]:
        return {"n_tokens": self.tokens.shape[1], "categories": self.categories}


@dataclass
class CPMConfig:
    """The conditional prompting module and its ablations (the paper's Fig. 3a).

    descriptor: "patch" (DINOv2 patch tokens, 256 x 768) or "global" (the CLS token only).
    condition: "pair" (both images' descriptors concatenated) or "image" (each image alone: its own prompt).
    global_prompt: prepend the 25 learned global vectors.
    use_gn: apply g_n (linear along the patch axis) before pooling.
    """

    n_global: int = 25
    n_cond: int = 50
    descriptor: Literal["patch", "global"] = "patch"
    condition: Literal["pair", "image"] = "pair"
    global_prompt: bool = True
    use_gn: bool = True
    dino_size: int = 224
    gn_width: int = 256


# The six cases of the paper's Fig. 3a as CPMConfig overrides.
CPM_ABLATIONS: dict[str, dict[str, Any]] = {
    "patch-pair": {},
    "patch-image": {"condition": "image"},
    "global-pair": {"descriptor": "global"},
    "global-image": {"descriptor": "global", "condition": "image"},
    "no-global-prompt": {"global_prompt": False},
    "no-gn": {"use_gn": False},
}


class DinoDescriptor(nn.Module):
    """Frozen DINOv2 (transformers `Dinov2Model`): images B x 3 x H x W in [0, 1] -> patch tokens B x P x C
    (P = (size / 14)^2, 256 at 224 px) or the CLS token B x 1 x C."""

    def __init__(self, dino: nn.Module, image_size: int = 224) -> None:
        super().__init__()
        self.dino = dino.requires_grad_(False).eval()
        self.image_size = image_size
        self.width = int(dino.config.hidden_size)
        self.n_patches = (image_size // int(dino.config.patch_size)) ** 2

    @torch.no_grad()
    def forward(self, images: torch.Tensor, descriptor: Literal["patch", "global"] = "patch") -> torch.Tensor:
        pixels = _normalise(images, self.image_size, IMAGENET_MEAN, IMAGENET_STD).to(self.dino.dtype)
        tokens = self.dino(pixel_values=pixels).last_hidden_state.float()
        return tokens[:, :1] if descriptor == "global" else tokens[:, 1:]


class CPMPrompt(PromptModule):
    """Conditional prompting module: [25 global learned vectors ; 50 vectors conditioned on the image pair].

    DINOv2 descriptors of both images, concatenated along channels -> g_d (to D) -> g_n (along patches,
    256 -> 256) -> adaptive max pool to 50 -> theta = F * Omega_alpha + Omega_pos. Omega_alpha starts at zero,
    so training starts from a plain learned prompt and the conditioning is grown from there.
    """

    kind = "cpm"

    def __init__(self, dino: DinoDescriptor, embed_dim: int, init_global: torch.Tensor, init_pos: torch.Tensor, cfg: CPMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.dino = dino
        n_in = dino.n_patches if cfg.descriptor == "patch" else 1
        width = dino.width * (2 if cfg.condition == "pair" else 1)
        self.g_d = nn.Linear(width, embed_dim)
        self.g_n = nn.Linear(n_in, cfg.gn_width) if cfg.use_gn else None
        self.omega_alpha = nn.Parameter(torch.zeros(cfg.n_cond, embed_dim))
        self.omega_pos = nn.Parameter(init_pos.clone().float().view(cfg.n_cond, embed_dim))
        self.global_tokens = nn.Parameter(init_global.clone().float()) if cfg.global_prompt else None  # 1 x 25 x D

    @property
    def conditioning(self) -> Conditioning:  # type: ignore[override]
        return "pair" if self.cfg.condition == "pair" else "image"

    def condition_tokens(self, descriptors: torch.Tensor) -> torch.Tensor:
        """B x P x C descriptors -> B x n_cond x D conditional vectors theta_cond."""
        f = self.g_d(descriptors)  # B x P x D
        f = f.transpose(1, 2)  # B x D x P
        if self.g_n is not None:
            f = self.g_n(f)
        f = F.adaptive_max_pool1d(f, self.cfg.n_cond).transpose(1, 2)  # B x n_cond x D
        return f * self.omega_alpha + self.omega_pos

    def _prompt(self, descriptors: torch.Tensor) -> torch.Tensor:
        theta = self.condition_tokens(descriptors)
        if self.global_tokens is None:
            return theta
        return torch.cat([self.global_tokens.expand(theta.shape[0], -1, -1), theta], dim=1)

    def image_prompt(self, featurizer: SDFeaturizer, images: torch.Tensor | None, categories: list[str]) -> PromptInput:
        if self.cfg.condition == "pair":
            return super().image_prompt(featurizer, images, categories)
        if images is None:
            raise ValueError("CPM needs the images")
        return self._prompt(self.dino(images, self.cfg.descriptor))

    def pair_prompts(
        self, featurizer: SDFeaturizer, src: torch.Tensor | None, trg: torch.Tensor | None, categories: list[str]
    ) -> tuple[PromptInput, PromptInput]:
        if src is None or trg is None:
            raise ValueError("CPM needs both images of each pair")
        if self.cfg.condition == "image":
            return super().pair_prompts(featurizer, src, trg, categories)
        both = torch.cat([self.dino(src, self.cfg.descriptor), self.dino(trg, self.cfg.descriptor)], dim=-1)
        prompt = self._prompt(both)
        return prompt, prompt  # the same prompt for both images of the pair

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
) -> PromptModule:
    """Builds a prompt of the registry, initialised as the paper does, on the featurizer's device.

    Args:
        kind: one of `PROMPTS`.
        categories: the category names (Class prompt).
        encoders: DINOv2 (CPM) or CLIP vision (captioner).
        cpm: CPM settings and ablations.
        n_tokens: learned vectors of Single / Class.
        seed: random vocabulary ids for the initial vectors.
    """
    if kind not in PROMPTS:
        raise ValueError(f"unknown prompt {kind!r}; choose one of {sorted(PROMPTS)}")
    encoders = encoders or PromptEncoders()
    d = featurizer.sd.embed_dim
    module: PromptModule
    if kind == "empty":
        module = EmptyPrompt()
    elif kind == "template":
        module = TemplatePrompt(template)
    elif kind == "single":
        module = SinglePrompt(random_token_vectors(featurizer, n_tokens, seed=seed))
    elif kind == "class":
        if not categories:
            raise ValueError("the Class prompt needs the list of categories")
        module = ClassPrompt(random_token_vectors(featurizer, n_tokens, count=len(categories), seed=seed), sorted(categories))
    elif kind == "captioner":
        if encoders.clip is None:
            raise ValueError("the implicit captioner needs a CLIP vision model: PromptEncoders(clip=...)")
        module = ImplicitCaptioner(encoders.clip, d)
    else:
        if encoders.dino is None:
            raise ValueError("CPM needs DINOv2: PromptEncoders(dino=load_dinov2()) (or tiny_dinov2() offline)")
        cfg = cpm or CPMConfig()
        init_global = random_token_vectors(featurizer, cfg.n_global, seed=seed)
        first = cfg.n_global + 1 if cfg.global_prompt else 1
        init_pos = random_token_vectors(featurizer, cfg.n_cond, first_position=first, seed=seed + 1)
        module = CPMPrompt(DinoDescriptor(encoders.dino, cfg.dino_size), d, init_global, init_pos, cfg)
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


def atomic_write(path: Path, write: Callable[[str], Any]) -> None:
    """Calls `write(tmp)` on a temporary file in the same folder, then renames it to `path`, so a crash never
    leaves half a file (prompts, training checkpoints and logs all go through here)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_prompt(
    module: PromptModule,
    path: str | Path,
    featurizer: SDFeaturizer,
    *,
    step: int | None = None,
    train_config: dict[str, Any] | None = None,
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
    return PromptMetadata(**json.loads(meta_path.read_text()))


def load_prompt(path: str | Path, featurizer: SDFeaturizer, *, encoders: PromptEncoders | None = None) -> PromptModule:
    """Rebuilds a saved prompt for `featurizer`'s model and loads its weights.

    Raises ValueError naming every tensor whose saved shape differs from what this model needs (e.g. a prompt
    trained for SD2-1, D = 1024, loaded into a model with D = 768).
    """
    meta = read_metadata(path)
    base = Path(path)
    base = base.with_suffix("") if base.suffix in (".safetensors", ".json") else base
    cfg = meta.config
    module = build_prompt(
        meta.kind,  # type: ignore[arg-type]
        featurizer,
        categories=cfg.get("categories"),
        encoders=encoders,
        cpm=CPMConfig(**cfg["cpm"]) if "cpm" in cfg else None,
        n_tokens=cfg.get("n_tokens", 75),
        template=cfg.get("template", TEMPLATE),
    )
    state = load_file(str(base.with_name(base.name + ".safetensors")))
    expected = {k: list(v.shape) for k, v in module.trainable_state().items()}
    got = {k: list(v.shape) for k, v in state.items()}
    problems = [f"{k}: saved {got.get(k)} vs model {expected.get(k)}" for k in sorted(set(expected) | set(got)) if got.get(k) != expected.get(k)]
    if problems:
        raise ValueError(
            f"the {meta.kind!r} prompt at {base} (trained for {meta.model!r}, D = {meta.embed_dim}) does not fit this model "
            f"({featurizer.sd.name!r}, D = {featurizer.sd.embed_dim}):\n  " + "\n  ".join(problems)
        )
    params = dict(module.named_parameters())
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)
    return module
