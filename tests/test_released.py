"""The authors' released prompts (pretrained_prompts.zip): files written here in their exact format with
torch.save, imported, and compared with the authors' computation done independently in the test."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import SUBPROCESS_TIMEOUT, clip_transformer

from sdm.encoders import PromptEncoders, dino_pixels, tiny_dinov2
from sdm.features import SDFeaturizer
from sdm.prompt_files import load_prompt
from sdm.prompts import CPMConfig
from sdm.released import import_sd4match, list_released, parse_released_name

D = 32  # the tiny model's text width


def authors_token_embeds(featurizer: SDFeaturizer, learned: torch.Tensor) -> torch.Tensor:
    """hidden_state.py:96-115: embedding-layer outputs of [BOS, random ids, EOS] (positions 0..76) with rows
    1..75 replaced by the learned vectors. learned: 1 x 75 x D -> 1 x 77 x D."""
    tok = featurizer.sd.tokenizer
    ids = torch.tensor([[tok.bos_token_id, *torch.randint(tok.vocab_size, (75,)).tolist(), tok.eos_token_id]])
    with torch.no_grad():
        emb = clip_transformer(featurizer.sd.text_encoder).embeddings(input_ids=ids)
    return torch.cat([emb[:, :1], learned, emb[:, 76:]], dim=1)


def authors_hidden_states(featurizer: SDFeaturizer, token_embeds: torch.Tensor) -> torch.Tensor:
    """The pipeline's `_encode_prompt(token_embeds=...)`: the text model run on those embeddings (its own causal
    mask and final layer norm), done here by replacing the embedding layer's output with a forward hook."""
    te = featurizer.sd.text_encoder
    handle = clip_transformer(te).embeddings.register_forward_hook(lambda _m, _a, _out: token_embeds)
    try:
        ids = torch.zeros(token_embeds.shape[:2], dtype=torch.long)
        with torch.no_grad():
            return te(input_ids=ids).last_hidden_state
    finally:
        handle.remove()


def write(folder: Path, name: str, file: str, obj: object) -> Path:
    (folder / name).mkdir(parents=True, exist_ok=True)
    torch.save(obj, folder / name / file)
    return folder / name


def test_single_token_embeds(tmp_path: Path, featurizer: SDFeaturizer) -> None:
    torch.manual_seed(0)
    t = authors_token_embeds(featurizer, torch.randn(1, 75, D))
    folder = write(tmp_path, "Single_spair_sd2-1_TokenEmbeds75", "caption.pt", {"dataset": t})
    module, entry = import_sd4match(folder, featurizer)
    assert entry.kind == "single" and entry.dataset == "spair" and module.conditioning == "fixed"
    hidden = featurizer.encode_prompt(module.image_prompt(featurizer, None, ["cat"]))
    torch.testing.assert_close(hidden, authors_hidden_states(featurizer, t), rtol=1e-4, atol=1e-5)


def test_class_token_embeds_and_zip(tmp_path: Path, featurizer: SDFeaturizer) -> None:
    torch.manual_seed(1)
    cats = ["cat", "aeroplane", "tvmonitor"]
    tensors = {c: authors_token_embeds(featurizer, torch.randn(1, 75, D)) for c in cats}
    write(tmp_path / "unzipped", "Class_pfpascal_sd2-1_TokenEmbeds75", "caption.pt", tensors)
    write(tmp_path / "unzipped", "Single_pfpascal_sd2-1_TokenEmbeds75", "caption.pt", {"dataset": tensors["cat"]})
    archive = tmp_path / "pretrained_prompts.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in (tmp_path / "unzipped").rglob("*.pt"):
            zf.write(f, Path("pretrained_prompts") / f.relative_to(tmp_path / "unzipped"))
    assert list_released(archive) == ["Class_pfpascal_sd2-1_TokenEmbeds75", "Single_pfpascal_sd2-1_TokenEmbeds75"]
    with pytest.raises(ValueError, match="holds 2 prompts"):
        import_sd4match(archive, featurizer)
    for source in (archive, tmp_path / "unzipped"):
        module, entry = import_sd4match(source, featurizer, name="Class_pfpascal_sd2-1_TokenEmbeds75")
        assert entry.kind == "class" and module.conditioning == "category"
        picked = featurizer.encode_prompt(module.image_prompt(featurizer, None, ["tvmonitor", "cat"]))
        expected = torch.cat([authors_hidden_states(featurizer, tensors[c]) for c in ("tvmonitor", "cat")])
        torch.testing.assert_close(picked, expected, rtol=1e-4, atol=1e-5)


