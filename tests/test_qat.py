"""`--qat int8`: torchao's int8 weight fake-quant on the layers `--quantize int8` quantizes, tiny random models on the
CPU: the QAT forward is the int8-dequantized model's forward, gradients pass straight through, convert gives back the
plain model (saves and loads as one), the recipe trains with it, bad values and setups are refused."""

import copy
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import make_image, user_turn, varied_tiny

from ghostvis_hf.inference.loader import load_model
from ghostvis_hf.quantization import int8_weight_only
from ghostvis_hf.training.arguments import GhostVisArguments
from ghostvis_hf.training.qat import convert_qat, is_quantized_module, normalize_qat, prepare_qat

pytest.importorskip("torchao")
from torchao.quantization.qat import FakeQuantizedLinear  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_PEFT = SimpleNamespace(use_peft=False, load_in_4bit=False, load_in_8bit=False)


@pytest.fixture(scope="module")
def varied_checkpoint(tmp_path_factory):
    from ghostvis_hf.hub import save_checkpoint

    model, processor = varied_tiny()
    return save_checkpoint(model, processor, str(tmp_path_factory.mktemp("varied") / "ghostvis-tiny"))


def _batch(processor):
    text = processor.apply_chat_template([user_turn("What color is the circle?"),
                                          {"role": "assistant", "content": "red"}])
    return processor(text=[text], images=[make_image((200, 30, 30))], return_tensors="pt")


def _dequantized_reference(path, dtype):
    """The float model with every weight `--quantize int8` quantizes replaced by its int8-dequantized value (read
    from `load_model(quantize="int8")` itself); returns it and the names of the replaced modules."""
    model, _ = load_model(path, dtype=dtype, device="cpu")
    int8_model, _ = load_model(path, quantize="int8", dtype=dtype, device="cpu")
    replaced = set()
    with torch.no_grad():
        for name, module in int8_model.named_modules():
            if isinstance(module, torch.nn.Linear) and int8_weight_only(module.weight) is not None:
                model.get_submodule(name).weight.copy_(module.weight.dequantize().to(dtype))
                replaced.add(name)
    return model, replaced


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qat_forward_is_the_int8_dequantized_models_forward(varied_checkpoint, dtype):
    model, processor = load_model(varied_checkpoint, dtype=dtype, device="cpu")
    plain = copy.deepcopy(model)
    info = prepare_qat(model, "int8", NO_PEFT)
    reference, replaced = _dequantized_reference(varied_checkpoint, dtype)
    fake = {name for name, m in model.named_modules() if isinstance(m, FakeQuantizedLinear)}
    # the same modules as --quantize int8: the decoder's 7 projections per layer, nothing of the towers or lm_head
    assert fake == replaced and info["modules"] == len(fake) == 7 * model.config.text_config.num_hidden_layers
    assert all(name.startswith("model.language_model.layers.") for name in fake)
    batch = _batch(processor)
    with torch.no_grad():
        logits = model(**batch).logits
        torch.testing.assert_close(logits, reference(**batch).logits, rtol=0, atol=0)
        assert not torch.equal(logits, plain(**batch).logits)  # the fake-quant really changes the forward
    # the parameters themselves stay float and untouched (only the forward sees int8 values)
    for (name, p), (_, q) in zip(model.named_parameters(), plain.named_parameters(), strict=True):
        assert p.dtype == dtype and torch.equal(p, q), name


def test_gradients_pass_straight_through(varied_checkpoint):
    """Each fake-quantized weight gets the gradient the dequantized model's weight gets (rounding is the identity
    backwards), except each row's largest-magnitude weight, which also sets the row's scale; every other parameter
    gets the same gradient as in the dequantized model."""
    model, processor = load_model(varied_checkpoint, device="cpu")
    prepare_qat(model, "int8", NO_PEFT)
    reference, _ = _dequantized_reference(varied_checkpoint, torch.float32)
    batch = _batch(processor)
    for m in (model, reference):
        m.train()
        m(**batch, labels=batch["input_ids"].clone()).loss.backward()
    checked = 0
    for (name, p), (_, r) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        assert p.grad is not None, name
        module = model.get_submodule(name.rsplit(".", 1)[0])
        if isinstance(module, FakeQuantizedLinear) and name.endswith(".weight"):  # biases are not fake-quantized
            assert p.grad.abs().sum() > 0, name
            row_max = p.abs() == p.abs().amax(dim=1, keepdim=True)
            torch.testing.assert_close(p.grad[~row_max], r.grad[~row_max], rtol=1e-4, atol=1e-6)
            checked += 1
        else:
            torch.testing.assert_close(p.grad, r.grad, rtol=1e-4, atol=1e-6)
    assert checked == 7 * model.config.text_config.num_hidden_layers


