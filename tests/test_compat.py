"""Version tolerance: the code saved in a checkpoint runs on every transformers release in the supported range.

`GHOSTVIS_OTHER_PYTHON` names a Python whose environment has another transformers release (`.ci/run`'s low-end pass
sets it to the newest-versions venv); the cross-version tests save under one release and load + generate under the
other, in both directions. Without it they are skipped, and the rest of this file still runs.
"""

import logging
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from conftest import make_image, user_turn
from test_auto_remote import _load_in_fresh_process

OTHER_PYTHON = os.environ.get("GHOSTVIS_OTHER_PYTHON")
needs_other = pytest.mark.skipif(
    not OTHER_PYTHON, reason="GHOSTVIS_OTHER_PYTHON (a Python with another transformers release) is not set"
)

SAVE_SCRIPT = textwrap.dedent(
    """
    import sys, torch, transformers, ghostvis_hf
    from ghostvis_hf.hub import save_checkpoint
    torch.manual_seed(0)
    model, processor = ghostvis_hf.create("tiny")
    save_checkpoint(model, processor, sys.argv[1])
    print(transformers.__version__)
    """
)


def _run(python, *args):
    out = subprocess.run([python, *args], capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(__file__) + "/..")
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def _version(python):
    return _run(python, "-c", "import transformers; print(transformers.__version__)")


@needs_other
@pytest.mark.parametrize("direction", ["save_here_load_there", "save_there_load_here"])
def test_checkpoint_crosses_transformers_releases(tmp_path, direction):
    here, there = sys.executable, OTHER_PYTHON
    saver, loader = (here, there) if direction == "save_here_load_there" else (there, here)
    assert _version(here) != _version(there), "GHOSTVIS_OTHER_PYTHON has the same transformers release"
    folder = str(tmp_path / "ckpt")
    saved_with = _run(saver, "-c", SAVE_SCRIPT, folder)
    by_loader = _load_in_fresh_process(folder, python=loader)  # remote code only, generates 4 tokens
    by_saver = _load_in_fresh_process(folder, python=saver)
    assert by_loader["generated"] == by_saver["generated"] == 4, saved_with
    for key in ("AutoModel", "AutoModelForImageTextToText"):
        assert by_loader[key][0] == by_saver[key][0]
        torch.testing.assert_close(torch.tensor(by_loader[key][1]), torch.tensor(by_saver[key][1]))


def test_forward_and_generate_use_the_current_cache_name(tiny, caplog):
    """No deprecated cache name anywhere on our path: what is only a warning today is an error when the library
    drops its compatibility shim (transformers 5.24 deprecates `past_key_values` for removal in 5.40)."""
    from ghostvis_hf.modeling_ghostvis import CACHE_KWARG

    model, processor = tiny
    text = processor.apply_chat_template([user_turn("What color?")], add_generation_prompt=True)
    inputs = processor(text=text, images=make_image(), return_tensors="pt")
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "deprecated" in m and ("past_key_values" in m or "cache_params" in m)]
    assert out[CACHE_KWARG] is not None and out[CACHE_KWARG].get_seq_length() == inputs["input_ids"].shape[1]


def test_upgrade_replaces_stale_code_files(tiny_checkpoint, tmp_path):
    import shutil

    from ghostvis_hf.hub import CODE_FILES, main_upgrade, upgrade_code_files

    folder = tmp_path / "old"
    shutil.copytree(tiny_checkpoint, folder)
    stale = folder / "modeling_ghostvis.py"
    # Stands in for code saved by an older GhostVis that the installed transformers cannot run.
    stale.write_text(stale.read_text() + "\nraise ImportError('stale GhostVis code')\n")
    weights = (folder / "model.safetensors").read_bytes()
    assert main_upgrade([str(folder)]) == 0
    package = os.path.dirname(__import__("ghostvis_hf").__file__)
    for name in CODE_FILES:
        assert (folder / name).read_bytes() == open(os.path.join(package, name), "rb").read()
    assert (folder / "model.safetensors").read_bytes() == weights
    assert upgrade_code_files(str(folder)) == []  # idempotent
    assert _load_in_fresh_process(str(folder))["generated"] == 4
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        upgrade_code_files(str(tmp_path))
