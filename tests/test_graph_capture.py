"""A whole training forward + backward captured as CUDA graphs (issue 16, `ghostvis bench train --runs
graphed_step_master`): the capture takes no host sync (placeholder check, fused cross-entropy), and replays give the
eager loss and gradients on new inputs of the same shapes."""

import copy

import pytest
import torch


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
    for ce in (LinearCrossEntropy("torch"), LinearCrossEntropy("liger", chunk_size=64, static=True)):
        model.linear_cross_entropy = ce
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, pixel_values=pixels, labels=labels, use_cache=False, **kw).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)


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
