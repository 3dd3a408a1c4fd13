"""`ghostvis bench generate`: stock `model.generate` vs `GenerationEngine`, decode throughput and time to first token.

For a preset created with random weights (bf16 on the GPU): batch 1 and 32, a 128-token prompt and 256 new tokens
(end-of-sequence ignored, so every run makes exactly that many), tokens/s end to end (prefill included) and as a %
of the memory-bandwidth roofline = (HBM bandwidth measured with a large device copy) / (bytes of the weights one
decode step reads: decoder + LM head). Then time to first token for a prompt with one image at the vision tower's
resolution (384 px for `1.5b`), for new images and again for a repeated image (vision cache hit). Engine modes:
`fused` (the engine's default on CUDA: Triton kernels, `FusedDecoder`, in CUDA graphs), `graphs` (the `transformers`
decoder forward in CUDA graphs), `eager` (no graphs), `compile` / `compile-tuned` (`torch.compile`d forward in CUDA
graphs). Stock baselines: `generate` (`stock`), the same decoder as a stock Qwen2 model with a static cache, which
`generate` compiles itself on a GPU (`stock-static`: the fast path a transformers user picks), and, with
`--stock-cb`, `transformers`' continuous batching (`generate_batch`, paged cache, its own CUDA graphs) on the same
decoder and weights.

`--quantize int8` then saves the same random weights, loads them back as `ghostvis chat/serve --quantize int8` do
(torchao int8 weight-only, `load_model`) and times the same modes again: rows `<mode>-int8`, whose roofline counts the
int8 weights + their scales (+ the unquantized LM head) a step reads.

    ghostvis bench generate                                                   # on the GPU, writes docs/benchmarks/
    ghostvis bench generate --modes fused --quantize int8                     # bf16 and int8 rows, one run
    ghostvis bench generate --preset tiny --device cpu --new-tokens 16 --out-dir /tmp/b   # CPU smoke test
"""

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback

import torch

from ..arg_types import choice_list, positive_int, positive_int_list
from .common import machine_name, random_image, random_prompts, record_header, run_engine, run_stock, sync

MODES = ("fused", "graphs", "eager", "compile", "compile-tuned")  # the engine modes `--modes` takes


def _parser():
    p = argparse.ArgumentParser(prog="ghostvis bench generate", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="1.5b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-sizes", type=positive_int_list, default=[1, 32])
    p.add_argument("--prompt-len", type=positive_int, default=128)
    p.add_argument("--new-tokens", type=positive_int, default=256)
    p.add_argument("--modes", type=choice_list(*MODES), default=["fused", "graphs", "compile"],
                   help=f"engine modes: {', '.join(MODES)} (compile-tuned: inductor coordinate-descent tuning)")
    p.add_argument("--no-stock", action="store_true", help="skip stock generate (experiments)")
    p.add_argument("--stock-cb", action="store_true",
                   help="also time transformers' continuous batching (generate_batch) on the same decoder")
    p.add_argument("--dtype", help="default: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--quantize", choices=["int8"], help="also time the same weights quantized (rows <mode>-int8)")
    p.add_argument("--check-fp32", action="store_true", help="finally: greedy engine vs generate in float32")
    p.add_argument("--ttft-repeats", type=positive_int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="docs/benchmarks")
    return p


