"""`--quantize int8`: torchao's int8 weight-only format on tiny random models, CPU only (the kernels that read it are
tested in test_fused_decode.py): what gets quantized, the checkpoint round trip, the `--quantize` choices."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import varied_tiny

from ghostvis_hf.inference.loader import QUANTIZE_CHOICES, footprint_bytes, load_model
from ghostvis_hf.quantization import int8_weight_only, quantization_kind

PROMPT = [100, 101, 102, 103, 104]


def greedy(model, prompt=PROMPT, new=8):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                             min_new_tokens=new)
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def varied_checkpoint(tmp_path_factory):
    """A tiny checkpoint whose greedy outputs depend on the prompt (random init is too flat to compare tokens)."""
    from ghostvis_hf.hub import save_checkpoint

    model, processor = varied_tiny()
    return save_checkpoint(model, processor, str(tmp_path_factory.mktemp("varied") / "ghostvis-tiny"))


def test_int8_quantizes_the_decoder_projections_and_nothing_else(varied_checkpoint):
    pytest.importorskip("torchao")
    reference, _ = load_model(varied_checkpoint, device="cpu")
    model, _ = load_model(varied_checkpoint, quantize="int8", device="cpu")
    assert quantization_kind(model) == "int8" and quantization_kind(reference) is None
    float_weights = reference.state_dict()
    quantized = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        int8 = int8_weight_only(module.weight)
        if name.startswith("model.language_model.layers."):
            assert int8 is not None, name
            qdata, scale = int8
            expected = float_weights[f"{name}.weight"]
            assert qdata.shape == expected.shape and scale.shape == (expected.shape[0],)
            # symmetric per row: the largest weight of each row maps to the int8 end, every weight within half a step
            assert (qdata.int().abs().amax(dim=1) >= 127).all()
            assert ((qdata.float() * scale[:, None] - expected).abs() <= scale[:, None] / 2 + 1e-7).all(), name
            quantized.append(name)
        else:  # vision tower, resampler, projector, lm_head (QUANT_SKIP_MODULES)
            assert int8 is None and type(module.weight) is torch.nn.Parameter, name
            assert torch.equal(module.weight, float_weights[f"{name}.weight"]), name
    assert len(quantized) == 7 * model.config.text_config.num_hidden_layers
    assert any(n.startswith("model.vision_tower.") for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    assert footprint_bytes(model) < footprint_bytes(reference)


def test_int8_checkpoint_round_trip_in_a_fresh_process(varied_checkpoint, tmp_path):
    """save_pretrained -> from_pretrained(trust_remote_code=True) in a process that never imports ghostvis_hf:
    the weights come back int8 and greedy decoding makes the same tokens as before saving."""
    pytest.importorskip("torchao")
    from ghostvis_hf.hub import save_checkpoint

    model, processor = load_model(varied_checkpoint, quantize="int8", device="cpu")
    before = greedy(model)
    path = save_checkpoint(model, processor, str(tmp_path / "int8"))
    config = json.loads(open(os.path.join(path, "config.json")).read())
    assert config["quantization_config"]["quant_method"] == "torchao"
    float_size = os.path.getsize(os.path.join(varied_checkpoint, "model.safetensors"))
    assert os.path.getsize(os.path.join(path, "model.safetensors")) < float_size

    script = f"""
