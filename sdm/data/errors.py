"""What goes wrong with a dataset on disk, said so that the user can mend it: the error types, and the checks
that raise them (a missing folder shows the expected layout and the download command; a damaged csv row, an
unknown category).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd


class DatasetNotFoundError(FileNotFoundError):
    """A dataset root or one of its split files is missing; the message shows the expected layout."""


class AnnotationError(ValueError):
    """An annotation file is malformed; the message names the file and the field."""


class ImageReadError(OSError):
    """An image is missing, unreadable or corrupt; the message names its path."""


def download_hint(download_name: str) -> str:
    """How to get a dataset that `sdm download` fetches."""
    return f"Get it with `sdm download {download_name} --root data/` (see data/README.md)."


def missing_error(what: str, path: Path, layout: str, hint: str) -> DatasetNotFoundError:
    """Error for a missing dataset file or folder, with the expected layout and how to get it (`hint`)."""
    return DatasetNotFoundError(f"{what} not found: {path}\nExpected layout:\n{layout.rstrip()}\n{hint}")


def missing_root_error(what: str, path: Path, layout: str, download_name: str) -> DatasetNotFoundError:
    """Error for a missing dataset file or folder, with the expected layout and the download command."""
    return missing_error(what, path, layout, download_hint(download_name))


def read_csv(path: Path, columns: Sequence[str]) -> pd.DataFrame:
    """A pair-list csv file with at least `columns`. An AnnotationError names the first row whose field count
    differs from the header's (a truncated or damaged file, whose missing fields would otherwise pass as absent
    keypoints), a file pandas cannot parse, or the missing columns; a missing file raises FileNotFoundError."""
    import csv

    import pandas as pd

    path = Path(path)
    try:
        with open(path, newline="") as fh:
            rows = csv.reader(fh)
            header = next(rows, None)
            for line, row in enumerate(rows, start=2):
                if row and header is not None and len(row) != len(header):
                    raise AnnotationError(
                        f"{path}, line {line}: {len(row)} fields where the header has {len(header)} (a truncated or damaged row)"
                    )
        frame = pd.read_csv(path)
    except UnicodeDecodeError as err:
        raise AnnotationError(f"{path}: not a text csv file ({err})") from err
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise AnnotationError(f"{path}: cannot parse csv ({err})") from err
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise AnnotationError(f"{path}: missing column(s) {missing}; expected {list(columns[:3])}...")
    return frame


def check_category(category: str | None, valid: Sequence[str]) -> str | None:
    """Return ``category`` when it is None or one of ``valid``; otherwise a ValueError listing them."""
    if category is not None and category not in valid:
        raise ValueError(f"unknown category {category!r}; valid categories: {', '.join(valid)}")
    return category


__all__ = [
    "AnnotationError",
    "DatasetNotFoundError",
    "ImageReadError",
    "check_category",
    "download_hint",
    "missing_error",
    "missing_root_error",
    "read_csv",
]
