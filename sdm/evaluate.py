"""Evaluation: any feature extractor and matcher (or any point predictor) on any dataset split -> PCK tables.

Features of prompts that depend on one image (or on nothing, or on the category) are computed once per image
and reused for every pair that image is in; pair-conditioned prompts (CPM) get features per pair, with the
VAE latents still computed once per image. Extractors: `sdm.extractors`; predictors: `sdm.predictors`; the
protocol record: `sdm.records`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import pandas as pd
import torch
from torch.profiler import record_function
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from sdm.data import Pair, PairBatch, PairDataset, collate_pairs, decoding, spread_subset
from sdm.extractors import FeatureExtractor, FeatureStore, ImageBatch, per_image_pair_features, similarity_of
from sdm.matching import (
    MatchConfig,
    Matcher,
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
from sdm.predictors import Predictor, batch_images, feature_predictor, stored_predictor
from sdm.records import code_record, environment_record, extractor_record, featurizer_of, protocol_id

if TYPE_CHECKING:
    from accelerate import PartialState
    from typing_extensions import Unpack


@dataclass
class EvalResult:
    """Per-category PCK (`table`, see `metrics.pck_table`), the per-point `records`, and run facts (`info`, with
    the protocol record under "protocol")."""

    table: pd.DataFrame
    records: pd.DataFrame
    info: dict[str, Any] = field(default_factory=dict)

    def label_weights(self) -> EvalResult:
        """Labels the table when the protocol says the weights are random: the columns' name, printed at the
        table's top left, and `table.attrs["note"]` say that the numbers only show that the pipeline runs."""
        if self.info.get("protocol", {}).get("random_weights") is True:
            self.table.columns.name = f"PCK (%), {RANDOM_WEIGHTS_NOTE}"
            self.table.attrs["note"] = RANDOM_WEIGHTS_NOTE
        return self

    def overall(self, column: str = "per_image@0.1") -> float:
        """The overall PCK of one column (default: per image at alpha 0.1, the paper's number)."""
        return float(self.table.loc["all", column])

    def pck(self) -> dict[str, float]:
        """Every overall PCK column ("per_image@0.1", "per_point@0.05", ...) as floats."""
        return {c: float(v) for c, v in self.table.loc["all"].items() if "@" in c}

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
        if protocol.get("random_weights") is True:
            header = f"# {RANDOM_WEIGHTS_NOTE}\n" + header
        # PCK in % to 0.01, distances and thresholds in pixels to 0.001 (the JSON keeps full precision)
        for frame, path, index in ((self.table.round(2), paths[0], True), (self.records.round(3), paths[1], False)):
            path.write_text(header + frame.to_csv(index=index))
        payload = {"info": self.info, "pck": json.loads(self.table.to_json(orient="index"))}
        (out / f"{name}.json").write_text(json.dumps(payload, indent=2))
        return out / f"{name}.json"


RANDOM_WEIGHTS_NOTE = "random weights: these numbers only show that the pipeline runs"


def standard_threshold(dataset: PairDataset) -> str | None:
    """The dataset's standard threshold mode (`metrics.THRESHOLDS`); None for datasets that set their own."""
    return getattr(dataset, "threshold_mode", None)


def standard_frame(dataset: PairDataset) -> Frame:
    """The frame the dataset's authors measure in (`standard_frame`): "resized" unless they measure otherwise."""
    return getattr(dataset, "standard_frame", "resized")


