"""VLM sequence packing: a packed sample's logits and loss equal its unpacked ones; no attention crosses samples."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from ghostvis_hf.training.packing import GhostVisPackingCollator, best_fit_decreasing, pack_samples, prepare_packing

pytestmark = pytest.mark.usefixtures("one_thread")


def _example(i, n_images, rng):
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(n_images)]
    user = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": f"question {i} " * (i + 1)}]
    answer = [{"type": "text", "text": f"answer {i} " * (2 * i + 1)}]
    return {"images": images, "messages": [{"role": "user", "content": user},
                                           {"role": "assistant", "content": answer}]}


@pytest.fixture
def examples():
    rng = np.random.default_rng(0)
    return [_example(i, n, rng) for i, n in enumerate([1, 0, 2, 1, 1, 0])]


def _forward(model, batch):
    keep = ("input_ids", "position_ids", "pixel_values", "labels", "cu_seq_lens_q", "cu_seq_lens_k",
            "max_length_q", "max_length_k", "attention_mask")
    return model(**{k: v for k, v in batch.items() if k in keep}, use_cache=False)


def _per_token_ce(logits, labels):
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    return torch.nn.functional.cross_entropy(logits.flatten(0, -2).float(), shifted.flatten(), reduction="none")


def test_best_fit_decreasing_is_a_valid_packing():
    rnd = random.Random(0)
    for _ in range(50):
        cap = rnd.randint(10, 100)
        lengths = [rnd.randint(1, cap) for _ in range(rnd.randint(1, 40))]
        bins = best_fit_decreasing(lengths, cap)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in b) <= cap for b in bins)
        # BFD never needs more than 11/9 OPT + 1 bins, and OPT >= total / capacity
        assert len(bins) <= 11 / 9 * -(-sum(lengths) // cap) + 1
    with pytest.raises(ValueError):
        best_fit_decreasing([5, 11], capacity=10)


def test_position_ids_restart_and_labels_never_cross_samples(tiny, examples):
    _, processor = tiny
    collator = GhostVisPackingCollator(processor, max_length=160)
    samples = collator.tokenize(examples)
    batch = collator(examples)
    pos, labels, ids = batch["position_ids"], batch["labels"], batch["input_ids"]
    assert "attention_mask" not in batch
    flat_pos = pos.flatten()
    starts = torch.nonzero(flat_pos == 0).flatten()
    assert starts.tolist() == batch["cu_seq_lens_q"][:-1].tolist()
    assert batch["cu_seq_lens_q"][-1] == ids.numel()
    assert (labels.flatten()[starts] == -100).all()  # the first token of every segment is never a target
    assert pos.shape[0] < len(examples)  # several samples share a row
    assert batch["max_length_q"] == max(len(s["input_ids"]) for s in samples)
    frames = torch.tensor([processor.image_token_id, processor.vision_start_token_id, processor.vision_end_token_id])
    assert (labels[torch.isin(ids, frames)] == -100).all()
    real = sum(len(s["input_ids"]) for s in samples)
    assert collator.efficiency == pytest.approx(real / ids.numel())


def test_images_stay_in_order_with_their_placeholders(tiny, examples):
    _, processor = tiny
    collator = GhostVisPackingCollator(processor, max_length=160)
    samples = collator.tokenize(examples)
    batch = collator(examples)
    # walk the packed rows: every placeholder run must be followed by the pixels of the sample it came from
    expected = []
    for seg_start, seg_end in zip(batch["cu_seq_lens_q"][:-1].tolist(), batch["cu_seq_lens_q"][1:].tolist()):
        seg = batch["input_ids"].flatten()[seg_start:seg_end]
        match = [s for s in samples if len(s["input_ids"]) == len(seg) and torch.equal(s["input_ids"], seg)]
        if match and "pixel_values" in match[0]:
            expected.append(match[0]["pixel_values"])
    torch.testing.assert_close(batch["pixel_values"], torch.cat(expected), rtol=0, atol=0)
    n_runs = int((batch["input_ids"] == processor.vision_start_token_id).sum())
    assert n_runs == batch["pixel_values"].shape[0] == sum(len(e["images"]) for e in examples)


@pytest.mark.parametrize("padding_free", [False, True])
def test_packed_logits_and_loss_equal_unpacked(tiny, examples, padding_free):
    model, processor = tiny
    collator = GhostVisPackingCollator(processor, max_length=160, assistant_only_loss=True,
                                       padding_free=padding_free)
    samples = collator.tokenize(examples)
    batch = collator(examples)
    with torch.no_grad():
        packed = _forward(model, batch)
        flat_logits = packed.logits.reshape(-1, packed.logits.shape[-1])
        flat_ids = batch["input_ids"].flatten()
        total, count, found = 0.0, 0, 0
        cu = batch["cu_seq_lens_q"].tolist()
        for a, b in zip(cu[:-1], cu[1:]):
            match = [s for s in samples if len(s["input_ids"]) == b - a and torch.equal(s["input_ids"], flat_ids[a:b])]
            if not match:
                continue  # padding
            s = match[0]
            single = {"input_ids": s["input_ids"][None], "labels": s["labels"][None]}
            if "pixel_values" in s:
                single["pixel_values"] = s["pixel_values"]
            ref = _forward(model, single)
            torch.testing.assert_close(flat_logits[a:b], ref.logits[0], rtol=1e-4, atol=1e-5)
            ce = _per_token_ce(ref.logits, s["labels"][None])
            valid = torch.nn.functional.pad(s["labels"], (0, 1), value=-100)[1:] != -100
            torch.testing.assert_close(ce[valid].mean(), ref.loss, rtol=1e-5, atol=1e-6)  # per-sample loss
            total, count, found = total + ce[valid].sum(), count + int(valid.sum()), found + 1
    assert found == len(examples)
    torch.testing.assert_close(packed.loss, total / count, rtol=1e-5, atol=1e-6)  # batch loss = unpacked mean


def test_no_attention_across_samples(tiny, examples):
    model, processor = tiny
    collator = GhostVisPackingCollator(processor, max_length=400, padding_free=True)
    batch = collator(examples[:3])
    cu = batch["cu_seq_lens_q"].tolist()
    with torch.no_grad():
        ref = _forward(model, batch).logits[0]
        changed = dict(batch)
        ids = batch["input_ids"].clone()
        seg = ids[0, cu[0] : cu[1]]
        text = ((seg >= 10) & (seg < 890)).nonzero().flatten() + cu[0]  # ordinary tokens of the first sample
        ids[0, text] += 7
        changed["input_ids"] = ids
        out = _forward(model, changed).logits[0]
    assert not torch.allclose(out[cu[0] : cu[1]], ref[cu[0] : cu[1]])
    torch.testing.assert_close(out[cu[1] :], ref[cu[1] :], rtol=1e-5, atol=1e-6)


def test_packed_training_step_matches_unpacked_gradients(tiny, examples):
    model, processor = tiny
    model.train()
    collator = GhostVisPackingCollator(processor, max_length=160)
    batch = collator(examples)
    _forward(model, batch).loss.backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    # unpacked: the same samples right-padded to the longest, loss over the same target tokens
    samples = collator.tokenize(examples)
    n = max(len(s["input_ids"]) for s in samples)
    pad = processor.tokenizer.pad_token_id
    ids = torch.stack([torch.nn.functional.pad(s["input_ids"], (0, n - len(s["input_ids"])), value=pad)
                       for s in samples])
    labels = torch.stack([torch.nn.functional.pad(s["labels"], (0, n - len(s["labels"])), value=-100) for s in samples])
    mask = torch.stack([torch.arange(n) < len(s["input_ids"]) for s in samples]).long()
    pixels = torch.cat([s["pixel_values"] for s in samples if "pixel_values" in s])
    model(input_ids=ids, labels=labels, attention_mask=mask, pixel_values=pixels).loss.backward()
    for name, g in packed.items():
        torch.testing.assert_close(g, model.get_parameter(name).grad, rtol=1e-4, atol=1e-6, msg=name)


def test_prepare_packing_switches_trl_flag_off(tiny):
    from types import SimpleNamespace

    args = SimpleNamespace(packing=True, padding_free=False, max_length=512, assistant_only_loss=True,
                           pad_to_multiple_of=None)
    collator, callbacks = prepare_packing(tiny[1], args)
    assert args.packing is False and collator.max_length == 512 and collator.assistant_only_loss
    assert len(callbacks) == 1
    assert prepare_packing(tiny[1], SimpleNamespace(packing=False)) == (None, [])


def test_sft_trainer_trains_with_packing_collator(tiny, tmp_path, examples):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    model, processor = tiny
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=6, learning_rate=1e-3,
                         report_to="none", assistant_only_loss=True, max_length=256, use_cpu=True,
                         save_strategy="no", logging_steps=1, dataloader_num_workers=0, packing=True)
    collator, callbacks = prepare_packing(processor, args)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(examples),
                             processing_class=processor, data_collator=collator, callbacks=callbacks)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all(np.isfinite(h["loss"]) for h in logs)
    assert 0 < logs[-1]["packing_efficiency"] <= 1
