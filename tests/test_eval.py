"""`ghostvis eval` and lmms-eval compatibility (the exact calls its Hugging Face chat model makes)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from conftest import make_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_lmms_eval_call_path_batched_equals_one_by_one(tiny_checkpoint):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_checkpoint, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint, trust_remote_code=True).eval()
    questions = ["What color is the circle?", "Describe the image in a few words, please.", "How many?"]
    images = [make_image((255, 0, 0)), make_image((0, 0, 255), size=(64, 48)), make_image((0, 200, 0), size=(20, 20))]
    texts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}], add_generation_prompt=True)
        for q in questions]
    kw = dict(max_new_tokens=10, do_sample=False, min_new_tokens=10)
    inputs = processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")
    batched = model.generate(**inputs, **kw)[:, inputs["input_ids"].shape[1]:]
    for i in range(3):
        one = processor(text=[texts[i]], images=[images[i]], padding=True, padding_side="left", return_tensors="pt")
        single = model.generate(**one, **kw)[:, one["input_ids"].shape[1]:]
        assert torch.equal(batched[i], single[0]), i
    decoded = processor.batch_decode(batched, skip_special_tokens=True)
    assert len(decoded) == 3 and all(isinstance(d, str) for d in decoded)


def test_ghostvis_eval_shapes_cli_writes_predictions_and_metrics(tiny_checkpoint, tmp_path):
    out = tmp_path / "eval"
    res = subprocess.run([sys.executable, "-m", "ghostvis_hf.cli", "eval", "--model", tiny_checkpoint, "--task",
                          "shapes", "--limit", "24", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 24 and 0.0 <= metrics["exact_match"] <= 1.0
    assert {"color", "shape"} <= set(metrics["by_question_type"])
    assert all(0.0 <= e["chance"] <= 1.0 for e in metrics["by_question_type"].values())
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 24 and {"question", "prediction", "answers"} <= set(json.loads(lines[0]))
    assert "colour+shape held-out accuracy" in res.stdout


def test_eval_on_a_local_vqav2_folder_scores_vqa_accuracy(tiny, tmp_path):
    from ghostvis_hf.evaluation.run import evaluate, load_task

    folder = tmp_path / "vqa"
    (folder / "val2014").mkdir(parents=True)
    Image.new("RGB", (24, 24), (200, 0, 0)).save(folder / "val2014" / "COCO_val2014_000000000001.jpg")
    questions = [{"image_id": 1, "question": "What color?", "question_id": 10}]
    annotations = [{"question_id": 10, "image_id": 1, "answer_type": "other", "multiple_choice_answer": "red",
                    "answers": [{"answer": "red", "answer_confidence": "yes", "answer_id": i} for i in range(10)]}]
    (folder / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps({"questions": questions}))
    (folder / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": annotations}))
    rows = load_task("vqav2", str(folder), "validation", None)
    model, processor = tiny
    result = evaluate(model, processor, "vqav2", rows, out_dir=str(tmp_path / "out"))
    assert result["n"] == 1 and 0.0 <= result["vqa_accuracy"] <= 1.0
    assert (tmp_path / "out" / "metrics.json").exists()


def test_unknown_task_is_refused():
    from ghostvis_hf.evaluation.run import load_task

    import pytest

    with pytest.raises(ValueError, match="allowed"):
        load_task("mmmu", None, None, None)


def test_every_task_is_a_registered_dataset():
    from ghostvis_hf.data import DATASETS
    from ghostvis_hf.evaluation.run import TASKS

    assert set(TASKS) <= set(DATASETS)
    assert all(isinstance(metric, str) for metric in TASKS.values())


def test_vqa_task_on_single_answer_data_scores_like_exact_match(tmp_path):
    # `--task vqav2` on a table with one answer per question scored 0.0 for a model right on every row.
    from ghostvis_hf.evaluation.run import load_task, score

    Image.new("RGB", (24, 24), (200, 0, 0)).save(tmp_path / "a.png")
    rows = [{"image": str(tmp_path / "a.png"), "question": f"Q{i}?", "answers": [a]}
            for i, a in enumerate(["red", "two", "yes", "cat"])]
    (tmp_path / "vqa.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = load_task("vqav2", str(tmp_path / "vqa.jsonl"), None, None)
    result = score("vqav2", ["Red.", "2", "yes", "dog"], data)
    assert result["metric"] == "vqa_accuracy" and result["vqa_accuracy"] == result["score"] == 0.75


def test_ghostvis_eval_quantize_int8_scores_the_quantized_model(tiny_checkpoint, tmp_path, monkeypatch):
    """`--quantize int8` loads through `load_model` (torchao int8 weight-only decoder projections) and writes to
    MODEL/eval_TASK_int8, next to the float run's MODEL/eval_TASK."""
    pytest.importorskip("torchao")
    from ghostvis_hf.evaluation import run
    from ghostvis_hf.quantization import int8_weight_only

    path = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    seen = {}
    evaluate = run.evaluate

    def spy(model, *args, **kwargs):
        seen["q_proj"] = int8_weight_only(model.model.language_model.layers[0].self_attn.q_proj.weight) is not None
        seen["lm_head"] = int8_weight_only(model.lm_head.weight) is not None
        return evaluate(model, *args, **kwargs)

    monkeypatch.setattr(run, "evaluate", spy)
    assert run.main(["--model", str(path), "--task", "shapes", "--limit", "8", "--quantize", "int8",
                     "--device", "cpu"]) == 0
    assert seen == {"q_proj": True, "lm_head": False}
    assert json.loads((path / "eval_shapes_int8" / "metrics.json").read_text())["n"] == 8
    assert not (path / "eval_shapes").exists()


