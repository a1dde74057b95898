"""Training throughput under `accelerate launch` (one process per GPU): steps per second of `sdm.train.train`.

    accelerate launch --num_processes 2 benchmarks/train_multi.py --pairs 9 --out multi2.json

The global batch (`--pairs`) is split over the processes as `sdm.train` does: by images (`sdm.train.image_share`:
9 pairs = 18 images, 9 + 9 on 2 GPUs, 5 + 5 + 4 + 4 on 4). SD2-1 architecture, random
weights, bf16 with `sdm.speed.optimize`; the time per step is read from the loss calls (steady state).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import add_train_args, profile_table, timed_training


def main() -> None:
    ap = argparse.ArgumentParser()
    add_train_args(ap, warm=4, steps=16)
    ap.add_argument("--out", default="multi.json")
    ap.add_argument("--profile", default=None, help="write rank 0's torch.profiler table of the window to this file")
    args = ap.parse_args()
    from accelerate import PartialState
    from torch.profiler import ProfilerActivity, profile

    state = PartialState()
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) if args.profile and state.is_main_process else None
    step_s = timed_training(args, state.device, *((prof.start, prof.stop) if prof is not None else (None, None)))  # the window's mean step
    steps = [step_s]
    if state.is_main_process:
        res = {"weights": "random (sdm.sd21_architecture)", "processes": state.num_processes, "channels_last": args.channels_last, "compile": args.compile, "compile_mode": args.compile_mode, "profiled": prof is not None, "split": "images", "pairs_per_step": args.pairs, "step_s": step_s, "steps_per_s": 1 / step_s,
               "step_s_runs": steps, "gpu": torch.cuda.get_device_name(), "peak_gb_rank0": torch.cuda.max_memory_allocated() / 1e9}
        Path(args.out).write_text(json.dumps(res, indent=2))
        print(json.dumps({k: v for k, v in res.items() if k != "step_s_runs"}), flush=True)
        if prof is not None:
            header = f"rank 0 of {state.num_processes}, {args.pairs} pairs a step, random weights: wall {step_s * 1e3:.1f} ms per step (profiler on)"
            Path(args.profile).write_text(profile_table(prof, args.steps, header))


if __name__ == "__main__":
    main()
