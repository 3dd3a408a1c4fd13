"""Token-budget batches (issue 16): each conversation once per epoch, rows <= max_length, disjoint equal shards,
exact lengths, resume where it stopped (sampler and Trainer), packed loss per token = per-conversation loss."""

import random
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from accelerate.data_loader import SkipBatchSampler
from PIL import Image

from ghostvis_hf.training.packing import GhostVisPackingCollator, TokenBudget, next_fit
from ghostvis_hf.training.sampler import TokenBudgetBatchSampler, TokenBudgetMixin, conversation_lengths

pytestmark = pytest.mark.usefixtures("one_thread")


def _lengths(n, seed=0, lo=5, hi=300):
    rnd = random.Random(seed)
    return [rnd.randint(lo, hi) for _ in range(n)]


def _conversation(i, rng, n_images=1, turns=1):
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(n_images)]
    messages = []
    for t in range(turns):
        user = [{"type": "image", "text": None}] * (n_images if t == 0 else 0)
        messages.append({"role": "user", "content": user + [{"type": "text", "text": f"question {i} " * (i % 5 + 1)}]})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": f"answer {i} " * (i % 7 + 1)}]})
    return {"images": images, "messages": messages}


@pytest.fixture
def conversations():
    rng = np.random.default_rng(0)
    return [_conversation(i, rng, n_images=i % 3, turns=1 + i % 2) for i in range(24)]


@pytest.mark.parametrize("rows,window,replicas", [(1, 7, 1), (3, 50, 1), (4, 1000, 2), (2, 64, 3)])
def test_every_conversation_once_per_epoch_and_rows_fit(rows, window, replicas):
    lengths, max_length = _lengths(500), 512
    samplers = [TokenBudgetBatchSampler(lengths, rows, max_length, window=window, seed=3, num_replicas=replicas,
                                        rank=r, num_epochs=3) for r in range(replicas)]
    for epoch in range(3):
        seen = []
        for s in samplers:
            s.set_epoch(epoch)
            steps = list(s)
            assert len(steps) == len(s)  # every epoch fills exactly the length the Trainer was told
            for step in steps:
                assert step  # no empty step
                assert len(next_fit([lengths[i] for i in step], max_length)) <= rows  # the collator's cut fits
                seen += step
        assert sorted(seen) == list(range(len(lengths)))
        for step in samplers[0].plan(epoch):
            assert 1 <= len(step) <= rows and all(sum(lengths[i] for i in b) <= max_length for b in step)
    order = [list(s) for s in samplers]
    samplers[0].set_epoch(0)
    assert list(samplers[0]) != order[0] or rows * replicas >= 500  # epochs differ


def test_shards_are_disjoint_with_equal_step_counts():
    lengths = _lengths(333, seed=1)
    for replicas in (2, 3, 4):
        shards = [list(TokenBudgetBatchSampler(lengths, 2, 400, window=100, num_replicas=replicas, rank=r))
                  for r in range(replicas)]
        assert len({len(s) for s in shards}) == 1
        flat = [[i for step in s for i in step] for s in shards]
        assert sorted(i for f in flat for i in f) == list(range(len(lengths)))  # disjoint and complete


def test_steps_are_nearly_full():
    lengths = _lengths(2000, seed=2, lo=20, hi=600)
    sampler = TokenBudgetBatchSampler(lengths, 4, 2048, window=1024)
    assert sum(lengths) / (len(sampler) * 4 * 2048) > 0.95


def test_plan_is_a_function_of_seed_and_epoch_and_resume_skips_done_steps():
    lengths = _lengths(400, seed=4)
    a = TokenBudgetBatchSampler(lengths, 3, 512, seed=7, num_epochs=2)
    b = TokenBudgetBatchSampler(lengths, 3, 512, seed=7, num_epochs=2)  # a restarted process
    a.set_epoch(1)
    full = list(a)
    b.set_epoch(1)
    assert list(SkipBatchSampler(b, skip_batches=5)) == full[5:]  # what the Trainer does on resume
    c = TokenBudgetBatchSampler(lengths, 3, 512, seed=8, num_epochs=2)
    c.set_epoch(1)
    assert list(c) != full


