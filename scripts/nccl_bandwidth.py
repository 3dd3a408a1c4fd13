"""Measures the GPUs' collective bandwidth through PyTorch + NCCL, the ceiling of multi-GPU training's gradient and
parameter exchange (issue 17): all-reduce, all-gather and reduce-scatter of bf16 buffers, algorithm and bus bandwidth
as nccl-tests defines them (bus = algorithm x 2(n-1)/n for all-reduce, x (n-1)/n for the others).

    torchrun --nproc_per_node 2 scripts/nccl_bandwidth.py --out docs/benchmarks/nccl_bandwidth.json

Run with `NCCL_DEBUG=INFO` to see which transport NCCL picked (P2P/NVLink, SHM through host memory, ...).
"""

import argparse
import json
import os
import time

import torch
import torch.distributed as dist


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes-mib", default="25,256,1024", help="buffer sizes in MiB (DDP's bucket is 25)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", default=None, help="JSON file (rank 0)")
    args = p.parse_args()
    dist.init_process_group("nccl")
    rank, n = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    rows = []
    for mib in (int(s) for s in args.sizes_mib.split(",")):
        numel = mib * 2**20 // 2  # bf16
        full = torch.ones(numel, dtype=torch.bfloat16, device="cuda")
        shard = torch.empty(numel // n, dtype=torch.bfloat16, device="cuda")
        ops = {"all_reduce": (lambda: dist.all_reduce(full), 2 * (n - 1) / n),
               "all_gather": (lambda: dist.all_gather_into_tensor(full, shard), (n - 1) / n),
               "reduce_scatter": (lambda: dist.reduce_scatter_tensor(shard, full), (n - 1) / n)}
        for name, (op, factor) in ops.items():
            for _ in range(2):  # warm-up: connections and buffers
                op()
            torch.cuda.synchronize()
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(args.iters):
                op()
            torch.cuda.synchronize()
            seconds = (time.perf_counter() - t0) / args.iters
            algbw = mib * 2**20 / seconds / 1e9
            rows.append({"op": name, "size_mib": mib, "ms": round(seconds * 1e3, 3), "algbw_gb_s": round(algbw, 2),
                         "busbw_gb_s": round(algbw * factor, 2)})
            if rank == 0:
                print(json.dumps(rows[-1]), flush=True)
    if rank == 0 and args.out:
        report = {"benchmark": "nccl_bandwidth", "gpus": n, "device": torch.cuda.get_device_name(),
                  "torch": torch.__version__, "nccl": ".".join(map(str, torch.cuda.nccl.version())),
                  "command": "torchrun --nproc_per_node {} scripts/nccl_bandwidth.py".format(n), "results": rows}
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
