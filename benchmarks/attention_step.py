"""Steady-state cost of the pieces of Hedlin et al.'s matcher (full SD1.4 architecture, random weights, 512 px):
one optimisation micro-batch (UNet forward to the last captured layer, the matcher's per-layer loss at its
default native resolution, backward to the embeddings), one inference micro-batch (forward only) and one VAE encode of 477-px crops, under variants of
*how* the UNet runs (memory format, compiled norms or resnets). The same inputs go through every variant; the
loss and gradient are compared with the plain variant's.

    python benchmarks/attention_step.py --out step.json          # ~4 min on an H100
    python benchmarks/attention_step.py --tiny                    # smoke test on a CPU

`attention_pair.py` times whole pairs; this script says where a pair's time goes and what a variant saves.
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from collections.abc import Callable

import torch
import torch.nn as nn
from bench import profile_table, sync

from sdm.attention import (
    AttentionMatcher,
    AttentionMatcherConfig,
    capture_cross_attention,
    compile_for_matcher,
    cut_crops,
)
from sdm.models import StableDiffusion, sd14_architecture, tiny_stable_diffusion


def _compile_norms(sd: StableDiffusion) -> None:
    for module in list(sd.unet.modules()) + list(sd.vae.encoder.modules()):
        if isinstance(module, nn.GroupNorm):
            module.compile()


def _compile_resnets(sd: StableDiffusion) -> None:
    from sdm.speed import optimize

    optimize(sd, channels_last=False, fuse_qkv=False, compile=True, compile_scope="resnets")


def _channels_last(sd: StableDiffusion) -> None:
    sd.unet.to(memory_format=torch.channels_last)
    sd.vae.to(memory_format=torch.channels_last)


VARIANTS: dict[str, tuple[Callable[[StableDiffusion], None], ...]] = {
    "plain": (),
    "channels_last": (_channels_last,),
    "compiled-norms": (_compile_norms,),
    "channels_last+compiled-norms": (_channels_last, _compile_norms),
    "channels_last+compiled-resnets": (_channels_last, _compile_resnets),
    "compiled-blocks": (compile_for_matcher,),
    "channels_last+compiled-blocks": (_channels_last, compile_for_matcher),
}


def timed(fn: Callable[[], object], repeats: int) -> float:
    fn()
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def run_variant(
    name: str, build: Callable[[], StableDiffusion], size: int, batch: int, repeats: int, reference: dict | None, profiled: bool = False
) -> dict:
    sd = build()
    for change in VARIANTS[name]:
        change(sd)
    matcher = AttentionMatcher(sd, AttentionMatcherConfig(image_size=size, progress=False))
    dev, cfg = sd.device, matcher.config
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(1, 3, size, size, generator=g).to(dev) * 2 - 1
    side = (round(size * cfg.crop_frac),) * 2
    offsets = torch.randint(0, size - side[0] + 1, (batch, 2), generator=g)
    latents = matcher._encode(cut_crops(pixels, offsets, side))
    noisy = matcher._noisy(latents, cfg.opt_timestep, g)
    emb0 = (torch.randn(batch, cfg.num_tokens, sd.embed_dim, generator=g) * cfg.init_std).to(dev)
    target_px = (torch.rand(batch, 2, generator=g) * size).to(dev)  # Gaussian centres, map pixels
    if name != "plain" and torch.cuda.is_available():
        noisy = noisy.contiguous(memory_format=torch.channels_last) if "channels_last" in name else noisy
    out: dict = {}
    with capture_cross_attention(sd.unet, matcher.layers) as store:
        emb = nn.Parameter(emb0.clone())

        def step() -> torch.Tensor:
            emb.grad = None
            loss = matcher._item_losses(noisy, emb, target_px, store).sum()  # the matcher's loss (its config's)
            loss.backward()
            store.clear()
            return loss

        @torch.no_grad()
        def forward() -> None:
            matcher._unet_maps(noisy, emb0, cfg.inference_timestep, store)
            store.clear()

        loss = step().detach().float()
        grad = emb.grad.detach().float().clone()
        out["opt_ms_per_item"] = 1e3 * timed(step, repeats) / batch
        out["inf_ms_per_item"] = 1e3 * timed(forward, repeats) / batch
        if profiled:  # the same model, compiled graphs included; wall time of 3 calls = 3 x batch x ms per item
            out["profile_optimisation"] = profiled_calls(step, 3, f"3 optimisation micro-batches of {batch}, {name}")
            out["profile_inference"] = profiled_calls(forward, 3, f"3 inference micro-batches of {batch}, {name}")
    crops = cut_crops(pixels, offsets, side)
    if "channels_last" in name:
        crops = crops.contiguous(memory_format=torch.channels_last)
    out["vae_ms_per_crop"] = 1e3 * timed(lambda: matcher._encode(crops), repeats) / batch
    if reference is not None:
        out["loss_rel_err"] = float((loss - reference["loss"]).abs() / reference["loss"].abs())
        out["grad_rel_err"] = float((grad - reference["grad"]).norm() / reference["grad"].norm())
    else:
        out["_tensors"] = {"loss": loss, "grad": grad}
    if torch.cuda.is_available():
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def flops_per_item(build: Callable[[], StableDiffusion], size: int) -> dict:
    """Model FLOPs of one item's optimisation fwd+bwd and inference forward (FlopCounterMode, eager)."""
    from torch.utils.flop_counter import FlopCounterMode

    sd = build()
    matcher = AttentionMatcher(sd, AttentionMatcherConfig(image_size=size, progress=False))
    lat = size // 8
    noisy = torch.randn(1, 4, lat, lat, device=sd.device, dtype=sd.unet.dtype)
    emb = nn.Parameter(torch.randn(1, 77, sd.embed_dim, device=sd.device))
    with capture_cross_attention(sd.unet, matcher.layers) as store:
        with FlopCounterMode(display=False) as opt:
            matcher._unet_maps(noisy, emb, 100, store, per_layer=True).sum().backward()
        store.clear()
        with torch.no_grad(), FlopCounterMode(display=False) as inf:
            matcher._unet_maps(noisy, emb, 100, store)
    return {"opt_tflop": opt.get_total_flops() / 1e12, "inf_tflop": inf.get_total_flops() / 1e12}


