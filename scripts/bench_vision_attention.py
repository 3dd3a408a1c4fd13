"""What a new batch size costs each SDPA backend on the vision tower's attention shape (issue 16).

The recipe's token-budget steps carry a varying number of images, so the vision tower's attention sees a new batch
size every few steps. For each backend (cuDNN, flash, memory-efficient) this times, at every batch size in
`--batches` (bf16, non-causal, forward + backward):

- `first_ms`: the first call at that batch size (any per-shape set-up the backend does, e.g. building a graph),
- `steady_ms`: the median of `--repeats` further calls.

GPU only; writes `--out` (JSON) and prints one line per row.

    python scripts/bench_vision_attention.py --out docs/benchmarks/vision_attention.json
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def _call(backend, b, heads, tokens, dim):
    q, k, v = (torch.randn(b, heads, tokens, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with sdpa_kernel([backend]):
        out = F.scaled_dot_product_attention(q, k, v)
    out.sum().backward()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", default="4,9,12,13,14,15,16,17,18,19,20,24")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--tokens", type=int, default=729, help="patches per image (SigLIP-so400m at 384 px: 27 x 27)")
    p.add_argument("--dim", type=int, default=72)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rows = []
    for name, backend in BACKENDS.items():
        for b in [int(x) for x in args.batches.split(",")]:
            try:
                first = _call(backend, b, args.heads, args.tokens, args.dim)
                steady = statistics.median(_call(backend, b, args.heads, args.tokens, args.dim)
                                           for _ in range(args.repeats))
                row = {"backend": name, "batch": b, "first_ms": round(first, 2), "steady_ms": round(steady, 3)}
            except RuntimeError as e:  # a backend that does not take this shape
                row = {"backend": name, "batch": b, "error": str(e).splitlines()[0][:200]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    record = {"benchmark": "vision_attention", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "cudnn": torch.backends.cudnn.version(), "shape": {"heads": args.heads, "tokens": args.tokens,
                                                                "dim": args.dim, "dtype": "bfloat16"},
              "results": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