def measure_bandwidth(device, gib: float = 2.0) -> float | None:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read and written (None off CUDA)."""
    if device.type != "cuda":
        return None
    n = int(gib * 2**30) // 2
    src, dst = torch.empty(n, dtype=torch.bfloat16, device=device), torch.empty(n, dtype=torch.bfloat16, device=device)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3
    del src, dst
    return 2 * n * 2 * 10 / seconds


def decode_weight_bytes(model) -> int:
    """Bytes one decode step reads: decoder + LM head parameters (a tied embedding/head counted once; int8 weights
    as their int8 data + scales)."""
    from ghostvis_hf.quantization import tensor_bytes

    params = list(model.model.language_model.parameters()) + list(model.get_output_embeddings().parameters())
    return sum(tensor_bytes(p) for p in {id(p): p for p in params}.values())


def causal_lm(model):
    """The decoder + LM head of `model` as a stock `AutoModelForCausalLM`, sharing its weights (text-only baselines)."""
    from transformers import AutoModelForCausalLM

    config = model.config.text_config
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config)
    lm.model = model.model.language_model
    lm.lm_head = model.get_output_embeddings()
    lm.generation_config = model.generation_config
    return lm.eval()


def run_stock_static(model, prompts, new_tokens, device) -> tuple[float, list[list[int]]]:
    """`transformers`' own fast path for the same decoder (a stock Qwen2 `AutoModelForCausalLM`): a static cache, which
    `generate` compiles automatically (`torch.compile` of the decode step, CUDA graphs) on a GPU. Two untimed calls of
    the full length first (compilation and recompilation), then the timed one."""
    return run_stock(causal_lm(model), prompts, new_tokens, device, warmup_tokens=new_tokens, warmups=2,
                     cache_implementation="static")


def run_stock_cb(model, prompts, new_tokens, device) -> tuple[float, list[list[int]]]:
    """`transformers`' continuous batching (`generate_batch`): one warm-up call that keeps its manager (graphs,
    paged cache), then the timed call."""
    from transformers import GenerationConfig

    lm = causal_lm(model)
    original = lm.config._attn_implementation
    config = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              eos_token_id=None, pad_token_id=0)
    try:
        with torch.no_grad():
            lm.generate_batch(prompts, generation_config=config, persistent_manager=True)
            sync(device)
            t0 = time.perf_counter()
            out = lm.generate_batch(prompts, generation_config=config, persistent_manager=True)
            sync(device)
            seconds = time.perf_counter() - t0
        if hasattr(lm, "destroy_cached_continuous_batching_manager"):
            lm.destroy_cached_continuous_batching_manager()
    finally:  # continuous batching switches the decoder to a paged attention implementation
        if lm.config._attn_implementation != original:
            lm.set_attn_implementation(original)
    ordered = [out[k] for k in sorted(out, key=lambda k: int("".join(c for c in k if c.isdigit()) or 0))]
    tokens = [list(o.generated_tokens) for o in ordered]
    if any(len(t) != new_tokens for t in tokens):
        raise RuntimeError(f"continuous batching made {[len(t) for t in tokens]} tokens, not {new_tokens} each")
    return seconds, tokens


def _match(a: list[list[int]], b: list[list[int]]) -> dict:
    """How far the engine's greedy tokens agree with stock generate's."""
    prefixes = []
    for x, y in zip(a, b):
        n = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
        prefixes.append(n)
    return {"identical_rows": sum(x == y for x, y in zip(a, b)), "rows": len(a),
            "min_common_prefix": min(prefixes), "mean_common_prefix": sum(prefixes) / len(prefixes)}


TTFT_PROMPT = "<|im_start|>user\n<image>Describe this image in detail.<|im_end|>\n<|im_start|>assistant\n"


def ttft_prompt_tokens(model, processor) -> int:
    """Tokens of the time-to-first-token prompt, its image placeholders expanded."""
    size = model.config.vision_config.image_size
    return processor(text=TTFT_PROMPT, images=[random_image(size, 0)], return_tensors="pt")["input_ids"].shape[1]


def run_ttft(engine, model, processor, size: int, repeats: int, device) -> dict:
    """Median seconds from `submit` to the first token: new images, then the last one repeated (cache hit)."""
    from ghostvis_hf.inference import SamplingParams

    params = SamplingParams(temperature=0, max_new_tokens=1)

    def ttft(img):
        t0 = time.perf_counter()
        handle = engine.submit(prompt=TTFT_PROMPT, images=[img], params=params)
        handle.result()
        return handle.first_token_at - t0

    ttft(random_image(size, 1000))  # warm-up: kernels, allocator, graph captures
    ttft(random_image(size, 1000))
    cold = [ttft(random_image(size, 2000 + i)) for i in range(repeats)]
    last = random_image(size, 2000 + repeats - 1)
    warm = [ttft(last) for _ in range(repeats)]
    engine.profile = True  # one more of each with device syncs between stages: where the time goes
    ttft(random_image(size, 4000))
    stages_new = dict(engine.last_admission)
    ttft(random_image(size, 4000))
    stages_repeated = dict(engine.last_admission)
    engine.profile = False
    # Stock reference: processor + generate(max_new_tokens=1) on a new image.
    stock = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        inputs = processor(text=TTFT_PROMPT, images=[random_image(size, 3000 + i)], return_tensors="pt").to(device)
        with torch.no_grad():
            model.generate(**inputs, do_sample=False, max_new_tokens=1)
        sync(device)
        stock.append(time.perf_counter() - t0)
    cold_s, warm_s = statistics.median(cold), statistics.median(warm)
    return {"image_px": size, "engine_new_image_s": cold_s, "engine_repeated_image_s": warm_s,
            "repeated_over_new": warm_s / cold_s, "stock_generate_new_image_s": statistics.median(stock[1:]),
            "stages_new_image": stages_new, "stages_repeated_image": stages_repeated}


def gpu_step_ms(engine, batch: int, length: int, n: int = 50) -> float | None:
    """Device time of one captured decode step (graph replays back to back, no host work in between)."""
    from ghostvis_hf.inference.model_runner import bucket

    key = (bucket(engine.batch_buckets, batch), bucket(engine.seq_buckets, length))
    if not engine.cuda_graphs or key not in engine.runner.decode_graphs:
        return None
    graph = engine.runner.decode_graphs.graphs[key][0]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(n):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def check_fp32(model, processor, device, new_tokens: int = 32, fused: bool = False) -> dict:
    """Greedy engine (CUDA graphs; `fused` decode step or not) vs stock `generate` in float32, 4 prompts of different
    lengths (left-padded)."""
    from ghostvis_hf.inference import GenerationEngine, SamplingParams

    model.float()
    lengths = [128, 100, 77, 50]
    prompts = [p[:n] for p, n in zip(random_prompts(4, 128, 7), lengths)]
    width = max(lengths)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    with torch.no_grad():
        stock = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens)[:, width:].tolist()
    engine = GenerationEngine(model, processor, max_batch_size=4, max_seq_len=width + new_tokens, fused=fused)
    params = SamplingParams(temperature=0, max_new_tokens=new_tokens, ignore_eos=True)
    together = [r[0].token_ids for r in engine.generate_batch([dict(prompt_ids=p) for p in prompts], params)]
    alone = [engine.generate(prompt_ids=p, params=params)[0].token_ids for p in prompts]
    kind = "fused" if fused else "graphs" if engine.cuda_graphs else "eager"
    engine.close()
    return {"dtype": "float32", "new_tokens": new_tokens, "fused": fused, "engine": kind,
            "batch_of_4": _match(together, stock), "one_at_a_time": _match(alone, stock)}


def _error(out: dict, key: str, e: Exception) -> None:
    """Keeps a failed part's error in the record (the other parts' numbers still count) and prints its traceback."""
    out["errors"][key] = "".join(traceback.format_exception_only(type(e), e)).strip()
    traceback.print_exc()


def _save(out: dict, out_dir: str) -> None:
    with open(os.path.join(out_dir, "generate.json"), "w") as f:
        json.dump(out, f, indent=2)
    with open(os.path.join(out_dir, "generate.md"), "w") as f:
        f.write(markdown(out))


def _record(out: dict, args, name: str, batch: int, seconds: float) -> dict:
    """Adds (and saves) one throughput row: tok/s end to end, and as a % of the roofline when there is one (the int8
    roofline for `-int8` rows)."""
    tok_s = batch * args.new_tokens / seconds
    base = out["int8"]["roofline_tok_s_batch1"] if name.endswith("-int8") else out["roofline_tok_s_batch1"]
    roof = base * batch if base else None
    row = {"mode": name, "batch": batch, "seconds": seconds, "tok_s": tok_s,
           "pct_roofline": 100 * tok_s / roof if roof else None}
    out["results"].append(row)
    print(f"{name:>8} batch {batch:>3}: {tok_s:10.1f} tok/s  ({seconds:.2f} s)", flush=True)
    _save(out, args.out_dir)
    return row


def _time_stock(out: dict, args, model, device, batch_sizes, suffix="") -> dict[int, list[list[int]]]:
    """Stock `generate` and its static-cache + compile path (unless `--no-stock`) and, with `--stock-cb`, continuous
    batching; returns `generate`'s greedy tokens per batch size, which the others' are compared with."""
    stock_tokens = {}
    for batch in [] if args.no_stock else batch_sizes:
        prompts = random_prompts(batch, args.prompt_len, args.seed)
        seconds, stock_tokens[batch] = run_stock(model, prompts, args.new_tokens, device)
        _record(out, args, "stock" + suffix, batch, seconds)
    others = []
    if not args.no_stock:
        others.append(("stock-static", run_stock_static))
    if args.stock_cb:
        others.append(("stock-cb", run_stock_cb))
    for name, run in others:
        for batch in batch_sizes:
            try:
                prompts = random_prompts(batch, args.prompt_len, args.seed)
                seconds, tokens = run(model, prompts, args.new_tokens, device)
                row = _record(out, args, name + suffix, batch, seconds)
                if batch in stock_tokens:
                    row["greedy_vs_stock"] = _match(tokens, stock_tokens[batch])
                _save(out, args.out_dir)
            except Exception as e:  # noqa: BLE001 - a failing baseline is a result; the engine rows still run
                _error(out, f"{name}{suffix} batch {batch}", e)
    return stock_tokens


def _time_all(out: dict, args, model, processor, device, batch_sizes, suffix="", engines_first=False) -> None:
    """Stock baselines, then every engine mode of `--modes` (rows named `<mode><suffix>`); with `engines_first` the
    engine rows come first (the int8 pass: its stock rows are the slow eager ones) and are compared with the stock
    tokens once those exist."""
    stock_tokens: dict = {}
    pending: list = []  # (row, batch, tokens) of engine rows timed before the stock ones
    if not engines_first:
        stock_tokens = _time_stock(out, args, model, device, batch_sizes, suffix)
    for mode in args.modes:
        if device.type != "cuda" and mode in ("graphs", "fused"):
            out.setdefault("not_run", {})[mode + suffix] = \
                f"needs a CUDA GPU ({'Triton kernels in CUDA graphs' if mode == 'fused' else 'CUDA graphs'})"
            continue
        try:
            _time_engine(out, args, mode, model, processor, device, batch_sizes, stock_tokens, suffix, pending)
        except Exception as e:  # keep the other modes' numbers
            _error(out, mode + suffix, e)
            _save(out, args.out_dir)
    if engines_first:
        stock_tokens = _time_stock(out, args, model, device, batch_sizes, suffix)
        for row, batch, tokens in pending:
            if batch in stock_tokens:
                row["greedy_vs_stock"] = _match(tokens, stock_tokens[batch])
        _save(out, args.out_dir)


def _time_int8(out: dict, args, path: str, device, dtype, batch_sizes) -> None:
    """The checkpoint at `path` loaded int8 weight-only (`load_model(..., quantize="int8")`, as chat/serve load it)
    and timed like the unquantized one."""
    from ghostvis_hf.inference.loader import load_model

    model, processor = load_model(path, quantize="int8", dtype=dtype, device=device)
    weight_bytes = decode_weight_bytes(model)
    bandwidth = out["bandwidth_bytes_per_s"]
    out["int8"] = {"weight_bytes": weight_bytes, "weight_ratio": weight_bytes / out["weight_bytes"],
                   "roofline_tok_s_batch1": bandwidth / weight_bytes if bandwidth else None}
    print(f"int8: weights read per step {weight_bytes / 1e9:.2f} GB ({out['int8']['weight_ratio']:.2f}x)", flush=True)
    _time_all(out, args, model, processor, device, batch_sizes, suffix="-int8", engines_first=True)


def _time_engine(out: dict, args, mode: str, model, processor, device, batch_sizes, stock_tokens, suffix="",
                 pending: list | None = None) -> None:
    """One engine mode at every batch size; the first mode that works also measures time to first token. Rows
    without stock tokens to compare with yet go to `pending` with their tokens."""
    from ghostvis_hf.inference import GenerationEngine

    def make(max_seq):
        return GenerationEngine(
            model, processor, max_batch_size=max(batch_sizes), max_seq_len=max_seq,
            cuda_graphs=mode != "eager" and device.type == "cuda", fused=mode == "fused",
            compile={"coordinate_descent_tuning": True} if mode == "compile-tuned" else mode == "compile",
            batch_buckets=batch_sizes, seq_buckets=[max_seq],
        )

    max_seq = args.prompt_len + args.new_tokens
    engine = make(max_seq)
    t0 = time.perf_counter()
    engine.warmup(batch_sizes=batch_sizes, seq_lens=[max_seq])
    out.setdefault("warmup_s", {})[mode + suffix] = time.perf_counter() - t0
    if mode == "fused" and device.type == "cuda":  # which kernel configs the autotuner chose (bf16 and int8 so far)
        from ghostvis_hf.inference.triton_decode import tuned_configs

        out.setdefault("kernel_configs", {})[mode + suffix] = tuned_configs()
    for batch in batch_sizes:
        prompts = random_prompts(batch, args.prompt_len, args.seed)
        seconds, tokens = run_engine(engine, prompts, args.new_tokens)
        row = _record(out, args, mode + suffix, batch, seconds)
        if batch in stock_tokens:
            row["greedy_vs_stock"] = _match(tokens, stock_tokens[batch])
        elif pending is not None:
            pending.append((row, batch, tokens))
        if device.type == "cuda":
            row["gpu_ms_per_step"] = gpu_step_ms(engine, batch, max_seq)
        _save(out, args.out_dir)
    # Prefill is eager in every mode, so the first engine that works measures time to first token.
    if "ttft" not in out and "ttft" not in out["errors"]:
        try:
            size = model.config.vision_config.image_size
            need = ttft_prompt_tokens(model, processor) + 1
            if need > max_seq:  # a short benchmark context: the image prompt gets an engine of its own
                engine.close()
                engine = make(need)
            out["ttft"] = {"engine_mode": mode, **run_ttft(engine, model, processor, size, args.ttft_repeats, device)}
            print(f"ttft: {json.dumps(out['ttft'])}", flush=True)
        except Exception as e:
            _error(out, "ttft", e)
        _save(out, args.out_dir)
    engine.close()


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    import transformers

    import ghostvis_hf

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(args.seed)
    batch_sizes = args.batch_sizes
    out = {
        "benchmark": "generate",
        "command": "ghostvis bench generate " + " ".join(sys.argv[2:] if argv is None else argv),
        "machine": machine_name(device),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "ghostvis_hf": ghostvis_hf.__version__},
        "preset": args.preset, "dtype": str(dtype).replace("torch.", ""), "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens, "results": [], "errors": {},
    }
    os.makedirs(args.out_dir, exist_ok=True)

    model, processor = ghostvis_hf.create(args.preset, dtype=dtype, device=device)
    model.eval()
    bandwidth = measure_bandwidth(device)
    weight_bytes = decode_weight_bytes(model)
    out.update(weight_bytes=weight_bytes, bandwidth_bytes_per_s=bandwidth,
               roofline_tok_s_batch1=bandwidth / weight_bytes if bandwidth else None)
    print(f"weights read per step: {weight_bytes / 1e9:.2f} GB; bandwidth: {(bandwidth or 0) / 1e12:.2f} TB/s",
          flush=True)

    _time_all(out, args, model, processor, device, batch_sizes)
    for fused in [False, True] if args.check_fp32 else []:
        if fused and device.type != "cuda":
            out.setdefault("not_run", {})["check_fp32 fused=True"] = "needs a CUDA GPU (Triton kernels)"
            continue
        try:
            out.setdefault("check_fp32", []).append(check_fp32(model, processor, device, fused=fused))
            print(f"fp32 check: {json.dumps(out['check_fp32'][-1])}", flush=True)
        except Exception as e:
            _error(out, f"check_fp32 fused={fused}", e)
    if args.quantize == "int8":  # the same random weights, saved and loaded back int8
        with tempfile.TemporaryDirectory() as tmp:
            model.to(dtype).save_pretrained(tmp)  # (--check-fp32 made it float32)
            processor.save_pretrained(tmp)
            del model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            try:
                _time_int8(out, args, tmp, device, dtype, batch_sizes)
            except Exception as e:
                _error(out, "int8", e)
    _save(out, args.out_dir)
    print(markdown(out))
    return 0


def markdown(out: dict) -> str:
    roof = out.get("roofline_tok_s_batch1")
    lines = record_header(out) + [
        f"- preset `{out['preset']}` ({out['dtype']}, random weights), prompt {out['prompt_len']} tokens, "
        f"{out['new_tokens']} new tokens (EOS ignored), greedy; tok/s = batch x new tokens / wall time incl. prefill",
    ]
    if roof:
        lines.append(f"- roofline: {out['bandwidth_bytes_per_s'] / 1e12:.2f} TB/s measured copy bandwidth / "
                     f"{out['weight_bytes'] / 1e9:.2f} GB of weights per decode step = {roof:.0f} tok/s per sequence")
    int8 = out.get("int8")
    if int8:
        roof8 = f" = {int8['roofline_tok_s_batch1']:.0f} tok/s per sequence" if int8["roofline_tok_s_batch1"] else ""
        lines.append(f"- `-int8` rows: the same weights loaded with `--quantize int8` (torchao int8 weight-only; "
                     f"LM head, vision tower, resampler and projector unquantized): {int8['weight_bytes'] / 1e9:.2f} GB per "
                     f"decode step ({int8['weight_ratio']:.2f}x){roof8}")
    lines += ["", "| mode | batch | tok/s | % of roofline | device ms/step | greedy == stock (rows) |",
              "|---|---:|---:|---:|---:|---|"]
    for r in out["results"]:
        pct = f"{r['pct_roofline']:.1f}" if r.get("pct_roofline") is not None else "n/a"
        step = f"{r['gpu_ms_per_step']:.3f}" if r.get("gpu_ms_per_step") else ""
        m = r.get("greedy_vs_stock")
        match = f"{m['identical_rows']}/{m['rows']} (min common prefix {m['min_common_prefix']})" if m else ""
        lines.append(f"| {r['mode']} | {r['batch']} | {r['tok_s']:.1f} | {pct} | {step} | {match} |")
    speedups = [f"{r['mode'][:-5]} batch {r['batch']} {r['tok_s'] / base['tok_s']:.2f}x" for r in out["results"]
                for base in out["results"] if r["mode"].endswith("-int8") and base["mode"] == r["mode"][:-5]
                and base["batch"] == r["batch"]]
    if speedups:
        lines += ["", "int8 / unquantized tok/s: " + ", ".join(speedups)]
    if "ttft" in out:
        t = out["ttft"]
        lines += ["", f"Time to first token, one {t['image_px']}-px image (engine mode `{t['engine_mode']}`, median):",
                  "", "| | seconds |", "|---|---:|",
                  f"| stock `generate`, new image | {t['stock_generate_new_image_s']:.4f} |",
                  f"| engine, new image | {t['engine_new_image_s']:.4f} |",
                  f"| engine, repeated image (vision cache) | {t['engine_repeated_image_s']:.4f} |",
                  f"| repeated / new | {t['repeated_over_new']:.2f} |"]
    if "ttft" in out:
        stages = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in out["ttft"].get("stages_new_image", {}).items())
        again = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in out["ttft"].get("stages_repeated_image", {}).items())
        lines += ["", f"Admission stages (cumulative, with syncs): new image: {stages}; repeated: {again}"]
    for c in out.get("check_fp32", []):
        kind = c.get("engine", "fused" if c.get("fused") else "graphs")  # records before "engine" ran on CUDA
        lines += ["", f"Greedy check in float32, engine `{kind}` "
                  f"({c['new_tokens']} tokens, prompts of 128/100/77/50 tokens): "
                  f"batched {c['batch_of_4']['identical_rows']}/4 and one at a time "
                  f"{c['one_at_a_time']['identical_rows']}/4 rows identical to stock `generate`"]
    for mode, kernels in out.get("kernel_configs", {}).items():
        chosen = [f"{product} -> " + ", ".join(f"{k} {v}" for k, v in config.items())
                  for configs in kernels.values() for product, config in configs.items()]
        lines += ["", f"Autotuned kernel configs after `{mode}`'s warm-up:", ""] + [f"- {c}" for c in chosen]
    if out.get("warmup_s"):
        lines += ["", "Warm-up (graph capture / compilation): " +
                  ", ".join(f"{k} {v:.1f} s" for k, v in out["warmup_s"].items())]
    if out.get("not_run"):
        lines += ["", "Not run:"] + [f"- {k}: {v}" for k, v in out["not_run"].items()]
    if out.get("errors"):
        lines += ["", "Errors:"] + [f"- {k}: `{v}`" for k, v in out["errors"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
