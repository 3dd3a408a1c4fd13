"""Kernel swaps == their fallbacks (loss and gradients); memory levers reach both towers.

CPU tests cover the plain-PyTorch paths (chunked fused cross-entropy, checkpointing, the switch). GPU tests
(`-m gpu`, skipped without CUDA) compare every fast kernel with its fallback at bf16-appropriate tolerances.
"""

import copy
import sys

import pytest
import torch

import ghostvis_hf
from conftest import reference_varlen
from ghostvis_hf import kernels
from ghostvis_hf.kernels import ACTIVE, apply_kernels, enable_gradient_checkpointing, forced, reset_kernels

pytestmark = pytest.mark.usefixtures("one_thread")

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
gpu = [pytest.mark.gpu, cuda]


def _batch(model, b=2, t=40, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 900, (b, t), generator=g)
    labels = ids.clone()
    labels[0, : t // 4] = -100  # a prompt
    return ids.to(device), labels.to(device)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _close(a, b, tol):
    """assert_close with an absolute tolerance scaled to the reference's magnitude (bf16 grads have no fixed scale)."""
    a, b = a.float(), b.float()
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(b.abs().max().item(), 1e-12))


def _loss_and_grads(model, ids, labels, autocast=False, **kwargs):
    model.zero_grad(set_to_none=True)
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=ids, labels=labels, **kwargs)
    out.loss.backward()
    return out, _grads(model)


# ---------------------------------------------------------------- CPU: fallbacks and the switch


def test_import_never_loads_liger_or_triton_on_cpu(tiny):
    model, _ = tiny
    if torch.cuda.is_available():
        pytest.skip("CPU-only property")
    apply_kernels(model.train())
    assert "liger_kernel" not in sys.modules
    assert ACTIVE["rms_norm"] == ACTIVE["swiglu"] == ACTIVE["rope"] == "torch"
    assert ACTIVE["fused_ce"] == "torch"


def test_force_fast_raises_without_kernels(tiny):
    if kernels.liger_available():
        pytest.skip("liger is available here")
    with forced("fast"), pytest.raises(RuntimeError, match="not available"):
        apply_kernels(tiny[0])


@pytest.mark.parametrize("num_items", [None, 37])
def test_chunked_fused_ce_matches_stock_loss_and_grads(tiny, num_items):
    model, _ = tiny
    model.train()
    fused = copy.deepcopy(model)
    with forced("fallback"):
        active = apply_kernels(fused, attention=None)
    assert active["fused_ce"] == "torch"
    fused.linear_cross_entropy.chunk_size = 16  # several chunks
    ids, labels = _batch(model)
    # an int arrives as the Trainer's device tensor, a float as a plain Python number
    kw = {} if num_items is None else {"num_items_in_batch": num_items if isinstance(num_items, float)
                                       else torch.tensor(num_items)}
    ref, g_ref = _loss_and_grads(model, ids, labels, **kw)
    out, g = _loss_and_grads(fused, ids, labels, **kw)
    assert out.logits is None and ref.logits is not None
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert g.keys() == g_ref.keys()
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fused_ce_all_ignored_batch_backprops(tiny):
    model, _ = tiny
    apply_kernels(model.train(), attention=None)
    ids, labels = _batch(model)
    out = model(input_ids=ids, labels=torch.full_like(labels, -100))
    out.loss.backward()
    assert out.loss.item() == 0.0


def test_eval_forward_keeps_logits(tiny):
    model, _ = tiny
    apply_kernels(model, attention=None)
    ids, labels = _batch(model)
    out = model.eval()(input_ids=ids, labels=labels)
    assert out.logits is not None and out.logits.shape[:2] == ids.shape


