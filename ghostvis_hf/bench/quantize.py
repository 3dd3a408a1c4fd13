"""`ghostvis bench quantize`: the same checkpoint loaded unquantized, int8 weight-only (torchao) and bitsandbytes
int8 / nf4, side by side.

For a preset saved with random weights, each mode is loaded the way `ghostvis chat/serve --quantize` load it
(`ghostvis_hf.inference.loader.load_model`: vision tower, resampler, projector and `lm_head` unquantized) and
measured: weight memory (`loader.footprint_bytes`), GPU memory allocated after loading and peak while generating,
agreement of its logits with the unquantized model's on one image+text prompt (cosine similarity, top-1 agreement
per position), and batch-1 decode speed of stock `generate` and of `GenerationEngine` (int8 decodes with the fused
kernels in CUDA graphs; bitsandbytes models decode eagerly: their layers are not captured in CUDA graphs).

    ghostvis bench quantize                     # on the GPU, 1.5b preset, writes docs/benchmarks/quantize.{json,md}
    ghostvis bench quantize --preset tiny --device cpu --modes none,int8 --out-dir /tmp/q   # CPU smoke test
"""

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
import traceback

import torch

from ..arg_types import choice_list, positive_int
from ..inference.loader import QUANTIZE_CHOICES
from .common import machine_name, random_image, random_prompts, record_header, run_engine, run_stock


def _parser():
    p = argparse.ArgumentParser(prog="ghostvis bench quantize", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="1.5b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--modes", type=choice_list("none", *QUANTIZE_CHOICES), default=["none", *QUANTIZE_CHOICES],
                   help="comma-separated: none (bf16/fp32), " + ", ".join(QUANTIZE_CHOICES))
    p.add_argument("--prompt-len", type=positive_int, default=128)
    p.add_argument("--new-tokens", type=positive_int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="docs/benchmarks")
    return p


def _image_prompt(model, processor, length: int, seed: int) -> dict:
    """One image + `length` text tokens, as the processor builds them (on the model's device)."""
    size = model.config.vision_config.image_size
    text = "<image>" + processor.tokenizer.decode(random_prompts(1, length, seed)[0])
    batch = processor(text=[text], images=[random_image(size, seed)], return_tensors="pt")
    return {k: v.to(model.device) for k, v in batch.items()}


def _memory(device) -> dict:
    if device.type != "cuda":
        return {}
    return {"allocated_gb": torch.cuda.memory_allocated(device) / 1e9,
            "peak_gb": torch.cuda.max_memory_allocated(device) / 1e9}


def measure(path: str, mode: str, device, args, reference_logits=None) -> tuple[dict, torch.Tensor]:
    from ghostvis_hf.inference import GenerationEngine
    from ghostvis_hf.inference.loader import footprint_bytes, load_model

    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    model, processor = load_model(path, quantize=None if mode == "none" else mode, device=device)
    row = {"mode": mode, "load_s": time.perf_counter() - t0, "footprint_gb": footprint_bytes(model) / 1e9,
           **{f"after_load_{k}": v for k, v in _memory(device).items()}}
    with torch.no_grad():
        logits = model(**_image_prompt(model, processor, args.prompt_len, args.seed)).logits[0].float().cpu()
    if reference_logits is not None:
        row["logits_cosine"] = torch.nn.functional.cosine_similarity(logits, reference_logits, dim=-1).mean().item()
        row["top1_agreement"] = (logits.argmax(-1) == reference_logits.argmax(-1)).float().mean().item()
    prompts = random_prompts(1, args.prompt_len, args.seed)
    seconds, stock_tokens = run_stock(model, prompts, args.new_tokens, device)
    row["stock_tok_s"] = args.new_tokens / seconds
    context = args.prompt_len + max(args.new_tokens, 8)  # run_engine warms up with 8 tokens
    engine = GenerationEngine(model, processor, max_batch_size=1, max_seq_len=context, seq_buckets=[context])
    try:
        seconds, engine_tokens = run_engine(engine, prompts, args.new_tokens)
    finally:
        engine.close()
    row.update(engine_tok_s=args.new_tokens / seconds, engine_cuda_graphs=engine.cuda_graphs,
               engine_greedy_equals_stock=engine_tokens == stock_tokens,
               **{f"generate_{k}": v for k, v in _memory(device).items() if k == "peak_gb"})
    del engine, model
    return row, logits


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    import ghostvis_hf

    device = torch.device(args.device)
    modes = args.modes
    os.makedirs(args.out_dir, exist_ok=True)
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "torchao", "bitsandbytes"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = "not installed"
    out = {"benchmark": "quantize", "machine": machine_name(device), "versions": versions,
           "command": "ghostvis bench quantize " + " ".join(argv if argv is not None else sys.argv[2:]),
           "preset": args.preset, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "results": [],
           "errors": {}}
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(args.seed)  # the random weights too, so a run is repeatable
    with tempfile.TemporaryDirectory() as tmp:
        model, processor = ghostvis_hf.create(args.preset, dtype=dtype, device=device)
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        del model
        print(f"saved random {args.preset} to {tmp}", flush=True)
        reference = None
        for mode in modes:
            try:
                row, logits = measure(tmp, mode, device, args, reference)
                reference = logits if mode == "none" else reference
                out["results"].append(row)
                print(json.dumps(row), flush=True)
            except Exception as e:  # keep the other modes' numbers
                out["errors"][mode] = "".join(traceback.format_exception_only(type(e), e)).strip()
                traceback.print_exc()
    with open(os.path.join(args.out_dir, "quantize.json"), "w") as f:
        json.dump(out, f, indent=1)
    text = markdown(out)
    with open(os.path.join(args.out_dir, "quantize.md"), "w") as f:
        f.write(text)
    print(text)
    return 1 if out["errors"] and not out["results"] else 0


def markdown(out: dict) -> str:
    base = next((r for r in out["results"] if r["mode"] == "none"), None)
    lines = record_header(out) + [
        f"- preset `{out['preset']}` (random weights), loaded with `load_model(path, quantize=...)`; vision tower, "
        "resampler, projector and `lm_head` stay unquantized. Logits compared with the unquantized model on one image + "
        f"{out['prompt_len']} text tokens; decode: batch 1, {out['new_tokens']} new tokens, greedy.", "",
        "| mode | weights GB | vs unquantized | GPU allocated after load GB | peak while generating GB | logits cosine "
        "| top-1 agreement | stock generate tok/s | engine tok/s | engine greedy == generate |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]

    def f(x, fmt):
        return format(x, fmt) if isinstance(x, (int, float)) else "-"

    for r in out["results"]:
        ratio = r["footprint_gb"] / base["footprint_gb"] if base else None
        graphs = " (CUDA graphs)" if r.get("engine_cuda_graphs") else " (eager)"
        lines.append(
            f"| {r['mode']} | {r['footprint_gb']:.2f} | {f(ratio, '.2f')}x | {f(r.get('after_load_allocated_gb'), '.2f')} "
            f"| {f(r.get('generate_peak_gb'), '.2f')} | {f(r.get('logits_cosine'), '.4f')} "
            f"| {f(r.get('top1_agreement'), '.3f')} | {r['stock_tok_s']:.1f} | {r['engine_tok_s']:.1f}{graphs} "
            f"| {r['engine_greedy_equals_stock']} |"
        )
    if out.get("errors"):
        lines += ["", "Errors:"] + [f"- {k}: `{v}`" for k, v in out["errors"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
