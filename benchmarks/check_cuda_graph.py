"""Checks on a GPU that `TrainConfig.cuda_graph` trains what the eager loop trains (random weights).

For each case, three runs of `sdm.train.train` from the same prompt and seed: eager, eager again (the GPU's own
run-to-run noise: cuDNN's attention backward and grid_sample's backward may add in no fixed order) and with the
whole step as a CUDA graph. Printed per case: the largest relative difference of the logged losses (every step)
and of the final prompt between eager and eager, and between eager and graph; and between a graph run resumed from
its half-way checkpoint and the uninterrupted graph run.

`--width 16` (the default): every pair has 16 keypoints, so the eager step and the graph see the same shapes and
must agree as closely as two eager runs do (to the bit where those do). `--width 0`: keypoint counts 4..16 vary
from pair to pair, so a run captures graphs of two padded widths (8 and 16); the eager loop pads each batch to
its own largest count instead, the loss then adds its terms over other widths, and the two differ by rounding,
which is reported, not judged. The resumed run must agree with the uninterrupted one in both modes.

    python benchmarks/check_cuda_graph.py [--full] [--compile] [--width 0]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import BenchPairs

from sdm.data import Pair
from sdm.models import sd21_architecture, tiny_stable_diffusion
from sdm.speed import optimize
from sdm.train import TrainConfig, train


class VaryingPairs(BenchPairs):
    """BenchPairs whose pair i keeps its first 4 + i % 13 keypoints."""

    width = 16  # every pair keeps this many keypoints (0: 4 + i % 13)

    def __getitem__(self, i: int) -> Pair:
        pair = super().__getitem__(i)
        n = self.width or 4 + i % 13
        kps = torch.zeros(16, 2)
        return Pair(pair.src_image, pair.trg_image, torch.cat([pair.src_kps, kps])[:16], torch.cat([pair.trg_kps, kps])[:16], n,
                    pair.category, pair.threshold, pair.src_id, pair.trg_id, pair.src_size, pair.trg_size, pair.pair_id)  # fmt: skip


def _run(sd, ds, precision: str, pairs: int, steps: int, graph: bool, out: Path, resume: bool = False, checkpoint_every: int = 10**9):
    cfg = TrainConfig(prompt="single", steps=steps, batch_size=pairs, image_size=ds.image_size[0], mixed_precision=precision,
                      val_every=0, checkpoint_every=checkpoint_every, log_every=1, num_workers=2, cuda_graph=graph)  # fmt: skip
    start = time.perf_counter()
    result = train(cfg, sd, ds, out_dir=out, resume=resume, progress=False)
    return torch.tensor(result.log["loss"].to_list()), result.prompt.tokens.detach().float().cpu(), time.perf_counter() - start


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="also SD2-1's architecture at 768 px, bf16, 9 pairs")
    ap.add_argument("--compile", action="store_true", help="the full-size case with the UNet's blocks compiled")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--width", type=int, default=16, choices=range(17), metavar="0..16", help="keypoints of every pair (0: 4..16, varying)")
    ap.add_argument("--cases", default=None, help="e.g. tiny-bf16,tiny-no")
    args = ap.parse_args()
    print(torch.__version__, torch.cuda.get_device_name(), "| random weights", flush=True)
    cases = [("tiny", "bf16", 9, 64), ("tiny", "fp16", 9, 64), ("tiny", "no", 9, 64)]
    if args.full:
        cases.append(("sd21-architecture", "bf16", 9, 768))
    if args.cases:
        cases = [c for c in cases if f"{c[0]}-{c[1]}" in args.cases.split(",")]
    failures = 0
    VaryingPairs.width = args.width
    for name, precision, pairs, size in cases:
        if name == "tiny":
            sd = tiny_stable_diffusion(0).to("cuda")
        else:
            sd = optimize(sd21_architecture(0, device="cuda", dtype=torch.bfloat16), channels_last=False, compile=args.compile)
        ds = VaryingPairs(12, 48, size, seed=3)
        with tempfile.TemporaryDirectory() as tmp:
            t = Path(tmp)
            loss_a, tok_a, s_a = _run(sd, ds, precision, pairs, args.steps, False, t / "a")
            loss_b, tok_b, _ = _run(sd, ds, precision, pairs, args.steps, False, t / "b")
            loss_g, tok_g, s_g = _run(sd, ds, precision, pairs, args.steps, True, t / "g")
            half = args.steps // 2
            _run(sd, ds, precision, pairs, half, True, t / "r", checkpoint_every=half)
            loss_r, tok_r, _ = _run(sd, ds, precision, pairs, args.steps, True, t / "r", resume=True)
        noise = max(_rel(loss_b, loss_a), _rel(tok_b, tok_a))
        graph = max(_rel(loss_g, loss_a), _rel(tok_g, tok_a))
        resumed = max(_rel(loss_r, loss_g), _rel(tok_r, tok_g))
        tolerance = 10 * noise  # 0 where two eager runs agree to the bit
        same_shapes = bool(args.width)
        ok = bool(torch.isfinite(loss_g).all()) and (graph <= tolerance or not same_shapes) and resumed <= tolerance
        failures += not ok
        widths = f"width {args.width}" if same_shapes else "widths 4..16 (eager vs graph: rounding of the padded widths, not judged)"
        print(f"{name} {precision} {pairs} pairs x {args.steps} steps, {widths}: eager vs eager {noise:.2e}, eager vs graph {graph:.2e}, "
              f"resumed graph vs graph {resumed:.2e} -> {'ok' if ok else 'DIFFERENT'}; losses eager {loss_a.tolist()}, graph "
              f"{loss_g.tolist()}; run {s_a:.1f} s eager, {s_g:.1f} s graph (with logging every step)", flush=True)  # fmt: skip
        del sd
        torch.cuda.empty_cache()
    return int(failures > 0)


if __name__ == "__main__":
    raise SystemExit(main())