def test_hidden_state_prompt_is_used_as_is(tmp_path: Path, featurizer: SDFeaturizer) -> None:
    h = torch.randn(1, 77, D)
    folder = write(tmp_path, "Single_spair_sd2-1_HiddenState", "caption.pt", {"dataset": h})
    module, _ = import_sd4match(folder, featurizer)
    torch.testing.assert_close(featurizer.encode_prompt(module.image_prompt(featurizer, None, ["x"])), h)


def authors_cpm_state(d_in: int, seed: int) -> dict[str, torch.Tensor]:
    """A ckpt.pt as HybridCaptioner.save_state_dict writes it for Pair-DINO-Feat-G25-C50 (with the stray
    position_ids buffer of the text embeddings)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "global_embeds": torch.rand(1, 25, D, generator=g),
        "positional_embedding": torch.rand(1, 50, D, generator=g),
        "alpha_cond": torch.rand(1, 50, D, generator=g),
        "linear_C.weight": torch.randn(D, 2 * d_in, generator=g) * 0.1,
        "linear_C.bias": torch.randn(D, generator=g) * 0.1,
        "linear_N.weight": torch.randn(256, 256, generator=g) * 0.05,
        "linear_N.bias": torch.randn(256, generator=g) * 0.05,
        "text_model_embeddings.position_ids": torch.arange(77)[None],
    }


def test_cpm_checkpoint(tmp_path: Path, featurizer: SDFeaturizer) -> None:
    dino = tiny_dinov2(0)
    state = authors_cpm_state(32, 0)
    folder = write(tmp_path, "CPM_spair_sd2-1_Pair-DINO-Feat-G25-C50", "ckpt.pt", state)
    module, entry = import_sd4match(folder, featurizer, encoders=PromptEncoders(dino=dino))
    assert entry.kind == "cpm" and module.conditioning == "pair" and module.needs_originals
    src_img, trg_img = torch.rand(3, 70, 90), torch.rand(3, 120, 64)  # originals of any size
    prompt, _ = module.pair_prompts(featurizer, None, None, ["x"], ([src_img], [trg_img]))
    # hybrid_captioner.py:161-167 and 184-192, written out
    with torch.no_grad():
        f = torch.cat([dino(pixel_values=dino_pixels(im)[None]).last_hidden_state[:, 1:] for im in (src_img, trg_img)], dim=2)
        x = f @ state["linear_C.weight"].T + state["linear_C.bias"]
        x = (x.transpose(1, 2) @ state["linear_N.weight"].T + state["linear_N.bias"]).transpose(1, 2)
        x = torch.nn.functional.adaptive_max_pool1d(x.transpose(1, 2), 50).transpose(1, 2)
        cond = torch.tanh(state["alpha_cond"]) * (state["positional_embedding"] + x)
    torch.testing.assert_close(prompt, torch.cat([state["global_embeds"], cond], dim=1), rtol=1e-4, atol=1e-5)


def test_released_names() -> None:
    assert parse_released_name("CPM_pfpascal_sd2-1_Img-DINO-Feat-G25-C50").cpm == CPMConfig(condition="image")
    head = parse_released_name("CPM_spair_sd2-1_Pair-DINO-Head-G0-C50").cpm
    assert head is not None and head.descriptor == "global" and not head.global_prompt
    with pytest.raises(ValueError, match="not a folder name"):
        parse_released_name("my_prompt")
    with pytest.raises(ValueError, match="CLIP"):
        parse_released_name("CPM_spair_sd2-1_Pair-CLIP-Feat-G25-C50")


def test_clear_errors(tmp_path: Path, featurizer: SDFeaturizer) -> None:
    wide = write(tmp_path, "Single_spair_sd1-5_TokenEmbeds75", "caption.pt", {"dataset": torch.randn(1, 77, 48)})
    with pytest.raises(ValueError, match=r"D = 48 .* has D = 32"):
        import_sd4match(wide, featurizer)
    other = write(tmp_path, "Single_spair_sd2-1_TokenEmbeds75", "caption.pt", {"dataset": torch.randn(1, 77, D)})
    with pytest.raises(ValueError, match="BOS and EOS"):
        import_sd4match(other, featurizer)
    state = authors_cpm_state(32, 1)
    del state["alpha_cond"]
    missing = write(tmp_path, "CPM_spair_sd2-1_Pair-DINO-Feat-G25-C50", "ckpt.pt", state)
    with pytest.raises(ValueError, match=r"alpha_cond: saved None"):
        import_sd4match(missing, featurizer, encoders=PromptEncoders(dino=tiny_dinov2(0)))
    state = {**authors_cpm_state(32, 1), "extra_gate": torch.zeros(3)}
    unknown = write(tmp_path / "u", "CPM_spair_sd2-1_Pair-DINO-Feat-G25-C50", "ckpt.pt", state)
    with pytest.raises(ValueError, match="unknown tensors"):
        import_sd4match(unknown, featurizer, encoders=PromptEncoders(dino=tiny_dinov2(0)))
    with pytest.raises(FileNotFoundError, match="no released prompts"):
        import_sd4match(tmp_path / "nowhere", featurizer)


@pytest.mark.slow
def test_import_prompt_cli_writes_sdm_prompts(tmp_path: Path, featurizer: SDFeaturizer) -> None:
    torch.manual_seed(2)
    t = authors_token_embeds(featurizer, torch.randn(1, 75, D))
    write(tmp_path / "release", "Single_spair_sd2-1_TokenEmbeds75", "caption.pt", {"dataset": t})
    out = tmp_path / "prompts"
    cmd = [sys.executable, "-m", "sdm.cli", "import-prompt", str(tmp_path / "release"), "--model", "tiny", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert done.returncode == 0, done.stderr
    loaded = load_prompt(out / "Single_spair_sd2-1_TokenEmbeds75", featurizer)
    hidden = featurizer.encode_prompt(loaded.image_prompt(featurizer, None, ["x"]))
    torch.testing.assert_close(hidden, authors_hidden_states(featurizer, t), rtol=1e-4, atol=1e-5)


def test_find_prompt_by_metadata(tmp_path: Path, featurizer: SDFeaturizer) -> None:
    """Notebooks find a prompt by kind and training data in its metadata, whoever wrote it; of the release's CPM
    variants the paper's (Pair, patch features, G25, C50) is taken."""
    from sdm.notebooks import find_prompt
    from sdm.prompt_files import save_prompt
    from sdm.prompts import build_prompt

    dino = PromptEncoders(dino=tiny_dinov2(0))
    paper = build_prompt("cpm", featurizer, encoders=dino)
    variant = build_prompt("cpm", featurizer, encoders=dino, cpm=CPMConfig(n_global=0, n_cond=75, global_prompt=False))
    save_prompt(paper, tmp_path / "CPM_spair_sd2-1_Pair-DINO-Feat-G25-C50", featurizer, source={"train_dataset": "spair"})
    save_prompt(variant, tmp_path / "CPM_spair_sd2-1_Pair-DINO-Feat-G0-C75", featurizer, source={"train_dataset": "spair"})
    single = build_prompt("single", featurizer)
    save_prompt(single, tmp_path / "02_single_pfpascal_prompt", featurizer, trained_on={"dataset": "pfpascal", "split": "trn"})
    (tmp_path / "03_evaluate.json").write_text('{"pck": {}}')  # other JSON files are passed over
    assert find_prompt(tmp_path, "cpm", "spair").name == "CPM_spair_sd2-1_Pair-DINO-Feat-G25-C50.safetensors"
    assert find_prompt(tmp_path, "single", "pfpascal").name == "02_single_pfpascal_prompt.safetensors"
    with pytest.raises(FileNotFoundError, match=r"no single prompt trained on spair.*sdm import-prompt"):
        find_prompt(tmp_path, "single", "spair")
    save_prompt(single, tmp_path / "other", featurizer, trained_on={"dataset": "pfpascal"})
    with pytest.raises(ValueError, match="several single prompts"):
        find_prompt(tmp_path, "single", "pfpascal")
