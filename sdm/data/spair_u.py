"""SPair-U (Mariotti et al., "Jamais Vu", NeurIPS 2025): SPair-71k's test pairs relabelled with keypoints that
no SPair-71k training pair has, to measure how matching generalises to unseen semantic points.

The annotations replace SPair-71k's test annotation folder; the images are SPair-71k's. Two layouts are read:
the release's folder (pair files in the format of SPair-71k's PairAnnotation/test), and the one Jamais Vu's
code reads (utils/utils_dataset.py, `load_spair_data(unseen_kps=True)`): ExtraPairAnnotation/test and
ExtraImageAnnotation/<category>/<image>.json inside the SPair-71k folder. When a pair file has no
src_kps / trg_kps, the points come from the two images' annotations ("kps": {"0": [x, y] or null, ...}): the
keypoint ids visible in both images, in id order, as their code pairs them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .base import ImageSize
from .errors import AnnotationError
from .spair import SPAIR_CATEGORIES, SPair71k, SPairRecord, parse_spair_annotation

SPAIR_U_LAYOUT = """\
<root>/                                   SPair-U's extracted annotations, either
  PairAnnotation/test/<pair>.json         (the release: SPair-71k's test format), with
  ImageAnnotation/<category>/<image>.json (when pair files carry no src_kps / trg_kps)
or the SPair-71k folder itself holding
  ExtraPairAnnotation/test/<pair>.json and ExtraImageAnnotation/<category>/<image>.json (Jamais Vu's code)
images: <spair_root>/JPEGImages/<category>/<image>.jpg of SPair-71k (spair_root: default <root>/../SPair-71k,
or <root> itself when it holds JPEGImages/)
"""


_SPAIR_U_URL = "https://groups.inf.ed.ac.uk/hbilen-data/data/JamaisVuData/SPair-U.zip"


def _image_points(path: Path) -> dict[int, tuple[float, float]]:
    """Keypoint id -> (x, y) of one image annotation's "kps" (null entries are invisible points)."""
    try:
        kps = json.loads(path.read_text())["kps"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise AnnotationError(f"{path}: cannot read the image's keypoints 'kps' ({err})") from err
    return {int(k): (float(v[0]), float(v[1])) for k, v in kps.items() if v is not None}


class SPairU(SPair71k):
    """SPair-U's test pairs (optionally one category) as Pair samples, with SPair-71k's images, ids, boxes and
    threshold (max side of the target box)."""

    title, layout, splits = "SPair-U", SPAIR_U_LAYOUT, ("test",)
    # Jamais Vu's protocol (github VICO-UoE/JamaisVu d236e73): max(h, w) of the target box, measured after an aspect-preserving resize with padding
    # (utils/utils_dataset.py:13-30, 265-267; pck_train.py:230-240), which scales distances and threshold alike:
    # the original frame. Per image, each category's pairs averaged, categories weighted by their pairs
    # (utils/logger.py:25-44, 64-75): the mean over all pairs, sdm's "all" row.
    standard_frame = "original"

    def download_hint(self) -> str:
        return (f"Get the annotations from {_SPAIR_U_URL} (github VICO-UoE/JamaisVu, terms as SPair-71k's) and the images "
                "with `sdm download spair --root data/`.")  # fmt: skip

    def __init__(
        self, root: str | Path, split: str = "test", image_size: ImageSize = 768, category: str | None = None,
        spair_root: str | Path | None = None,
    ) -> None:  # fmt: skip
        self.open_root(root, split, image_size, category, SPAIR_CATEGORIES)
        found = [(p, i) for p, i in (("PairAnnotation", "ImageAnnotation"), ("ExtraPairAnnotation", "ExtraImageAnnotation"))
                 if (self.root / p / split).is_dir()]  # fmt: skip
        if not found:
            raise self.missing("test annotations", self.root / "PairAnnotation" / split)
        pair_dir, self._image_ann = self.root / found[0][0] / split, self.root / found[0][1]
        images = Path(spair_root) if spair_root is not None else (self.root if (self.root / "JPEGImages").is_dir() else self.root.parent / "SPair-71k")
        if not (images / "JPEGImages").is_dir():
            raise self.missing("images (SPair-71k's JPEGImages/, spair_root)", images / "JPEGImages")
        self.image_root = images
        paths = sorted(pair_dir.glob("*.json"))
        self.records = [self._record(p) for p in paths if category is None or p.stem.rsplit(":", 1)[-1] == category]
        self.categories = sorted({r.category for r in self.records})

    @staticmethod
    def recognises(root: Path) -> bool:  # the release's folder (inside SPair-71k/, name the dataset)
        return (root / "PairAnnotation").is_dir() and not (root / "Layout").is_dir() and not (root / "JPEGImages").is_dir()

    def _record(self, path: Path) -> SPairRecord:
        try:
            ann = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise AnnotationError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(ann, dict) or ("src_kps" in ann and "trg_kps" in ann):
            return parse_spair_annotation(path, ann)
        # points from the image annotations: ids visible in both images, in id order
        base = parse_spair_annotation(path, {**ann, "src_kps": [], "trg_kps": []})
        src = _image_points(self._image_ann / base.category / f"{Path(base.src_imname).stem}.json")
        trg = _image_points(self._image_ann / base.category / f"{Path(base.trg_imname).stem}.json")
        ids = sorted(set(src) & set(trg))
        return SPairRecord(
            base.name, base.category, base.src_imname, base.trg_imname,
            np.asarray([src[k] for k in ids], dtype=np.float64).reshape(-1, 2),
            np.asarray([trg[k] for k in ids], dtype=np.float64).reshape(-1, 2),
            base.src_bbox, base.trg_bbox, base.flags,
        )  # fmt: skip


__all__ = [
    "SPairU",
]
