"""Save → load in a fresh process where `ghostvis_hf` cannot be imported, through every Auto class and the Hub cache."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import torch

from conftest import make_image

LOAD_SCRIPT = textwrap.dedent(
    """
    import sys, json
    sys.modules["ghostvis_hf"] = None  # importing it now raises: only the checkpoint's own code may be used
    import torch
    from PIL import Image
    from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText,
                              AutoProcessor)
    src = sys.argv[1]
    config = AutoConfig.from_pretrained(src, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(src, trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=text, images=Image.new("RGB", (40, 30), (255, 0, 0)), return_tensors="pt")
    result = {"config": type(config).__name__, "processor": type(processor).__name__, "text": text}
    for auto in (AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText):
        model = auto.from_pretrained(src, trust_remote_code=True).eval()
        assert "ghostvis_hf" not in type(model).__module__
        with torch.no_grad():
            out = model(**inputs)
        key = "last_hidden_state" if auto is AutoModel else "logits"
        result[auto.__name__] = [type(model).__name__, getattr(out, key)[0, -1, :8].tolist()]
    gen = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    result["generated"] = gen.shape[1] - inputs["input_ids"].shape[1]
    print(json.dumps(result))
    """
)


def _load_in_fresh_process(src, env=None, python=sys.executable):
    env = {**os.environ, **(env or {})}
    out = subprocess.run([python, "-c", LOAD_SCRIPT, src], capture_output=True, text=True, env=env,
                         timeout=300, cwd=os.path.dirname(__file__) + "/..")
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _reference(checkpoint):
    import ghostvis_hf  # noqa: F401  (registers the Auto classes)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(checkpoint).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color?"}]}]
    inputs = processor(text=processor.apply_chat_template(messages, add_generation_prompt=True),
                       images=make_image(), return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits[0, -1, :8]


def test_checkpoint_folder_is_complete(tiny_checkpoint):
    files = set(os.listdir(tiny_checkpoint))
    assert {"config.json", "model.safetensors", "modeling_ghostvis.py", "configuration_ghostvis.py",
            "processing_ghostvis.py", "processor_config.json", "tokenizer.json", "README.md",
            "chat_template.jinja"} <= files
    auto_map = json.load(open(os.path.join(tiny_checkpoint, "config.json")))["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForImageTextToText"}
    card = open(os.path.join(tiny_checkpoint, "README.md")).read()
    assert "library_name: transformers" in card and "pipeline_tag: image-text-to-text" in card


def test_every_auto_class_loads_without_the_package(tiny_checkpoint):
    result = _load_in_fresh_process(tiny_checkpoint)
    assert result["config"] == "GhostVisConfig" and result["processor"] == "GhostVisProcessor"
    assert result["AutoModel"][0] == "GhostVisModel"
    assert result["AutoModelForCausalLM"][0] == result["AutoModelForImageTextToText"][0] == (
        "GhostVisForConditionalGeneration")
    assert "<image>" in result["text"] and result["generated"] == 4
    torch.testing.assert_close(torch.tensor(result["AutoModelForImageTextToText"][1]), _reference(tiny_checkpoint))


def test_load_from_hub_cache_offline(tiny_checkpoint, tmp_path):
    """Lays the folder out as a Hub cache snapshot and loads `org/ghostvis-tiny` with HF_HUB_OFFLINE=1."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--ghostvis-tiny"
    shutil.copytree(tiny_checkpoint, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    result = _load_in_fresh_process("org/ghostvis-tiny", env={
        "HF_HOME": str(tmp_path), "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1",
    })
    torch.testing.assert_close(torch.tensor(result["AutoModelForCausalLM"][1]), _reference(tiny_checkpoint))


def test_push_to_hub_uploads_code_weights_processor(tiny, monkeypatch, tmp_path):
    """push_to_hub goes through huggingface_hub's upload; we intercept it and check what would be sent."""
    import huggingface_hub

    model, processor = tiny
    sent = {}

    def fake_create_commit(self, repo_id, operations, **kwargs):
        for op in operations:
            sent[op.path_in_repo] = op
        return huggingface_hub.CommitInfo(commit_url=f"https://hf.co/{repo_id}/commit/0", commit_message="x",
                                          commit_description="", oid="0" * 40, pr_url=None)

    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", fake_create_commit)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, **kw: huggingface_hub.RepoUrl(f"https://hf.co/{repo_id}"))
    model.push_to_hub("org/ghostvis-tiny", token="x")
    processor.push_to_hub("org/ghostvis-tiny", token="x")
    assert {"config.json", "model.safetensors", "modeling_ghostvis.py", "configuration_ghostvis.py",
            "processing_ghostvis.py", "tokenizer.json", "processor_config.json"} <= set(sent)


def test_save_after_a_class_swap_like_fsdp2(tmp_path):
    """FSDP2's fully_shard swaps the instance's class for `FSDP<Name>` defined in torch; the saved folder must still
    carry GhostVis's own code and auto_map, and load without the package."""
    import ghostvis_hf

    torch.manual_seed(0)
    model, processor = ghostvis_hf.create("tiny")

    class ShardedMarker:  # stands in for torch's FSDPModule mixin
        pass

    swapped = type(f"FSDP{type(model).__name__}", (ShardedMarker, type(model)), {})
    model.__class__ = swapped
    out = tmp_path / "sharded"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    files = set(os.listdir(out))
    assert {"modeling_ghostvis.py", "configuration_ghostvis.py"} <= files
    assert not [f for f in files if f.endswith(".py") and "ghostvis" not in f], files
    auto_map = json.load(open(out / "config.json"))["auto_map"]
    assert auto_map["AutoModelForImageTextToText"] == "modeling_ghostvis.GhostVisForConditionalGeneration"
    result = _load_in_fresh_process(str(out))
    assert result["AutoModelForImageTextToText"][0] == "GhostVisForConditionalGeneration"
