"""A whole training step as one CUDA graph (`TrainConfig.cuda_graph`).

Training at 9 pairs a step is bound by the host: thousands of kernel launches (prompt encoder, UNet forward and
backward, loss, Adam) take longer to issue than the GPU takes to run them (benchmarks/NOTES.md, rounds 2-4). A
CUDA graph records the step's kernels once and replays them with one launch. The step body is the same function
as the eager step's; only its inputs change between replays, copied into the graph's own tensors first, and its
random draws come from one generator registered with the graph and re-seeded before every replay, so a replay
draws what the eager step of that seed draws.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch

# body(inputs, generator) -> loss: zeroes the gradients, runs forward, backward and the optimiser step
StepBody = Callable[[dict[str, torch.Tensor], torch.Generator], torch.Tensor]


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]  # the graph reads its inputs here
    loss: torch.Tensor  # and writes its loss here


class StepGraphs:
    """Runs training steps as CUDA graphs, one graph per shape of the inputs.

    The first `warmup` steps of each shape run eagerly on a side stream (cuBLAS and cuDNN workspaces, compiled
    code, the optimiser's state are set up there), the next one is captured and every later one replays it. Every
    step, eager or replayed, is a real training step.

    Requirements of `body`: no host synchronisation and no host-to-device copy (capture refuses both); gradients
    already allocated before capture and zeroed in place (`optimizer.zero_grad(set_to_none=False)`), so every graph
    accumulates into the same tensors the optimiser reads; an optimiser built with `capturable=True`.
    """

    def __init__(self, device: torch.device, warmup: int = 2) -> None:
        if device.type != "cuda" or not torch.cuda.is_available():
            raise ValueError(f"cuda_graph needs a CUDA device; this run is on {device}. Set cuda_graph=False.")
        self.device, self.warmup = device, warmup
        self.generator = torch.Generator(device=device)
        self.stream = torch.cuda.Stream(device)
        self.pool = torch.cuda.graph_pool_handle()  # the graphs of all shapes share one pool: they never overlap
        self.graphs: dict[tuple, _Captured] = {}
        self.eager_runs: Counter[tuple] = Counter()

    def __call__(self, body: StepBody, inputs: dict[str, torch.Tensor], seed: int) -> torch.Tensor:
        """One step of `body` on `inputs` (tensors on the device) with draws seeded by `seed`; returns its loss."""
        key = tuple((name, tuple(t.shape), t.dtype) for name, t in sorted(inputs.items()))
        captured = self.graphs.get(key)
        if captured is None and self.eager_runs[key] < self.warmup:
            self.eager_runs[key] += 1
            return self._eager(body, inputs, seed)
        if captured is None:
            captured = self.graphs[key] = self._capture(body, inputs)
        for name, t in inputs.items():
            captured.inputs[name].copy_(t)
        self.generator.manual_seed(seed)
        captured.graph.replay()
        return captured.loss.clone()  # the next replay overwrites it

    def _eager(self, body: StepBody, inputs: dict[str, torch.Tensor], seed: int) -> torch.Tensor:
        self.generator.manual_seed(seed)
        here = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(here)
        with torch.cuda.stream(self.stream):
            loss = body(inputs, self.generator)
        here.wait_stream(self.stream)
        return loss.clone()

    def _capture(self, body: StepBody, inputs: dict[str, torch.Tensor]) -> _Captured:
        static = {name: t.clone() for name, t in inputs.items()}
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(self.generator)
        # "thread_local": the DataLoader's pin-memory thread may allocate pinned memory while the step is captured
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
            loss = body(static, self.generator)
        return _Captured(graph, static, loss)


def pad_rows(t: torch.Tensor, multiple: int) -> torch.Tensor:
    """B x K x ... -> B x K' x ... with K' the next multiple of `multiple`, padded with zeros (keypoint rows: a
    graph per K' instead of one per K)."""
    k = t.shape[1]
    extra = -k % multiple
    if extra == 0:
        return t
    return torch.cat([t, t.new_zeros((t.shape[0], extra, *t.shape[2:]))], dim=1)


__all__ = ["StepBody", "StepGraphs", "pad_rows"]
