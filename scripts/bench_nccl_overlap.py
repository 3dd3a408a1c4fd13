"""What NCCL_MAX_CTAS does to a collective and to the compute beside it (issue 17), on this host's GPUs.

Run under torchrun, once per setting (NCCL reads the variable when it makes its communicator):

    torchrun --nproc_per_node 2 scripts/bench_nccl_overlap.py --out nccl_default.json
    NCCL_MAX_CTAS=8 torchrun --nproc_per_node 2 scripts/bench_nccl_overlap.py --out nccl_ctas8.json

Measures, on every rank: all-gather and reduce-scatter alone (bus bandwidth, NCCL's convention), a bf16 matmul loop
alone, and both at once (the collectives on a second stream, as FSDP2 overlaps them): how much slower each gets next
to the other (two loops of ~0.3 s each, started together). Rank 0 writes the JSON.
"""

import argparse
import json
import os
import time

import torch
import torch.distributed as dist


def timed(fn, iters):
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--mib", type=int, default=256, help="size of one rank's shard of the all-gather, MiB (bf16)")
    p.add_argument("--matmul", type=int, default=8192, help="n of the n x n x n bf16 matmul")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    n = args.mib * 2**20 // 2
    shard = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    full = torch.empty(n * world, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(args.matmul, args.matmul, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(args.matmul, args.matmul, device="cuda", dtype=torch.bfloat16)
    comm = torch.cuda.Stream()

    def gather():
        dist.all_gather_into_tensor(full, shard)

    def scatter():
        dist.reduce_scatter_tensor(shard, full)

    def matmul():
        torch.mm(a, b)

    for fn in (gather, scatter, matmul):  # warm-up (the communicator is made at the first collective)
        fn()
    alone = {"all_gather": timed(gather, args.iters), "reduce_scatter": timed(scatter, args.iters)}
    mm_alone = timed(matmul, args.iters * 4)
    # both at once, each loop sized to ~0.3 s alone: the collectives on their own stream, the matmuls on the default one
    k_comm = max(1, round(0.3 / (alone["all_gather"] + alone["reduce_scatter"])))
    k_mm = max(1, round(0.3 / mm_alone))
    c0, c1, m0, m1 = (torch.cuda.Event(enable_timing=True) for _ in range(4))
    torch.cuda.synchronize()
    comm.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(comm):
        c0.record()
        for _ in range(k_comm):
            gather()
            scatter()
        c1.record()
    m0.record()
    for _ in range(k_mm):
        matmul()
    m1.record()
    torch.cuda.synchronize()
    pair_beside = c0.elapsed_time(c1) / 1e3 / k_comm
    mm_beside = m0.elapsed_time(m1) / 1e3 / k_mm
    tflop = 2 * args.matmul**3 / 1e12
    bus = lambda s: (world - 1) / world * n * world * 2 / s / 1e9  # noqa: E731  GB/s, NCCL's bus bandwidth
    result = {
        "NCCL_MAX_CTAS": os.environ.get("NCCL_MAX_CTAS"), "world": world, "device": torch.cuda.get_device_name(),
        "torch": torch.__version__, "nccl": ".".join(map(str, torch.cuda.nccl.version())),
        "shard_mib": args.mib, "matmul_n": args.matmul,
        "all_gather_ms": alone["all_gather"] * 1e3, "all_gather_busbw_gbs": bus(alone["all_gather"]),
        "reduce_scatter_ms": alone["reduce_scatter"] * 1e3, "reduce_scatter_busbw_gbs": bus(alone["reduce_scatter"]),
        "matmul_alone_ms": mm_alone * 1e3, "matmul_alone_tflops": tflop / mm_alone,
        "matmul_beside_collectives_ms": mm_beside * 1e3, "matmul_beside_tflops": tflop / mm_beside,
        "matmul_slowdown_beside_collectives": mm_beside / mm_alone,
        "gather_and_scatter_alone_ms": (alone["all_gather"] + alone["reduce_scatter"]) * 1e3,
        "gather_and_scatter_beside_matmuls_ms": pair_beside * 1e3,
        "collective_slowdown_beside_matmuls": pair_beside / (alone["all_gather"] + alone["reduce_scatter"]),
    }
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(json.dumps(result))
    # NOTE: the first version called destroy_process_group() right here and hung after writing its JSON (2x H200,
    # torch 2.11, NCCL 2.28.9: killed by its 60 s timeout); this barrier first is not yet run on a GPU.
    torch.cuda.synchronize()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
