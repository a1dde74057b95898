"""CPM evaluation throughput under `accelerate launch` (one process per GPU): pairs per second of
`sdm.evaluate.evaluate(..., processes=PartialState())`, which spreads the pairs over the processes.

    accelerate launch --num_processes 4 benchmarks/eval_multi.py --out eval4.json
    python benchmarks/eval_multi.py --out eval1.json          # one GPU, the same work

SD2-1 architecture and DINOv2-B/14 with random weights, bf16 with `sdm.speed.optimize` (no compile, so that
every process count runs the same kernels), ensemble 8, Kernel-Softmax, in-memory 768 px images (`bench.BenchPairs`).
Time: the median of `--repeat` evaluations after one warm-up, measured on the main process between barriers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import SPAIR_TEST_PAIRS, BenchPairs, bench_dino

import sdm
from sdm.encoders import PromptEncoders
from sdm.evaluate import evaluate
from sdm.extractors import SDExtractor
from sdm.features import SDFeaturizer
from sdm.prompts import build_prompt
from sdm.speed import optimize


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--pairs", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--out", default="eval_multi.json")
    args = ap.parse_args()
    from accelerate import PartialState

    state = PartialState()
    sd = optimize(sdm.sd21_architecture(0, device=state.device, dtype=torch.bfloat16))
    dino = bench_dino(False, state.device).to(torch.bfloat16)
    ds = BenchPairs(args.images, args.pairs, 768, n_categories=1)
    feat = SDFeaturizer(sd, image_size=768, timestep=50, ensemble=8)
    module = build_prompt("cpm", feat, encoders=PromptEncoders(dino=dino)).to(state.device)

    def run() -> None:
        evaluate(SDExtractor(feat, module), ds, batch_size=8, progress=False, num_workers=args.workers, processes=state)

    run()  # warm-up
    times = []
    for _ in range(args.repeat):
        state.wait_for_everyone()
        torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        state.wait_for_everyone()
        times.append(time.perf_counter() - start)
    if state.is_main_process:
        t = statistics.median(times)
        res = {"processes": state.num_processes, "pairs": args.pairs, "images": args.images, "median_s": t, "runs_s": times,
               "pairs_per_s": args.pairs / t, "projected_spair_test_min": t * SPAIR_TEST_PAIRS / args.pairs / 60,
               "gpu": torch.cuda.get_device_name(), "peak_gb_rank0": torch.cuda.max_memory_allocated() / 1e9}
        Path(args.out).write_text(json.dumps(res, indent=2))
        print(json.dumps({k: v for k, v in res.items() if k != "runs_s"}), flush=True)


if __name__ == "__main__":
    main()