def evaluate_predictions(
    dataset: PairDataset,
    predict: Predictor,
    *,
    batch_size: int = 8,
    num_workers: int = 0,
    alphas: Sequence[float] = ALPHAS,
    max_pairs: int | None = None,
    threshold: str | None = None,
    frame: Frame | None = None,
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
            (in the stored image's pixels, DIFT's SPair-71k script); None: the dataset's (`standard_frame`).
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
    frame = frame or standard_frame(dataset)
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
        **code_record(),
    }
    result.info["environment"] = environment_record()  # beside the protocol, not hashed into its id
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
    # Pinned batches let the predictor's copies to the GPU run while it computes (PairBatch.pin_memory).
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_pairs,
                        pin_memory=torch.cuda.is_available())

    def score(batch: PairBatch, predicted: torch.Tensor) -> pd.DataFrame:
        pred = predicted.float().cpu()
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
        return point_records(pred, gt, batch.n_kps, thresholds, batch.categories, batch.pair_ids)

    frames, start, pending = [], time.perf_counter(), None
    batches = iter(tqdm(loader, desc=desc, disable=not progress or rank > 0, unit="batch"))
    while True:
        # the phases are named for torch.profiler (benchmarks/bench.py's `gpu_gaps`): microseconds without a profiler
        with record_function("sdm.evaluate.next_batch"):
            batch = next(batches, None)
        if batch is None:
            break
        with record_function("sdm.evaluate.predict"):
            predicted = predict(batch)
        # A batch is read back (.cpu() waits for the GPU) only after the next one is queued, so the host prepares
        # the next batch while the GPU computes this one.
        if pending is not None:
            with record_function("sdm.evaluate.score"):
                frames.append(score(*pending))
        pending = (batch, predicted)
    if pending is not None:
        frames.append(score(*pending))
    seconds = time.perf_counter() - start
    if world > 1:
        from accelerate.utils import gather_object

        shards = gather_object([(frames, seconds)])  # in rank order, i.e. in pair order
        frames = [f for part, _ in shards for f in part]
        seconds = max(t for _, t in shards)
    records = pd.concat(frames, ignore_index=True)
    info = {"pairs": len(pairs), "seconds": round(seconds, 3), "pairs_per_second": round(len(pairs) / seconds, 3)}
    return EvalResult(pck_table(records, alphas), records, info)


