"""Recipe-level SFT speed (issue 16): stock TRL + LLaVA against `recipes/sft.py`, on the same conversations.

Both sides train on `ghostvis_hf.data.get_dataset("synthetic", limit=--rows, seed=0)` (variable-length multi-turn
conversations, one image each) for `--warmup` + `--steps` optimizer steps, timed over the last `--steps`:

- stock: TRL's `SFTTrainer` + `LlavaForConditionalGeneration` as TRL's `examples/scripts/sft_vlm.py` runs it, with the
  best settings a TRL user has: random weights of the preset's shapes (`bench.train_scenarios.build_stock`; for
  `1.5b` SigLIP-so400m@384 + Qwen2.5-1.5B, all 729 patches as image tokens), bf16 weights and `bf16=True`, SDPA,
  Liger if it imports and runs, activation checkpointing only if out of memory (fallbacks recorded), the batch size of
  `--stock-batch` (4, 8, 16) with the most conversations/s (every size's result recorded), no packing (TRL
  refuses it for images), `max_length=None`, TRL's vision collator. Tokens are counted on the host from each fed
  batch's `attention_mask` (`training.throughput.CountingCollator`); the clock runs between two `on_step_end`s, each
  after a `torch.cuda.synchronize()`. Batches are copied to the GPU without blocking (`accelerator_config`
  `non_blocking`, as GhostVis's GPU configs do; records before 2026-11-30's seventh session ran without it).
- ghostvis: `accelerate launch recipes/sft.py --config recipes/configs/sft_1.5b_bench.yaml` in a subprocess, with
  `--logging_steps` = warm-up so that its speed log (`sft_summary.json` "throughput") leaves the warm-up out.

MFU: `ghostvis bench train`'s FLOP formula on both sides. A side that fails is a failed row, the other still runs;
`--only` keeps the other side's row of an earlier record in `--out`. GPU, then a CPU smoke test:

    PYTHONPATH=/tmp/site python scripts/bench_recipe.py     # both sides, 10 + 40 steps each, to docs/benchmarks/
    python scripts/bench_recipe.py --only ghostvis --recipe-args "--cuda_graphs true"   # the recipe's graphed step
    python scripts/bench_recipe.py --preset tiny --device cpu --rows 24 --warmup 1 --steps 2 --stock-batch 2 \\
        --workers 0 --recipe-args "--max_length 2048 --per_device_train_batch_size 2"
"""

import argparse
import gc
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout: scripts/ is not a package
for _flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_flag, "1")  # everything is built locally; the GPU machine has no network

import torch  # noqa: E402

BENCH_CONFIG = "recipes/configs/sft_1.5b_bench.yaml"
SIDES = ("ghostvis", "stock")
RUNS = {"stock": "stock: TRL SFTTrainer + LlavaForConditionalGeneration",
        "ghostvis": "GhostVis: recipes/sft.py (sft_1.5b_bench.yaml)"}


def _parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=SIDES, default=None, help="run one side (the other's earlier row is kept)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="1.5b", help="GhostVis preset whose shapes both sides use (tiny: CPU tests)")
    p.add_argument("--rows", type=int, default=2000, help="synthetic conversations (seed 0) both sides draw from")
    p.add_argument("--stock-batch", type=lambda t: [int(x) for x in t.split(",")], default=[4, 8, 16],
                   help="stock per_device_train_batch_size (conversations), a comma list: stock runs at each and keeps "
                        "its best conversations/s (the sweep is recorded)")
    p.add_argument("--warmup", type=int, default=10, help="steps before the clock starts (>= 1)")
    p.add_argument("--steps", type=int, default=40, help="timed steps (rounded up to a multiple of --warmup)")
    p.add_argument("--workers", type=int, default=4, help="dataloader_num_workers of both sides")
    p.add_argument("--recipe-args", default="", help="extra recipes/sft.py args, one string (--recipe-args='--x 1')")
    p.add_argument("--recipe-timeout", type=int, default=480, help="seconds the recipe subprocess may take")
    p.add_argument("--out", default="docs/benchmarks", help="folder of train_recipe.json / train_recipe.md")
    return p


# ---------------------------------------------------------------- stock


