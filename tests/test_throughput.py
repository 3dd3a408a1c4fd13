"""The recipes' speed log (issue 16): host-side token counts of packed and padded batches, the bench's FLOP formula,
and tokens/s with the right count in the Trainer's logs (CPU: MFU and peak memory are null)."""

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from PIL import Image

from ghostvis_hf.bench.train_scenarios import step_flops
from ghostvis_hf.training.packing import GhostVisPackingCollator, TokenBudget
from ghostvis_hf.training.throughput import (
    STATS_KEY,
    CountingCollator,
    ThroughputCallback,
    ThroughputMixin,
    batch_stats,
    model_flop_coefficients,
    throughput_summary,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _conversation(i, rng, n_images):
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(n_images)]
    user = [{"type": "image", "text": None}] * n_images + [{"type": "text", "text": f"question {i} " * (i % 4 + 1)}]
    return {"images": images, "messages": [{"role": "user", "content": user},
                                           {"role": "assistant", "content": [{"type": "text", "text": f"a{i} " * 3}]}]}


@pytest.fixture
def conversations():
    rng = np.random.default_rng(0)
    return [_conversation(i, rng, i % 3) for i in range(12)]


def test_packed_batch_counts_real_tokens_not_padding(tiny, conversations):
    _, processor = tiny
    collator = GhostVisPackingCollator(processor, max_length=256, token_budget=TokenBudget(3, 256))
    lens = [len(s["input_ids"]) for s in collator.tokenize(conversations[:5])]
    stats = batch_stats(collator(conversations[:5]), processor.tokenizer.pad_token_id)
    assert stats == {"tokens": sum(lens), "tokens_sq": sum(n * n for n in lens), "conversations": 5,
                     "images": sum(i % 3 for i in range(5))}


def test_padded_batch_counts_the_attention_mask(tiny, conversations):
    from ghostvis_hf.training.collator import GhostVisVisionCollator

    _, processor = tiny
    batch = GhostVisVisionCollator(processor, max_length=256)(conversations[:4])
    lens = batch["attention_mask"].sum(-1).tolist()
    assert batch["attention_mask"].numel() > sum(lens)  # there is padding
    wrapped = CountingCollator(GhostVisVisionCollator(processor, max_length=256), processor.tokenizer.pad_token_id)
    assert wrapped(conversations[:4])[STATS_KEY] == {
        "tokens": sum(lens), "tokens_sq": sum(n * n for n in lens), "conversations": 4, "images": 3}
    assert wrapped.max_length == 256  # the wrapped collator's attributes pass through


def test_flops_are_the_benchmarks(tiny):
    model, _ = tiny
    vc = model.config.vision_config
    n_patches = (vc.image_size // vc.patch_size) ** 2
    cb = ThroughputCallback(model_flop_coefficients(model))
    seqs = [100, 37, 250]
    counts = {"tokens": sum(seqs), "tokens_sq": sum(s * s for s in seqs), "conversations": 3, "images": 2}
    assert cb._flops(counts) == step_flops(model, "ghostvis", seqs, 2, n_patches)


def test_flops_count_parameters_that_deepspeed_zero3_partitioned_away(tiny):
    """Under ZeRO-3 a parameter's local tensor is empty and `ds_numel` holds its size (the 7b ZeRO-3 run logged
    0.6 % MFU while every parameter counted 0)."""
    import copy

    model = copy.deepcopy(tiny[0])
    full = model_flop_coefficients(model)
    for p in model.parameters():
        p.ds_numel = p.numel()
        p.data = torch.empty(0, dtype=p.dtype)
    assert model_flop_coefficients(model) == full


def test_rates_use_wall_time_between_logs(monkeypatch, tmp_path):
    import json
    from types import SimpleNamespace

    import ghostvis_hf.training.throughput as throughput

    clock = iter([0.0, 10.0, 12.5, 14.5, 16.0])  # construction, train begin, three logs
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: next(clock))
    cb = ThroughputCallback({"token": 6, "token_sq": 0, "image": 0}, peak_flops=1000.0)
    args = SimpleNamespace(world_size=1, device=torch.device("cpu"), output_dir=str(tmp_path / "run"))
    state = SimpleNamespace(log_history=[{"loss": 1.0, "step": 1}], global_step=1, is_world_process_zero=True)
    cb.on_train_begin(args, state, None)
    cb.add({"tokens": 500, "tokens_sq": 0, "conversations": 5, "images": 0})
    logs = {"loss": 1.0}
    cb.on_log(args, state, None, logs=logs)
    assert logs["tokens_per_second"] == 200.0 and logs["conversations_per_second"] == 2.0
    assert logs["mfu"] == round(6 * 500 / 2.5 / 1000, 4) == state.log_history[-1]["mfu"]
    # the speed so far is on disk after every log: a run that dies later keeps it
    assert json.loads((tmp_path / "run" / "throughput.json").read_text())["tokens_per_second"] == 200.0
    cb.add({"tokens": 100, "tokens_sq": 0, "conversations": 1, "images": 0})
    state.global_step = 2
    cb.on_log(args, state, None, logs={"loss": 0.5})
    cb.on_log(args, state, None, logs={"train_runtime": 3.0})  # the final summary is not a step log
    summary = cb.summary()
    assert summary["tokens_per_second"] == 50.0 and summary["first_interval_excluded"]
    assert json.loads((tmp_path / "run" / "throughput.json").read_text()) == {**summary, "step": 2}
    state.is_world_process_zero = False  # other ranks write nothing
    (tmp_path / "run" / "throughput.json").unlink()
    cb.on_log(args, state, None, logs={"loss": 0.4})
    assert not (tmp_path / "run" / "throughput.json").exists()


