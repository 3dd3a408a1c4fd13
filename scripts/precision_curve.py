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

`--eval-every N` also logs each run's loss on `--eval-rows` held-out rows every N steps (the recipe's
`--eval_strategy steps`): the same rows at every point, so that curve has none of the batch-to-batch noise of the
training loss. For each curve the summary has the paired comparison too: per seed, the variant's mean over a window
against the reference's with the same seed (the same start and batches), and the mean of those gaps with its 95 %
t-interval over the seeds.

`--learning-rate` (default 2e-4) is the runs' peak learning rate, the start's too. At sft_tiny.yaml's 1e-3 (the tiny
preset's from-scratch rate; this script's runs before 2026-11-30's tenth session used it) the small preset's loss
spikes mid-run and the curves of one seed part chaotically under any change of rounding: on 8 seeds, autocast against
autocast with PyTorch's unfused kernels (`autocast_unfused`, the same sums) is as far apart (same seed up to 43 %,
paired held-out gap over steps 100-200 +1.3 %, 95 % interval -3.6 to +6.2 %) as bf16 + master is from autocast
(+2.6 %, -2.1 to +7.4 %); at 2e-4 the paired gap is +0.02 %, -0.18 to +0.22 %
(docs/benchmarks/precision_heldout.md).

Writes precision_curve.json / .md / .png to `--out`.

    python scripts/precision_curve.py --preset small --steps 200 --seeds 0,1,2      # on a GPU
    python scripts/precision_curve.py --preset small --steps 200 --seeds 0,1,2 --from-steps 300 --warmup 0
    python scripts/precision_curve.py --preset small --steps 200 --seeds 0,1,2,3,4,5,6,7 --from-steps 300 \
        --warmup 0 --eval-every 10 --eval-rows 512
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
# the variants a run can take (`--precisions`), as recipes/sft.py arguments; the first one is the reference
VARIANTS = {
    "autocast": ["--precision", "autocast"],
    "bf16_master": ["--precision", "bf16_master"],
    "bf16_master_fp32res": ["--precision", "bf16_master", "--fp32_residual", "true"],  # kernels.residual
    "bf16_master_noautocast": ["--precision", "bf16_master", "--master_autocast", "false"],
    # a control: autocast again, with PyTorch's kernels instead of the fused ones (the same sums, rounded elsewhere)
    "autocast_unfused": ["--precision", "autocast", "--kernels", "false"],
}


# two-sided 95 % quantiles of Student's t for 1-30 degrees of freedom (more: the normal's 1.96)
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def command(precision: str, seed: int, args, out: str, steps: int | None = None, start: str | None = None,
            evaluate: bool = True) -> list[str]:
    steps = args.steps if steps is None else steps
    every = getattr(args, "eval_every", 0) if evaluate else 0
    held_out = ["--eval_strategy", "steps", "--eval_steps", str(every), "--num_eval_samples", str(args.eval_rows),
                "--per_device_eval_batch_size", "64"] if every else []
    return [sys.executable, RECIPE, "--config", os.path.join(ROOT, "recipes", "configs", "sft_tiny.yaml"),
            "--preset", args.preset, "--config_overrides=", "--max_steps", str(steps), "--bf16", "true",
            "--learning_rate", str(args.learning_rate),
            *VARIANTS[precision], "--logging_steps", "10", "--save_strategy", "steps", "--save_steps",
            str(steps), "--eval_after_training", "false", "--plot", "false", "--output_dir", out,
            "--seed", str(seed), *(["--model_name_or_path", start] if start else []), *held_out,
            *shlex.split(args.recipe_args)]


def losses(out: str, steps: int, key: str = "loss") -> dict[int, float]:
    """{step: value} of one logged key (`loss`: the training loss of the last logging interval; `eval_loss`)."""
    with open(os.path.join(out, f"checkpoint-{steps}", "trainer_state.json")) as f:
        return {h["step"]: h[key] for h in json.load(f)["log_history"] if key in h}


def _run(cmd: list[str], log_path: str, env: dict | None = None):
    with open(log_path, "w") as log:
        if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode != 0:
            raise RuntimeError(f"{shlex.join(cmd[1:3])} ... failed: see {log_path}")


