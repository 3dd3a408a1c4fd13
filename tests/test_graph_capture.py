"""A whole training forward + backward captured as CUDA graphs (issue 16, `ghostvis bench train --runs
graphed_step_master`): the capture takes no host sync (placeholder check, fused cross-entropy), and replays give the
eager loss and gradients on new inputs of the same shapes."""

import contextlib
import copy
import os
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode


@pytest.fixture(autouse=True)
def _stock_rope_after():
    """`apply_kernels` swaps RoPE for the whole process on CUDA: undo it, so later CPU tests run the stock RoPE."""
    yield
    from ghostvis_hf.kernels import reset_kernels

    reset_kernels()


def _batch(model, seed, device="cuda"):
    cfg, n = model.config, model.config.image_seq_length
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 200, (2, n + 60), generator=g)
    ids[:, 1], ids[:, 2 + n] = cfg.vision_start_token_id, cfg.vision_end_token_id
    ids[:, 2 : 2 + n] = cfg.image_token_id
    labels = ids.clone()
    labels[:, : n + 3] = -100  # image and prompt not scored
    size = cfg.vision_config.image_size
    pixels = torch.randn(2, 3, size, size, generator=g)
    return tuple(t.to(device) for t in (ids, pixels, labels))


def _assert_same(loss, model, want, eager, tol):
    """`loss` == `want` and every gradient of `model` == `eager`'s (`tol`: loss rtol, atol; gradients 10x rtol)."""
    torch.testing.assert_close(loss, want, rtol=tol[0], atol=tol[1])
    grads = dict(eager.named_parameters())
    for name, p in model.named_parameters():
        if p.grad is not None or grads[name].grad is not None:
            torch.testing.assert_close(p.grad, grads[name].grad, rtol=10 * tol[0], atol=tol[1], msg=name)


def test_what_the_capture_runs_matches_the_eager_model_on_cpu(tiny, monkeypatch):
    """The captured module on the CPU, where nothing captures: the ready-made mask mapping, the gathering image
    scatter and the static cross-entropy give the eager model's loss and gradients."""
    from ghostvis_hf.bench.train import _LossOf
    from ghostvis_hf.kernels.cross_entropy import LinearCrossEntropy
    import ghostvis_hf.modeling_ghostvis as modeling

    model = tiny[0].train()
    eager = copy.deepcopy(model)
    model.linear_cross_entropy = LinearCrossEntropy("torch", static=True)
    keys = ("input_ids", "pixel_values", "labels")
    batch = _batch(model, 1, device="cpu")
    captured = _LossOf(model, keys)
    assert set(captured.masks) == set(model.config.text_config.layer_types) and not any(captured.masks.values())
    plain = modeling.scatter_image_features
    monkeypatch.setattr(modeling, "scatter_image_features", lambda *a: plain(*a, static=True))  # what a capture picks
    loss = captured(*batch)
    loss.backward()
    want = eager(**dict(zip(keys, batch)), use_cache=False).loss
    want.backward()
    _assert_same(loss, model, want, eager, (1e-5, 1e-6))


def _backend(name):
    from ghostvis_hf.kernels.cross_entropy import liger_row_kernel

    if name == "liger" and liger_row_kernel() is None:
        pytest.skip("liger-kernel's row kernel is not available")
    return name


