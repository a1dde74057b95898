"""Evaluation: any feature extractor and matcher (or any point predictor) on any dataset split -> PCK tables.

Features of prompts that depend on one image (or on nothing, or on the category) are computed once per image
and reused for every pair that image is in; pair-conditioned prompts (CPM) get features per pair, with the
VAE latents still computed once per image.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from sdm.attention import AttentionMatcher
from sdm.data import OriginalLoader, Pair, PairBatch, PairDataset, collate_pairs, decoding, spread_subset
from sdm.encoders import encoder_name
from sdm.features import SDFeaturizer
from sdm.matching import (
    Matcher,
    Similarity,
    correlation,
    match,
    sample_features,
    to_feature_coords,
    to_image_coords,
)
from sdm.metrics import (
    ALPHAS,
    CATEGORY_MEAN,
    Frame,
    frame_scale,
    pair_facts,
    pck_table,
    point_records,
    threshold_of,
)
from sdm.prompts import Conditioning, PromptModule, originals_for

if TYPE_CHECKING:
    from accelerate import PartialState

Predictor = Callable[[PairBatch], torch.Tensor]  # batch -> B x K x 2 predicted target pixels


class FeatureExtractor(Protocol):
    """What `evaluate` needs from a feature extractor.

    conditioning: "fixed", "category" or "image" -> `image_features` is used and cached per image;
    "pair" -> `pair_features`. `originals` loads an image as stored by its id, for prompts that look at it
    (CPM's DINOv2 input); extractors that do not need it ignore it. An extractor may set `similarity` ("cosine"
    when absent, `sdm.matching.Similarity`): how `evaluate` scores its features (`similarity_of`).
    """

    conditioning: Conditioning

    def image_features(
        self, images: torch.Tensor, categories: list[str], ids: list[str], originals: OriginalLoader | None = None
    ) -> torch.Tensor:
        """B x 3 x H x W in [0, 1] -> B x C x h x w."""
        ...

    def pair_features(
        self,
        src: torch.Tensor,
        trg: torch.Tensor,
        categories: list[str],
        src_ids: list[str],
        trg_ids: list[str],
        originals: OriginalLoader | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Two B x 3 x H x W batches -> two B x C x h x w batches."""
        ...


def similarity_of(extractor: object) -> Similarity:
    """How an extractor's features are scored: its `similarity` attribute, "cosine" when it has none."""
    return getattr(extractor, "similarity", "cosine")


class _LRU(OrderedDict):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def put(self, key: Hashable, value: torch.Tensor) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)

    def get_(self, key: Hashable) -> torch.Tensor | None:
        if key in self:
            self.move_to_end(key)
            return self[key]
        return None