def _one_gpu(i: int, gpus: int) -> dict | None:
    """The environment of the i-th parallel run: GPU i % gpus alone (None with one GPU: the caller's own)."""
    return {**os.environ, "CUDA_VISIBLE_DEVICES": str(i % gpus)} if gpus > 1 else None


def run_all(args, tmp: str) -> tuple[dict, dict | None]:
    """The training losses `{precision: {seed: {step: loss}}}` and the held-out ones (the same form; `None` without
    `--eval-every`); `--parallel` runs at a time, each logging to its own file."""
    weights = None
    if args.from_steps:  # the shared start: autocast, seed 0; the recipe saves its final model (with the code files)
        weights = os.path.join(tmp, "start")
        # one process sees one GPU (TRL refuses the Trainer's nn.DataParallel over several)
        _run(command("autocast", 0, args, weights, steps=args.from_steps, evaluate=False),
             os.path.join(args.out, "precision_curve_start.log"), env=_one_gpu(0, args.gpus))
    jobs = [(p, s) for s in args.seeds for p in args.precisions]
    evaluating = bool(getattr(args, "eval_every", 0))
    curves, held_out = {p: {} for p in args.precisions}, {p: {} for p in args.precisions}
    for first in range(0, len(jobs), args.parallel):
        procs = []
        for i, (precision, seed) in enumerate(jobs[first : first + args.parallel]):
            out = os.path.join(tmp, f"{precision}-{seed}")
            log = open(os.path.join(args.out, f"precision_curve_{precision}_{seed}.log"), "w")
            env = _one_gpu(i, args.gpus)
            cmd = command(precision, seed, args, out, start=weights)
            procs.append((precision, seed, out, log,
                          subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)))
        for precision, seed, out, log, proc in procs:
            if proc.wait() != 0:
                raise RuntimeError(f"{precision} seed {seed} failed: see {log.name}")
            log.close()
            curves[precision][seed] = losses(out, args.steps)
            if evaluating:
                held_out[precision][seed] = losses(out, args.steps, "eval_loss")
    return curves, (held_out if evaluating else None)


def _paired(curves: dict, variant: str, ref: str, steps: list[int]) -> dict:
    """Per seed, the variant's mean over `steps` relative to the reference's with the same seed; their mean and its
    95 % t-interval over the seeds (`None` with one seed)."""
    def window(c):
        return statistics.fmean(c[s] for s in steps)

    gaps = [window(curves[variant][x]) / window(curves[ref][x]) - 1 for x in curves[ref] if x in curves[variant]]
    mean = statistics.fmean(gaps)
    if len(gaps) < 2:
        return {"per_seed": gaps, "mean": mean, "ci95": None}
    half = (_T95[len(gaps) - 2] if len(gaps) - 1 <= len(_T95) else 1.96) * statistics.stdev(gaps) / len(gaps) ** 0.5
    return {"per_seed": gaps, "mean": mean, "ci95": [mean - half, mean + half]}


def _gaps(mean: dict, curves: dict, variant: str, ref: str, steps: list[int]) -> dict:
    gaps = [(mean[variant][s] - mean[ref][s]) / mean[ref][s] for s in steps]
    # the same seed under both: the same start and (with --from-steps) the same batches
    pairs = [abs(curves[variant][x][s] - curves[ref][x][s]) / curves[ref][x][s]
             for x in curves[ref] if x in curves[variant] for s in steps]
    return {"max_abs": max(abs(g) for g in gaps), "mean_abs": statistics.fmean(abs(g) for g in gaps),
            "mean_signed": statistics.fmean(gaps),
            "same_seed": {"max": max(pairs), "mean": statistics.fmean(pairs)}}