@pytest.mark.parametrize("num_items", [None, 37, 37.0])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_static_liger_cross_entropy_matches_the_selecting_path(tiny, num_items):
    """The sync-free Liger path (every row, Liger's row kernel driven without its `.item()` count) gives the loss and
    gradients of the default path, which selects the scored rows; the scale as a device tensor or a Python float."""
    from ghostvis_hf.kernels import apply_kernels
    from ghostvis_hf.kernels.cross_entropy import LinearCrossEntropy

    _backend("liger")
    model = tiny[0].cuda().train()
    apply_kernels(model)
    ids, pixels, labels = _batch(model, 3)
    kw = {} if num_items is None else {
        "num_items_in_batch": num_items if isinstance(num_items, float) else torch.tensor(num_items, device="cuda")}
    results = []
    for ce in (LinearCrossEntropy("torch"), LinearCrossEntropy("liger", chunk_size=64, static=True),
               LinearCrossEntropy("liger", chunk_size=64)):  # the eager path: the row kernel on the scored rows
        model.linear_cross_entropy = ce
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, pixel_values=pixels, labels=labels, use_cache=False, **kw).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (want, want_grads), *others = results
    for got, got_grads in others:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert got_grads.keys() == want_grads.keys()
        for name, grad in want_grads.items():
            torch.testing.assert_close(got_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_eager_liger_cross_entropy_reads_the_gpu_once(tiny):
    """The eager Liger path waits for the GPU once (the count of scored rows sets their shape) in its forward and
    never in its backward; Liger's own entry point waits three times (its `.item()` count, and `torch.equal` of the
    incoming gradient with a new device tensor)."""
    import warnings

    from ghostvis_hf.kernels.cross_entropy import LinearCrossEntropy

    _backend("liger")
    model = tiny[0].cuda()
    text = model.config.text_config
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(2, 64, text.hidden_size, device="cuda", generator=g, requires_grad=True)
    labels = torch.randint(0, text.vocab_size, (2, 64), device="cuda", generator=g)
    labels[:, :20] = -100
    num_items = torch.tensor(88, device="cuda")

    def syncs(fn):
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                out = fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        # (switching the mode warns too, from torch/cuda/__init__.py: not the code under test)
        return out, [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message).lower()
                     and not w.filename.replace(os.sep, "/").endswith("torch/cuda/__init__.py")]

    ce = LinearCrossEntropy("liger")
    ce(hidden, model.lm_head, labels, num_items).backward()  # the first call imports and compiles the kernel
    hidden.grad = None
    loss, forward = syncs(lambda: ce(hidden, model.lm_head, labels, num_items))
    _, backward = syncs(loss.backward)
    assert (len(forward), len(backward)) == (1, 0), (forward, backward)
    assert hidden.grad[:, :19].abs().max() == 0 and hidden.grad[:, 20:].abs().max() > 0  # only scored rows


