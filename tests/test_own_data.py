"""Your own data (issue 15): TRL-format conversational rows train from every container, are held out and evaluated,
and reported honestly; the README's worked example runs end to end."""

import json
import os
import re
import shlex
import subprocess
import sys

import datasets
import pytest
from PIL import Image, ImageDraw

from ghostvis_hf.data import FEATURES, get_dataset, load_conversations
from ghostvis_hf.data.validate import recording_bad_rows, validate_rows
from ghostvis_hf.training import GhostVisArguments, GhostVisVisionCollator, describe_data, load_train_and_eval_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (230, 200, 30)}


def _draw(path, colour):
    image = Image.new("RGB", (32, 32), "white")
    ImageDraw.Draw(image).ellipse((6, 6, 26, 26), fill=COLOURS[colour])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path)
    return image


def _turns(question, answer, n_images=1):
    parts = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
    return [{"role": "user", "content": parts}, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]


def _colour(i):
    return list(COLOURS)[i % len(COLOURS)]


def _rows(n, image_dir="images", prefix="img"):
    return [{"messages": _turns("What colour is the circle?", _colour(i)), "images": [f"{image_dir}/{prefix}_{i}.png"]}
            for i in range(n)]


def _write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return str(path)


def _data(folder, n=8, draw=True):
    """`folder/train.jsonl` with `n` rows whose images (`images/img_i.png`, relative) are drawn unless `draw=False`."""
    if draw:
        for i in range(n):
            _draw(os.path.join(folder, "images", f"img_{i}.png"), _colour(i))
    return _write_jsonl(os.path.join(folder, "train.jsonl"), _rows(n))


def _pixel(row):
    return row["images"][0].convert("RGB").getpixel((16, 16))


# ---- containers -------------------------------------------------------------------------------------------------


def test_jsonl_relative_paths_resolve_against_the_file_not_the_working_directory(tmp_path, monkeypatch):
    _data(tmp_path / "data", n=4)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    ds = get_dataset("conversations", path_or_hub_id="../data/train.jsonl")  # the registry name routes to it
    assert len(ds) == 4 and ds.features == FEATURES
    assert [_pixel(row) for row in ds] == [COLOURS[_colour(i)] for i in range(4)]
    assert list(ds["answers"]) == [[_colour(i)] for i in range(4)] and set(ds["source"]) == {"conversations"}


def test_parquet_with_embedded_images_and_save_to_disk_folder(tmp_path):
    rows = _rows(4)
    table = datasets.Dataset.from_dict(
        {"messages": [r["messages"] for r in rows], "images": [[_draw(str(tmp_path / "x.png"), _colour(i))]
                                                               for i in range(4)]},
    ).cast_column("images", datasets.List(datasets.Image()))
    table.to_parquet(str(tmp_path / "train.parquet"))
    os.remove(tmp_path / "x.png")  # the images live in the parquet file only
    ds = load_conversations(str(tmp_path / "train.parquet"))
    assert [_pixel(row) for row in ds] == [COLOURS[_colour(i)] for i in range(4)]

    datasets.DatasetDict(train=table.select(range(3)), test=table.select([3])).save_to_disk(str(tmp_path / "saved"))
    before = sorted(os.listdir(tmp_path / "saved" / "train"))
    train, test = (load_conversations(str(tmp_path / "saved"), split=s) for s in ("train", "test"))
    assert (len(train), len(test)) == (3, 1) and _pixel(test[0]) == COLOURS[_colour(3)]
    assert sorted(os.listdir(tmp_path / "saved" / "train")) == before  # no cache files written into the user's folder


def test_hub_id_goes_through_datasets_load_dataset(tmp_path, monkeypatch):
    # No Hub here: the id is routed to `datasets.load_dataset` (which reads its local cache), then converted the same.
    calls = []
    table = datasets.Dataset.from_dict({"messages": [_turns("Colour?", "red")],
                                        "images": [[_draw(str(tmp_path / "a.png"), "red")]]})

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return table.cast_column("images", datasets.List(datasets.Image()))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_conversations("someone/their-vlm-set", split="validation", name="default")
    assert calls == [("someone/their-vlm-set", "default", "validation")] and _pixel(ds[0]) == COLOURS["red"]
    with pytest.raises(FileNotFoundError, match="no_such.jsonl"):
        load_conversations("data/no_such.jsonl")  # a mistyped path is not taken for a Hub id


