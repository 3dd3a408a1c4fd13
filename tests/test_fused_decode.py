"""FusedDecoder and its Triton kernels against the `transformers` modules they replace.

The kernel tests run on CUDA, or in Triton's interpreter (`TRITON_INTERPRET=1`, which must be set before Triton is
imported): on a CPU machine `test_in_triton_interpreter` runs this file again in a subprocess with it set.
"""

import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")
os.environ.setdefault("GHOSTVIS_AUTOTUNE", "0")  # one kernel config each: every autotuned config is a compilation

from ghostvis_hf.inference.triton_decode import interpreting  # noqa: E402

RUNS = torch.cuda.is_available() or interpreting()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernels = pytest.mark.skipif(not RUNS, reason="needs CUDA or TRITON_INTERPRET=1 (see test_in_triton_interpreter)")
# Triton's interpreter truncates float32 -> bfloat16 conversions (the GPU rounds to nearest): bf16 on CUDA only.
DTYPES = [torch.float32, torch.bfloat16] if torch.cuda.is_available() else [torch.float32]


def rmsnorm_reference(x, weight, eps):  # transformers' Qwen2RMSNorm, step by step
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def close(actual, expected, dtype):
    # Accumulation order differs (Triton vs BLAS): allow a couple of ulps of the output dtype, nothing more.
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(actual, expected, **tol)


# (rows, K): K not a multiple of the block sizes (masking); K = 600 spans several K tiles of one-row kernels too
SHAPES = [(1, 96), (3, 96), (20, 96), (1, 600)]


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k", SHAPES)
def test_linear_norm_bias_residual_swiglu(dtype, m, k):
    from ghostvis_hf.inference.triton_decode import linear

    g = torch.Generator().manual_seed(m + k)
    n = 80

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)

    x, w, b, nw, res = rand(m, k), rand(n, k, scale=0.1), rand(n), rand(k), rand(m, n)
    close(linear(x, w, norm_weight=nw, eps=1e-6, bias=b), F.linear(rmsnorm_reference(x, nw, 1e-6), w, b), dtype)
    close(linear(x, w, residual=res), res + F.linear(x, w), dtype)
    gate_up = rand(2 * n, k, scale=0.1)
    expected = F.silu(F.linear(rmsnorm_reference(x, nw, 1e-5), gate_up[:n])) * F.linear(rmsnorm_reference(x, nw, 1e-5), gate_up[n:])
    close(linear(x, gate_up, norm_weight=nw, eps=1e-5, swiglu=True), expected, dtype)


def quantize_rows(w):
    """Per-row symmetric int8 (the `--quantize int8` format): `(q [N, K] int8, scale [N])`, `w ~ q * scale`."""
    scale = w.float().abs().amax(dim=1).clamp(min=1e-8) / 127
    return (w.float() / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale.to(w.dtype)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k", SHAPES)
def test_int8_linear_matches_dequantized_reference(dtype, m, k):
    """Int8 weight + row scales: every epilogue against `F.linear` on the dequantized weight."""
    from ghostvis_hf.inference.triton_decode import linear

    g = torch.Generator().manual_seed(10 + m + k)
    n = 80

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)

    x, b, nw, res = rand(m, k), rand(n), rand(k), rand(m, n)
    q, s = quantize_rows(rand(n, k, scale=0.1))
    w = (q.float() * s.float()[:, None]).to(DEVICE)  # the dequantized weight, in float32
    assert q.abs().max() == 127 and len(q.unique()) > 100  # really int8 data, full range

    def ref(x, w, b=None):  # float32 reference, rounded to the output dtype once
        return F.linear(x.float(), w, None if b is None else b.float())

    close(linear(x, q, weight_scale=s), ref(x, w).to(dtype), dtype)
    close(linear(x, q, norm_weight=nw, eps=1e-6, bias=b, weight_scale=s),
          ref(rmsnorm_reference(x, nw, 1e-6), w, b).to(dtype), dtype)
    close(linear(x, q, residual=res, weight_scale=s), (res.float() + ref(x, w).to(dtype).float()).to(dtype), dtype)
    q2, s2 = quantize_rows(rand(2 * n, k, scale=0.1))
    w2 = (q2.float() * s2.float()[:, None]).to(DEVICE)
    xn = rmsnorm_reference(x, nw, 1e-5)
    expected = F.silu(ref(xn, w2[:n]).to(dtype)) * ref(xn, w2[n:]).to(dtype)
    close(linear(x, q2, norm_weight=nw, eps=1e-5, swiglu=True, weight_scale=s2), expected, dtype)
    # a float weight with the same values gives the same result: the scale really is applied per row
    close(linear(x, q, weight_scale=s), linear(x, w.to(dtype)), dtype)