@pytest.mark.parametrize("backend", ["torch", "liger"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graphed_forward_backward_matches_eager(tiny, backend):
    from ghostvis_hf.bench.train import _LossOf
    from ghostvis_hf.kernels import apply_kernels
    from ghostvis_hf.kernels.cross_entropy import LinearCrossEntropy

    model = tiny[0].cuda().train()
    apply_kernels(model)
    eager = copy.deepcopy(model)
    model.linear_cross_entropy = LinearCrossEntropy(_backend(backend), static=True)
    keys = ("input_ids", "pixel_values", "labels")
    graphed = torch.cuda.make_graphed_callables(_LossOf(model, keys), _batch(model, 0), num_warmup_iters=3)
    for seed in (1, 2):  # new inputs, same shapes: the graphs read them from their static buffers
        batch = _batch(model, seed)
        model.zero_grad(set_to_none=True)
        eager.zero_grad(set_to_none=True)
        loss = graphed(*batch)
        loss.backward()
        want = eager(**dict(zip(keys, batch)), use_cache=False).loss
        want.backward()
        _assert_same(loss, model, want, eager, (1e-4, 1e-5))


# ------------------------------------------------------------- the recipes' step (`--cuda_graphs`, training.graph_step)


def _packed_batch(model, seed, max_length, device="cpu", conversations=3):
    """A token-budget batch as the packing collator makes it: `conversations` (2-4) of random lengths, one image
    each, cut in order into exactly 2 rows of `max_length` (padding sequences included)."""
    from ghostvis_hf.training.packing import pack_samples

    cfg, n = model.config, model.config.image_seq_length
    g = torch.Generator().manual_seed(seed)
    size = cfg.vision_config.image_size
    samples = []
    longest = 40 if conversations <= 3 else 20  # two conversations per row
    for extra in torch.randint(8, longest, (conversations,), generator=g).tolist():
        ids = torch.randint(10, 200, (n + 3 + extra,), generator=g)
        ids[1], ids[2 + n] = cfg.vision_start_token_id, cfg.vision_end_token_id
        ids[2 : 2 + n] = cfg.image_token_id
        labels = ids.clone()
        labels[: n + 3] = -100  # image and prompt not scored
        samples.append({"input_ids": ids, "labels": labels, "pixel_values": torch.randn(1, 3, size, size, generator=g)})
    batch = pack_samples(samples, max_length=max_length, pad_token_id=0, rows=2, in_order=True)
    for k in ("num_real_tokens", "num_slots"):
        batch.pop(k)
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


@pytest.fixture
def varlen_on_cpu(monkeypatch):
    """GhostVis's varlen attention path on the CPU, with the reference kernel (empty sequences included)."""
    from conftest import reference_varlen
    from ghostvis_hf.kernels import _compat, attention

    monkeypatch.setattr(attention, "FAST_DEVICES", {"cuda", "cpu"})
    monkeypatch.setattr(_compat, "varlen_attn_fn", lambda: reference_varlen)


@pytest.mark.parametrize("num_items", [None, 37, "tensor"])
def test_graphed_step_inputs_give_the_model_loss_on_cpu(tiny, varlen_on_cpu, num_items):
    """What `--cuda_graphs` captures, run eagerly on the CPU (`capture=False`): eager embedding + vision, gathering
    scatter, then `DecoderLoss` on `cu_seq_lens` padded with empty sequences, ready-made masks and the static
    cross-entropy. Same loss and gradients as the model's own forward on the packed batch, for every form of the
    Trainer's `num_items_in_batch`."""
    from ghostvis_hf.kernels import apply_kernels, attention, reset_kernels
    from ghostvis_hf.training.graph_step import GraphedStep

    model = tiny[0].train()
    apply_kernels(model, attention="ghostvis_sdpa")
    eager = copy.deepcopy(model)
    length = 2 * model.config.image_seq_length + 64
    step = GraphedStep(model, rows=2, max_length=length, max_sequences=3 + 2 + 4, capture=False)
    for seed in (0, 1):
        batch = _packed_batch(model, seed, length)
        assert step.fits(batch) and batch["cu_seq_lens_q"].numel() < step.max_sequences + 1  # some padding added
        items = torch.tensor(37) if num_items == "tensor" else num_items
        model.zero_grad(set_to_none=True)
        eager.zero_grad(set_to_none=True)
        calls = attention.CALLS["varlen"]
        loss = step(batch, items)
        assert attention.CALLS["varlen"] == calls + model.config.text_config.num_hidden_layers  # cu_seq_lens read
        loss.backward()
        want = eager(**batch, use_cache=False, num_items_in_batch=items).loss
        want.backward()
        _assert_same(loss, model, want, eager, (1e-5, 1e-6))
    reset_kernels(model)


def test_graphed_step_refuses_what_it_cannot_capture(tiny):
    """Up front: a run whose steps have no fixed shapes, or that is not one CUDA process, is refused with every
    reason; at the first step, an attention that would let packed sequences see each other."""
    from types import SimpleNamespace

    from ghostvis_hf.kernels import apply_kernels, reset_kernels
    from ghostvis_hf.training.graph_step import GraphedStep, check_cuda_graphs

    trainer = SimpleNamespace(
        args=SimpleNamespace(device=torch.device("cpu"), world_size=2, gradient_checkpointing=True),
        model=tiny[0], data_collator=SimpleNamespace(token_budget=None))
    with pytest.raises(ValueError) as e:
        check_cuda_graphs(trainer)
    for reason in ("--token_budget", "a CUDA device", "one process", "--gradient_checkpointing false",
                   "fused cross-entropy", "bf16 parameters"):
        assert reason in str(e.value)
    with pytest.raises(ValueError, match="fused cross-entropy"):
        GraphedStep(tiny[0], rows=2, max_length=64, max_sequences=4)
    model = tiny[0].train()
    apply_kernels(model, attention="sdpa")  # transformers' SDPA ignores cu_seq_lens: one causal mask over the row
    length = 2 * model.config.image_seq_length + 64
    step = GraphedStep(model, rows=2, max_length=length, max_sequences=9, capture=False)
    batch = _packed_batch(model, 0, length)
    with pytest.raises(ValueError, match="cu_seq_lens"):
        step(batch)
    assert not step.fits({**batch, "input_ids": batch["input_ids"][:1]})  # another row count: the eager forward
    assert not step.fits({**batch, "cu_seq_lens_q": torch.arange(11)})  # more sequences than planned
    reset_kernels(model)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("image_counts", [None, [2, 3, 4]])
def test_graphed_step_replays_match_the_eager_model(tiny, image_counts):
    """`--cuda_graphs` on CUDA: captured at the first batch, the replays on new packed batches (other sequence and
    image placements, other lengths, 2-4 images) give the eager model's loss and gradients, under bf16 autocast (the
    varlen kernels take bf16). With `image_counts` (`--cuda_graphs_vision`) the vision side's graphs too: one memory
    pool for the counts 2, 3 and 4, replayed in another order than captured (4, 3, 2) and between the decoder's."""
    from ghostvis_hf.kernels import apply_kernels
    from ghostvis_hf.training.graph_step import GraphedStep

    model = tiny[0].cuda().train()
    apply_kernels(model, attention="ghostvis_sdpa")
    eager = copy.deepcopy(model)
    length = 2 * model.config.image_seq_length + 64
    step = GraphedStep(model, rows=2, max_length=length, max_sequences=9, image_counts=image_counts)
    for seed, conversations in enumerate((3, 2, 4, 3, 2)):
        batch = _packed_batch(model, seed, length, device="cuda", conversations=conversations)
        model.zero_grad(set_to_none=True)
        eager.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step(batch)
            want = eager(**batch, use_cache=False).loss
        loss.backward()
        want.backward()
        assert step.graphed is not None
        _assert_same(loss, model, want, eager, (1e-2, 1e-3))
    assert set(step.vision_graphs) == set(image_counts or ())


def _fake_graphed_callables(module, sample, num_warmup_iters=3, allow_unused_input=False, pool=None):
    """`torch.cuda.make_graphed_callables`' contract on the CPU: the backward writes every gradient into one static
    buffer per input and returns detached views of those buffers (what its `Graphed.backward` returns); the module
    comes back itself, its `forward` replaced (in training mode) by the replay of inputs of `sample`'s shapes."""
    params = tuple(p for p in module.parameters() if p.requires_grad)
    buffers = {}
    eager_forward = module.forward

    class Replay(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            ctx.inputs = [x.detach().requires_grad_(x.requires_grad) for x in inputs[: len(sample)]]
            return eager_forward(*ctx.inputs).detach()

        @staticmethod
        def backward(ctx, grad):
            with torch.enable_grad():
                wrt = [x for x in ctx.inputs if x.requires_grad] + list(params)
                grads = iter(torch.autograd.grad(eager_forward(*ctx.inputs), wrt, grad,
                                                 allow_unused=allow_unused_input))
            out = []
            for i, x in enumerate(ctx.inputs + list(params)):
                g = next(grads) if x.requires_grad else None
                if g is not None:
                    buffers.setdefault(i, torch.empty_like(x)).copy_(g)
                out.append(buffers[i].detach() if g is not None else None)
            return tuple(out)

    def replay(*inputs):
        assert [x.shape for x in inputs] == [x.shape for x in sample], "a replay takes the captured shapes"
        return Replay.apply(*inputs, *params)

    def forward(*inputs):
        return replay(*inputs) if module.training else eager_forward(*inputs)

    module.forward = forward
    return module


@pytest.mark.parametrize("accumulate", [True, False])
def test_graphed_step_gradient_accumulation_with_replayed_gradient_buffers(tiny, varlen_on_cpu, monkeypatch,
                                                                           accumulate):
    """A replayed backward hands out views of the graph's gradient buffers, which autograd keeps as `.grad` when
    `.grad` is unset: the next micro-batch's replay would overwrite them (measured here: the sum comes out wrong).
    `accumulate=True` (the mixin's choice with gradient_accumulation_steps > 1) sums like two eager backwards."""
    from ghostvis_hf.kernels import apply_kernels, reset_kernels
    from ghostvis_hf.training.graph_step import GraphedStep

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", _fake_graphed_callables)
    model = tiny[0].train()
    apply_kernels(model, attention="ghostvis_sdpa")
    eager = copy.deepcopy(model)
    length = 2 * model.config.image_seq_length + 64
    step = GraphedStep(model, rows=2, max_length=length, max_sequences=9)
    for seed in (1, 2):
        batch = _packed_batch(model, seed, length)
        loss = step(batch, accumulate=accumulate)
        loss.backward()
        eager(**batch, use_cache=False).loss.backward()
    assert step.graphed is not None
    grads = dict(eager.named_parameters())
    same = all(torch.allclose(p.grad, grads[n].grad, rtol=1e-4, atol=1e-6)
               for n, p in model.named_parameters() if p.grad is not None)
    assert same == accumulate
    reset_kernels(model)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graphed_step_in_bf16_is_as_close_to_fp32_as_the_eager_model(tiny):
    """The recipe's setting (bf16 parameters, `--cuda_graphs --cuda_graphs_vision`): bf16 results differ from the
    eager bf16 model's by rounding only, so both are measured against the same model in fp32. Over all gradients
    (relative norm of the difference) the graphed step is about as far from fp32 as the eager bf16 model is, and its
    loss is the eager bf16 loss."""
    from ghostvis_hf.kernels import apply_kernels
    from ghostvis_hf.training.graph_step import GraphedStep

    model = tiny[0].cuda().train()
    apply_kernels(model, attention="ghostvis_sdpa")
    reference = copy.deepcopy(model)  # fp32
    model.to(torch.bfloat16)
    eager = copy.deepcopy(model)
    length = 2 * model.config.image_seq_length + 64
    step = GraphedStep(model, rows=2, max_length=length, max_sequences=9, image_counts=[2, 3, 4])

    def error(m):  # |g - g_fp32| / |g_fp32| over all gradients
        pairs = [(p.grad, q.grad) for p, q in zip(m.parameters(), reference.parameters()) if q.grad is not None]
        diff = sum((g.float() - want).square().sum() for g, want in pairs)
        return (diff / sum(want.square().sum() for _, want in pairs)).sqrt().item()

    for seed, conversations in enumerate((3, 2, 4)):
        batch = _packed_batch(model, seed, length, device="cuda", conversations=conversations)
        bf16_batch = {**batch, "pixel_values": batch["pixel_values"].bfloat16()}
        for m in (model, eager, reference):
            m.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step(bf16_batch)
            want = eager(**bf16_batch, use_cache=False).loss
            exact = reference(**batch, use_cache=False).loss
        for x in (loss, want, exact):
            x.backward()
        torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-5)
        graphed_error, eager_error = error(model), error(eager)
        assert 0 < eager_error < 0.05, eager_error  # bf16 rounding, not a different computation
        assert graphed_error < 1.5 * eager_error, (graphed_error, eager_error)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graphed_step_accumulates_gradients_over_micro_batches(tiny):
    """Gradient accumulation: two replayed backwards before the gradients are read sum like two eager ones (the
    replays hand out views of one gradient buffer; `accumulate=True` keeps them from becoming `.grad`)."""
    from ghostvis_hf.kernels import apply_kernels
    from ghostvis_hf.training.graph_step import GraphedStep

    model = tiny[0].cuda().train()
    apply_kernels(model, attention="ghostvis_sdpa")
    eager = copy.deepcopy(model)
    length = 2 * model.config.image_seq_length + 64
    step = GraphedStep(model, rows=2, max_length=length, max_sequences=9)
    for seed in (1, 2):  # the first call captures, then replays
        batch = _packed_batch(model, seed, length, device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step(batch, accumulate=True)
            want = eager(**batch, use_cache=False).loss
        loss.backward()
        want.backward()
    _assert_same(loss, model, want, eager, (1e-2, 1e-3))


def _bare_trainer(trainer_cls, length, image_counts=None):
    """A `GraphedStepMixin` trainer with what its `compute_loss` reads (2 rows of `length` tokens, <= 9 sequences a
    step; `image_counts`: `cuda_graphs_vision` on, with the plan's image counts), the Trainer's own `__init__` (and
    its refusal of the CPU) left out."""
    from types import SimpleNamespace

    from ghostvis_hf.training.packing import TokenBudget

    trainer = trainer_cls.__new__(trainer_cls)
    trainer.cuda_graphs, trainer.cuda_graphs_vision, trainer._graphed_step = True, image_counts is not None, None
    trainer.data_collator = SimpleNamespace(token_budget=TokenBudget(2, length))
    trainer._token_budget_sampler = SimpleNamespace(max_sequences_per_step=lambda: 9)
    trainer._image_counts = image_counts
    trainer.accelerator = SimpleNamespace(unwrap_model=lambda m: m)
    trainer.args = SimpleNamespace(gradient_accumulation_steps=1)
    return trainer


def test_graphed_step_mixin_routes_training_losses_and_falls_back(tiny, varlen_on_cpu, monkeypatch):
    """The trainer side: training losses of fitting batches go through the graphed step (built at the first one, its
    bound from the sampler's plan); evaluation and a batch of other shape take the trainer's own `compute_loss`,
    the latter counted."""
    from ghostvis_hf.kernels import apply_kernels, reset_kernels
    from ghostvis_hf.training import graph_step

    class Base:
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return "trainer's own"

    class Trainer(graph_step.GraphedStepMixin, Base):
        pass

    made = []

    class CPUStep(graph_step.GraphedStep):  # what the mixin builds, without a capture (CPU)
        def __init__(self, *args, **kwargs):
            super().__init__(*args, capture=False, **kwargs)
            made.append(self)

    monkeypatch.setattr(graph_step, "GraphedStep", CPUStep)
    model = tiny[0].train()
    apply_kernels(model, attention="ghostvis_sdpa")
    length = 2 * model.config.image_seq_length + 64
    trainer = _bare_trainer(Trainer, length)
    batch = _packed_batch(model, 0, length)
    loss = trainer.compute_loss(model, batch)
    assert torch.is_tensor(loss) and loss.requires_grad and made[0].max_sequences == 9
    assert trainer.compute_loss(model, {**batch, "input_ids": batch["input_ids"][:1]}) == "trainer's own"
    assert made[0].eager_steps == 1 and len(made) == 1
    model.eval()
    assert trainer.compute_loss(model, batch) == "trainer's own"
    reset_kernels(model)


def _counting(graphed_callables):
    """`graphed_callables` that also counts the replays of each callable, by its sample's leading size."""
    replays = {}

    def make(module, sample, num_warmup_iters=3, allow_unused_input=False, pool=None):
        graphed = graphed_callables(module, sample, num_warmup_iters, allow_unused_input, pool)
        key, replay = (type(module).__name__, sample[0].shape[0]), graphed.forward

        def forward(*args):
            replays[key] = replays.get(key, 0) + 1
            return replay(*args)

        graphed.forward = forward
        return graphed

    return make, replays


@pytest.mark.parametrize("accumulate,feature_layer", [(False, -1), (True, -1), (False, -2)])
def test_graphed_step_replays_the_vision_side_per_image_count(tiny, varlen_on_cpu, monkeypatch, accumulate,
                                                              feature_layer):
    """`image_counts`: the vision side (tower, resampler, projector) runs as one graphed forward/backward per image
    count of the plan (here 2 and 3), captured at the first step; a step with another count (4) runs it eagerly.
    Loss and gradients == the eager model's, step by step and summed over micro-batches (`accumulate`), also with
    features from below the tower's last layer (its top layer then gets no gradient), on the CPU with a stand-in of
    make_graphed_callables' contract (static gradient buffers handed out as views, the module's forward replaced)."""
    from ghostvis_hf.kernels import apply_kernels, reset_kernels
    from ghostvis_hf.training.graph_step import GraphedStep

    make, replays = _counting(_fake_graphed_callables)
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", make)
    model = tiny[0].train()
    model.config.vision_feature_layer = feature_layer
    apply_kernels(model, attention="ghostvis_sdpa")
    eager = copy.deepcopy(model)
    length = 2 * model.config.image_seq_length + 64
    step = GraphedStep(model, rows=2, max_length=length, max_sequences=4 + 2, image_counts=[3, 2, 0])
    assert step.image_counts == [2, 3]
    for seed, conversations in enumerate((3, 2, 4, 3)):
        batch = _packed_batch(model, seed, length, conversations=conversations)
        assert batch["pixel_values"].shape[0] == conversations
        if not accumulate:
            model.zero_grad(set_to_none=True)
            eager.zero_grad(set_to_none=True)
        loss = step(batch, accumulate=accumulate)
        loss.backward()
        want = eager(**batch, use_cache=False).loss
        want.backward()
        torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
        if not accumulate:
            _assert_same(loss, model, want, eager, (1e-5, 1e-6))
    if accumulate:
        _assert_same(loss, model, want, eager, (1e-5, 1e-6))
    assert set(step.vision_graphs) == {2, 3}
    # the vision graphs are captured first, so the decoder's capture sample (first step, 3 images) replays one too;
    # 4 images: eager
    assert replays == {("DecoderLoss", 2): 4, ("ImageFeatures", 3): 3, ("ImageFeatures", 2): 1}
    reset_kernels(model)


def test_graphed_step_mixin_passes_the_plans_image_counts(tiny, varlen_on_cpu, monkeypatch):
    """`cuda_graphs_vision=True`: the mixin hands the token-budget plan's image counts to the graphed step, whose
    vision graphs are captured when training begins (before the DataLoader's pin-memory thread could break a
    capture), at the tower's image size; without `cuda_graphs` it is refused."""
    from ghostvis_hf.kernels import apply_kernels, reset_kernels
    from ghostvis_hf.training import graph_step

    class Base:
        def __init__(self, *args, **kwargs):
            pass

    class Trainer(graph_step.GraphedStepMixin, Base):
        pass

    from ghostvis_hf.training.arguments import GhostVisArguments

    with pytest.raises(ValueError, match="set --cuda_graphs true"):
        Trainer(cuda_graphs_vision=True)
    with pytest.raises(ValueError, match="set --cuda_graphs true"):  # the recipes' flags, before anything loads
        GhostVisArguments(cuda_graphs_vision=True)
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", _fake_graphed_callables)
    model = tiny[0].train()
    apply_kernels(model, attention="ghostvis_sdpa")
    length = 2 * model.config.image_seq_length + 64
    trainer = _bare_trainer(Trainer, length, image_counts={3, 5})
    trainer.model, trainer.autocast_smart_context_manager = model, contextlib.nullcontext
    graph_step._CaptureVisionAtTrainBegin(trainer).on_train_begin(None, None, None)  # before the first batch
    step = trainer._graphed_step
    size = model.config.vision_config.image_size
    assert step.image_counts == [3, 5] and set(step.vision_graphs) == {3, 5} and step.pixel_shape == (3, size, size)
    trainer.compute_loss(model, _packed_batch(model, 0, length)).backward()
    assert all(p.grad is not None for p in graph_step.ImageFeatures(model).parameters())
    reset_kernels(model)


class _HostReads(TorchDispatchMode):
    """Records, by op and caller, every op that on a GPU reads a device value back to the host and so waits for all
    queued work: `.item()` / `bool()` / `int()` of a tensor, `nonzero`, `masked_select`, boolean indexing."""

    READS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default"}

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        boolean_index = name.startswith(("aten.index.Tensor", "aten.index_put")) and any(
            torch.is_tensor(i) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else None) or ())
        if name in self.READS or boolean_index:
            caller = next((f for f in reversed(traceback.extract_stack()[:-1])
                           if "/torch/" not in f.filename), None)
            self.reads.append(f"{name} at {os.path.basename(caller.filename)}:{caller.lineno}" if caller else name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("nan_filter", [False, True])
def test_graphed_recipe_steps_read_nothing_back_from_the_device(tiny, varlen_on_cpu, monkeypatch, tmp_path,
                                                                nan_filter):
    """The training step of a `--cuda_graphs` run (the Trainer's loop from step begin to step end: the graphed step's
    eager part, backward, clipping, scheduler, zero_grad, callbacks) reads no value back from the device, so the host
    never waits for the GPU and keeps queueing the next step: run on the CPU with the graphs' eager stand-in, every
    such op recorded. The optimizer step is left out: on the CPU it is torch's AdamW, which reads its host-side step
    counts; on CUDA the master-weight optimizer steps through its Triton kernel with counts kept on the host. The
    GPU configs turn the Trainer's NaN/inf filter off for this; left on, it reads the loss twice a step (found)."""
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback

    from ghostvis_hf.data import load_shapes
    from ghostvis_hf.kernels import apply_kernels, reset_kernels
    from ghostvis_hf.training import graph_step
    from ghostvis_hf.training.optimizer import MasterWeightOptimizer
    from ghostvis_hf.training.packing import GhostVisPackingCollator, TokenBudget
    from ghostvis_hf.training.trainer import GhostVisSFTTrainer

    class CPUStep(graph_step.GraphedStep):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, capture=False, **kwargs)

    monkeypatch.setattr(graph_step, "GraphedStep", CPUStep)
    monkeypatch.setattr(graph_step, "check_cuda_graphs", lambda trainer: None)  # it refuses the CPU

    class Audit(TrainerCallback):  # records from step begin to step end, after the first step (the capture's)
        def __init__(self):
            self.mode, self.steps = _HostReads(), 0

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step >= 1:
                self.mode.__enter__()
                self.steps += 1

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if state.global_step >= 1:  # the CPU steps torch's AdamW, which reads its host-side step counts
                self.mode.__exit__(None, None, None)

        def on_optimizer_step(self, args, state, control, **kwargs):
            if state.global_step >= 1:
                self.mode.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= 2:
                self.mode.__exit__(None, None, None)

    model, processor = tiny
    model = model.to(torch.bfloat16).train()
    apply_kernels(model, attention="ghostvis_sdpa")
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-3,
                         report_to="none", max_length=256, use_cpu=True, save_strategy="no", logging_steps=100,
                         dataloader_num_workers=0, gradient_checkpointing=False, max_grad_norm=1.0,
                         logging_nan_inf_filter=nan_filter)
    audit = Audit()
    optimizer = MasterWeightOptimizer(model.parameters(), torch.optim.AdamW, param_dtype=torch.bfloat16, lr=1e-3)
    trainer = GhostVisSFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(load_shapes("train", num_samples=40, seed=0)),
        processing_class=processor, callbacks=[audit], optimizers=(optimizer, None), cuda_graphs=True,
        cuda_graphs_vision=not nan_filter,  # its train-begin callback too (no capture on the CPU)
        data_collator=GhostVisPackingCollator(processor, max_length=256, token_budget=TokenBudget(2, 256)))
    trainer.train()
    assert trainer._graphed_step is not None and trainer._graphed_step.eager_steps == 0
    assert audit.steps == 3
    if nan_filter:
        assert len(audit.mode.reads) == 2 * audit.steps and all("trainer.py" in r for r in audit.mode.reads)
    else:
        assert audit.mode.reads == []
    reset_kernels(model)


