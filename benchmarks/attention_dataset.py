"""Hedlin et al.'s matcher over whole PF-Willow categories, end to end: `sdm.evaluate.evaluate_predictions` with
`sdm.predictors.attention_predictor` (each source optimised once for its 9 pairs) and the matcher's crop store (each
image's crops encoded once), on the full SD1.4 architecture with random weights. Each category's time is scaled to its
90 pairs among 10 images (with `--max-pairs`: the sources' optimisations, the crop grids and the rest each by their
own count in the category), then to the 900 pairs of the test split.

    python benchmarks/attention_dataset.py --root data/pf-willow --categories "car(G)" --out willow.json
    python benchmarks/attention_dataset.py --root data/pf-willow --tiny --categories "car(G)" --max-pairs 4   # CPU smoke test

PCK here is of random weights: a check that the run completes, not a result.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from bench import sync

from sdm.attention import AttentionMatcher, AttentionMatcherConfig, compile_for_matcher
from sdm.data import load_dataset
from sdm.evaluate import evaluate_predictions
from sdm.models import sd14_architecture, tiny_stable_diffusion
from sdm.predictors import attention_predictor

PF_WILLOW_PAIRS = 900
# a PF-Willow category: 90 pairs among 10 images, each image the source of 9 pairs
CATEGORY_PAIRS, CATEGORY_IMAGES = 90, 10


class CountingMatcher(AttentionMatcher):
    """The matcher, counting and timing what a spread subset of a category (`--max-pairs`) holds more of than the
    full category: source optimisations (every source occurs in it) and crop grids (every image does)."""

    sources = 0
    optimise_s = 0.0  # in optimize_embeddings, without the crop grids encoded there
    grid_s = 0.0  # encoding crop grids (store misses)

    def optimize_embeddings(self, *args, **kwargs):
        self.sources += 1
        grid_before, start = self.grid_s, _clock()
        out = super().optimize_embeddings(*args, **kwargs)
        self.optimise_s += _clock() - start - (self.grid_s - grid_before)
        return out

    def _crop_grid(self, *args, **kwargs):
        misses, start = self.crop_store.misses, _clock()
        out = super()._crop_grid(*args, **kwargs)
        if self.crop_store.misses != misses:
            self.grid_s += _clock() - start
        return out


def _clock() -> float:
    sync()
    return time.perf_counter()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", required=True, help="the PF-Willow folder (PF-dataset/, test_pairs.csv)")
    ap.add_argument("--categories", default="car(G)", help="comma-separated PF-Willow categories, run one after the other")
    ap.add_argument("--batch", type=int, default=50, help="the matcher's max_batch")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--channels-last", action="store_true", help="compile_for_matcher(channels_last=True)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--max-pairs", type=int, default=None, help="pairs per category (None: all 90)")
    ap.add_argument("--tiny", action="store_true", help="tiny random model at 64 px on the CPU")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.tiny:
        sd, size, device_name = tiny_stable_diffusion(), 64, "cpu (tiny model)"
    else:
        sd, size, device_name = sd14_architecture(device="cuda", dtype=getattr(torch, args.dtype)), 512, torch.cuda.get_device_name()
    compile_s = 0.0
    if not args.no_compile and not args.tiny:
        compile_for_matcher(sd, channels_last=args.channels_last)
        # compile every graph the run needs (UNet batches of `batch` for 10-point pairs, the grid's last batch)
        sync()
        start = time.perf_counter()
        warm = AttentionMatcher(sd, AttentionMatcherConfig(image_size=size, max_batch=args.batch, steps=2, progress=False))
        image = torch.rand(3, size, size)
        warm.transfer(image, warm.optimize_embeddings(image, torch.rand(10, 2) * (size - 1)).embeddings)
        sync()
        compile_s = time.perf_counter() - start
    matcher = CountingMatcher(sd, AttentionMatcherConfig(image_size=size, max_batch=args.batch, progress=False))
    results = {"device": device_name, "torch": torch.__version__, "weights": "random (tiny)" if args.tiny else "random (sd14_architecture)", "dtype": args.dtype,
               "batch": args.batch, "channels_last": args.channels_last, "compiled": not args.no_compile and not args.tiny,
               "compile_s": compile_s, "categories": {}}
    print(f"{device_name}, weights {results['weights']}: timings, not results", flush=True)
    total_s = 0.0
    for category in filter(None, args.categories.split(",")):
        dataset = load_dataset("pfwillow", args.root, image_size=size, category=category)
        before = matcher.sources, matcher.crop_store.misses, matcher.optimise_s, matcher.grid_s
        start = _clock()
        result = evaluate_predictions(dataset, attention_predictor(matcher), batch_size=1, max_pairs=args.max_pairs, desc=category)
        wall = _clock() - start
        pairs = min(args.max_pairs or len(dataset), len(dataset))
        sources, grids = matcher.sources - before[0], matcher.crop_store.misses - before[1]
        optimise_s, grid_s = matcher.optimise_s - before[2], matcher.grid_s - before[3]
        # the whole category from a subset: each part scaled by how many of it the category has (none encoded: its
        # images were stored by an earlier category of this run, and the full category would encode none either)
        category_s = (optimise_s * CATEGORY_IMAGES / sources + (grid_s * CATEGORY_IMAGES / grids if grids else 0.0)
                      + (wall - optimise_s - grid_s) * CATEGORY_PAIRS / pairs)
        row = {"pairs": pairs, "wall_s": wall, "s_per_pair": wall / pairs, "sources_optimised": sources, "crop_grids_encoded": grids,
               "optimise_s": optimise_s, "grid_s": grid_s, "category_s_projected": category_s, "pck_random_weights": result.pck()}
        results["categories"][category] = row
        total_s += category_s
        print(f"{category}: {pairs} pairs in {wall:.0f} s ({wall / pairs:.2f} s per pair), {sources} sources optimised "
              f"({optimise_s:.0f} s), {grids} crop grids encoded ({grid_s:.0f} s); the category's {CATEGORY_PAIRS} pairs: "
              f"{category_s:.0f} s", flush=True)
    results["pfwillow_h_projected"] = total_s / len(results["categories"]) * PF_WILLOW_PAIRS / CATEGORY_PAIRS / 3600
    results["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    print(f"PF-Willow test ({PF_WILLOW_PAIRS} pairs) projected: {results['pfwillow_h_projected']:.2f} h "
          f"(compile {compile_s:.0f} s not counted), peak {results['peak_gib']:.1f} GiB", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2, default=str)


if __name__ == "__main__":
    main()