def test_trl_fused_lm_head_still_works_after_apply_kernels(tiny):
    trl_utils = pytest.importorskip("trl.trainer.utils")
    model, _ = tiny
    model.train()
    ids, labels = _batch(model)
    ref = model(input_ids=ids, labels=labels).loss
    apply_kernels(model, attention=None)
    trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    out = model(input_ids=ids, labels=labels, fused_lm_head=True, use_cache=False)
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    own = model(input_ids=ids, labels=labels)  # the model's own (fused) loss path is unchanged
    torch.testing.assert_close(own.loss, ref, rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_reaches_both_towers_and_keeps_grads(tiny):
    model, processor = tiny
    model.train()
    ckpt = copy.deepcopy(model)
    counts = enable_gradient_checkpointing(ckpt)
    assert counts["vision"] == model.config.vision_config.num_hidden_layers
    assert counts["text"] == model.config.text_config.num_hidden_layers
    pixel_values = torch.randn(2, 3, 32, 32)
    n = model.config.image_seq_length
    ids, labels = _batch(model, t=n + 10)
    ids[:, 2 : 2 + n] = model.config.image_token_id
    _, g_ref = _loss_and_grads(model, ids, labels, pixel_values=pixel_values)
    _, g = _loss_and_grads(ckpt, ids, labels, pixel_values=pixel_values)
    assert any("vision_tower" in k for k in g)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_gradient_checkpointing_one_tower_only(tiny):
    counts = enable_gradient_checkpointing(tiny[0], vision=False, every_n_layers=2)
    assert counts == {"vision": 0, "text": 1}


def test_lora_on_frozen_vision_tower_gets_grads_with_reentrant_checkpointing(tiny):
    peft = pytest.importorskip("peft")
    model, _ = tiny
    config = peft.LoraConfig(r=4, target_modules=r".*vision_tower.*\.(q_proj|v_proj)|.*language_model.*\.q_proj")
    lora = peft.get_peft_model(model.train(), config)
    enable_gradient_checkpointing(lora, use_reentrant=True)
    n = model.config.image_seq_length
    ids, labels = _batch(model, t=n + 10)
    ids[:, 2 : 2 + n] = model.config.image_token_id
    lora(input_ids=ids, labels=labels, pixel_values=torch.randn(2, 3, 32, 32)).loss.backward()
    # lora_B starts at zero, so lora_A's first gradient is zero too: lora_B's must not be
    vision_lora = [p for name, p in lora.named_parameters() if "vision_tower" in name and "lora_B" in name]
    assert vision_lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in vision_lora)


def test_cast_frozen_params_keeps_trainable_fp32(tiny):
    model, _ = tiny
    model.model.vision_tower.requires_grad_(False)
    saved = kernels.cast_frozen_params(model)
    assert saved > 0
    assert model.model.vision_tower.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    assert model.model.vision_tower.post_layernorm.weight.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.float32


# ---------------------------------------------------------------- GPU: fast kernel == fallback


def _gpu_model(seed=0):
    """Small but kernel-shaped: head_dim 128 (cuDNN/varlen), GQA 2:1, a 4k vocabulary."""
    torch.manual_seed(seed)
    model, processor = ghostvis_hf.create(
        "tiny",
        device="cuda",
        text_config=dict(hidden_size=512, num_attention_heads=4, num_key_value_heads=2, intermediate_size=1024,
                         vocab_size=4096, num_hidden_layers=2, max_position_embeddings=4096),
    )
    return model.train(), processor


@pytest.fixture
def gpu_pair():
    reset_kernels()
    model, processor = _gpu_model()
    yield model, copy.deepcopy(model), processor
    reset_kernels()


@pytest.mark.parametrize("swap", ["rms_norm", "swiglu", "rope", "fused_ce"])
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.gpu
@cuda
def test_gpu_each_swap_matches_fallback(gpu_pair, swap, autocast):
    stock, fast, _ = gpu_pair
    ids, labels = _batch(stock, b=2, t=512, device="cuda")
    ref, g_ref = _loss_and_grads(stock, ids, labels, autocast=autocast)
    flags = {k: k == swap for k in ("rms_norm", "swiglu", "rope", "fused_ce")}
    active = apply_kernels(fast, attention=None, **flags)
    assert active[swap] == "liger"
    out, g = _loss_and_grads(fast, ids, labels, autocast=autocast)
    tol = 2e-2 if autocast else 1e-4
    _close(out.loss, ref.loss, tol)
    for name in g_ref:
        _close(g[name], g_ref[name], 5e-2 if autocast else 1e-3)