def test_lengths_match_the_collator(tiny, conversations):
    from datasets import Dataset

    _, processor = tiny
    collator = GhostVisPackingCollator(processor, max_length=4096)
    expected = [len(s["input_ids"]) for s in collator.tokenize(conversations)]
    assert conversation_lengths(Dataset.from_list(conversations), processor, batch_size=5) == expected
    lengths, images = conversation_lengths(Dataset.from_list(conversations), processor, return_images=True)
    assert lengths == expected and images == [len(c["images"]) for c in conversations]


@pytest.mark.parametrize("replicas", [1, 3])
def test_images_per_step_are_the_vision_batch_sizes_of_every_step_and_rank(replicas):
    lengths, rnd = _lengths(300, seed=1), random.Random(2)
    images = [rnd.choice([0, 1, 1, 2, 3]) for _ in lengths]
    samplers = [TokenBudgetBatchSampler(lengths, 3, 512, window=64, seed=0, num_replicas=replicas, rank=r,
                                        num_epochs=2) for r in range(replicas)]
    seen = set()
    for epoch in range(2):
        for s in samplers:
            s.set_epoch(epoch)
            seen |= {sum(images[i] for i in step) for step in s}
    assert samplers[0].images_per_step(images) == seen and len(seen) > 3


def test_over_long_conversations_are_refused_naming_the_row_unless_truncated(tiny, conversations):
    from datasets import Dataset

    _, processor = tiny
    dataset = Dataset.from_list(conversations)
    lengths = conversation_lengths(dataset, processor)
    limit = sorted(lengths)[-3]  # two rows are longer
    first = next(i for i, n in enumerate(lengths) if n > limit)
    text = processor.apply_chat_template(conversations[first]["messages"])[:80]
    with pytest.raises(ValueError) as refused:
        conversation_lengths(dataset, processor, max_length=limit)
    assert f"conversation {first} of the training set ({text!r}...) has {lengths[first]} tokens" in str(refused.value)
    assert "(2 such rows)" in str(refused.value)
    assert conversation_lengths(dataset, processor, max_length=limit, truncation=True) == [
        min(n, limit) for n in lengths]
    with pytest.raises(ValueError, match="conversation 1 has 9 tokens"):
        TokenBudgetBatchSampler([3, 9], rows=1, max_length=8)


def _budget_batch(processor, conversations, rows, max_length, seed=0):
    from datasets import Dataset

    lengths = conversation_lengths(Dataset.from_list(conversations), processor, max_length)
    sampler = TokenBudgetBatchSampler(lengths, rows, max_length, seed=seed)
    collator = GhostVisPackingCollator(processor, max_length=max_length, assistant_only_loss=True,
                                       token_budget=TokenBudget(rows, max_length))
    step = next(iter(sampler))
    return collator, [conversations[i] for i in step], collator([conversations[i] for i in step])


def test_collator_fills_exactly_rows_by_max_length(tiny, conversations):
    _, processor = tiny
    collator, examples, batch = _budget_batch(processor, conversations, rows=3, max_length=160)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (3, 160)
    assert batch["cu_seq_lens_q"][-1] == 3 * 160
    assert torch.equal(torch.nonzero(batch["position_ids"].flatten() == 0).flatten(), batch["cu_seq_lens_q"][:-1])
    assert collator.stats["real_tokens"] == sum(len(s["input_ids"]) for s in collator.tokenize(examples))
    with pytest.raises(ValueError, match="needs max_length=64"):
        GhostVisPackingCollator(processor, max_length=160, token_budget=TokenBudget(2, 64))


