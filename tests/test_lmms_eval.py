"""lmms-eval: a saved checkpoint under the exact calls of its `huggingface` chat model (0.7.3), the `ghostvis` model
entry that loads it with its LM head, and (slow) the real lmms-eval against `ghostvis eval`."""

import json
import os
import subprocess
import sys
import types

import pytest
import torch

from conftest import make_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_saved_checkpoint_pads_on_the_left_for_generation(tiny_checkpoint):
    from transformers import AutoProcessor, AutoTokenizer

    with open(os.path.join(tiny_checkpoint, "tokenizer_config.json")) as f:
        assert json.load(f)["padding_side"] == "left"
    assert AutoProcessor.from_pretrained(tiny_checkpoint, trust_remote_code=True).tokenizer.padding_side == "left"
    assert AutoTokenizer.from_pretrained(tiny_checkpoint, trust_remote_code=True).padding_side == "left"


def _lmms_eval_generate(model, processor, tokenizer, questions, images):
    """lmms-eval 0.7.3 `Huggingface.generate_until` for one batch, call for call (no `padding_side` anywhere)."""
    messages = [[{"role": "user", "content": [{"type": "image", "image": im}, {"type": "text", "text": q}]}]
                for q, im in zip(questions, images)]
    texts = [processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages]
    inputs = processor(text=texts, padding=True, return_tensors="pt", images=images, videos=[], audios=[])
    out = model.generate(**inputs, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         do_sample=False, temperature=None, top_p=None, num_beams=1, max_new_tokens=10,
                         min_new_tokens=10, use_cache=True)
    trimmed = [o[len(i):] for i, o in zip(inputs.input_ids, out)]
    return processor.batch_decode(trimmed, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_lmms_eval_batch_equals_one_by_one_with_the_saved_padding(tiny_checkpoint):
    from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    processor = AutoProcessor.from_pretrained(tiny_checkpoint, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint, trust_remote_code=True).eval()
    questions = ["What color is the circle?", "Describe the image in a few words, please.", "How many?", "Shape?"]
    images = [make_image((255, 0, 0)), make_image((0, 0, 255), size=(64, 48)), make_image((0, 200, 0), size=(20, 20)),
              make_image((9, 9, 9))]
    batched = _lmms_eval_generate(model, processor, tokenizer, questions, images)
    single = [_lmms_eval_generate(model, processor, tokenizer, [q], [im])[0] for q, im in zip(questions, images)]
    assert batched == single


def _fake_lmms_eval(monkeypatch):
    """Just enough of lmms-eval for `lmms_eval_model`: a `Huggingface` whose constructor loads as 0.7.3's does."""
    from transformers import AutoModel

    hf = types.ModuleType("lmms_eval.models.chat.huggingface")

    class Huggingface:
        is_simple = False

        def __init__(self, pretrained, device="cuda", device_map="auto", trust_remote_code=False, **kwargs):
            assert kwargs == {}, kwargs  # lmms-eval refuses unknown model arguments
            model_kwargs = {"torch_dtype": "bfloat16", "device_map": device_map}
            self._model = hf.AutoModel.from_pretrained(pretrained, trust_remote_code=trust_remote_code,
                                                       **model_kwargs).eval()

    hf.Huggingface, hf.AutoModel = Huggingface, AutoModel
    for name in ("lmms_eval", "lmms_eval.models", "lmms_eval.models.chat"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, hf.__name__, hf)
    sys.modules["lmms_eval.models.chat"].huggingface = hf
    return hf


@pytest.mark.parametrize("dtype,expected", [(None, torch.bfloat16), ("float32", torch.float32)])
def test_ghostvis_lmms_model_loads_a_model_that_generates(tiny_checkpoint, monkeypatch, dtype, expected):
    from transformers import AutoModel

    import ghostvis_hf_lmms_eval as lmms_eval_model

    hf = _fake_lmms_eval(monkeypatch)
    base = hf.Huggingface(tiny_checkpoint, device_map="cpu", trust_remote_code=True)._model
    assert type(base).__name__ == "GhostVisModel" and not hasattr(base, "generate")  # what lmms-eval's own class gets
    ghostvis = lmms_eval_model._ghostvis_class()
    kwargs = {} if dtype is None else {"dtype": dtype}
    model = ghostvis(tiny_checkpoint, device_map="cpu", trust_remote_code=True, **kwargs)._model
    assert type(model).__name__ == "GhostVisForConditionalGeneration" and callable(model.generate)
    assert next(model.parameters()).dtype == expected
    assert hf.AutoModel is AutoModel  # swapped back after the constructor


def test_lmms_eval_entry_point_is_declared():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    import ghostvis_hf_lmms_eval as lmms_eval_model

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        entry_points = tomllib.load(f)["project"]["entry-points"]["lmms_eval.models"]
    module, function = entry_points[lmms_eval_model.MODEL_ID].split(":")
    assert module == lmms_eval_model.__name__ and callable(getattr(lmms_eval_model, function))


@pytest.mark.slow
def test_real_lmms_eval_scores_like_ghostvis_eval(tiny_checkpoint, tmp_path):
    """Needs an lmms-eval 0.7.3 environment (scripts/lmms_eval_check.py says how to make one):

        GHOSTVIS_LMMS_PYTHON=.venv-lmms/bin/python [GHOSTVIS_LMMS_MODEL=CHECKPOINT] [GHOSTVIS_LMMS_LIMIT=40] \
            pytest -m slow tests/test_lmms_eval.py
    """
    lmms_python = os.environ.get("GHOSTVIS_LMMS_PYTHON")
    if not lmms_python:
        pytest.skip("set GHOSTVIS_LMMS_PYTHON to the Python of an lmms-eval 0.7.3 environment with ghostvis-hf "
                    "installed (scripts/lmms_eval_check.py says how to make one)")
    # A random checkpoint answers gibberish, but 48 greedy tokens a row must still match token for token.
    model = os.environ.get("GHOSTVIS_LMMS_MODEL", tiny_checkpoint)
    limit = os.environ.get("GHOSTVIS_LMMS_LIMIT", "12")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "lmms_eval_check.py"), "--model", model,
                          "--lmms-python", lmms_python, "--limit", limit, "--work", str(tmp_path),
                          "--json", str(tmp_path / "result.json")], cwd=ROOT, capture_output=True, text=True,
                         timeout=1800)
    assert res.returncode == 0, (res.stdout + res.stderr)[-5000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["agree"] and result["lmms_eval_batch1"]["exact_match"] == result["ghostvis_eval"]["exact_match"]
    assert result["lmms_eval_batch4"]["predictions"] == result["ghostvis_eval"]["predictions"]
