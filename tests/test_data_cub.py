"""CUB-200-2011 under Hedlin et al.'s protocol (eval/cub2011.py of ubc-vision/LDM_correspondences, 97e3246), on
a hand-made folder in the official layout; every expected value is written out here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from sdm.data import CUB200, AnnotationError, DatasetNotFoundError, infer_dataset, load_dataset
from sdm.metrics import pair_facts, threshold_of

# id, path, class, is_training, (W, H), box (x, y, w, h), parts {part id: (x, y, visible)}
IMAGES = [
    (1, "001.Albatross/a1.jpg", 1, 0, (100, 80), (10, 5, 60, 40), {1: (20, 10, 1), 2: (30, 40, 1), 3: (50, 60, 0)}),
    (2, "001.Albatross/a2.jpg", 1, 0, (60, 90), (5, 10, 30, 70), {1: (10, 20, 1), 2: (40, 30, 0), 3: (20, 70, 1)}),
    (3, "001.Albatross/a3.jpg", 1, 1, (50, 50), (0, 0, 50, 50), {1: (5, 5, 1)}),  # a training image
    (4, "001.Albatross/a4.jpg", 1, 0, (80, 80), (20, 20, 40, 30), {1: (25, 25, 1), 2: (35, 35, 1), 3: (45, 45, 1)}),
    (5, "002.Auklet/b1.jpg", 2, 0, (70, 70), (0, 0, 70, 35), {1: (7, 7, 1), 2: (14, 14, 1), 3: (21, 21, 1)}),
    (6, "002.Auklet/b2.jpg", 2, 0, (140, 70), (10, 10, 100, 20), {1: (70, 35, 1), 2: (0, 0, 0), 3: (10, 60, 1)}),
    (7, "004.Other/c1.jpg", 4, 0, (50, 50), (0, 0, 10, 10), {1: (1, 1, 1)}),  # class 4: beyond num_classes = 3
    (8, "004.Other/c2.jpg", 4, 0, (50, 50), (0, 0, 10, 10), {1: (2, 2, 1)}),
]


@pytest.fixture(scope="module")
def cub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data") / "CUB_200_2011"
    (root / "parts").mkdir(parents=True)
    lines: dict[str, list[str]] = {"images.txt": [], "train_test_split.txt": [], "image_class_labels.txt": [], "bounding_boxes.txt": []}
    parts = []
    for i, path, cls, trn, (w, h), box, pts in IMAGES:
        (root / "images" / path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (w, h), (i * 20, 100, 50)).save(root / "images" / path)
        lines["images.txt"].append(f"{i} {path}")
        lines["train_test_split.txt"].append(f"{i} {trn}")
        lines["image_class_labels.txt"].append(f"{i} {cls}")
        lines["bounding_boxes.txt"].append(f"{i} " + " ".join(f"{v:.1f}" for v in box))
        parts += [f"{i} {k} {x:.1f} {y:.1f} {v}" for k, (x, y, v) in sorted(pts.items())]
    for name, rows in lines.items():
        (root / name).write_text("\n".join(rows) + "\n")
    (root / "parts" / "part_locs.txt").write_text("\n".join(parts) + "\n")
    return root


def test_pairs_points_and_threshold_by_hand(cub: Path) -> None:
    ds = CUB200(cub, image_size=512)
    assert infer_dataset(cub) == "cub" and isinstance(load_dataset("cub", cub, image_size=512), CUB200)
    # test images of classes 1-3, within-class combinations in images.txt order
    assert [(p.src_id.split("/")[1], p.trg_id.split("/")[1]) for p in (ds[i] for i in range(len(ds)))] == [
        ("a1", "a2"), ("a1", "a4"), ("a2", "a4"), ("b1", "b2"),
    ]
    assert ds.categories == ["001.Albatross", "002.Auklet"]
    # pair a1 -> a2: parts 1 is visible in both (2: not in a2, 3: not in a1)
    p = ds[0]
    assert p.n_kps == 1 and p.extra["parts"] == [1]
    torch.testing.assert_close(p.src_kps, torch.tensor([[20 * 512 / 100, 10 * 512 / 80]]))
    torch.testing.assert_close(p.trg_kps, torch.tensor([[10 * 512 / 60, 20 * 512 / 90]]))
    assert p.threshold == pytest.approx(max(30, 70) * 512 / 60)  # both box sides by the x factor of a2
    # pair a1 -> a4: parts 1 and 2, in part-id order
    q = ds[1]
    assert q.extra["parts"] == [1, 2]
    torch.testing.assert_close(q.trg_kps, torch.tensor([[25.0, 25.0], [35.0, 35.0]]) * 512 / 80)
    # pair b1 -> b2: parts 1 and 3; threshold max(100, 20) x 512 / 140
    r = ds[3]
    assert r.extra["parts"] == [1, 3] and r.threshold == pytest.approx(100 * 512 / 140)


def test_threshold_modes_on_cub(cub: Path) -> None:
    ds = CUB200(cub, image_size=512)
    p = ds[3]  # target b2: 140 x 70, box 100 x 20

    def facts(frame: str):
        return pair_facts(p.src_kps, p.trg_kps, p.extra, p.src_size, p.trg_size, (512, 512), frame)

    assert threshold_of(facts("resized"), "trg-bbox-xscale") == pytest.approx(p.threshold)
    assert threshold_of(facts("original"), "trg-bbox-xscale") == pytest.approx(100.0)
    assert threshold_of(facts("resized"), "trg-bbox") == pytest.approx(max(100 * 512 / 140, 20 * 512 / 70))


def test_splits_categories_and_errors(cub: Path, tmp_path: Path) -> None:
    assert len(CUB200(cub, split="trn", image_size=64)) == 0  # one training image: no pair
    assert len(CUB200(cub, image_size=64, num_classes=4)) == 5  # class 4 adds (c1, c2)
    only = CUB200(cub, image_size=64, category="002.Auklet")
    assert len(only) == 1 and only.categories == ["002.Auklet"]
    with pytest.raises(ValueError, match="unknown category"):
        CUB200(cub, image_size=64, category="nope")
    with pytest.raises(DatasetNotFoundError, match="sdm download cub"):
        CUB200(tmp_path / "missing")
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("images.txt", "train_test_split.txt", "image_class_labels.txt"):
        (broken / name).write_text((cub / name).read_text())
    (broken / "bounding_boxes.txt").write_text("1 10 5\n")
    (broken / "parts").mkdir()
    (broken / "parts" / "part_locs.txt").write_text("")
    with pytest.raises(AnnotationError, match=r"bounding_boxes\.txt, line 1"):
        CUB200(broken)