def test_max_sequences_per_step_bounds_every_collated_step(tiny, conversations):
    """`--cuda_graphs` pads `cu_seq_lens` to the sampler's bound: no collated step of any planned epoch exceeds it,
    and it is tight (conversations + one padding sequence per row)."""
    from datasets import Dataset

    _, processor = tiny
    lengths = conversation_lengths(Dataset.from_list(conversations), processor, 160)
    sampler = TokenBudgetBatchSampler(lengths, 3, 160, window=16, seed=0, num_epochs=2)
    collator = GhostVisPackingCollator(processor, max_length=160, assistant_only_loss=True,
                                       token_budget=TokenBudget(3, 160))
    bound, seen = sampler.max_sequences_per_step(), []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        for step in sampler:
            seen.append(collator([conversations[i] for i in step])["cu_seq_lens_q"].numel() - 1)
            assert seen[-1] <= bound
    most = max(sum(len(b) for b in step) for e in range(2) for step in sampler.plan(e))  # conversations
    assert bound == most + 3 and max(seen) >= most + 1


def _per_token_ce(logits, labels):
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    return torch.nn.functional.cross_entropy(logits.flatten(0, -2).float(), shifted.flatten(), reduction="none")


def test_packed_forward_equals_per_conversation_forward(tiny, conversations):
    model, processor = tiny
    # rows > needed: the batch ends with padding rows, which must change nothing
    collator, examples, batch = _budget_batch(processor, conversations, rows=4, max_length=400)
    samples = collator.tokenize(examples)
    keep = ("input_ids", "position_ids", "pixel_values", "labels", "cu_seq_lens_q", "cu_seq_lens_k",
            "max_length_q", "max_length_k")
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k in keep}, use_cache=False)
        flat_logits, flat_ids = packed.logits.flatten(0, 1), batch["input_ids"].flatten()
        cu = batch["cu_seq_lens_q"].tolist()
        total, count, found = 0.0, 0, 0
        for a, b in zip(cu[:-1], cu[1:]):
            match = [s for s in samples if len(s["input_ids"]) == b - a and torch.equal(s["input_ids"], flat_ids[a:b])]
            if not match:
                assert (flat_ids[a:b] == processor.tokenizer.pad_token_id).all()
                continue
            s = match[0]
            single = {"input_ids": s["input_ids"][None], "labels": s["labels"][None]}
            if "pixel_values" in s:
                single["pixel_values"] = s["pixel_values"]
            ref = model(**single, use_cache=False)
            ce_ref = _per_token_ce(ref.logits, s["labels"][None])
            labels = batch["labels"].flatten()[a:b]
            ce_packed = _per_token_ce(flat_logits[a:b][None], labels[None])
            valid = torch.nn.functional.pad(s["labels"], (0, 1), value=-100)[1:] != -100
            torch.testing.assert_close(ce_packed[valid], ce_ref[valid], rtol=1e-4, atol=1e-5)  # loss per token
            total, count, found = total + ce_ref[valid].sum(), count + int(valid.sum()), found + 1
    assert found == len(examples) and found > 2
    torch.testing.assert_close(packed.loss, total / count, rtol=1e-5, atol=1e-6)


def _trainer(model, processor, dataset, tmp_path, **kwargs):
    trl = pytest.importorskip("trl")

    @dataclass
    class Recording(GhostVisPackingCollator):
        seen: list = field(default_factory=list)

        def __call__(self, examples):
            self.seen.append([e["messages"][0]["content"][-1]["text"] for e in examples])
            return super().__call__(examples)

    class Trainer(TokenBudgetMixin, trl.SFTTrainer):
        pass

    args = trl.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, learning_rate=1e-3,
                         report_to="none", assistant_only_loss=True, max_length=128, use_cpu=True,
                         logging_steps=1, dataloader_num_workers=0, gradient_checkpointing=False, seed=5,
                         **kwargs)
    collator = Recording(processor, max_length=128, assistant_only_loss=True, token_budget=TokenBudget(2, 128))
    return Trainer(model=model, args=args, train_dataset=dataset, processing_class=processor, data_collator=collator)