@needs_kernels
@pytest.mark.parametrize("split_k", [2, 4, 8])
def test_split_k_product_matches_the_reference_and_leaves_its_counts_zero(split_k):
    """Several rows with the K columns shared by `split_k` programs per output tile (the last to finish adds the
    float32 sums in split order): every epilogue, float and int8, against `F.linear`, identical on a second call and
    to the unsplit kernel's sums; the tile counts are back at zero after each launch (CUDA graph replays rely on it)."""
    from ghostvis_hf.inference import triton_decode as td

    dtype = DTYPES[-1]
    g = torch.Generator().manual_seed(split_k)
    m, k, n = 20, 600, 80  # K = 600: the last split gets a partial K tile (8 splits of 96 columns: the last none)
    config = dict(BLOCK_N=16, BLOCK_K=64 if split_k < 8 else 32, SPLIT_K=split_k, num_warps=4, num_stages=2)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)

    def linear(*args, **kwargs):
        out = td.linear(*args, **kwargs, config=config)
        assert not td._SPLIT_COUNTS[out.device].any()
        return out

    x, w, b, nw, res = rand(m, k), rand(n, k, scale=0.1), rand(n), rand(k), rand(m, n)
    y = linear(x, w, norm_weight=nw, eps=1e-6, bias=b)
    close(y, F.linear(rmsnorm_reference(x, nw, 1e-6), w, b), dtype)
    assert torch.equal(y, linear(x, w, norm_weight=nw, eps=1e-6, bias=b))
    close(y, td.linear(x, w, norm_weight=nw, eps=1e-6, bias=b, config={**config, "SPLIT_K": 1}), dtype)
    close(linear(x, w, residual=res), res + F.linear(x, w), dtype)
    gate_up = rand(2 * n, k, scale=0.1)
    xn = rmsnorm_reference(x, nw, 1e-5)
    close(linear(x, gate_up, norm_weight=nw, eps=1e-5, swiglu=True),
          F.silu(F.linear(xn, gate_up[:n])) * F.linear(xn, gate_up[n:]), dtype)
    q, s = quantize_rows(w)
    close(linear(x, q, weight_scale=s), F.linear(x.float(), (q.float() * s.float()[:, None]).to(DEVICE)).to(dtype),
          dtype)
    with pytest.raises(ValueError, match="SPLIT_K=2 is not for N=20000"):
        td.linear(x, rand(20000, k), config={**config, "SPLIT_K": 2})
    one_row = dict(BLOCK_N=8, BLOCK_K=128, num_warps=4, num_stages=2)  # a config for the one-row kernel is used too
    close(td.linear(x[:1], w, residual=res[:1], config=one_row), res[:1] + F.linear(x[:1], w), dtype)


@needs_kernels
@pytest.mark.parametrize("m", [1, 3])
def test_int8_weights_convert_exactly(m):
    """Every int8 value, -128 included, comes out of the kernels' int8 -> float conversion unchanged."""
    from ghostvis_hf.inference.triton_decode import linear

    q = torch.arange(-128, 128, dtype=torch.int8)[:, None].to(DEVICE)  # [256, 1]: one value per output row
    out = linear(torch.ones(m, 1, device=DEVICE), q, weight_scale=torch.ones(256, device=DEVICE))
    assert torch.equal(out, torch.arange(-128.0, 128.0, device=DEVICE).expand(m, 256))


