"""Multi-GPU scaling of the SFT recipe (issue 17): the same recipe config on 1 GPU and on N under DDP, ZeRO-2, ZeRO-3
and FSDP2, side by side.

Each setup is `accelerate launch --config_file accelerate_configs/<setup>.yaml --num_processes <gpus> recipes/sft.py
--config <config>` for `--max-steps` optimizer steps, logging every `--logging-steps`; its speed is the recipe's own
(`sft_summary.json` "throughput": the run without its first logging interval, the warm-up): tokens/s and
conversations/s over all GPUs, MFU per GPU (vision FLOPs included, the `bench train` formula), peak memory of rank 0.
With token-budget steps (`sft_1.5b_bench.yaml`) every GPU takes full rows of `max_length` tokens each step, so N GPUs
do N times the work of one per step. A setup that fails is a failed row (its log kept), the others still run.

The precision is the recipe's own choice per setup (`--precision auto`: bf16 + fp32 master weights in our optimizer
on one GPU, under DDP and under FSDP2 (bf16 shards, fp32 master shards); DeepSpeed's bf16 weights with fp32 master
partitions; `fsdp2_policy`: FSDP's own mixed-precision policy) and is recorded per row. Each multi-GPU row is
compared with the recipe's default on one GPU (`vs_1gpu`: what the second GPU buys a user) and, where that setup
ran, with the same launcher on one GPU (`vs_same_1gpu`: `zero2_1gpu`, `fsdp2_1gpu`, ...: the launcher's scaling
alone); the `*_autocast` setups run one GPU and DDP under autocast.
`--profile` records 3 more steps per setup after the timed ones (kernel time by kind, exposed communication).
`--same-data` times the one-GPU setups over the conversations the multi-GPU setups' timed steps train (their steps
differ in images, so in work per token); `--repeats N` runs the setups N times round-robin and adds each setup's
median and range: two-GPU rows moved by up to 9 % between hosts and by a few per cent between runs on one host
(docs/benchmarks/scaling_8rows.md), more than the margins the multi-GPU bars are decided by. The report records the
NCCL environment and `nvidia-smi topo -m`.

Writes scaling.json (`benchmark: scaling`, rows in the `bench train` shape with a `gpus` field) and scaling.md.

    python scripts/bench_scaling.py --gpus 2                                   # on a 2-GPU host
    python scripts/bench_scaling.py --gpus 2 --setups single,fsdp2,zero2 --same-data --repeats 2
    python scripts/bench_scaling.py --setups single --device cpu --max-steps 4 --logging-steps 2 \\
        --recipe-args "--max_length 256 --shapes_train_samples 256" --config recipes/configs/sft_tiny.yaml   # smoke
"""

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AUTO = ["--precision", "auto"]  # the bench config asks for bf16_master, which DeepSpeed refuses (it keeps its own)
NO_COMPILE = ["--compile_layers", "false"]  # refused under ZeRO-3 (its parameter hooks)


class Setup(NamedTuple):
    config: str  # accelerate config under accelerate_configs/
    multi: bool  # runs on --gpus processes (else one)
    label: str
    launcher_args: tuple = ()
    recipe_args: tuple = ()
    one_gpu: str | None = None  # the same launcher on one GPU, for `vs_same_1gpu`