def test_trainer_resume_in_a_later_epoch_continues_where_it_stopped(tmp_path, conversations):
    import ghostvis_hf
    from datasets import Dataset

    dataset = Dataset.from_list(conversations)

    def run(resume=None):
        torch.manual_seed(0)
        model, processor = ghostvis_hf.create("tiny")
        trainer = _trainer(model, processor, dataset, tmp_path, num_train_epochs=2, save_strategy="steps",
                           save_steps=1)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run()
    per_epoch = len(full.get_train_dataloader())
    seen = full.data_collator.seen
    assert len(seen) == 2 * per_epoch
    for epoch in range(2):  # every conversation once per epoch, and the epochs differ
        texts = [t for step in seen[epoch * per_epoch : (epoch + 1) * per_epoch] for t in step]
        assert sorted(texts) == sorted(c["messages"][0]["content"][-1]["text"] for c in conversations)
    assert seen[:per_epoch] != seen[per_epoch:]
    stop = per_epoch + 1  # one step into the second epoch
    resumed = run(resume=str(tmp_path / f"checkpoint-{stop}"))
    assert resumed.data_collator.seen == seen[stop:]


@pytest.mark.parametrize("grad_accum", [1, 3])
def test_epoch_follows_the_trainers_step_count_on_resume(grad_accum):
    # Distributed resume: the Trainer's own set_epoch cannot reach the sampler under SkipBatchSampler(BatchSamplerShard)
    from types import SimpleNamespace

    from ghostvis_hf.training.sampler import _EpochSync

    sampler = TokenBudgetBatchSampler(_lengths(100), 2, 512)
    per_epoch = -(-len(sampler) // grad_accum)  # optimizer steps per epoch, as the Trainer counts them
    sync = _EpochSync(sampler)
    for global_step, epoch in ((0, 0), (per_epoch - 1, 0), (per_epoch, 1), (2 * per_epoch + 1, 2)):
        sync.on_epoch_begin(SimpleNamespace(gradient_accumulation_steps=grad_accum),
                            SimpleNamespace(global_step=global_step), None)
        assert sampler.epoch == epoch


_DDP_SCRIPT = '''
import json, os, sys
from dataclasses import dataclass, field
import numpy as np, torch
import trl
from datasets import Dataset
from PIL import Image
import ghostvis_hf
from ghostvis_hf.training.packing import GhostVisPackingCollator, TokenBudget
from ghostvis_hf.training.sampler import TokenBudgetMixin

out, resume = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
rng = np.random.default_rng(0)
rows = []
for i in range(30):
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(i % 2)]
    user = [{"type": "image", "text": None}] * (i % 2) + [{"type": "text", "text": f"question {i} " * (i % 5 + 1)}]
    rows.append({"images": images, "messages": [
        {"role": "user", "content": user}, {"role": "assistant", "content": [{"type": "text", "text": f"a{i} " * 3}]}]})

@dataclass
class Recording(GhostVisPackingCollator):
    seen: list = field(default_factory=list)
    def __call__(self, examples):
        self.seen.append([e["messages"][0]["content"][-1]["text"] for e in examples])
        return super().__call__(examples)

class Trainer(TokenBudgetMixin, trl.SFTTrainer):
    pass

torch.manual_seed(0)
model, processor = ghostvis_hf.create("tiny")
args = trl.SFTConfig(output_dir=os.path.join(out, "run"), per_device_train_batch_size=2, learning_rate=1e-3,
                     report_to="none", max_length=128, use_cpu=True, logging_steps=1, dataloader_num_workers=0,
                     gradient_checkpointing=False, seed=5, num_train_epochs=2, save_strategy="steps", save_steps=1,
                     ddp_backend="gloo")
collator = Recording(processor, max_length=128, token_budget=TokenBudget(2, 128))
trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=processor,
                  data_collator=collator)
trainer.train(resume_from_checkpoint=resume)
with open(os.path.join(out, f"seen_{bool(resume)}_{trainer.args.process_index}.json"), "w") as f:
    json.dump({"seen": collator.seen, "per_epoch": len(trainer.get_train_dataloader())}, f)
'''


@pytest.mark.slow
def test_ddp_ranks_get_disjoint_bins_and_resume_in_a_later_epoch(tmp_path):
    # two CPU processes (gloo) through the Trainer + accelerate, as `accelerate launch --num_processes 2` runs them
    import json
    import os
    import subprocess
    import sys

    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def launch(*extra):
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                        str(tmp_path), *extra], check=True, env=env, capture_output=True, timeout=600)
        return [json.loads((tmp_path / f"seen_{bool(extra)}_{r}.json").read_text()) for r in (0, 1)]

    full = launch()
    per_epoch = full[0]["per_epoch"]
    assert full[1]["per_epoch"] == per_epoch and all(len(f["seen"]) == 2 * per_epoch for f in full)
    for epoch in range(2):
        shards = [[t for step in f["seen"][epoch * per_epoch : (epoch + 1) * per_epoch] for t in step] for f in full]
        assert not set(shards[0]) & set(shards[1]) and len(shards[0]) + len(shards[1]) == 30
    stop = per_epoch + 1
    resumed = launch(str(tmp_path / "run" / f"checkpoint-{stop}"))
    for r in (0, 1):
        assert resumed[r]["seen"] == full[r]["seen"][stop:]


