"""ghostvis_hf.data: the procedural shapes set (determinism, balance, pixel-level correctness) and the real-dataset
adapters, each read from a tiny fixture written in the source's real on-disk layout."""

import hashlib
import json
import logging
import math
import re
from collections import Counter

import numpy as np
import pytest
from datasets import Image, List
from PIL import Image as PILImage

from ghostvis_hf.data import (
    FEATURES,
    chance_accuracy,
    get_dataset,
    load_chartqa,
    load_coco_captions,
    load_shapes,
    load_text_chat,
    load_textvqa,
    load_vqav2,
    make_shapes_dataset,
    mix_datasets,
)
from ghostvis_hf.data.shapes import PALETTE


# ---------------------------------------------------------------------------------------------------------------------
# helpers


def _question(row):
    return row["messages"][0]["content"][-1]["text"]


def _target(row):
    return row["messages"][-1]["content"][0]["text"]


def _check_format(ds):
    assert ds.features == FEATURES
    for row in ds:
        n_image_parts = sum(p["type"] == "image" for m in row["messages"] for p in m["content"])
        assert n_image_parts == len(row["images"])
        for message in row["messages"]:
            assert isinstance(message["content"], list)
            assert all(set(p) == {"type", "text"} for p in message["content"])
        for image in row["images"]:
            assert isinstance(image, PILImage.Image) and image.mode == "RGB"


def _image_hashes(ds):
    raw = ds.cast_column("images", List(Image(decode=False)))
    return {hashlib.sha256(r["images"][0]["bytes"] + _question(r).encode()).hexdigest() for r in raw}


def _near(pixels, color, tol=36):
    return (np.abs(pixels.astype(int) - np.array(color)).max(-1) <= tol).sum()


def _count_blobs(pixels):
    """Connected components (8-neighbourhood) of saturated pixels; backgrounds are grey, shapes are not."""
    mask = (pixels.max(-1).astype(int) - pixels.min(-1)) > 70
    seen, blobs = np.zeros_like(mask), 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        blobs += 1
        stack = [start]
        seen[start] = True
        while stack:
            y, x = stack.pop()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
    return blobs