@pytest.mark.gpu
@cuda
def test_gpu_cudnn_attention_matches_sdpa(gpu_pair):
    stock, fast, _ = gpu_pair
    ids, labels = _batch(stock, b=2, t=512, device="cuda")
    ref, g_ref = _loss_and_grads(stock, ids, labels, autocast=True)
    before = kernels.attention.CALLS["sdpa_cudnn_first"]
    assert apply_kernels(fast, rms_norm=False, swiglu=False, rope=False, fused_ce=False)["attention"] == "ghostvis_sdpa"
    out, g = _loss_and_grads(fast, ids, labels, autocast=True)
    assert kernels.attention.CALLS["sdpa_cudnn_first"] > before
    _close(out.logits, ref.logits, 3e-2)
    for name in g_ref:
        _close(g[name], g_ref[name], 5e-2)


@pytest.mark.gpu
@cuda
def test_gpu_all_swaps_match_stock(gpu_pair):
    stock, fast, _ = gpu_pair
    ids, labels = _batch(stock, b=2, t=1024, device="cuda")
    ref, g_ref = _loss_and_grads(stock, ids, labels, autocast=True)
    active = apply_kernels(fast)
    assert active["fused_ce"] == "liger" and active["attention"] in ("ghostvis_sdpa", "flash_attention_2")
    out, g = _loss_and_grads(fast, ids, labels, autocast=True)
    _close(out.loss, ref.loss, 2e-2)
    for name in g_ref:
        _close(g[name], g_ref[name], 5e-2)


@pytest.mark.gpu
@cuda
def test_gpu_varlen_packed_matches_unpacked(gpu_pair):
    from ghostvis_hf.training.packing import pack_samples

    stock, fast, processor = gpu_pair
    apply_kernels(fast, rms_norm=False, swiglu=False, rope=False, fused_ce=False)
    g = torch.Generator().manual_seed(1)
    samples = [{"input_ids": torch.randint(10, 900, (n,), generator=g)} for n in (300, 129, 500, 64)]
    for s in samples:
        s["labels"] = s["input_ids"].clone()
    batch = pack_samples(samples, max_length=1024, pad_token_id=processor.tokenizer.pad_token_id)
    before = kernels.attention.CALLS["varlen"]
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        inputs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()
                  if k not in ("labels", "num_real_tokens", "num_slots")}
        packed = fast(**inputs, use_cache=False).logits  # [rows, L, V]
        assert kernels.attention.CALLS["varlen"] > before
        flat = packed.reshape(-1, packed.shape[-1])
        starts = batch["cu_seq_lens_q"].tolist()
        lengths = [len(s["input_ids"]) for s in samples]
        seen = 0
        for a, b in zip(starts[:-1], starts[1:]):
            if b - a not in lengths:
                continue  # padding segment
            i = lengths.index(b - a)
            ref = stock(input_ids=samples[i]["input_ids"][None].cuda(), use_cache=False).logits[0]
            _close(flat[a:b], ref, 3e-2)
            seen += 1
    assert seen == len(samples)


# ---------------------------------------------------------------- CPU: the attention plumbing, with a reference varlen


