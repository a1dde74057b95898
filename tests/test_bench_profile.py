"""The benchmark's profile readers (benchmarks/bench.py) count the GPU's kernels, not the GPU-side ranges of
`record_function` annotations: round 10's CPM profile showed the GPU "busy 130 %" because `sdm.evaluate.predict`'s
range (2.9 s) was summed with the kernels it spans (2.5 s)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
CUDA, CPU = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU


def _bench():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module("bench")
    finally:
        sys.path.remove(str(BENCHMARKS))


def _event(name: str, device, start_us: int, end_us: int, annotation: bool = False) -> SimpleNamespace:
    return SimpleNamespace(name=name, device_type=device, is_user_annotation=annotation, cpu_parent=None,
                           time_range=SimpleNamespace(start=start_us, end=end_us), self_device_time_total=end_us - start_us)


def test_gpu_time_leaves_out_annotation_ranges() -> None:
    bench = _bench()
    # two kernels of 3 ms with 4 ms idle between them, all inside one annotated batch; the host reads data meanwhile
    events = [
        _event("sdm.evaluate.predict", CUDA, 0, 10_000, annotation=True),
        _event("conv", CUDA, 0, 3_000),
        _event("attention", CUDA, 7_000, 10_000),
        _event("sdm.evaluate.next_batch", CPU, 3_000, 7_000),
    ]
    kernels = bench.gpu_kernels(events)
    assert [e.name for e in kernels] == ["conv", "attention"]
    assert sum(e.self_device_time_total for e in kernels) == 6_000  # 6 ms busy, not 16
    text = bench.gpu_gaps(SimpleNamespace(events=lambda: events))
    assert "between its first and last kernel 4.0 ms in 1 gaps" in text
    assert "sdm.evaluate.next_batch 4.0 ms" in text