def test_eval_backend_both_scores_the_engine_next_to_generate(tiny_checkpoint, tmp_path):
    """`--backend both`: the serving engine answers the same prompts; in float32 its greedy tokens are `generate`'s
    (the engine's own equality tests), so agreement is 1 and the scores match; results go to eval_TASK_both."""
    from ghostvis_hf.evaluation import run

    path = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    assert run.main(["--model", str(path), "--task", "shapes", "--limit", "12", "--batch_size", "5", "--backend",
                     "both", "--device", "cpu", "--dtype", "float32", "--max_new_tokens", "6"]) == 0
    metrics = json.loads((path / "eval_shapes_float32_both" / "metrics.json").read_text())
    assert metrics["backend"] == "generate" and metrics["engine"]["n"] == metrics["n"] == 12
    assert metrics["engine"]["score"] == metrics["score"]
    assert metrics["agreement"] == {"token_agreement": 1.0, "identical": 1.0, "n": 12}
    assert metrics["engine_decode"] == {"fused": False, "device": "cpu", "dtype": "float32"}


def test_token_agreement_counts_positions_and_the_end_of_each_answer():
    from ghostvis_hf.evaluation.run import token_agreement

    assert token_agreement([[1, 2], [3]], [[1, 2], [3]]) == {"token_agreement": 1.0, "identical": 1.0, "n": 2}
    # a longer answer misses the reference's end; a shorter one misses its last token and its end
    assert token_agreement([[1, 2]], [[1, 2, 5]])["token_agreement"] == 2 / 3
    assert token_agreement([[1, 2]], [[1]])["token_agreement"] == 1 / 3
    with pytest.raises(ValueError):
        token_agreement([[1]], [[1], [2]])


def test_eval_engine_fused_off_cuda_is_refused_with_the_reason(tiny_checkpoint, monkeypatch, tmp_path):
    from ghostvis_hf.evaluation import run

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="fused=True cannot be used"):
        run.main(["--model", tiny_checkpoint, "--task", "shapes", "--limit", "2", "--backend", "engine", "--fused",
                  "--device", "cpu", "--out", str(tmp_path / "eval")])
    assert not (tmp_path / "eval").exists()  # refused before anything was written