def test_imagefolder_with_metadata_jsonl_or_csv(tmp_path):
    for kind in ("jsonl", "csv"):
        folder = tmp_path / kind
        metadata = []
        for i in range(3):
            _draw(str(folder / f"{i}.png"), _colour(i))
            turns = [{"role": "user", "content": "Colour?"}, {"role": "assistant", "content": _colour(i)}]
            metadata.append({"file_name": f"{i}.png", "messages": turns})
        if kind == "jsonl":
            _write_jsonl(str(folder / "metadata.jsonl"), metadata)
        else:  # a CSV holds the conversation as JSON text
            datasets.Dataset.from_list([{**m, "messages": json.dumps(m["messages"])} for m in metadata]).to_csv(
                str(folder / "metadata.csv"), index=False)
        ds = load_conversations(str(folder))
        # plain-string first user turn: the image goes in front of it, as TRL's prepare_multimodal_messages does
        assert ds[0]["messages"][0]["content"] == [{"type": "image", "text": None}, {"type": "text", "text": "Colour?"}]
        assert sorted(_pixel(row) for row in ds) == sorted(COLOURS[_colour(i)] for i in range(3)), kind


def test_prompt_completion_variant_and_text_only_rows(tmp_path, tiny):
    _draw(str(tmp_path / "a.png"), "red")
    rows = [
        {"prompt": _turns("What colour?", "red")[:1], "completion": _turns("", "red")[1:], "images": ["a.png"]},
        {"prompt": "Say hi.", "completion": "hi", "images": []},  # standard (string) prompt-completion, text only
    ]
    ds = load_conversations(_write_jsonl(str(tmp_path / "pc.jsonl"), rows))
    assert [len(images) for images in ds["images"]] == [1, 0] and list(ds["answers"]) == [["red"], ["hi"]]
    assert list(ds["question_type"]) == ["conversation", "text"]
    mixed = load_conversations(_write_jsonl(str(tmp_path / "mixed.jsonl"), [
        {"messages": _turns("What colour?", "red"), "images": ["a.png"]},
        {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]}]))
    _, processor = tiny
    clean, report = validate_rows(mixed, processor, max_length=256)
    assert len(clean) == 2 and report["skipped"] == {}  # text-only rows are valid training rows
    batch = GhostVisVisionCollator(processor=processor)([clean[0], clean[1]])  # ... and share a batch with images
    assert batch["pixel_values"].shape[0] == 1 and (batch["labels"] != -100).any(dim=1).all()


def test_llava_style_image_markers_place_the_images_and_leave_the_text(tmp_path):
    """`<image>` in a plain-string user turn (LLaVA's data) is where that image goes; without markers, TRL's rule
    (images in front of the first plain-string user turn); markers that do not match the images are a bad row."""
    for name in ("a", "b"):
        _draw(str(tmp_path / f"{name}.png"), "red")
    rows = [
        {"messages": [{"role": "user", "content": "<image>\nWhat colour?"}, {"role": "assistant", "content": "red"}],
         "images": ["a.png"]},
        {"messages": [{"role": "user", "content": "Left <image> and right <image>\nSame colour?"},
                      {"role": "assistant", "content": "yes"}], "images": ["a.png", "b.png"]},
        {"messages": [{"role": "user", "content": "What colour?"}, {"role": "assistant", "content": "red"}],
         "images": ["a.png"]},
        {"messages": [{"role": "user", "content": "<image> and <image>?"}, {"role": "assistant", "content": "x"}],
         "images": ["a.png"]},  # 2 markers, 1 image
    ]
    with recording_bad_rows("skip") as record:
        ds = load_conversations(_write_jsonl(str(tmp_path / "llava.jsonl"), rows))
    assert record.by_reason == {"image_count_mismatch": 1}
    shapes = [[(p["type"], p["text"]) for p in m[0]["content"]] for m in ds["messages"]]
    assert shapes == [[("image", None), ("text", "What colour?")],
                      [("text", "Left "), ("image", None), ("text", " and right "), ("image", None),
                       ("text", "Same colour?")],
                      [("image", None), ("text", "What colour?")]]
    assert not any("<image>" in (p["text"] or "") for m in ds["messages"] for t in m for p in t["content"])


