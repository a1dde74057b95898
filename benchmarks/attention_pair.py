"""Hedlin et al.'s matcher on one 10-point pair at 512 px with the full Stable Diffusion 1.4 architecture (random
weights, `sdm.models.sd14_architecture`): sdm 0.2's computation against the authors' computation (sdm's
default since issue 13), per point, projected over PF-Willow's test set, and peak GPU memory.

    python benchmarks/attention_pair.py --out attention.json      # ~5 min on an H100

The optimisation is timed over `--steps` Adam steps and scaled to the configured number (129 or 130; pass
`--steps 129` for the authors' path, whose VAE latents of crops are cached per offset, so early steps cost
more than late ones); the target's attention maps are timed in full (20 crops). PF-Willow: 900 pairs, 100 source images (each the source
of 9 pairs with the same 10 points), so with the per-source cache of `sdm.predictors.attention_predictor` the
optimisation runs 100 times instead of 900.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from bench import profile_table, sync, sync_sites

from sdm.attention import AttentionMatcher, AttentionMatcherConfig, compile_for_matcher, crop_side
from sdm.attention import matcher as matcher_module
from sdm.models import sd14_architecture
from sdm.speed import optimize

SDM_02 = dict(
    geometry="continuous", readout="mean-map", noise="gaussian", heads="all", loss="layer-mean", steps=130, lr=2.4e-3, crop_frac=0.93,
    sigma=28 / 512, max_batch=None,
)
PATHS = {  # name -> (config overrides, weight dtype, what is compiled: None, "resnets", "blocks", "blocks-cl" or "blocks-cl-ro")
    # sdm 0.2's computation in fp16, all 50 items in one batch
    "sdm0.2-fp16": (SDM_02, torch.float16, None),
    # the authors' computation (today's defaults, micro-batches of 10) in the authors' fp32 and in bf16
    "authors-fp32": ({}, torch.float32, None),
    "authors-bf16": ({}, torch.bfloat16, None),
    # the loss on 512 x 512 upsampled maps, as the authors' code computes it (sdm's default before "native")
    "authors-bf16-map-loss": ({"loss_resolution": "map"}, torch.bfloat16, None),
    "authors-bf16-b50": ({"max_batch": 50}, torch.bfloat16, None),  # all 50 items of the pair in one UNet batch
    # the VAE encoder and the UNet's resnets compiled (sdm.speed.optimize(compile_scope="resnets"))
    "authors-bf16-compiled-resnets": ({}, torch.bfloat16, "resnets"),
    # the VAE encoder and the UNet's blocks compiled, one graph per batch size (sdm.attention.compile_for_matcher)
    "authors-bf16-compiled": ({}, torch.bfloat16, "blocks"),
    "authors-bf16-compiled-b50": ({"max_batch": 50}, torch.bfloat16, "blocks"),
    # without the crop store: each call encodes the crops it draws (sdm before the store)
    "authors-bf16-compiled-b50-lazy": ({"max_batch": 50, "crop_store": 0}, torch.bfloat16, "blocks"),
    # the blocks compiled on channels-last (NHWC) weights and activations
    "authors-bf16-compiled-cl-b50": ({"max_batch": 50}, torch.bfloat16, "blocks-cl"),
    "authors-bf16-compiled-cl": ({}, torch.bfloat16, "blocks-cl"),
    # the same blocks compiled with mode="reduce-overhead": each compiled block replays as a CUDA graph, so the host
    # launches a block at a time instead of its kernels (round 9: the inference waits on the host's launches). Round 10:
    # fails, the matcher reads a block's outputs after its next replay (NOTES.md); kept to measure a fix against
    "authors-bf16-compiled-cl-b50-ro": ({"max_batch": 50}, torch.bfloat16, "blocks-cl-ro"),
    "authors-fp32-compiled": ({}, torch.float32, "blocks"),
    "authors-fp32-compiled-b50": ({"max_batch": 50}, torch.float32, "blocks"),
}
# the same computation with the host waiting for the GPU as before round 7: pageable copies of the crops' offsets,
# the targets and the noise, and each step's finiteness read at once (`host_waits`)
PATHS["authors-bf16-compiled-cl-b50-waits"] = PATHS["authors-bf16-compiled-cl-b50"]
HOST_WAITS = {"authors-bf16-compiled-cl-b50-waits"}


@contextlib.contextmanager
def host_waits(on: bool) -> Iterator[None]:
    """With `on`, the matcher's uploads and loss checks wait for the GPU as they did before round 7."""
    if not on:
        yield
        return

    def upload(self, host: torch.Tensor) -> torch.Tensor:
        return host.to(self.device)

    def finite_now(values: torch.Tensor):
        finite = bool(torch.isfinite(values).all())
        return lambda: finite

    saved = AttentionMatcher._upload, matcher_module._finite_later
    AttentionMatcher._upload, matcher_module._finite_later = upload, finite_now
    try:
        yield
    finally:
        AttentionMatcher._upload, matcher_module._finite_later = saved