def test_int8_linear_refuses_missing_or_misshapen_scales():
    from ghostvis_hf.inference.triton_decode import linear

    x, q = torch.randn(2, 16), torch.zeros(8, 16, dtype=torch.int8)
    with pytest.raises(ValueError, match="weight_scale goes with an int8 weight"):
        linear(x, q)
    with pytest.raises(ValueError, match="weight_scale goes with an int8 weight"):
        linear(x, q.float(), weight_scale=torch.ones(8))
    with pytest.raises(ValueError, match=r"weight_scale must be contiguous of shape \(8,\)"):
        linear(x, q, weight_scale=torch.ones(8, 1))


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm_and_swiglu(dtype):
    from ghostvis_hf.inference.triton_decode import rmsnorm, swiglu

    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 200, generator=g).to(dtype).to(DEVICE)
    w = torch.randn(200, generator=g).to(dtype).to(DEVICE)
    close(rmsnorm(x, w, 1e-6), rmsnorm_reference(x, w, 1e-6), dtype)
    gate_up = torch.randn(5, 2 * 1100, generator=g).to(dtype).to(DEVICE)  # more than one block of columns
    close(swiglu(gate_up), F.silu(gate_up[:, :1100]) * gate_up[:, 1100:], dtype)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("splits", [1, 4])