SETUPS = {
    "single": Setup("single_gpu.yaml", False, "1 GPU"),
    "ddp": Setup("multi_gpu.yaml", True, "DDP", one_gpu="single"),
    "zero2": Setup("deepspeed_zero2.yaml", True, "DeepSpeed ZeRO-2", recipe_args=AUTO, one_gpu="zero2_1gpu"),
    "zero3": Setup("deepspeed_zero3.yaml", True, "DeepSpeed ZeRO-3", recipe_args=AUTO + NO_COMPILE,
                   one_gpu="zero3_1gpu"),
    # at most 8 thread blocks per NCCL collective (`--nccl_max_ctas`): more SMs left to the compute the all-gathers
    # and reduce-scatters run beside (3-7 % faster at 8 rows on 2x H200); fsdp2_nccl_default: NCCL's own choice
    "fsdp2": Setup("fsdp2.yaml", True, "FSDP2", recipe_args=AUTO + ["--nccl_max_ctas", "8"], one_gpu="fsdp2_1gpu"),
    "fsdp2_nccl_default": Setup("fsdp2.yaml", True, "FSDP2, NCCL's own thread blocks", recipe_args=AUTO,
                                one_gpu="fsdp2_1gpu"),
    "zero2_ctas16": Setup("deepspeed_zero2.yaml", True, "DeepSpeed ZeRO-2, 16 NCCL thread blocks",
                          recipe_args=AUTO + ["--nccl_max_ctas", "16"], one_gpu="zero2_1gpu"),
    # fsdp2.yaml keeps the gathered parameters from forward to backward; this one frees them after each unit's forward
    "fsdp2_reshard": Setup("fsdp2.yaml", True, "FSDP2, reshard after forward",
                           launcher_args=["--fsdp_reshard_after_forward", "true"], recipe_args=AUTO,
                           one_gpu="fsdp2_1gpu"),
    # each decoder layer (and resampler block) starts the all-gathers of the next two when its forward starts
    "fsdp2_prefetch": Setup("fsdp2.yaml", True, "FSDP2, forward prefetch 2",
                            recipe_args=AUTO + ["--fsdp_forward_prefetch", "2"], one_gpu="fsdp2_1gpu"),
    # fsdp2.yaml's choices one at a time: each vision encoder layer its own unit (the file keeps the vision tower in
    # the root unit), and FSDP's own mixed-precision policy (fp32 shards cast at every all-gather) instead of bf16
    # shards with fp32 master shards in our optimizer
    "fsdp2_vision_units": Setup("fsdp2.yaml", True, "FSDP2, each vision layer a unit",
                                launcher_args=["--fsdp_transformer_layer_cls_to_wrap",
                                               "Qwen2DecoderLayer,SiglipEncoderLayer,GhostVisPerceiverBlock"],
                                recipe_args=AUTO, one_gpu="fsdp2_1gpu"),
    "fsdp2_policy": Setup("fsdp2.yaml", True, "FSDP2, FSDP's mixed-precision policy",
                          recipe_args=["--precision", "autocast"], one_gpu="fsdp2_1gpu"),
    "single_autocast": Setup("single_gpu.yaml", False, "1 GPU, autocast", recipe_args=["--precision", "autocast"]),
    "ddp_autocast": Setup("multi_gpu.yaml", True, "DDP, autocast", recipe_args=["--precision", "autocast"],
                          one_gpu="single_autocast"),
    # the sharded launchers on one GPU: their own overhead without communication
    "zero2_1gpu": Setup("deepspeed_zero2.yaml", False, "DeepSpeed ZeRO-2 on 1 GPU", recipe_args=AUTO),
    "zero3_1gpu": Setup("deepspeed_zero3.yaml", False, "DeepSpeed ZeRO-3 on 1 GPU", recipe_args=AUTO + NO_COMPILE),
    "fsdp2_1gpu": Setup("fsdp2.yaml", False, "FSDP2 on 1 GPU", recipe_args=AUTO),
}
DEFAULT_SETUPS = "single,ddp,zero2,zero3,fsdp2,single_autocast,ddp_autocast"


