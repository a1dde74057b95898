"""What the numbered notebooks import, in one place: loaders by name, the random-weights caveat and run header,
JSON results, prompts found by their training metadata, figures saved and shown. The views (`correlation_panels`,
`point_picker`) live in `sdm.viz`, the prompt study (hidden states, generated images) in `sdm.prompt_study`; they
are re-exported here. The runner and the quick profile are in `sdm.runner`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

# Loaders by name ("tiny" = random weights) that the notebooks import from here.
from sdm.data import PairSubset as PairSubset
from sdm.data import spread_subset
from sdm.encoders import load_clip_vision as load_clip_vision
from sdm.encoders import load_dino as load_dino
from sdm.models import load_model as load_model
from sdm.prompt_study import category_embeddings, generate_images, image_stats, pair_embeddings
from sdm.viz import correlation_panels, point_picker, save_figure


# ---- helpers the notebooks share ---------------------------------------------------------------------------------
def caveat(random_weights: bool) -> str:
    """Suffix for titles and printouts of numbers from a random-weight model."""
    return " (random weights: numbers meaningless)" if random_weights else ""


subset = spread_subset  # the name the notebooks use


def run_header(sd: Any, random_note: str = "the numbers only show the pipeline runs") -> dict[str, Any]:
    """The first keys of every notebook's results JSON: the model, whether its weights are random, and a note
    saying what that means for the numbers ("" for real weights)."""
    random = bool(sd.random_weights)
    return {"model": sd.name, "random_weights": random, "note": f"random-weight model: {random_note}" if random else ""}


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Writes JSON (NaN as null), creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(payload), indent=2))
    return path


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return _clean(value.item())
    return value


def learned_prompt(
    sd: Any,
    *,
    kind: str,
    path: str | Path | None,
    train_steps: int,
    dataset: str,
    data_root: str | None,
    image_size: int,
    out_dir: str | Path,
    train_split: str = "trn",
    train_pairs: int | None = None,
    batch_size: int = 9,
    mixed_precision: str = "fp16",
    encoders: Any = None,
    cpm: dict[str, Any] | None = None,
    progress: bool = False,
    **train_options: Any,
) -> tuple[Any, str]:
    """A learned prompt for the notebooks: loaded from `path` when given, else trained here for `train_steps`
    steps (0: the untrained initial prompt). `train_options` go to `TrainConfig` (lr, timestep, ...).
    Returns (prompt module, a label saying which of the three it is)."""
    from sdm.data import load_dataset
    from sdm.features import SDFeaturizer
    from sdm.prompt_files import load_prompt
    from sdm.prompts import CPMConfig, build_prompt
    from sdm.train import TrainConfig, train

    featurizer = SDFeaturizer(sd, image_size=image_size)
    if path is not None:
        return load_prompt(path, featurizer, encoders=encoders), f"{kind}: loaded from {Path(path).name}"
    train_set = subset(load_dataset(dataset, data_root, split=train_split, image_size=image_size), train_pairs)
    if train_steps <= 0:
        module = build_prompt(kind, featurizer, categories=train_set.categories, encoders=encoders, cpm=CPMConfig(**(cpm or {})))  # type: ignore[arg-type]
        return module, f"{kind}: untrained (initial vectors)"
    cfg = TrainConfig(
        prompt=kind,  # type: ignore[arg-type]
        cpm=CPMConfig(**(cpm or {})),
        steps=int(train_steps),
        batch_size=batch_size,
        image_size=image_size,
        mixed_precision=mixed_precision,  # type: ignore[arg-type]
        val_every=0,
        checkpoint_every=max(int(train_steps), 1),
        log_every=max(1, int(train_steps) // 20),
        num_workers=0,
        **train_options,
    )
    # the notebook's own scratch run: rerunning the notebook retrains it
    result = train(cfg, sd, train_set, None, out_dir=out_dir, encoders=encoders, overwrite=True, progress=progress)
    return result.prompt, f"{kind}: trained here for {train_steps} steps"


# PCK@0.1 per image of SD4Match's Tables 2 and 3 (SD2-1, 768 px): evaluation dataset -> method -> overall.
PAPER_PCK: dict[str, dict[str, float]] = {
    "spair": {"DIFT": 52.9, "single": 72.6, "class": 75.5, "cpm": 75.5},
    "pfpascal": {"single": 92.4, "cpm": 95.2},
    "pfwillow": {"single": 77.8, "cpm": 80.4},
}
# Which training dataset's prompts the paper evaluates on each dataset (PF-Willow has no training split).
PAPER_TRAINED_ON: dict[str, str] = {"spair": "spair", "pfpascal": "pfpascal", "pfwillow": "pfpascal"}


def _prompt_trained_on(meta: Any) -> str | None:
    """The training dataset recorded in a prompt's metadata (trained by sdm, or imported from the release)."""
    if meta.trained_on:
        return meta.trained_on.get("dataset")
    return (meta.source or {}).get("train_dataset")


