"""Bad input: the error says what is wrong and where (layout and download command, path, file and field)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdm.data import (
    AnnotationError,
    DatasetNotFoundError,
    ImageReadError,
    PFWillow,
    SPair71k,
    collate_pairs,
    load_dataset,
    load_images,
)
from sdm.data.base import as_hw

NAME = "000001-2008_000001-2008_000002:cat"


def _annotation(**overrides: object) -> dict[str, object]:
    ann: dict[str, object] = {
        "pair_id": 1,
        "src_imname": "2008_000001.jpg",
        "trg_imname": "2008_000002.jpg",
        "src_imsize": [40, 30, 3],
        "trg_imsize": [50, 20, 3],
        "src_bndbox": [1, 2, 30, 25],
        "trg_bndbox": [5, 1, 45, 19],
        "category": "cat",
        "src_kps": [[3, 4], [20, 10]],
        "trg_kps": [[10, 5], [40, 15]],
        "viewpoint_variation": 2,
        "scale_variation": 1,
        "truncation": 0,
        "occlusion": 3,
    }
    ann.update(overrides)
    return ann


@pytest.fixture
def spair_root(tmp_path: Path) -> Path:
    (tmp_path / "JPEGImages" / "cat").mkdir(parents=True)
    for name, size in (("2008_000001.jpg", (40, 30)), ("2008_000002.jpg", (50, 20))):
        Image.fromarray(np.full((size[1], size[0], 3), 128, dtype=np.uint8)).save(
            tmp_path / "JPEGImages" / "cat" / name
        )
    (tmp_path / "PairAnnotation" / "test").mkdir(parents=True)
    (tmp_path / "PairAnnotation" / "test" / f"{NAME}.json").write_text(json.dumps(_annotation()))
    (tmp_path / "Layout" / "large").mkdir(parents=True)
    (tmp_path / "Layout" / "large" / "test.txt").write_text(NAME + "\n")
    return tmp_path


def test_spair_fixture_reads_flags(spair_root: Path) -> None:
    pair = SPair71k(spair_root, image_size=(60, 100))[0]
    flags = {k: pair.extra[k] for k in ("viewpoint_variation", "scale_variation", "truncation", "occlusion")}
    assert flags == {"viewpoint_variation": 2, "scale_variation": 1, "truncation": 0, "occlusion": 3}
    # target box 40 x 18 px in a 50 x 20 image -> 80 x 54 in a 100 x 60 one
    assert pair.threshold == pytest.approx(80.0)


def test_spair_missing_root_and_split(tmp_path: Path, spair_root: Path) -> None:
    with pytest.raises(
        DatasetNotFoundError, match=r"(?s)SPair-71k root not found.*Layout/large.*sdm download spair"
    ):
        SPair71k(tmp_path / "absent")
    with pytest.raises(
        DatasetNotFoundError, match=r"(?s)trn\.txt.*PairAnnotation/\{trn,val,test\}.*sdm download spair"
    ):
        SPair71k(spair_root, split="trn")
    with pytest.raises(ValueError, match="valid: trn, val, test"):
        SPair71k(spair_root, split="train")  # type: ignore[arg-type]


def test_spair_listed_annotation_missing(spair_root: Path) -> None:
    (spair_root / "PairAnnotation" / "test" / f"{NAME}.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"000001-2008_000001-2008_000002:cat\.json"):
        SPair71k(spair_root)


@pytest.mark.parametrize(
    ("ann", "pattern"),
    [
        ("{not json", r"\.json: not valid JSON"),
        (
            {k: v for k, v in _annotation().items() if k != "trg_bndbox"},
            r"\.json: missing field 'trg_bndbox'",
        ),
        (_annotation(src_kps=[[1, 2, 3]]), r"\.json: field 'src_kps' should be K x 2"),
        (_annotation(trg_kps=[[1, 2]]), r"\.json: fields 'src_kps' and 'trg_kps' differ in length"),
        (_annotation(src_bndbox=["a", 1, 2, 3]), r"\.json: field 'src_bndbox' is not numeric"),
        (_annotation(category="unicorn"), r"\.json: field 'category' is 'unicorn'"),
    ],
)
def test_spair_malformed_annotation(spair_root: Path, ann: object, pattern: str) -> None:
    path = spair_root / "PairAnnotation" / "test" / f"{NAME}.json"
    path.write_text(ann if isinstance(ann, str) else json.dumps(ann))
    with pytest.raises(AnnotationError, match=pattern):
        SPair71k(spair_root)


def test_spair_unknown_category(spair_root: Path) -> None:
    with pytest.raises(
        ValueError, match=r"unknown category 'kitten'; valid categories: aeroplane, bicycle, .*tvmonitor"
    ):
        SPair71k(spair_root, category="kitten")


def test_spair_corrupt_and_missing_image(spair_root: Path) -> None:
    image = spair_root / "JPEGImages" / "cat" / "2008_000002.jpg"
    image.write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(ImageReadError, match=r"cannot read image .*cat/2008_000002\.jpg"):
        SPair71k(spair_root)[0]
    image.unlink()
    with pytest.raises(ImageReadError, match=r"image not found: .*cat/2008_000002\.jpg"):
        SPair71k(spair_root)[0]


def test_images_read_side_by_side_equal_and_fail_as_one_by_one(spair_root: Path) -> None:
    """`load_images` (threads) gives the images `load_image` gives, in the order asked, and a corrupt file still
    raises ImageReadError naming it."""
    ramp = np.linspace(0, 255, 40 * 30 * 3).astype(np.uint8).reshape(30, 40, 3)
    Image.fromarray(ramp).save(spair_root / "JPEGImages" / "cat" / "2008_000001.jpg")
    ds = SPair71k(spair_root, image_size=32)
    ids = ["cat/2008_000002", "cat/2008_000001", "cat/2008_000002"]
    want = [ds.load_image(i) for i in ids]
    assert not torch.equal(want[0], want[1])  # two different images: a swapped order would show
    for threads in (1, 3):
        got = load_images(ds, ids, threads=threads)
        assert got.shape == (3, 3, 32, 32) and all(torch.equal(g, w) for g, w in zip(got, want))
    (spair_root / "JPEGImages" / "cat" / "2008_000001.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(ImageReadError, match=r"cannot read image .*cat/2008_000001\.jpg"):
        load_images(ds, ids, threads=3)


def test_pfwillow_missing_and_malformed(tmp_path: Path) -> None:
    with pytest.raises(
        DatasetNotFoundError, match=r"(?s)PF-Willow root not found.*PF-dataset/<class>.*sdm download pfwillow"
    ):
        PFWillow(tmp_path / "absent")
    with pytest.raises(DatasetNotFoundError, match=r"(?s)test_pairs\.csv.*sdm download pfwillow"):
        PFWillow(tmp_path)
    cols = [f"{a}{i}" for a in ("XA", "YA", "XB", "YB") for i in range(1, 11)]
    (tmp_path / "test_pairs.csv").write_text("imageA,imageB\nPF-WILLOW/a/x.png,PF-WILLOW/a/y.png\n")
    with pytest.raises(AnnotationError, match=r"test_pairs\.csv: missing column\(s\) \['XA1'"):
        PFWillow(tmp_path)
    row = ",".join(["1.0"] * 40)
    (tmp_path / "test_pairs.csv").write_text(
        f"imageA,imageB,{','.join(cols)}\nwillow/x.png,PF-WILLOW/a/y.png,{row}\n"
    )
    with pytest.raises(
        AnnotationError, match=r"test_pairs\.csv, line 2, field imageA: expected PF-WILLOW/<class>/<file>"
    ):
        PFWillow(tmp_path)


def test_misc_bad_arguments() -> None:
    with pytest.raises(ValueError, match="at least one pair"):
        collate_pairs([])
    with pytest.raises(ValueError, match="image_size"):
        as_hw((0, 5))
    with pytest.raises(ValueError, match="valid: spair, spair-u, pfpascal, pfwillow, cub, ap10k, synthetic"):
        load_dataset("imagenet", "data")  # type: ignore[arg-type]
