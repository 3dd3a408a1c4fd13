"""What the GPU benchmarks share: the machine and version header of a record, random prompts and images, and timed
greedy generation with stock `generate` and with `GenerationEngine`.
"""

import platform
import subprocess
import time

import torch


def sync(device):
    """Waits for the GPU's queued work, so wall-clock timings cover it (no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def _gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown GPU"
    except (OSError, subprocess.TimeoutExpired):
        return "no nvidia-smi"


def machine_name(device) -> str:
    """The GPU's name and driver on CUDA, else the CPU's."""
    return _gpu_name() if device.type == "cuda" else platform.processor() or platform.machine()


def record_header(out: dict) -> list[str]:
    """The first markdown lines of a benchmark record: title, machine, versions, command."""
    return [
        f"# `ghostvis bench {out['benchmark']}`", "",
        f"- machine: {out['machine']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in out["versions"].items()),
        f"- command: `{out['command']}`",
    ]


def random_prompts(batch: int, length: int, seed: int) -> list[list[int]]:
    """`batch` prompts of `length` random token ids, the same for the same seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 1000, (batch, length), generator=g).tolist()  # plain byte-BPE tokens, no specials


def run_stock(model, prompts, new_tokens, device, warmup_tokens=4, warmups=1,
              **generate_kwargs) -> tuple[float, list[list[int]]]:
    """Seconds of one greedy `model.generate` of exactly `new_tokens` per prompt (after `warmups` untimed calls of
    `warmup_tokens`), and the tokens it made; `generate_kwargs` go to every call (e.g. `cache_implementation`)."""
    ids = torch.tensor(prompts, device=device)
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                  min_new_tokens=new_tokens, **generate_kwargs)
    with torch.no_grad():
        for _ in range(warmups):
            model.generate(input_ids=ids, **{**kwargs, "max_new_tokens": warmup_tokens,
                                             "min_new_tokens": warmup_tokens})
        sync(device)
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, **kwargs)
        sync(device)
    return time.perf_counter() - t0, out[:, ids.shape[1] :].tolist()


def run_engine(engine, prompts, new_tokens) -> tuple[float, list[list[int]]]:
    """Seconds of one greedy `engine.generate_batch` of exactly `new_tokens` per prompt (after a warm-up of up to 8
    tokens), and the tokens it made."""
    from ghostvis_hf.inference import SamplingParams

    params = SamplingParams(temperature=0, max_new_tokens=new_tokens, ignore_eos=True)
    warmup = SamplingParams(temperature=0, max_new_tokens=min(8, new_tokens), ignore_eos=True)
    engine.generate_batch([dict(prompt_ids=p) for p in prompts], warmup)
    t0 = time.perf_counter()
    results = engine.generate_batch([dict(prompt_ids=p) for p in prompts], params)
    return time.perf_counter() - t0, [r[0].token_ids for r in results]


def random_image(size: int, seed: int):
    """A `size` x `size` RGB image of uniform noise, the same for the same seed."""
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))
