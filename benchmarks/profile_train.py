"""Where a training step's time goes: a torch.profiler trace of `--steps` steady-state steps of `sdm.train.train`
(Single prompt, SD2-1 architecture with random weights, bf16 `optimize`, 768 px, `--pairs` pairs a step).

    python benchmarks/profile_train.py --pairs 9 --out profile_train.txt
    python benchmarks/profile_train.py --no-channels-last --no-profile   # a variant, timed only

Prints the wall time per step, the GPU's busy time per step (the sum of its kernels' times) and the kernels and
operators that take the most GPU time; with --no-profile, only the steps per second of the window (no profiler
overhead), to compare variants of `optimize` (--no-channels-last, --compile).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import BenchPairs, profile_table, step_window

import sdm
from sdm import train as train_module
from sdm.features import optimize


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=9)
    ap.add_argument("--warm", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", default="profile_train.txt")
    ap.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    ap.add_argument("--compile", action="store_true", help="optimize(compile=True): the UNet's blocks compiled")
    ap.add_argument("--no-profile", dest="profile", action="store_false", help="time the window only")
    args = ap.parse_args()
    sd = optimize(sdm.sd21_architecture(0, device="cuda", dtype=torch.bfloat16), channels_last=args.channels_last, compile=args.compile)
    ds = BenchPairs(12, 48, 768, seed=3)
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    hooks = (prof.start, prof.stop) if args.profile else (None, None)
    cfg = train_module.TrainConfig(prompt="single", steps=args.warm + args.steps + 1, batch_size=args.pairs, mixed_precision="bf16",
                                   val_every=0, checkpoint_every=10**9, log_every=10**9, num_workers=2)
    with tempfile.TemporaryDirectory() as tmp, step_window(args.warm, args.steps, *hooks) as window:
        train_module.train(cfg, sd, ds, out_dir=tmp, progress=False)
    wall = window["step_s"]
    variant = f"channels_last={args.channels_last} compile={args.compile}"
    if not args.profile:
        line = f"{args.pairs} pairs a step, {variant}: {1 / wall:.2f} steps/s ({wall * 1e3:.1f} ms per step, {args.steps} steps)"
        Path(args.out).write_text(line + "\n")
        print(line)
        return
    text = profile_table(prof, args.steps, f"{args.pairs} pairs a step, {variant}: wall {wall * 1e3:.1f} ms per step (profiler on)")
    Path(args.out).write_text(text)
    print(text[:6000])


if __name__ == "__main__":
    main()