def _parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpus", type=int, default=2, help="processes (GPUs) of the multi-GPU setups")
    p.add_argument("--setups", default=DEFAULT_SETUPS, help=f"comma list of {', '.join(SETUPS)}")
    p.add_argument("--config", default=os.path.join("recipes", "configs", "sft_1.5b_bench.yaml"))
    p.add_argument("--max-steps", type=int, default=40)
    p.add_argument("--logging-steps", type=int, default=10, help="the first interval is the warm-up left out")
    p.add_argument("--same-data", action="store_true",
                   help="one-process setups run --gpus times the steps and logging interval: their timed steps then "
                        "train the same conversations as the multi-GPU setups' (global steps of the same plan), "
                        "not the first 1/N of them (steps differ in images, so in work per token)")
    p.add_argument("--repeats", type=int, default=1,
                   help="run the setups this many times, round-robin (single, ddp, ..., single, ddp, ...): every run "
                        "is a row, and the report adds each setup's median and range (hosts and runs differ by a few "
                        "per cent: one run per setup decides little near a bar)")
    p.add_argument("--recipe-args", default="", help="extra recipes/sft.py arguments for every setup, one string")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: accelerate_configs/cpu.yaml, tests")
    p.add_argument("--profile", action="store_true",
                   help="profile 3 more steps after the timed ones (--profile_steps): <name>_<setup>_profile_rank<R>.txt "
                        "with kernel time by kind and the communication not hidden behind compute")
    p.add_argument("--reload-check", action="store_true",
                   help="load each saved checkpoint with from_pretrained(trust_remote_code=True) in a fresh process "
                        "and generate a few tokens from an image prompt (the row's `reloads`)")
    p.add_argument("--name", default="scaling", help="file stem of the report (<name>.json / .md)")
    p.add_argument("--timeout", type=int, default=900, help="seconds a setup may take")
    p.add_argument("--out", default="docs/benchmarks")
    return p


def steps(setup: str, args) -> tuple[int, int]:
    """`(max_steps, logging_steps)` of one setup: `--same-data` scales a one-process setup's by `--gpus`."""
    scale = args.gpus if args.same_data and not SETUPS[setup].multi else 1
    return args.max_steps * scale, args.logging_steps * scale


def command(setup: str, args, output_dir: str) -> tuple[list[str], dict]:
    """The launch line of one setup and its environment."""
    spec = SETUPS[setup]  # `main` refused the multi-GPU setups on the CPU
    config, multi = spec.config, spec.multi
    if args.device == "cpu":
        config = "cpu.yaml"
    gpus = args.gpus if multi else 1
    max_steps, logging_steps = steps(setup, args)
    env = dict(os.environ)
    if not multi and args.device == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]  # one process, one GPU
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           os.path.join("accelerate_configs", config), "--num_processes", str(gpus), *spec.launcher_args,
           "recipes/sft.py",
           "--config", args.config, "--max_steps", str(max_steps + 3 * args.profile),
           "--logging_steps", str(logging_steps),
           "--output_dir", output_dir, "--save_strategy", "no", "--eval_after_training", "false", "--plot", "false",
           *spec.recipe_args, *shlex.split(args.recipe_args)]
    if args.profile:  # after the last timed step: the profiler's own cost stays out of the speed log
        cmd += ["--profile_steps", f"{max_steps}:{max_steps + 3}"]
    if args.device == "cpu":
        cmd += ["--use_cpu", "true", "--bf16", "false"]
    return cmd, env


