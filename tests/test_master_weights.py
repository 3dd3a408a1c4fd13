"""bf16 parameters with fp32 master weights (issue 16): exact AdamW on fp32, masters = fp32 AdamW on the same
gradients, updates too small for bf16 kept, state_dict round trip resumes identically, Trainer resume + clipping."""

import copy
import io
from types import SimpleNamespace

import pytest
import torch

from ghostvis_hf.training.optimizer import MasterWeightOptimizer, cast_parameters, make_optimizer, resolve_precision

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def model_and_batch(tiny):
    model, _ = tiny
    model.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 800, (4, 48), generator=g)
    return model, {"input_ids": ids, "labels": ids.clone()}


def _step(model, opt, batch, clip=None):
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def _rel(a, b):
    num = sum((x.float() - y.float()).pow(2).sum() for x, y in zip(a, b)).sqrt()
    return (num / sum(y.float().pow(2).sum() for y in b).sqrt()).item()


def _groups(model):
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]


def test_fp32_model_is_exactly_adamw(model_and_batch):
    model, batch = model_and_batch
    ref = copy.deepcopy(model)
    opt = MasterWeightOptimizer(_groups(model), torch.optim.AdamW, lr=1e-3, betas=(0.9, 0.95))
    ref_opt = torch.optim.AdamW(_groups(ref), lr=1e-3, betas=(0.9, 0.95))
    for _ in range(20):
        assert _step(model, opt, batch, clip=1.0) == _step(ref, ref_opt, batch, clip=1.0)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert {id(m) for m in opt.master_weights} == {id(p) for p in model.parameters()}  # no fp32 copies of fp32


def test_bf16_master_weights_are_fp32_adamw_on_the_same_gradients(model_and_batch):
    model, batch = model_and_batch
    ref = copy.deepcopy(model)  # fp32 AdamW fed with the bf16 model's (clipped) gradients
    opt = MasterWeightOptimizer(_groups(model), torch.optim.AdamW, param_dtype=torch.bfloat16, lr=1e-3)
    ref_opt = torch.optim.AdamW(_groups(ref), lr=1e-3)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    for _ in range(20):
        model(**batch, use_cache=False).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)  # what the Trainer does before the step
        for p, q in zip(model.parameters(), ref.parameters()):
            q.grad = None if p.grad is None else p.grad.float()
        opt.step()
        ref_opt.step()
        opt.zero_grad(set_to_none=True)
    assert _rel(opt.master_weights, [p for g in ref_opt.param_groups for p in g["params"]]) < 1e-5
    for p, m in zip(opt._params, opt.master_weights):
        assert m.dtype == torch.float32
        torch.testing.assert_close(p, m.to(torch.bfloat16), rtol=0, atol=0)  # the parameters are the rounded masters


def test_bf16_training_follows_fp32_and_keeps_small_updates(model_and_batch):
    model, batch = model_and_batch
    ref, low, pure = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model).to(torch.bfloat16)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    opt = MasterWeightOptimizer(low.parameters(), param_dtype=torch.bfloat16, lr=1e-3)
    ref_losses = [_step(ref, ref_opt, batch) for _ in range(20)]
    losses = [_step(low, opt, batch) for _ in range(20)]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=2e-2, atol=0)
    moved = _rel(list(ref.parameters()), list(model.parameters()))
    assert _rel(opt.master_weights, list(ref.parameters())) < 0.1 * moved
    # lr 1e-6: updates below bf16's resolution are lost by plain bf16 AdamW, kept by the masters
    start = [p.detach().clone() for p in model.parameters()]
    pure_start = [p.detach().clone() for p in pure.parameters()]
    small_model = copy.deepcopy(model)
    small = MasterWeightOptimizer(small_model.parameters(), param_dtype=torch.bfloat16, lr=1e-6)
    pure_opt = torch.optim.AdamW(pure.parameters(), lr=1e-6)
    for _ in range(3):
        _step(pure, pure_opt, batch)
        _step(small_model, small, batch)
    changed = lambda ws, ref: sum((w != r).sum().item() for w, r in zip(ws, ref))  # noqa: E731
    masters_changed = changed(small.master_weights, start)
    assert masters_changed > 0.5 * sum(p.numel() for p in start if p.ndim >= 2)
    assert changed(pure.parameters(), pure_start) < 0.05 * masters_changed


