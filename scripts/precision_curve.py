"""Loss curves of the two GPU training precisions on the same runs, over several seeds (issue 16).

`recipes/sft.py` on the shapes data, identical but for `--precision`: `autocast` (fp32 weights, bf16 autocast: the
weights are cast every step) and `bf16_master` (bf16 weights and activations, fp32 master weights and AdamW state
in the optimizer), each with every seed of `--seeds` (the seed draws the initial weights and the data order; the
data are the same). All runs go at once (`--parallel`).

Why seeds: from scratch at the main job's learning rate a run's loss drops in a sudden phase whose timing is chaotic:
two autocast runs that differ only in the seed part by ~10-20 % for a hundred steps, and so do two runs with the same
seed that differ in any rounding. One pair of runs measures that noise, not the precision. So the comparison is of
the mean curves over seeds, next to the autocast seeds' own spread.

`--from-steps N` takes the phase out instead: one autocast run of N steps (seed 0) first, then every run starts from
its weights (`--model_name_or_path`), as a fine-tune starts from a trained model; the seed then draws only the data
order, and the two precisions of one seed see the same batches.

Writes precision_curve.json / .md / .png to `--out`.

    python scripts/precision_curve.py --preset small --steps 200 --seeds 0,1,2      # on a GPU
    python scripts/precision_curve.py --preset small --steps 200 --seeds 0,1,2 --from-steps 300 --warmup 0
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "recipes", "sft.py")
PRECISIONS = ("autocast", "bf16_master")


def command(precision: str, seed: int, args, out: str, steps: int | None = None, start: str | None = None) -> list[str]:
    steps = args.steps if steps is None else steps
    return [sys.executable, RECIPE, "--config", os.path.join(ROOT, "recipes", "configs", "sft_tiny.yaml"),
            "--preset", args.preset, "--config_overrides=", "--max_steps", str(steps), "--bf16", "true",
            "--precision", precision, "--logging_steps", "10", "--save_strategy", "steps", "--save_steps",
            str(steps), "--eval_after_training", "false", "--plot", "false", "--output_dir", out,
            "--seed", str(seed), *(["--model_name_or_path", start] if start else []), *shlex.split(args.recipe_args)]


def losses(out: str, steps: int) -> dict[int, float]:
    with open(os.path.join(out, f"checkpoint-{steps}", "trainer_state.json")) as f:
        return {h["step"]: h["loss"] for h in json.load(f)["log_history"] if "loss" in h}


def _run(cmd: list[str], log_path: str):
    with open(log_path, "w") as log:
        if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
            raise RuntimeError(f"{shlex.join(cmd[1:3])} ... failed: see {log_path}")


def run_all(args, tmp: str) -> dict[str, dict[int, dict[int, float]]]:
    """{precision: {seed: {step: loss}}}; `--parallel` runs at a time, each logging to its own file."""
    weights = None
    if args.from_steps:  # the shared start: autocast, seed 0; the recipe saves its final model (with the code files)
        weights = os.path.join(tmp, "start")
        _run(command("autocast", 0, args, weights, steps=args.from_steps),
             os.path.join(args.out, "precision_curve_start.log"))
    jobs = [(p, s) for s in args.seeds for p in PRECISIONS]
    curves = {p: {} for p in PRECISIONS}
    for first in range(0, len(jobs), args.parallel):
        procs = []
        for precision, seed in jobs[first : first + args.parallel]:
            out = os.path.join(tmp, f"{precision}-{seed}")
            log = open(os.path.join(args.out, f"precision_curve_{precision}_{seed}.log"), "w")
            procs.append((precision, seed, out, log, subprocess.Popen(command(precision, seed, args, out, start=weights),
                                                                      stdout=log, stderr=subprocess.STDOUT)))
        for precision, seed, out, log, proc in procs:
            if proc.wait() != 0:
                raise RuntimeError(f"{precision} seed {seed} failed: see {log.name}")
            log.close()
            curves[precision][seed] = losses(out, args.steps)
    return curves


def summarize(curves, warmup: int) -> dict:
    steps = sorted(set.intersection(*(set(c) for p in curves.values() for c in p.values())))
    mean = {p: {s: statistics.fmean(c[s] for c in curves[p].values()) for s in steps} for p in curves}
    late = [s for s in steps if s > warmup]
    ref, new = mean["autocast"], mean["bf16_master"]
    gaps = [abs(new[s] - ref[s]) / ref[s] for s in late]
    # the noise: how far apart the autocast seeds are at each step, relative to their mean
    spread = [(max(c[s] for c in curves["autocast"].values()) - min(c[s] for c in curves["autocast"].values())) / ref[s]
              for s in late]
    window = {p: [statistics.fmean(c[s] for s in late) for c in curves[p].values()] for p in curves}
    # the same seed under both precisions: the same start and (with --from-steps) the same batches
    pairs = [abs(curves["bf16_master"][x][s] - curves["autocast"][x][s]) / curves["autocast"][x][s]
             for x in curves["autocast"] if x in curves["bf16_master"] for s in late]
    return {"steps": steps, "mean": mean, "late_steps": late,
            "same_seed_rel_gap_after_warmup": {"max": max(pairs), "mean": statistics.fmean(pairs)},
            "max_rel_gap_of_means_after_warmup": max(gaps),
            "mean_rel_gap_of_means_after_warmup": statistics.fmean(gaps),
            "autocast_seed_spread_after_warmup": {"max": max(spread), "mean": statistics.fmean(spread)},
            "late_window_loss": {p: {"per_seed": v, "mean": statistics.fmean(v),
                                     "stdev": statistics.stdev(v) if len(v) > 1 else None} for p, v in window.items()}}


def write(report: dict, args) -> None:
    s = report["summary"]
    with open(os.path.join(args.out, "precision_curve.json"), "w") as f:
        json.dump(report, f, indent=2)
    seeds = args.seeds
    runs = " | ".join(f"{p} s{x}" for p in PRECISIONS for x in seeds)
    head = f"| step | {runs} | autocast mean | bf16_master mean | gap |"
    rows = [head, "|" + "---|" * (3 + len(PRECISIONS) * len(seeds))]
    for step in s["steps"]:
        cells = [f"{report['curves'][p][x][step]:.4f}" for p in PRECISIONS for x in seeds]
        a, b = s["mean"]["autocast"][step], s["mean"]["bf16_master"][step]
        rows.append(f"| {step} | " + " | ".join(cells) + f" | {a:.4f} | {b:.4f} | {(b - a) / a:+.1%} |")
    lw, spread = s["late_window_loss"], s["autocast_seed_spread_after_warmup"]

    def per_seed(precision):
        return ", ".join(f"{v:.4f}" for v in lw[precision]["per_seed"])

    start = (f"Every run starts from the weights of one {args.from_steps}-step autocast run (seed 0); the seed draws "
             "the data order.\n\n" if args.from_steps
             else "Every run starts from random weights drawn by its seed.\n\n")
    pairs = s["same_seed_rel_gap_after_warmup"]
    text = (f"# bf16 + fp32 master weights vs autocast: {args.preset} preset, {args.steps} steps, seeds {seeds}\n\n"
            f"Machine: {report['device']} · torch {report['torch']}\n\nCommand: `{report['command']}`\n\n" + start +
            f"Mean curves over the seeds, after step {args.warmup}: largest relative gap "
            f"**{s['max_rel_gap_of_means_after_warmup']:.2%}**, mean {s['mean_rel_gap_of_means_after_warmup']:.2%}. "
            f"The noise it sits in: the autocast seeds alone are up to {spread['max']:.1%} apart (mean "
            f"{spread['mean']:.1%}) of their mean at a step. Same seed, the two precisions: up to "
            f"{pairs['max']:.2%} apart (mean {pairs['mean']:.2%}).\n\n"
            f"Mean loss over steps {s['late_steps'][0]}-{s['late_steps'][-1]}: autocast {lw['autocast']['mean']:.4f} "
            f"(per seed {per_seed('autocast')}), bf16 + master "
            f"{lw['bf16_master']['mean']:.4f} (per seed {per_seed('bf16_master')})."
            f"\n\n" + "\n".join(rows) + "\n")
    with open(os.path.join(args.out, "precision_curve.md"), "w") as f:
        f.write(text)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for p, color in zip(PRECISIONS, ("tab:blue", "tab:orange")):
        lo = [min(c[x] for c in report["curves"][p].values()) for x in s["steps"]]
        hi = [max(c[x] for c in report["curves"][p].values()) for x in s["steps"]]
        ax.fill_between(s["steps"], lo, hi, color=color, alpha=0.2)
        ax.plot(s["steps"], [s["mean"][p][x] for x in s["steps"]], color=color, label=f"{p} (mean, seed range)")
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.set_yscale("log"), ax.legend()
    ax.set_title(f"{args.preset}: training precision, {len(seeds)} seeds")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "precision_curve.png"), dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=50, help="steps left out of the comparison")
    p.add_argument("--seeds", type=lambda t: [int(x) for x in t.split(",")], default=[0, 1, 2])
    p.add_argument("--from-steps", type=int, default=0,
                   help="start every run from one autocast run of this many steps (0: from random weights)")
    p.add_argument("--parallel", type=int, default=6, help="runs at a time (they share the GPU)")
    p.add_argument("--recipe-args", default="--shapes_train_samples 6400 --dataloader_num_workers 1 --cpu_threads 1",
                   help="extra recipes/sft.py arguments for every run (default: only the rows 200 steps use)")
    p.add_argument("--out", default="docs/benchmarks")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        curves = run_all(args, tmp)
    report = {"benchmark": "precision_curve", "preset": args.preset, "steps": args.steps, "seeds": args.seeds,
              "from_steps": args.from_steps,
              "warmup": args.warmup, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__,
              "command": "python " + shlex.join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
              "curves": curves}
    report["summary"] = summarize(curves, args.warmup)
    write(report, args)
    print(json.dumps({k: report["summary"][k] for k in ("max_rel_gap_of_means_after_warmup",
                                                         "same_seed_rel_gap_after_warmup",
                                                         "mean_rel_gap_of_means_after_warmup",
                                                         "autocast_seed_spread_after_warmup")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