import json, sys, torch
from transformers import AutoModelForImageTextToText
model = AutoModelForImageTextToText.from_pretrained({path!r}, trust_remote_code=True)
w = model.model.language_model.layers[0].mlp.down_proj.weight
ids = torch.tensor([{PROMPT}])
with torch.no_grad():
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                         min_new_tokens=8)
print(json.dumps({{"tokens": out[0, ids.shape[1]:].tolist(), "qdata": str(w.qdata.dtype),
                   "ghostvis_imported": any(m.startswith("ghostvis_hf") for m in sys.modules)}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=str(tmp_path), env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"tokens": before, "qdata": "torch.int8", "ghostvis_imported": False}
    # and load_model without --quantize reads the int8 checkpoint as int8
    again, _ = load_model(path, device="cpu")
    assert quantization_kind(again) == "int8" and greedy(again) == before


def test_quantize_choices_and_errors(tiny_checkpoint, monkeypatch):
    from ghostvis_hf.inference.chat import build_parser
    from ghostvis_hf.serve.server import build_parser as serve_parser

    assert QUANTIZE_CHOICES == ("int8", "bnb-int8", "bnb-nf4")
    with pytest.raises(ValueError, match="quantize='nf4' is not supported \\(renamed to 'bnb-nf4'\\)"):
        load_model(tiny_checkpoint, quantize="nf4", device="cpu")
    with pytest.raises(ValueError, match="allowed: \\['int8', 'bnb-int8', 'bnb-nf4'\\]"):
        load_model(tiny_checkpoint, quantize="int4", device="cpu")
    for parser in (build_parser(), serve_parser()):
        assert parser.parse_args(["--model", "m", "--quantize", "bnb-nf4"]).quantize == "bnb-nf4"
        with pytest.raises(SystemExit):
            parser.parse_args(["--model", "m", "--quantize", "nf4"])
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # as if torchao were not installed
    with pytest.raises(RuntimeError, match="--quantize int8 needs torchao: pip install 'ghostvis-hf\\[int8\\]'"):
        load_model(tiny_checkpoint, quantize="int8", device="cpu")


def test_int8_weight_only_refuses_other_layouts():
    torchao = pytest.importorskip("torchao")
    from torchao.quantization import Int8Tensor
    from torchao.quantization.granularity import PerGroup, PerRow

    w = torch.randn(8, 64)
    assert int8_weight_only(w) is None and int8_weight_only(torch.nn.Parameter(w)) is None
    qdata, scale = int8_weight_only(Int8Tensor.from_hp(w, PerRow()))
    assert qdata.dtype == torch.int8 and scale.shape == (8,)
    assert int8_weight_only(Int8Tensor.from_hp(w, PerGroup(32))) is None, torchao.__version__  # one scale per group


@pytest.mark.skipif(torch.version.cuda is not None, reason="the filter acts on CPU-only torch builds")
def test_torchao_cuda_extension_warnings_are_dropped_on_cpu_torch_only_those(caplog):
    import logging

    from ghostvis_hf.quantization import PYTREE_LOGGER, TORCHAO_LOGGER, quiet_bitsandbytes_cpu_kernel_warning

    quiet_bitsandbytes_cpu_kernel_warning()
    logger, pytree = logging.getLogger(TORCHAO_LOGGER), logging.getLogger(PYTREE_LOGGER)
    with caplog.at_level(logging.WARNING):
        logger.warning("Failed to load /venv/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: Could not load")
        logger.warning("Skipping import of cpp extensions due to incompatible torch version.")
        pytree.warning("%s is an Enum subclass and is now natively supported by torch.compile as an opaque value "
                       "type. Calling register_constant() ...", "<enum 'KernelPreference'>")
        pytree.warning("something else about pytrees")
    assert [r.getMessage() for r in caplog.records] == [
        "Skipping import of cpp extensions due to incompatible torch version.", "something else about pytrees"]


def test_fused_decoder_names_the_weights_it_cannot_read(tiny):
    pytest.importorskip("torchao")
    from torchao.quantization import Int8Tensor
    from torchao.quantization.granularity import PerGroup, PerRow

    from ghostvis_hf.inference.fused_decoder import unsupported_reason

    model, _ = tiny
    lm = model.model.language_model
    assert unsupported_reason(lm) is None
    layers = lm.layers
    with torch.no_grad():
        up = layers[1].mlp.up_proj
        up.weight = torch.nn.Parameter(Int8Tensor.from_hp(up.weight.detach(), PerRow()), requires_grad=False)
        assert unsupported_reason(lm) == "some projections int8 and some not"
        up.weight = torch.nn.Parameter(Int8Tensor.from_hp(up.weight.dequantize(), PerGroup(32)), requires_grad=False)
        assert "other than int8 weight-only" in unsupported_reason(lm)


def test_int8_checkpoint_saved_after_stacking_reloads_equal(varied_checkpoint, tmp_path):
    """A fused engine points each int8 weight at rows of a stacked q|k|v (gate|up) matrix; saving afterwards must
    still write every weight in full."""
    pytest.importorskip("torchao")
    from transformers import AutoModelForImageTextToText

    from ghostvis_hf.inference.fused_decoder import _stack_int8

    model, processor = load_model(varied_checkpoint, quantize="int8", device="cpu")
    before = greedy(model)
    for layer in model.model.language_model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv, scales = _stack_int8([attn.q_proj, attn.k_proj, attn.v_proj], torch.float32)
        _stack_int8([mlp.gate_proj, mlp.up_proj], torch.float32)
        assert attn.k_proj.weight.qdata.data_ptr() > qkv.data_ptr() == attn.q_proj.weight.qdata.data_ptr()
        assert scales.shape == (qkv.shape[0],)
    assert greedy(model) == before  # the model's own forward on the stacked data
    expected = {k: v.qdata.clone() if hasattr(v, "qdata") else v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path, trust_remote_code=True)
    state = reloaded.state_dict()
    assert state.keys() == expected.keys()
    for key, value in state.items():
        assert torch.equal(value.qdata if hasattr(value, "qdata") else value, expected[key]), key
    assert greedy(reloaded) == before