def _save_image(path, mode="RGB", fmt=None, size=(12, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.new(mode, size, {"RGB": (10, 200, 30), "L": 128, "RGBA": (0, 0, 255, 0)}[mode]).save(path, format=fmt)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# shapes


@pytest.fixture(scope="module")
def shapes_train():
    return load_shapes("train", num_samples=4000)


@pytest.fixture(scope="module")
def shapes_test():
    return load_shapes("test", num_samples=2000)


def test_shapes_deterministic_and_prefix_stable():
    a, b = make_shapes_dataset(120, seed=3), make_shapes_dataset(120, seed=3)
    assert _image_hashes(a) == _image_hashes(b)
    assert a["messages"] == b["messages"]
    assert _image_hashes(make_shapes_dataset(120, seed=4)) != _image_hashes(a)
    # Sequential RNG stream: a smaller dataset is a prefix of a larger one with the same seed.
    assert make_shapes_dataset(40, seed=3)["messages"] == a["messages"][:40]


def test_shapes_splits_disjoint(shapes_train, shapes_test):
    assert not _image_hashes(shapes_train) & _image_hashes(shapes_test)
    assert len(_image_hashes(shapes_test)) == len(shapes_test)  # no duplicates inside a split either


def test_shapes_format(shapes_test):
    ds = shapes_test.select(range(200))
    _check_format(ds)
    assert set(ds["source"]) == {"shapes"}
    assert all(r["images"][0].size == (32, 32) for r in ds)
    for row in ds:
        assert row["answers"] == [_target(row)]
        if row["question_type"] != "caption":
            assert _target(row).isalnum() and _target(row) == _target(row).lower()
    big = make_shapes_dataset(4, image_size=48)
    assert big[0]["images"][0].size == (48, 48)


def test_shapes_question_mix(shapes_train):
    counts = Counter(shapes_train["question_type"])
    assert set(counts) == {"color", "shape", "count", "position", "caption"}
    assert counts["color"] > 2 * counts["count"] and counts["shape"] > 2 * counts["position"]
    only = make_shapes_dataset(50, question_types={"color": 1.0, "count": 0.0})
    assert set(only["question_type"]) == {"color"}


def test_shapes_answer_balance(shapes_train):
    expected = {"color": 4, "shape": 3, "count": 3, "position": 2}
    for qtype, n_answers in expected.items():
        answers = Counter(a[0] for a, q in zip(shapes_train["answers"], shapes_train["question_type"]) if q == qtype)
        assert len(answers) == n_answers, (qtype, answers)
        mean = sum(answers.values()) / n_answers
        assert all(abs(c - mean) < 0.2 * mean for c in answers.values()), (qtype, answers)


def test_shapes_chance_is_low(shapes_train, shapes_test):
    chance = chance_accuracy(shapes_test, shapes_train)
    assert chance["color"] <= 0.4 and chance["shape"] <= 0.45
    assert chance["position"] <= 0.6 and chance["count"] <= 0.45 and chance["caption"] <= 0.1
    # Sanity of the definition: a constant answer is 100% "chance".
    rows = [{"messages": r["messages"][:1] + [{"role": "assistant", "content": [{"type": "text", "text": "red"}]}],
             "answers": ["red"], "question_type": "color"} for r in shapes_test.select(range(5))]  # fmt: skip
    assert chance_accuracy(rows) == {"color": 1.0}


def test_shapes_answers_match_pixels(shapes_test):
    checked = Counter()
    for row in shapes_test.select(range(400)):
        pixels = np.asarray(row["images"][0])
        qtype, answer = row["question_type"], row["answers"][0]
        if qtype == "color":  # the answer colour is in the image (as a whole shape, not a stray pixel)
            assert _near(pixels, PALETTE[answer]) >= 30, _question(row)
        elif qtype == "shape":  # the colour asked about is in the image
            color = next(c for c in PALETTE if c in re.findall(r"[a-z]+", _question(row)))
            assert _near(pixels, PALETTE[color]) >= 30, _question(row)
        elif qtype == "count":
            assert _count_blobs(pixels) == int(answer)
        elif qtype == "caption":
            assert _count_blobs(pixels) == answer.count(" a ") + 1
            for color in PALETTE:
                assert (_near(pixels, PALETTE[color]) >= 30) == (f"{color} " in answer), (color, answer)
        checked[qtype] += 1
    assert min(checked.values()) > 10


def test_shapes_multi_turn():
    single, multi = make_shapes_dataset(300, seed=5), make_shapes_dataset(300, seed=5, max_turns=4)
    assert _image_hashes(multi.select([0])) == _image_hashes(single.select([0]))  # the first row is unchanged
    assert multi[0]["messages"][:2] == single[0]["messages"]
    turns = Counter()
    for row in multi:
        messages = row["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2) and len(messages) <= 8
        assert sum(p["type"] == "image" for m in messages for p in m["content"]) == 1  # one image, asked about
        questions = [m["content"][-1]["text"] for m in messages[::2]]
        kinds = [row["question_type"]] + ["color" if "color" in q else "shape" for q in questions[1:]]
        asked = [(k, _subject(q)) for k, q in zip(kinds, questions) if k in ("color", "shape")]
        assert len(set(asked)) == len(asked), questions  # no question asked twice in other words
        assert row["answers"] == [_target({"messages": messages[:2]})]
        for m_user, m_answer in zip(messages[2::2], messages[3::2]):
            turns[_subject(m_user["content"][0]["text"]) in PALETTE] += 1
            assert m_answer["content"][0]["text"] in {*PALETTE, "circle", "square", "triangle"}
    assert turns[True] > 50 and turns[False] > 50  # follow-ups ask about both colours and shapes
    with pytest.raises(ValueError, match="max_turns"):
        make_shapes_dataset(4, max_turns=0)


def _subject(question):
    words = re.findall(r"[a-z]+", question.lower())
    return next((w for w in words if w in PALETTE or w in ("circle", "square", "triangle")), None)


def test_shapes_bad_arguments():
    with pytest.raises(ValueError, match="question_types"):
        make_shapes_dataset(4, question_types=("colour",))
    with pytest.raises(ValueError, match="do not fit"):
        make_shapes_dataset(4, max_shapes=9)
    with pytest.raises(ValueError, match="split"):
        load_shapes("dev")


# ---------------------------------------------------------------------------------------------------------------------
# adapters, each from its real on-disk layout


def test_coco_captions(tmp_path, caplog):
    _save_image(tmp_path / "val2017" / "000000000001.jpg", mode="L", fmt="JPEG")  # grayscale: must come back RGB
    _save_image(tmp_path / "val2017" / "000000000002.jpg", fmt="JPEG")
    annotations = {
        "images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in (1, 2, 3, 4)],  # 3: file missing, 4: no caption
        "annotations": [
            {"id": 10, "image_id": 1, "caption": "A cat on a mat. "},
            {"id": 11, "image_id": 2, "caption": "Two dogs."},
            {"id": 12, "image_id": 1, "caption": "A sleepy cat."},
            {"id": 13, "image_id": 3, "caption": "Lost image."},
        ],
    }
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "captions_val2017.json").write_text(json.dumps(annotations))

    with caplog.at_level(logging.WARNING):
        ds = load_coco_captions(str(tmp_path), split="validation")
    assert "skipped 2" in caplog.text
    _check_format(ds)
    assert len(ds) == 2
    assert ds[0]["answers"] == ["A cat on a mat.", "A sleepy cat."] and _target(ds[0]) == "A cat on a mat."
    assert _question(ds[0]) == "Describe the image briefly."
    assert set(ds["question_type"]) == {"caption"} and set(ds["source"]) == {"coco_captions"}
    assert len(load_coco_captions(str(tmp_path), split="val", limit=1)) == 1
    # Images elsewhere: image_root may point at the folder that holds val2017/.
    assert len(load_coco_captions(str(tmp_path), split="val", image_root=str(tmp_path))) == 2
    with pytest.raises(FileNotFoundError, match="captions_train2017.json"):
        load_coco_captions(str(tmp_path), split="train")


def test_coco_captions_from_jsonl_table(tmp_path, caplog):
    _save_image(tmp_path / "imgs" / "a.png")
    lines = [{"image": "a.png", "sentences": ["one.", "two."]}, {"image": "gone.png", "sentences": ["x."]}]
    (tmp_path / "caps.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    with caplog.at_level(logging.WARNING):
        ds = load_coco_captions(str(tmp_path / "caps.jsonl"), image_root=str(tmp_path / "imgs"))
    assert "skipped 1" in caplog.text
    _check_format(ds)
    assert len(ds) == 1 and ds[0]["answers"] == ["one.", "two."]


def test_hub_style_parquet_with_embedded_images(tmp_path):
    # The Hub copies of these sets store images as embedded bytes in parquet: same path as `load_dataset(hub_id)`.
    from datasets import Dataset, Features, Value

    image = PILImage.new("L", (6, 4), 200)
    features = Features({"image": Image(), "question": Value("string"), "query": Value("string"),
                         "label": List(Value("string")), "multiple_choice_answer": Value("string"),
                         "answers": List({"answer": Value("string"), "answer_id": Value("int32")})})  # fmt: skip
    rows = {"image": [image, image], "question": ["Q1?", "Q2?"], "query": ["Q1?", "Q2?"], "label": [["3"], []],
            "multiple_choice_answer": ["yes", ""], "answers": [[{"answer": "yes", "answer_id": 1}], []]}  # fmt: skip
    Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "hub.parquet"))

    vqa = load_vqav2(str(tmp_path / "hub.parquet"))
    _check_format(vqa)
    assert len(vqa) == 1 and vqa[0]["answers"] == ["yes"] and vqa[0]["images"][0].size == (6, 4)
    chart = load_chartqa(str(tmp_path / "hub.parquet"))
    _check_format(chart)
    assert len(chart) == 1 and chart[0]["answers"] == ["3"]
    text = load_textvqa(str(tmp_path / "hub.parquet"))
    assert len(text) == 1 and _target(text[0]) == "yes"
    with pytest.raises(ValueError, match="no 'messages' column"):
        load_text_chat(str(tmp_path / "hub.parquet"))


def test_vqav2(tmp_path, caplog):
    _save_image(tmp_path / "train2014" / "COCO_train2014_000000000042.jpg", fmt="JPEG")
    questions = [
        {"image_id": 42, "question": "What color is it?", "question_id": 420},
        {"image_id": 42, "question": "Is it round?", "question_id": 421},
        {"image_id": 7, "question": "Missing image?", "question_id": 70},
    ]
    answers = [["green"] * 8 + ["lime", "dark green"], ["no"] * 10, ["yes"] * 10]
    annotations = [
        {"question_id": q["question_id"], "image_id": q["image_id"], "answer_type": "other",
         "multiple_choice_answer": a[0], "answers": [{"answer": x, "answer_confidence": "yes", "answer_id": i + 1}
                                                     for i, x in enumerate(a)]}
        for q, a in zip(questions, answers)
    ]  # fmt: skip
    (tmp_path / "v2_OpenEnded_mscoco_train2014_questions.json").write_text(json.dumps({"questions": questions}))
    (tmp_path / "v2_mscoco_train2014_annotations.json").write_text(json.dumps({"annotations": annotations}))

    with caplog.at_level(logging.WARNING):
        ds = load_vqav2(str(tmp_path), split="train")
    assert "skipped 1" in caplog.text
    _check_format(ds)
    assert len(ds) == 2
    assert len(ds[0]["answers"]) == 10 and ds[0]["answers"][-1] == "dark green" and _target(ds[0]) == "green"
    assert _question(ds[0]) == "What color is it?\nAnswer the question using a single word or phrase."
    assert set(ds["question_type"]) == {"vqa"} and set(ds["source"]) == {"vqav2"}


def test_textvqa(tmp_path, caplog):
    _save_image(tmp_path / "train_images" / "abc.jpg", fmt="JPEG")  # val reuses train_images/ in the real release
    data = [
        {"question_id": 1, "question": "What brand?", "image_id": "abc", "answers": ["nike"] * 6 + ["adidas"] * 4},
        {"question_id": 2, "question": "What year?", "image_id": "nope", "answers": ["1999"] * 10},
    ]
    (tmp_path / "TextVQA_0.5.1_val.json").write_text(json.dumps({"dataset_name": "textvqa", "data": data}))
    with caplog.at_level(logging.WARNING):
        ds = load_textvqa(str(tmp_path), split="validation")
    assert "skipped 1" in caplog.text
    _check_format(ds)
    assert len(ds) == 1 and _target(ds[0]) == "nike" and len(ds[0]["answers"]) == 10
    assert ds[0]["question_type"] == "textvqa"


def test_chartqa(tmp_path, caplog):
    _save_image(tmp_path / "test" / "png" / "c1.png", mode="RGBA")  # RGBA charts must decode to RGB
    _save_image(tmp_path / "test" / "png" / "c2.png")
    (tmp_path / "test" / "test_human.json").write_text(
        json.dumps([{"imgname": "c1.png", "query": "Max value?", "label": 12}, {"imgname": "x.png", "query": "?",
                                                                               "label": "a"}])  # fmt: skip
    )
    (tmp_path / "test" / "test_augmented.json").write_text(
        json.dumps([{"imgname": "c2.png", "query": "Which year?", "label": "2019"}])
    )
    with caplog.at_level(logging.WARNING):
        ds = load_chartqa(str(tmp_path), split="test")
    assert "skipped 1" in caplog.text
    _check_format(ds)
    assert len(ds) == 2 and ds["answers"] == [["12"], ["2019"]]
    assert ds[0]["images"][0].getpixel((0, 0)) == (0, 0, 255)
    assert len(load_chartqa(str(tmp_path), split="test", subsets=("augmented",))) == 1


def test_text_chat(tmp_path, caplog):
    rows = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!"}]},
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
        {"messages": []},
    ]  # fmt: skip
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with caplog.at_level(logging.WARNING):
        ds = load_text_chat(str(tmp_path / "chat.jsonl"))
    assert "skipped 1" in caplog.text
    _check_format(ds)
    assert len(ds) == 2 and ds[0]["images"] == [] and ds[0]["answers"] == ["Hello!"]
    assert ds[0]["messages"][0] == {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}
    assert set(ds["question_type"]) == {"text"}


