"""Multi-GPU scaling of the SFT recipe (issue 17): the same recipe config on 1 GPU and on N under DDP, ZeRO-2, ZeRO-3
and FSDP2, side by side.

Each setup is `accelerate launch --config_file accelerate_configs/<setup>.yaml --num_processes <gpus> recipes/sft.py
--config <config>` for `--max-steps` optimizer steps, logging every `--logging-steps`; its speed is the recipe's own
(`sft_summary.json` "throughput": the run without its first logging interval, the warm-up): tokens/s and
conversations/s over all GPUs, MFU per GPU (vision FLOPs included, the `bench train` formula), peak memory of rank 0.
With token-budget steps (`sft_1.5b_bench.yaml`) every GPU takes full rows of `max_length` tokens each step, so N GPUs
do N times the work of one per step. A setup that fails is a failed row (its log kept), the others still run.

The precision is the recipe's own choice per setup (`--precision auto`: bf16 + fp32 master weights on one GPU and
under DDP; the sharded setups keep theirs in DeepSpeed / FSDP with bf16 autocast) and is recorded per row; the
`*_autocast` setups run one GPU and DDP in autocast too, for a like-for-like baseline of the sharded rows.

Writes scaling.json (`benchmark: scaling`, rows in the `bench train` shape with a `gpus` field) and scaling.md.

    python scripts/bench_scaling.py --gpus 2                                   # on a 2-GPU host
    python scripts/bench_scaling.py --setups single --device cpu --max-steps 4 --logging-steps 2 \\
        --recipe-args "--max_length 256 --shapes_train_samples 256" --config recipes/configs/sft_tiny.yaml   # smoke
"""

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# setup -> (accelerate config, multi-GPU?, label, extra recipe args)
SETUPS = {
    "single": ("single_gpu.yaml", False, "1 GPU", []),
    "ddp": ("multi_gpu.yaml", True, "DDP", []),
    "zero2": ("deepspeed_zero2.yaml", True, "DeepSpeed ZeRO-2", []),
    "zero3": ("deepspeed_zero3.yaml", True, "DeepSpeed ZeRO-3", []),
    "fsdp2": ("fsdp2.yaml", True, "FSDP2", []),
    "single_autocast": ("single_gpu.yaml", False, "1 GPU, autocast", ["--precision", "autocast"]),
    "ddp_autocast": ("multi_gpu.yaml", True, "DDP, autocast", ["--precision", "autocast"]),
}
DEFAULT_SETUPS = "single,ddp,zero2,zero3,fsdp2,single_autocast,ddp_autocast"


def _parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpus", type=int, default=2, help="processes (GPUs) of the multi-GPU setups")
    p.add_argument("--setups", default=DEFAULT_SETUPS, help=f"comma list of {', '.join(SETUPS)}")
    p.add_argument("--config", default=os.path.join("recipes", "configs", "sft_1.5b_bench.yaml"))
    p.add_argument("--max-steps", type=int, default=40)
    p.add_argument("--logging-steps", type=int, default=10, help="the first interval is the warm-up left out")
    p.add_argument("--recipe-args", default="", help="extra recipes/sft.py arguments for every setup, one string")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: accelerate_configs/cpu.yaml, tests")
    p.add_argument("--timeout", type=int, default=900, help="seconds a setup may take")
    p.add_argument("--out", default="docs/benchmarks")
    return p


def command(setup: str, args, output_dir: str) -> tuple[list[str], dict]:
    """The launch line of one setup and its environment."""
    config, multi, _, extra = SETUPS[setup]  # `main` refused the multi-GPU setups on the CPU
    if args.device == "cpu":
        config = "cpu.yaml"
    gpus = args.gpus if multi else 1
    env = dict(os.environ)
    if not multi and args.device == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]  # one process, one GPU
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           os.path.join("accelerate_configs", config), "--num_processes", str(gpus), "recipes/sft.py",
           "--config", args.config, "--max_steps", str(args.max_steps), "--logging_steps", str(args.logging_steps),
           "--output_dir", output_dir, "--save_strategy", "no", "--eval_after_training", "false", "--plot", "false",
           *extra, *shlex.split(args.recipe_args)]
    if args.device == "cpu":
        cmd += ["--use_cpu", "true", "--bf16", "false"]
    return cmd, env


