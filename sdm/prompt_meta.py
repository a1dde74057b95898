"""What a saved prompt is on disk: `<name>.safetensors` (the learned tensors) beside `<name>.json` (its
`PromptMetadata`). Plain JSON and paths, importable without torch, so the command line checks a `--prompt`
before any model loads; `sdm.prompt_files` saves and loads the tensors."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


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


REQUIRED = ("kind", "model", "embed_dim", "shapes")  # the fields every saved prompt's JSON has
# What `sdm train` leaves in a run folder, in the order a folder given as a prompt is read: the prompt of the best
# validation, else the last step's.
RUN_PROMPTS = ("best", "prompt")


def prompt_base(path: str | Path) -> Path:
    """`path` without a .safetensors or .json suffix: the stem both files share."""
    base = Path(path)
    return base.with_suffix("") if base.suffix in (".safetensors", ".json") else base


def read_metadata(path: str | Path) -> PromptMetadata:
    """The metadata of the prompt saved at `path` (`<name>`, `<name>.safetensors` or `<name>.json`). A missing
    file or a JSON that is not a prompt's raises an error naming the file and what a prompt's JSON holds."""
    meta_path = prompt_base(path).with_name(prompt_base(path).name + ".json")
    if not meta_path.is_file():
        raise FileNotFoundError(f"no prompt metadata at {meta_path} (a prompt is saved as <name>.safetensors + <name>.json)")
    try:
        values = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{meta_path} is not an sdm prompt's metadata: not JSON ({err})") from err
    known = {f.name for f in fields(PromptMetadata)}
    if not isinstance(values, dict) or not set(REQUIRED) <= set(values) or not set(values) <= known:
        found = sorted(values) if isinstance(values, dict) else type(values).__name__
        raise ValueError(
            f"{meta_path} is not an sdm prompt's metadata (found {found}): an sdm prompt is <name>.safetensors with "
            f"<name>.json holding {', '.join(REQUIRED)} (and optional {', '.join(sorted(known - set(REQUIRED)))}), "
            "as `sdm train` and `sdm import-prompt` write them; the authors' release is read with `sdm import-prompt`"
        )
    return PromptMetadata(**values)


def find_saved_prompt(path: str | Path) -> tuple[Path, str | None]:
    """The prompt `path` names: itself, or for a training run's folder its best.* (else prompt.*), with a note
    saying which file was taken. FileNotFoundError when neither is there."""
    folder = Path(path)
    if not folder.is_dir():
        return prompt_base(path), None
    for name in RUN_PROMPTS:
        if (folder / f"{name}.safetensors").is_file() and (folder / f"{name}.json").is_file():
            why = "the best validation" if name == "best" else "the last step; no best.safetensors (trained without validation)"
            return folder / name, f"--prompt {path} is a run folder: using {folder / name}.safetensors ({why})"
    raise FileNotFoundError(
        f"--prompt {path}: a folder without a saved prompt (a training run's folder holds best.safetensors or "
        "prompt.safetensors, each with its .json)"
    )


__all__ = ["RUN_PROMPTS", "PromptMetadata", "find_saved_prompt", "prompt_base", "read_metadata"]