def test_rope_attention_matches_transformers(dtype, splits):
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    from ghostvis_hf.inference.triton_decode import rope_attention

    g = torch.Generator().manual_seed(splits)
    m, h, h_kv, d, max_seq = 4, 6, 2, 32, 150
    positions = torch.tensor([0, 70, 149, 33], device=DEVICE)  # first, multi-block, last column, one block
    k_cache = (torch.randn(5, h_kv, max_seq, d, generator=g)).to(dtype).to(DEVICE)
    v_cache = (torch.randn(5, h_kv, max_seq, d, generator=g)).to(dtype).to(DEVICE)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    qkv = torch.randn(m, (h + 2 * h_kv) * d, generator=g).to(dtype).to(DEVICE)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    angles = torch.arange(max_seq).float()[:, None] * inv_freq[None]
    cos = torch.cat([angles, angles], -1).cos().to(dtype).to(DEVICE)
    sin = torch.cat([angles, angles], -1).sin().to(dtype).to(DEVICE)

    out = rope_attention(qkv, cos, sin, positions, k_cache, v_cache, h, d**-0.5, splits=splits)

    q_ref, k_ref, v_ref = qkv.view(m, h + 2 * h_kv, d).split([h, h_kv, h_kv], dim=1)
    c, s = cos[positions][:, None], sin[positions][:, None]  # [m, 1, d]
    q_ref, k_ref = apply_rotary_pos_emb(q_ref[:, :, None], k_ref[:, :, None], c, s, unsqueeze_dim=1)
    rows = torch.arange(m, device=DEVICE)
    close(k_cache[rows, :, positions], k_ref[:, :, 0], dtype)  # the new token's k and v are in the cache
    assert torch.equal(v_cache[rows, :, positions], v_ref)
    untouched = torch.ones(5, max_seq, dtype=torch.bool, device=DEVICE)
    untouched[rows, positions] = False
    assert torch.equal(k_cache.transpose(1, 2)[untouched], k_before.transpose(1, 2)[untouched])
    assert torch.equal(v_cache.transpose(1, 2)[untouched], v_before.transpose(1, 2)[untouched])
    for i, p in enumerate(positions.tolist()):  # SDPA over columns 0..p of the (updated) cache row
        keys = k_cache[i, :, : p + 1].repeat_interleave(h // h_kv, dim=0)  # [h, p+1, d]
        values = v_cache[i, :, : p + 1].repeat_interleave(h // h_kv, dim=0)
        ref = F.scaled_dot_product_attention(q_ref[i].float(), keys.float(), values.float(), scale=d**-0.5)
        close(out[i].view(h, d), ref[:, 0].to(dtype), dtype)


def test_attention_splits_fill_the_gpu():
    from ghostvis_hf.inference.triton_decode import attention_splits

    assert attention_splits(1, 2, 4096) == 32  # one row: many programs per KV head
    assert attention_splits(32, 2, 4096) == 4
    assert attention_splits(128, 2, 4096) == 1  # enough rows already
    assert attention_splits(1, 2, 32) == 1  # never more splits than column blocks
    assert attention_splits(1, 2, 384) == 16  # 12 blocks of 32 columns: one block (or none) per program
    assert attention_splits(8, 2, 384) == 16


@needs_kernels
def test_engine_fused_greedy_equals_generate():
    """float32: the fused step (prefill by transformers, decode by the kernels) gives stock generate's tokens."""
    import ghostvis_hf
    from ghostvis_hf.inference import GenerationEngine, SamplingParams

    torch.manual_seed(0)
    model, processor = ghostvis_hf.create("tiny", device=DEVICE)
    with torch.no_grad():  # varied, prompt-dependent greedy outputs (see test_inference.tiny_model)
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
    model.eval()
    prompts = [list(range(100, 106)), [111, 112, 113], list(range(120, 160))]
    new = 10
    stock = []
    for p in prompts:
        ids = torch.tensor([p], device=DEVICE)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=new, min_new_tokens=new)
        stock.append(out[0, len(p) :].tolist())
    assert len({tuple(s) for s in stock}) == len(stock), "outputs must differ for the check to mean something"
    engine = GenerationEngine(model, processor, max_batch_size=4, max_seq_len=64, fused=True)
    try:
        assert engine.fused is not None
        params = SamplingParams(temperature=0, max_new_tokens=new, ignore_eos=True)
        got = [r[0].token_ids for r in engine.generate_batch([dict(prompt_ids=p) for p in prompts], params)]
        assert got == stock  # several rows: cuBLAS products between Triton kernels
        assert engine.generate(prompt_ids=prompts[2], params=params)[0].token_ids == stock[2]  # one row: all Triton
        # the model still runs its own forward on the stacked weights (prefill, generate): same tokens again
        with torch.no_grad():
            ids = torch.tensor([prompts[0]], device=DEVICE)
            again = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=new, min_new_tokens=new)[0, len(prompts[0]) :].tolist()
        assert again == stock[0]
    finally:
        engine.close()


def greedy(model, prompt, new):
    ids = torch.tensor([prompt], device=model.device)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                             min_new_tokens=new)
    return out[0, len(prompt) :].tolist()


@needs_kernels
def test_engine_fused_int8_gives_the_int8_models_own_tokens(tmp_path):
    """`--quantize int8` (torchao int8 weight-only): the fused step reads the int8 data and row scales, and gives the
    tokens of the quantized model's own forward (float32), for one row (matrix-vector) and several (tiles)."""
    pytest.importorskip("torchao")
    import ghostvis_hf
    from ghostvis_hf.inference import GenerationEngine, SamplingParams
    from ghostvis_hf.inference.loader import load_model
    from ghostvis_hf.quantization import int8_weight_only

    torch.manual_seed(0)
    model, processor = ghostvis_hf.create("tiny")
    with torch.no_grad():  # varied, prompt-dependent greedy outputs (see test_inference.tiny_model)
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    model, processor = load_model(str(tmp_path), quantize="int8", dtype=torch.float32, device=DEVICE)
    attn = model.model.language_model.layers[0].self_attn
    assert int8_weight_only(attn.k_proj.weight) is not None
    prompts = [list(range(100, 106)), [111, 112, 113], list(range(120, 160))]
    new = 10
    stock = [greedy(model, p, new) for p in prompts]
    assert len({tuple(s) for s in stock}) == len(stock), "outputs must differ for the check to mean something"
    engine = GenerationEngine(model, processor, max_batch_size=4, max_seq_len=64, fused=True)
    try:
        assert engine.fused is not None and engine.fused.int8
        qkv = engine.fused.layers[0]["qkv"]
        assert qkv.dtype == torch.int8 and qkv.data_ptr() == attn.q_proj.weight.qdata.data_ptr()  # shared, not copied
        params = SamplingParams(temperature=0, max_new_tokens=new, ignore_eos=True)
        got = [r[0].token_ids for r in engine.generate_batch([dict(prompt_ids=p) for p in prompts], params)]
        assert got == stock  # several rows: int8 tensor-core tiles
        assert engine.generate(prompt_ids=prompts[2], params=params)[0].token_ids == stock[2]  # one row
        assert greedy(model, prompts[0], new) == stock[0]  # the model's forward on the stacked int8 data
    finally:
        engine.close()


