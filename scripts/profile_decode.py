"""Where a batch-1 decode step of the `1.5b` preset spends its device time (issue 5).

1. Matrix-vector products alone: each decoder projection (and fused q|k|v, gate|up) over 28 distinct weight copies,
   replayed as one CUDA graph, reported as achieved GB/s against the copy bandwidth; the fused products also with
   int8 weights and row scales (`triton_int8`, GB/s of the int8 bytes; the LM head stays bf16 in the engine).
2. A kernel profile (torch.profiler) of the engine's captured decode step (modes: fused, graphs, compile), with
   every row at position 256 of a 384-column cache.

Usage (GPU): python scripts/profile_decode.py [--out DIR] [--batch 1] [--modes fused,graphs] [--no-gemv]
"""

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F


def graph_time_ms(fn, n_inner: int) -> float:
    """Device ms of one `fn()` call, from a CUDA graph of `n_inner` back-to-back calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(n_inner):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (5 * n_inner)


def gemv_table(batch: int, layers: int = 28) -> list[dict]:
    """cuBLAS (`F.linear`) per projection, and the fused Triton `linear` (with its norm/bias/residual/SwiGLU) for
    the products the fused decode step runs."""
    from ghostvis_hf.inference.triton_decode import linear

    d, kv, ff, vocab = 1536, 256, 8960, 151936
    shapes = {"q": (d, d), "k": (kv, d), "v": (kv, d), "qkv fused": (d + 2 * kv, d), "o": (d, d),
              "gate": (ff, d), "up": (ff, d), "gate|up fused": (2 * ff, d), "down": (d, ff), "lm_head": (vocab, d)}
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    norm, res, qkv_bias = torch.ones(d, **bf16), torch.randn(batch, d, **bf16), torch.randn(d + 2 * kv, **bf16)
    fused = {  # the Triton call for each product of the fused step (`s`: the row scales of an int8 weight)
        "qkv fused": lambda x, w, s=None: linear(x, w, norm_weight=norm, bias=qkv_bias, weight_scale=s),
        "o": lambda x, w, s=None: linear(x, w, residual=x, weight_scale=s),
        "gate|up fused": lambda x, w, s=None: linear(x, w, norm_weight=norm, swiglu=True, weight_scale=s),
        "down": lambda x, w, s=None: linear(x, w, residual=res, weight_scale=s),
        "lm_head": lambda x, w: linear(x, w, norm_weight=norm),
    }
    rows = []
    for name, (n_out, n_in) in shapes.items():
        copies = 2 if name == "lm_head" else layers
        weights = [torch.randn(n_out, n_in, **bf16) * 0.02 for _ in range(copies)]
        x = torch.randn(batch, n_in, **bf16)
        gbytes = n_out * n_in * 2 / 1e9
        row = {"op": name, "shape": [n_out, n_in]}
        impls = [("cublas", F.linear, weights, gbytes), ("triton", fused.get(name), weights, gbytes)]
        if name in fused and name != "lm_head":  # per-row int8 (the `--quantize int8` format), half the bytes
            scales = [w.float().abs().amax(dim=1) / 127 for w in weights]
            qs = [(w.float() / s[:, None]).round().to(torch.int8) for w, s in zip(weights, scales)]
            int8 = [(q, s.to(torch.bfloat16)) for q, s in zip(qs, scales)]
            impls.append(("triton_int8", lambda x, q_s, f=fused[name]: f(x, *q_s), int8, gbytes / 2))
        for impl, fn, ws, nbytes in impls:
            if fn is None:
                continue
            i = iter(range(10**9))

            def call(fn=fn, ws=ws):
                return fn(x, ws[next(i) % copies])

            ms = graph_time_ms(call, copies)
            row[f"{impl}_us"], row[f"{impl}_GB_s"] = 1000 * ms, nbytes / (ms / 1000)
        rows.append(row)
        del weights
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--modes", default="fused,graphs")
    parser.add_argument("--no-gemv", action="store_true", help="skip part 1")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    report: dict = {"gemv": [] if args.no_gemv else gemv_table(args.batch)}
    for row in report["gemv"]:
        triton_part = "".join(f"  {impl} {row[impl + '_us']:8.1f} us {row[impl + '_GB_s']:6.0f} GB/s"
                              for impl in ("triton", "triton_int8") if impl + "_us" in row)
        print(f"{row['op']:>14} {str(row['shape']):>16} cublas {row['cublas_us']:8.1f} us {row['cublas_GB_s']:6.0f} GB/s"
              f"{triton_part}", flush=True)
    path = os.path.join(args.out, "profile_decode.json")

    def save():
        with open(path, "w") as f:
            json.dump(report, f, indent=1)

    save()

    import ghostvis_hf
    from ghostvis_hf.bench.generate import gpu_step_ms
    from ghostvis_hf.inference.engine import GenerationEngine
    from torch.profiler import ProfilerActivity, profile

    model, processor = ghostvis_hf.create("1.5b", dtype=torch.bfloat16, device="cuda")
    model.eval()
    for mode in args.modes.split(","):
        engine = GenerationEngine(model, processor, max_batch_size=args.batch, max_seq_len=384,
                                  compile=mode == "compile", batch_buckets=[args.batch], seq_buckets=[384],
                                  fused=mode == "fused")
        t0 = time.perf_counter()
        engine.warmup()
        engine.runner._positions.fill_(256)
        engine.runner._active.zero_()  # replays leave positions where they are
        graph = engine.runner.decode_graphs.graphs[(args.batch, 384)][0]
        warm = time.perf_counter() - t0
        step_ms = gpu_step_ms(engine, args.batch, 384)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                graph.replay()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90)
        print(f"== {mode} batch {args.batch}: {step_ms:.3f} ms per step (warm-up {warm:.1f} s)\n{table}", flush=True)
        report[f"{mode} batch {args.batch}"] = {"step_ms": step_ms, "warmup_s": warm, "kernels": table}
        save()
        engine.close()


if __name__ == "__main__":
    main()
