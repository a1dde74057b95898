"""The geometry-aware subset of GeoAware-SC (github Junyi42/GeoAware-SC, 99fd6b6): keypoints whose symmetric
counterparts (left/right, front/back, the four wheels of a car) are also visible in the target, where features
confuse one side with the other.

Data: each category's groups of keypoint ids that are counterparts of one another, as Junyi42/GeoAware-SC's
`utils/utils_geoware.py:6-43` (SPair-71k) and `:45-53` (AP-10K) list them. Rule (Junyi42/GeoAware-SC
`pck_train.py:90-102, 191-209`): a pair's mutually visible point
is geometry-aware when its group has at least two members visible in the target and at least one visible in both
images. PCK on the subset pools its points per category and weights categories by their subset points
(Junyi42/GeoAware-SC `pck_train.py:253-261`, `utils/logger.py:94-96`): one pool over the dataset.

Which ids a group holds is where sdm offers two readings (docs/choices.md):
- "authors" (default): the code's. Junyi42/GeoAware-SC `pck_train.py:97-102` keeps the ids a category uses and
  renumbers the kept groups by counting through them in the order they are listed (`renumber_indices`, Junyi42/GeoAware-SC
  `utils/utils_geoware.py:137-149`), while the keypoints are indexed by their rank among the used ids
  (Junyi42/GeoAware-SC `utils/utils_dataset.py:269-271`). Where a list
  is not in ascending order (SPair-71k's bus, car, pottedplant and tvmonitor; AP-10K) the groups then name other
  keypoints than the list does: AP-10K's [5, 8] (the shoulders) becomes [5, 6] (left shoulder, left elbow).
- "as-listed": the groups as the lists write them, what the paper describes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

from sdm.config import GEO_AWARE_READINGS, GeoAwareReading

Groups = list[int | list[int]]


class GeoPair(NamedTuple):
    """What the subset rule reads of one pair: its id and category, the keypoint ids visible in each image, and the
    ids of the pair's points in their order."""

    pair_id: str
    category: str
    src_visible: set[int]
    trg_visible: set[int]
    point_ids: Sequence[int]

# Junyi42/GeoAware-SC utils/utils_geoware.py:6-43, id by id (an int: a keypoint without counterpart)
SPAIR_GEO_AWARE: dict[str, Groups] = {
    "aeroplane": [0, 1, 2, 3, [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15], [16, 17], [18, 19], [20, 21], 22, 23, 24],
    "bicycle": [0, 1, [2, 3], 4, 5, [6, 7], 8, [9, 10], 13],
    "bird": [0, [1, 2], 3, 4, 5, 6, 7, 8, 9, [10, 11], [12, 13], [14, 15], 16],
    "boat": [0, [1, 2], [3, 4], [5, 6], [7, 8], [9, 10], [11, 12], 13],
    "bottle": [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]],
    "bus": [[0, 1], [2, 3, 5, 6], [4, 7], [10, 13, 20, 23], [11, 14, 21, 24], [12, 15, 22, 25], [16, 17, 26, 27], [18, 19, 28, 29]],
    "car": [[0, 1], [2, 3, 6, 7], [4, 8], [5, 9], [10, 13, 20, 23], [11, 14, 21, 24], [12, 15, 22, 25], [16, 17, 26, 27], [18, 19, 28, 29]],
    "cat": [0, 1, [2, 3], 4, 5, 6, 7, 8, [9, 10, 11, 12], 13, 14],
    "chair": [[0, 1], [2, 3], [4, 5, 6, 7], [8, 9], [10, 11], [12, 13]],
    "cow": [0, 1, [2, 3], 4, 5, 6, 7, 8, [9, 10, 11, 12], 13, 14, [15, 16, 17, 18], [19, 20]],
    "dog": [0, 1, [2, 3], 4, 5, 6, 7, 8, [9, 10, 11, 12], 13, 14, 15],
    "horse": [0, 1, [2, 3], 4, 5, 6, 7, 8, 9, [10, 11, 12, 13], 14, 15, [16, 17, 18, 19]],
    "motorbike": [[0, 1], [2, 3], 4, 5, 6, 7, 8, 9, 10, 11, 12],
    "person": [0, 1, 2, 3, 4, 5, 6, 7, [8, 9], [10, 11], [12, 13], [14, 15], [16, 17], [18, 19]],
    "pottedplant": [[0, 1, 2, 3], [4, 5], [6, 8], 7],
    "sheep": [0, 1, [2, 3], 4, 5, 6, 7, 8, [9, 10, 11, 12], 13, 14, [15, 16, 17, 18], [19, 20]],
    "train": [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15], [16, 17]],
    "tvmonitor": [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14], [9, 11, 13, 15]],
}

# Junyi42/GeoAware-SC utils/utils_geoware.py:45-53: eyes, nose, neck, root of tail, shoulders, elbows and knees, paws, hips
AP10K_GEO_AWARE: Groups = [0, 1, 2, 3, 4, [5, 8], [6, 9, 12, 15], [7, 10, 13, 16], [11, 14]]


def effective_groups(groups: Groups, used_ids: Iterable[int], reading: GeoAwareReading = "authors") -> list[list[int]]:
    """The groups of keypoint ids that the subset rule looks at, for a category whose pairs use `used_ids` (the ids
    visible in any image of its pairs of the split, Junyi42/GeoAware-SC `utils/utils_dataset.py:269-270`)."""
    if reading not in GEO_AWARE_READINGS:
        raise ValueError(f"unknown geometry-aware reading {reading!r}; choose one of {', '.join(GEO_AWARE_READINGS)}")
    used = sorted(set(int(i) for i in used_ids))
    kept = [[i for i in ([g] if isinstance(g, int) else g) if i in used] for g in groups]
    kept = [g for g in kept if g]
    if reading == "as-listed":
        return kept
    counter = iter(range(len(used)))  # the code's renumbering: counting through the kept groups in list order
    return [[used[next(counter)] for _ in g] for g in kept]


def geo_aware_flags(groups: Sequence[Sequence[int]], pair_ids: Sequence[int], target_visible: Iterable[int]) -> list[bool]:
    """For each point of a pair (its keypoint id in `pair_ids`, visible in both images): whether it is in the
    geometry-aware subset. `target_visible`: the ids visible in the target image."""
    both, target = set(pair_ids), set(target_visible)
    chosen: set[int] = set()
    for group in groups:
        in_both = [i for i in group if i in both]
        if len(in_both) >= 1 and sum(i in target for i in group) >= 2:
            chosen.update(in_both)
    return [i in chosen for i in pair_ids]


def subset_flags(pairs: Sequence[GeoPair], groups_of: Callable[[str], Groups], reading: GeoAwareReading = "authors") -> dict[str, list[bool]]:
    """Each pair's flags (`geo_aware_flags`) under its category's groups, kept to the ids the category's pairs show
    in any of their images (Junyi42/GeoAware-SC utils/utils_dataset.py:269-270) and read as `reading` says.
    `groups_of`: category -> its listed groups."""
    used: dict[str, set[int]] = {}
    for pair in pairs:
        used.setdefault(pair.category, set()).update(pair.src_visible, pair.trg_visible)
    groups = {c: effective_groups(groups_of(c), ids, reading) for c, ids in used.items()}
    return {p.pair_id: geo_aware_flags(groups[p.category], p.point_ids, p.trg_visible) for p in pairs}


__all__ = ["AP10K_GEO_AWARE", "GEO_AWARE_READINGS", "SPAIR_GEO_AWARE", "GeoAwareReading", "GeoPair", "effective_groups", "geo_aware_flags", "subset_flags"]