def test_state_dict_round_trip_resumes_identically(model_and_batch):
    model, batch = model_and_batch
    fresh = copy.deepcopy(model)
    opt = MasterWeightOptimizer(_groups(model), param_dtype=torch.bfloat16, lr=1e-3)
    for _ in range(10):
        _step(model, opt, batch, clip=1.0)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    for _ in range(10):
        _step(model, opt, batch, clip=1.0)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # as the Trainer loads optimizer.pt
    assert all("master_weight" in s and s["master_weight"].dtype == torch.float32 for s in saved["opt"]["state"].values())
    opt2 = MasterWeightOptimizer(_groups(fresh), param_dtype=torch.bfloat16, lr=1e-3)  # a restarted process
    fresh.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    for _ in range(10):
        _step(fresh, opt2, batch, clip=1.0)
    for p, q in zip(fresh.parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    for m, n in zip(opt2.master_weights, opt.master_weights):
        torch.testing.assert_close(m, n, rtol=0, atol=0)


def _args(**kwargs):
    base = dict(bf16=True, deepspeed=None, fsdp="", optim="adamw_torch", learning_rate=1e-3, weight_decay=0.0,
                adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, mixed_precision="bf16")
    return SimpleNamespace(**{**base, **kwargs})


def test_resolve_precision(tiny, monkeypatch):
    model, _ = tiny
    gv = SimpleNamespace(precision="auto", vision_tower_lr=None, projector_lr=None)
    expected = "bf16_master" if torch.cuda.is_available() else "autocast"
    assert resolve_precision(model, _args(), gv) == expected
    assert resolve_precision(model, _args(bf16=False), gv) == "autocast"
    assert resolve_precision(model, _args(), gv, use_peft=True) == "autocast"
    assert resolve_precision(model, _args(), SimpleNamespace(precision="bf16_master")) == "bf16_master"
    assert resolve_precision(model, _args(), SimpleNamespace()) == "autocast"  # arguments without the field
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert resolve_precision(model, _args(), gv) == "autocast"
    with pytest.raises(ValueError, match="DeepSpeed"):
        resolve_precision(model, _args(), SimpleNamespace(precision="bf16_master"))
    with pytest.raises(ValueError, match="precision must be"):
        resolve_precision(model, _args(), SimpleNamespace(precision="fp8"))


def test_fsdp2_takes_bf16_master_and_fsdp1_never(tiny, monkeypatch):
    """Under FSDP2 the masters are fp32 shards in our optimizer (`auto` on a GPU, as on one GPU); FSDP1 flattens the
    parameters before any optimizer exists, so it is refused there."""
    model, _ = tiny
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert resolve_precision(model, _args(), SimpleNamespace(precision="bf16_master")) == "bf16_master"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # what `auto` decides on a GPU
    assert resolve_precision(model, _args(), SimpleNamespace(precision="auto")) == "bf16_master"
    monkeypatch.undo()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    args = _args()
    opt = make_optimizer(model, args, SimpleNamespace(precision="bf16_master", vision_tower_lr=None, projector_lr=None))
    assert args.mixed_precision == "no"  # accelerate must not upcast the bf16 model for its own policy
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(m.is_meta for m in opt._masters)  # made at the first step, from the shards accelerate swaps in
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match="FSDP"):
        resolve_precision(model, _args(), SimpleNamespace(precision="bf16_master"))


def test_lazy_masters_are_made_at_the_first_step_and_a_late_swap_is_refused(model_and_batch):
    model, batch = model_and_batch
    ref = copy.deepcopy(model)
    cast_parameters(ref, torch.bfloat16)
    opt = MasterWeightOptimizer(_groups(model), param_dtype=torch.bfloat16, lazy=True, lr=1e-3)
    ref_opt = MasterWeightOptimizer(_groups(ref), lr=1e-3)  # fp32 copies of the same bf16 weights, made at once
    assert all(m.is_meta for m in opt._masters)
    for _ in range(3):
        _step(model, opt, batch)
        _step(ref, ref_opt, batch)
    for m, n in zip(opt.master_weights, ref_opt.master_weights):
        assert not m.is_meta
        torch.testing.assert_close(m, n, rtol=0, atol=0)
    opt.param_groups[0]["params"] = [torch.nn.Parameter(p.detach().clone()) for p in opt.param_groups[0]["params"]]
    with pytest.raises(RuntimeError, match="replaced after the optimizer stepped"):
        opt.step()


def test_trainer_takes_the_recipes_optimizer_under_fsdp2_only(monkeypatch, tiny):
    """The Trainer refuses `optimizers=` under FSDP; the mixin hands ours over in `create_optimizer` (FSDP2) and turns
    bf16 autocast on itself when accelerate's mixed precision is off for the bf16 model."""
    from ghostvis_hf.training.trainer import OwnOptimizerMixin

    class Base:
        def __init__(self, *args, optimizers=(None, None), **kwargs):
            self.optimizer, self.args = optimizers[0], kwargs["args"]

        def create_optimizer(self, model=None):
            return self.optimizer or "trainer's own"

        def autocast_smart_context_manager(self, cache_enabled=True):
            return "accelerate's"

    class T(OwnOptimizerMixin, Base):
        pass

    model, _ = tiny
    opt = MasterWeightOptimizer(model.parameters(), param_dtype=torch.bfloat16, lr=1e-3)
    args = _args(mixed_precision="no", device=torch.device("cpu"))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    trainer = T(args=args, optimizers=(opt, None))
    assert trainer.optimizer is None and trainer.create_optimizer() is opt
    assert isinstance(trainer.autocast_smart_context_manager(), torch.autocast)
    assert T(args=_args(mixed_precision="bf16"), optimizers=(opt, None)).autocast_smart_context_manager() == \
        "accelerate's"
    opt.autocast = False  # --master_autocast false: no autocast here either
    assert T(args=args, optimizers=(opt, None)).autocast_smart_context_manager() == "accelerate's"
    opt.autocast = True
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match="FSDP2 only"):
        T(args=args, optimizers=(opt, None))
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    plain = T(args=args, optimizers=(opt, None))  # unsharded: the Trainer takes it as given
    assert plain.optimizer is opt and plain.autocast_smart_context_manager() == "accelerate's"


