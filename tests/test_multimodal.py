"""Multimodal models: encoder shapes, the two fusions, generation against teacher forcing, a seconds-long
captioning run from a manifest to ``LanguageModel.caption``, and the errors promised."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from lmforge.config import FinetuneConfig, FinetuneDataConfig, FinetuneTrainConfig, MediaConfig, ModelConfig
from lmforge.data.media_rows import PLACEHOLDER_ID, MediaRow, collate_media, prompt_ids
from lmforge.errors import ConfigError, RequestError
from lmforge.models import build_model
from lmforge.models.multimodal.encoders import AudioEncoder, ImageCNN, VideoEncoder, ViT
from lmforge.models.multimodal.fusion import MediaLM
from lmforge.tokenizer import Tokenizer

TINY = {"width": 32, "n_layer": 1, "n_head": 2, "image_size": 16, "patch_size": 4}


def media_config(modality: str, **options) -> MediaConfig:
    return MediaConfig(**{**TINY, **options}).resolved(modality)


def test_encoders_give_fixed_token_sequences():
    images = torch.rand(3, 3, 16, 16)
    cnn, vit = ImageCNN(media_config("image")), ViT(media_config("image", encoder="vit"))
    assert cnn(images).shape == (3, cnn.num_tokens, 32) and cnn.num_tokens == 4  # (16/8)^2 cells
    assert vit(images).shape == (3, vit.num_tokens, 32) and vit.num_tokens == 16  # (16/4)^2 patches
    audio = AudioEncoder(media_config("audio", sample_rate=8000, max_seconds=1.0, n_fft=200, hop_length=80,
                                      n_mels=40))
    assert audio(torch.randn(2, 8000)).shape == (2, audio.num_tokens, 32) and audio.num_tokens == 25  # 100 frames / 4
    clips = torch.rand(2, 4, 3, 16, 16)
    ordered = VideoEncoder(media_config("video", frames=4))
    averaged = VideoEncoder(media_config("video", frames=4, temporal="mean"))
    assert ordered(clips).shape == (2, 4, 32) and averaged(clips).shape == (2, 1, 32)


def test_frame_averaging_forgets_the_order_and_the_temporal_transformer_does_not():
    clips = torch.rand(1, 4, 3, 16, 16)
    reversed_clips = clips.flip(1)
    torch.manual_seed(0)
    averaged = VideoEncoder(media_config("video", frames=4, temporal="mean")).eval()
    ordered = VideoEncoder(media_config("video", frames=4)).eval()
    with torch.no_grad():
        torch.testing.assert_close(averaged(clips), averaged(reversed_clips))
        assert not torch.allclose(ordered(clips), ordered(reversed_clips), atol=1e-4)


def tokenizer() -> Tokenizer:
    return Tokenizer.train(["a photo of a red green blue square circle? what colour is it"], "char")


def media_model(fusion: str, modality: str = "image", **options) -> tuple[MediaLM, Tokenizer]:
    tok = tokenizer()
    preset = "seq2seq-tiny" if fusion == "cross" else "gpt2-tiny"
    torch.manual_seed(0)
    backbone = build_model(ModelConfig.from_dict({"preset": preset, "vocab_size": tok.vocab_size}))
    return MediaLM(backbone, media_config(modality, fusion=fusion, **options)).eval(), tok


def test_prefix_fusion_leaves_the_text_model_unchanged():
    """Without media the decoder is exactly the text model: same weights, same logits."""
    model, tok = media_model("prefix")
    ids = torch.tensor([tok.encode("a red square")])
    text_model = build_model(model.backbone.config)
    text_model.load_state_dict(model.backbone.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model.backbone(ids), text_model.eval()(ids))
        assert torch.equal(model.backbone(ids, input_offsets=torch.zeros(1, ids.shape[1], 32)), text_model(ids))


@pytest.mark.parametrize("fusion", ["prefix", "cross"])
def test_generation_with_a_cache_matches_teacher_forcing(fusion):
    """Greedy outputs of a batch of questions of different lengths (left padding, a KV cache) are the
    argmax of the training forward pass over the same media and text, token by token."""
    from lmforge.config import SamplingConfig
    from lmforge.inference.media import media_generate

    model, tok = media_model(fusion)
    images = torch.rand(3, 3, 16, 16)
    questions = ["what colour is it?", "", "red?"]
    sampling = SamplingConfig(max_new_tokens=6, temperature=0.0, ignore_eos=True)
    outputs = media_generate(model, tok, images, questions, sampling)
    for image, question, (generated, _) in zip(images, questions, outputs):
        assert len(generated) == 6
        rows = [MediaRow(image, prompt_ids(tok, question), generated)]
        batch = collate_media(rows, fusion, model.num_media_tokens, 0, tok.bos_id, tok.eos_id)
        with torch.no_grad():
            logits = model(batch["input_ids"], media=batch["media"], attention_mask=batch.get("attention_mask"),
                           decoder_input_ids=batch.get("decoder_input_ids"))
        targets = batch["labels"][0] != -100
        assert logits[0][targets].argmax(-1).tolist()[:6] == generated


def test_collate_puts_the_media_first_and_trains_on_the_target_and_eos_only():
    row = MediaRow(torch.zeros(3, 16, 16), [7, 8], [5, 6])
    batch = collate_media([row, MediaRow(torch.zeros(3, 16, 16), [9], [4])], "prefix", 3, pad_id=0, bos_id=1, eos_id=2)
    assert batch["input_ids"][0].tolist() == [PLACEHOLDER_ID] * 3 + [7, 8, 5, 6]
    assert batch["labels"][0].tolist() == [-100] * 4 + [5, 6, 2]  # position t predicts token t + 1
    assert batch["labels"][1].tolist() == [-100] * 3 + [4, 2, -100, -100]
    cross = collate_media([row], "cross", 3, pad_id=0, bos_id=1, eos_id=2)
    assert cross["input_ids"][0].tolist() == [7, 8] and cross["decoder_input_ids"][0].tolist() == [1, 5, 6]
    assert cross["labels"][0].tolist() == [5, 6, 2]


def test_fusion_needs_the_matching_family():
    tok = tokenizer()
    decoder = build_model(ModelConfig.from_dict({"preset": "gpt2-tiny", "vocab_size": tok.vocab_size}))
    with pytest.raises(ConfigError, match="cross needs an encoder-decoder"):
        MediaLM(decoder, media_config("image", fusion="cross"))
    seq2seq = build_model(ModelConfig.from_dict({"preset": "seq2seq-tiny", "vocab_size": tok.vocab_size}))
    with pytest.raises(ConfigError, match="prefix puts the media before the text of a decoder"):
        MediaLM(seq2seq, media_config("image", fusion="prefix"))


# ------------------------------------------------------------------------------------------
# A seconds-long captioning run, from a manifest to LanguageModel.caption
# ------------------------------------------------------------------------------------------
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def colour_manifest(folder, count: int, seed: int) -> str:
    """Noisy solid images of three colours, captioned with the colour's name, as PNG files."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        name = list(COLOURS)[i % 3]
        pixels = np.clip(np.array(COLOURS[name]) + rng.normal(0, 25, (16, 16, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "text": f"a {name} photo"}))
    path = folder / "manifest.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def caption_run(tmp_path_factory):
    from lmforge.recipes.finetune import finetune

    root = tmp_path_factory.mktemp("caption")
    train = colour_manifest(root / "train", 60, seed=0)
    val = colour_manifest(root / "val", 12, seed=1)
    tokenizer().save(root / "tok")
    config = FinetuneConfig(tokenizer=str(root / "tok"), out=str(root / "run"),
                            data=FinetuneDataConfig(path=train, val_path=val),
                            train=FinetuneTrainConfig(max_steps=60, batch_size=12, lr=3e-3, warmup_steps=5,
                                                      eval_interval=60, device="cpu", progress=False, seed=0),
                            media=MediaConfig(**TINY))
    config.model = ModelConfig.from_dict("gpt2-tiny")
    return finetune(config), val, root


