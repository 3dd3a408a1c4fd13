"""`ghostvis bench train`: GhostVis training throughput vs stock transformers LLaVA of the same shapes, on one GPU.

Scenario `fixed` (the issue's anchor): batch 4 x 2048 tokens, one image per sample, fp32 master weights + bf16
autocast, fused AdamW for every model. Stock = `LlavaForConditionalGeneration` (SigLIP + MLP projector + the same
Qwen2 decoder, 729 image tokens per image, SDPA, its own loss); GhostVis = the `1.5b` preset with `apply_kernels`.

Scenario `mix`: a variable-length VLM SFT mix (one image per conversation, GhostVis lengths log-normal, clipped to
[100, 2048]; the same conversations are 663 tokens longer for LLaVA). Stock = batches of 4 right-padded to the
longest (what TRL's vision collator does); GhostVis padded the same way, and GhostVis packed (best-fit decreasing
into rows of 2048, 4 rows per step, and the same 4 conversations per step packed padding-free).

FLOPs per step (stated in the output): 6 * N_text * tokens (decoder matmul params + LM head, embeddings excluded)
+ 12 * L * H * D * sum(s^2) over sequences (attention, fwd+bwd, counted without the causal half, PaLM-style)
+ 6 * N_vision * patches + 12 * L_v * d_v * sum(patches^2) per image + 6 * N_glue * patches (resampler/projector,
an upper bound under 1 % of the total). MFU = FLOPs / step time / 989 TFLOP/s (H100 SXM dense bf16).

    ghostvis bench train                                   # on the GPU: both scenarios, writes docs/benchmarks/
    ghostvis bench train --preset tiny --device cpu --steps 2 --seq 128 --out-dir /tmp/b   # CPU smoke test
"""

import argparse
import gc
import json
import math
import os
import platform
import sys
import time
from types import SimpleNamespace

import torch

from ..arg_types import non_negative_int, positive_int
from .train_scenarios import build_stock, fixed_batches, mix_runs, step_flops


PEAK_FLOPS = {"h100": 989e12, "h200": 989e12}  # dense bf16, SXM


RUNS = ["stock", "swaps", "master", "mix_padded", "mix_packed_b", "mix_packed_rows", "ckpt", "ckpt2", "nokernels"]
COMPILE_RUNS = ["compile", "compile_master", "compile_all_master", "graphs_master", "compile_ckpt2", "compile_liger"]
# by name only (--runs), each with bf16 params + fp32 master weights: without autocast, the memory-lean settings (the
# MLP that recomputes its product, compact fp32 masters), and the whole forward + backward as CUDA graphs
NAMED_RUNS = ["master_noautocast", "master_lean", "graphed_step_master", "graphed_step_master_lean",
              "graphed_step_master_compiled", "graphed_step_master_compiled_lean"]


