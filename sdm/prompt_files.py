"""Learned prompts on disk: safetensors weights beside a JSON of metadata (`save_prompt`, `load_prompt`), with a
check that a file fits the model it is loaded into."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sdm.encoders import PromptEncoders
from sdm.features import SDFeaturizer
from sdm.prompt_meta import PromptMetadata, prompt_base, read_metadata
from sdm.prompts import PROMPTS, PromptModule, build_prompt
from sdm.storage import atomic_write


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
    base = prompt_base(path)
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
    base = prompt_base(path)
    state = _upgrade_legacy(meta, load_file(str(base.with_name(base.name + ".safetensors"))), base)
    if meta.kind not in PROMPTS:
        raise ValueError(f"the prompt at {base} is of kind {meta.kind!r}, which no registered prompt class builds ({', '.join(PROMPTS)})")
    module = build_prompt(meta.kind, featurizer, encoders=encoders, **PROMPTS[meta.kind].options(meta.config))  # type: ignore[arg-type]
    check_fits(module, state, f"the {meta.kind!r} prompt at {base}", meta.model, meta.embed_dim, featurizer)
    return load_state(module, state)


__all__ = [
    "check_fits",
    "load_prompt",
    "load_state",
    "save_prompt",
]