class SDExtractor:
    """Stable Diffusion features under a prompt module; the VAE posterior is cached per image id.

    Each image's posterior draw and diffusion noise are seeded by its id (`SDFeaturizer`), so an image's features
    are the same in every pair and every batch it appears in, and differ in their noise from every other image's.
    `similarity` is how `evaluate` scores them: "cosine" (the learned prompts' evaluation) or "dot".
    """

    def __init__(
        self, featurizer: SDFeaturizer, prompt: PromptModule, latent_cache: int = 4096, similarity: Similarity = "cosine"
    ) -> None:
        self.featurizer = featurizer
        self.prompt = prompt
        self.conditioning: Conditioning = prompt.conditioning
        self.similarity = similarity  # "dot": the code's config/dift.py (ENABLE_L2_NORM = False); docs/choices.md
        self._posteriors = _LRU(latent_cache)

    def latents(self, images: torch.Tensor, ids: Sequence[str], generator: torch.Generator | None = None) -> torch.Tensor:
        """B x 4 x h x w VAE latents, encoding only the images not seen before (in one batch); the posterior draw
        is seeded by the image id, or fresh from `generator` (training)."""
        posterior = self.posteriors(ids, lambda idx: images[idx])
        return self.featurizer.sample_latents(posterior, ids, generator)

    def posteriors(self, ids: Sequence[str], images_at: Callable[[list[int]], torch.Tensor]) -> torch.Tensor:
        """B x 2C x h x w posteriors (`SDFeaturizer.encode_posterior`) of the images `ids`, cached by id.
        `images_at(indices)` gives only the images to encode, so cached ones are never copied or moved."""
        missing = sorted({key: i for i, key in reversed(list(enumerate(ids))) if key not in self._posteriors}.values())
        found = {ids[i]: self.featurizer.encode_posterior(images_at([i]))[0] for i in missing}
        # one image per VAE call: batched kernels round differently at other batch sizes, and an image's posterior
        # must be the same bits whichever batch (or evaluation process) meets it first
        found.update((key, self._posteriors.get_(key)) for key in ids if key not in found)
        for key in ids:
            self._posteriors.put(key, found[key])
        return torch.stack([found[key] for key in ids])

    @torch.no_grad()
    def image_features(
        self, images: torch.Tensor, categories: list[str], ids: list[str], originals: OriginalLoader | None = None
    ) -> torch.Tensor:
        dev = self.featurizer.device
        prompt = self.prompt.image_prompt(self.featurizer, images.to(dev), categories, originals_for(self.prompt, ids, originals))
        return self.featurizer.features_from_latents(self.latents(images, ids), prompt, keys=ids)

    @torch.no_grad()
    def pair_features(
        self,
        src: torch.Tensor,
        trg: torch.Tensor,
        categories: list[str],
        src_ids: list[str],
        trg_ids: list[str],
        originals: OriginalLoader | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.featurizer.device
        orig = (originals_for(self.prompt, src_ids, originals), originals_for(self.prompt, trg_ids, originals))
        p_src, p_trg = self.prompt.pair_prompts(self.featurizer, src.to(dev), trg.to(dev), categories, orig)  # type: ignore[arg-type]
        b = src.shape[0]
        h_src = self.featurizer.encode_prompt(p_src, b)
        h_trg = h_src if p_trg is p_src else self.featurizer.encode_prompt(p_trg, b)  # CPM: one prompt per pair
        hidden = torch.cat([h_src, h_trg])
        ids = [*src_ids, *trg_ids]
        lat = self.latents(torch.cat([src, trg]), ids)
        feats = self.featurizer.features_from_latents(lat, hidden, keys=ids)  # both images of all pairs in one UNet batch
        return feats[:b], feats[b:]


class ModuleExtractor:
    """Any module mapping images B x 3 x H x W in [0, 1] to B x C x h x w, with no prompt (conditioning "fixed")."""

    conditioning: Conditioning = "fixed"

    def __init__(self, module: nn.Module, device: torch.device | str | None = None) -> None:
        self.module = module.eval()
        self.device = torch.device(device) if device else next(module.parameters()).device

    @torch.no_grad()
    def image_features(
        self, images: torch.Tensor, categories: list[str], ids: list[str], originals: OriginalLoader | None = None
    ) -> torch.Tensor:
        return self.module(images.to(self.device))

    def pair_features(
        self,
        src: torch.Tensor,
        trg: torch.Tensor,
        categories: list[str],
        src_ids: list[str],
        trg_ids: list[str],
        originals: OriginalLoader | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.image_features(torch.cat([src, trg]), categories * 2, [*src_ids, *trg_ids])
        return feats[: src.shape[0]], feats[src.shape[0] :]


ViTPixels = Literal["imagenet", "vae"]


class ViTFeatures(nn.Module):
    """Patch tokens of a transformers ViT (DINO `ViTModel`, DINOv2 `Dinov2Model`) as a dense map.

    images B x 3 x H x W in [0, 1] -> B x C x h x w: the images resized to (p h) x (p w), p the patch size, with
    (h, w) the `grid` of the call or `image_size / p` on both sides. The paper's Table 2 zero-shot baselines:
    DINO ViT-B/8 and DINOv2 ViT-B/14 (`load_vit`).

    pixels: "imagenet": bicubic (antialiased), ImageNet mean and std, as the models were trained; "vae": the
        SD4Match code's FUSE_DINO input, the VAE's input x * 2 - 1 in [-1, 1] resized bilinearly without
        antialiasing, i.e. torchvision 0.14's `TF.resize` of a tensor (`sd_feature_extractor.py:134`).
    """

    def __init__(self, model: nn.Module, image_size: int | None = 224, layer: int | None = None, pixels: ViTPixels = "imagenet") -> None:
        super().__init__()
        patch = int(model.config.patch_size)
        if image_size is not None and image_size % patch:
            raise ValueError(f"image_size {image_size} must be a multiple of the patch size {patch}")
        if pixels not in ("imagenet", "vae"):
            raise ValueError(f"unknown pixels {pixels!r}; choose 'imagenet' or 'vae'")
        self.model = model.requires_grad_(False).eval()
        self.patch, self.image_size, self.layer, self.pixels = patch, image_size, layer, pixels
        self.grid = image_size // patch if image_size is not None else None

    @torch.no_grad()
    def forward(self, images: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        from sdm.encoders import IMAGENET_MEAN, IMAGENET_STD, normalise_images

        if grid is None and self.grid is None:
            raise ValueError("ViTFeatures(image_size=None) needs the grid of each call: vit(images, grid=(h, w))")
        gh, gw = (int(grid[0]), int(grid[1])) if grid is not None else (self.grid, self.grid)
        size = (gh * self.patch, gw * self.patch)
        if self.pixels == "imagenet":
            x = normalise_images(images, size, IMAGENET_MEAN, IMAGENET_STD)
        else:
            x = F.interpolate(images.float() * 2 - 1, size=size, mode="bilinear", align_corners=False, antialias=False)
        x = x.to(next(self.model.parameters()).dtype)
        kwargs: dict[str, Any] = {"interpolate_pos_encoding": True} if "interpolate_pos_encoding" in self.model.forward.__code__.co_varnames else {}
        out = self.model(pixel_values=x, output_hidden_states=self.layer is not None, **kwargs)
        tokens = out.last_hidden_state if self.layer is None else out.hidden_states[self.layer]
        patches = tokens[:, -gh * gw :]  # drop CLS (and register tokens, if any)
        return patches.transpose(1, 2).reshape(x.shape[0], -1, gh, gw).float()


def load_vit(name: str, *, device: torch.device | str | None = None) -> nn.Module:
    """A transformers backbone by hub id or folder, e.g. "facebook/dino-vitb8" or "facebook/dinov2-base"."""
    from transformers import AutoModel

    try:
        return AutoModel.from_pretrained(name).to(device or "cpu").eval()
    except Exception as err:
        raise RuntimeError(f"Could not load {name!r}: {err}\nDownload it where there is network and pass the folder.") from err


@dataclass
class EvalResult:
    """Per-category PCK (`table`, see `metrics.pck_table`), the per-point `records`, and run facts (`info`, with
    the protocol record under "protocol")."""

    table: pd.DataFrame
    records: pd.DataFrame
    info: dict[str, Any] = field(default_factory=dict)

    def save(self, out_dir: str | Path, name: str, *, overwrite: bool = False) -> Path:
        """Writes <name>_pck.csv, <name>_points.csv (each headed by `# protocol: {...}`, and by a random-weights
        warning where that applies) and <name>.json (table + info) into out_dir. Read the CSVs with
        `pandas.read_csv(path, comment="#")`. Existing files are not replaced unless `overwrite` (FileExistsError)."""
        out = Path(out_dir)
        paths = [out / f"{name}_pck.csv", out / f"{name}_points.csv", out / f"{name}.json"]
        existing = [str(p) for p in paths if p.exists()]
        if existing and not overwrite:
            raise FileExistsError(f"{existing[0]} exists; remove it, choose another name, or pass overwrite=True")
        out.mkdir(parents=True, exist_ok=True)
        protocol = self.info.get("protocol", {})
        header = f"# protocol: {json.dumps(protocol, sort_keys=True)}\n"
        if protocol.get("random_weights"):
            header = f"# {RANDOM_WEIGHTS_NOTE}\n" + header
        # PCK in % to 0.01, distances and thresholds in pixels to 0.001 (the JSON keeps full precision)
        for frame, path, index in ((self.table.round(2), paths[0], True), (self.records.round(3), paths[1], False)):
            path.write_text(header + frame.to_csv(index=index))
        payload = {"info": self.info, "pck": json.loads(self.table.to_json(orient="index"))}
        (out / f"{name}.json").write_text(json.dumps(payload, indent=2))
        return out / f"{name}.json"


RANDOM_WEIGHTS_NOTE = "random weights: these numbers only show that the pipeline runs"


def protocol_id(protocol: dict[str, Any]) -> str:
    """8 hex digits naming a protocol record (results of different protocols get different file names)."""
    return hashlib.blake2b(json.dumps(protocol, sort_keys=True, default=str).encode(), digest_size=4).hexdigest()


def standard_threshold(dataset: PairDataset) -> str | None:
    """The dataset's standard threshold mode (`metrics.THRESHOLDS`); None for datasets that set their own."""
    return getattr(dataset, "threshold_mode", None)


def evaluate_predictions(
    dataset: PairDataset,
    predict: Predictor,
    *,
    batch_size: int = 8,
    num_workers: int = 0,
    alphas: Sequence[float] = ALPHAS,
    max_pairs: int | None = None,
    threshold: str | None = None,
    frame: Frame = "resized",
    progress: bool = True,
    desc: str = "evaluate",
    decode_images: bool = True,
    processes: PartialState | None = None,
) -> EvalResult:
    """PCK of any predictor of target points (pixels of the resized target) over a dataset.

    Args:
        max_pairs: evaluate a subset of this many pairs, spread evenly over the split (`spread_subset`: every
            category is covered); None: all pairs.
        threshold: a mode of `sdm.metrics.THRESHOLDS`; None: the dataset's standard (`threshold_mode`).
        frame: "resized" (distances and thresholds in the network's input pixels, SD4Match) or "original"
            (in the stored image's pixels, DIFT's SPair-71k script).
        decode_images: False gives batches with empty images (for predictors that need only keypoints and ids).
        processes: Accelerate's process state (`accelerate.PartialState()` under `accelerate launch`). With
            several processes each one predicts a contiguous run of whole batches (so every batch is the one a
            single process would form) and every process returns the gathered result, in the single-process
            order; all processes must call this together.
    """
    pairs = decoding(spread_subset(dataset, max_pairs), decode_images)
    n = len(pairs)
    if n == 0:
        raise ValueError("the dataset has no pairs")
    mode = threshold or standard_threshold(dataset)
    if mode is None and frame != "resized":
        raise ValueError("this dataset sets its own thresholds in the resized frame; name a threshold mode for frame='original'")
    result = _evaluate_loop(pairs, predict, batch_size, num_workers, alphas, progress, desc, mode, frame, processes)
    total = getattr(pairs, "of", n)
    chosen = "all pairs" if n == total else f"{n} of {total} pairs spread evenly over the split (sdm.data.spread_subset)"
    result.info["protocol"] = {
        "pairs": n,
        "split_pairs": total,
        "subset": chosen,
        "threshold": mode or "the dataset's own",
        "frame": frame,
        "alphas": [float(a) for a in alphas],
        "averaging": "per image (mean over a pair's points, then over pairs) and per point; overall over pairs "
        "('all') and over categories ('mean of categories')",
        "sdm_version": _sdm_version(),
        "git_commit": _git_commit(),
    }
    return result


def _evaluate_loop(
    pairs: Any,
    predict: Predictor,
    batch_size: int,
    num_workers: int,
    alphas: Sequence[float],
    progress: bool,
    desc: str,
    mode: str | None,
    frame: Frame,
    processes: PartialState | None,
) -> EvalResult:
    size = tuple(pairs.image_size)
    rank, world = (processes.process_index, processes.num_processes) if processes is not None else (0, 1)
    batches = -(-len(pairs) // batch_size)
    first, last = (batches * r // world * batch_size for r in (rank, rank + 1))
    shard = Subset(pairs, range(first, min(last, len(pairs))))
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_pairs)
    frames, start = [], time.perf_counter()
    for batch in tqdm(loader, desc=desc, disable=not progress or rank > 0, unit="batch"):
        pred = predict(batch).float().cpu()
        if pred.shape != batch.trg_kps.shape:
            raise ValueError(f"the predictor returned {tuple(pred.shape)}, expected {tuple(batch.trg_kps.shape)} (B x K x 2)")
        gt, thresholds = batch.trg_kps.clone(), batch.threshold.clone()
        if mode is not None:
            for b in range(len(batch)):
                k = int(batch.n_kps[b])
                facts = pair_facts(
                    batch.src_kps[b, :k], batch.trg_kps[b, :k], batch.extra[b], batch.src_sizes[b], batch.trg_sizes[b], size, frame
                )
                thresholds[b] = threshold_of(facts, mode)
                scale = frame_scale(batch.trg_sizes[b], size, frame)
                pred[b], gt[b] = pred[b] * scale, gt[b] * scale
        frames.append(point_records(pred, gt, batch.n_kps, thresholds, batch.categories, batch.pair_ids))
    seconds = time.perf_counter() - start
    if world > 1:
        from accelerate.utils import gather_object

        shards = gather_object([(frames, seconds)])  # in rank order, i.e. in pair order
        frames = [f for part, _ in shards for f in part]
        seconds = max(t for _, t in shards)
    records = pd.concat(frames, ignore_index=True)
    info = {"pairs": len(pairs), "seconds": round(seconds, 3), "pairs_per_second": round(len(pairs) / seconds, 3)}
    return EvalResult(pck_table(records, alphas), records, info)


def _sdm_version() -> str:
    import sdm

    return sdm.__version__


@functools.cache
def _git_commit() -> str | None:
    """The commit of the sdm checkout this code runs from (None when installed without git)."""
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def model_fingerprint(*modules: nn.Module) -> str:
    """A short hash of the modules' parameters (names, shapes, and the first 64 values of each), enough to tell
    two sets of weights apart."""
    h = hashlib.blake2b(digest_size=8)
    for module in modules:
        for name, param in module.named_parameters():
            h.update(f"{name}:{tuple(param.shape)}".encode())
            h.update(param.detach().flatten()[:64].float().cpu().numpy().tobytes())
    return h.hexdigest()


def model_record(sd: Any) -> dict[str, Any]:
    """Model id, a fingerprint of its UNet, text encoder and VAE weights, and whether they are random."""
    return {
        "model": sd.name, "weights": model_fingerprint(sd.unet, sd.text_encoder, sd.vae), "random_weights": bool(sd.random_weights)
    }


def attention_record(matcher: AttentionMatcher) -> dict[str, Any]:
    """What Hedlin et al.'s matcher adds to the protocol record: model, weights, every setting but the progress bar."""
    params = {k: v for k, v in dataclasses.asdict(matcher.config).items() if k != "progress"}
    return {"matcher": "attention", "matcher_params": json.loads(json.dumps(params, default=list)), **model_record(matcher.sd)}


def extractor_record(extractor: Any) -> dict[str, Any]:
    """What an extractor adds to the protocol record: model id, weights fingerprint, timestep, ensemble, ..."""
    featurizer = getattr(extractor, "featurizer", None) or getattr(getattr(extractor, "sd_extractor", None), "featurizer", None)
    record: dict[str, Any] = {"extractor": type(extractor).__name__, "conditioning": extractor.conditioning}
    if featurizer is not None:
        record.update(
            **model_record(featurizer.sd),
            timestep=featurizer.timestep, ensemble=featurizer.ensemble, image_size=list(featurizer.image_size),
            up_block=featurizer.up_block, seed=featurizer.seed, latent=featurizer.latent,
        )
    vit = getattr(extractor, "vit", None) or getattr(extractor, "module", None)  # FusedExtractor's / ModuleExtractor's
    if vit is not None:
        inner = getattr(vit, "model", vit)  # ViTFeatures wraps the transformers model
        name = encoder_name(inner)
        record.update(
            backbone=name, backbone_weights=model_fingerprint(inner),
            random_weights=bool(record.get("random_weights")) or name == "random weights (tiny)",
        )
    prompt = getattr(extractor, "prompt", None) or getattr(getattr(extractor, "sd_extractor", None), "prompt", None)
    if prompt is not None:
        record.update(prompt=prompt.kind, prompt_config=prompt.config())
    fusion = getattr(extractor, "fusion", None)
    if fusion is not None:
        record["fusion"] = json.loads(json.dumps(dataclasses.asdict(fusion.config)))
    return record


def feature_keys(pairs: Any, conditioning: Conditioning) -> dict[Hashable, tuple[str, str]]:
    """Feature-cache keys of the pairs' images in order of first use (image id; (id, category) for category
    prompts), each with its (image id, category). Reads only annotations (images are not decoded)."""
    pairs = decoding(pairs, False)
    seen: dict[Hashable, tuple[str, str]] = {}
    for i in range(len(pairs)):
        p = pairs[i]
        for image_id in (p.src_id, p.trg_id):
            seen.setdefault((image_id, p.category) if conditioning == "category" else image_id, (image_id, p.category))
    return seen


def feature_predictor(
    extractor: FeatureExtractor,
    dataset: PairDataset,
    *,
    matcher: Matcher = "kernel_soft_argmax",
    temperature: float = 0.04,
    sigma: float = 7.0,
    feature_cache: int = 256,
    pairs: Any = None,
    group: int = 16,
    similarity: Similarity | None = None,
) -> Predictor:
    """A predictor that matches source keypoints into target features.

    Per-image features live in an LRU cache keyed by image id (and category for category prompts); images
    are loaded from `dataset` only on a cache miss, so every image is decoded and encoded about once (the
    datasets list pairs category by category).

    Args:
        pairs: the pairs that will be evaluated (default: `dataset`). Their images, in order of first use, are
            cut into fixed groups of `group`; a miss computes its whole group in one batch. The batches the
            network sees then depend only on the pairs, not on the order or the process that asks first, so a
            sharded evaluation equals a single-process one to the last digit.
        similarity: how features are scored; None: the extractor's (`similarity_of`).
    """
    similarity = similarity or similarity_of(extractor)
    cache = _LRU(feature_cache)
    size = tuple(dataset.image_size)
    per_image = extractor.conditioning != "pair"
    planned = feature_keys(dataset if pairs is None else pairs, extractor.conditioning) if per_image else {}
    order = list(planned)
    groups = {k: order[i - i % group : i - i % group + group] for i, k in enumerate(order)}

    def key_of(image_id: str, category: str) -> Hashable:
        return (image_id, category) if extractor.conditioning == "category" else image_id

    def compute(keys: list[Hashable]) -> dict[Hashable, torch.Tensor]:
        ids, categories = (list(column) for column in zip(*(planned[k] for k in keys)))
        images = torch.stack([dataset.load_image(i) for i in ids])
        feats = extractor.image_features(images, categories, ids, dataset.original_image)
        return dict(zip(keys, feats))

    def image_feats(ids: list[str], categories: list[str]) -> torch.Tensor:
        keys = [key_of(i, c) for i, c in zip(ids, categories)]
        for k, i, c in zip(keys, ids, categories):
            planned.setdefault(k, (i, c))  # pairs outside the plan are computed on their own
        found: dict[Hashable, torch.Tensor] = {}
        for k in keys:
            if k in found:
                continue
            hit = cache.get_(k)
            if hit is not None:
                found[k] = hit
                continue
            fresh = compute(list(groups.get(k, [k])))
            for key, f in fresh.items():
                cache.put(key, f)
            found.update((key, f) for key, f in fresh.items() if key in keys)
        return torch.stack([found[k] for k in keys]).float()

    def predict(batch: PairBatch) -> torch.Tensor:
        b = len(batch)
        if per_image:
            both = image_feats([*batch.src_ids, *batch.trg_ids], batch.categories * 2)
            src, trg = both[:b], both[b:]
        else:
            src, trg = extractor.pair_features(
                batch.src_image, batch.trg_image, batch.categories, batch.src_ids, batch.trg_ids, dataset.original_image
            )
        query = to_feature_coords(batch.src_kps.to(src.device), size, tuple(src.shape[-2:]))
        cells = match(src.float(), trg.float(), query, matcher, temperature=temperature, sigma=sigma, similarity=similarity)
        return to_image_coords(cells, tuple(trg.shape[-2:]), size)

    return predict


def pair_correlation(
    extractor: FeatureExtractor, pair: Pair, k: int, matcher: Matcher = "kernel_soft_argmax"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the first `k` source points of one pair land: their similarity maps over the target's features
    (k x h x w, CPU; cosine in [-1, 1] unless the extractor scores by "dot", `similarity_of`) and their matches
    (k x 2 target pixels in the pair's resized frame, CPU)."""
    src, trg = pair.src_image[None], pair.trg_image[None]
    if extractor.conditioning == "pair":
        src_f, trg_f = extractor.pair_features(src, trg, [pair.category], [pair.src_id], [pair.trg_id])
    else:
        both = extractor.image_features(torch.cat([src, trg]), [pair.category] * 2, [pair.src_id, pair.trg_id])
        src_f, trg_f = both[:1], both[1:]
    src_f, trg_f = src_f.float(), trg_f.float()
    size, fsize = tuple(pair.src_image.shape[-2:]), tuple(src_f.shape[-2:])
    query = to_feature_coords(pair.src_kps[:k].to(src_f.device), size, fsize)[None]
    similarity = similarity_of(extractor)
    maps = correlation(sample_features(src_f, query), trg_f, similarity)[0].cpu()
    cells = match(src_f, trg_f, query, matcher, similarity=similarity)[0].cpu()
    pred = to_image_coords(cells, fsize, tuple(pair.trg_image.shape[-2:]))
    return maps, pred


def evaluate(
    extractor: FeatureExtractor,
    dataset: PairDataset,
    *,
    matcher: Matcher = "kernel_soft_argmax",
    batch_size: int = 8,
    num_workers: int = 0,
    alphas: Sequence[float] = ALPHAS,
    max_pairs: int | None = None,
    threshold: str | None = None,
    frame: Frame = "resized",
    progress: bool = True,
    feature_cache: int = 256,
    desc: str = "evaluate",
    temperature: float = 0.04,
    sigma: float = 7.0,
    processes: PartialState | None = None,
    similarity: Similarity | None = None,
) -> EvalResult:
    """PCK of features + matcher over a dataset (per image and per point, per category and overall).

    Args:
        extractor: `SDExtractor`, `ModuleExtractor` or anything with the `FeatureExtractor` methods.
        matcher: "nearest", "soft_argmax" or "kernel_soft_argmax" (the paper's).
        feature_cache: how many images' features to keep (per-image conditioning only).
        max_pairs, threshold, frame: the protocol (`evaluate_predictions`); the result's info["protocol"]
            records it with the extractor's settings.
        processes: `accelerate.PartialState()` to spread the pairs over processes (`evaluate_predictions`);
            the extractor of each process lives on its own device (`processes.device`).
        similarity: "cosine" or "dot"; None: the extractor's (`similarity_of`; "dot" for `FusedExtractor`'s
            default fusion, as the SD4Match code scores it).
    """
    similarity = similarity or similarity_of(extractor)
    pairs = spread_subset(dataset, max_pairs)
    predict = feature_predictor(
        extractor, dataset, matcher=matcher, feature_cache=feature_cache, temperature=temperature, sigma=sigma, pairs=pairs,
        similarity=similarity,
    )  # fmt: skip
    result = evaluate_predictions(
        pairs,
        predict,
        batch_size=batch_size,
        num_workers=num_workers,
        alphas=alphas,
        threshold=threshold,
        frame=frame,
        progress=progress,
        desc=desc,
        decode_images=extractor.conditioning == "pair",  # per-image features load their images through the cache
        processes=processes,
    )
    result.info.update({"matcher": matcher, "conditioning": extractor.conditioning})
    matcher_params: dict[str, Any] = {"temperature": temperature, "sigma": sigma} if matcher != "nearest" else {}
    if similarity != "cosine":  # recorded only when it is not the default, so existing protocol ids stay the same
        matcher_params["similarity"] = similarity
    result.info["protocol"].update(matcher=matcher, matcher_params=matcher_params, **extractor_record(extractor))
    return result


def stored_predictor(predictions: dict[str, torch.Tensor]) -> Predictor:
    """A predictor that answers from predictions made before, keyed by pair id (K x 2 resized pixels each): to
    score the same predictions under several protocols with `evaluate_predictions(..., decode_images=False)`."""

    def predict(batch: PairBatch) -> torch.Tensor:
        out = torch.zeros_like(batch.trg_kps)
        for b, pair_id in enumerate(batch.pair_ids):
            if pair_id not in predictions:
                raise KeyError(f"no stored prediction for pair {pair_id!r}")
            k = int(batch.n_kps[b])
            out[b, :k] = predictions[pair_id][:k].to(out)
        return out

    return predict


def attention_predictor(matcher: AttentionMatcher, cache_size: int = 256) -> Predictor:
    """Hedlin et al.'s matcher as a predictor: each pair's source points are optimised and found in the target
    (images are the dataset's resized ones, so predictions are in the space of the PCK thresholds).

    The optimisation depends only on the source image, its points and the config (its random draws come from
    `config.seed`), so its embeddings are kept per (source id, points) for the next `cache_size` sources: a source
    shared by several pairs (each PF-Willow image is the source of about 9) is optimised once, with the same
    result as optimising it again."""
    cache = _LRU(cache_size)

    def predict(batch: PairBatch) -> torch.Tensor:
        out = torch.zeros_like(batch.trg_kps)
        for b in range(len(batch)):
            n = int(batch.n_kps[b])
            points = batch.src_kps[b, :n]
            key = (batch.src_ids[b], points.numpy().tobytes())
            embeddings = cache.get_(key)
            if embeddings is None:
                embeddings = matcher.optimize_embeddings(batch.src_image[b], points).embeddings
                cache.put(key, embeddings)
            out[b, :n] = matcher.transfer(batch.trg_image[b], embeddings).to(out)
        return out

    return predict


def paper_table(results: dict[str, EvalResult], column: str = "per_image@0.1") -> pd.DataFrame:
    """Methods as rows, categories (then "all") as columns, one PCK column: the layout of the paper's Table 2."""
    rows = {name: r.table[column] for name, r in results.items()}
    table = pd.DataFrame(rows).T
    cols = [c for c in table.columns if c not in ("all", CATEGORY_MEAN)] + ["all"]
    return table[cols].round(1)