def _parser():
    p = argparse.ArgumentParser(prog="ghostvis bench train", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="1.5b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=positive_int, default=4)
    p.add_argument("--seq", type=positive_int, default=2048)
    p.add_argument("--steps", type=positive_int, default=8, help="timed steps per run")
    p.add_argument("--warmup", type=non_negative_int, default=3)
    p.add_argument("--scenarios", default="fixed,mix")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd decoder layers")
    p.add_argument("--runs", default=None, help="comma list of runs (default: RUNS, + COMPILE_RUNS with --compile; "
                                                "NAMED_RUNS only by name)")
    p.add_argument("--profile", nargs="?", const="swaps", default=None, metavar="RUN",
                   help="write a kernel profile of a few steps of this fixed-scenario run (default: swaps) to "
                        "train_profile_<RUN>.txt")
    p.add_argument("--mix-median", type=float, default=450.0, help="median GhostVis length of the mix (tokens)")
    p.add_argument("--mix-sigma", type=float, default=0.8)
    p.add_argument("--activation-memory-budget", type=float, default=None, metavar="B",
                   help="for the compiled runs: torch._functorch.config.activation_memory_budget (1.0 = PyTorch's "
                        "default; lower recomputes more of the forward in the backward to keep B of the activations)")
    p.add_argument("--graph-ce-chunk", type=positive_int, default=1024, metavar="TOKENS",
                   help="tokens per chunk of the graph runs' sync-free fused cross-entropy (larger: fewer passes "
                        "over the fp32 head gradient, one larger chunk of bf16 logits at the memory peak)")
    p.add_argument("--gc-every-steps", type=non_negative_int, default=50, metavar="N",
                   help="as the recipes' --gc_every_steps: Python's automatic garbage collection off during a run, "
                        "a young-generation collection every N steps (0: automatic collection)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="docs/benchmarks")
    return p


# ---------------------------------------------------------------- timing


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _run(model, opt, batches, args, kind, n_patches, name, scenario, setup=None, autocast=True):
    """Warm-up then timed optimizer steps; returns a result row. `setup()` runs first, inside the run's memory
    accounting; if it returns a callable `loss_of(inputs)`, that replaces the model's forward. `autocast=False` runs
    it without bf16 autocast (bf16 parameters).

    Peak memory is PyTorch's peak of allocated memory, except for CUDA-graph runs (`loss_of.graphed`): a graph's
    private memory pool stays reserved between replays without counting as allocated, so their rows report the peak
    of reserved memory instead (which also counts the allocator's cached free blocks: an upper bound)."""
    device = args.device
    on_cuda = device.startswith("cuda")
    autocast = autocast and on_cuda
    gc.collect()
    if on_cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times, real, slots, convs, flops, failed, loss_of = [], 0, 0, 0, 0.0, None, None
    collector = None
    if getattr(args, "gc_every_steps", 0):  # the recipes' GarbageCollectionCallback (--gc_every_steps)
        from ghostvis_hf.training.garbage_collection import GarbageCollectionCallback

        collector = GarbageCollectionCallback(args.gc_every_steps)
        collector.on_train_begin(None, None, None)
    try:
        loss_of = setup() if setup is not None else None
        if not callable(loss_of):
            def loss_of(inputs):
                return model(**inputs, use_cache=False).loss
        for i, batch in enumerate(batches):
            meta = {k: batch[k] for k in ("_real", "_seq", "_convs")}
            inputs = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v)
                      for k, v in batch.items() if not k.startswith("_")}
            _sync(device)
            t0 = time.perf_counter()
            torch.compiler.cudagraph_mark_step_begin()  # a new step for CUDA-graphed (reduce-overhead) regions
            with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=autocast):
                loss = loss_of(inputs)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(device)
            if collector is not None:
                collector.on_step_end(None, SimpleNamespace(global_step=i + 1), None)
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
                real += meta["_real"]
                slots += inputs["input_ids"].numel()
                convs += meta["_convs"]
                flops += step_flops(model, kind, meta["_seq"], meta["_convs"], n_patches)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"loss {loss.item()}")
    except torch.OutOfMemoryError as e:  # report, don't crash the other runs
        failed = f"OOM: {str(e).splitlines()[0]}"
    except Exception as e:  # noqa: BLE001 - a failing run is a result; the next runs still get measured
        import traceback

        traceback.print_exc()
        failed = repr(e)[:300]
    finally:
        opt.zero_grad(set_to_none=True)
        if collector is not None:
            collector.on_train_end(None, None, None)
    total = sum(times)
    reserved = bool(getattr(loss_of, "graphed", False))
    peak = (torch.cuda.max_memory_reserved() if reserved else torch.cuda.max_memory_allocated()) / 2**30 \
        if on_cuda else None
    gpu = torch.cuda.get_device_name().lower() if on_cuda else ""
    peak_flops = next((v for k, v in PEAK_FLOPS.items() if k in gpu), None)
    row = {
        "scenario": scenario, "run": name, "gpus": 1, "steps": len(times), "failed": failed,
        "step_s_median": sorted(times)[len(times) // 2] if times else None,
        "step_s": [round(t, 4) for t in times],  # every timed step: a slow one shows here, and in tok_s (total time)
        "tok_s": slots / total if total else None,  # every position computed, padding included
        "effective_tok_s": real / total if total else None,  # real (non-pad) tokens only
        "conv_s": convs / total if total else None,
        "non_pad_fraction": real / slots if slots else None,
        "tflops": flops / total / 1e12 if total else None,
        "mfu": flops / total / peak_flops if total and peak_flops else None,
        "peak_mem_gib": peak,
        "peak_mem_measure": ("reserved" if reserved else "allocated") if on_cuda else None,
    }
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    return row


def _profile(model, opt, batches, args, path, loss_of=None):
    """Kernel time of a few training steps (torch.profiler): where the step goes, and how busy the GPU is.
    `loss_of(inputs)` replaces the model's forward (a CUDA-graph run's replay)."""
    from torch.profiler import ProfilerActivity, profile

    from .profiling import kernel_summary

    inputs = [{k: (v.to(args.device) if torch.is_tensor(v) else v) for k, v in b.items() if not k.startswith("_")}
              for b in batches]
    on_cuda = args.device.startswith("cuda")
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * on_cuda) as prof:
        _sync(args.device)
        t0 = time.perf_counter()
        for x in inputs:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda):
                loss = loss_of(x) if loss_of is not None else model(**x, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        _sync(args.device)
        wall = time.perf_counter() - t0
    text = kernel_summary(prof, len(inputs), wall)
    with open(path, "w") as f:
        f.write(text)
    print(text[:6000], flush=True)


def _env(args, argv):
    import transformers

    info = {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
        "command": "ghostvis bench train " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    for pkg in ("liger_kernel", "trl", "flash_attn"):
        try:
            from importlib.metadata import version

            info[pkg] = version(pkg.replace("_", "-"))
        except Exception:
            info[pkg] = None
    return info


def _time_stock(results, args, runs, cfg, pixel, pad_id) -> int:
    """Times stock LLaVA on the scenarios asked for, then frees it; returns its image tokens (patches) per image."""
    from ghostvis_hf.kernels import fused_adamw

    scenarios = args.scenarios.split(",")
    stock, n_patches = build_stock(cfg, args.device)
    opt = fused_adamw(stock, lr=1e-5)
    if "fixed" in scenarios and "stock" in runs:
        batches = fixed_batches("stock", cfg, args, n_patches, pixel, pad_id, args.warmup + args.steps)
        results.append(_run(stock, opt, batches, args, "stock", n_patches, "stock LLaVA (SDPA)", "fixed"))
    if "mix" in scenarios and "stock" in runs:
        batches = mix_runs("stock", cfg, args, n_patches, pixel, pad_id)["padded"]
        results.append(_run(stock, opt, batches, args, "stock", n_patches, "stock LLaVA, padded", "mix"))
    results.report["params"]["stock"] = sum(p.numel() for p in stock.parameters())
    del stock, opt
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return n_patches


def _time_ghostvis(results, args, runs, cfg, pixel, pad_id, n_patches) -> None:
    """Times GhostVis: all kernel swaps on both scenarios, then the fixed batch under each other setting in `runs`."""
    import ghostvis_hf
    from ghostvis_hf.kernels import (
        apply_kernels, compile_decoder_layers, enable_gradient_checkpointing, fused_adamw, reset_kernels,
    )

    scenarios = args.scenarios.split(",")
    torch.manual_seed(args.seed)
    gv, _ = ghostvis_hf.create(args.preset, device=args.device)
    gv.train()
    opt = fused_adamw(gv, lr=1e-5)
    fixed = None
    if "fixed" in scenarios:
        fixed = fixed_batches("ghostvis", cfg, args, n_patches, pixel, pad_id, args.warmup + args.steps)
    results.report["kernels_active"] = apply_kernels(gv)
    results.report["params"]["ghostvis"] = sum(p.numel() for p in gv.parameters())
    ckpt_off = getattr(gv, "activation_checkpointing_disable", gv.gradient_checkpointing_disable)

    def fixed_run(key, label, setup=None, autocast=True):
        if fixed and key in runs:
            made = []  # what setup returned: a graph run's loss_of, which the profile replays too

            def run_setup():
                made.append(setup() if setup is not None else None)
                return made[-1]

            results.append(_run(gv, opt, fixed, args, "ghostvis", n_patches, label, "fixed", setup=run_setup,
                                autocast=autocast))
            if key in (args.profile or "").split(",") and not results[-1]["failed"]:
                loss_of = made[-1] if made and callable(made[-1]) else None
                _profile(gv, opt, fixed[: args.warmup], args, os.path.join(args.out_dir, f"train_profile_{key}.txt"),
                         loss_of=loss_of)

    fixed_run("swaps", "GhostVis, all swaps")
    if fixed and {"master", "master_noautocast"} & runs:  # the recipes' GPU default: no per-step casts of weights
        opt = _bf16_master(gv, opt)
        fixed_run("master", "GhostVis, all swaps, bf16 params + fp32 master weights")
        fixed_run("master_noautocast", "GhostVis, all swaps, bf16 params + fp32 master weights, no autocast",
                  autocast=False)
        opt = _fp32_params(gv, opt)
    if fixed and {"master_lean", "graphed_step_master", "graphed_step_master_lean"} & runs:  # before any compile
        if "graphed_step_master" in runs:
            opt = _bf16_master(gv, opt)
            fixed_run("graphed_step_master",
                      "GhostVis, all swaps, forward + backward as CUDA graphs, bf16 + fp32 master",
                      lambda: _graphed_loss(gv, fixed[0], args))
        if {"master_lean", "graphed_step_master_lean"} & runs:  # the memory-lean settings
            opt = _bf16_master(gv, opt, compact=True)
        lean = "GhostVis, all swaps, MLP recomputing its product, bf16 + compact fp32 masters"
        fixed_run("master_lean", lean, lambda: (reset_kernels(gv), apply_kernels(gv, swiglu="recompute")))
        fixed_run("graphed_step_master_lean", f"{lean}, forward + backward as CUDA graphs",
                  lambda: (reset_kernels(gv), apply_kernels(gv, swiglu="recompute"),
                           _graphed_loss(gv, fixed[0], args))[-1])
        reset_kernels(gv)
        apply_kernels(gv)  # all swaps again (the Liger MLP and cross-entropy)
        opt = _fp32_params(gv, opt)
    if "mix" in scenarios:
        labels = {"padded": "GhostVis, all swaps, padded",
                  "packed_b": f"GhostVis, all swaps, packed ({args.batch} conversations/step)",
                  "packed_rows": f"GhostVis, all swaps, packed ({args.batch} rows x {args.seq})"}
        for name, batches in mix_runs("ghostvis", cfg, args, n_patches, pixel, pad_id).items():
            if f"mix_{name}" in runs:
                results.append(_run(gv, opt, batches, args, "ghostvis", n_patches, labels[name], "mix"))
    fixed_run("ckpt", "GhostVis, all swaps + checkpointing (both towers)", lambda: enable_gradient_checkpointing(gv))
    fixed_run("ckpt2", "GhostVis, all swaps + checkpointing every 2nd layer",
              lambda: enable_gradient_checkpointing(gv, every_n_layers=2))
    ckpt_off()
    fixed_run("nokernels", "GhostVis, no swaps (stock path)", lambda: reset_kernels(gv))
    # Compiled decoder layers: Inductor fuses RMSNorm/RoPE/SwiGLU itself, so first without the Liger layer kernels.
    settings = ""  # what the compiled graph runs' labels say beyond the defaults
    if args.activation_memory_budget is not None:  # read by AOTAutograd's partitioner when each layer compiles
        torch._functorch.config.activation_memory_budget = args.activation_memory_budget
        settings = f", activation memory budget {args.activation_memory_budget:g}"
    if args.graph_ce_chunk != 1024:
        settings += f", cross-entropy chunks of {args.graph_ce_chunk}"
    def no_liger():
        reset_kernels(gv)
        apply_kernels(gv, rms_norm=False, swiglu=False, rope=False)

    fixed_run("compile", "GhostVis, compiled layers + fused CE + cuDNN attention",
              lambda: (no_liger(), compile_decoder_layers(gv)))
    if fixed and "compile_master" in runs:  # NOTE: with the Liger layer swaps too, this hit an illegal memory access
        opt = _bf16_master(gv, opt)  # (torch 2.11, liger 0.8.5, H200): the compiled layers do without them
        fixed_run("compile_master", "GhostVis, compiled layers + fused CE + cuDNN attention, bf16 params + fp32 master")
        opt = _fp32_params(gv, opt)
    if fixed and ({"compile_all_master", "graphs_master"} & runs):  # the vision tower's layers compiled too
        opt = _bf16_master(gv, opt)
        fixed_run("compile_all_master", "GhostVis, compiled decoder + vision layers, bf16 params + fp32 master",
                  lambda: (no_liger(), compile_decoder_layers(gv, vision=True)))
        fixed_run("graphs_master", "GhostVis, compiled decoder + vision layers with CUDA graphs, bf16 + fp32 master",
                  lambda: (no_liger(), compile_decoder_layers(gv, vision=True, mode="reduce-overhead")))
        opt = _fp32_params(gv, opt)
    graphed_compiled = "GhostVis, compiled decoder + vision layers, forward + backward as CUDA graphs"
    for key, compact in (("graphed_step_master_compiled", False), ("graphed_step_master_compiled_lean", True)):
        if fixed and key in runs:  # Inductor's fusions inside the whole-step capture
            opt = _bf16_master(gv, opt, compact=compact)
            fixed_run(key, f"{graphed_compiled}, bf16 + {'compact ' if compact else ''}fp32 master{settings}",
                      lambda: (no_liger(), compile_decoder_layers(gv, vision=True),
                               _graphed_loss(gv, fixed[0], args))[-1])
            opt = _fp32_params(gv, opt)
    fixed_run("compile_ckpt2", "GhostVis, compiled layers + fused CE + cuDNN attention + checkpointing every 2nd",
              lambda: enable_gradient_checkpointing(gv, every_n_layers=2))
    ckpt_off()
    fixed_run("compile_liger", "GhostVis, compiled layers + all Liger swaps", lambda: apply_kernels(gv))


class _LossOf(torch.nn.Module):
    """`model(**inputs).loss` as a module of positional tensors, for `torch.cuda.make_graphed_callables`.

    The rows are whole causal sequences (no padding, no packing), so the decoder gets its mask mapping ready-made
    (`training.graph_step.no_mask_mapping`); a `[B, 1, T, T]` mask would take attention off its causal kernels."""

    def __init__(self, model, keys):
        from ghostvis_hf.training.graph_step import no_mask_mapping

        super().__init__()
        self.model, self.keys = model, keys
        self.masks = no_mask_mapping(model.config)

    def forward(self, *tensors):
        return self.model(**dict(zip(self.keys, tensors)), attention_mask=self.masks, use_cache=False).loss


def _graphed_loss(model, batch, args):
    """Captures the model's forward + loss and its backward as two CUDA graphs (`torch.cuda.make_graphed_callables`,
    3 eager warm-up iterations first); returns `loss_of(inputs)` for `_run`. Fixed shapes only: the fixed scenario's
    rows have no padding, so the decoder gets its mask mapping ready-made (`_LossOf`), and the fused cross-entropy
    runs its static (sync-free) path, Liger's kernel where it is installed. The optimizer step stays eager: one
    kernel launch per parameter group."""
    from ghostvis_hf.kernels.cross_entropy import LinearCrossEntropy, liger_row_kernel

    if not args.device.startswith("cuda"):
        raise ValueError("graphed_step_master needs a CUDA device")
    keys = ("input_ids", "pixel_values", "labels")
    model.linear_cross_entropy = LinearCrossEntropy("liger" if liger_row_kernel() else "torch", static=True,
                                                    chunk_size=args.graph_ce_chunk)
    sample = tuple(batch[k].to(args.device) for k in keys)
    with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
        graphed = torch.cuda.make_graphed_callables(_LossOf(model, keys), sample, num_warmup_iters=3)

    def loss_of(inputs):
        return graphed(*(inputs[k] for k in keys))

    loss_of.graphed = True  # for `_run`'s memory accounting
    return loss_of


def _bf16_master(model, opt, compact: bool = False):
    """Drops `opt` and returns the recipes' `MasterWeightOptimizer`: bf16 parameters, fp32 masters + AdamW state
    (`compact`: the masters as 16-bit remainders under the bf16 parameters; CUDA only)."""
    from ghostvis_hf.training.optimizer import MasterWeightOptimizer

    del opt
    gc.collect()
    params = [p for p in model.parameters() if p.requires_grad]
    return MasterWeightOptimizer(params, param_dtype=torch.bfloat16, lr=1e-5, fused=params[0].is_cuda,
                                 compact=compact and params[0].is_cuda)


def _fp32_params(model, opt):
    """Back to fp32 parameters and a plain fused AdamW for the runs after a master-weight run."""
    from ghostvis_hf.kernels import fused_adamw
    from ghostvis_hf.training.optimizer import cast_parameters

    del opt
    gc.collect()
    cast_parameters(model, torch.float32)
    return fused_adamw(model, lr=1e-5)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    import ghostvis_hf

    os.makedirs(args.out_dir, exist_ok=True)
    torch.manual_seed(args.seed)
    env = _env(args, argv)
    print(json.dumps(env), flush=True)
    meta, processor = ghostvis_hf.create(args.preset, device="meta")  # the config only; built for real below
    cfg, pad_id = meta.config, processor.tokenizer.pad_token_id
    del meta
    vc = cfg.vision_config
    pixel = torch.randn(1, 3, vc.image_size, vc.image_size)
    runs = set(args.runs.split(",") if args.runs else RUNS + (COMPILE_RUNS if args.compile else []))
    results = _Results(args.out_dir, env)
    # Stock first: Liger's RoPE swap is process-wide for Qwen2 (see ghostvis_hf.kernels.liger).
    n_patches = _time_stock(results, args, runs, cfg, pixel, pad_id)
    _time_ghostvis(results, args, runs, cfg, pixel, pad_id, n_patches)
    results.report.update(args=vars(args))
    print(results.save())
    return 0


class _Results(list):
    """The result rows; every append rewrites train.json / train.md, so a run cut short still leaves its numbers."""

    def __init__(self, out_dir, env):
        super().__init__()
        self.out_dir = out_dir
        self.report = {"env": env, "params": {}, "kernels_active": None,
                       "flops_formula": __doc__.split("FLOPs per step (stated in the output): ")[1].split("\n\n")[0]}

    def append(self, row):
        super().append(row)
        self.save()

    def save(self):
        self.report["results"] = list(self)
        with open(os.path.join(self.out_dir, "train.json"), "w") as f:
            json.dump(self.report, f, indent=1)
        markdown = _markdown(self.report)
        with open(os.path.join(self.out_dir, "train.md"), "w") as f:
            f.write(markdown)
        return markdown


def _fmt(v, spec):
    return "—" if v is None else format(v, spec)


def _markdown(report) -> str:
    env, rows = report["env"], report["results"]
    lines = [
        "# `ghostvis bench train`", "",
        f"Machine: {env['device']} · torch {env['torch']} (CUDA {env['cuda']}, cuDNN {env['cudnn']}) · transformers "
        f"{env['transformers']} · liger-kernel {env['liger_kernel']} · flash-attn {env['flash_attn']}", "",
        f"Command: `{env['command']}`", "",
        "Parameters: " + ", ".join(f"{k} {v / 1e9:.3f} B" for k, v in report["params"].items())
        + f" · GhostVis kernels: {report['kernels_active']}", "",
        "FLOPs per step: " + " ".join(report["flops_formula"].split()), "",
    ]
    for scenario, title in (("fixed", "Scenario 1: fixed batch"), ("mix", "Scenario 2: variable-length SFT mix")):
        sel = [r for r in rows if r.get("scenario") == scenario]
        if not sel:
            continue
        base = sel[0]
        lines += [f"## {title}", "",
                  "| run | tok/s | effective tok/s | conversations/s | non-pad | MFU | peak GiB "
                  "| vs stock (eff. tok/s) | vs stock (conv/s) | vs stock (memory) | step s (median / max) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sel:
            if r.get("failed") and not r.get("steps"):
                lines.append(f"| {r['run']} | failed: {r['failed']} ||||||||||")
                continue
            if r.get("failed"):
                r = {**r, "run": f"{r['run']} (**{r['failed']}**)"}
            ratio = lambda k: (f"{r[k] / base[k]:.2f}x" if r.get(k) and base.get(k) else "—")  # noqa: E731
            lines.append(
                f"| {r['run']} | {_fmt(r['tok_s'], ',.0f')} | {_fmt(r['effective_tok_s'], ',.0f')} | "
                f"{_fmt(r['conv_s'], '.2f')} | {_fmt(r['non_pad_fraction'], '.1%')} | {_fmt(r['mfu'], '.1%')} | "
                f"{_fmt(r['peak_mem_gib'], '.1f')} | {ratio('effective_tok_s')} | {ratio('conv_s')} | "
                f"{ratio('peak_mem_gib')} | {_fmt(r.get('step_s_median'), '.3f')} / "
                f"{_fmt(max(r['step_s']) if r.get('step_s') else None, '.3f')} |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
