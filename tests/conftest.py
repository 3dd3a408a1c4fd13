"""Shared fixtures: tiny random GhostVis models, images, and an offline, workspace-local Hugging Face home."""

import os

# Before transformers is imported anywhere: never touch the network, keep caches inside the workspace.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", os.path.join(os.path.dirname(os.path.dirname(__file__)), ".hf_home"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


@pytest.fixture
def tiny():
    """A fresh tiny random (model, processor), seeded."""
    import ghostvis_hf

    torch.manual_seed(0)
    model, processor = ghostvis_hf.create("tiny")
    return model.eval(), processor


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A saved tiny checkpoint folder (weights, processor, code files, card)."""
    import ghostvis_hf
    from ghostvis_hf.hub import save_checkpoint

    torch.manual_seed(0)
    model, processor = ghostvis_hf.create("tiny")
    return save_checkpoint(model, processor, str(tmp_path_factory.mktemp("ckpt") / "ghostvis-tiny"))


def varied_tiny(seed: int = 0):
    """A tiny random (model, processor) whose greedy outputs depend on the prompt. At the default init scale (std
    0.02) the tiny model repeats one token forever, which would make every "same tokens as ..." check vacuous;
    larger weights give varied outputs."""
    import ghostvis_hf

    torch.manual_seed(seed)
    model, processor = ghostvis_hf.create("tiny")
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
    return model.eval(), processor


def make_image(color=(255, 0, 0), size=(40, 30), mode="RGB"):
    return Image.new(mode, size, color)


def png_bytes(size=(40, 30), color=(255, 0, 0)) -> bytes:
    """An RGB PNG file's bytes."""
    import io

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A small PNG whose header claims `width` x `height` pixels (what a decompression bomb looks like)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def user_turn(text, n_images=1):
    return {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}


@pytest.fixture
def one_thread():
    """Tiny CPU models: one intra-op thread is ~40x faster than two on a busy CI machine (thread contention).

    Opt-in: a test module asks for it with `pytestmark = pytest.mark.usefixtures("one_thread")`.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
    """torch.nn.attention.varlen.varlen_attn's contract, segment by segment with SDPA (empty segments included): the
    CPU stand-in for the CUDA kernel."""
    out = torch.empty_like(q)
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        if a == b:
            continue
        qs, ks, vs = (x[a:b].transpose(0, 1)[None] for x in (q, k, v))  # [1, H, s, D]
        o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, scale=scale, is_causal=window_size == (-1, 0),
                                                             enable_gqa=enable_gqa)
        out[a:b] = o[0].transpose(0, 1)
    return out
