"""The SwiGLU MLP that recomputes its product in the backward (`kernels.mlp`, issue 16's memory): the same outputs
and gradients as the stock MLP, less kept for the backward, and the stock path for LoRA-wrapped projections."""

import copy

import pytest
import torch
from torch import nn

from ghostvis_hf.kernels.liger import unpatch_modules
from ghostvis_hf.kernels.mlp import SwiGLUDownFunction, patch_recompute_mlp

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlps(tiny):
    return [layer.mlp for layer in tiny[0].model.language_model.layers]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_outputs_and_gradients_as_the_stock_mlp(tiny, dtype):
    stock = _mlps(tiny)[0].to(dtype)
    lean = copy.deepcopy(stock)
    patch_recompute_mlp(lean)
    x = torch.randn(3, 7, stock.hidden_size, dtype=dtype, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = stock(x), lean(x2)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    # bf16: the stock MLP rounds silu(gate) to bf16 before the product, this one keeps it fp32 (as Liger does)
    limit = 1e-6 if dtype == torch.float32 else 1e-2

    def close(a, b, what):
        err = ((a.float() - b.float()).norm() / b.float().norm()).item()
        assert err < limit, (what, err)

    close(y2, y, "output")
    close(x2.grad, x.grad, "input gradient")
    for (name, p), p2 in zip(stock.named_parameters(), lean.parameters()):
        close(p2.grad, p.grad, name)


def test_keeps_gate_up_and_weight_not_the_product():
    gate, up = (torch.randn(8, 16, requires_grad=True) for _ in range(2))
    weight = torch.randn(4, 16, requires_grad=True)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        SwiGLUDownFunction.apply(gate, up, weight).sum().backward()
    assert len(kept) == 3 and all(any(k is t for t in (gate, up, weight)) for k in kept)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        kept.clear()
        (torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, weight)).sum().backward()
    assert any(k.shape == (8, 16) and not any(k is t for t in (gate, up)) for k in kept)  # stock keeps a product


def test_lora_wrapped_down_proj_takes_the_stock_path_and_unpatch_restores(tiny):
    peft = pytest.importorskip("peft")
    mlp = _mlps(tiny)[0]
    patch_recompute_mlp(mlp)
    assert mlp._get_name() == "GhostVisRecomputeSwiGLUMLP"

    class Holder(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.mlp = m

    lora = peft.LoraConfig(target_modules=["down_proj"], r=2, init_lora_weights=False)
    wrapped = peft.get_peft_model(Holder(mlp), lora)
    x = torch.randn(2, 5, mlp.hidden_size)
    inner = wrapped.base_model.model.mlp
    want = inner.down_proj(inner.act_fn(inner.gate_proj(x)) * inner.up_proj(x))  # the LoRA delta included
    torch.testing.assert_close(inner(x), want)
    unpatch_modules(tiny[0])
    assert "forward" not in mlp.__dict__


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_liger_kernels_path_on_cuda(tiny):
    pytest.importorskip("liger_kernel")
    from ghostvis_hf.kernels import ACTIVE, apply_kernels

    model = tiny[0].cuda().to(torch.bfloat16).train()
    stock = copy.deepcopy(model)
    apply_kernels(model, swiglu="recompute")
    assert ACTIVE["swiglu"] == "liger+recompute"
    mlp, ref = model.model.language_model.layers[0].mlp, stock.model.language_model.layers[0].mlp
    x = torch.randn(4, 33, ref.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = ref(x), mlp(x2)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    for a, b in ((y2, y), (x2.grad, x.grad), (mlp.gate_proj.weight.grad, ref.gate_proj.weight.grad),
                 (mlp.down_proj.weight.grad, ref.down_proj.weight.grad)):
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 1e-2


def test_fp32_weights_under_bf16_autocast(tiny):
    """Autocast over fp32 weights (the recipes' autocast precision): bf16 products, fp32 weight gradients."""
    stock = _mlps(tiny)[0]
    lean = copy.deepcopy(stock)
    patch_recompute_mlp(lean)
    x = torch.randn(3, 7, stock.hidden_size, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y2 = stock(x), lean(x2)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    assert y2.dtype == y.dtype == torch.bfloat16 and torch.equal(y2, y)
    for p, p2 in zip(stock.parameters(), lean.parameters()):
        assert p2.grad.dtype == torch.float32
        assert ((p2.grad - p.grad).norm() / p.grad.norm()).item() < 1e-2