def run_setup(setup: str, args, tmp: str) -> dict:
    """One setup's row: its speed from its summary, or `failed` with the tail of its log."""
    _, multi, label, _ = SETUPS[setup]
    label = label.replace("GPU", "CPU process") if args.device == "cpu" else label
    output_dir = os.path.join(tmp, setup)
    cmd, env = command(setup, args, output_dir)
    shown = "accelerate launch " + shlex.join(cmd[3:])
    row = {"scenario": "recipe_scaling", "run": label, "setup": setup, "gpus": args.gpus if multi else 1,
           "tok_s": None, "conv_s": None, "mfu": None, "peak_mem_gib": None, "precision": None, "failed": None,
           "command": shown}
    log_path = os.path.join(args.out, f"scaling_{setup}.log")
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout)
            returncode = proc.returncode
        except subprocess.TimeoutExpired:
            returncode = f"timeout after {args.timeout} s"
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    summary_path = os.path.join(output_dir, "sft_summary.json")
    if returncode != 0 or not os.path.exists(summary_path):
        with open(log_path) as f:
            row["failed"] = f"exit {returncode}: " + " | ".join(f.read().strip().splitlines()[-3:])[-400:]
        return row
    with open(summary_path) as f:
        summary = json.load(f)
    speed = summary.get("throughput") or {}
    if not speed:
        row["failed"] = "no speed logged: raise --max-steps or lower --logging-steps (two logging intervals at least)"
    row.update(tok_s=speed.get("tokens_per_second"), conv_s=speed.get("conversations_per_second"),
               mfu=speed.get("mfu"), peak_mem_gib=speed.get("peak_memory_gib"), precision=summary.get("precision"),
               timed_s=speed.get("seconds"), first_interval_excluded=speed.get("first_interval_excluded"))
    return row


def scaling(rows: list[dict]) -> None:
    """Adds `vs_1gpu` (tokens/s over the matching one-GPU row: autocast rows over autocast) to the multi-GPU rows."""
    base = {r["setup"]: r for r in rows if r["gpus"] == 1 and r["tok_s"]}
    for r in rows:
        ref = base.get("single_autocast" if r["precision"] != "bf16_master" and "single_autocast" in base else "single")
        if r["gpus"] > 1 and r["tok_s"] and ref is not None:
            r["vs_1gpu"] = round(r["tok_s"] / ref["tok_s"], 3)
            r["vs_1gpu_of"] = ref["setup"]


def write(report: dict, out: str) -> None:
    with open(os.path.join(out, "scaling.json"), "w") as f:
        json.dump(report, f, indent=2)
    fmt = lambda v, spec="{:,.1f}": "-" if v is None else spec.format(v)  # noqa: E731
    lines = [f"# Recipe scaling (`scripts/bench_scaling.py`)\n", f"- machine: {report['machine']}",
             f"- versions: {report['versions']}", f"- command: `{report['command']}`",
             f"- recipe config: `{report['config']}`, {report['max_steps']} steps, speed over all but the first "
             f"logging interval ({report['logging_steps']} steps)\n",
             "| setup | GPUs | precision | tok/s (all GPUs) | conversations/s | MFU per GPU | peak GiB (rank 0) "
             "| vs 1 GPU |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        vs = f"{r['vs_1gpu']:.2f}x (of {r['vs_1gpu_of']})" if r.get("vs_1gpu") else "-"
        if r["failed"]:
            lines.append(f"| {r['run']} | {r['gpus']} | - | failed: {r['failed'][:160]} | | | | |")
            continue
        lines.append(f"| {r['run']} | {r['gpus']} | {r['precision']} | {fmt(r['tok_s'])} "
                     f"| {fmt(r['conv_s'], '{:.2f}')} "
                     f"| {fmt(r['mfu'], '{:.1%}')} | {fmt(r['peak_mem_gib'], '{:.1f}')} | {vs} |")
    lines += ["", "Commands:", ""] + [f"- {r['run']}: `{r['command']}`" for r in report["results"]]
    with open(os.path.join(out, "scaling.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


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
    if args.device == "cpu" and any(SETUPS[s][1] for s in setups):
        raise ValueError("the multi-GPU setups need GPUs; on the CPU pass --setups single (or single_autocast)")
    os.makedirs(args.out, exist_ok=True)
    import torch

    machine = (f"{torch.cuda.device_count()}x {torch.cuda.get_device_name()}" if torch.cuda.is_available()
               else platform.processor() or "cpu")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for setup in setups:
            rows.append(run_setup(setup, args, tmp))
            print(json.dumps(rows[-1]), flush=True)
    scaling(rows)
    script = os.path.relpath(os.path.abspath(__file__), ROOT)
    report = {"benchmark": "scaling", "machine": machine, "date": time.strftime("%Y-%m-%d"), "versions": _versions(),
              "command": "python " + shlex.join([script, *(argv or sys.argv[1:])]),
              "config": args.config, "max_steps": args.max_steps, "logging_steps": args.logging_steps,
              "results": rows}
    write(report, args.out)
    return 0 if all(r["failed"] is None for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