def pair_correlation(
    extractor: FeatureExtractor, pair: Pair, k: int, matcher: Matcher | MatchConfig = "kernel_soft_argmax"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the first `k` source points of one pair land: their similarity maps over the target's features
    (k x h x w, CPU; cosine in [-1, 1] unless the features are scored by "dot", `MatchConfig.of`) and their matches
    (k x 2 target pixels in the pair's resized frame, CPU)."""
    src = ImageBatch(pair.src_image[None], [pair.category], [pair.src_id])
    trg = ImageBatch(pair.trg_image[None], [pair.category], [pair.trg_id])
    if extractor.conditioning == "pair":
        src_f, trg_f = extractor.pair_features(src, trg)
    else:
        src_f, trg_f = per_image_pair_features(extractor, src, trg)
    src_f, trg_f = src_f.float(), trg_f.float()
    size, fsize = tuple(pair.src_image.shape[-2:]), tuple(src_f.shape[-2:])
    query = to_feature_coords(pair.src_kps[:k].to(src_f.device), size, fsize)[None]
    config = MatchConfig.of(matcher, similarity_of(extractor))
    maps = correlation(sample_features(src_f, query), trg_f, config.similarity)[0].cpu()
    cells = match(src_f, trg_f, query, config)[0].cpu()
    pred = to_image_coords(cells, fsize, tuple(pair.trg_image.shape[-2:]))
    return maps, pred


class Scoring(TypedDict, total=False):
    """The keywords `evaluate` passes on to `evaluate_predictions` (meanings and defaults there)."""

    batch_size: int
    num_workers: int
    alphas: Sequence[float]
    threshold: str | None
    frame: Frame | None
    progress: bool
    desc: str
    processes: PartialState | None


def evaluate(
    extractor: FeatureExtractor,
    dataset: PairDataset,
    *,
    matcher: Matcher | MatchConfig = "kernel_soft_argmax",
    max_pairs: int | None = None,
    feature_cache: int = 256,
    store: FeatureStore | None = None,
    **scoring: Unpack[Scoring],
) -> EvalResult:
    """PCK of features + matcher over a dataset (per image and per point, per category and overall).

    Args:
        extractor: `SDExtractor`, `ModuleExtractor` or anything with the `FeatureExtractor` methods.
        matcher: "nearest", "soft_argmax" or "kernel_soft_argmax" (the paper's) with its default parameters, or a
            `sdm.matching.MatchConfig` (temperature, sigma, similarity). Its similarity None is the extractor's
            (`similarity_of`; "dot" for `FusedExtractor`'s default fusion, as the SD4Match code scores it).
        max_pairs: evaluate this many pairs spread evenly over the split (`spread_subset`); None: all.
        feature_cache: how many images' features to keep (per-image conditioning only).
        store: per-image features kept between calls (`feature_predictor`): pass one `FeatureStore` to evaluate
            the same extractor under several matchers or protocols and compute its features once.
        scoring: batch_size, num_workers, alphas, threshold, frame, progress, desc and processes, as
            `evaluate_predictions` takes them. The result's info["protocol"] records the protocol with the
            extractor's settings. With `processes` (`accelerate.PartialState()`) the pairs are spread over
            processes, and the extractor of each process lives on its own device (`processes.device`).
    """
    config = MatchConfig.of(matcher, similarity_of(extractor))
    pairs = spread_subset(dataset, max_pairs)
    predict = feature_predictor(extractor, dataset, matcher=config, feature_cache=feature_cache, pairs=pairs, store=store)
    result = evaluate_predictions(pairs, predict, decode_images=batch_images(extractor), **scoring)
    result.info.update({"matcher": config.matcher, "conditioning": extractor.conditioning})
    result.info["protocol"].update(matcher=config.matcher, matcher_params=config.params(), **extractor_record(extractor))
    featurizer = featurizer_of(extractor)
    if featurizer is not None:
        result.info["environment"]["device"] = str(featurizer.device)
    return result.label_weights()


def score_protocols(pairs: PairDataset, predictions: dict[str, torch.Tensor], modes: dict[str, str]) -> pd.DataFrame:
    """The same predictions (by pair id, `sdm.predictors.recorded`) scored under several threshold modes:
    label -> mode in `modes`; returns the labels as rows and the overall PCK columns ("per_image@0.1", ...)."""
    rows = {}
    for label, mode in modes.items():
        scored = evaluate_predictions(pairs, stored_predictor(predictions), threshold=mode, decode_images=False, progress=False)
        rows[label] = scored.pck()
    return pd.DataFrame(rows).T


def subset_pck(result: EvalResult, flags: dict[str, Sequence[bool]], name: str, alphas: Sequence[float] = ALPHAS) -> dict[str, float]:
    """PCK over a subset of the points `result` scored: `flags` maps each pair id to one flag per point (its rows
    in order). per_point@<alpha>: the subset's points pooled over the whole result, which is what weighting each
    category's per-point PCK by its subset points gives (Junyi42/GeoAware-SC pck_train.py:253-261,
    utils/logger.py:94-96). per_image@<alpha>: each pair's subset points averaged, then the pairs that have any
    (utils/eval_spair.py:354-390). Both in percent; with n_points and the shares of points and pairs the subset
    holds. Kept in `result.info["subsets"][name]` and returned."""
    records = result.records
    missing = sorted(set(records.pair_id) - set(flags))
    if missing:
        raise ValueError(f"subset {name!r} has no flags for {len(missing)} scored pair(s), e.g. {missing[0]!r}")
    points = records[[bool(flags[p][k]) for p, k in zip(records.pair_id, records.point)]]
    out: dict[str, float] = {}
    for a in alphas:
        ok = (points.dist <= a * points.threshold).astype(float)
        out[f"per_point@{a:g}"] = 100.0 * float(ok.mean()) if len(points) else float("nan")
        out[f"per_image@{a:g}"] = 100.0 * float(ok.groupby(points.pair_id).mean().mean()) if len(points) else float("nan")
    out.update(n_points=len(points), points_share=len(points) / len(records), pairs_share=points.pair_id.nunique() / records.pair_id.nunique())
    result.info.setdefault("subsets", {})[name] = out
    return out


def geo_aware_pck(result: EvalResult, dataset: PairDataset, reading: str = "authors") -> dict[str, float]:
    """`subset_pck` on GeoAware-SC's geometry-aware subset of `dataset` (a dataset with `geo_aware_flags`, e.g.
    SPair-71k with its ImageAnnotation/ folder; `reading`: "authors" or "as-listed", `sdm.data.geoaware`)."""
    if not hasattr(dataset, "geo_aware_flags"):
        raise ValueError(f"{type(dataset).__name__} defines no geometry-aware subset (SPair-71k does)")
    alphas = result.info.get("protocol", {}).get("alphas", ALPHAS)
    return subset_pck(result, dataset.geo_aware_flags(reading), f"geo-aware ({reading})", alphas)


def paper_table(results: dict[str, EvalResult], column: str = "per_image@0.1") -> pd.DataFrame:
    """Methods as rows, categories (then "all") as columns, one PCK column: the layout of the paper's Table 2."""
    rows = {name: r.table[column] for name, r in results.items()}
    table = pd.DataFrame(rows).T
    cols = [c for c in table.columns if c not in ("all", CATEGORY_MEAN)] + ["all"]
    return table[cols].round(1)


__all__ = [
    "EvalResult",
    "evaluate",
    "evaluate_predictions",
    "geo_aware_pck",
    "pair_correlation",
    "paper_table",
    "protocol_id",
    "score_protocols",
    "standard_frame",
    "standard_threshold",
    "subset_pck",
]
