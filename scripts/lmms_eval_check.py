"""One GhostVis checkpoint, the same held-out shapes rows, scored by lmms-eval (batch 1 and 4) and by `ghostvis eval`.

    python scripts/lmms_eval_check.py --model outputs/ghostvis-tiny-sft --lmms-python .venv-lmms/bin/python \
        --json docs/benchmarks/lmms_eval.json

Run it from the project's environment (it writes the rows with `ghostvis_hf` and runs `ghostvis eval` with this
Python); lmms-eval runs in its own environment, since it pins its own dependencies:

    python3 -m venv .venv-lmms
    .venv-lmms/bin/pip install torch==2.13.0        # a CPU build (https://download.pytorch.org/whl/cpu)
    .venv-lmms/bin/pip install lmms-eval==0.7.3 "filelock<4"
    .venv-lmms/bin/pip uninstall -y torchvision      # see below
    .venv-lmms/bin/pip install -e .                  # registers `--model ghostvis` (lmms_eval.models entry point)

lmms-eval requires torchvision, and PyPI's torchvision wheels are built against CUDA torch: next to a CPU torch they
fail to load (`operator torchvision::nms does not exist`), and transformers then fails to import its image models.
Nothing on this path uses torchvision, so it is uninstalled (where download.pytorch.org is reachable, install its
matching CPU torchvision instead).

Steps: (1) the first `--limit` rows of shapes' test split, which `ghostvis eval --task shapes --limit N` scores, go
to a parquet file, and the task (`scripts/lmms_eval/`: the yaml with the parquet's path filled in, `utils.py`) to a
work folder; (2) `lmms-eval eval --model ghostvis --include_path WORK --tasks ghostvis_shapes --log_samples` runs at
batch size 1 and 4 on the unmodified checkpoint (`trust_remote_code=True`, CPU, `dtype=auto`: the checkpoint's dtype,
as `ghostvis eval` loads it); (3) `ghostvis eval` scores the same rows; (4) exact match and every prediction are
compared. Exit status 0 only if all three agree. `--bf16-batch-sizes 1,4` also runs lmms-eval in the bfloat16 it uses
by default, reported beside them but not checked (bfloat16 rounding changes a few greedy answers).

NOTE: lmms-eval 0.7.3 exits 0 when the evaluation itself failed (a model that cannot load or generate), so success is
read from its results and samples files, never from its exit code.
"""

import argparse
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TASK = "ghostvis_shapes"
METRIC = "ghostvis_exact_match"


def write_task(work: str, limit: int) -> list[dict]:
    """Writes the parquet rows and the lmms-eval task into `work`; returns the rows (question, answers)."""
    from datasets import Dataset, Features, Image, List, Value

    from ghostvis_hf.evaluation.run import load_task

    rows = load_task("shapes", None, None, limit)  # exactly what `ghostvis eval --task shapes --limit N` loads
    flat = {"image": [], "question": [], "answers": [], "question_type": []}
    for row in rows:
        (image,) = row["images"]
        flat["image"].append(image)
        flat["question"].append(next(p["text"] for p in row["messages"][0]["content"] if p["type"] == "text"))
        flat["answers"].append(list(row["answers"]))
        flat["question_type"].append(row["question_type"])
    features = Features({"image": Image(), "question": Value("string"), "answers": List(Value("string")),
                         "question_type": Value("string")})
    parquet = os.path.join(work, f"{TASK}.parquet")
    Dataset.from_dict(flat, features=features).to_parquet(parquet)
    with open(os.path.join(HERE, "lmms_eval", f"{TASK}.yaml.in")) as f:
        yaml = f.read().replace("@PARQUET@", parquet)
    with open(os.path.join(work, f"{TASK}.yaml"), "w") as f:
        f.write(yaml)
    shutil.copy(os.path.join(HERE, "lmms_eval", "utils.py"), work)
    return [{"question": q, "answers": a} for q, a in zip(flat["question"], flat["answers"])]


def lmms_command(lmms_python: str, model: str, work: str, batch_size: int, out: str, dtype: str | None) -> list[str]:
    model_args = f"pretrained={model},device=cpu,device_map=cpu,trust_remote_code=True"
    return [lmms_python, "-m", "lmms_eval", "eval", "--model", "ghostvis",
            "--model_args", model_args + (f",dtype={dtype}" if dtype else ""),
            "--tasks", TASK, "--include_path", work, "--batch_size", str(batch_size),
            "--output_path", out, "--log_samples"]


def run_lmms(lmms_python: str, model: str, work: str, batch_size: int, out: str, dtype: str | None, env: dict) -> dict:
    """One lmms-eval run; its score and predictions (in document order) read from the files it wrote."""
    cmd = lmms_command(lmms_python, model, work, batch_size, out, dtype)
    start = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.time() - start
    results = glob.glob(os.path.join(out, "**", "*_results.json"), recursive=True)
    samples = glob.glob(os.path.join(out, "**", f"*_samples_{TASK}.jsonl"), recursive=True)
    if len(results) != 1 or len(samples) != 1:  # exit code 0 proves nothing (module docstring)
        raise RuntimeError(f"lmms-eval (batch {batch_size}, exit code {proc.returncode}) wrote no results:\n"
                           + (proc.stdout + proc.stderr)[-4000:])
    with open(results[0]) as f:
        score = json.load(f)["results"][TASK][f"{METRIC},none"]
    with open(samples[0]) as f:
        docs = sorted((json.loads(line) for line in f), key=lambda s: s["doc_id"])
    return {"exit_code": proc.returncode, "seconds": round(seconds, 1), "exact_match": score,
            "questions": [d["input"] for d in docs],  # the doc_to_text of each row
            "predictions": [_response(d).strip() for d in docs]}