def summarize(curves, warmup: int, late_from: int | None = None) -> dict:
    """Per variant against the first (the reference): the relative gap of the mean curves over the steps after
    `warmup` and over those from `late_from` on (default: the second half), next to the reference seeds' spread."""
    steps = sorted(set.intersection(*(set(c) for p in curves.values() for c in p.values())))
    mean = {p: {s: statistics.fmean(c[s] for c in curves[p].values()) for s in steps} for p in curves}
    ref = next(iter(curves))
    after = [s for s in steps if s > warmup]
    late_from = steps[-1] // 2 if late_from is None else late_from
    late = [s for s in steps if s >= late_from]
    # the noise: how far apart the reference seeds are at each step, relative to their mean
    spread = [(max(c[s] for c in curves[ref].values()) - min(c[s] for c in curves[ref].values())) / mean[ref][s]
              for s in after]
    window = {p: [statistics.fmean(c[s] for s in after) for c in curves[p].values()] for p in curves}
    return {"reference": ref, "steps": steps, "mean": mean, "after_warmup_steps": after, "late_steps": late,
            "gap_after_warmup": {p: _gaps(mean, curves, p, ref, after) for p in curves if p != ref},
            "gap_late": {p: _gaps(mean, curves, p, ref, late) for p in curves if p != ref},
            "paired_after_warmup": {p: _paired(curves, p, ref, after) for p in curves if p != ref},
            "paired_late": {p: _paired(curves, p, ref, late) for p in curves if p != ref},
            "reference_seed_spread_after_warmup": {"max": max(spread), "mean": statistics.fmean(spread)},
            "window_loss_after_warmup": {p: {"per_seed": v, "mean": statistics.fmean(v),
                                             "stdev": statistics.stdev(v) if len(v) > 1 else None}
                                         for p, v in window.items()}}


def _paired_line(summary: dict, variant: str, ref: str) -> str:
    """One markdown line: the paired gaps of `variant` over the after-warm-up and late windows, with intervals."""
    def one(key: str, steps: list[int]) -> str:
        g = summary[key][variant]
        ci = f", 95 % interval {g['ci95'][0]:+.2%} to {g['ci95'][1]:+.2%}" if g["ci95"] else ""
        return f"steps {steps[0]}-{steps[-1]} {g['mean']:+.2%}{ci}"

    return (f"- {variant} / {ref} - 1, mean over a window, paired by seed: "
            f"{one('paired_after_warmup', summary['after_warmup_steps'])}; "
            f"{one('paired_late', summary['late_steps'])}.")


