"""SPair-U (Jamais Vu): SPair-71k's test pairs with new keypoints, on hand-made fixtures of both layouts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdm.data import DATASETS, DatasetNotFoundError, SPairU, dataset_record, load_dataset

NAME = "000001-2008_000001-2008_000002:cat"
PAIR = {
    "src_imname": "2008_000001.jpg", "trg_imname": "2008_000002.jpg", "src_imsize": [40, 30, 3], "trg_imsize": [50, 20, 3],
    "src_bndbox": [1, 2, 30, 25], "trg_bndbox": [5, 1, 45, 19], "category": "cat",
}  # fmt: skip


def _images(spair: Path) -> None:
    (spair / "JPEGImages" / "cat").mkdir(parents=True)
    for name, (w, h) in (("2008_000001.jpg", (40, 30)), ("2008_000002.jpg", (50, 20))):
        Image.fromarray(np.full((h, w, 3), 90, dtype=np.uint8)).save(spair / "JPEGImages" / "cat" / name)


def _write(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))


def test_release_layout_with_points_in_the_pair_files(tmp_path: Path) -> None:
    """The release beside SPair-71k: pair files of SPair-71k's format, images from ../SPair-71k."""
    _images(tmp_path / "SPair-71k")
    _write(tmp_path / "SPair-U" / "PairAnnotation" / "test" / f"{NAME}.json", {**PAIR, "src_kps": [[4, 6]], "trg_kps": [[10, 5]]})
    data = load_dataset("spair-u", tmp_path / "SPair-U", image_size=(60, 100))
    pair = data[0]
    # (4, 6) in a 40 x 30 image -> x 4 * 100 / 40 = 10, y 6 * 60 / 30 = 12 (per-axis resize)
    assert pair.src_kps.tolist() == [[10.0, 12.0]] and pair.trg_kps.tolist() == [[20.0, 15.0]]
    assert pair.threshold == pytest.approx(80.0)  # target box 40 x 18 of 50 x 20 -> 80 x 54 at 100 x 60
    assert pair.src_id == "cat/2008_000001" and data.categories == ["cat"]
    assert dataset_record(data)["dataset"] == "spair-u"


def test_jamais_vu_layout_points_from_the_image_annotations(tmp_path: Path) -> None:
    """Their code's layout inside the SPair-71k folder: pair files without points; the points are the keypoint
    ids visible in both images' annotations, in id order."""
    _images(tmp_path)
    _write(tmp_path / "ExtraPairAnnotation" / "test" / f"{NAME}.json", PAIR)
    _write(tmp_path / "ExtraImageAnnotation" / "cat" / "2008_000001.json", {"kps": {"0": [1, 2], "1": None, "2": [3, 4], "3": [5, 6]}})
    _write(tmp_path / "ExtraImageAnnotation" / "cat" / "2008_000002.json", {"kps": {"0": [7, 8], "1": [9, 9], "2": None, "3": [11, 12]}})
    pair = SPairU(tmp_path, image_size=(30, 40))[0]  # the source keeps its size: points unscaled
    assert pair.src_kps.tolist() == [[1.0, 2.0], [5.0, 6.0]]  # ids 0 and 3: visible in both
    expected = torch.tensor([[7.0 * 40 / 50, 8.0 * 30 / 20], [11.0 * 40 / 50, 12.0 * 30 / 20]])
    torch.testing.assert_close(pair.trg_kps.float(), expected)


def test_missing_annotations_say_where_to_get_them(tmp_path: Path) -> None:
    _images(tmp_path / "SPair-71k")
    (tmp_path / "SPair-U").mkdir()
    with pytest.raises(DatasetNotFoundError, match=r"(?s)PairAnnotation/test.*SPair-U\.zip.*sdm download spair"):
        SPairU(tmp_path / "SPair-U")
    with pytest.raises(ValueError, match="only the 'test' split"):
        SPairU(tmp_path / "SPair-U", split="trn")


def test_registered_once() -> None:
    assert DATASETS["spair-u"] is SPairU


def test_evaluated_under_jamais_vus_protocol(tmp_path: Path) -> None:
    """Jamais Vu (github VICO-UoE/JamaisVu) measures after an aspect-preserving resize (utils/utils_dataset.py:13-30), which scales distances
    and the target box alike: sdm's original frame, by default for SPair-U. The target image is 50 x 20 and its box
    40 x 18; the input is 100 x 60 (x by 2, y by 3). A miss of 6 resized pixels along y is 2 px in the original,
    against a box side of 40 there (2 / 40 = 0.05), but 6 / 80 = 0.075 of the squashed box (80 x 54): at alpha 0.06
    the original frame counts it correct and the resized one does not."""
    from sdm.evaluate import evaluate_predictions

    _images(tmp_path / "SPair-71k")
    _write(tmp_path / "SPair-U" / "PairAnnotation" / "test" / f"{NAME}.json", {**PAIR, "src_kps": [[4, 6]], "trg_kps": [[10, 5]]})
    data = load_dataset("spair-u", tmp_path / "SPair-U", image_size=(60, 100))
    miss = lambda batch: batch.trg_kps + torch.tensor([0.0, 6.0])  # noqa: E731
    default = evaluate_predictions(data, miss, alphas=(0.06,), progress=False)
    resized = evaluate_predictions(data, miss, alphas=(0.06,), frame="resized", progress=False)
    assert default.info["protocol"]["frame"] == "original" and default.overall("per_image@0.06") == 100.0
    assert resized.info["protocol"]["frame"] == "resized" and resized.overall("per_image@0.06") == 0.0
