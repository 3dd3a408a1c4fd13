"""`ghostvis eval --data PATH`: your own TRL-format conversational data scored on its final assistant turn."""

import json
import os
import subprocess
import sys

import pytest

from conftest import make_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLORS = {"red": (255, 0, 0), "green": (0, 200, 0), "blue": (0, 0, 255)}


def _write_conversations(folder, n=6) -> str:
    """A jsonl in TRL's conversational format, relative image paths; every third row is a two-turn conversation."""
    os.makedirs(folder / "images", exist_ok=True)
    names = list(COLORS)
    lines = []
    for i in range(n):
        color = names[i % 3]
        make_image(COLORS[color], size=(32, 32)).save(folder / "images" / f"{i}.png")
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": color}]}]
        if i % 3 == 2:  # a follow-up question: the prompt is both user turns and the first answer
            messages += [{"role": "user", "content": [{"type": "text", "text": "Say it again."}]},
                         {"role": "assistant", "content": [{"type": "text", "text": f"It is {color}."}]}]
        lines.append(json.dumps({"messages": messages, "images": [f"images/{i}.png"]}))
    path = folder / "test.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_eval_data_cli_scores_the_final_assistant_turn(tiny_checkpoint, tmp_path):
    data_path = _write_conversations(tmp_path / "data")
    out = tmp_path / "eval"
    res = subprocess.run([sys.executable, "-m", "ghostvis_hf.cli", "eval", "--model", tiny_checkpoint, "--data",
                          data_path, "--limit", "5", "--batch_size", "2", "--out", str(out)],
                         cwd=str(tmp_path), capture_output=True, text=True, timeout=300)  # cwd: paths are the file's
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((out / "metrics.json").read_text())
    assert result["task"] == "conversations" and result["metric"] == "exact_match" and result["n"] == 5
    assert 0.0 <= result["score"] == result["exact_match"] <= 1.0
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 5
    assert lines[0]["answers"] == ["red"] and lines[2]["answers"] == ["It is blue."]
    assert lines[2]["question"] == "Say it again."  # the prompt stops before the final assistant turn
    assert "task conversations: exact_match" in res.stdout and "(n=5)" in res.stdout


@pytest.mark.parametrize("metric, expected", [("exact_match", 5 / 6), ("vqa_accuracy", 5 / 6),
                                              ("relaxed_accuracy", 5 / 6), ("anls", 5 / 6)])
def test_eval_data_metrics_on_single_answer_rows(tmp_path, monkeypatch, metric, expected):
    # A model right on 5 of 6 rows. With one reference per row, VQA accuracy used to be 0.0 (leave-one-out).
    from ghostvis_hf.evaluation import run

    data_path = _write_conversations(tmp_path / "data")

    def oracle(model, processor, rows, **kwargs):
        answers = [refs[0] for refs in run.references(rows)]
        return ["purple", *answers[1:]]

    monkeypatch.setattr(run, "generate_answers", oracle)
    rows = run.load_task("conversations", data_path, None, None)
    result = run.evaluate(None, None, "conversations", rows, max_new_tokens=8, out_dir=str(tmp_path / "o"),
                          metric=metric, save_predictions=False)
    assert result["metric"] == metric and result["score"] == pytest.approx(expected) and result["n"] == 6
    assert not (tmp_path / "o" / "predictions.jsonl").exists()
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["score"] == pytest.approx(expected)


def test_rows_without_a_final_answer_are_skipped(tmp_path, monkeypatch):
    from ghostvis_hf.evaluation import run

    rows = [{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "hello"}]}], "images": []},
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "unanswered"}]}], "images": []}]
    monkeypatch.setattr(run, "generate_answers", lambda model, processor, rows, **kw: ["Hello."] * len(rows))
    result = run.evaluate(None, None, "conversations", rows, max_new_tokens=4)
    assert result["n"] == 1 and result["exact_match"] == 1.0  # references: the final assistant turn's text


def test_answer_style_reaches_the_adapters(tmp_path):
    from ghostvis_hf.data.common import SHORT_ANSWER_PROMPT
    from ghostvis_hf.evaluation.run import load_task

    make_image((200, 0, 0), size=(24, 24)).save(tmp_path / "a.png")
    table = tmp_path / "vqa.jsonl"
    table.write_text(json.dumps({"image": str(tmp_path / "a.png"), "question": "What color?",
                                 "answers": ["red"]}) + "\n")

    def question(rows):
        return rows[0]["messages"][0]["content"][-1]["text"]

    assert question(load_task("vqav2", str(table), None, None)).endswith(SHORT_ANSWER_PROMPT)  # the adapter default
    assert question(load_task("vqav2", str(table), None, None, answer_style="none")) == "What color?"
    data_path = _write_conversations(tmp_path / "conv", n=1)
    assert question(load_task("conversations", data_path, None, None)) == "What colour is it?"  # default none
    assert question(load_task("conversations", data_path, None, None, answer_style="short")).endswith(
        SHORT_ANSWER_PROMPT)
    with pytest.raises(ValueError, match="does not apply"):
        load_task("shapes", None, None, 4, answer_style="short")


def test_eval_needs_a_task_or_data(tiny_checkpoint, capsys):
    from ghostvis_hf.evaluation.run import main

    with pytest.raises(SystemExit):
        main(["--model", tiny_checkpoint])
    assert "--data" in capsys.readouterr().err