def smooth_images(size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(3, 3, 24, 24, generator=g), size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def timed(fn) -> tuple[float, object]:
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - start, out


def path_model(name: str, build) -> tuple[object, dict]:
    """A fresh model in the path's dtype, compiled as the path says (compiling changes modules in place), and the
    path's config overrides."""
    overrides, dtype, compiled = PATHS[name]
    sd = build().to(dtype=dtype)
    if compiled in ("blocks", "blocks-cl"):
        compile_for_matcher(sd, channels_last=compiled == "blocks-cl")
    elif compiled == "blocks-cl-ro":  # compile_for_matcher's settings, in mode "reduce-overhead"
        optimize(sd, channels_last=True, fuse_qkv=False, compile=True, compile_scope="blocks", dynamic=False,
                 compile_mode="reduce-overhead")
    elif compiled == "resnets":
        optimize(sd, channels_last=False, fuse_qkv=False, compile=True, compile_scope="resnets")
    return sd, overrides


def measure(name: str, build, images: torch.Tensor, points: torch.Tensor, steps: int, size: int, warm_steps: int) -> dict:
    sd, overrides = path_model(name, build)

    def matcher(**more) -> AttentionMatcher:
        return AttentionMatcher(sd, AttentionMatcherConfig(image_size=size, progress=False, **{**overrides, **more}))

    full = matcher()
    warm = matcher(steps=2)
    warm.attention_maps(images[1], warm.optimize_embeddings(images[0], points).embeddings)  # warm-up (and compiles)
    # a cold pair: no crop of either image encoded yet
    short = matcher(steps=steps)
    reset_peak()
    opt_s, result = timed(lambda: short.optimize_embeddings(images[0], points))
    opt_s = opt_s / steps * full.config.steps
    peak_opt = peak_gib()
    reset_peak()
    inf_s, maps = timed(lambda: short.attention_maps(images[1], result.embeddings))
    peak_inf = peak_gib()
    assert torch.isfinite(maps).all()
    matches = full.peaks(maps, (size, size))
    n = points.shape[0]
    row = {
        "optimisation_s_per_pair": opt_s, "inference_s_per_pair": inf_s, "s_per_point": (opt_s + inf_s) / n,
        "pfwillow_h_without_cache": 900 * (opt_s + inf_s) / 3600, "pfwillow_h_with_source_cache": (100 * opt_s + 900 * inf_s) / 3600,
        "peak_gib_optimisation": peak_opt, "peak_gib_inference": peak_inf, "steps_timed": steps, "steps": full.config.steps,
        "matches": matches.tolist(),
    }
    print(f"{name}: {row['s_per_point']:.2f} s/point (optimisation {opt_s:.1f} s + inference {inf_s:.1f} s per cold {n}-point pair), "
          f"PF-Willow {row['pfwillow_h_without_cache']:.1f} h ({row['pfwillow_h_with_source_cache']:.1f} h with the source cache), "
          f"peak {peak_opt:.1f} / {peak_inf:.1f} GiB", flush=True)
    if short.config.crop_store > 0 and short.config.geometry == "authors":
        # PF-Willow with the crop store: each of its 100 images has its crops encoded once (pairs come category by
        # category, 10 images each), is optimised once as a source and is the target of 9 pairs
        pixels = short._pixels(images[2])
        side = crop_side((size, size), short.config.crop_frac)
        grid_s, _ = timed(lambda: short._crop_grid(pixels, side))
        again = matcher(steps=warm_steps)
        again.crop_store = short.crop_store  # both images' crops are there
        opt_warm, _ = timed(lambda: again.optimize_embeddings(images[0], points))
        opt_warm = opt_warm / warm_steps * full.config.steps
        inf_warm, maps_warm = timed(lambda: short.attention_maps(images[1], result.embeddings))
        row.update({
            "crop_grid_s_per_image": grid_s, "optimisation_s_crops_stored": opt_warm, "inference_s_crops_stored": inf_warm,
            "warm_steps_timed": warm_steps, "inference_stored_equals_cold": bool(torch.equal(maps_warm, maps)),
            "pfwillow_h_with_source_cache_and_crop_store": (100 * (grid_s + opt_warm) + 900 * inf_warm) / 3600,
            "pfwillow_h_with_crop_store": (100 * grid_s + 900 * (opt_warm + inf_warm)) / 3600,
        })
        print(f"  crops stored: {grid_s:.2f} s to encode an image's {side} crops; optimisation {opt_warm:.1f} s + inference "
              f"{inf_warm:.2f} s per pair; PF-Willow {row['pfwillow_h_with_crop_store']:.2f} h, "
              f"{row['pfwillow_h_with_source_cache_and_crop_store']:.2f} h with the source cache "
              f"(stored inference equals cold: {row['inference_stored_equals_cold']})", flush=True)
    return row


def profile(name: str, build, images: torch.Tensor, points: torch.Tensor, size: int, steps: int) -> str:
    """Where a pair's time goes once its crops are stored: torch.profiler over `steps` optimisation steps and over
    the target's inference (all its crops), each after a timed run without the profiler, so that the GPU's busy
    share of the wall time can be read off; then the places where each makes the host wait (`sync_sites`)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    sd, overrides = path_model(name, build)
    matcher = AttentionMatcher(sd, AttentionMatcherConfig(image_size=size, progress=False, **{**overrides, "steps": steps}))
    embeddings = matcher.optimize_embeddings(images[0], points).embeddings  # compiles; stores the source's crops
    matcher.attention_maps(images[1], embeddings)  # stores the target's crops
    parts = {
        f"{steps} optimisation steps": lambda: matcher.optimize_embeddings(images[0], points),
        f"inference ({matcher.config.inference_crops} crops)": lambda: matcher.attention_maps(images[1], embeddings),
    }
    text = []
    for part, run in parts.items():
        wall, _ = timed(run)
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run()
            sync()
        text.append(profile_table(prof, 1, f"{name}, {part}", unit="run", wall_s=wall))
        # where the host's time goes (a synchronize or a blocking copy here is the GPU waiting for the host after)
        text.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70))
        text.append(f"{name}, {part}: where the host waits for the GPU\n{sync_sites(run)}")
    return "\n".join(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=129, help="Adam steps timed, scaled to the configured number; a cold pair's first "
                    "step encodes the source's whole crop grid, so fewer than all steps overstate it (6 steps: 4.7x on an H100)")
    ap.add_argument("--warm-steps", type=int, default=20, help="steps timed with the crops already stored (scaled)")
    ap.add_argument("--points", type=int, default=10)
    ap.add_argument("--paths", default=",".join(PATHS), help="comma-separated names of PATHS")
    ap.add_argument("--out", default=None)
    ap.add_argument("--tiny", action="store_true", help="tiny random model at 64 px on the CPU: a smoke test of this script")
    ap.add_argument("--profile", default=None, help="a path name: profile its optimisation and inference with stored crops (torch.profiler, "
                    "top CUDA ops, the GPU's busy share); written beside --out as .profile.txt")
    ap.add_argument("--profile-steps", type=int, default=2, help="optimisation steps profiled (129: the whole run)")
    args = ap.parse_args()
    if args.tiny:
        from sdm.models import tiny_stable_diffusion

        build, size, device_name = tiny_stable_diffusion, 64, "cpu (tiny model)"
    else:
        build, size, device_name = (lambda: sd14_architecture(device="cuda")), 512, torch.cuda.get_device_name()
    images = smooth_images(size, 0)  # source, target, a third image
    g = torch.Generator().manual_seed(1)
    points = size * (0.12 + torch.rand(args.points, 2, generator=g) * 0.76)  # pixels of the source
    results = {"device": device_name, "torch": torch.__version__, "weights": "random (sd14_architecture)" if not args.tiny else "random (tiny)", "points": args.points, "paths": {}}
    print(f"{device_name}, weights {results['weights']}: timings, not results", flush=True)
    for name in filter(None, args.paths.split(",")):
        if args.tiny and PATHS[name][1] != torch.float32:
            continue  # half precision on the CPU says nothing
        try:
            with host_waits(name in HOST_WAITS):
                row = measure(name, build, images, points, args.steps, size, args.warm_steps)
        except Exception as err:  # an experimental path that fails is recorded, and the others still run
            print(f"{name}: {type(err).__name__}: {str(err)[:300]}", flush=True)
            results["paths"][name] = {"error": f"{type(err).__name__}: {err}"}
            continue
        # matches of the same pair against the first path run (rounding and kernel choices make bf16 runs drift)
        first = next((r for r in results["paths"].values() if "matches" in r), row)
        row["mean_px_from_first_path"] = float((torch.tensor(row["matches"]) - torch.tensor(first["matches"])).norm(dim=1).mean())
        results["paths"][name] = row
        if args.out:  # after every path: a call cut short keeps what it measured
            with open(args.out, "w") as f:
                json.dump(results, f, indent=2)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if args.profile:
        text = profile(args.profile, build, images, points, size, args.profile_steps)
        print(text[:8000])
        if args.out:
            Path(args.out).with_suffix(".profile.txt").write_text(text)


if __name__ == "__main__":
    main()