def test_model_loss_gives_packed_rows_ready_made_masks(tiny, varlen_on_cpu, tmp_path, monkeypatch):
    """`--loss model` on a packed batch whose attention reads `cu_seq_lens`: the decoder gets its mask mapping
    ready-made, so transformers never looks at `position_ids` for packed sequences (a host sync on the GPU), and the
    loss and gradients are those of the model's forward with the masks transformers builds."""
    import transformers.masking_utils as masking
    from trl import SFTConfig

    from ghostvis_hf.data import load_shapes
    from ghostvis_hf.kernels import apply_kernels, reset_kernels
    from ghostvis_hf.training.trainer import GhostVisSFTTrainer

    model, processor = tiny
    apply_kernels(model, attention="ghostvis_sdpa")
    eager = copy.deepcopy(model).train()
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, report_to="none",
                     use_cpu=True, max_length=256, save_strategy="no")
    trainer = GhostVisSFTTrainer(model=model, args=args, train_dataset=load_shapes("train", num_samples=4, seed=0),
                                 processing_class=processor, model_loss=True)
    model.train()
    batch = _packed_batch(model, 0, 2 * model.config.image_seq_length + 64)
    looked = []
    find = masking.find_packed_sequence_indices
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda p: looked.append(1) or find(p))
    want = eager(**batch, use_cache=False, num_items_in_batch=torch.tensor(40)).loss
    assert looked  # the model's own forward: transformers looks for the packed sequences
    looked.clear()
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(40))
    assert not looked
    loss.backward()
    want.backward()
    _assert_same(loss, model, want, eager, (1e-5, 1e-6))
    reset_kernels(model)


def test_packed_rows_without_masks_are_refused_where_the_attention_needs_them(tiny):
    """The safety net: a packed batch with no masks on an attention path that cannot read `cu_seq_lens` (here the
    CPU, which takes transformers' SDPA) is refused, not attended across its sequences."""
    from ghostvis_hf.kernels import apply_kernels, reset_kernels
    from ghostvis_hf.training.graph_step import no_mask_mapping

    model = tiny[0]
    apply_kernels(model, attention="ghostvis_sdpa")
    batch = _packed_batch(model, 0, 2 * model.config.image_seq_length + 64)
    with pytest.raises(ValueError, match="packed batch"):
        model(**batch, attention_mask=no_mask_mapping(model.config), use_cache=False)
    reset_kernels(model)