def test_get_dataset():
    assert len(get_dataset("shapes", split="test", limit=5)) == 5
    with pytest.raises(ValueError, match="chartqa.*coco_captions.*shapes"):
        get_dataset("imagenet")


# ---------------------------------------------------------------------------------------------------------------------
# mixtures


@pytest.fixture
def chat(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(40)]  # fmt: skip
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return load_text_chat(str(tmp_path / "chat.jsonl"))


def test_mix_weights_and_determinism(chat):
    shapes = make_shapes_dataset(300)
    mixed = mix_datasets([(shapes, 0.8), (chat, 0.2)], num_samples=200, seed=1)
    assert Counter(mixed["source"]) == {"shapes": 160, "text_chat": 40}
    assert mixed["messages"] == mix_datasets([(shapes, 0.8), (chat, 0.2)], num_samples=200, seed=1)["messages"]
    assert mixed["messages"] != mix_datasets([(shapes, 0.8), (chat, 0.2)], num_samples=200, seed=2)["messages"]
    sources = mixed["source"]
    assert 0 < sources[:100].count("text_chat") < 40  # shuffled, not concatenated
    row = mixed[sources.index("text_chat")]
    assert row["images"] == [] and mixed[sources.index("shapes")]["images"][0].mode == "RGB"
    # Default size: the largest mixture without repeats (text: 40 rows / 0.2 = 200).
    assert len(mix_datasets([(shapes, 4), (chat, 1)])) == 200
    # Oversampling a small source: weights still hold.
    assert Counter(mix_datasets([(shapes, 1), (chat, 1)], num_samples=201)["source"])["text_chat"] in (100, 101)


@pytest.mark.parametrize("weights", [[0.5, 0.0], [1.0, -1.0], [1.0, math.nan]])
def test_mix_bad_weights(chat, weights):
    shapes = make_shapes_dataset(10)
    with pytest.raises(ValueError, match="weights"):
        mix_datasets([(shapes, weights[0]), (chat, weights[1])])


def test_mix_empty():
    with pytest.raises(ValueError):
        mix_datasets([])


@pytest.mark.parametrize("name", ["vqav2", "textvqa", "chartqa", "coco_captions", "text_chat", "conversations"])
@pytest.mark.parametrize("path", ["./missing.jsonl", "/no/such/folder", "runs/a/data", "data.parquet"])
def test_a_missing_local_path_is_named_not_sent_to_the_hub(name, path, tmp_path, monkeypatch):
    from ghostvis_hf.data import get_dataset

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # were it sent to the Hub: a ConnectionError, not this
    with pytest.raises(FileNotFoundError, match=f"No such data file or folder: '{re.escape(path)}'"):
        get_dataset(name, path_or_hub_id=path, split="train")