# ---- bad rows, image_root, the cache ----------------------------------------------------------------------------


def test_bad_rows_are_refused_by_name_or_counted_by_reason(tmp_path):
    _draw(str(tmp_path / "a.png"), "red")
    rows = [{"messages": _turns("Q", "red"), "images": ["a.png"]},
            {"messages": _turns("Q", "red", n_images=2), "images": ["a.png"]},  # 2 markers, 1 image
            {"messages": _turns("Q", "red"), "images": ["gone.png"]},
            {"messages": _turns("Q", "red")[:1], "images": ["a.png"]}]  # no assistant turn to learn or score
    path = _write_jsonl(str(tmp_path / "train.jsonl"), rows)
    with pytest.raises(ValueError, match=r"row 1 of .*train.jsonl \(image_count_mismatch\)"):
        load_train_and_eval_data(path, GhostVisArguments(bad_rows="error"))
    with recording_bad_rows("skip") as record:
        assert len(load_conversations(path)) == 1
    assert record.by_reason == {"image_count_mismatch": 1, "missing_image": 1, "no_answer": 1}


@pytest.mark.parametrize("name, text", [("empty.jsonl", ""), ("blank.jsonl", "\n\n"), ("list.json", "[]"),
                                        ("empty.csv", ""), ("header.csv", "messages,images\n")])
def test_a_data_file_without_rows_is_refused_by_name(tmp_path, name, text):
    (tmp_path / name).write_text(text)  # `datasets` alone stops with StopIteration or "corresponds to no data"
    with pytest.raises(ValueError, match=f"'{tmp_path / name}' has no rows"):
        load_conversations(str(tmp_path / name))


def test_image_root_overrides_the_data_file_folder(tmp_path):
    for i in range(3):
        _draw(str(tmp_path / "pictures" / f"img_{i}.png"), _colour(i))
    path = _write_jsonl(str(tmp_path / "data" / "train.jsonl"), _rows(3, image_dir="."))
    assert len(load_conversations(path)) == 0  # looked for next to the jsonl
    assert len(load_conversations(path, image_root=str(tmp_path / "pictures"))) == 3
    train, _ = load_train_and_eval_data(path, GhostVisArguments(image_root=str(tmp_path / "pictures")))
    assert len(train) == 3


def test_fixing_the_image_folder_is_seen_on_the_next_load(tmp_path):
    path = _data(str(tmp_path), n=4, draw=False)
    assert len(load_conversations(path)) == 0  # every image missing: all rows skipped
    for i in range(4):  # the user fixes the folder; the data file (and its fingerprint) is unchanged
        _draw(str(tmp_path / "images" / f"img_{i}.png"), _colour(i))
    assert len(load_conversations(path)) == 4
    os.remove(tmp_path / "images" / "img_0.png")  # and the other way round: no cached "kept" either
    assert len(load_conversations(path)) == 3


# ---- recipe arguments: answer_style, sizes, held-out rows, mixtures ----------------------------------------------


def _sft_args(argv):
    sys.path.insert(0, os.path.join(ROOT, "recipes"))
    try:
        import sft
    finally:
        sys.path.pop(0)
    return sft.parse_args(argv)


