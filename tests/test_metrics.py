import builtins
import math

import pytest

from ghostvis_hf.evaluation import anls, caption_scores, exact_match, relaxed_accuracy, vqa_accuracy
from ghostvis_hf.rewards import vqa_soft_accuracy


pytest.importorskip("pycocoevalcap")

REFS = [
    ["a dog runs across the green grass", "a brown dog running on a lawn", "dog running outside"],
    ["two cats sleep on a red sofa", "a pair of cats napping on a couch", "cats asleep on a sofa"],
    ["a man rides a bicycle down the street", "a cyclist on a city road", "person riding a bike"],
    ["a plate of pasta with tomato sauce", "spaghetti on a white plate", "a bowl of noodles"],
]


def test_vqa_accuracy_is_mean_of_soft_accuracy():
    preds = ["two", "yes", "red"]
    refs = [["2"] * 3 + ["3"] * 7, ["yes"] * 10, ["blue"] * 9 + ["red"]]
    expected = sum(vqa_soft_accuracy(p, r) for p, r in zip(preds, refs)) / 3
    assert vqa_accuracy(preds, refs) == pytest.approx(expected)
    assert vqa_accuracy(preds, refs) == pytest.approx((0.9 + 1.0 + 0.3) / 3)


def test_vqa_accuracy_on_single_answer_data_is_exact_match():
    # 49 of 50 right against one reference each: leave-one-out VQA accuracy said 0.0
    preds, refs = ["red"] * 50, [["red"]] * 49 + [["blue"]]
    assert vqa_accuracy(preds, refs) == pytest.approx(0.98)


def test_exact_and_relaxed():
    assert exact_match(["The dog.", "cat", "Yes"], [["dog"], "bird", ["yes", "no"]]) == pytest.approx(2 / 3)
    assert relaxed_accuracy(["104", "50%", "Blue", "7"], [["100"], ["50"], ["blue"], ["9"]]) == pytest.approx(0.75)


@pytest.mark.parametrize("metric", [vqa_accuracy, exact_match, relaxed_accuracy, anls])
def test_bad_input(metric):
    with pytest.raises(ValueError):
        metric(["a", "b"], [["a"]])
    with pytest.raises(ValueError):
        metric([], [])
    assert metric(["", "  "], [["a"], None]) == 0.0


def test_caption_identical_prediction():
    preds = [refs[0] for refs in REFS]
    scores = caption_scores(preds, REFS)
    assert set(scores) == {"CIDEr", "BLEU-4"}
    assert scores["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert scores["CIDEr"] > 1.0


def test_caption_tokenisation_ignores_case_and_punctuation():
    preds = [refs[0].upper() + " ." for refs in REFS]
    assert caption_scores(preds, REFS) == caption_scores([refs[0] for refs in REFS], REFS)


def test_caption_completely_wrong():
    scores = caption_scores(["zebra xylophone quantum"] * len(REFS), REFS)
    assert scores["BLEU-4"] == pytest.approx(0.0, abs=1e-6)
    assert scores["CIDEr"] == pytest.approx(0.0, abs=1e-6)


def test_caption_ordering():
    good = caption_scores(["a dog running on the grass", "two cats on a sofa", "a man riding a bike", "pasta"], REFS)
    bad = caption_scores(["a cat", "a dog", "a plate", "a man"], REFS)
    assert good["CIDEr"] > bad["CIDEr"]
    assert good["BLEU-4"] > bad["BLEU-4"]


def test_caption_bad_input():
    with pytest.raises(ValueError):
        caption_scores(["a"], REFS)
    with pytest.raises(ValueError):
        caption_scores([], [])
    with pytest.raises(ValueError, match="no reference"):
        caption_scores(["a dog", "a cat"], [["a dog"], []])
    scores = caption_scores(["", "x" * 1_000_000], REFS[:2])
    assert all(math.isfinite(v) for v in scores.values())


def test_caption_missing_pycocoevalcap(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("pycocoevalcap"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"pip install ghostvis-hf\[eval\]"):
        caption_scores(["a dog"], [["a dog"]])