def test_convert_gives_back_the_plain_model_that_saves_and_loads(varied_checkpoint, tmp_path):
    from ghostvis_hf.hub import save_checkpoint

    model, processor = load_model(varied_checkpoint, device="cpu")
    types = {name: type(m) for name, m in model.named_modules()}
    keys = list(model.state_dict())
    prepare_qat(model, "int8", NO_PEFT)
    assert list(model.state_dict()) == keys  # the Trainer's intermediate checkpoints: same keys during QAT too
    with torch.no_grad():  # as if trained: new values survive the conversion
        model.model.language_model.layers[0].mlp.down_proj.weight.mul_(1.5)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    assert convert_qat(model) == 7 * model.config.text_config.num_hidden_layers
    assert {name: type(m) for name, m in model.named_modules()} == types
    assert list(model.state_dict()) == keys
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    assert convert_qat(model) == 0  # idempotent

    batch = _batch(processor)
    with torch.no_grad():
        before = model(**batch).logits
    path = save_checkpoint(model, processor, str(tmp_path / "qat"))
    assert "quantization_config" not in json.loads(open(os.path.join(path, "config.json")).read())
    script = f"""
import json, torch
from transformers import AutoModelForImageTextToText
model = AutoModelForImageTextToText.from_pretrained({path!r}, trust_remote_code=True)
print(json.dumps(sorted({{type(m).__name__ for n, m in model.named_modules() if n.endswith("proj")}})))
torch.save(model.state_dict(), {str(tmp_path / "state.pt")!r})
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=str(tmp_path), env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FakeQuantizedLinear" not in proc.stdout
    loaded = torch.load(tmp_path / "state.pt")
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    # and --quantize int8 quantizes it like any float checkpoint
    int8, _ = load_model(path, quantize="int8", device="cpu")
    with torch.no_grad():
        assert int8_weight_only(int8.model.language_model.layers[0].mlp.down_proj.weight) is not None
        assert int8(**batch).logits.shape == before.shape


def test_bad_values_and_setups_refused(tiny, monkeypatch):
    model, _ = tiny
    assert normalize_qat(None) is None and normalize_qat("none") is None and normalize_qat("Int8") == "int8"
    assert GhostVisArguments().qat is None and GhostVisArguments(qat="int8").qat == "int8"
    for bad in ("int4", "fp8", "8"):
        with pytest.raises(ValueError, match="allowed: int8 or none"):
            GhostVisArguments(qat=bad)
    assert prepare_qat(model, None, NO_PEFT) is None
    training = SimpleNamespace(deepspeed=None, fsdp=None)
    for peft in ({"use_peft": True}, {"load_in_4bit": True}, {"load_in_8bit": True}):
        with pytest.raises(ValueError, match="LoRA/QLoRA"):
            prepare_qat(model, "int8", SimpleNamespace(**{**vars(NO_PEFT), **peft}), training)
    with pytest.raises(ValueError, match="DeepSpeed"):
        prepare_qat(model, "int8", NO_PEFT, SimpleNamespace(deepspeed="ds.json", fsdp=None))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="FSDP"):
        prepare_qat(model, "int8", NO_PEFT, training)
    assert not any(isinstance(m, FakeQuantizedLinear) for m in model.modules())  # refused before any change


def test_quantized_module_names_follow_the_skip_list():
    linear = torch.nn.Linear(2, 2)
    assert is_quantized_module("model.language_model.layers.0.self_attn.q_proj", linear)
    for name in ("lm_head", "model.vision_tower.encoder.layers.0.mlp.fc1", "model.multi_modal_projector.linear_1",
                 "model.resampler.attn.q_proj"):
        assert not is_quantized_module(name, linear), name
    assert not is_quantized_module("model.language_model.embed_tokens", torch.nn.Embedding(4, 2))


def test_sft_recipe_with_qat_trains_and_saves_a_float_checkpoint(tmp_path):
    out = tmp_path / "sft-qat"
    fast = ["--num_train_samples", "64", "--num_eval_samples", "16", "--per_device_train_batch_size", "8",
            "--logging_steps", "1", "--plot", "false", "--dataloader_num_workers", "0", "--cpu_threads", "1"]
    res = subprocess.run([sys.executable, "recipes/sft.py", "--qat", "int8", "--max_steps", "3", "--output_dir",
                          str(out), "--save_strategy", "no", *fast], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "sft_summary.json").read_text())
    assert summary["steps"] == 3 and summary["eval"]["n"] == 16
    assert summary["qat"]["scheme"] == "int8" and summary["qat"]["modules"] == 7 * 3  # the main job's 3 layers
    assert "quantization-aware training" in (out / "README.md").read_text()
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    model, _ = load_model(str(out), quantize="int8", device="cpu")
    assert int8_weight_only(model.model.language_model.layers[0].self_attn.q_proj.weight) is not None


@pytest.mark.parametrize("recipe", ["align", "pretrain"])
def test_other_recipes_refuse_qat(recipe, tmp_path):
    """align and pretrain share GhostVisArguments; `--qat` there would otherwise be silently ignored."""
    res = subprocess.run([sys.executable, f"recipes/{recipe}.py", "--qat", "int8", "--output_dir", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "--qat" in res.stderr and "recipes/sft.py" in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "model.safetensors").exists()