def test_trainer_logs_tokens_per_second_with_the_right_count(tiny, conversations, tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from ghostvis_hf.training.sampler import TokenBudgetMixin

    model, processor = tiny

    @dataclass
    class Recording(GhostVisPackingCollator):
        real_tokens: list = field(default_factory=list)

        def __call__(self, examples):
            self.real_tokens.append(sum(len(s["input_ids"]) for s in self.tokenize(examples)))
            return super().__call__(examples)

    class Trainer(ThroughputMixin, TokenBudgetMixin, trl.SFTTrainer):
        pass

    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-3,
                         report_to="none", max_length=128, use_cpu=True, save_strategy="no", logging_steps=1,
                         dataloader_num_workers=0, gradient_checkpointing=False)
    collator = Recording(processor, max_length=128, token_budget=TokenBudget(2, 128))
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(conversations),
                      processing_class=processor, data_collator=collator)
    assert trainer.callback_handler.callbacks[0] is trainer.throughput
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and all(h["tokens_per_second"] > 0 for h in logs)
    assert all(h["mfu"] is None and h["peak_memory_gib"] is None for h in logs)  # CPU
    assert [i["tokens"] for i in trainer.throughput.intervals] == collator.real_tokens
    for h, interval in zip(logs, trainer.throughput.intervals):
        assert h["tokens_per_second"] == pytest.approx(interval["tokens"] / interval["seconds"], rel=1e-3)
    summary = throughput_summary(trainer)
    assert summary["tokens"] == sum(collator.real_tokens[1:]) and summary["logging_intervals"] == 2


def test_model_loss_path_trains_and_matches_trl_loss(tmp_path):
    """`--loss model` takes the loss from the model's forward; on the same batch it equals TRL's fused-head loss."""
    import ghostvis_hf
    from trl import SFTConfig

    from ghostvis_hf.data import load_shapes
    from ghostvis_hf.training import build_sft_collator
    from ghostvis_hf.training.trainer import GhostVisSFTTrainer

    torch.manual_seed(0)
    model, processor = ghostvis_hf.create("tiny")
    rows = load_shapes("train", num_samples=8, seed=0)
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, report_to="none",
                     use_cpu=True, max_length=256, save_strategy="no")
    collator, _ = build_sft_collator(processor, args)  # the recipe's: image placeholders masked in the labels
    trainer = GhostVisSFTTrainer(model=model, args=args, train_dataset=rows, processing_class=processor,
                                 data_collator=collator, model_loss=True)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    batch.pop("ghostvis_batch_stats", None)
    model.train()
    ours = trainer.compute_loss(model, dict(batch))
    trainer.model_loss = False
    trls = trainer.compute_loss(model, dict(batch))
    torch.testing.assert_close(ours, trls, rtol=1e-4, atol=1e-5)
    assert "entropy" in trainer._metrics["train"]  # TRL's path logged its metrics; ours did not add any


def test_evaluation_during_training_is_left_out_of_the_speed_log(tiny, conversations, tmp_path):
    """`--eval_strategy steps`: the held-out loss is logged, and neither the time the evaluations take (here made
    long) nor their batches count in the training rates and the packing efficiency."""
    import time

    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from ghostvis_hf.training.sampler import TokenBudgetMixin

    model, processor = tiny
    pause = 1.0  # well above a tiny training step on a loaded 2-core CI machine

    class Trainer(ThroughputMixin, TokenBudgetMixin, trl.SFTTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            if not model.training:
                time.sleep(pause)  # a slow evaluation
            return super().compute_loss(model, inputs, *args, **kwargs)

    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-3,
                         report_to="none", max_length=128, use_cpu=True, save_strategy="no", logging_steps=1,
                         eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=2,
                         dataloader_num_workers=0, gradient_checkpointing=False)
    collator = GhostVisPackingCollator(processor, max_length=128, token_budget=TokenBudget(2, 128))
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(conversations),
                      eval_dataset=Dataset.from_list(conversations[:2]), processing_class=processor,
                      data_collator=collator)
    start = time.perf_counter()
    trainer.train()
    assert time.perf_counter() - start > 3 * pause  # the evaluations ran
    assert len([h for h in trainer.state.log_history if "eval_loss" in h]) == 3
    seconds = [i["seconds"] for i in trainer.throughput.intervals]
    assert len(seconds) == 3 and max(seconds) < pause, seconds
    assert collator.stats["batches"] == 3  # packing_efficiency counts the training batches only
