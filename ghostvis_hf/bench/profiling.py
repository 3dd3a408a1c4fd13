"""Where a training step's GPU time goes, from a `torch.profiler` trace: kernel time by kind, how busy the GPU was,
and how much of the communication (NCCL) was hidden behind compute.

Shared by `ghostvis bench train --profile` and the recipes' `--profile_steps` (`training.profiling`).

Kernels overlap in time when communication runs on its own stream, so the summary measures busy time as the union
of the kernels' intervals: `busy` (any kernel running), `compute` (any non-communication kernel running) and the
communication left `exposed` (running while no compute kernel was): what the second GPU costs a step.
"""

import torch

KINDS = (("communication", ("nccl", "allreduce", "all_reduce", "allgather", "all_gather", "reducescatter",
                            "reduce_scatter", "sendrecv")),
         ("matmul", ("gemm", "nvjet", "cutlass", "cublas", "sm90_xmma", "gemv")),
         ("attention", ("flash", "fmha", "cudnn", "attention", "attn")),
         ("optimizer", ("adam", "multi_tensor", "foreach")),
         ("copy/cast", ("copy", "cast")),
         ("triton (fused)", ("triton",)),
         ("reduction", ("reduce",)),
         ("elementwise", ("elementwise", "vectorized")))


def kernel_kind(name: str) -> str:
    """The kind of a kernel, from its name (`"other"` when no rule matches).

    Example:
    ```python
    >>> kernel_kind("ncclDevKernel_AllReduce_Sum_bf16_RING_LL"), kernel_kind("nvjet_tst_128x256_64x4_2x1_v_bz_TNT")
    ('communication', 'matmul')

    ```
    """
    low = name.lower()
    return next((kind for kind, keys in KINDS if any(k in low for k in keys)), "other")


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of `(start, end)` intervals (same unit in, seconds if given seconds).

    Example:
    ```python
    >>> union_seconds([(0.0, 2.0), (1.0, 3.0), (5.0, 6.0)])
    4.0

    ```
    """
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def python_table(events, steps: int, rows: int = 40) -> str:
    """The `rows` Python functions with the longest inclusive host time per step, from `key_averages()` of a profile
    recorded `with_stack=True` (torch's Python tracer names them `file.py(line): function`; it records every thread,
    so the autograd engine's gradient hooks are there too). A function that calls itself counts its time once per
    level."""
    funcs = [e for e in events if ".py(" in e.key]
    if not funcs:  # seen on an H200 image (Python 3.12, torch 2.11): the tracer recorded no Python function at all
        return ("Python functions: none recorded (torch's Python tracer gave no events in this environment; "
                "with_stack=True did record them with Python 3.11 and torch 2.13)")
    per = max(steps, 1) * 1e3  # the profiler's microseconds -> milliseconds a step
    row = lambda e: (f"{e.cpu_time_total / per:9.1f} | {e.self_cpu_time_total / per:8.1f} | "  # noqa: E731
                     f"{e.count / max(steps, 1):8.1f}  {e.key[:150]}")
    lines = [f"Python functions by inclusive host time (ms a step; {steps} steps): total | self | calls a step"]
    lines += [row(e) for e in sorted(funcs, key=lambda e: -e.cpu_time_total)[:rows]]
    lines += ["Python functions by self host time (outside the functions and ops they call)"]
    lines += [row(e) for e in sorted(funcs, key=lambda e: -e.self_cpu_time_total)[:rows // 2]]
    return "\n".join(lines)


def kernel_summary(prof, steps: int, wall: float, rows: int = 30, python: bool = False) -> str:
    """Text summary of a finished `torch.profiler.profile` over `steps` steps that took `wall` seconds.

    Per step: kernel time by kind; the GPU's busy time (union of kernel intervals), its compute-only busy time, the
    communication not overlapped with compute; then the profiler's own tables of the `rows` ops with the longest
    device time and of the `rows // 2` with the longest host time; with `python` (a profile recorded
    `with_stack=True`) also the Python functions that took the host's time (`python_table`).
    """
    events = prof.key_averages()
    attr = "self_device_time_total" if events and hasattr(events[0], "self_device_time_total") \
        else "self_cuda_time_total"
    spans, kinds = [], {}
    for e in prof.events():  # kernels only: the aten ops and the annotated ranges above them repeat their time
        if e.device_type != torch.autograd.DeviceType.CUDA or e.name.startswith(("Optimizer.", "ProfilerStep")):
            continue
        kind = kernel_kind(e.name)
        start, end = e.time_range.start / 1e6, e.time_range.end / 1e6
        spans.append((start, end, kind))
        kinds[kind] = kinds.get(kind, 0.0) + (end - start)
    busy = union_seconds([(a, b) for a, b, _ in spans])
    compute = union_seconds([(a, b) for a, b, k in spans if k != "communication"])
    total = sum(kinds.values()) or 1.0
    per_step = lambda s: f"{s / max(steps, 1) * 1e3:.1f} ms"  # noqa: E731
    share = ", ".join(f"{k} {per_step(v)} ({v / total:.0%})" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))
    lines = [f"{steps} steps: wall {wall:.3f} s under the profiler ({per_step(wall)} a step)",
             f"GPU busy {per_step(busy)} a step ({busy / wall:.0%} of the wall time), compute kernels "
             f"{per_step(compute)}, communication not overlapped with compute {per_step(busy - compute)}",
             f"kernel time per step, by kind (overlapping kernels both count): {share}"]
    if events:
        lines.append(events.table(sort_by=attr, row_limit=rows))
        # where the host's time goes (a host-bound step: the launcher's hooks, Python between kernels)
        lines.append(events.table(sort_by="self_cpu_time_total", row_limit=rows // 2))
        if python:
            lines.append(python_table(events, steps))
    return "\n".join(lines)