@needs_kernels
def test_stacked_weights_are_shared_not_copied(tiny):
    from ghostvis_hf.inference.fused_decoder import FusedDecoder
    from ghostvis_hf.inference.kv_cache import SlotKVCache

    model, _ = tiny
    model.to(DEVICE)
    lm = model.model.language_model
    before = {n: p.detach().clone() for n, p in lm.named_parameters()}
    cache = SlotKVCache.for_model(lm.config, 2, 32, torch.float32, torch.device(DEVICE))
    first = FusedDecoder(lm, model.get_output_embeddings(), cache)
    second = FusedDecoder(lm, model.get_output_embeddings(), cache)  # a second engine re-uses the stacking
    attn = lm.layers[0].self_attn
    qkv = first.layers[0]["qkv"]
    assert qkv.data_ptr() == attn.q_proj.weight.data_ptr() == second.layers[0]["qkv"].data_ptr()
    assert torch.equal(qkv, torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
    for n, p in lm.named_parameters():
        assert torch.equal(p, before[n]), n
    with torch.no_grad():  # in-place weight updates (load_state_dict) reach the stacked matrix
        attn.k_proj.weight.add_(1.0)
    assert torch.equal(qkv[attn.q_proj.weight.shape[0] :][: attn.k_proj.weight.shape[0]], attn.k_proj.weight)


def test_fused_true_off_cuda_names_the_reason(tiny):
    from ghostvis_hf.inference import GenerationEngine

    if RUNS:
        pytest.skip("kernels can run here")
    with pytest.raises(ValueError, match="fused=True cannot be used"):
        GenerationEngine(*tiny, fused=True)


@pytest.mark.skipif(RUNS, reason="kernels run directly here")
def test_in_triton_interpreter():
    """On a CPU machine: this file's kernel tests, run by Triton's interpreter in a subprocess."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-x", "-k", "not interpreter and not names_the_reason"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    assert proc.returncode == 0, proc.stdout[-3000:]
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) >= 19 and "skipped" not in proc.stdout, proc.stdout[-500:]


def test_checkpoint_saved_after_stacking_reloads_equal(tiny, tmp_path):
    """An engine points the model's q/k/v and gate/up weights at slices of stacked matrices; saving the model
    afterwards must still write every tensor in full."""
    from transformers import AutoModelForImageTextToText

    from ghostvis_hf.inference.fused_decoder import _stack

    model, _ = tiny
    for layer in model.model.language_model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = _stack([attn.q_proj, attn.k_proj, attn.v_proj], "weight")
        _stack([attn.q_proj, attn.k_proj, attn.v_proj], "bias")
        _stack([mlp.gate_proj, mlp.up_proj], "weight")
        assert attn.k_proj.weight.data_ptr() > qkv.data_ptr()  # really a view into the stacked matrix
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path, trust_remote_code=True).state_dict()
    assert reloaded.keys() == expected.keys()
    for key, value in reloaded.items():
        assert torch.equal(value, expected[key]), key