def test_auto_keeps_autocast_under_gradient_accumulation(tiny, monkeypatch, caplog):
    """bf16 + master was measured at one micro-batch a step; with accumulation its gradients would be summed in bf16,
    so `auto` keeps autocast there and an explicit `bf16_master` says so."""
    model, _ = tiny
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # what `auto` decides on a GPU
    auto = SimpleNamespace(precision="auto")
    assert resolve_precision(model, _args(gradient_accumulation_steps=1), auto) == "bf16_master"
    assert resolve_precision(model, _args(gradient_accumulation_steps=4), auto) == "autocast"
    with caplog.at_level("WARNING", logger="ghostvis"):
        explicit = SimpleNamespace(precision="bf16_master")
        assert resolve_precision(model, _args(gradient_accumulation_steps=4), explicit) == "bf16_master"
    assert "summed in bf16" in caplog.text


def test_make_optimizer_casts_the_model_and_keeps_autocast(tiny):
    model, _ = tiny
    model.model.vision_tower.requires_grad_(False)
    args = _args()
    opt = make_optimizer(model, args, SimpleNamespace(precision="bf16_master", vision_tower_lr=None,
                                                      projector_lr=3e-4))
    assert isinstance(opt, MasterWeightOptimizer)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())  # frozen towers too
    assert args.mixed_precision == "bf16"  # autocast stays on for the ops it keeps in fp32
    assert sorted({g["lr"] for g in opt.param_groups}) == [3e-4, 1e-3]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(m.numel() for m in opt.master_weights) == trainable


def test_trainer_resume_with_master_weights_and_clipping(tmp_path, tiny):
    trl = pytest.importorskip("trl")
    import ghostvis_hf
    from datasets import Dataset

    _, processor = tiny
    rows = [{"messages": [{"role": "user", "content": [{"type": "text", "text": f"q{i} " * (i % 4 + 1)}]},
                          {"role": "assistant", "content": [{"type": "text", "text": f"a{i} " * (i % 3 + 2)}]}]}
            for i in range(12)]

    def run(resume=None):
        torch.manual_seed(0)
        model, _ = ghostvis_hf.create("tiny")
        args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=3, learning_rate=1e-3,
                             report_to="none", max_length=64, use_cpu=True, save_strategy="steps", save_steps=2,
                             logging_steps=1, max_grad_norm=0.05, gradient_checkpointing=False, bf16=False, seed=1)
        opt = make_optimizer(model, args, SimpleNamespace(precision="bf16_master", vision_tower_lr=None,
                                                          projector_lr=None))
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                 processing_class=processor.tokenizer, optimizers=(opt, None))
        trainer.train(resume_from_checkpoint=resume)
        return trainer, opt

    full, opt = run()
    assert all(p.dtype == torch.bfloat16 for p in full.model.parameters())
    norms = [h["grad_norm"] for h in full.state.log_history if "grad_norm" in h]
    assert len(norms) == 4 and all(n > 0.05 for n in norms)  # clipping was active at every step
    resumed, opt2 = run(resume=str(tmp_path / "checkpoint-2"))
    for p, q in zip(resumed.model.parameters(), full.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    for m, n in zip(opt2.master_weights, opt.master_weights):
        torch.testing.assert_close(m, n, rtol=0, atol=0)


def test_make_optimizer_keeps_compact_masters_when_asked_and_refuses_them_under_fsdp2(tiny, monkeypatch):
    from ghostvis_hf.training import optimizer as opt

    model, _ = tiny
    gv = SimpleNamespace(precision="bf16_master", compact_master_weights=True, vision_tower_lr=None, projector_lr=None)
    made = opt.make_optimizer(model, _args(), gv)
    assert made.compact and all(m.dtype == torch.int16 for m in made._masters)
    assert next(model.parameters()).dtype == torch.bfloat16
    monkeypatch.setattr(opt, "fsdp_version", lambda training_args: 2)
    with pytest.raises(ValueError, match="compact_master_weights does not run under FSDP2"):
        opt.make_optimizer(model, _args(), gv)


def test_make_optimizer_installs_the_fp32_residual_stream_with_bf16_master(tiny):
    model, _ = tiny
    gv = SimpleNamespace(precision="bf16_master", fp32_residual=True, vision_tower_lr=None, projector_lr=None)
    make_optimizer(model, _args(), gv)
    assert next(model.parameters()).dtype == torch.bfloat16 and getattr(model, "_ghostvis_fp32_residual_hooks")