def _stock_model_and_processor(args):
    """(LLaVA in the training dtype, LlavaProcessor, image tokens per image) for the preset's shapes."""
    import ghostvis_hf
    from ghostvis_hf.bench.train_scenarios import build_stock
    from ghostvis_hf.presets import load_tiny_tokenizer
    from ghostvis_hf.processing_ghostvis import CHAT_TEMPLATE, IMAGE_TOKEN
    from transformers import LlavaProcessor
    from transformers.models.siglip import SiglipImageProcessor

    meta, _ = ghostvis_hf.create(args.preset, device="meta")  # the config only
    vc = meta.config.vision_config
    tokenizer = load_tiny_tokenizer()  # has `<image>` and GhostVis's chat template; ids fit every preset's vocab
    # NOTE: without torchvision transformers falls back to the PIL backend itself (recorded in the settings)
    image_processor = SiglipImageProcessor(size={"height": vc.image_size, "width": vc.image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=vc.patch_size,
                               vision_feature_select_strategy="full", num_additional_image_tokens=0,
                               image_token=IMAGE_TOKEN, chat_template=CHAT_TEMPLATE)
    torch.manual_seed(0)
    model, n_patches = build_stock(meta.config, args.device)
    model.config.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    model.config.pad_token_id = model.config.text_config.pad_token_id = tokenizer.pad_token_id
    model.set_attn_implementation("sdpa")
    if args.device == "cuda":
        model.to(torch.bfloat16)  # sft_vlm's --dtype bfloat16: bf16 weights, no fp32 master copy
    return model, processor, n_patches


def _step_timer(warmup: int, steps: int, device: str):
    """A callback that starts the clock at the end of step `warmup` and stops it at the end of step `warmup + steps`,
    each after a device sync; it also keeps the peak memory of the timed steps and of the whole run."""
    from transformers import TrainerCallback

    cuda = device == "cuda"

    class StepTimer(TrainerCallback):
        t0 = t1 = peak = peak_run = None

        def on_train_begin(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.reset_peak_memory_stats()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step not in (warmup, warmup + steps):
                return
            start = state.global_step == warmup
            if cuda:
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() / 2**30
                self.peak_run = max(self.peak_run or 0.0, peak)
                if start:
                    torch.cuda.reset_peak_memory_stats()  # the timed steps' own peak from here
                else:
                    self.peak = peak
            setattr(self, "t0" if start else "t1", time.perf_counter())

    return StepTimer()


def _counting_trainer_class():
    """`SFTTrainer` that keeps the host-side `batch_stats` of every training batch, in step order (the collator runs
    in the DataLoader workers, so the counts ride in the batch and are taken out before the forward)."""
    from trl import SFTTrainer

    from ghostvis_hf.training.throughput import BatchStatsMixin

    class CountingSFTTrainer(BatchStatsMixin, SFTTrainer):  # the counts in `step_stats`
        pass

    return CountingSFTTrainer


def _stock_attempt(args, dataset, liger: bool, checkpointing: bool, out_dir: str) -> dict:
    """Builds and trains stock LLaVA once; the result row (raises on failure, the caller decides what to retry)."""
    from trl import SFTConfig

    from ghostvis_hf.bench.train_scenarios import flop_coefficients
    from ghostvis_hf.training.throughput import device_peak_flops

    model, processor, n_patches = _stock_model_and_processor(args)
    coeffs = flop_coefficients(model, "stock", n_patches)
    cuda = args.device == "cuda"
    config = SFTConfig(
        output_dir=out_dir, max_steps=args.warmup + args.steps, per_device_train_batch_size=args.stock_batch,
        gradient_accumulation_steps=1, bf16=cuda, use_cpu=not cuda, use_liger_kernel=liger,
        activation_checkpointing=checkpointing, packing=False, padding_free=False, max_length=None,
        logging_steps=args.warmup, report_to="none", save_strategy="no", seed=0,
        dataloader_num_workers=args.workers, dataloader_persistent_workers=args.workers > 0,
        accelerator_config={"non_blocking": True},  # pinned batches copied without a stream sync, as GhostVis's configs
    )
    timer = _step_timer(args.warmup, args.steps, args.device)
    trainer = _counting_trainer_class()(model=model, args=config, train_dataset=dataset, processing_class=processor,
                                        callbacks=[timer])
    trainer.train()
    if timer.t1 is None:
        raise RuntimeError(f"training stopped at step {trainer.state.global_step} before the timed steps ended")
    seconds = timer.t1 - timer.t0
    timed = trainer.step_stats[args.warmup : args.warmup + args.steps]
    tokens = sum(s["tokens"] for s in timed)
    flops = sum(coeffs["token"] * s["tokens"] + coeffs["token_sq"] * s["tokens_sq"] + coeffs["image"] * s["images"]
                for s in timed)
    peak_flops = device_peak_flops(torch.device(args.device))
    settings = {
        "model": f"LlavaForConditionalGeneration, random weights, {args.preset} preset shapes "
                 f"({sum(p.numel() for p in model.parameters()) / 1e9:.3f} B parameters)",
        "weights_dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "bf16": config.bf16,
        "attn_implementation": model.config._attn_implementation, "use_liger_kernel": liger,
        "activation_checkpointing": config.activation_checkpointing, "image_tokens_per_image": n_patches,
        "image_processor": type(processor.image_processor).__name__,
        "per_device_train_batch_size": args.stock_batch, "gradient_accumulation_steps": 1,
        "optim": getattr(config.optim, "value", config.optim),
        "packing": False, "padding_free": False, "max_length": None,
        "assistant_only_loss": config.assistant_only_loss, "dataloader_num_workers": args.workers,
        "warmup_steps_excluded": args.warmup, "peak_mem_gib_run": _round(timer.peak_run, 2),
    }
    del trainer, model
    return {"steps": len(timed), "seconds": round(seconds, 3), "tokens": tokens,
            "tok_s": tokens / seconds, "conv_s": sum(s["conversations"] for s in timed) / seconds,
            "mfu": flops / seconds / peak_flops if peak_flops else None, "peak_mem_gib": timer.peak,
            "settings": settings}


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def run_stock(args, dataset) -> dict:
    """Stock at its best batch size: `_run_stock_at` for every `--stock-batch`, the row with the most conversations/s
    kept and every size's result recorded in its settings (`batch_sweep`)."""
    best, sweep, error = None, [], None
    for batch in args.stock_batch:
        try:
            row = _run_stock_at(argparse.Namespace(**{**vars(args), "stock_batch": batch}), dataset)
        except Exception as e:  # noqa: BLE001 - a size that fails is a result of the sweep
            error = e
            sweep.append({"batch": batch, "failed": repr(e)[:200]})
            continue
        sweep.append({"batch": batch, "conv_s": _round(row.get("conv_s"), 3), "tok_s": _round(row.get("tok_s"), 1),
                      "mfu": _round(row.get("mfu"), 4), "peak_mem_gib": _round(row.get("peak_mem_gib"), 2),
                      "activation_checkpointing": row["settings"].get("activation_checkpointing")})
        if best is None or (row.get("conv_s") or 0) > (best.get("conv_s") or 0):
            best = row
    if best is None:
        raise error
    best["settings"]["batch_sweep"] = sweep
    return best


def _run_stock_at(args, dataset) -> dict:
    """Stock with its best settings at `args.stock_batch`: Liger on if it imports (off if it fails, recorded), no
    checkpointing unless the run is out of memory (then on, recorded)."""
    liger, notes = False, []
    try:
        import liger_kernel.transformers  # noqa: F401

        liger = args.device == "cuda"  # Triton kernels: CUDA only
        notes += [] if liger else ["Liger: off on the CPU"]
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        notes.append(f"Liger: not available ({e!r:.150})")
    checkpointing = False
    out_dir = tempfile.mkdtemp(prefix="bench-recipe-stock-")
    try:
        while True:
            try:
                row = _stock_attempt(args, dataset, liger, checkpointing, out_dir)
                row["settings"]["notes"] = notes
                return row
            except Exception as e:  # noqa: BLE001 - decide below whether a fallback applies
                oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()
                if oom and not checkpointing:
                    retry = f"out of memory without activation checkpointing ({str(e)[:150]!r}); on"
                elif liger and not oom:  # NOTE: Liger's process-wide Qwen2 patches (RoPE) may stay in place
                    retry = f"Liger failed ({e!r:.200}); off"
                    traceback.print_exc()
                else:
                    raise
            notes.append(retry)
            print(f"[stock] {retry}: retrying", flush=True)
            checkpointing = checkpointing or retry.startswith("out of memory")
            liger = liger and not retry.startswith("Liger")
            _free(args.device)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
        _free(args.device)


# ---------------------------------------------------------------- ghostvis


def ghostvis_command(args, out_dir: str) -> list[str]:
    """`accelerate launch ... recipes/sft.py --config sft_1.5b_bench.yaml` with this run's rows, steps and device."""
    accel = "single_gpu.yaml" if args.device == "cuda" else "cpu.yaml"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           os.path.join("accelerate_configs", accel), "recipes/sft.py", "--config", BENCH_CONFIG,
           "--preset", args.preset, "--num_train_samples", str(args.rows), "--dataset_seed", "0",
           "--max_steps", str(args.warmup + args.steps), "--logging_steps", str(args.warmup),
           "--output_dir", out_dir, "--dataloader_num_workers", str(args.workers),
           "--dataloader_persistent_workers", str(args.workers > 0).lower()]
    if args.device == "cpu":
        cmd += ["--bf16", "false", "--precision", "autocast"]
    return cmd + shlex.split(args.recipe_args)


def _run_streamed(cmd: list[str], timeout: float) -> tuple[int, list[str]]:
    """Runs `cmd` in its own process group, its output streamed through and kept; killed (the group: accelerate's
    child too) after `timeout` seconds."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    watchdog = threading.Timer(timeout, lambda: proc.poll() is None and os.killpg(proc.pid, signal.SIGKILL))
    watchdog.start()
    lines = []
    try:
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line)
        return proc.wait(), lines
    finally:
        watchdog.cancel()


def run_ghostvis(args) -> dict:
    """Runs the recipe in a subprocess and reads the speed in its `sft_summary.json`."""
    out_dir = tempfile.mkdtemp(prefix="bench-recipe-ghostvis-")
    cmd = ghostvis_command(args, out_dir)
    print("[ghostvis] " + shlex.join(cmd), flush=True)
    try:
        rc, lines = _run_streamed(cmd, args.recipe_timeout)
        if rc != 0:
            raise RuntimeError(f"recipe exited {rc}" + (" (killed: --recipe-timeout)" if rc == -signal.SIGKILL else "")
                               + f": {''.join(lines[-5:]).strip()[-400:]}")
        with open(os.path.join(out_dir, "sft_summary.json")) as f:
            summary = json.load(f)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    tp = summary.get("throughput") or {}
    if not tp.get("first_interval_excluded"):
        raise RuntimeError(f"the recipe's speed log has no interval after the warm-up: {tp}")
    log = "".join(lines)
    found = lambda pattern: (re.findall(pattern, log) or [None])[-1]  # noqa: E731
    return {"steps": tp["logging_intervals"] * args.warmup, "seconds": tp["seconds"], "tokens": tp["tokens"],
            "tok_s": tp["tokens_per_second"], "conv_s": tp["conversations_per_second"], "mfu": tp["mfu"],
            "peak_mem_gib": tp["peak_memory_gib"],
            "settings": {"command": shlex.join(["accelerate", "launch"] + cmd[3:]),
                         "config_file": _read_yaml(BENCH_CONFIG),
                         "extra_args": shlex.split(args.recipe_args), "kernels": found(r"kernels: (.*)"),
                         "precision": found(r"precision: (.*)"),
                         "token_budget": found(r"token budget: (.*)"), "warmup_steps_excluded": args.warmup,
                         "peak_mem_window": "whole run (the recipe's speed log)",
                         "parameters": summary.get("parameters")}}


# ---------------------------------------------------------------- record


def _read_yaml(path: str) -> dict:
    import yaml

    with open(os.path.join(ROOT, path)) as f:
        return yaml.safe_load(f)


def _round(v, n):
    return round(v, n) if isinstance(v, float) else v


def _row(side: str, fn) -> dict:
    """The result row of one side: its numbers, or `failed` with the error (the other side still runs)."""
    t0 = time.perf_counter()
    try:
        row = {"scenario": "recipe", "run": RUNS[side], "side": side, "failed": None, **fn()}
    except Exception as e:  # noqa: BLE001 - a failing side is a result
        traceback.print_exc()
        row = {"scenario": "recipe", "run": RUNS[side], "side": side, "failed": repr(e)[:500], "settings": {},
               **dict.fromkeys(("tok_s", "conv_s", "mfu", "peak_mem_gib"))}
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    for key, n in (("tok_s", 1), ("conv_s", 3), ("mfu", 4), ("peak_mem_gib", 2)):
        row[key] = _round(row[key], n)
    print(json.dumps({k: v for k, v in row.items() if k != "settings"}), flush=True)
    return row


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "trl", "accelerate", "datasets", "liger-kernel"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    out["cuda"] = torch.version.cuda
    return out


def ratios(rows: list[dict]) -> dict:
    """GhostVis / stock for each rate and for peak memory (like for like: whole-run peaks), when both sides ran."""
    by = {r["side"]: r for r in rows if not r.get("failed")}
    if len(by) < 2:
        return {}
    g, s = by["ghostvis"], by["stock"]
    out = {}
    for key, gv, st in (("conv_s", g["conv_s"], s["conv_s"]), ("tok_s", g["tok_s"], s["tok_s"]),
                        ("mfu", g["mfu"], s["mfu"]),
                        ("peak_mem", g["peak_mem_gib"], s["settings"].get("peak_mem_gib_run"))):
        out[key] = round(gv / st, 3) if gv and st else None
    return out


def _fmt(v, spec):
    return "—" if v is None else format(v, spec)


def markdown(report: dict) -> str:
    """The record as a table plus the settings each side used."""
    lines = ["# Recipe-level SFT speed (`scripts/bench_recipe.py`)", "", f"- machine: {report['machine']}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
             f"- command: `{report['command']}`", f"- data: {report['data']}", "",
             "| run | tok/s | conversations/s | MFU | peak GiB (timed steps) | timed steps | seconds |",
             "|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        if r.get("failed"):
            lines.append(f"| {r['run']} | failed: {r['failed'][:200]} ||||||")
            continue
        lines.append(f"| {r['run']} | {_fmt(r['tok_s'], ',.0f')} | {_fmt(r['conv_s'], '.2f')} | "
                     f"{_fmt(r['mfu'], '.1%')} | {_fmt(r['peak_mem_gib'], '.1f')} | {r.get('steps')} | "
                     f"{r.get('seconds')} |")
    rt = report["ratios"]
    if rt:
        lines += ["", "GhostVis / stock: " + ", ".join(f"{k} {v:.2f}x" if v else f"{k} —" for k, v in rt.items())
                  + " (peak memory: whole-run peaks of both)."]
    lines += ["", "tok/s counts each model's own non-padding tokens (LLaVA 729 image tokens per image on the 1.5b",
              "preset, GhostVis 64 + 2), so conversations/s is the like-for-like rate. MFU: `ghostvis bench train`'s",
              "FLOP formula (vision included) over the timed steps; the stock peak is over the timed steps (whole",
              "run in its settings), the GhostVis peak over the whole run (its speed log).", "", "## Settings"]
    for r in report["results"]:
        lines += ["", f"### {r['run']}", ""]
        lines += [f"- {k}: `{json.dumps(v)}`" for k, v in r.get("settings", {}).items()]
    return "\n".join(lines) + "\n"


def _earlier_rows(path: str, keep: str) -> tuple[list[dict], str | None]:
    """The `keep` side's row of an earlier record in `path`, and that record's command."""
    if not os.path.exists(path):
        return [], None
    with open(path) as f:
        old = json.load(f)
    return [r for r in old.get("results", []) if r.get("side") == keep], old.get("command")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        raise SystemExit("--warmup and --steps must be >= 1")
    if args.steps % args.warmup:  # the recipe's speed log is per logging interval (= warm-up)
        args.steps += args.warmup - args.steps % args.warmup
        print(f"--steps rounded up to {args.steps}, a multiple of --warmup", flush=True)
    from ghostvis_hf.bench.common import machine_name
    from ghostvis_hf.data import get_dataset

    command = "python scripts/bench_recipe.py " + shlex.join(argv)
    rows, earlier = [], None
    path = os.path.join(args.out, "train_recipe.json")
    if args.only:
        rows, earlier = _earlier_rows(path, next(s for s in SIDES if s != args.only))
        earlier = earlier if rows else None
    # GhostVis first: the subprocess gets the GPU before this process has touched it
    if args.only in (None, "ghostvis"):
        rows.append(_row("ghostvis", lambda: run_ghostvis(args)))
    if args.only in (None, "stock"):
        dataset = get_dataset("synthetic", limit=args.rows, seed=0)
        rows.append(_row("stock", lambda: run_stock(args, dataset)))
    rows.sort(key=lambda r: SIDES.index(r["side"]), reverse=True)  # stock first in the table
    report = {"benchmark": "train_recipe", "machine": machine_name(torch.device(args.device)),
              "versions": _versions(), "command": command + (f" ; earlier row: {earlier}" if earlier else ""),
              "data": f"get_dataset('synthetic', limit={args.rows}, seed=0)", "results": rows, "ratios": ratios(rows)}
    os.makedirs(args.out, exist_ok=True)
    for name, text in (("train_recipe.json", json.dumps(report, indent=1)), ("train_recipe.md", markdown(report))):
        with open(os.path.join(args.out, name), "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
