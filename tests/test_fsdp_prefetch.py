"""`--fsdp_forward_prefetch N` (issue 17): under FSDP2 each unit of a layer stack prefetches the next N units of its
own stack; one CPU process (gloo) shards a small model with `fully_shard`."""

import socket

import pytest
import torch
import torch.distributed as dist


@pytest.fixture
def one_process_group(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class Stacks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(4))
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(2))
        self.head = torch.nn.Linear(8, 2)

    def forward(self, x):
        for m in [*self.blocks, *self.layers]:
            x = torch.tanh(m(x))
        return self.head(x)


def test_each_unit_prefetches_the_next_units_of_its_stack(one_process_group, monkeypatch):
    from torch.distributed.fsdp import FSDPModule, fully_shard

    from ghostvis_hf.training.fsdp_prefetch import fsdp_prefetch_callbacks, set_forward_prefetch

    model = Stacks()
    x = torch.randn(3, 8)
    want = model(x)
    for m in [*model.layers, *model.blocks]:
        fully_shard(m)
    fully_shard(model)
    seen = {}
    real = FSDPModule.set_modules_to_forward_prefetch
    monkeypatch.setattr(FSDPModule, "set_modules_to_forward_prefetch",
                        lambda self, mods: seen.__setitem__(id(self), [id(m) for m in mods]) or real(self, mods))
    assert set_forward_prefetch(model, 2) == 3 + 1
    layers, blocks = [id(m) for m in model.layers], [id(m) for m in model.blocks]
    assert seen == {layers[0]: layers[1:3], layers[1]: layers[2:4], layers[2]: layers[3:], blocks[0]: blocks[1:]}
    torch.testing.assert_close(model(x), want)  # the forward is the same with the prefetches set
    assert set_forward_prefetch(model, 0) == 0 and fsdp_prefetch_callbacks(0) == []
    with pytest.raises(ValueError, match="fsdp_forward_prefetch"):
        fsdp_prefetch_callbacks(-1)
