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
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import add_train_args, profile_table, timed_training


def main() -> None:
    ap = argparse.ArgumentParser()
    add_train_args(ap, warm=5, steps=4)
    ap.add_argument("--out", default="profile_train.txt")
    ap.add_argument("--no-profile", dest="profile", action="store_false", help="time the window only")
    args = ap.parse_args()
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    wall = timed_training(args, "cuda", *((prof.start, prof.stop) if args.profile else (None, None)))
    variant = f"random weights, channels_last={args.channels_last} compile={args.compile} compile_mode={args.compile_mode}"
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