def run_setup(setup: str, args, tmp: str, repeat: int = 0) -> dict:
    """One run's row (run `repeat` of `setup`): its speed from its summary, or `failed` with the tail of its log."""
    multi, label = SETUPS[setup].multi, SETUPS[setup].label
    label = label.replace("GPU", "CPU process") if args.device == "cpu" else label
    stem = f"{setup}_r{repeat}" if args.repeats > 1 else setup  # files of this run: <name>_<stem>...
    output_dir = os.path.join(tmp, stem)
    cmd, env = command(setup, args, output_dir)
    shown = "accelerate launch " + shlex.join(cmd[3:])
    max_steps, logging_steps = steps(setup, args)
    row = {"scenario": "recipe_scaling", "run": label, "setup": setup, "gpus": args.gpus if multi else 1,
           "max_steps": max_steps, "logging_steps": logging_steps, "tok_s": None, "conv_s": None, "mfu": None,
           "peak_mem_gib": None, "precision": None, "failed": None, "command": shown}
    if args.repeats > 1:
        row["repeat"] = repeat
    log_path = os.path.join(args.out, f"{args.name}_{stem}.log")
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout)
            returncode = proc.returncode
        except subprocess.TimeoutExpired:
            returncode = f"timeout after {args.timeout} s"
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    for name in sorted(os.listdir(output_dir)) if os.path.isdir(output_dir) else ():
        # --profile's files, and --recipe-args '--sync_steps A:B' 's; kept even if the run failed afterwards
        if name.startswith(("profile_rank", "syncs_rank")) and name.endswith(".txt"):
            shutil.copy(os.path.join(output_dir, name), os.path.join(args.out, f"{args.name}_{stem}_{name}"))
    summary_path = os.path.join(output_dir, "sft_summary.json")
    if returncode != 0 or not os.path.exists(summary_path):
        with open(log_path) as f:
            row["failed"] = f"exit {returncode}: " + " | ".join(f.read().strip().splitlines()[-3:])[-400:]
        # the speed log so far (the recipe rewrites it at every log: training.throughput.THROUGHPUT_FILE)
        partial = os.path.join(output_dir, "throughput.json")
        if os.path.exists(partial):
            with open(partial) as f:
                speed = json.load(f)
            row.update(_speed_fields(speed), speed_until_step=speed.get("step"))
        return row
    with open(summary_path) as f:
        summary = json.load(f)
    speed = summary.get("throughput") or {}
    if not speed:
        row["failed"] = "no speed logged: raise --max-steps or lower --logging-steps (two logging intervals at least)"
    if args.reload_check:
        try:
            row["reloads"] = reload_check(output_dir, args.device, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            row["reloads"] = f"no: not loaded and generating within {args.timeout} s"
    row.update(_speed_fields(speed), precision=summary.get("precision"))
    return row


def _speed_fields(speed: dict) -> dict:
    """A row's speed fields from the recipe's speed log (`ThroughputCallback.summary`)."""
    return dict(tok_s=speed.get("tokens_per_second"), conv_s=speed.get("conversations_per_second"),
                mfu=speed.get("mfu"), peak_mem_gib=speed.get("peak_memory_gib"), timed_s=speed.get("seconds"),
                first_interval_excluded=speed.get("first_interval_excluded"))


RELOAD = """
import sys, torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
path, device = sys.argv[1], sys.argv[2]
processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True, dtype=torch.bfloat16).to(device)
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]
inputs = processor(text=processor.apply_chat_template(messages, add_generation_prompt=True),
                   images=Image.new("RGB", (64, 64), (200, 30, 30)), return_tensors="pt").to(device)
out = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
print(f"yes: {type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, "
      f"{out.shape[1] - inputs['input_ids'].shape[1]} tokens generated")
"""


def reload_check(output_dir: str, device: str, timeout: int = 900) -> str:
    """Loads the saved folder in a fresh process (`trust_remote_code`) and generates; `"yes: ..."` or the error."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if device == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    proc = subprocess.run([sys.executable, "-c", RELOAD, output_dir, device], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode == 0 and proc.stdout.strip():
        return proc.stdout.strip().splitlines()[-1]
    return f"no (exit {proc.returncode}): " + " | ".join(proc.stderr.strip().splitlines()[-3:])


def _speeds(rows: list[dict]) -> dict[str, list[float]]:
    """tokens/s of every run that has one, by setup, in order of the setups' first runs."""
    speeds: dict[str, list[float]] = {}
    for r in rows:
        speeds.setdefault(r["setup"], [])
        if r["tok_s"]:
            speeds[r["setup"]].append(r["tok_s"])
    return speeds


def scaling(rows: list[dict]) -> None:
    """Adds to the multi-GPU rows `vs_1gpu`: tokens/s over the recipe's default on one GPU (`single`, what the second
    GPU has to beat), and `vs_same_1gpu`: over the same launcher on one GPU (its scaling alone), where measured; with
    several runs of a one-GPU setup, over their median."""
    base = {setup: statistics.median(v) for setup, v in _speeds([r for r in rows if r["gpus"] == 1]).items() if v}
    for r in rows:
        if r["gpus"] < 2 or not r["tok_s"]:
            continue
        if "single" in base:
            r["vs_1gpu"] = round(r["tok_s"] / base["single"], 3)
        same = SETUPS[r["setup"]].one_gpu if r["setup"] in SETUPS else None
        if same in base:
            r["vs_same_1gpu"] = round(r["tok_s"] / base[same], 3)
            r["vs_same_1gpu_of"] = same


def summarize(rows: list[dict]) -> list[dict]:
    """Per setup, in order of first appearance: its runs with a speed, median tokens/s and range, and the median over
    the median of `single` (`vs_1gpu`, multi-GPU setups)."""
    speeds = _speeds(rows)
    single = statistics.median(speeds["single"]) if speeds.get("single") else None
    out = []
    for setup, v in speeds.items():
        entry = {"setup": setup, "runs": len(v), "failed": sum(1 for r in rows if r["setup"] == setup) - len(v),
                 "median_tok_s": statistics.median(v) if v else None, "min_tok_s": min(v, default=None),
                 "max_tok_s": max(v, default=None)}
        if v and single and SETUPS[setup].multi:
            entry["vs_1gpu"] = round(entry["median_tok_s"] / single, 3)
        out.append(entry)
    return out


def write(report: dict, out: str) -> None:
    with open(os.path.join(out, f"{report['name']}.json"), "w") as f:
        json.dump(report, f, indent=2)
    fmt = lambda v, spec="{:,.1f}": "-" if v is None else spec.format(v)  # noqa: E731
    lines = ["# Recipe scaling (`scripts/bench_scaling.py`)\n", f"- machine: {report['machine']}",
             f"- versions: {report['versions']}", f"- command: `{report['command']}`",
             *([f"- environment: `{' '.join(f'{k}={v}' for k, v in report['environment'].items())}`"]
               if report.get("environment") else []),
             f"- recipe config: `{report['config']}`, {report['max_steps']} steps, speed over all but the first "
             f"logging interval ({report['logging_steps']} steps)"
             + (f"; one-GPU setups {report['gpus']}x both (`--same-data`: the same conversations timed)"
                if report["same_data"] else "") + "\n",
             "| setup | GPUs | precision | tok/s (all GPUs) | conversations/s | MFU per GPU | peak GiB (rank 0) "
             "| vs 1 GPU (recipe default) | vs the same launcher on 1 GPU |",
             "|---|---|---|---|---|---|---|---|---|"]
    label = lambda r: f"{r['run']}, run {r['repeat'] + 1}" if "repeat" in r else r["run"]  # noqa: E731
    for r in report["results"]:
        vs = f"{r['vs_1gpu']:.2f}x" if r.get("vs_1gpu") else "-"
        same = f"{r['vs_same_1gpu']:.2f}x (of {r['vs_same_1gpu_of']})" if r.get("vs_same_1gpu") else "-"
        if r["failed"] and not r["tok_s"]:
            lines.append(f"| {label(r)} | {r['gpus']} | - | failed: {r['failed'][:160]} | | | | | |")
            continue
        run = (f"{label(r)} (failed after step {r['speed_until_step']}: speed until then)" if r["failed"]
               else label(r))
        lines.append(f"| {run} | {r['gpus']} | {r['precision'] or '-'} | {fmt(r['tok_s'])} "
                     f"| {fmt(r['conv_s'], '{:.2f}')} "
                     f"| {fmt(r['mfu'], '{:.1%}')} | {fmt(r['peak_mem_gib'], '{:.1f}')} | {vs} | {same} |")
    if report.get("summary"):
        lines += ["", f"Per setup over its runs (`--repeats {report['repeats']}`, round-robin):", "",
                  "| setup | runs | median tok/s | range | median vs 1 GPU (median) |", "|---|---|---|---|---|"]
        for e in report["summary"]:
            rng = f"{fmt(e['min_tok_s'])} - {fmt(e['max_tok_s'])}" if e["runs"] else "-"
            failed = f" ({e['failed']} failed)" if e["failed"] else ""
            vs = f"{e['vs_1gpu']:.2f}x" if e.get("vs_1gpu") else "-"
            lines.append(f"| {e['setup']} | {e['runs']}{failed} | {fmt(e['median_tok_s'])} | {rng} | {vs} |")
    if report.get("topology"):
        lines += ["", "GPU topology (`nvidia-smi topo -m`):", "", "```", report["topology"], "```"]
    reloads = [f"- {r['run']}: {r['reloads']}" for r in report["results"] if r.get("reloads")]
    if reloads:
        lines += ["", "Saved checkpoint reloaded with `from_pretrained(trust_remote_code=True)` in a fresh process "
                  "and generating from an image prompt:", ""] + reloads
    lines += ["", "Commands:", ""] + [f"- {label(r)}: `{r['command']}`" for r in report["results"]]
    with open(os.path.join(out, f"{report['name']}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def _environment() -> dict:
    """The NCCL settings every setup inherits (`NCCL_*`, `TORCH_NCCL_*`): they move the multi-GPU rows."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(("NCCL_", "TORCH_NCCL_"))}


def _topology() -> str | None:
    """`nvidia-smi topo -m` (how the GPUs are linked: NVLink, PCIe switch, NUMA node), or None without it. Two-GPU
    rows measured on different hosts differed by up to 9 % with the same code (docs/benchmarks/scaling_8rows.md)."""
    try:
        proc = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0 or not proc.stdout.strip():
        return None
    return proc.stdout.strip()


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for pkg in ("torch", "transformers", "trl", "accelerate", "deepspeed", "liger-kernel"):
        try:
            found.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            pass
    return ", ".join(found)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    unknown = [s for s in setups if s not in SETUPS]
    if unknown:
        raise ValueError(f"unknown setups {unknown}; allowed: {list(SETUPS)}")
    if args.profile and any(args.max_steps < k <= args.max_steps + 3 for k in range(0, args.max_steps + 4,
                                                                                    args.logging_steps)):
        raise ValueError("--profile: a logging step falls on the 3 profiled steps after --max-steps; use a "
                         "--logging-steps above 3 that divides --max-steps")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {args.repeats}")
    if args.device == "cpu" and any(SETUPS[s].multi for s in setups):
        raise ValueError("the multi-GPU setups need GPUs; on the CPU pass --setups single (or single_autocast)")
    os.makedirs(args.out, exist_ok=True)
    import torch

    machine = (f"{torch.cuda.device_count()}x {torch.cuda.get_device_name()}" if torch.cuda.is_available()
               else platform.processor() or "cpu")
    rows = []
    script = os.path.relpath(os.path.abspath(__file__), ROOT)
    report = {"benchmark": "scaling", "name": args.name, "machine": machine, "date": time.strftime("%Y-%m-%d"),
              "versions": _versions(), "command": "python " + shlex.join([script, *(argv or sys.argv[1:])]),
              "config": args.config, "max_steps": args.max_steps, "logging_steps": args.logging_steps,
              "gpus": args.gpus, "same_data": args.same_data, "repeats": args.repeats, "environment": _environment(),
              "topology": _topology() if args.device == "cuda" else None, "results": rows}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):  # round-robin: each setup's runs spread over the call
            for setup in setups:
                rows.append(run_setup(setup, args, tmp, repeat))
                print(json.dumps(rows[-1]), flush=True)
                scaling(rows)
                if args.repeats > 1:
                    report["summary"] = summarize(rows)
                write(report, args.out)  # after every run: a call cut short keeps the rows it has
    return 0 if all(r["failed"] is None for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
