"""Predictors: functions from a batch of pairs to predicted target points (B x K x 2 pixels of the resized
target), which `sdm.evaluate.evaluate_predictions` scores. Built from a feature extractor and a matcher
(`feature_predictor`), from Hedlin et al.'s attention matcher (`attention_predictor`) or from stored
predictions (`stored_predictor`)."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any

import torch

from sdm.data import PairBatch, PairDataset, decoding, load_images
from sdm.draws import derived_seed
from sdm.extractors import FeatureExtractor, FeatureStore, ImageBatch, similarity_of
from sdm.matching import MatchConfig, Matcher, match, to_feature_coords, to_image_coords
from sdm.prompts import Conditioning

if TYPE_CHECKING:
    from sdm.attention import AttentionMatcher

Predictor = Callable[[PairBatch], torch.Tensor]  # batch -> B x K x 2 predicted target pixels


def _feature_keys(pairs: Any, conditioning: Conditioning) -> dict[Hashable, tuple[str, str]]:
    """Feature-cache keys of the pairs' images in order of first use (image id; (id, category) for category
    prompts), each with its (image id, category). Reads only annotations (images are not decoded)."""
    pairs = decoding(pairs, False)
    seen: dict[Hashable, tuple[str, str]] = {}
    for i in range(len(pairs)):
        p = pairs[i]
        for image_id in (p.src_id, p.trg_id):
            seen.setdefault((image_id, p.category) if conditioning == "category" else image_id, (image_id, p.category))
    return seen


def batch_images(extractor: FeatureExtractor) -> bool:
    """Whether evaluation batches must carry the pairs' images: pair-conditioned extractors need them, unless they
    read them on demand (`images_on_demand`: then `feature_predictor` hands them a loader instead). Per-image
    extractors read their images through the feature store."""
    return extractor.conditioning == "pair" and not getattr(extractor, "images_on_demand", False)


def feature_predictor(
    extractor: FeatureExtractor,
    dataset: PairDataset,
    *,
    matcher: Matcher | MatchConfig = "kernel_soft_argmax",
    feature_cache: int = 256,
    pairs: Any = None,
    group: int = 16,
    store: FeatureStore | None = None,
) -> Predictor:
    """A predictor that matches source keypoints into target features.

    Per-image features live in a `FeatureStore` keyed by image id (and category for category prompts); images
    are loaded from `dataset` only when a feature is missing, so every image is decoded and encoded about once
    (the datasets list pairs category by category).

    Args:
        pairs: the pairs that will be evaluated (default: `dataset`). Their images, in order of first use, are
            cut into fixed groups of `group`; a miss computes its whole group in one batch. The batches the
            network sees then depend only on the pairs, not on the order or the process that asks first, so a
            sharded evaluation equals a single-process one to the last digit.
        matcher: a matcher name, or a `MatchConfig` (its similarity None: the extractor's, `similarity_of`).
        store: where per-image features are kept; None: a new store of `feature_cache` entries. Pass one store
            to several evaluations of the same extractor (other matchers, protocols) to compute features once;
            `store.reset()` when the extractor changes.
    """
    config = MatchConfig.of(matcher, similarity_of(extractor))
    cache = store if store is not None else FeatureStore(feature_cache)
    size = tuple(dataset.image_size)
    per_image = extractor.conditioning != "pair"
    planned = _feature_keys(dataset if pairs is None else pairs, extractor.conditioning) if per_image else {}
    order = list(planned)
    groups = {k: order[i - i % group : i - i % group + group] for i, k in enumerate(order)}

    def key_of(image_id: str, category: str) -> Hashable:
        return (image_id, category) if extractor.conditioning == "category" else image_id

    def compute(keys: list[Hashable]) -> dict[Hashable, torch.Tensor]:
        ids, categories = (list(column) for column in zip(*(planned[k] for k in keys)))
        images = load_images(dataset, ids)
        feats = extractor.image_features(ImageBatch(images, categories, ids, dataset.original_image))
        return dict(zip(keys, feats))

    def image_feats(ids: list[str], categories: list[str]) -> torch.Tensor:
        keys = [key_of(i, c) for i, c in zip(ids, categories)]
        for k, i, c in zip(keys, ids, categories):
            planned.setdefault(k, (i, c))  # pairs outside the plan are computed on their own
        with cache.hold(keys):
            for k in keys:
                if cache.get(k) is None:
                    for key, f in compute(list(groups.get(k, [k]))).items():
                        cache.put(key, f)
            return torch.stack([cache.get(k) for k in keys]).float()  # type: ignore[misc]

    def read(ids: list[str]) -> torch.Tensor:  # batches without images (`batch_images`): read the ones asked for
        return load_images(dataset, ids)

    def predict(batch: PairBatch) -> torch.Tensor:
        b = len(batch)
        if per_image:
            both = image_feats([*batch.src_ids, *batch.trg_ids], batch.categories * 2)
            src, trg = both[:b], both[b:]
        else:
            src, trg = extractor.pair_features(
                ImageBatch(batch.src_image, batch.categories, batch.src_ids, dataset.original_image, read),
                ImageBatch(batch.trg_image, batch.categories, batch.trg_ids, dataset.original_image, read),
            )
        query = to_feature_coords(batch.src_kps.to(src.device, non_blocking=True), size, tuple(src.shape[-2:]))
        cells = match(src.float(), trg.float(), query, config)
        return to_image_coords(cells, tuple(trg.shape[-2:]), size)

    return predict


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


def recorded(predict: Predictor) -> tuple[Predictor, dict[str, torch.Tensor]]:
    """`predict` that also keeps what it predicts, by pair id (K x 2 resized pixels, CPU), so the same
    predictions can be scored again under other protocols (`sdm.evaluate.score_protocols`)."""
    kept: dict[str, torch.Tensor] = {}

    def keep(batch: PairBatch) -> torch.Tensor:
        out = predict(batch)
        for b, pair_id in enumerate(batch.pair_ids):
            kept[pair_id] = out[b, : int(batch.n_kps[b])].detach().float().cpu()
        return out

    return keep, kept


def attention_predictor(matcher: AttentionMatcher, cache_size: int = 256) -> Predictor:
    """Hedlin et al.'s matcher as a predictor: each pair's source points are optimised and found in the target
    (images are the dataset's resized ones, so predictions are in the space of the PCK thresholds).

    The optimisation depends only on the source image, its points and the config (its random draws come from
    `config.seed`), so its embeddings are kept per (source id, points) for the next `cache_size` sources: a source
    shared by several pairs (each PF-Willow image is the source of about 9) is optimised once, with the same
    result as optimising it again. With `config.optimize_per` "pair" every pair is optimised afresh, with draws
    seeded by the config's seed and the pair id, as the authors do. The matcher's `crop_store` likewise encodes
    each image's crops once, whether the image is first met as a source or as a target."""
    cache = FeatureStore(cache_size)
    per_pair = matcher.config.optimize_per == "pair"

    def predict(batch: PairBatch) -> torch.Tensor:
        out = torch.zeros_like(batch.trg_kps)
        for b in range(len(batch)):
            n = int(batch.n_kps[b])
            points = batch.src_kps[b, :n]
            if per_pair:
                seed = derived_seed(matcher.config.seed, "optimize", batch.pair_ids[b])
                embeddings = matcher.optimize_embeddings(batch.src_image[b], points, seed=seed).embeddings
            else:
                key = (batch.src_ids[b], points.numpy().tobytes())
                embeddings = cache.get(key)
                if embeddings is None:
                    embeddings = matcher.optimize_embeddings(batch.src_image[b], points).embeddings
                    cache.put(key, embeddings)
            out[b, :n] = matcher.transfer(batch.trg_image[b], embeddings).to(out)
        return out

    return predict


__all__ = ["Predictor", "attention_predictor", "feature_predictor", "recorded", "stored_predictor"]