def write(report: dict, args) -> None:
    s = report["summary"]
    with open(os.path.join(args.out, "precision_curve.json"), "w") as f:
        json.dump(report, f, indent=2)
    seeds, variants, ref = args.seeds, list(report["curves"]), s["reference"]
    others = [p for p in variants if p != ref]
    runs = " | ".join(f"{p} s{x}" for p in variants for x in seeds)
    head = (f"| step | {runs} | " + " | ".join(f"{p} mean" for p in variants) + " | "
            + " | ".join(f"gap {p}" for p in others) + " |")
    rows = [head, "|" + "---|" * (1 + len(variants) * (len(seeds) + 1) + len(others))]
    for step in s["steps"]:
        cells = [f"{report['curves'][p][x][step]:.4f}" for p in variants for x in seeds]
        means = [f"{s['mean'][p][step]:.4f}" for p in variants]
        a = s["mean"][ref][step]
        gaps = [f"{(s['mean'][p][step] - a) / a:+.1%}" for p in others]
        rows.append(f"| {step} | " + " | ".join(cells + means + gaps) + " |")
    lw, spread = s["window_loss_after_warmup"], s["reference_seed_spread_after_warmup"]
    start = (f"Every run starts from the weights of one {args.from_steps}-step autocast run (seed 0); the seed draws "
             "the data order.\n\n" if args.from_steps
             else "Every run starts from random weights drawn by its seed.\n\n")
    after, late = s["after_warmup_steps"], s["late_steps"]
    lines = []
    for p in others:
        g, h = s["gap_after_warmup"][p], s["gap_late"][p]
        lines.append(f"- **{p}** vs {ref}, mean curves: steps {after[0]}-{after[-1]} largest gap "
                     f"**{g['max_abs']:.2%}** (mean {g['mean_abs']:.2%}, signed {g['mean_signed']:+.2%}); steps "
                     f"{late[0]}-{late[-1]} largest **{h['max_abs']:.2%}** (mean {h['mean_abs']:.2%}, signed "
                     f"{h['mean_signed']:+.2%}); same seed up to {g['same_seed']['max']:.2%} apart (mean "
                     f"{g['same_seed']['mean']:.2%}). Mean loss over steps {after[0]}-{after[-1]}: "
                     f"{lw[p]['mean']:.4f} (per seed " + ", ".join(f"{v:.4f}" for v in lw[p]["per_seed"]) + ").")
        lines.append(_paired_line(s, p, ref))
    held = ""
    if report.get("eval_summary"):
        e = report["eval_summary"]
        held_rows = ["| step | " + " | ".join(f"{p} mean" for p in variants) + " | "
                     + " | ".join(f"gap {p}" for p in others) + " |",
                     "|" + "---|" * (1 + len(variants) + len(others))]
        for step in e["steps"]:
            a = e["mean"][ref][step]
            held_rows.append(f"| {step} | " + " | ".join(f"{e['mean'][p][step]:.4f}" for p in variants) + " | "
                             + " | ".join(f"{(e['mean'][p][step] - a) / a:+.2%}" for p in others) + " |")
        held = (f"\n## Held-out loss ({args.eval_rows} rows, every {args.eval_every} steps)\n\n"
                + "\n".join(_paired_line(e, p, ref) for p in others) + "\n\n" + "\n".join(held_rows) + "\n")
    text = (f"# Training precisions vs {ref}: {args.preset} preset, {args.steps} steps, seeds {seeds}\n\n"
            f"Machine: {report['device']} · torch {report['torch']}\n\nCommand: `{report['command']}`\n\n" + start
            + f"The noise: the {ref} seeds alone are up to {spread['max']:.1%} apart (mean {spread['mean']:.1%}) of "
            f"their mean at a step after step {args.warmup}; their mean loss over steps {after[0]}-{after[-1]} is "
            f"{lw[ref]['mean']:.4f} (per seed " + ", ".join(f"{v:.4f}" for v in lw[ref]["per_seed"]) + ").\n\n"
            + "\n".join(lines) + "\n\n" + "\n".join(rows) + "\n" + held)
    with open(os.path.join(args.out, "precision_curve.md"), "w") as f:
        f.write(text)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for p, color in zip(variants, ("tab:blue", "tab:orange", "tab:green", "tab:red")):
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
    p.add_argument("--precisions", type=lambda t: t.split(","), default=["autocast", "bf16_master"],
                   help=f"comma list of {', '.join(VARIANTS)}; the first is the reference")
    p.add_argument("--late-from", type=int, default=None, help="first step of the late window (default: half way)")
    p.add_argument("--eval-every", type=int, default=0,
                   help="log the loss on --eval-rows held-out rows every this many steps (0: off)")
    p.add_argument("--eval-rows", type=int, default=512, help="held-out rows of --eval-every")
    p.add_argument("--parallel", type=int, default=6, help="runs at a time (they share the GPUs)")
    p.add_argument("--gpus", type=int, default=1, help="spread the parallel runs over this many GPUs")
    p.add_argument("--learning-rate", type=float, default=2e-4,
                   help="peak learning rate of every run and of the start (sft_tiny.yaml's 1e-3 spikes on the small "
                        "preset: see the module docstring)")
    p.add_argument("--recipe-args", default="--shapes_train_samples 6400 --dataloader_num_workers 1 --cpu_threads 1",
                   help="extra recipes/sft.py arguments for every run (default: only the rows 200 steps use)")
    p.add_argument("--out", default="docs/benchmarks")
    args = p.parse_args(argv)
    unknown = [v for v in args.precisions if v not in VARIANTS]
    if unknown or len(args.precisions) < 2:
        p.error(f"--precisions: two or more of {list(VARIANTS)} (got {args.precisions})")
    os.makedirs(args.out, exist_ok=True)
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        curves, held_out = run_all(args, tmp)
    report = {"benchmark": "precision_curve", "preset": args.preset, "steps": args.steps, "seeds": args.seeds,
              "from_steps": args.from_steps,
              "warmup": args.warmup, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__,
              "command": "python " + shlex.join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
              "curves": curves}
    report["summary"] = summarize(curves, args.warmup, args.late_from)
    if held_out is not None:
        report["eval_curves"] = held_out
        report["eval_summary"] = summarize(held_out, args.warmup, args.late_from)
    write(report, args)
    print(json.dumps({k: report["summary"][k] for k in ("gap_after_warmup", "gap_late", "paired_late",
                                                         "reference_seed_spread_after_warmup")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
