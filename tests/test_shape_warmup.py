"""The vision attention warm-up (issue 16): it finds the vision tower's attention, builds cuDNN's graphs for the
image counts of a run on CUDA, and is a no-op where there is nothing to build."""

import time

import pytest
import torch
from transformers import TrainingArguments

from ghostvis_hf.kernels import attention
from ghostvis_hf.training.shape_warmup import VisionAttentionWarmup, _ranges


@pytest.fixture
def model(tiny):
    model, _ = tiny
    return model


def test_finds_the_vision_attention_only_on_the_ghostvis_path(model):
    attention.set_attention(model, "eager")
    assert attention._vision_attention_module(model) is None
    attention.set_attention(model, attention.ATTN_IMPLEMENTATION)
    module = attention._vision_attention_module(model)
    assert module is model.model.vision_tower.encoder.layers[0].self_attn
    assert module.is_causal is False


def test_no_op_off_cuda_and_for_float32(model, tmp_path):
    attention.set_attention(model, attention.ATTN_IMPLEMENTATION)
    assert attention.warm_up_vision_attention(model, [1, 2, 3]) is None  # parameters on the CPU
    assert attention.warm_up_vision_attention(model, [1, 2], dtype=torch.float32) is None
    callback = VisionAttentionWarmup([2, 1, 2])
    assert callback.image_counts == [1, 2]
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    callback.on_train_begin(args, None, None, model=model)
    assert callback.result is None


def test_ranges():
    assert _ranges([1, 2, 3, 7, 9, 10]) == "1-3, 7, 9-10"
    assert _ranges([]) == ""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuDNN attention needs CUDA")
def test_warm_up_builds_the_graphs_a_first_step_would_build(model):
    model = model.to("cuda", torch.bfloat16)
    attention.set_attention(model, attention.ATTN_IMPLEMENTATION)
    result = attention.warm_up_vision_attention(model, [5, 3, 3, 0])
    assert result["image_counts"] == [3, 5] and result["backward"] is True
    size = model.config.vision_config.image_size

    def step(n):
        pixels = torch.randn(n, 3, size, size, device="cuda", dtype=torch.bfloat16)
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.model.vision_tower(pixel_values=pixels).last_hidden_state.float().sum().backward()
        torch.cuda.synchronize()
        return time.perf_counter() - start

    step(3)  # the process's other first-call costs (cuBLAS handles, allocator)
    assert step(5) < 0.05  # a cuDNN graph build takes ~0.1 s or more
    model.model.vision_tower.requires_grad_(False)  # a frozen tower: forward-only graphs
    assert attention.warm_up_vision_attention(model, [4])["backward"] is False
