"""AP-10K in the layout GeoAware-SC's prepare_ap10k.ipynb leaves, written by the test; values by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdm.data import AnnotationError, DatasetNotFoundError, infer_dataset, load_dataset
from sdm.evaluate import evaluate_predictions


def _image(root: Path, family: str, species: str, name: str, size: tuple[int, int], bbox: list[float], visible: dict[int, tuple[float, float]]) -> str:
    (root / "JPEGImages" / family / species).mkdir(parents=True, exist_ok=True)
    (root / "ImageAnnotation" / family / species).mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), 100, dtype=np.uint8)).save(root / "JPEGImages" / family / species / f"{name}.jpg")
    kps = []
    for k in range(17):
        x, y = visible.get(k, (0.0, 0.0))
        kps += [x, y, 2 if k in visible else 0]
    ann = {"bbox": bbox, "keypoints": kps, "num_keypoints": len(visible), "width": size[0], "height": size[1]}
    path = root / "ImageAnnotation" / family / species / f"{name}.json"
    path.write_text(json.dumps(ann))
    return f"data/ap-10k/ImageAnnotation/{family}/{species}/{name}.json"  # as the notebook writes them


def _write(root: Path) -> None:
    """Two dogs (Canidae) and one cat (Felidae); visible keypoints chosen so a pair keeps 3 or 2 points."""
    a = _image(root, "Canidae", "dog", "000000000001", (100, 50), [10, 5, 60, 40], {0: (20, 10), 2: (30, 20), 5: (40, 30), 9: (50, 35)})
    b = _image(root, "Canidae", "dog", "000000000002", (80, 80), [0, 0, 40, 70], {0: (8, 8), 2: (16, 16), 5: (24, 24), 16: (30, 60)})
    c = _image(root, "Felidae", "cat", "000000000003", (60, 60), [5, 5, 50, 20], {2: (10, 10), 9: (20, 20), 16: (30, 30)})
    pairs = {"test": {"000000000001-000000000002:dog": (a, b)}, "test_cross_family": {"000000000001-000000000003:all": (a, c)}}
    for split, items in pairs.items():
        (root / "PairAnnotation" / split).mkdir(parents=True)
        for name, (src, trg) in items.items():
            (root / "PairAnnotation" / split / f"{name}.json").write_text(json.dumps({"src_json_path": src, "trg_json_path": trg}))


def test_ap10k_pairs_points_and_threshold_by_hand(tmp_path: Path) -> None:
    _write(tmp_path)
    assert infer_dataset(tmp_path) == "ap10k"
    data = load_dataset("ap10k", tmp_path, split="test", image_size=40)
    assert len(data) == 1 and data.categories == ["dog"]
    pair = data[0]
    # keypoints 0, 2, 5 are visible in both; per-axis resize: 100 x 50 -> 40 x 40 (x 0.4, 0.8), 80 x 80 -> 40 (x 0.5)
    assert pair.src_id == "Canidae/dog/000000000001" and pair.n_kps == 3
    assert torch.allclose(pair.src_kps, torch.tensor([[8.0, 8.0], [12.0, 16.0], [16.0, 24.0]]))
    assert torch.allclose(pair.trg_kps, torch.tensor([[4.0, 4.0], [8.0, 8.0], [12.0, 12.0]]))
    assert torch.allclose(pair.extra["trg_bbox"], torch.tensor([0.0, 0.0, 20.0, 35.0]))
    cross = load_dataset("ap10k", tmp_path, split="test_cross_family", image_size=40)
    assert cross.categories == ["all"] and cross[0].n_kps == 2  # keypoints 2 and 9


def test_ap10k_scored_in_the_original_frame(tmp_path: Path) -> None:
    """Threshold max(w, h) of the target box in original pixels: 70 (box 40 x 70). A prediction 5 px off in the
    original target (80 x 80, shown at 40 x 40: 2.5 px) passes alpha 0.1 (7 px) and fails alpha 0.05 (3.5 px)."""
    _write(tmp_path)
    data = load_dataset("ap10k", tmp_path, split="test", image_size=40)
    result = evaluate_predictions(data, lambda batch: batch.trg_kps + torch.tensor([2.5, 0.0]), progress=False, decode_images=False)
    assert result.info["protocol"]["frame"] == "original"
    assert result.table.loc["all", "per_point@0.1"] == pytest.approx(100.0)
    assert result.table.loc["all", "per_point@0.05"] == pytest.approx(0.0)


def test_ap10k_errors_name_the_file_and_the_layout(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match=r"(?s)PairAnnotation/<split>.*prepare_ap10k"):
        load_dataset("ap10k", tmp_path, split="test")
    _write(tmp_path)
    with pytest.raises(ValueError, match="valid categories: dog"):
        load_dataset("ap10k", tmp_path, split="test", category="horse")
    with pytest.raises(ValueError, match="test_cross_species"):
        load_dataset("ap10k", tmp_path, split="tst")
    bad = tmp_path / "ImageAnnotation" / "Canidae" / "dog" / "000000000002.json"
    bad.write_text(json.dumps({"bbox": [0, 0, 1, 1]}))
    with pytest.raises(AnnotationError, match=r"000000000002\.json.*keypoints"):
        load_dataset("ap10k", tmp_path, split="test")


def test_ap10k_geo_aware_subset_by_hand(tmp_path: Path) -> None:
    """A dog seeing all 17 keypoints paired with one seeing only 5 (left shoulder) and 6 (left elbow). The code's
    renumbering turns [5, 8] (the shoulders) into [5, 6] when all 17 ids are used: both points have a counterpart
    visible in the target, so both are geometry-aware. As listed, 5's counterpart 8 and 6's (9, 12, 15) are not
    visible in the target: neither is."""
    full = _image(tmp_path, "Canidae", "dog", "000000000001", (100, 100), [0, 0, 90, 90], {k: (5.0 * k + 1, 5.0 * k + 2) for k in range(17)})
    two = _image(tmp_path, "Canidae", "dog", "000000000002", (100, 100), [0, 0, 90, 90], {5: (10.0, 10.0), 6: (20.0, 20.0)})
    (tmp_path / "PairAnnotation" / "test").mkdir(parents=True)
    (tmp_path / "PairAnnotation" / "test" / "p:dog.json").write_text(json.dumps({"src_json_path": full, "trg_json_path": two}))
    data = load_dataset("ap10k", tmp_path, split="test", image_size=40)
    assert data.geo_aware_flags() == {"p:dog": [True, True]}
    assert data.geo_aware_flags("as-listed") == {"p:dog": [False, False]}


def test_a_prompt_trains_on_ap10k(tmp_path: Path) -> None:
    """SD4Match's Single prompt trains on AP-10K's trn split like on any dataset (tiny model, 2 steps)."""
    import sdm
    from sdm.config import TrainConfig
    from sdm.train import train

    a = _image(tmp_path, "Canidae", "dog", "000000000001", (64, 64), [0, 0, 60, 60], {k: (3.0 * k + 2, 2.0 * k + 5) for k in range(17)})
    b = _image(tmp_path, "Canidae", "dog", "000000000002", (64, 48), [4, 4, 50, 40], {k: (2.0 * k + 8, 2.0 * k + 3) for k in range(0, 17, 2)})
    (tmp_path / "PairAnnotation" / "trn").mkdir(parents=True)
    for name, (src, trg) in {"ab:dog": (a, b), "ba:dog": (b, a)}.items():
        (tmp_path / "PairAnnotation" / "trn" / f"{name}.json").write_text(json.dumps({"src_json_path": src, "trg_json_path": trg}))
    data = load_dataset("ap10k", tmp_path, split="trn", image_size=64)
    cfg = TrainConfig(prompt="single", steps=2, batch_size=2, image_size=64, mixed_precision="no", val_every=0, log_every=1, num_workers=0)
    result = train(cfg, sdm.tiny_stable_diffusion(0), data, out_dir=tmp_path / "run", progress=False)
    assert len(result.log) == 2 and np.isfinite(result.log["loss"]).all()
    assert (tmp_path / "run" / "prompt.safetensors").is_file()