def find_prompt(folder: str | Path, kind: str, trained_on: str) -> Path:
    """The learned prompt of `kind` trained on `trained_on` in `folder`, found by its metadata: what notebook 02
    writes (02_KIND_DATASET_prompt.*) or what `sdm import-prompt` writes (the released prompts). Where several
    fit (the release has CPM variants), the one with the paper's default settings is taken."""
    from sdm.prompt_files import read_metadata
    from sdm.prompts import CPMConfig

    folder = Path(folder)
    found = []
    for meta_path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            meta = read_metadata(meta_path)
        except (ValueError, KeyError):
            continue  # another JSON file (results)
        if meta.kind == kind and _prompt_trained_on(meta) == trained_on and meta_path.with_suffix(".safetensors").is_file():
            found.append((meta_path.with_suffix(".safetensors"), meta))
    if len(found) > 1 and kind == "cpm":
        paper = asdict(CPMConfig())
        keys = ("n_global", "n_cond", "descriptor", "condition", "global_prompt")
        found = [(path, meta) for path, meta in found if all(meta.config.get("cpm", {}).get(k) == paper[k] for k in keys)] or found
    if len(found) == 1:
        return found[0][0]
    if not found:
        raise FileNotFoundError(
            f"no {kind} prompt trained on {trained_on} in {folder}/: run notebook 02 with runs including ({kind!r}, {trained_on!r}) "
            f"(or `sdm train --prompt {kind} --dataset {trained_on}`), or import the authors' prompts with "
            "`sdm import-prompt pretrained_prompts.zip --out prompts/released` and pass that folder"
        )
    raise ValueError(f"several {kind} prompts trained on {trained_on} in {folder}/: {[p.name for p, _ in found]}; pass one path")


def keep_trained(trained: dict[tuple[str, str], Any], results_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Notebook 02's results: for each (kind, dataset) -> `TrainResult`, its chosen prompt (best.*, else prompt.*)
    copied to results_dir/02_KIND_DATASET_prompt.* (where notebooks 01, 03, 05-07 find it) and its log.csv to
    02_train_KIND_DATASET_log.csv; returns per run what was trained and chosen, for the results JSON."""
    import shutil

    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    runs = {}
    for (kind, name), result in trained.items():
        chosen = result.out_dir / ("best" if result.best_step is not None else "prompt")
        target = results_dir / f"02_{kind}_{name}_prompt"
        for ext in (".safetensors", ".json"):
            shutil.copyfile(chosen.with_suffix(ext), target.with_suffix(ext))
        shutil.copyfile(result.out_dir / "log.csv", results_dir / f"02_train_{kind}_{name}_log.csv")  # says so if weights are random
        log = result.log
        runs[f"{kind}_{name}"] = {
            "prompt": kind, "dataset": name, "steps": int(log["step"].max()) if len(log) else 0,
            "loss_first": float(log["loss"].iloc[0]), "loss_last": float(log["loss"].iloc[-1]),
            "val_pck": {int(s): float(v) for s, v in zip(log["step"], log["val_pck"]) if v == v},
            "best_pck": result.best_pck, "best_step": result.best_step,
            "prompt_path": str(target.with_suffix(".safetensors")), "selected": chosen.name, "run_dir": str(result.out_dir),
        }  # fmt: skip
    return runs


def show(fig: Any, path: str | Path) -> Path:
    """Saves a figure (`viz.save_figure`, which closes it) and displays the saved PNG in a notebook."""
    out = save_figure(fig, path)
    try:
        from IPython import get_ipython
        from IPython.display import Image, display

        if get_ipython() is not None:
            display(Image(filename=str(out)))
    except ImportError:
        pass
    return out


__all__ = [
    "PAPER_PCK",
    "PAPER_TRAINED_ON",
    "category_embeddings",
    "caveat",
    "correlation_panels",
    "find_prompt",
    "generate_images",
    "image_stats",
    "keep_trained",
    "learned_prompt",
    "pair_embeddings",
    "point_picker",
    "run_header",
    "show",
    "subset",
    "write_json",
]
