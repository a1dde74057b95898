"""Prompt registry: shapes, Class selection, CPM ablations, save/load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, clip_transformer
from PIL import Image

import sdm
from sdm.encoders import PromptEncoders, dino_pixels, tiny_clip_vision, tiny_dinov2
from sdm.features import SDFeaturizer
from sdm.prompt_files import load_prompt, save_prompt
from sdm.prompts import (
    CPM_ABLATIONS,
    PROMPTS,
    CPMConfig,
    CPMPrompt,
    DinoDescriptor,
    StoredImages,
    build_prompt,
    category_text,
    originals_for,
)

CATS = ["cat", "dog", "car(G)"]


@pytest.fixture(scope="module")
def encoders() -> PromptEncoders:
    return PromptEncoders(dino=tiny_dinov2(0), clip=tiny_clip_vision(0))


def images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", sorted(PROMPTS))
def test_every_prompt_gives_hidden_states(kind: str, featurizer: SDFeaturizer, encoders: PromptEncoders) -> None:
    module = build_prompt(kind, featurizer, categories=CATS, encoders=encoders)  # type: ignore[arg-type]
    a, b = images(2, 0), images(2, 1)
    src, trg = module.pair_prompts(featurizer, a, b, ["cat", "dog"], (list(a), list(b)))
    for p in (src, trg):
        assert featurizer.encode_prompt(p, batch_size=2).shape == (2, 77, 32)
    feats = featurizer(images(2, 0), src)
    assert feats.shape == (2, 64, 4, 4) and torch.isfinite(feats).all()


@pytest.mark.parametrize("kind", [*sorted(PROMPTS), "cpm-resized"])
def test_a_prompt_needs_the_images_exactly_when_it_says_so(kind: str, featurizer: SDFeaturizer, encoders: PromptEncoders) -> None:
    """`needs_images` tells the extractors whether to copy the resized images to the GPU for the prompt: a prompt
    that says no gives the same prompts without them, one that says yes cannot work without them."""
    cpm = CPMConfig(dino_input="resized") if kind == "cpm-resized" else None
    module = build_prompt(kind.removesuffix("-resized"), featurizer, categories=CATS, encoders=encoders, cpm=cpm)  # type: ignore[arg-type]
    a, b = images(2, 0), images(2, 1)
    originals = (list(a), list(b))
    if module.needs_images:
        with pytest.raises((ValueError, AttributeError, TypeError)):
            module.pair_prompts(featurizer, None, None, ["cat", "dog"], originals)
        return
    with_images = module.pair_prompts(featurizer, a, b, ["cat", "dog"], originals)
    without = module.pair_prompts(featurizer, None, None, ["cat", "dog"], originals)
    for x, y in zip(with_images, without, strict=True):
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y


def test_extractors_hand_a_prompt_the_images_only_when_it_needs_them(featurizer: SDFeaturizer, encoders: PromptEncoders) -> None:
    from sdm.extractors import ImageBatch, SDExtractor

    batch = ImageBatch(images(2, 0), ["cat", "dog"], ["a", "b"])
    for kind, cpm, want in (("single", None, False), ("cpm", CPMConfig(dino_input="resized", condition="image"), True)):
        module = build_prompt(kind, featurizer, categories=CATS, encoders=encoders, cpm=cpm)  # type: ignore[arg-type]
        seen: list[object] = []
        given = module.image_prompt
        module.image_prompt = lambda f, px, cats, originals=None, given=given, seen=seen: seen.append(px) or given(f, px, cats, originals)
        SDExtractor(featurizer, module).image_features(batch)
        assert (seen[0] is not None) == want and module.needs_images == want
        if want:
            assert torch.equal(seen[0].cpu(), batch.pixels)


@pytest.mark.parametrize("kind", sorted(PROMPTS))
def test_a_prompt_builds_from_the_encoders_it_declares(kind: str, featurizer: SDFeaturizer, encoders: PromptEncoders) -> None:
    declared = encoders.only(PROMPTS[kind].uses)
    assert {name for name in ("dino", "clip") if getattr(declared, name) is not None} == set(PROMPTS[kind].uses)
    build_prompt(kind, featurizer, categories=CATS, encoders=declared)  # type: ignore[arg-type]
    if PROMPTS[kind].uses:  # and needs each of them
        with pytest.raises(ValueError, match="needs"):
            build_prompt(kind, featurizer, categories=CATS, encoders=PromptEncoders())  # type: ignore[arg-type]


def test_template_uses_the_raw_category_names(featurizer: SDFeaturizer) -> None:
    # the authors' prompt.py:38-52: raw names, PF-Willow's condition dropped
    module = build_prompt("template", featurizer)
    cats = ["car(G)", "pottedplant", "tvmonitor", "diningtable", "duck(S)", "motorbike(M)", "winebottle(woC)"]
    assert module.image_prompt(featurizer, None, cats) == [
        "a photo of a car", "a photo of a pottedplant", "a photo of a tvmonitor", "a photo of a diningtable",
        "a photo of a duck", "a photo of a motorbike", "a photo of a winebottle",
    ]
    readable = build_prompt("template", featurizer, template_words="readable")
    assert readable.image_prompt(featurizer, None, ["pottedplant", "car(G)"]) == ["a photo of a potted plant", "a photo of a car"]
    assert category_text("tvmonitor", "readable") == "tv monitor" and category_text("tvmonitor") == "tvmonitor"


def test_class_picks_the_category_prompt(featurizer: SDFeaturizer) -> None:
    module = build_prompt("class", featurizer, categories=CATS)
    assert module.tokens.shape == (3, 75, 32)
    picked = module.image_prompt(featurizer, None, ["dog", "cat", "dog"])
    idx = [module.categories.index(c) for c in ["dog", "cat", "dog"]]
    torch.testing.assert_close(picked, module.tokens[idx])
    with pytest.raises(ValueError, match="no learned prompt for categories"):
        module.image_prompt(featurizer, None, ["horse"])


def test_single_starts_from_vocabulary_embeddings(featurizer: SDFeaturizer) -> None:
    module = build_prompt("single", featurizer, seed=3)
    emb = clip_transformer(featurizer.sd.text_encoder).embeddings
    tok = module.tokens[0]
    # each vector minus its position embedding is a row of the token embedding table
    words = tok - emb.position_embedding.weight[1:76]
    dist = torch.cdist(words, emb.token_embedding.weight)
    assert dist.min(dim=1).values.max() < 1e-3  # typical distances between rows are ~0.15


def test_captioner_starts_as_the_empty_prompt(featurizer: SDFeaturizer, encoders: PromptEncoders) -> None:
    module = build_prompt("captioner", featurizer, encoders=encoders)
    hidden = module.image_prompt(featurizer, images(2, 0), ["a", "b"])
    torch.testing.assert_close(hidden, featurizer.encode_text([""]).expand(2, -1, -1))


def cpm(featurizer: SDFeaturizer, encoders: PromptEncoders, **overrides) -> CPMPrompt:
    return build_prompt("cpm", featurizer, encoders=encoders, cpm=CPMConfig(**overrides))  # type: ignore[return-value]


def adaptive_max_pool(x: torch.Tensor, n: int) -> torch.Tensor:
    """B x L x D -> B x n x D: window i covers rows floor(i L / n) .. ceil((i + 1) L / n) - 1 (PyTorch's rule)."""
    length = x.shape[1]
    return torch.stack([x[:, (i * length) // n : -((-(i + 1) * length) // n)].amax(dim=1) for i in range(n)], dim=1)


def test_cpm_computes_the_authors_formula(featurizer: SDFeaturizer, encoders: PromptEncoders) -> None:
    """hybrid_captioner.py:161-167 written out here: tanh(A) * (pool(g_n(g_d([F_s, F_t]))) + P)."""
    module = cpm(featurizer, encoders)
    a, b = images(2, 0), images(2, 1)
    src, trg = module.pair_prompts(featurizer, a, b, ["x", "y"], (list(a), list(b)))
    assert src is trg and src.shape == (2, 75, 32)
    dino = encoders.dino
    feats = [dino(pixel_values=torch.stack([dino_pixels(im) for im in side])).last_hidden_state[:, 1:] for side in (a, b)]
    f = torch.cat(feats, dim=2)  # B x 256 x 64
    x = f @ module.g_d.weight.T + module.g_d.bias  # linear_C
    x = (x.transpose(1, 2) @ module.g_n.weight.T + module.g_n.bias).transpose(1, 2)  # linear_N along the patches
    x = adaptive_max_pool(x, 50)
    cond = torch.tanh(module.alpha_cond) * (x + module.positional_embedding)
    torch.testing.assert_close(src, torch.cat([module.global_embeds.expand(2, -1, -1), cond], dim=1), rtol=1e-4, atol=1e-5)
    c = images(2, 2)
    other, _ = module.pair_prompts(featurizer, a, c, ["x", "y"], (list(a), list(c)))
    assert not torch.allclose(src[:, 25:], other[:, 25:])  # the source's prompt depends on the target
    with pytest.raises(NotImplementedError, match="pair_prompts"):
        module.image_prompt(featurizer, a, ["x"], list(a))
    with pytest.raises(ValueError, match="original image"):
        module.pair_prompts(featurizer, a, b, ["x", "y"])


def test_cpm_initialisation_is_the_authors_and_comes_from_the_seed(featurizer: SDFeaturizer, encoders: PromptEncoders) -> None:
    state = torch.random.get_rng_state()
    module = build_prompt("cpm", featurizer, encoders=encoders, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global generator is left alone
    for name in ("global_embeds", "positional_embedding", "alpha_cond"):  # torch.rand: U[0, 1)
        t = getattr(module, name)
        assert t.min() >= 0 and t.max() < 1 and abs(t.mean().item() - 0.5) < 0.05
    assert module.global_embeds.shape == (1, 25, 32) and module.alpha_cond.shape == (1, 50, 32)
    for lin in (module.g_d, module.g_n):  # PyTorch's default Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        bound = lin.in_features**-0.5
        assert lin.weight.abs().max() <= bound and lin.weight.abs().max() > 0.9 * bound
    again = build_prompt("cpm", featurizer, encoders=encoders, seed=7)
    other = build_prompt("cpm", featurizer, encoders=encoders, seed=8)
    for k, v in module.trainable_state().items():
        torch.testing.assert_close(again.trainable_state()[k], v, rtol=0, atol=0)
        assert not torch.equal(other.trainable_state()[k], v)


def test_cpm_paper_form(featurizer: SDFeaturizer, encoders: PromptEncoders) -> None:
    module = cpm(featurizer, encoders, form="paper", dino_input="resized")
    assert torch.count_nonzero(module.alpha_cond) == 0  # the paper's form starts without the conditioning
    with torch.no_grad():
        module.alpha_cond.normal_()
    desc = torch.randn(1, 256, 64)
    x = module.g_n((desc @ module.g_d.weight.T + module.g_d.bias).transpose(1, 2)).transpose(1, 2)
    expected = adaptive_max_pool(x, 50) * module.alpha_cond + module.positional_embedding
    torch.testing.assert_close(module.condition_tokens(desc), expected, rtol=1e-4, atol=1e-5)


def test_cpm_image_mode_has_no_gn(featurizer: SDFeaturizer, encoders: PromptEncoders) -> None:
    """The code's "Img-DINO-Feat": linear 768 -> D, pool, no g_n, one prompt per image."""
    module = cpm(featurizer, encoders, condition="image")
    assert module.conditioning == "image" and module.g_d.in_features == 32 and module.g_n is None
    a, b, c = images(1, 0), images(1, 1), images(1, 2)
    src1, trg1 = module.pair_prompts(featurizer, a, b, ["x"], (list(a), list(b)))
    src2, _ = module.pair_prompts(featurizer, a, c, ["x"], (list(a), list(c)))
    torch.testing.assert_close(src1, src2)  # the source prompt ignores the target
    assert not torch.allclose(src1, trg1)
    f = encoders.dino(pixel_values=dino_pixels(a[0])[None]).last_hidden_state[:, 1:]
    cond = torch.tanh(module.alpha_cond) * (adaptive_max_pool(module.g_d(f), 50) + module.positional_embedding)
    torch.testing.assert_close(src1[:, 25:], cond, rtol=1e-4, atol=1e-5)
    assert cpm(featurizer, encoders, condition="image", use_gn=True).g_n is not None  # sdm's own variant


def test_cpm_global_descriptor_is_broadcast(featurizer: SDFeaturizer, encoders: PromptEncoders) -> None:
    """The code's "Pair-DINO-Head": pooler outputs of both images -> linear -> broadcast to the 50 tokens + P."""
    module = cpm(featurizer, encoders, descriptor="global")
    assert module.g_n is None and module.g_d.in_features == 64
    a, b = images(2, 0), images(2, 1)
    src, _ = module.pair_prompts(featurizer, a, b, ["x", "y"], (list(a), list(b)))
    pooled = [encoders.dino(pixel_values=torch.stack([dino_pixels(im) for im in side])).pooler_output for side in (a, b)]
    x = module.g_d(torch.cat(pooled, dim=1)).unsqueeze(1)
    torch.testing.assert_close(src[:, 25:], torch.tanh(module.alpha_cond) * (module.positional_embedding + x), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="global descriptor"):
        CPMConfig(descriptor="global", use_gn=True)


def test_cpm_without_global_prompt_and_without_gn(featurizer: SDFeaturizer, encoders: PromptEncoders) -> None:
    no_global = cpm(featurizer, encoders, global_prompt=False)
    a, b = images(1, 0), images(1, 1)
    src, _ = no_global.pair_prompts(featurizer, a, b, ["x"], (list(a), list(b)))
    assert src.shape == (1, 50, 32) and no_global.global_embeds is None
    assert cpm(featurizer, encoders, use_gn=False).g_n is None


def test_dino_input_is_the_dinov2_processor_on_the_original(featurizer: SDFeaturizer) -> None:
    """dino_pixels against transformers' own dinov2-base image processor (PIL backend), on odd sizes."""
    processor = _dinov2_processor()
    rng = np.random.default_rng(0)
    for w, h in [(500, 375), (333, 517), (256, 256), (640, 241)]:
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        torch.testing.assert_close(dino_pixels(im), processor(im, return_tensors="pt")["pixel_values"][0], rtol=0, atol=1e-6)


def test_dino_input_on_real_pfwillow_images() -> None:
    root = SHARED_DATA / "pf-willow"
    if not root.is_dir():
        pytest.skip("the PF-Willow test set is not at ../shared/data/pf-willow")
    from sdm.data import load_dataset

    data = load_dataset("pfwillow", root, image_size=768)
    processor = _dinov2_processor()
    ids = data.image_ids()[::25]
    for image_id in ids:
        original = data.original_image(image_id)
        assert original.size != (768, 768)
        torch.testing.assert_close(dino_pixels(original), processor(original, return_tensors="pt")["pixel_values"][0], rtol=0, atol=1e-6)
        squashed = DinoDescriptor(tiny_dinov2(0)).resized_pixels(data.load_image(image_id)[None])[0]
        assert (squashed - dino_pixels(original)).abs().mean() > 0.05  # the resized input is another input


def _dinov2_processor():  # facebook/dinov2-base's preprocessor_config.json, as transformers' PIL processor
    try:
        from transformers import BitImageProcessorPil as Processor
    except ImportError:  # transformers without the PIL-named class
        from transformers import BitImageProcessor as Processor
    return Processor(
        do_resize=True, size={"shortest_edge": 256}, resample=3, do_center_crop=True, crop_size={"height": 224, "width": 224},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225], do_convert_rgb=True,
    )


def test_all_six_ablations_build(featurizer: SDFeaturizer, encoders: PromptEncoders) -> None:
    assert len(CPM_ABLATIONS) == 6
    a, b = images(1, 0), images(1, 1)
    prompts = []
    for overrides in CPM_ABLATIONS.values():
        module = build_prompt("cpm", featurizer, encoders=encoders, cpm=CPMConfig(**overrides))
        src, _ = module.pair_prompts(featurizer, a, b, ["x"], (list(a), list(b)))
        prompts.append(src)
    for i in range(6):  # six different computations
        assert all(prompts[i].shape != prompts[j].shape or not torch.allclose(prompts[i], prompts[j]) for j in range(i))


def test_parameter_groups(featurizer: SDFeaturizer, encoders: PromptEncoders) -> None:
    groups = build_prompt("cpm", featurizer, encoders=encoders).parameter_groups(1e-2, 1e-3)
    assert [g["lr"] for g in groups] == [1e-2, 1e-3]
    assert sum(p.numel() for p in groups[1]["params"]) == 64 * 32 + 32 + 256 * 256 + 256  # g_d and g_n
    assert all(not p.requires_grad for p in build_prompt("cpm", featurizer, encoders=encoders).dino.parameters())


@pytest.mark.parametrize("kind", ["single", "class", "cpm"])
def test_save_load_round_trip(kind: str, tmp_path: Path, featurizer: SDFeaturizer, encoders: PromptEncoders) -> None:
    module = build_prompt(kind, featurizer, categories=CATS, encoders=encoders, cpm=CPMConfig(use_gn=False), seed=4)  # type: ignore[arg-type]
    with torch.no_grad():
        for p in module.trainable_state().values():
            p.add_(0.5)
    path = save_prompt(module, tmp_path / "p", featurizer, step=12, train_config={"lr": 0.01})
    meta = json.loads((tmp_path / "p.json").read_text())
    assert meta["kind"] == kind and meta["step"] == 12 and meta["random_weights"] is True
    loaded = load_prompt(path, featurizer, encoders=encoders)
    for k, v in module.trainable_state().items():
        torch.testing.assert_close(loaded.trainable_state()[k], v)
    assert not any(k.startswith("dino.") for k in module.trainable_state())


def test_load_into_wrong_model_names_shapes(tmp_path: Path, featurizer: SDFeaturizer) -> None:
    save_prompt(build_prompt("single", featurizer), tmp_path / "p", featurizer)
    other = SDFeaturizer(_wide_tiny(), image_size=64)
    with pytest.raises(ValueError, match=r"tokens: saved \[1, 75, 32\] vs model \[1, 75, 48\]"):
        load_prompt(tmp_path / "p", other)


def _wide_tiny() -> sdm.StableDiffusion:
    """The tiny model with a 48-wide text encoder (a model the saved prompt does not fit)."""
    from transformers import CLIPTextModel

    from sdm.models import TINY_VOCAB_SIZE, _text_config

    sd = sdm.tiny_stable_diffusion(0)
    sd.text_encoder = CLIPTextModel(_text_config(48, 1, 4, 64, TINY_VOCAB_SIZE)).eval()
    return sd


def test_unknown_prompt_and_missing_encoders(featurizer: SDFeaturizer) -> None:
    with pytest.raises(ValueError, match="unknown prompt 'best'"):
        build_prompt("best", featurizer)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="DINOv2"):
        build_prompt("cpm", featurizer)
    with pytest.raises(ValueError, match="categories"):
        build_prompt("class", featurizer)


def test_prompts_saved_by_sdm_0_1_keep_their_computation(tmp_path: Path, featurizer: SDFeaturizer, encoders: PromptEncoders) -> None:
    """A CPM saved before the authors' form existed (tensors omega_alpha, omega_pos, global_tokens; no "form" in
    its config) still computes F * omega_alpha + omega_pos on the resized image; an old template keeps its words."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    state = {
        "global_tokens": torch.randn(1, 25, 32, generator=g), "omega_alpha": torch.randn(50, 32, generator=g),
        "omega_pos": torch.randn(50, 32, generator=g), "g_d.weight": torch.randn(32, 64, generator=g) * 0.1,
        "g_d.bias": torch.zeros(32), "g_n.weight": torch.randn(256, 256, generator=g) * 0.05, "g_n.bias": torch.zeros(256),
    }
    save_file(state, str(tmp_path / "old.safetensors"))
    old_cfg = {"n_global": 25, "n_cond": 50, "descriptor": "patch", "condition": "pair", "global_prompt": True, "use_gn": True, "dino_size": 224, "gn_width": 256}
    meta = {"kind": "cpm", "model": "tiny", "embed_dim": 32, "shapes": {k: list(v.shape) for k, v in state.items()}, "config": {"cpm": old_cfg}}
    (tmp_path / "old.json").write_text(json.dumps(meta))
    module = load_prompt(tmp_path / "old", featurizer, encoders=encoders)
    assert module.cfg.form == "paper" and not module.needs_originals
    a, b = images(1, 0), images(1, 1)
    prompt, _ = module.pair_prompts(featurizer, a, b, ["x"])
    from sdm.encoders import IMAGENET_MEAN, IMAGENET_STD

    def dino(x: torch.Tensor) -> torch.Tensor:  # sdm 0.1: the resized image squashed to 224, bicubic, antialiased
        x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return encoders.dino(pixel_values=x).last_hidden_state[:, 1:]

    f = torch.cat([dino(a), dino(b)], dim=2) @ state["g_d.weight"].T + state["g_d.bias"]
    f = (f.transpose(1, 2) @ state["g_n.weight"].T).transpose(1, 2)
    expected = adaptive_max_pool(f, 50) * state["omega_alpha"] + state["omega_pos"]
    torch.testing.assert_close(prompt, torch.cat([state["global_tokens"], expected], dim=1), rtol=1e-4, atol=1e-5)
    save_file({}, str(tmp_path / "t.safetensors"))
    (tmp_path / "t.json").write_text(json.dumps({"kind": "template", "model": "tiny", "embed_dim": 32, "shapes": {}, "config": {"template": "a photo of a {}"}}))
    assert load_prompt(tmp_path / "t", featurizer).image_prompt(featurizer, None, ["pottedplant"]) == ["a photo of a potted plant"]


def test_cpm_reads_stored_images_once_each_and_alone_as_the_authors(featurizer: SDFeaturizer, encoders: PromptEncoders) -> None:
    """Images as stored (`originals_for` -> StoredImages) go through DINOv2 one at a time and are kept by id, as
    pre_compute_dino_feature.py:54-65 computes (batch of one) and reuses: only unseen images are decoded, and a
    prompt equals the formula on each image's own DINOv2 output."""
    module = cpm(featurizer, encoders)
    pics = {f"im{i}": im for i, im in enumerate(images(4, 3))}
    decoded: list[str] = []

    def load(image_id: str) -> torch.Tensor:
        decoded.append(image_id)
        return pics[image_id]

    src_o, trg_o = originals_for(module, ["im0", "im1"], load), originals_for(module, ["im2", "im0"], load)
    assert isinstance(src_o, StoredImages) and decoded == []  # nothing decoded before it is read
    a, b = torch.stack([pics["im0"], pics["im1"]]), torch.stack([pics["im2"], pics["im0"]])
    prompt, _ = module.pair_prompts(featurizer, a, b, ["x", "y"], (src_o, trg_o))
    assert sorted(decoded) == ["im0", "im1", "im2"]  # im0 twice in the batch, decoded once
    alone = {k: encoders.dino(pixel_values=dino_pixels(v)[None]).last_hidden_state[0, 1:] for k, v in pics.items()}
    f = torch.cat([torch.stack([alone["im0"], alone["im1"]]), torch.stack([alone["im2"], alone["im0"]])], dim=2)
    x = f @ module.g_d.weight.T + module.g_d.bias
    x = (x.transpose(1, 2) @ module.g_n.weight.T + module.g_n.bias).transpose(1, 2)
    cond = torch.tanh(module.alpha_cond) * (adaptive_max_pool(x, 50) + module.positional_embedding)
    torch.testing.assert_close(prompt[:, 25:], cond, rtol=1e-4, atol=1e-5)
    again, _ = module.pair_prompts(featurizer, a, b, ["x", "y"], (originals_for(module, ["im0", "im1"], load), trg_o))
    assert sorted(decoded) == ["im0", "im1", "im2"]  # all kept: nothing decoded again
    torch.testing.assert_close(again, prompt, rtol=0, atol=0)
    # Another loader (another dataset) with the same ids: the kept descriptors are not reused.
    other = {k: 1 - v for k, v in pics.items()}
    flipped, _ = module.pair_prompts(featurizer, a, b, ["x", "y"], (StoredImages(["im0", "im1"], other.__getitem__), StoredImages(["im2", "im0"], other.__getitem__)))
    assert not torch.allclose(flipped[:, 25:], prompt[:, 25:])