def test_answer_style_is_explicit_and_recorded(tmp_path):
    _draw(str(tmp_path / "a.png"), "red")
    vqa = _write_jsonl(str(tmp_path / "vqa.jsonl"), [{"image": "a.png", "question": "Colour?", "answers": ["red"]}])
    conv = _write_jsonl(str(tmp_path / "conv.jsonl"), [{"messages": _turns("Colour?", "red"), "images": ["a.png"]}])

    def prompt(ds):
        return ds[0]["messages"][0]["content"][-1]["text"]

    short = "Colour?\nAnswer the question using a single word or phrase."
    assert prompt(get_dataset("vqav2", path_or_hub_id=vqa, image_root=str(tmp_path))) == short  # VQA default
    assert prompt(get_dataset("vqav2", path_or_hub_id=vqa, image_root=str(tmp_path), answer_style="none")) == "Colour?"
    assert prompt(load_conversations(conv)) == "Colour?"  # your data: as written
    assert prompt(load_conversations(conv, answer_style="short")) == short
    args = GhostVisArguments(dataset_mixture=[f"vqav2:{vqa}:1", f"conversations:{conv}:1"], image_root=str(tmp_path))
    assert describe_data(None, args)["answer_style"] == {"vqav2": "short", "conversations": "none"}
    train, _ = load_train_and_eval_data(None, GhostVisArguments(**{**vars(args), "answer_style": "short"}))
    assert {row["messages"][0]["content"][-1]["text"] for row in train} == {short}
    with pytest.raises(ValueError, match="answer_style"):
        GhostVisArguments(answer_style="long")


def test_shapes_sizes_do_not_repeat_your_data(tmp_path):
    path = _data(str(tmp_path), n=6)
    script, training, _, gv = _sft_args(["--dataset_name", path])  # sft_tiny.yaml read, as without --config
    assert gv.shapes_train_samples == 52000 and gv.num_train_samples is None
    train, held_out = load_train_and_eval_data(script.dataset_name, gv)
    assert len(train) == 6 and held_out is None  # as given, not 52000 rows of 6 repeated
    _, _, _, gv = _sft_args(["--dataset_name", path, "--num_train_samples", "100"])
    assert len(load_train_and_eval_data(path, gv)[0]) == 6  # a cap, never a repeat
    _, _, _, gv = _sft_args(["--dataset_name", path, "--num_train_samples", "4"])
    assert len(load_train_and_eval_data(path, gv)[0]) == 4


def test_another_preset_does_not_inherit_the_tiny_model_settings():
    _, training, _, gv = _sft_args([])
    assert gv.config_overrides and gv.resampler_type == "none" and training.max_length == 256  # the main job
    _, training, _, gv = _sft_args(["--preset", "small"])
    assert gv.config_overrides is None and gv.resampler_type is None and training.max_length == 1024
    _, training, _, gv = _sft_args(["--preset", "small", "--max_length", "512"])
    assert training.max_length == 512 and training.per_device_train_batch_size == 32  # the rest of the YAML stays


def test_held_out_rows_split_off_seeded_or_loaded(tmp_path):
    path = _data(str(tmp_path), n=8)

    def images(ds):
        return {row["images"][0].filename for row in ds}

    args = GhostVisArguments(eval_split_fraction=0.25, dataset_seed=3)
    train, held = load_train_and_eval_data(path, args)
    assert (len(train), len(held)) == (6, 2) and not images(train) & images(held)
    assert images(load_train_and_eval_data(path, args)[1]) == images(held)  # seeded
    test = _write_jsonl(str(tmp_path / "test.jsonl"), _rows(3))
    train, held = load_train_and_eval_data(path, GhostVisArguments(eval_dataset_name=test, num_eval_samples=2))
    assert (len(train), len(held)) == (8, 2)
    # a mixture: num_eval_samples rows held out of the sources by weight (shapes: generated test rows)
    args = GhostVisArguments(dataset_mixture=[f"conversations:{path}:1", "shapes::1"], num_eval_samples=4,
                             shapes_train_samples=40)
    train, held = load_train_and_eval_data(None, args)
    assert sorted(held["source"]) == ["conversations"] * 2 + ["shapes"] * 2
    convs = train.filter(lambda row: row["source"] == "conversations")
    assert len(images(convs)) == 6 and not images(convs) & images(held.filter(lambda r: r["source"] != "shapes"))


