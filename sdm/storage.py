"""Keeping what was computed: `FeatureStore`, a bounded in-memory store of per-image tensors, and `atomic_write`,
which writes files so that a crash never leaves half of one (prompts, training checkpoints and logs)."""

from __future__ import annotations

import os
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


def atomic_write(path: Path, write: Callable[[str], Any]) -> None:
    """Calls `write(tmp)` on a temporary file in the same folder, then renames it to `path`, so a crash never
    leaves half a file (prompts, training checkpoints and logs all go through here)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide checkpoints from colleagues
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class FeatureStore:
    """Per-image tensors (features, VAE posteriors, optimised embeddings), computed once and reused: an explicit,
    bounded store, in the spirit of segment-anything's `set_image` / `reset_image`.

    `put(key, value)` stores, `get(key)` returns the stored tensor or None, `reset()` forgets everything (call it
    when the model or the prompt behind the values changes). Beyond `capacity` entries the least recently used
    are dropped, except the keys held by `hold(keys)` (the current batch's): a store smaller than a batch keeps
    what that batch needs until it is done.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"a FeatureStore holds at least 1 entry; got capacity {capacity}")
        self.capacity = capacity
        self._items: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self._held: frozenset[Hashable] = frozenset()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def get(self, key: Hashable) -> torch.Tensor | None:
        if key not in self._items:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return self._items[key]

    def put(self, key: Hashable, value: torch.Tensor) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        self._evict()

    def fetch(self, keys: Sequence[Hashable], compute: Callable[[list[int]], torch.Tensor], batch: int = 1) -> torch.Tensor:
        """The values of `keys`, stacked (len(keys) x ...). Keys not kept are computed by `compute(indices)`
        (their positions in `keys`; it returns one row per index), `batch` at a time, and kept. Every call gets
        exactly `batch` indices (the last group is padded with its last index, whose extra rows are dropped):
        batched kernels round differently at other batch sizes, so a value is then the same bits whichever batch
        (or evaluation process) meets it first. `batch` 1 computes each key alone."""
        if batch < 1:
            raise ValueError(f"fetch computes at least 1 key per call; got batch {batch}")
        with self.hold(keys):
            missing: dict[Hashable, int] = {}
            for i, key in enumerate(keys):
                if key not in self._items:
                    missing.setdefault(key, i)
            self.misses += len(missing)
            todo = list(missing.items())
            for start in range(0, len(todo), batch):
                group = todo[start : start + batch]
                indices = [i for _, i in group]
                rows = compute(indices + [indices[-1]] * (batch - len(indices)))
                for (key, _), row in zip(group, rows[: len(group)], strict=True):
                    self.put(key, row)
            self.hits += len(keys) - len(missing)
            values = [self._items[key] for key in keys]
            for key in keys:
                self._items.move_to_end(key)
        return torch.stack(values)

    @contextmanager
    def hold(self, keys: Iterable[Hashable]) -> Iterator[None]:
        """Within the block, `keys` are never dropped."""
        previous = self._held
        self._held = previous | frozenset(keys)
        try:
            yield
        finally:
            self._held = previous
            self._evict()

    def reset(self) -> None:
        self._items.clear()
        self.hits = self.misses = 0

    def _evict(self) -> None:
        excess = len(self._items) - self.capacity
        if excess > 0:
            for key in [k for k in self._items if k not in self._held][:excess]:
                del self._items[key]


__all__ = [
    "FeatureStore",
    "atomic_write",
]
