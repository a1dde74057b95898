"""PF-Pascal (Ham et al., "Proposal Flow", TPAMI 2018): 20 PASCAL VOC categories; trn / val / test =
2,941 / 308 / 299 pairs in the split lists of Han et al. (SCNet) used by the literature."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.io
import torch
from PIL import Image

from .base import FilePairDataset, ImageSize, Pair, valid_point_mask
from .errors import AnnotationError, missing_root_error, read_csv
from .layouts import PFPASCAL_LAYOUT

# VOC order; the csv's `class` column is the 1-based index into this tuple.
PFPASCAL_CATEGORIES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
PFPascalSplit = Literal["trn", "val", "test"]
IMAGE_DIR = "PF-dataset-PASCAL"
_FLIP_SUFFIX = "|flip"  # image-id suffix of horizontally flipped images (they are different pixels)



@dataclass(frozen=True)
class PascalRecord:
    """One csv row. Points K x 2 (x, y) original pixels, None when the csv has no keypoint columns
    (the trn list): then they come from the .mat annotations."""

    row: int
    src: str
    trg: str
    category: str
    flip: bool
    src_kps: np.ndarray | None
    trg_kps: np.ndarray | None


def _coords(text: Any, csv_path: Path, row: int, col: str) -> np.ndarray:
    """';'-separated numbers -> float array."""
    try:
        return np.array([float(v) for v in str(text).split(";") if v.strip() != ""], dtype=np.float64)
    except ValueError as err:
        raise AnnotationError(
            f"{csv_path}, line {row + 2}, field {col}: not a ';'-separated list of numbers"
        ) from err


def parse_pfpascal_csv(csv_path: str | Path) -> list[PascalRecord]:
    """Parse a PF-Pascal pair list (``{trn,val,test}_pairs.csv``) into records.

    Columns: source_image, target_image, class (1..20, VOC order), optional flip (0/1; the trn list), and
    optional XA, YA, XB, YB (';'-separated x or y coordinates of the pair's points in original pixels).
    Image paths are reduced to their file names (the images all live in PF-dataset-PASCAL/JPEGImages).
    """
    csv_path = Path(csv_path)
    df = read_csv(csv_path, ("source_image", "target_image", "class"))
    kp_cols = ("XA", "YA", "XB", "YB")
    has_kps = all(c in df.columns for c in kp_cols)
    records = []
    for row, r in enumerate(df.to_dict("records")):
        try:
            cls = int(r["class"])
        except (TypeError, ValueError) as err:
            raise AnnotationError(
                f"{csv_path}, line {row + 2}, field class: {r['class']!r} is not an integer"
            ) from err
        if not 1 <= cls <= len(PFPASCAL_CATEGORIES):
            raise AnnotationError(f"{csv_path}, line {row + 2}, field class: {cls} is outside 1..20")
        src_kps = trg_kps = None
        if has_kps:
            xa, ya, xb, yb = (_coords(r[c], csv_path, row, c) for c in kp_cols)
            if not len(xa) == len(ya) == len(xb) == len(yb):
                raise AnnotationError(
                    f"{csv_path}, line {row + 2}, fields XA/YA/XB/YB: different numbers of values"
                )
            src_kps, trg_kps = np.stack([xa, ya], axis=1), np.stack([xb, yb], axis=1)
        flip = r.get("flip", 0)
        records.append(
            PascalRecord(
                row=row,
                src=Path(str(r["source_image"])).name,
                trg=Path(str(r["target_image"])).name,
                category=PFPASCAL_CATEGORIES[cls - 1],
                flip=bool(int(flip)) if pd.notna(flip) else False,
                src_kps=src_kps,
                trg_kps=trg_kps,
            )
        )
    return records


def read_pfpascal_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A PF-Pascal annotation file -> (kps N x 2 (x, y), NaN rows for absent points; bbox 4 (x1, y1, x2, y2))."""
    if not path.is_file():
        raise missing_root_error("PF-Pascal annotation", path, PFPASCAL_LAYOUT, "pfpascal")
    try:
        mat = scipy.io.loadmat(str(path))
    except (ValueError, OSError, TypeError) as err:
        raise AnnotationError(f"{path}: cannot read .mat file ({err})") from err
    for key in ("kps", "bbox"):
        if key not in mat:
            raise AnnotationError(f"{path}: missing field {key!r}")
    kps = np.asarray(mat["kps"], dtype=np.float64)
    if kps.ndim != 2 or kps.shape[1] != 2:
        raise AnnotationError(f"{path}: field 'kps' should be N x 2, got shape {kps.shape}")
    bbox = np.asarray(mat["bbox"], dtype=np.float64).reshape(-1)
    if bbox.shape != (4,):
        raise AnnotationError(
            f"{path}: field 'bbox' should hold 4 numbers, got shape {np.shape(mat['bbox'])}"
        )
    return kps, bbox


class PFPascal(FilePairDataset):
    """PF-Pascal pairs of one split as Pair samples.

    Keypoints: from the csv's XA/YA/XB/YB columns when present (val, test), otherwise from the two images'
    .mat files, matched by row (trn); a correspondence is dropped when either point is NaN or negative.
    ``threshold`` = max(H, W) of the resized target image. Ids: "<image stem>", plus "|flip" for flipped
    images; pair_id "<csv row, from 0>:<src stem>-><trg stem>". ``extra``: flipped (bool), src_bbox and
    trg_bbox (float 4, resized pixels, from the .mat files; None when that file is absent).

    Flip (trn rows with flip = 1; the literature's augmentation): both images are flipped horizontally after
    resizing, and points and boxes follow with x' = W_new - 1 - x, i.e. pixel column c goes to column
    W_new - 1 - c exactly as ``torch.flip`` moves it (some public loaders use W - x, one pixel apart).
    """

    threshold_mode = "image"  # the standard PCK threshold (sdm.metrics.THRESHOLDS)
    title, layout, download_name, splits = "PF-Pascal", PFPASCAL_LAYOUT, "pfpascal", ("trn", "val", "test")

    def __init__(self, root: str | Path, split: PFPascalSplit = "test", image_size: ImageSize = 768, category: str | None = None) -> None:
        self.open_root(root, split, image_size, category, PFPASCAL_CATEGORIES)
        csv_path = self.root / f"{split}_pairs.csv"
        if not csv_path.is_file():
            raise self.missing(f"{split} pair list", csv_path)
        self.records = [r for r in parse_pfpascal_csv(csv_path) if category is None or r.category == category]
        self.categories = sorted({r.category for r in self.records})
        self._files = {Path(n).stem: n for r in self.records for n in (r.src, r.trg)}

    @staticmethod
    def recognises(root: Path) -> bool:
        return (root / "PF-dataset-PASCAL").is_dir()

    def image_file(self, image_id: str) -> Path:
        return self.root / IMAGE_DIR / "JPEGImages" / self._files[image_id.removesuffix(_FLIP_SUFFIX)]

    def _ann_path(self, name: str, category: str) -> Path:
        return self.root / IMAGE_DIR / "Annotations" / category / f"{Path(name).stem}.mat"

    @staticmethod
    def _id(name: str, flip: bool) -> str:
        return Path(name).stem + (_FLIP_SUFFIX if flip else "")

    def image_ids(self) -> list[str]:
        ids = [self._id(n, r.flip) for r in self.records for n in (r.src, r.trg)]
        return list(dict.fromkeys(ids))

    def load_image(self, image_id: str) -> torch.Tensor:
        image = super().load_image(image_id)
        return image.flip(-1) if image_id.endswith(_FLIP_SUFFIX) else image

    def original_image(self, image_id: str) -> Image.Image:
        image = super().original_image(image_id)
        # flipped before DINOv2's preprocessing, as the authors' pre_compute_dino_feature.py:60-61
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if image_id.endswith(_FLIP_SUFFIX) else image

    def _flip_x(self, xy: torch.Tensor, x_cols: tuple[int, ...]) -> torch.Tensor:
        out = xy.clone()
        w_new = self.image_size[1]
        out[..., list(x_cols)] = (w_new - 1) - xy[..., list(x_cols)]
        return out

    def _annotation(self, i: int) -> dict[str, Any]:
        """Resized (and possibly flipped) points and boxes of pair i."""
        r = self.records[i]
        ids = {"src": self._id(r.src, False), "trg": self._id(r.trg, False)}  # the unflipped images' (stored sizes)
        boxes: dict[str, torch.Tensor | None] = {}
        mats: dict[str, np.ndarray] = {}
        for side, name in (("src", r.src), ("trg", r.trg)):
            ann = self._ann_path(name, r.category)
            if r.src_kps is None or ann.is_file():
                kps, box = read_pfpascal_mat(ann)
                mats[side] = kps
                boxes[side] = self.resized_box(box, ids[side])
            else:
                boxes[side] = None
        if r.src_kps is not None and r.trg_kps is not None:
            src_np, trg_np = r.src_kps, r.trg_kps
        else:
            src_np, trg_np = mats["src"], mats["trg"]
            if len(src_np) != len(trg_np):
                raise AnnotationError(
                    f"{self._ann_path(r.src, r.category)} and {self._ann_path(r.trg, r.category)}: "
                    f"field 'kps' has {len(src_np)} vs {len(trg_np)} rows"
                )
        keep = valid_point_mask(src_np, trg_np)
        src_kps, trg_kps = self.resized_points(src_np[keep], ids["src"]), self.resized_points(trg_np[keep], ids["trg"])
        if r.flip:
            src_kps, trg_kps = self._flip_x(src_kps, (0,)), self._flip_x(trg_kps, (0,))
            for side, box in boxes.items():
                if box is not None:
                    # x1 and x2 swap roles under the mirror
                    boxes[side] = self._flip_x(box, (0, 2))[[2, 1, 0, 3]]
        return {"src_kps": src_kps, "trg_kps": trg_kps, "src_bbox": boxes["src"], "trg_bbox": boxes["trg"]}

    def __getitem__(self, i: int) -> Pair:
        r = self.records[i]
        ann = self._annotation(i)
        src_id, trg_id = self._id(r.src, r.flip), self._id(r.trg, r.flip)
        if len(ann["src_kps"]) == 0:
            raise AnnotationError(f"PF-Pascal pair {r.row} ({r.src} -> {r.trg}): no valid keypoint")
        return self.make_pair(
            (src_id, trg_id), (ann["src_kps"], ann["trg_kps"]), (self.stored_size(src_id), self.stored_size(trg_id)), category=r.category,
            pair_id=f"{r.row}:{Path(r.src).stem}->{Path(r.trg).stem}",
            extra={"flipped": r.flip, "src_bbox": ann["src_bbox"], "trg_bbox": ann["trg_bbox"]},
        )  # fmt: skip


__all__ = [
    "IMAGE_DIR",
    "PFPASCAL_CATEGORIES",
    "PFPascal",
    "parse_pfpascal_csv",
    "read_pfpascal_mat",
]
