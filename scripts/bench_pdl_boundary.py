"""What one kernel boundary costs in a chain of dependent kernels, with and without programmatic dependent launch.

A batch-1 decode step is ~170 kernels in a row, each waiting for the one before (generate_notes.md). This times a
chain of 500 trivial dependent kernels (each program loads what the previous kernel stored and stores it + 1) in
one CUDA graph, for 1, 132 and 1056 programs a kernel, launched plainly or with PDL (`launch_pdl` + Triton's
`gdc_launch_dependents` / `gdc_wait`, as `ghostvis_hf/inference/triton_decode.py` launches its kernels), and
reports microseconds per kernel. On an H200 (2026-12-01): 0.78 / 0.50 us (1 program, plain / PDL), 0.99 / 0.68
(132), 1.31 / 1.52 (1056): docs/benchmarks/decode_experiments_2026-12-01.json.

Usage (GPU, Hopper or newer for PDL): python scripts/bench_pdl_boundary.py [--out DIR]
"""

import argparse
import json
import os

import torch
import triton
import triton.language as tl


@triton.jit
def _step(src, dst, PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    pid = tl.program_id(0)
    tl.store(dst + pid, tl.load(src + pid) + 1)


def us_per_kernel(grid: int, pdl: bool, n: int = 500, replays: int = 10) -> float:
    bufs = [torch.zeros(4096, device="cuda") for _ in range(2)]
    launch = dict(PDL=True, launch_pdl=True) if pdl else dict(PDL=False)

    def chain():
        for i in range(n):
            _step[(grid,)](bufs[i % 2], bufs[(i + 1) % 2], **launch)

    chain()  # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chain()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (replays * n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    rows = []
    for grid in (1, 132, 1056):
        for pdl in (False, True):
            rows.append({"grid": grid, "pdl": pdl, "us_per_kernel": us_per_kernel(grid, pdl)})
            print(f"{grid:5d} programs, PDL {pdl!s:5}: {rows[-1]['us_per_kernel']:.2f} us per dependent kernel",
                  flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "pdl_boundary.json"), "w") as f:
        json.dump({"machine": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                   "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