def test_more_rows_than_planned_still_train_and_say_so(caplog):
    from ghostvis_hf.training.packing import pack_samples

    samples = [{"input_ids": torch.arange(1, n + 1), "labels": torch.arange(1, n + 1)} for n in (6, 6, 6)]
    batch = pack_samples(samples, max_length=8, pad_token_id=0, rows=2, in_order=True)
    assert batch["input_ids"].shape == (3, 8) and "need 3 rows of 8, more than 2" in caplog.text
    assert pack_samples(samples[:1], max_length=8, pad_token_id=0, rows=2, in_order=True)["input_ids"].shape == (2, 8)


def test_build_sft_collator_reads_the_token_budget_arguments(tiny):
    from types import SimpleNamespace

    from ghostvis_hf.training.collator import build_sft_collator

    def training_args():
        return SimpleNamespace(packing=True, padding_free=False, max_length=512, assistant_only_loss=True,
                               pad_to_multiple_of=None, per_device_train_batch_size=4)

    collator, _ = build_sft_collator(tiny[1], training_args(), SimpleNamespace(token_budget=True, packing_window=64,
                                                                                truncate_long_rows=True))
    assert collator.token_budget == TokenBudget(rows=4, max_length=512, window=64, truncation=True)
    assert build_sft_collator(tiny[1], training_args())[0].token_budget is None  # arguments without the fields


def _image_costs(lengths, seed=0):
    """Per-conversation FLOPs by the speed log's formula at the 1.5b preset's coefficients; 0-3 images each."""
    rnd = random.Random(seed)
    images = [rnd.choice([0, 1, 1, 2, 3]) for _ in lengths]
    return [9.0e9 * n + 5.2e4 * n * n + 2.2e12 * k for n, k in zip(lengths, images)]


@pytest.mark.parametrize("replicas,rows", [(2, 4), (3, 2), (4, 3)])
def test_balanced_ranks_keep_every_invariant_and_are_closer(replicas, rows):
    lengths = _lengths(900, seed=5, lo=20, hi=500)
    costs = _image_costs(lengths)
    plain = [TokenBudgetBatchSampler(lengths, rows, 1024, window=300, num_replicas=replicas, rank=r, num_epochs=2)
             for r in range(replicas)]
    balanced = [TokenBudgetBatchSampler(lengths, rows, 1024, window=300, num_replicas=replicas, rank=r,
                                        num_epochs=2, costs=costs) for r in range(replicas)]
    for epoch in range(2):
        for p, b in zip(plain, balanced):
            p.set_epoch(epoch)
            b.set_epoch(epoch)
        steps_p, steps_b = [list(s) for s in plain], [list(s) for s in balanced]
        assert [len(s) for s in steps_b] == [len(s) for s in steps_p]  # the same step count on every rank
        flat = sorted(i for s in steps_b for step in s for i in step)
        assert flat == list(range(len(lengths)))  # every conversation once, shards disjoint
        for k in range(len(steps_b[0])):  # the steps that run together hold the same bins, each rank its rows
            together = lambda steps: sorted(i for s in steps for i in s[k])  # noqa: E731
            assert together(steps_b) == together(steps_p)
            for r in range(replicas):
                assert len(next_fit([lengths[i] for i in steps_b[r][k]], 1024)) <= rows
        worst = lambda steps: sum(max(sum(costs[i] for i in s[k]) for s in steps)  # noqa: E731
                                  for k in range(len(steps[0])))
        assert worst(steps_b) < worst(steps_p)
    after, before = balanced[0].rank_imbalance(1)
    assert 1.0 <= after < before
    assert plain[0].rank_imbalance() == (1.0, 1.0)