def profiled_calls(fn: Callable[[], object], calls: int, header: str) -> str:
    """torch.profiler over `calls` calls of `fn` (already warm), as `bench.profile_table` writes it."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        sync()
    return profile_table(prof, calls, header, unit="micro-batch")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=10, help="items per micro-batch (the matcher's max_batch)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--profile", default=None, help="comma-separated variants to profile (optimisation and inference, after timing)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    dynamo_config = importlib.import_module("torch._dynamo").config
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
    if args.tiny:
        size, device_name = 64, "cpu (tiny model)"

        def build() -> StableDiffusion:
            return tiny_stable_diffusion()
    else:
        size, device_name = 512, torch.cuda.get_device_name()

        def build() -> StableDiffusion:
            return sd14_architecture(device="cuda", dtype=dtype)

    results: dict = {"device": device_name, "torch": torch.__version__, "weights": "random (sd14_architecture)" if not args.tiny else "random (tiny)", "dtype": args.dtype, "batch": args.batch, "variants": {}}
    print(f"{device_name}, weights {results['weights']}: timings, not results", flush=True)
    results.update(flops_per_item(build, size))
    print(f"FLOPs per item: optimisation {results['opt_tflop']:.3f} TFLOP, inference {results['inf_tflop']:.3f} TFLOP", flush=True)
    reference = None
    profiled = set(filter(None, (args.profile or "").split(",")))
    for name in filter(None, args.variants.split(",")):
        row = run_variant(name, build, size, args.batch, args.repeats, reference, name in profiled)
        tables = [row.pop(k) for k in ("profile_optimisation", "profile_inference") if k in row]
        if reference is None:
            reference = row.pop("_tensors")
        row["opt_tflops"] = results["opt_tflop"] / row["opt_ms_per_item"] * 1e3
        row["inf_tflops"] = results["inf_tflop"] / row["inf_ms_per_item"] * 1e3
        results["variants"][name] = row
        print(name, json.dumps({k: round(v, 5) for k, v in row.items()}), flush=True)
        if tables:
            print("\n".join(tables), flush=True)
            results.setdefault("profiles", {})[name] = tables
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
