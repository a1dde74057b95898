"""The dataset registry: name -> class, and the functions that read it (`load_dataset`, `infer_dataset`,
`dataset_record`). A new dataset is its module and a `register_dataset` call; the built-in ones are listed here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdm.config import DATASET_NAMES, DatasetName, enrol

from .ap10k import AP10K
from .base import ImageSize, PairDataset, PairSubset
from .cub import CUB200
from .errors import DatasetNotFoundError
from .pfpascal import PFPascal
from .pfwillow import PFWillow
from .spair import SPair71k
from .spair_u import SPairU
from .synthetic import SyntheticPairs

# The registry: name -> class. The CLI's --dataset choices, `load_dataset`, `infer_dataset` and `dataset_record`
# read it; a new dataset is its module plus one line here.
DATASETS: dict[str, type[PairDataset]] = {
    "spair": SPair71k,
    "spair-u": SPairU,
    "pfpascal": PFPascal,
    "pfwillow": PFWillow,
    "cub": CUB200,
    "ap10k": AP10K,
    "synthetic": SyntheticPairs,
}
# Synthetic "splits" are disjoint seeds, so trn / val / test never share a pair: split -> (seed, n).
SYNTHETIC_SPLITS: dict[str, tuple[int, int]] = {"trn": (0, 512), "val": (1, 64), "test": (2, 64)}


def register_dataset(name: str, cls: type[PairDataset]) -> type[PairDataset]:
    """Adds a dataset: a `PairDataset` subclass built as `cls(root, split=..., image_size=..., category=...)`, with
    `recognises(root)` when `infer_dataset` should tell it from a folder. `load_dataset(name, ...)`, `infer_dataset`,
    `dataset_record` and the command line's `--dataset` then take it."""
    enrol(DATASETS, name, cls, DATASET_NAMES)
    return cls


def load_dataset(
    name: DatasetName,
    root: str | Path | None = None,
    split: str = "test",
    image_size: ImageSize = 768,
    category: str | None = None,
    **kwargs: Any,
) -> PairDataset:
    """Build a dataset by registry name.

    ``root`` is the dataset folder (unused for "synthetic"); PF-Willow has only the "test" split. For
    "synthetic", ``split`` picks (seed, n) from SYNTHETIC_SPLITS, ``category`` restricts the photographs,
    and ``kwargs`` (n, seed, n_kps, photometric) override; for the others kwargs are passed on as is.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    if name == "synthetic":
        if split not in SYNTHETIC_SPLITS:
            raise ValueError(f"unknown synthetic split {split!r}; valid: {', '.join(SYNTHETIC_SPLITS)}")
        seed, n = SYNTHETIC_SPLITS[split]
        options: dict[str, Any] = {"seed": seed, "n": n, "photos": [category] if category else None, **kwargs}
        return SyntheticPairs(image_size=image_size, **options)
    if root is None:
        raise ValueError(f"dataset {name!r} needs a root folder (see data/README.md)")
    return DATASETS[name](root, split=split, image_size=image_size, category=category, **kwargs)


def infer_dataset(root: str | Path) -> DatasetName:
    """The dataset a folder holds, from its layout (SPair-71k: PairAnnotation/ + Layout/; PF-Pascal:
    PF-dataset-PASCAL/; PF-Willow: PF-dataset/ + test_pairs.csv); a ValueError saying what was found otherwise."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFoundError(f"dataset folder not found: {root}")
    for name, cls in DATASETS.items():
        if cls.recognises(root):
            return name
    named = ", ".join(n for n in DATASETS if n != "synthetic")
    raise ValueError(
        f"cannot tell which dataset {root} holds (none of the registered layouts, data/README.md): name it with --dataset {named}"
    )


def dataset_record(dataset: Any) -> dict[str, Any]:
    """What a dataset (or a `PairSubset` of one) is, for metadata and protocol records: registry name, split,
    pairs used and pairs in the split."""
    base = getattr(dataset, "dataset", dataset) if isinstance(dataset, PairSubset) else dataset
    name = next((n for n, cls in DATASETS.items() if type(base) is cls), type(base).__name__)
    split = getattr(base, "split", None)
    if isinstance(base, SyntheticPairs):
        split = next((s for s, (seed, n) in SYNTHETIC_SPLITS.items() if (seed, n) == (base.seed, len(base))), f"seed {base.seed}")
    return {"dataset": name, "split": split, "pairs": len(dataset), "split_pairs": len(base)}


__all__ = ["DATASETS", "SYNTHETIC_SPLITS", "dataset_record", "infer_dataset", "load_dataset", "register_dataset"]
