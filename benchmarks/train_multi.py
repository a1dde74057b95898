"""Training throughput under `accelerate launch` (one process per GPU): steps per second of `sdm.train.train`.

    accelerate launch --num_processes 2 benchmarks/train_multi.py --pairs 9 --out multi2.json

The global batch (`--pairs`) is split over the processes as `sdm.train` does: by images (`sdm.train.image_share`:
9 pairs = 18 images, 9 + 9 on 2 GPUs, 5 + 5 + 4 + 4 on 4). SD2-1 architecture, random
weights, bf16 with `sdm.features.optimize`; the time per step is read from the loss calls (steady state).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import BenchPairs, profile_table, step_window

import sdm
from sdm import train as train_module
from sdm.features import optimize


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=9)
    ap.add_argument("--warm", type=int, default=4)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--out", default="multi.json")
    ap.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    ap.add_argument("--compile", action="store_true", help="optimize(compile=True): the UNet's blocks compiled")
    ap.add_argument("--profile", default=None, help="write rank 0's torch.profiler table of the window to this file")
    args = ap.parse_args()
    from accelerate import PartialState
    from torch.profiler import ProfilerActivity, profile

    state = PartialState()
    sd = optimize(sdm.sd21_architecture(0, device=state.device, dtype=torch.bfloat16), channels_last=args.channels_last, compile=args.compile)
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) if args.profile and state.is_main_process else None
    hooks = (prof.start, prof.stop) if prof is not None else (None, None)
    ds = BenchPairs(12, 48, 768, seed=3)
    cfg = train_module.TrainConfig(prompt="single", steps=args.warm + args.steps + 1, batch_size=args.pairs, mixed_precision="bf16",
                                   val_every=0, checkpoint_every=10**9, log_every=10**9, num_workers=2)
    with tempfile.TemporaryDirectory() as tmp, step_window(args.warm, args.steps, *hooks) as window:
        train_module.train(cfg, sd, ds, out_dir=tmp, progress=False)
    step_s = window["step_s"]  # the mean step of the window
    steps = [step_s]
    if state.is_main_process:
        res = {"processes": state.num_processes, "channels_last": args.channels_last, "compile": args.compile, "profiled": prof is not None, "split": "images", "pairs_per_step": args.pairs, "step_s": step_s, "steps_per_s": 1 / step_s,
               "step_s_runs": steps, "gpu": torch.cuda.get_device_name(), "peak_gb_rank0": torch.cuda.max_memory_allocated() / 1e9}
        Path(args.out).write_text(json.dumps(res, indent=2))
        print(json.dumps({k: v for k, v in res.items() if k != "step_s_runs"}), flush=True)
        if prof is not None:
            header = f"rank 0 of {state.num_processes}, {args.pairs} pairs a step: wall {step_s * 1e3:.1f} ms per step (profiler on)"
            Path(args.profile).write_text(profile_table(prof, args.steps, header))


if __name__ == "__main__":
    main()
