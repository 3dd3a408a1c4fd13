"""Bad training rows (issue 14, item 9): `--bad_rows error` refuses any, naming the row and the reason; `skip` drops and
counts each per reason, those the loaders drop included, and the recipe's summary line says the same."""

import io
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ghostvis_hf.data.validate import validate_rows
from ghostvis_hf.training import GhostVisArguments, load_train_and_eval_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_BAD = {"corrupt_image": 1, "missing_image": 1, "no_answer": 1, "unreadable_image": 1}  # sorted, as reported


def _png(pixels) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _images(folder):
    """name -> PNG bytes (None: no file). `cut` keeps its header and loses the second half of its pixel data."""
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    full = _png(noise)
    images = {"good": _png(np.full((8, 8, 3), (200, 30, 30), dtype=np.uint8)), "missing": None,
              "text": b"this is a text file named .png", "cut": full[: len(full) // 2]}
    for name, data in images.items():
        if data is not None:
            (folder / f"{name}.png").write_bytes(data)
    with Image.open(folder / "cut.png") as header_only:  # the header reads; only a full decode fails
        assert header_only.size == (64, 64)
    return images


# Row i asks "Q{i}"; rows 0 and 5 are the good ones, row 4 has no answer.
ROWS = [("good", ["red"]), ("missing", ["red"]), ("text", ["red"]), ("cut", ["red"]), ("good", []), ("good", ["red"])]


def _write(tmp_path, fmt, rows=ROWS):
    """A vqav2-style table: jsonl with image paths, or parquet with the images embedded (the missing one a path)."""
    images = _images(tmp_path)
    if fmt == "jsonl":
        lines = [{"image": str(tmp_path / f"{name}.png"), "question": f"Q{i}", "answers": a}
                 for i, (name, a) in enumerate(rows)]
        (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
        return str(tmp_path / "data.jsonl")
    from datasets import Dataset, Features, List, Value
    from datasets import Image as ImageFeature

    features = Features({"image": ImageFeature(), "question": Value("string"), "answers": List(Value("string"))})
    cells = [{"bytes": images[name], "path": str(tmp_path / f"{name}.png")} for name, _ in rows]
    table = {"image": cells, "question": [f"Q{i}" for i in range(len(rows))], "answers": [a for _, a in rows]}
    (tmp_path / "missing.png").write_bytes(images["good"])  # `to_parquet` sizes the files; deleted once written
    Dataset.from_dict(table, features=features).to_parquet(str(tmp_path / "data.parquet"))
    (tmp_path / "missing.png").unlink()
    return str(tmp_path / "data.parquet")


def _load_and_validate(path, processor, policy):
    train, _ = load_train_and_eval_data(None, GhostVisArguments(dataset_mixture=[f"vqav2:{path}:1"], bad_rows=policy))
    return validate_rows(train, processor, max_length=256, policy=policy)


def _question(row):
    return row["messages"][0]["content"][-1]["text"].split("\n")[0]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_skip_counts_every_reason_and_keeps_only_the_good_rows(tiny, tmp_path, caplog, fmt):
    _, processor = tiny
    with caplog.at_level(logging.WARNING):
        clean, report = _load_and_validate(_write(tmp_path, fmt), processor, "skip")
    assert report["skipped"] == ALL_BAD and report["checked"] == len(ROWS)
    assert sorted(_question(row) for row in clean) == ["Q0", "Q5"]
    assert "cut.png" in report["first"]["corrupt_image"]  # the truncated file is named, with its row
    assert "skipped 4 row(s) of 6" in caplog.text and str(ALL_BAD) in caplog.text, caplog.text


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
@pytest.mark.parametrize("bad,reason", [("missing", "missing_image"), ("text", "unreadable_image"),
                                        ("cut", "corrupt_image"), ("no answer", "no_answer")])
def test_error_refuses_any_bad_row_naming_it(tiny, tmp_path, fmt, bad, reason):
    _, processor = tiny
    rows = [ROWS[0], ("good", []) if bad == "no answer" else (bad, ["red"]), ROWS[0]]
    path = _write(tmp_path, fmt, rows)
    # Loaders name the row of the source table; validation the row of the (shuffled) training set, and the file.
    by_loader = bad == "no answer" or (fmt == "jsonl" and bad != "cut")
    row, name = "1 of vqav2" if by_loader else r"\d", "rejected it" if bad == "no answer" else rf"{bad}\.png"
    with pytest.raises(ValueError, match=rf"Bad training row {row} \({reason}\): .*{name}"):
        _load_and_validate(path, processor, "error")
    clean, report = _load_and_validate(path, processor, "skip")
    assert len(clean) == 2 and report["skipped"] == {reason: 1}


def test_local_layout_loaders_follow_the_policy(tmp_path):
    from ghostvis_hf.data import load_coco_captions
    from ghostvis_hf.data.validate import recording_bad_rows

    (tmp_path / "val2017").mkdir()
    (tmp_path / "val2017" / "1.jpg").write_bytes(_images(tmp_path)["good"])
    annotations = {"images": [{"id": 1, "file_name": "1.jpg"}, {"id": 2, "file_name": "2.jpg"}],
                   "annotations": [{"image_id": 1, "caption": "a"}, {"image_id": 2, "caption": "b"}]}
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "captions_val2017.json").write_text(json.dumps(annotations))
    with pytest.raises(ValueError, match=r"Bad training row 1 of coco_captions \(missing_image\): .*2\.jpg"):
        with recording_bad_rows("error"):
            load_coco_captions(str(tmp_path), split="val")
    with recording_bad_rows("skip") as dropped:
        assert len(load_coco_captions(str(tmp_path), split="val")) == 1
    assert dict(dropped.counts) == {"missing_image": 1}
    assert len(load_coco_captions(str(tmp_path), split="val")) == 1  # evaluation: no policy, skipped and logged


def test_sft_summary_line_agrees_with_the_counts(tmp_path):
    path = _write(tmp_path, "jsonl")
    # 3 rows: the mixture of one source takes its 3 loaded rows once (the tiny YAML asks for thousands, repeated).
    common = ["recipes/sft.py", "--dataset_mixture", f"vqav2:{path}:1", "--num_train_samples", "3", "--max_steps", "1",
              "--per_device_train_batch_size", "2", "--save_strategy", "no", "--eval_after_training", "false",
              "--plot", "false", "--dataloader_num_workers", "0", "--report_to", "none"]
    res = subprocess.run([sys.executable, *common, "--output_dir", str(tmp_path / "skip"), "--bad_rows", "skip"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"training rows: 2 (checked 6, skipped {ALL_BAD})" in res.stdout + res.stderr
    summary = json.loads((tmp_path / "skip" / "sft_summary.json").read_text())
    assert summary["data"]["skipped"] == ALL_BAD and summary["data"]["checked"] == 6
    res = subprocess.run([sys.executable, *common, "--output_dir", str(tmp_path / "error"), "--bad_rows", "error"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode != 0 and "Bad training row 1 of vqav2 (missing_image)" in res.stderr, res.stderr[-3000:]


def test_a_run_whose_rows_are_all_bad_is_refused_before_training_naming_the_reasons(tmp_path):
    bad_only = [row for row in ROWS if row != ("good", ["red"])]  # missing, unreadable, corrupt, no answer
    path = _write(tmp_path, "jsonl", rows=bad_only)
    res = subprocess.run([sys.executable, "recipes/sft.py", "--dataset_mixture", f"vqav2:{path}:1",
                          "--num_train_samples", "4", "--max_steps", "1", "--output_dir", str(tmp_path / "run"),
                          "--save_strategy", "no", "--report_to", "none", "--bad_rows", "skip"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode != 0
    # the one loadable row (a truncated image) is repeated to the mixture's 4: all skipped, each reason named
    skipped = {**ALL_BAD, "corrupt_image": 4}
    assert f"ValueError: no training rows left in vqav2 ({path}): 7 checked, skipped {skipped}" in res.stderr, \
        res.stderr[-3000:]
    assert "StopIteration" not in res.stderr and not (tmp_path / "run" / "sft_summary.json").exists()


def test_held_out_rows_for_the_loss_that_are_all_bad_are_refused(tiny):
    from datasets import Dataset
    from trl import SFTConfig

    from ghostvis_hf.training import held_out_for_loss

    _, processor = tiny
    two_markers = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Q"}]},
                   {"role": "assistant", "content": [{"type": "text", "text": "A"}]}]
    held_out = Dataset.from_list([{"messages": two_markers, "images": []}])  # no images for its two markers
    args = SFTConfig(output_dir="unused", eval_strategy="steps", use_cpu=True, report_to="none", max_length=256)
    with pytest.raises(ValueError, match=r"every one of the 1 held-out rows was skipped as bad "
                                         r"\(\{'image_count_mismatch': 1\}\)"):
        held_out_for_loss(held_out, processor, args, GhostVisArguments(bad_rows="skip"))


def test_row_counts_below_one_are_refused_when_the_arguments_are_made():
    from ghostvis_hf.training import RLArguments

    for bad in (dict(num_train_samples=0), dict(shapes_train_samples=-1), dict(num_eval_samples=-1)):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be >= "):
            GhostVisArguments(**bad)
    GhostVisArguments(num_train_samples=1, num_eval_samples=0)  # 0 held-out rows: a valid choice
    with pytest.raises(ValueError, match="num_train_samples must be >= 1"):
        RLArguments(num_train_samples=0)
    RLArguments(num_eval_samples=0)  # documented: 0 skips the before/after evaluation
