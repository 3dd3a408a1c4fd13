"""The end every recipe shares: a complete checkpoint folder, its model card, an optional evaluation of the saved
folder, a learning-curve plot and a JSON summary.

The folder is complete on its own (weights, config, processor, code files for `trust_remote_code`, `README.md`): a LoRA
run also keeps its adapter under `adapter/` and saves the merged model at the top.
"""

import json
import logging
import os

from .plotting import plot_learning_curve

logger = logging.getLogger("ghostvis")


def finish(trainer, processor, output_dir: str, *, origin: str, summary: dict, summary_file: str,
           plot: bool = True, title: str = "GhostVis training", plot_file: str = "learning_curve.png",
           plot_keys=("loss",), held_out=None, eval_batch_size: int = 32) -> dict | None:
    """Saves the trained model as a complete checkpoint folder and writes what the run measured.

    Every process takes part in `trainer.save_model` (ZeRO-3 gathers the shards); the rest runs on the main process.

    Args:
        trainer (`transformers.Trainer`): the trainer after `train()`.
        processor (`GhostVisProcessor`): saved next to the weights.
        output_dir (`str`): the checkpoint folder.
        origin (`str`): how the model was made, for the model card.
        summary (`dict`): what the recipe measured; `steps` (and `eval`, with `held_out`) are added.
        summary_file (`str`): JSON file name of the summary in `output_dir`.
        plot (`bool`, *optional*, defaults to `True`): plot the logged `plot_keys` against the step as `plot_file`.
        title (`str`, *optional*): the plot's title.
        plot_file (`str`, *optional*, defaults to `"learning_curve.png"`): the plot's file name in `output_dir`.
        plot_keys (`tuple[str]`, *optional*, defaults to `("loss",)`): logged values to plot.
        held_out (`datasets.Dataset`, *optional*): held-out rows to score the *saved* folder on (reloaded as users
            will, `evaluate_checkpoint`); the plot is annotated with the score.
        eval_batch_size (`int`, *optional*, defaults to 32): generation batch size of that evaluation.

    Returns:
        `dict`: the summary on the main process, `None` on the others.
    """
    model = trainer.accelerator.unwrap_model(trainer.model)
    if _is_peft(model):
        trainer.save_model(os.path.join(output_dir, "adapter"))
        trainer.model = model = model.merge_and_unload()
    trainer.save_model(output_dir)
    if not trainer.is_world_process_zero():
        return None
    from ..hub import model_card

    processor.save_pretrained(output_dir)
    with open(os.path.join(output_dir, "README.md"), "w") as f:
        f.write(model_card(model, repo=output_dir, origin=origin))
    summary = {**summary, "steps": trainer.state.global_step}
    if held_out is not None:
        summary["eval"] = evaluate_checkpoint(output_dir, held_out, eval_batch_size, trainer.args.device)
    if plot:
        result = summary.get("eval", {})
        what, acc = next(((w, result[k]) for k, w in (("color_shape_accuracy", "colour+shape accuracy"),
                                                      ("exact_match", "exact match")) if k in result), (None, None))
        plot_learning_curve(trainer.state.log_history, os.path.join(output_dir, plot_file), title=title,
                            keys=plot_keys, annotate=f"held-out {what} {acc:.1%}" if acc is not None else None)
    with open(os.path.join(output_dir, summary_file), "w") as f:
        json.dump(summary, f, indent=2)
    logger.info("checkpoint saved to %s", output_dir)
    return summary


def evaluate_checkpoint(path: str, held_out, batch_size: int, device="cpu") -> dict:
    """Reloads a saved checkpoint (as users will), scores it on the held-out rows and prints the report.

    Rows of one registered task (shapes, vqav2, ...) are scored by that task (`ghostvis eval --task`: shapes per
    question type next to the chance level); any other rows (your own data, mixtures) by exact match (normalised) of
    the final assistant turn, overall, per source and per question type, written under `eval_held_out/`.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ..evaluation.run import TASKS, evaluate, format_report

    model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True).to(device)
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    sources = set(held_out["source"])
    task = sources.pop() if len(sources) == 1 else None
    if task in TASKS and task != "conversations":
        result = evaluate(model, processor, task, held_out, batch_size=batch_size,
                          out_dir=os.path.join(path, f"eval_{task}"))
        print(format_report(task, result), flush=True)
        return result
    return score_final_turns(model, processor, held_out, batch_size, os.path.join(path, "eval_held_out"))


def score_final_turns(model, processor, rows, batch_size: int, out_dir: str | None = None) -> dict:
    """Greedy answers to every row's conversation up to its final assistant turn, scored by normalised exact match
    against that turn (`answers`); prints the report and writes `predictions.jsonl` + `metrics.json` to `out_dir`."""
    from collections import defaultdict

    from ..evaluation.metrics import exact_match
    from ..evaluation.run import generate_answers

    references = [list(answers) for answers in rows["answers"]]
    texts = [a for refs in references for a in refs] or [""]
    longest = max(len(ids) for ids in processor.tokenizer(texts)["input_ids"])
    predictions = generate_answers(model, processor, rows, batch_size=batch_size,
                                   max_new_tokens=min(256, longest + 8), desc="eval held-out")
    result = {"exact_match": exact_match(predictions, references), "n": len(predictions)}
    for key in ("source", "question_type"):
        groups = defaultdict(list)
        for i, value in enumerate(rows[key]):
            groups[value].append(i)
        result[f"by_{key}"] = {value: {"exact_match": exact_match([predictions[i] for i in idx],
                                                                  [references[i] for i in idx]), "n": len(idx)}
                               for value, idx in sorted(groups.items())}
    lines = [f"held-out exact match {result['exact_match']:.1%} (n={result['n']})"]
    lines += [f"  {value:<14} exact match {entry['exact_match']:6.1%}  (n={entry['n']})"
              for value, entry in result["by_question_type"].items()]
    print("\n".join(lines), flush=True)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "predictions.jsonl"), "w") as f:
            for row, prediction in zip(rows, predictions):
                f.write(json.dumps({"messages": row["messages"][:-1], "prediction": prediction,
                                    "answers": list(row["answers"]), "source": row["source"]}) + "\n")
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            json.dump({"task": "held_out", "metric": "exact_match", **result}, f, indent=2)
    return result


def _is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)