def test_balancing_deals_the_heaviest_bins_to_different_ranks():
    # eight one-conversation bins (each fills max_length) in one lockstep step of two ranks x four rows
    costs = [8.0, 7.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    sampler = TokenBudgetBatchSampler([10] * 8, 4, 10, num_replicas=2, costs=costs)
    loads = sorted(sum(costs[i] for b in step for i in b) for step in sampler.plan(0))
    assert loads == [10.0, 11.0]  # 8+1+1+1 | 7+1+1+1; without balancing a rank could hold both 8 and 7
    with pytest.raises(ValueError, match="3 costs for 8 conversations"):
        TokenBudgetBatchSampler([10] * 8, 4, 10, num_replicas=2, costs=costs[:3])
    again = TokenBudgetBatchSampler([10] * 8, 4, 10, num_replicas=2, rank=1, costs=costs)  # another process
    assert list(again) == [[i for b in sampler.plan(0)[1] for i in b]]  # rank 1 runs the plan's second step


def test_balancing_exchanges_bins_where_dealing_leaves_a_rank_heavier():
    # dealing heaviest-first gives 3+2+2 | 3+2 (7 against 5); exchanging a 3 and a 2 gives 6 | 6
    costs = [3.0, 3.0, 2.0, 2.0, 2.0]
    sampler = TokenBudgetBatchSampler([10] * 5, 3, 10, num_replicas=2, costs=costs)
    assert sorted(sum(costs[i] for b in step for i in b) for step in sampler.plan(0)) == [6.0, 6.0]
    assert sampler.rank_imbalance() == (1.0, pytest.approx(7 / 6))


def test_balancing_spreads_a_short_last_step_over_the_ranks():
    # nine bins of equal cost at two ranks x eight rows: the second lockstep step was 8 | 1, now 5 | 4 (or 4 | 5)
    sampler = TokenBudgetBatchSampler([10] * 9, 8, 10, num_replicas=2, costs=[1.0] * 9)
    assert sorted(len(step) for step in sampler.plan(0)) == [4, 5]
    assert sorted(i for step in sampler.plan(0) for b in step for i in b) == list(range(9))
    zero = TokenBudgetBatchSampler([10] * 9, 8, 10, num_replicas=2, costs=[0.0] * 9)  # no cost: no empty rank
    assert min(len(step) for step in zero.plan(0)) >= 1


def test_balance_costs_follow_the_flop_formula_and_a_frozen_tower(tiny):
    from ghostvis_hf.training.sampler import balance_costs
    from ghostvis_hf.training.throughput import model_flop_coefficients

    model, _ = tiny
    c = model_flop_coefficients(model)
    lengths, images = [100, 300], [2, 0]
    assert balance_costs(model, lengths, images) == [c["token"] * 100 + c["token_sq"] * 100**2 + c["image"] * 2,
                                                     c["token"] * 300 + c["token_sq"] * 300**2]
    model.model.vision_tower.requires_grad_(False)  # frozen: its images cost the forward only
    assert balance_costs(model, lengths, images)[0] == pytest.approx(
        c["token"] * 100 + c["token_sq"] * 100**2 + c["image"] * 2 / 3)
