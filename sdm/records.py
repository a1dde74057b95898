"""The protocol record of an evaluation: what was evaluated (model, weights, extractor, matcher) and by which
code, stored with every result (`EvalResult.info["protocol"]`) and hashed into its file name (`protocol_id`)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sdm.encoders import encoder_name

if TYPE_CHECKING:
    from sdm.attention import AttentionMatcher


def protocol_id(protocol: dict[str, Any]) -> str:
    """8 hex digits naming a protocol record (results of different protocols get different file names)."""
    return hashlib.blake2b(json.dumps(protocol, sort_keys=True, default=str).encode(), digest_size=4).hexdigest()


def code_record() -> dict[str, str | None]:
    """Which code computed a result: the sdm version and the git commit of the checkout (None without git)."""
    return {"sdm_version": _sdm_version(), "git_commit": _git_commit()}


def _sdm_version() -> str:
    from sdm.config import VERSION

    return VERSION


@functools.cache
def _git_commit() -> str | None:
    """The commit of the sdm checkout this code runs from (None when installed without git)."""
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


@functools.cache
def _git_dirty() -> bool | None:
    """Whether the checkout has uncommitted changes to tracked files (None without git)."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


_LIBRARIES = ("torch", "diffusers", "transformers", "accelerate")


def environment_record(device: str | None = None) -> dict[str, Any]:
    """Where a result was computed, kept beside the protocol but not hashed into its id (the same protocol on
    another machine is the same experiment): whether the checkout had uncommitted changes, the versions of the
    libraries that compute, Python, the device and the GPU's name."""
    import platform
    from importlib import metadata

    import torch

    versions: dict[str, str | None] = {}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"git_dirty": _git_dirty(), **versions, "python": platform.python_version(), "device": device, "gpu": gpu}


def _model_fingerprint(*modules: nn.Module) -> str:
    """A short hash of the modules' parameters (names, shapes, and the first 64 values of each), enough to tell
    two sets of weights apart."""
    named = [(name, param) for module in modules for name, param in module.named_parameters()]
    heads = [param.detach().flatten()[:64].float() for _, param in named]
    # one copy to the host per device, not one per parameter: each copy from a GPU waits for it (1,342 waits for SD2-1)
    on_host: dict[int, torch.Tensor] = {}
    for device in dict.fromkeys(t.device for t in heads):
        index = [i for i, t in enumerate(heads) if t.device == device]
        parts = torch.cat([heads[i] for i in index]).cpu().split([heads[i].numel() for i in index])
        on_host.update(zip(index, parts))
    h = hashlib.blake2b(digest_size=8)
    for i, (name, param) in enumerate(named):
        h.update(f"{name}:{tuple(param.shape)}".encode())
        h.update(on_host[i].numpy().tobytes())
    return h.hexdigest()


def _model_record(sd: Any) -> dict[str, Any]:
    """Model id, a fingerprint of its UNet, text encoder and VAE weights, and whether they are random."""
    return {
        "model": sd.name, "weights": _model_fingerprint(sd.unet, *sd.text.modules(), sd.vae), "random_weights": bool(sd.random_weights)
    }


def attention_record(matcher: AttentionMatcher) -> dict[str, Any]:
    """What Hedlin et al.'s matcher adds to the protocol record: model, weights, every setting but the progress bar."""
    params = {k: v for k, v in dataclasses.asdict(matcher.config).items() if k != "progress"}
    return {"matcher": "attention", "matcher_params": json.loads(json.dumps(params, default=list)), **_model_record(matcher.sd)}


def _vit_weights(name: str | None) -> bool | str:
    """Whether a ViT's weights are random: True for the tiny ones, False for a hub id (trained weights),
    "unknown" for a local folder (whatever was saved there)."""
    if name == "random weights (tiny)":
        return True
    return "unknown" if name and Path(name).exists() else False


def _combined(*flags: bool | str) -> bool | str:
    """The random_weights of a result computed by several models: True if any is random, else "unknown" if any
    is unknown, else False."""
    return True if True in flags else "unknown" if "unknown" in flags else False


def featurizer_of(extractor: Any) -> Any:
    """The SD featurizer behind an extractor (its own, or a fused extractor's SD part); None for a ViT baseline."""
    return getattr(extractor, "featurizer", None) or getattr(getattr(extractor, "sd_extractor", None), "featurizer", None)


def featurizer_record(featurizer: Any) -> dict[str, Any]:
    """An `SDFeaturizer`'s part of a protocol record: model, weights, timestep, ensemble, size, block, seed, latent."""
    return {
        **_model_record(featurizer.sd), "timestep": featurizer.timestep, "ensemble": featurizer.ensemble,
        "image_size": list(featurizer.image_size), "up_block": featurizer.up_block, "seed": featurizer.seed, "latent": featurizer.latent,
    }  # fmt: skip


def prompt_record(prompt: Any) -> dict[str, Any]:
    """A prompt module's part of a protocol record: its kind and its saved config."""
    return {"prompt": prompt.kind, "prompt_config": prompt.config()}


def vit_record(vit: nn.Module, random_weights: bool | str = False) -> dict[str, Any]:
    """A ViT's part of a protocol record (a `ViTFeatures` or the transformers model itself): its name, a weights
    fingerprint, and `random_weights` combined with the record's so far."""
    inner = getattr(vit, "model", vit)  # ViTFeatures wraps the transformers model
    name = encoder_name(inner)
    return {"backbone": name, "backbone_weights": _model_fingerprint(inner), "random_weights": _combined(random_weights, _vit_weights(name))}


def extractor_record(extractor: Any) -> dict[str, Any]:
    """What an extractor adds to the protocol record: its class and conditioning, and what its `describe()` says
    (sdm's extractors describe their featurizer, prompt, ViT and fusion; an extractor without one adds nothing)."""
    describe = getattr(extractor, "describe", None)
    return {"extractor": type(extractor).__name__, "conditioning": extractor.conditioning, **(describe() if describe else {})}


__all__ = [
    "attention_record",
    "code_record",
    "environment_record",
    "extractor_record",
    "featurizer_of",
    "featurizer_record",
    "prompt_record",
    "protocol_id",
    "vit_record",
]