def _response(sample: dict) -> str:
    resp = sample["filtered_resps"]  # a string in 0.7.3's samples file; a list (per repeat) in older releases
    while isinstance(resp, list):
        resp = resp[0]
    return resp


def run_ghostvis_eval(model: str, limit: int, out: str, env: dict) -> dict:
    cmd = [sys.executable, "-m", "ghostvis_hf.cli", "eval", "--model", model, "--task", "shapes", "--limit",
           str(limit), "--device", "cpu", "--out", out]
    start = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.time() - start
    if proc.returncode != 0:
        raise RuntimeError(f"ghostvis eval failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    with open(os.path.join(out, "predictions.jsonl")) as f:
        preds = [json.loads(line) for line in f]
    return {"seconds": round(seconds, 1), "exact_match": metrics["exact_match"],
            "color_shape_accuracy": metrics.get("color_shape_accuracy"),
            "questions": [p["question"] for p in preds], "predictions": [p["prediction"] for p in preds]}


def _versions(lmms_python: str) -> dict:
    code = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
            "('lmms-eval', 'torch', 'transformers', 'filelock')}))")
    lmms = json.loads(subprocess.run([lmms_python, "-c", code], capture_output=True, text=True, check=True).stdout)
    import torch
    import transformers

    return {"lmms_env": lmms, "project_env": {"torch": torch.__version__, "transformers": transformers.__version__},
            "python": platform.python_version(), "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores"}


def compare(reference: dict, runs: dict) -> list[str]:
    """Every way the lmms-eval runs differ from `ghostvis eval` (empty when they agree)."""
    problems = []
    for name, run in runs.items():
        if run["questions"] != reference["questions"]:
            problems.append(f"{name}: the rows are not the ones ghostvis eval scored")
            continue
        if abs(run["exact_match"] - reference["exact_match"]) > 1e-9:
            problems.append(f"{name}: exact match {run['exact_match']:.4f} != ghostvis eval "
                            f"{reference['exact_match']:.4f}")
        for i, (a, b) in enumerate(zip(run["predictions"], reference["predictions"])):
            if a != b:
                problems.append(f"{name}: row {i} ({reference['questions'][i]!r}): {a!r} != ghostvis eval {b!r}")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint folder (as saved by GhostVis, unmodified)")
    parser.add_argument("--lmms-python", required=True, help="Python of the environment lmms-eval is installed in")
    parser.add_argument("--limit", type=int, default=40, help="held-out shapes rows to score")
    parser.add_argument("--batch-sizes", default="1,4", help="lmms-eval batch sizes, comma-separated")
    parser.add_argument("--bf16-batch-sizes", default="",
                        help="also run lmms-eval in its bfloat16 at these batch sizes; reported, not checked")
    parser.add_argument("--work", default=None, help="work folder (default: a new temporary one)")
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args(argv)

    model = os.path.abspath(args.model)
    work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="lmms_eval_check_"))
    os.makedirs(work, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    write_task(work, args.limit)
    reference = run_ghostvis_eval(model, args.limit, os.path.join(work, "ghostvis_eval"), env)
    # In the checkpoint's dtype (`dtype=auto`), as `ghostvis eval` loads it: these runs must agree with it exactly.
    plan = {f"lmms_eval_batch{b}": (b, "auto") for b in (int(x) for x in args.batch_sizes.split(","))}
    for b in (int(x) for x in args.bf16_batch_sizes.split(",") if x):
        plan[f"lmms_eval_batch{b}_bfloat16"] = (b, None)
    runs, commands = {}, {"ghostvis_eval": f"ghostvis eval --model {args.model} --task shapes --limit {args.limit} "
                                           "--device cpu --out OUT"}
    for name, (b, dtype) in plan.items():
        runs[name] = run_lmms(args.lmms_python, model, work, b, os.path.join(work, name), dtype, env)
        commands[name] = " ".join(["lmms-eval"] + lmms_command("python", args.model, "WORK", b, "OUT", dtype)[3:])
    checked = {name: run for name, run in runs.items() if plan[name][1] == "auto"}
    problems = compare(reference, checked)
    summary = {
        "model": args.model, "rows": f"shapes test split, first {args.limit} rows (ghostvis eval --limit)",
        "agree": not problems, "problems": problems, "commands": commands,
        "ghostvis_eval": {k: v for k, v in reference.items() if k != "questions"},
        **{name: {k: v for k, v in run.items() if k != "questions"} for name, run in runs.items()},
        "not_checked": {name: compare(reference, {name: run}) for name, run in runs.items() if name not in checked},
        "versions": _versions(args.lmms_python),
    }
    for name, run in [("ghostvis_eval", reference), *runs.items()]:
        print(f"{name:<28} exact match {run['exact_match']:.4f}  ({run['seconds']:.0f} s)")
    for name, diffs in summary["not_checked"].items():
        print(f"{name} (not checked): " + ("; ".join(d.split(": ", 1)[1] for d in diffs) if diffs else "agrees too"))
    print("\n".join(problems) if problems else f"agree: same exact match and the same {args.limit} predictions")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
            f.write("\n")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
