"""`compose` from tiny pretrained backbones saved to a temporary folder (no network)."""

import os
import subprocess
import sys

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
)

from ghostvis_hf.compose import compose
from ghostvis_hf.presets import load_tiny_tokenizer, make_image_processor
from conftest import make_image


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    root = tmp_path_factory.mktemp("backbones")
    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(Qwen2Config(vocab_size=1030, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    tok = load_tiny_tokenizer()
    lm.save_pretrained(root / "lm")
    tok.save_pretrained(root / "lm")
    siglip = SiglipModel(SiglipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         vocab_size=100),
    ))
    siglip.save_pretrained(root / "siglip")
    make_image_processor(32).save_pretrained(root / "siglip")
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, image_size=32, patch_size=8))
    clip.save_pretrained(root / "clip")
    make_image_processor(32).save_pretrained(root / "clip")
    return root, lm.eval(), siglip.eval(), clip.eval()


def test_text_only_logits_equal_the_source_lm(backbones):
    root, lm, _, _ = backbones
    model, processor = compose(str(root / "lm"), str(root / "siglip"), num_image_tokens=4, resampler_heads=4)
    model.eval()
    inputs = processor(text="What color is the circle?", return_tensors="pt")
    with torch.no_grad():
        ours = model(**inputs).logits
        ref = lm(input_ids=inputs["input_ids"]).logits
    torch.testing.assert_close(ours, ref)
    # special tokens added, embeddings resized only as far as needed
    assert model.config.image_token_id == processor.image_token_id
    assert model.get_input_embeddings().weight.shape[0] >= len(processor.tokenizer)


def test_vision_weights_copied_and_images_work(backbones):
    root, _, siglip, _ = backbones
    model, processor = compose(str(root / "lm"), str(root / "siglip"), num_image_tokens=4, resampler_heads=4)
    tower = model.model.vision_tower
    ours = dict(tower.named_parameters())
    for name, param in siglip.vision_model.named_parameters():
        if name.startswith("head."):
            continue
        key = name if name in ours else f"vision_model.{name}"
        torch.testing.assert_close(ours[key], param)
    batch = processor(text="<image> what?", images=make_image(), return_tensors="pt")
    assert model(**batch).logits.shape[1] == batch["input_ids"].shape[1]


def test_clip_encoder_drops_cls(backbones):
    root, _, _, _ = backbones
    model, processor = compose(str(root / "lm"), str(root / "clip"), resampler_type="none")
    assert model.config.vision_feature_select_strategy == "default"
    assert processor.num_image_tokens == 16
    batch = processor(text="<image>", images=make_image(), return_tensors="pt")
    assert model(**batch).image_hidden_states.shape[1] == 16


def test_package_level_compose_can_be_called_twice(backbones):
    # The package attribute once was a lazy wrapper that the submodule import replaced: the second call failed.
    import ghostvis_hf

    root, _, _, _ = backbones
    for _ in range(2):
        model, _ = ghostvis_hf.compose(str(root / "lm"), str(root / "siglip"), num_image_tokens=4, resampler_heads=4)
        assert isinstance(model, ghostvis_hf.GhostVisForConditionalGeneration)


def test_compose_cli_writes_a_loadable_checkpoint(backbones, tmp_path):
    root, _, _, _ = backbones
    out = tmp_path / "composed"
    res = subprocess.run([sys.executable, "-m", "ghostvis_hf.cli", "compose", "--text", str(root / "lm"),
                          "--vision", str(root / "siglip"), "--out", str(out), "--num-image-tokens", "4"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    card = (out / "README.md").read_text()
    assert f"- {root / 'lm'}" in card and "base_model:" in card
    assert os.path.exists(out / "modeling_ghostvis.py")


def test_init_and_compose_refuse_to_write_over_a_folder_that_holds_files(tmp_path, capsys):
    from ghostvis_hf.cli import main as ghostvis

    out = tmp_path / "trained"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"trained weights")
    for argv in (["init", "--preset", "tiny", "--out", str(out)],
                 ["compose", "--text", "t", "--vision", "v", "--out", str(out)]):
        with pytest.raises(SystemExit) as exit_:
            ghostvis(argv)
        assert exit_.value.code == 2
        assert "already holds files (a checkpoint?); pass --overwrite" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == b"trained weights"
    assert ghostvis(["init", "--preset", "tiny", "--out", str(out), "--overwrite"]) == 0
    assert (out / "config.json").exists() and (out / "model.safetensors").read_bytes() != b"trained weights"
    assert ghostvis(["init", "--preset", "tiny", "--out", str(tmp_path / "empty_is_fine")]) == 0
