"""PFPascal end to end on tiny fixtures in the official layout (.mat fields `kps` N x 2 with NaN rows for
absent points, `bbox` 1 x 4), including the trn list's flip column."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from sdm.data import AnnotationError, DatasetNotFoundError, ImageReadError, PFPascal, collate_pairs

NAN = float("nan")
# (W, H) of the two fixture images and their annotations (x, y); row 1 is absent in the target
SIZES = {"2008_000001.jpg": (40, 30), "2008_000002.jpg": (50, 20)}
KPS = {
    "2008_000001.jpg": [[4.0, 5.0], [10.0, 12.0], [30.0, 20.0], [NAN, NAN]],
    "2008_000002.jpg": [[6.0, 3.0], [NAN, NAN], [44.0, 15.0], [20.0, 9.0]],
}
BBOX = {"2008_000001.jpg": [2, 3, 35, 28], "2008_000002.jpg": [1, 2, 48, 18]}


def _image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    # blocky random colours survive JPEG well enough; exact pixels are compared only after decoding
    small = rng.integers(0, 256, size=(h // 2 + 1, w // 2 + 1, 3), dtype=np.uint8)
    return Image.fromarray(np.kron(small, np.ones((2, 2, 1), dtype=np.uint8))[:h, :w])


@pytest.fixture
def pascal_root(tmp_path: Path) -> Path:
    jpeg = tmp_path / "PF-dataset-PASCAL" / "JPEGImages"
    ann = tmp_path / "PF-dataset-PASCAL" / "Annotations" / "cat"
    jpeg.mkdir(parents=True)
    ann.mkdir(parents=True)
    for seed, (name, (w, h)) in enumerate(SIZES.items()):
        _image(w, h, seed).save(jpeg / name, quality=95)
        scipy.io.savemat(
            ann / name.replace(".jpg", ".mat"), {"kps": np.array(KPS[name]), "bbox": np.array([BBOX[name]])}
        )
    src, trg = (f"PF-dataset-PASCAL/JPEGImages/{n}" for n in SIZES)
    (tmp_path / "trn_pairs.csv").write_text(
        f"source_image,target_image,class,flip\n{src},{trg},8,0\n{src},{trg},8,1\n"
    )
    # val list with keypoints in the csv; -1 marks an invalid point as in some public lists
    (tmp_path / "val_pairs.csv").write_text(
        f"source_image,target_image,class,XA,YA,XB,YB\n{src},{trg},8,4;10;-1,5;12;7,6;44;3,3;15;3\n"
    )
    return tmp_path


def test_trn_from_mat_files(pascal_root: Path) -> None:
    ds = PFPascal(pascal_root, split="trn", image_size=(60, 80))  # H = 60, W = 80
    assert len(ds) == 2 and ds.categories == ["cat"]
    pair = ds[0]
    # rows valid in both files: 0 and 2
    assert pair.n_kps == 2
    np.testing.assert_allclose(
        pair.src_kps.numpy(), [[4 * 80 / 40, 5 * 60 / 30], [30 * 80 / 40, 20 * 60 / 30]], rtol=1e-6
    )
    np.testing.assert_allclose(
        pair.trg_kps.numpy(), [[6 * 80 / 50, 3 * 60 / 20], [44 * 80 / 50, 15 * 60 / 20]], rtol=1e-6
    )
    assert pair.threshold == 80.0  # max(H, W) of the resized target image
    assert pair.extra["flipped"] is False
    assert pair.extra["trg_bbox"].tolist() == pytest.approx([1 * 1.6, 2 * 3.0, 48 * 1.6, 18 * 3.0])
    assert (pair.src_id, pair.trg_id) == ("2008_000001", "2008_000002")
    assert pair.src_size == (40, 30) and pair.trg_size == (50, 20)
    assert pair.src_image.shape == (3, 60, 80)


def test_trn_flip(pascal_root: Path) -> None:
    ds = PFPascal(pascal_root, split="trn", image_size=(60, 80))
    plain, flipped = ds[0], ds[1]
    assert flipped.extra["flipped"] is True
    assert flipped.src_id == "2008_000001|flip" and flipped.src_id != plain.src_id
    assert torch.equal(flipped.src_image, plain.src_image.flip(-1))
    assert torch.equal(flipped.trg_image, plain.trg_image.flip(-1))
    # x' = W_new - 1 - x, y unchanged
    assert flipped.src_kps[:, 0].tolist() == pytest.approx((79 - plain.src_kps[:, 0]).tolist())
    assert torch.equal(flipped.src_kps[:, 1], plain.src_kps[:, 1])
    x1, y1, x2, y2 = plain.extra["trg_bbox"].tolist()
    assert flipped.extra["trg_bbox"].tolist() == pytest.approx([79 - x2, y1, 79 - x1, y2])
    ids = dict(iter(ds.images()))
    assert set(ids) == {"2008_000001", "2008_000002", "2008_000001|flip", "2008_000002|flip"}
    assert torch.equal(ids["2008_000002|flip"], flipped.trg_image)


def test_flip_moves_pixel_content_with_the_points(pascal_root: Path) -> None:
    ds = PFPascal(pascal_root, split="trn", image_size=(30, 40))  # the source's own size: no resampling
    plain, flipped = ds[0], ds[1]
    for (x, y), (xf, yf) in zip(plain.src_kps.long().tolist(), flipped.src_kps.long().tolist()):
        assert torch.equal(plain.src_image[:, y, x], flipped.src_image[:, yf, xf])


def test_val_from_csv_drops_invalid_points(pascal_root: Path) -> None:
    ds = PFPascal(pascal_root, split="val", image_size=64)
    pair = ds[0]
    assert pair.n_kps == 2  # the third source point has x = -1
    np.testing.assert_allclose(
        pair.src_kps.numpy(), [[4 * 64 / 40, 5 * 64 / 30], [10 * 64 / 40, 12 * 64 / 30]], rtol=1e-6
    )
    assert pair.threshold == 64.0
    batch = collate_pairs([pair, pair])
    assert batch.src_kps.shape == (2, 2, 2) and batch.threshold.tolist() == [64.0, 64.0]


def test_missing_root_and_split(tmp_path: Path, pascal_root: Path) -> None:
    with pytest.raises(
        DatasetNotFoundError, match=r"(?s)PF-dataset-PASCAL/JPEGImages.*sdm download pfpascal"
    ):
        PFPascal(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"(?s)test_pairs\.csv.*sdm download pfpascal"):
        PFPascal(pascal_root, split="test")


def test_unknown_category(pascal_root: Path) -> None:
    with pytest.raises(ValueError, match="aeroplane, bicycle"):
        PFPascal(pascal_root, split="trn", category="kitten")


def test_corrupt_and_missing_image(pascal_root: Path) -> None:
    path = pascal_root / "PF-dataset-PASCAL" / "JPEGImages" / "2008_000002.jpg"
    path.write_bytes(b"not a jpeg")
    with pytest.raises(ImageReadError, match=r"2008_000002\.jpg"):
        PFPascal(pascal_root, split="trn")[0]
    path.unlink()
    with pytest.raises(ImageReadError, match=r"image not found: .*2008_000002\.jpg"):
        PFPascal(pascal_root, split="trn")[0]


def test_malformed_mat_and_csv(pascal_root: Path) -> None:
    ann = pascal_root / "PF-dataset-PASCAL" / "Annotations" / "cat" / "2008_000001.mat"
    scipy.io.savemat(ann, {"bbox": np.array([[1, 2, 3, 4]])})
    with pytest.raises(AnnotationError, match=r"2008_000001\.mat: missing field 'kps'"):
        PFPascal(pascal_root, split="trn")[0]
    scipy.io.savemat(ann, {"kps": np.zeros((4, 3)), "bbox": np.array([[1, 2, 3, 4]])})
    with pytest.raises(AnnotationError, match=r"2008_000001\.mat: field 'kps' should be N x 2"):
        PFPascal(pascal_root, split="trn")[0]
    (pascal_root / "test_pairs.csv").write_text("source_image,target_image,class\na.jpg,b.jpg,25\n")
    with pytest.raises(AnnotationError, match=r"test_pairs\.csv, line 2, field class: 25"):
        PFPascal(pascal_root, split="test")
    (pascal_root / "test_pairs.csv").write_text("source_image,class\na.jpg,2\n")
    with pytest.raises(AnnotationError, match=r"test_pairs\.csv: missing column\(s\) \['target_image'\]"):
        PFPascal(pascal_root, split="test")


def test_original_image_is_flipped_before_dinov2(pascal_root: Path) -> None:
    """CPM's DINOv2 input: the stored image at its own size, flipped first for flipped pairs (the authors'
    pre_compute_dino_feature.py:59-61)."""
    ds = PFPascal(pascal_root, split="trn", image_size=(16, 24))
    plain, flipped = ds[0], ds[1]
    original = np.asarray(ds.original_image(plain.src_id))
    assert original.shape == (30, 40, 3)  # (H, W) of the stored file, not the resized input
    stored = np.asarray(Image.open(pascal_root / "PF-dataset-PASCAL" / "JPEGImages" / "2008_000001.jpg").convert("RGB"))
    assert np.array_equal(original, stored)
    assert np.array_equal(np.asarray(ds.original_image(flipped.src_id)), stored[:, ::-1])
