"""LoRA runs: parameter counts after wrapping, a fresh preset's base saved next to its adapter; model cards that name
the data and recipe actually used."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _args(tmp_path, *extra):
    from trl import ModelConfig, SFTConfig, TrlParser

    from ghostvis_hf.training import GhostVisArguments

    parser = TrlParser((SFTConfig, ModelConfig, GhostVisArguments))
    return parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path / "out"), "--report_to", "none", "--bf16", "false", *extra])


def test_lora_parameter_counts_are_taken_after_wrapping(tiny):
    from peft import get_peft_model
    from trl import ModelConfig

    from ghostvis_hf.training import parameter_counts, peft_config_for

    model, _ = tiny
    before = parameter_counts(model)
    assert before["frozen"] == 0  # what runs logged as "trainable parameters: 900,096 | frozen: 0"
    wrapped = get_peft_model(model, peft_config_for(ModelConfig(use_peft=True, lora_r=4)))
    counts = parameter_counts(wrapped)
    trainable, total = wrapped.get_nb_trainable_parameters()
    assert counts == {"trainable": trainable, "frozen": total - trainable}
    assert 0 < counts["trainable"] < counts["frozen"]


def test_lora_on_a_fresh_preset_saves_a_base_the_adapter_loads_onto(tmp_path):
    from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
    from transformers import AutoModelForImageTextToText

    from ghostvis_hf.training import load_model_and_processor, peft_config_for

    training_args, model_args, gv_args = _args(tmp_path, "--use_peft", "--lora_r", "4",
                                               "--config_overrides", "text_config.num_hidden_layers=1")
    model, processor = load_model_and_processor(gv_args, model_args, training_args)
    base = tmp_path / "out" / "base"
    assert (base / "model.safetensors").exists() and (base / "processor_config.json").exists()
    peft_model = get_peft_model(model, peft_config_for(model_args))
    with torch.no_grad():  # what training would do to the adapter and the fully trained glue
        for name, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    adapter = tmp_path / "out" / "adapter"
    peft_model.save_pretrained(adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base)  # was null

    ids = processor.tokenizer("a red circle", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = peft_model.eval()(input_ids=ids).logits
        loaded = AutoPeftModelForCausalLM.from_pretrained(str(adapter), trust_remote_code=True).eval()
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected)
        base_model = AutoModelForImageTextToText.from_pretrained(str(base), trust_remote_code=True)
        by_hand = PeftModel.from_pretrained(base_model, str(adapter)).eval()
        torch.testing.assert_close(by_hand(input_ids=ids).logits, expected)


def test_model_card_names_the_data_recipe_and_settings(tiny, tmp_path):
    from ghostvis_hf.hub import model_card, training_origin

    training_args, model_args, gv_args = _args(
        tmp_path, "--use_peft", "--lora_r", "8", "--learning_rate", "2e-4", "--max_steps", "300",
        "--per_device_train_batch_size", "4", "--freeze_vision_tower", "true")
    data = {"sources": [{"name": "conversations", "path": "/data/pets/train.jsonl", "weight": 1.0}],
            "eval_dataset": "/data/pets/test.jsonl", "eval_split_fraction": None,
            "answer_style": {"conversations": "none"}}  # what training.describe_data gives
    origin = training_origin("recipes/sft.py", "multimodal SFT", data, training_args, model_args, gv_args)
    card = model_card(tiny[0], repo=str(tmp_path / "out"), origin=origin)
    assert "shapes" not in card
    for text in ("`recipes/sft.py` (multimodal SFT)", "conversations (`/data/pets/train.jsonl`)",
                 "eval dataset /data/pets/test.jsonl; answer style conversations: none",
                 "the `tiny` preset, randomly initialised", "LoRA, r=8",
                 "| frozen | vision tower |", "300 steps", "0.0002 (linear)", "4 per device", "| seed | 42 |"):
        assert text in card, text
    mixture = {"sources": [{"name": "vqav2", "path": "/v", "weight": 0.8}, {"name": "text_chat", "path": "/t",
                                                                            "weight": 0.2}]}
    assert "vqav2 (`/v`) x0.8 + text_chat (`/t`) x0.2" in training_origin("recipes/sft.py", "SFT", mixture)


def test_sft_recipe_lora_on_a_fresh_preset(tmp_path):
    # The recipe as users run it: counts after wrapping in the log and summary, the base next to the adapter.
    out = tmp_path / "sft"
    res = subprocess.run(
        [sys.executable, "recipes/sft.py", "--use_peft", "--lora_r", "4", "--max_steps", "1", "--output_dir",
         str(out), "--save_strategy", "no", "--num_train_samples", "16", "--per_device_train_batch_size", "4",
         "--eval_after_training", "false", "--plot", "false", "--cpu_threads", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    counts = json.loads((out / "sft_summary.json").read_text())["parameters"]
    assert 0 < counts["trainable"] < counts["frozen"]
    assert f"trainable parameters: {counts['trainable']:,} | frozen: {counts['frozen']:,}" in res.stderr
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(out / "base") and (out / "base" / "config.json").exists()
    card = (out / "README.md").read_text()
    assert "LoRA, r=4" in card and "`recipes/sft.py`" in card