def test_a_tiny_captioning_run_learns_and_its_checkpoint_captions(caption_run):
    from lmforge.api import LanguageModel

    result, val, root = caption_run
    metrics = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    final = [m for m in metrics if "val_exact_match" in m][-1]
    assert final["val_exact_match"] == 100.0
    lm = LanguageModel.load(result.final_checkpoint, device="cpu")
    assert set(lm.capabilities) == {"caption", "ask"}
    blue = np.full((16, 16, 3), COLOURS["blue"], dtype=np.uint8)
    assert lm.caption(blue) == "a blue photo"
    folder = root / "val"
    assert lm.caption([str(folder / "0.png"), Image.open(folder / "1.png"), (folder / "2.png").read_bytes()]) == \
        ["a red photo", "a green photo", "a blue photo"]


def test_a_media_checkpoint_says_what_it_reads(caption_run):
    from lmforge.api import LanguageModel

    lm = LanguageModel.load(caption_run[0].final_checkpoint, device="cpu")
    with pytest.raises(RequestError, match="reads image, not audio: it cannot transcribe; it can caption, ask"):
        lm.transcribe(np.zeros(8000, dtype=np.float32))
    with pytest.raises(RequestError, match="image"):
        lm.caption(b"not an image")
    with pytest.raises(RequestError, match="cannot generate"):
        lm.generate("a photo")


def test_a_text_model_asked_to_caption_names_what_it_is(tmp_path):
    from lmforge.api import LanguageModel
    from lmforge.training.checkpoint import save_checkpoint

    tok = tokenizer()
    model = build_model(ModelConfig.from_dict({"preset": "gpt2-tiny", "vocab_size": tok.vocab_size}))
    lm = LanguageModel.load(save_checkpoint(tmp_path / "lm", model, tok, None, {"step": 0}), device="cpu")
    with pytest.raises(RequestError, match="cannot caption"):
        lm.caption(np.zeros((16, 16, 3), dtype=np.uint8))


def test_the_cli_captions_files_and_refuses_the_wrong_modality(caption_run, capsys):
    from lmforge.cli import main

    result, _, root = caption_run
    files = [str(root / "val" / f"{i}.png") for i in range(3)]
    assert main(["caption", str(result.final_checkpoint), *files]) == 0
    assert capsys.readouterr().out.splitlines() == ["a red photo", "a green photo", "a blue photo"]
    assert main(["caption", str(result.final_checkpoint), files[2], "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"file": files[2], "text": "a blue photo"}
    assert main(["transcribe", str(result.final_checkpoint), files[0]]) == 2
    assert "reads image, not audio" in capsys.readouterr().err
    assert main(["caption", str(result.final_checkpoint), str(root / "missing.png")]) == 2
    assert "no such file" in capsys.readouterr().err
