"""TRL drives GhostVis unpatched: one SFTTrainer step and one GRPOTrainer step (beta > 0, remote-code reference)."""

import math

import pytest
import torch
from datasets import Dataset

from conftest import make_image

trl = pytest.importorskip("trl")


def _vqa_rows(n=8):
    colors = {"red": (255, 0, 0), "blue": (0, 0, 255)}
    rows = []
    for i in range(n):
        name = list(colors)[i % 2]
        rows.append({
            "images": [make_image(colors[name])],
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": name}]},
            ],
        })
    return Dataset.from_list(rows)


def test_sft_trainer_step_changes_parameters(tiny, tmp_path):
    from trl import SFTConfig, SFTTrainer

    model, processor = tiny
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                     report_to="none", assistant_only_loss=True, max_length=None, use_cpu=True, save_strategy="no",
                     logging_steps=1, dataloader_num_workers=0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=_vqa_rows(), processing_class=processor)
    trainer.train()
    assert torch.isfinite(torch.tensor(trainer.state.log_history[0]["loss"]))
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    for part in ("vision_tower", "resampler", "multi_modal_projector", "language_model"):
        assert any(part in n for n in changed), part


GRPO_SCRIPT = """
import sys, json, math
sys.modules["ghostvis_hf"] = None  # policy and reference must come from the checkpoint's own code
from datasets import Dataset
from PIL import Image
from trl import GRPOConfig, GRPOTrainer

rows = [{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color?"}]}],
         "image": Image.new("RGB", (32, 32), (255, 0, 0)), "answers": ["red"]} for _ in range(4)]

def reward_len(completions, **kwargs):
    return [float(len(c[0]["content"]) % 3) for c in completions]

args = GRPOConfig(output_dir=sys.argv[2], max_steps=1, per_device_train_batch_size=4, num_generations=2,
                  max_completion_length=6, beta=0.1, report_to="none", use_cpu=True, save_strategy="no",
                  logging_steps=1, trust_remote_code=True, learning_rate=1e-3)
trainer = GRPOTrainer(model=sys.argv[1], reward_funcs=reward_len, args=args, train_dataset=Dataset.from_list(rows))
assert trainer.ref_model is not None
trainer.train()
log = trainer.state.log_history[0]
print(json.dumps({"ref": type(trainer.ref_model).__module__, "policy": type(trainer.model).__module__,
                  "kl": log["kl"], "loss": log["loss"]}))
"""


def test_grpo_trainer_step_with_remote_code_reference(tiny_checkpoint, tmp_path):
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", GRPO_SCRIPT, tiny_checkpoint, str(tmp_path)], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["ref"].startswith("transformers_modules.") and result["policy"].startswith("transformers_modules.")
    assert math.isfinite(result["kl"]) and math.isfinite(result["loss"])


def test_sft_collator_never_labels_image_tokens_even_without_assistant_mask(tiny, tmp_path):
    from trl import SFTConfig

    from ghostvis_hf.training import build_sft_collator

    _, processor = tiny
    args = SFTConfig(output_dir=str(tmp_path), assistant_only_loss=False, bf16=False, max_length=256,
                     report_to="none")
    collator, callbacks = build_sft_collator(processor, args)
    assert callbacks == []
    batch = collator([dict(r) for r in _vqa_rows(4)])
    image = torch.isin(batch["input_ids"], torch.tensor([processor.image_token_id, processor.vision_start_token_id,
                                                         processor.vision_end_token_id]))
    assert image.any() and (batch["labels"][image] == -100).all()
    assert (batch["labels"][~image & (batch["attention_mask"] == 1)] != -100).all()  # the text is still trained on


def test_score_labelled_positions_only_keeps_loss_and_gradients(monkeypatch):
    """The CPU speed-up patch of TRL's fused LM head changes which positions are scored, not the result."""
    import trl.trainer.utils as trl_utils
    from trl.trainer.utils import add_fused_lm_head

    from ghostvis_hf import create
    from ghostvis_hf.training import score_labelled_positions_only
    monkeypatch.setattr(trl_utils, "_use_triton", trl_utils._use_triton)  # restored after the test
    torch.manual_seed(0)
    model, processor = create("tiny")
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    batch = processor(text=["<image> What color? red", "<image> Which shape is it? a small square"],
                      images=[make_image(), make_image()], padding=True, return_tensors="pt")
    labels = batch["input_ids"].clone()
    labels[:, : labels.shape[1] // 2] = -100  # only the second half is supervised

    def run():
        model.zero_grad()
        out = model(**batch, labels=labels, fused_lm_head=True)
        out.loss.backward()
        return out.loss.detach(), model.lm_head.weight.grad.clone()

    full_loss, full_grad = run()
    assert score_labelled_positions_only() is True
    assert trl_utils._use_triton(torch.device("cpu")) is True
    compact_loss, compact_grad = run()
    torch.testing.assert_close(compact_loss, full_loss)
    torch.testing.assert_close(compact_grad, full_grad)
