"""Loaders on the real data in $SDM_TEST_DATA (default ../shared/data): PF-Willow (complete), six SPair-71k test pairs, the PF-Pascal
test pair list. Expected numbers are recomputed here from the raw annotation files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from conftest import SHARED_DATA
from PIL import Image

from sdm.data import (
    PFPASCAL_CATEGORIES,
    PFWillow,
    SPair71k,
    category_label,
    collate_pairs,
    load_dataset,
    parse_pfpascal_csv,
)

SHARED = SHARED_DATA
WILLOW = SHARED / "pf-willow"
SPAIR = SHARED / "spair-mini"
PASCAL_PAIRS = SHARED / "pf-pascal-pairs"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared test data absent: {path}")
    return path


# ---------------------------------------------------------------- PF-Willow


def test_pfwillow_counts_and_thresholds() -> None:
    ds = PFWillow(need(WILLOW), image_size=768)
    assert len(ds) == 900
    assert len(ds.categories) == 10 and ds.categories == sorted(ds.categories)
    assert "car(G)" in ds.categories and "winebottle(woC)" in ds.categories
    for i in range(len(ds)):
        src, trg, thr = ds.keypoints(i)
        assert src.shape == trg.shape == (10, 2)
        assert thr > 0
    assert len(ds.images()) == 100


def test_pfwillow_pair_by_hand() -> None:
    ds = PFWillow(need(WILLOW), image_size=(512, 768))  # H = 512, W = 768: per-axis scaling matters
    pair = ds[0]
    assert pair.src_id == "car(G)/Cars_006a" and pair.trg_id == "car(G)/Cars_007a"
    folder = WILLOW / "PF-dataset" / "car(G)"
    src_pts = scipy.io.loadmat(folder / "Cars_006a.mat")["pts_coord"]  # 2 x 10: x row, y row
    trg_pts = scipy.io.loadmat(folder / "Cars_007a.mat")["pts_coord"]
    src_w, src_h = Image.open(folder / "Cars_006a.png").size
    trg_w, trg_h = Image.open(folder / "Cars_007a.png").size
    exp_src = np.stack([src_pts[0] * 768 / src_w, src_pts[1] * 512 / src_h], axis=1)
    exp_trg = np.stack([trg_pts[0] * 768 / trg_w, trg_pts[1] * 512 / trg_h], axis=1)
    exp_thr = max(exp_trg[:, 0].max() - exp_trg[:, 0].min(), exp_trg[:, 1].max() - exp_trg[:, 1].min())
    # the csv stores 4 decimals, the .mat full precision
    np.testing.assert_allclose(pair.src_kps.numpy(), exp_src, atol=2e-3)
    np.testing.assert_allclose(pair.trg_kps.numpy(), exp_trg, atol=2e-3)
    assert pair.threshold == pytest.approx(exp_thr, abs=2e-3)
    assert pair.src_size == (src_w, src_h) and pair.trg_size == (trg_w, trg_h)
    assert pair.src_image.shape == (3, 512, 768) and pair.src_image.dtype == torch.float32
    assert 0.0 <= float(pair.src_image.min()) and float(pair.src_image.max()) <= 1.0
    assert pair.category == "car(G)" and pair.n_kps == 10


def test_pfwillow_category_filter_and_registry() -> None:
    ds = load_dataset("pfwillow", need(WILLOW), split="test", image_size=64, category="duck(S)")
    assert len(ds) == 90 and ds.categories == ["duck(S)"]
    with pytest.raises(ValueError, match="only the 'test' split"):
        load_dataset("pfwillow", WILLOW, split="trn")
    with pytest.raises(ValueError, match=r"car\(G\)"):
        PFWillow(WILLOW, category="duck")


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("car(G)", "car"),
        ("motorbike(S)", "motorbike"),
        ("duck(S)", "duck"),
        ("winebottle(woC)", "winebottle"),
        ("dog", "dog"),
    ],
)
def test_category_label(name: str, label: str) -> None:
    assert category_label(name) == label


# ---------------------------------------------------------------- SPair-71k


def test_spair_mini_reads_all_pairs() -> None:
    ds = SPair71k(need(SPAIR), split="test", image_size=128)
    assert len(ds) == 6
    assert ds.categories == ["aeroplane", "cow", "dog", "horse", "motorbike", "pottedplant"]
    batch = collate_pairs([ds[i] for i in range(len(ds))])
    assert batch.src_image.shape == (6, 3, 128, 128)
    assert batch.n_kps.tolist() == [4, 7, 9, 7, 7, 9]
    assert batch.src_kps.shape == (6, 9, 2)
    assert torch.all(batch.src_kps[0, 4:] == 0)  # padding
    assert torch.all(batch.threshold > 0)
    for extra in batch.extra:
        assert extra["viewpoint_variation"] in (0, 1, 2)
        assert extra["scale_variation"] is None and extra["occlusion"] is None and extra["truncation"] is None
    assert len(ds.images()) == 12
    image_id, image = ds.images()[0]
    assert image_id == "pottedplant/2011_001863" and image.shape == (3, 128, 128)


def test_spair_pair_by_hand() -> None:
    ds = SPair71k(need(SPAIR), split="test", category="motorbike", image_size=768)
    assert len(ds) == 1
    pair = ds[0]
    assert pair.pair_id == "000002-2010_002408-2008_003249:motorbike"
    assert (pair.src_id, pair.trg_id) == ("motorbike/2010_002408", "motorbike/2008_003249")
    # JSON: src_imsize [375, 500, 3] (W, H), trg_imsize [500, 340, 3]; first src point (91, 112)
    assert pair.src_size == (375, 500) and pair.trg_size == (500, 340)
    assert pair.src_kps[0].tolist() == pytest.approx([91 * 768 / 375, 112 * 768 / 500])
    assert pair.trg_kps[-1].tolist() == pytest.approx([272 * 768 / 500, 270 * 768 / 340])
    # trg_bndbox [90, 168, 353, 309]: width 263 px, height 141 px
    exp_box = [90 * 768 / 500, 168 * 768 / 340, 353 * 768 / 500, 309 * 768 / 340]
    assert pair.extra["trg_bbox"].tolist() == pytest.approx(exp_box)
    assert pair.threshold == pytest.approx(max(263 * 768 / 500, 141 * 768 / 340))
    assert pair.extra["viewpoint_variation"] == 1


# ---------------------------------------------------------------- PF-Pascal pair list


def test_pfpascal_test_list_parses() -> None:
    records = parse_pfpascal_csv(need(PASCAL_PAIRS) / "test_pairs.csv")
    assert len(records) == 299
    assert {r.category for r in records} == set(PFPASCAL_CATEGORIES)  # all 20 classes occur
    first = records[0]
    assert (first.src, first.trg, first.category, first.flip) == (
        "2011_001407.jpg",
        "2010_004184.jpg",
        "aeroplane",
        False,
    )
    assert first.src_kps is not None and first.trg_kps is not None
    assert first.src_kps.shape == first.trg_kps.shape == (11, 2)
    assert first.src_kps[0].tolist() == pytest.approx([253.631662222222, 58.1813333333333])
    assert first.trg_kps[-1].tolist() == pytest.approx([231.41072, 86.1214285714286])
    assert all(r.src_kps is not None and len(r.src_kps) == len(r.trg_kps) for r in records)
