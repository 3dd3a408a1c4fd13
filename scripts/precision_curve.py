"""Loss curves of the two GPU training precisions on the same run (issue 16).

`recipes/sft.py` on the shapes data twice, identical but for `--precision`: `autocast` (fp32 weights, bf16 autocast:
the weights are cast every step) and `bf16_master` (bf16 weights and activations, fp32 master weights and AdamW
state in the optimizer). Writes the logged losses of both, their largest relative gap after warm-up and a plot to
`--out` (precision_curve.json / .md / .png).

    python scripts/precision_curve.py --preset small --steps 200          # on a GPU
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

RECIPE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "sft.py")


def run(precision: str, args, out_root: str) -> list[tuple[int, float]]:
    out = os.path.join(out_root, precision)
    cmd = [sys.executable, RECIPE, "--config", os.path.join(os.path.dirname(RECIPE), "configs", "sft_tiny.yaml"),
           "--preset", args.preset, "--config_overrides=", "--max_steps", str(args.steps), "--bf16", "true",
           "--precision", precision, "--logging_steps", "10", "--save_strategy", "steps", "--save_steps",
           str(args.steps), "--eval_after_training", "false", "--plot", "false", "--output_dir", out,
           "--seed", str(args.seed)]
    subprocess.run(cmd, check=True)
    with open(os.path.join(out, f"checkpoint-{args.steps}", "trainer_state.json")) as f:
        history = json.load(f)["log_history"]
    return [(h["step"], h["loss"]) for h in history if "loss" in h]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=50, help="steps left out of the comparison")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/benchmarks")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        curves = {precision: run(precision, args, tmp) for precision in ("autocast", "bf16_master")}
    ref, new = dict(curves["autocast"]), dict(curves["bf16_master"])
    gaps = {s: abs(new[s] - ref[s]) / ref[s] for s in ref if s in new and s > args.warmup}
    report = {"benchmark": "precision_curve", "preset": args.preset, "steps": args.steps, "seed": args.seed,
              "command": "python " + " ".join(sys.argv), "curves": curves,
              "max_rel_gap_after_warmup": max(gaps.values()) if gaps else None,
              "mean_rel_gap_after_warmup": sum(gaps.values()) / len(gaps) if gaps else None}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "precision_curve.json"), "w") as f:
        json.dump(report, f, indent=2)
    rows = "\n".join(f"| {s} | {ref[s]:.4f} | {new.get(s, float('nan')):.4f} |" for s in sorted(ref))
    with open(os.path.join(args.out, "precision_curve.md"), "w") as f:
        f.write(f"# bf16 + fp32 master weights vs autocast: {args.preset} preset, {args.steps} steps\n\n"
                f"`{report['command']}`\n\nLargest relative loss gap after step {args.warmup}: "
                f"{report['max_rel_gap_after_warmup']:.2%}; mean {report['mean_rel_gap_after_warmup']:.2%}.\n\n"
                f"| step | autocast | bf16 + master |\n|---|---|---|\n{rows}\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        for name, curve in curves.items():
            plt.plot(*zip(*curve), label=name)
        plt.xlabel("step"), plt.ylabel("loss"), plt.legend(), plt.title(f"{args.preset}: training precision")
        plt.savefig(os.path.join(args.out, "precision_curve.png"), dpi=120)
    except ImportError:
        pass
    print(json.dumps({k: report[k] for k in ("max_rel_gap_after_warmup", "mean_rel_gap_after_warmup")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