def test_mixture_source_takes_rows_with_and_without_images(tmp_path):
    _draw(str(tmp_path / "a.png"), "red")
    path = _write_jsonl(str(tmp_path / "train.jsonl"), [
        {"messages": _turns("Colour?", "red"), "images": ["a.png"]},
        {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]}])
    train, _ = load_train_and_eval_data(None, GhostVisArguments(dataset_mixture=[f"conversations:{path}:1"]))
    assert sorted(len(images) for images in train["images"]) == [0, 1]
    with recording_bad_rows("skip") as record:  # text_chat keeps only the text-only row
        assert len(get_dataset("text_chat", path_or_hub_id=path)) == 1
    assert record.total == 1


# ---- the README's worked example --------------------------------------------------------------------------------


def _readme_example():
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## Train on your own data", 1)[1].split("\n## ", 1)[0]
    python = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    bash = re.search(r"```bash\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")
    return python, [shlex.split(line) for line in bash.splitlines() if line.strip()]


def test_readme_worked_example_trains_evaluates_and_chats(tmp_path, monkeypatch, capsys):
    from ghostvis_hf import cli

    python, (train, evaluate, chat) = _readme_example()
    monkeypatch.chdir(tmp_path)
    exec(python, {})  # prepare rows + image files, as the README does
    assert train[:3] == ["accelerate", "launch", "recipes/sft.py"]
    fast = ["--max_steps", "2", "--per_device_train_batch_size", "8", "--save_strategy", "no", "--plot", "false",
            "--logging_steps", "1", "--eval_batch_size", "12"]
    res = subprocess.run([sys.executable, os.path.join(ROOT, "recipes/sft.py"), *train[3:], *fast],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "outputs" / "my-vlm"
    summary = json.loads((out / "sft_summary.json").read_text())
    assert summary["steps"] == 2 and summary["data"]["checked"] == 48 and summary["eval"]["n"] == 12
    assert summary["data"]["answer_style"] == {"conversations": "none"}
    assert "held-out exact match" in res.stdout and (out / "eval_held_out" / "metrics.json").exists()
    assert evaluate[0] == "ghostvis" and cli.main(evaluate[1:]) == 0
    assert chat[0] == "ghostvis" and cli.main(chat[1:]) == 0


def test_rl_prompts_from_your_data_follow_bad_rows_before_any_model_loads(tmp_path):
    from ghostvis_hf.training import RLArguments
    from ghostvis_hf.training.data import prompt_dataset

    _draw(str(tmp_path / "a.png"), "red")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows = [{"messages": _turns("What colour?", "red"), "images": ["a.png"]},
            {"messages": _turns("What colour?", "red"), "images": ["broken.png"]},
            {"messages": _turns("What colour?", "red", n_images=2), "images": ["a.png"]}]
    path = _write_jsonl(str(tmp_path / "rl.jsonl"), rows)
    with pytest.raises(ValueError, match=r"row 1 of .*rl.jsonl \(unreadable_image\)"):
        prompt_dataset(RLArguments(dataset_name="conversations", dataset_path=path, bad_rows="error"))
    ds = prompt_dataset(RLArguments(dataset_name="conversations", dataset_path=path))  # skip: counted and dropped
    assert len(ds) == 1 and list(ds["answers"]) == [["red"]]
    assert [m["role"] for m in ds[0]["prompt"]] == ["user"]  # prompt-only, as TRL's GRPO/RLOO take it
    only_broken = _write_jsonl(str(tmp_path / "bad.jsonl"), rows[1:2])
    with pytest.raises(ValueError, match="no usable prompt rows"):
        prompt_dataset(RLArguments(dataset_name="conversations", dataset_path=only_broken))
    with pytest.raises(ValueError, match="bad_rows='maybe'"):
        RLArguments(bad_rows="maybe")
