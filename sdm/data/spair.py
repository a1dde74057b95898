"""SPair-71k (Min et al., 2019): 18 categories; trn / val / test = 53,340 / 5,384 / 12,234 pairs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from sdm.metrics import spair_threshold

from .base import FilePairDataset, ImageSize, Pair, valid_point_mask
from .errors import AnnotationError
from .geoaware import SPAIR_GEO_AWARE, GeoAwareReading, GeoPair, subset_flags
from .layouts import SPAIR_LAYOUT

SPAIR_CATEGORIES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "train", "tvmonitor",
)  # fmt: skip
SPairSplit = Literal["trn", "val", "test"]
# Pair-level difficulty annotations of the official JSON files; absent ones become None.
_DIFFICULTY_FIELDS: tuple[str, ...] = ("viewpoint_variation", "scale_variation", "truncation", "occlusion")



@dataclass(frozen=True)
class SPairRecord:
    """One pair annotation, original pixels: points K x 2 (x, y), boxes (x1, y1, x2, y2)."""

    name: str
    category: str
    src_imname: str
    trg_imname: str
    src_kps: np.ndarray
    trg_kps: np.ndarray
    src_bbox: np.ndarray
    trg_bbox: np.ndarray
    flags: dict[str, int | None]
    kps_ids: tuple[int, ...] | None = None  # each point's keypoint id ("kps_ids"; None when the file lacks it)


def _field(ann: dict[str, Any], key: str, path: Path) -> Any:
    if key not in ann:
        raise AnnotationError(f"{path}: missing field {key!r}")
    return ann[key]


def _array(ann: dict[str, Any], key: str, path: Path, shape: tuple[int | None, ...]) -> np.ndarray:
    """Field ``key`` as a float array of ``shape`` (None = any length), else an AnnotationError."""
    value = _field(ann, key, path)
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise AnnotationError(f"{path}: field {key!r} is not numeric ({err})") from err
    if arr.ndim == 1 and len(shape) == 2 and arr.size == 0:
        arr = arr.reshape(0, shape[1] or 0)
    if arr.ndim != len(shape) or any(s is not None and s != a for s, a in zip(shape, arr.shape)):
        want = " x ".join("K" if s is None else str(s) for s in shape)
        raise AnnotationError(f"{path}: field {key!r} should be {want}, got shape {arr.shape}")
    return arr


def parse_spair_annotation(path: Path, ann: Any = None) -> SPairRecord:
    """Read one SPair-71k PairAnnotation JSON file (`ann`: its content, when already read)."""
    if ann is None:
        try:
            ann = json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:
            raise AnnotationError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(ann, dict):
        raise AnnotationError(f"{path}: expected a JSON object")
    src_kps = _array(ann, "src_kps", path, (None, 2))
    trg_kps = _array(ann, "trg_kps", path, (None, 2))
    if len(src_kps) != len(trg_kps):
        raise AnnotationError(
            f"{path}: fields 'src_kps' and 'trg_kps' differ in length ({len(src_kps)} vs {len(trg_kps)})"
        )
    category = str(_field(ann, "category", path))
    if category not in SPAIR_CATEGORIES:
        raise AnnotationError(
            f"{path}: field 'category' is {category!r}, not one of {', '.join(SPAIR_CATEGORIES)}"
        )
    flags = {}
    for key in _DIFFICULTY_FIELDS:
        v = ann.get(key)
        flags[key] = None if v is None else int(v)
    return SPairRecord(
        name=Path(path).stem,
        category=category,
        src_imname=str(_field(ann, "src_imname", path)),
        trg_imname=str(_field(ann, "trg_imname", path)),
        src_kps=src_kps,
        trg_kps=trg_kps,
        src_bbox=_array(ann, "src_bndbox", path, (4,)),
        trg_bbox=_array(ann, "trg_bndbox", path, (4,)),
        flags=flags,
        kps_ids=_kps_ids(ann, path, len(src_kps)),
    )


def _kps_ids(ann: dict[str, Any], path: Path, n: int) -> tuple[int, ...] | None:
    if ann.get("kps_ids") is None:
        return None
    ids = tuple(int(i) for i in ann["kps_ids"])
    if len(ids) != n:
        raise AnnotationError(f"{path}: field 'kps_ids' has {len(ids)} ids for {n} points")
    return ids


class SPair71k(FilePairDataset):
    """SPair-71k pairs of one split (optionally one category) as Pair samples.

    ``threshold`` = max(h, w) of the target bounding box after resizing (per-axis scale).
    Ids: src_id/trg_id "<category>/<image stem>", pair_id the annotation name
    ("000001-2011_001863-2010_002195:pottedplant"). ``extra``: src_bbox, trg_bbox (float 4, x1 y1 x2 y2 in
    resized pixels) and the difficulty flags viewpoint_variation, scale_variation, truncation, occlusion
    (int, or None when the annotation lacks them). Annotations are read at construction.
    """

    threshold_mode = "trg-bbox"  # the standard PCK threshold (sdm.metrics.THRESHOLDS)
    title, layout, download_name, splits = "SPair-71k", SPAIR_LAYOUT, "spair", ("trn", "val", "test")

    def __init__(self, root: str | Path, split: SPairSplit = "test", category: str | None = None, image_size: ImageSize = 768) -> None:
        self.open_root(root, split, image_size, category, SPAIR_CATEGORIES)
        self.image_root = self.root  # the folder holding JPEGImages/
        list_path = self.root / "Layout" / "large" / f"{split}.txt"
        if not list_path.is_file():
            raise self.missing(f"{split} pair list", list_path)
        names = [ln.strip() for ln in list_path.read_text().splitlines() if ln.strip()]
        ann_dir = self.root / "PairAnnotation" / split
        self.records: list[SPairRecord] = []
        for name in names:
            # The category is the name's suffix after ':'; filter before parsing to keep one-category loads fast.
            if category is not None and name.rsplit(":", 1)[-1] != category:
                continue
            path = ann_dir / f"{name}.json"
            if not path.is_file():
                raise self.missing(f"annotation listed in {list_path}", path)
            self.records.append(parse_spair_annotation(path))
        self.categories = sorted({r.category for r in self.records})

    @staticmethod
    def recognises(root: Path) -> bool:
        images = root / "JPEGImages"
        return (root / "Layout").is_dir() or ((root / "PairAnnotation").is_dir() and any((images / c).is_dir() for c in SPAIR_CATEGORIES))

    def image_file(self, image_id: str) -> Path:
        return self.image_root / "JPEGImages" / f"{image_id}.jpg"

    @staticmethod
    def _ids(r: SPairRecord) -> tuple[str, str]:
        return f"{r.category}/{Path(r.src_imname).stem}", f"{r.category}/{Path(r.trg_imname).stem}"

    def image_ids(self) -> list[str]:
        ids = [i for r in self.records for i in self._ids(r)]
        return list(dict.fromkeys(ids))

    def _scaled(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        r = self.records[i]
        src_id, trg_id = self._ids(r)
        keep = valid_point_mask(r.src_kps, r.trg_kps)
        return (
            self.resized_points(r.src_kps[keep], src_id),
            self.resized_points(r.trg_kps[keep], trg_id),
            self.resized_box(r.src_bbox, src_id),
            self.resized_box(r.trg_bbox, trg_id),
        )

    def __getitem__(self, i: int) -> Pair:
        r = self.records[i]
        src_id, trg_id = self._ids(r)
        src_kps, trg_kps, src_box, trg_box = self._scaled(i)
        if float(spair_threshold(trg_box)) <= 0:
            raise AnnotationError(
                f"SPair-71k pair {r.name}: field 'trg_bndbox' is empty ({r.trg_bbox.tolist()})"
            )
        return self.make_pair(
            (src_id, trg_id), (src_kps, trg_kps), (self.stored_size(src_id), self.stored_size(trg_id)), category=r.category,
            pair_id=r.name, extra={"src_bbox": src_box, "trg_bbox": trg_box, **r.flags},
        )  # fmt: skip

    def geo_aware_flags(self, reading: GeoAwareReading = "authors") -> dict[str, list[bool]]:
        """pair_id -> for each of the pair's points, whether it is in GeoAware-SC's geometry-aware subset
        (`sdm.data.geoaware`). Reads each image's visible keypoints from ImageAnnotation/<category>/<image>.json
        (its "kps": id -> [x, y] or null) and each pair's point ids from the pair annotation's "kps_ids"."""
        visible = {i: self._visible_ids(i) for i in self.image_ids()}
        pairs = []
        for r in self.records:
            if r.kps_ids is None:
                raise AnnotationError(f"SPair-71k pair {r.name}: the annotation has no 'kps_ids'; the geometry-aware subset needs them")
            keep = valid_point_mask(r.src_kps, r.trg_kps)
            src, trg = self._ids(r)
            pairs.append(GeoPair(r.name, r.category, visible[src], visible[trg], [k for k, kept in zip(r.kps_ids, keep) if kept]))
        return subset_flags(pairs, SPAIR_GEO_AWARE.__getitem__, reading)

    def _visible_ids(self, image_id: str) -> set[int]:
        path = self.root / "ImageAnnotation" / f"{image_id}.json"
        if not path.is_file():
            raise self.missing("image annotation (the geometry-aware subset reads ImageAnnotation/)", path)
        try:
            kps = json.loads(path.read_text())["kps"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise AnnotationError(f"{path}: expected a JSON object with a 'kps' object ({err})") from err
        return {int(k) for k, v in kps.items() if v is not None}


__all__ = [
    "SPAIR_CATEGORIES",
    "SPair71k",
    "SPairRecord",
    "parse_spair_annotation",
]