def test_attention_fast_paths_plumbing_on_cpu(tiny, monkeypatch):
    """The dense (cuDNN-first SDPA) and packed (varlen) paths give the stock SDPA logits; CPU stands in for CUDA."""
    from ghostvis_hf.kernels import _compat, attention
    from ghostvis_hf.training.packing import pack_samples

    model, processor = tiny
    g = torch.Generator().manual_seed(0)
    samples = [{"input_ids": torch.randint(10, 900, (n,), generator=g)} for n in (30, 17, 50)]
    for s in samples:
        s["labels"] = s["input_ids"].clone()
    batch = pack_samples(samples, max_length=64, pad_token_id=processor.tokenizer.pad_token_id)
    inputs = {k: batch[k] for k in ("input_ids", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k",
                                    "max_length_q", "max_length_k")}
    dense_ids = samples[2]["input_ids"][None]
    with torch.no_grad():
        ref_packed = model(**inputs, use_cache=False).logits
        ref_dense = model(input_ids=dense_ids, use_cache=False).logits
        monkeypatch.setattr(attention, "FAST_DEVICES", {"cuda", "cpu"})
        monkeypatch.setattr(_compat, "varlen_attn_fn", lambda: reference_varlen)
        assert apply_kernels(model, attention="ghostvis_sdpa")["attention"] == "ghostvis_sdpa"
        calls = dict(attention.CALLS)
        packed = model(**inputs, use_cache=False).logits
        assert attention.CALLS["varlen"] == calls["varlen"] + model.config.text_config.num_hidden_layers
        dense = model(input_ids=dense_ids, use_cache=False).logits
        assert attention.CALLS["sdpa_cudnn_first"] > calls["sdpa_cudnn_first"]
    torch.testing.assert_close(packed, ref_packed, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dense, ref_dense, rtol=1e-4, atol=1e-5)
    reset_kernels(model)


def test_a_model_still_on_the_cpu_gets_the_kernels_of_the_device_it_will_run_on(tiny, monkeypatch):
    """The recipes swap kernels before the trainer moves the model to the GPU: `device="cuda"` decides, not where the
    parameters are now (else every recipe trained with the plain-PyTorch fallbacks)."""
    from ghostvis_hf.kernels import liger as _liger

    model = copy.deepcopy(tiny[0])
    patched = []
    monkeypatch.setattr(kernels, "liger_available", lambda: True)
    for name in ("patch_rms_norm", "patch_swiglu", "patch_rope"):
        monkeypatch.setattr(_liger, name, lambda m, _n=name, **kw: patched.append(_n))
    try:
        assert apply_kernels(model, fused_ce=False, attention=None)["rms_norm"] == "torch"  # on the CPU: fallbacks
        assert patched == []
        active = apply_kernels(model, fused_ce=False, attention=None, device="cuda")
        assert active["rms_norm"] == active["swiglu"] == active["rope"] == "liger"
        assert patched == ["patch_rms_norm", "patch_swiglu", "patch_rope"]
    finally:
        ACTIVE.clear()


@pytest.mark.parametrize("num_items", [None, 37, 37.0])
def test_static_fused_ce_equals_the_selecting_one_without_syncs(tiny, num_items):
    """`LinearCrossEntropy(static=True)` (what a CUDA-graph capture runs): every position, the ignored ones weighted
    0, the scale on the device; the same loss and gradients as the default path, which selects the scored rows."""
    from ghostvis_hf.kernels.cross_entropy import LinearCrossEntropy

    model, _ = tiny
    model.train()
    with forced("fallback"):
        apply_kernels(model, attention=None)
    ids, labels = _batch(model)
    labels[:, : labels.shape[1] // 2] = -100  # a prompt half, not scored
    # an int arrives as the Trainer's device tensor, a float as a plain Python number
    kw = {} if num_items is None else {"num_items_in_batch": num_items if isinstance(num_items, float)
                                       else torch.tensor(num_items)}
    model.linear_cross_entropy = LinearCrossEntropy("torch", chunk_size=16)
    ref, g_ref = _loss_and_grads(model, ids, labels, **kw)
    model.linear_cross_entropy = LinearCrossEntropy("torch", chunk_size=16, static=True)
    out, g = _loss_and_grads(model, ids, labels, **kw)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-4, atol=1e-6, msg=name)
    all_ignored = model(input_ids=ids, labels=torch.full_like(labels, -100))
    all_ignored.loss.backward()
    assert all_ignored.loss.item() == 0.0
