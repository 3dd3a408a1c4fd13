"""`ghostvis eval`: batched, left-padded greedy generation over a task, per-sample predictions and a metrics JSON.

Tasks: shapes (exact match per question type, with the text-prior chance level beside it), vqav2 and textvqa (VQA
soft accuracy), chartqa (relaxed accuracy), coco_captions (CIDEr, BLEU-4). Real datasets come from local paths or Hub
ids through the adapters in `ghostvis_hf.data`.
"""

import argparse
import json
import os
from collections import defaultdict

import torch
from tqdm.auto import tqdm

from .. import data
from . import metrics

# A task is a dataset of the data registry (`ghostvis_hf.data.DATASETS`, loaded through `get_dataset`) and the metric
# that scores the whole set ("captions" = CIDEr + BLEU-4).
TASKS = {
    "shapes": "exact_match",
    "vqav2": "vqa_accuracy",
    "textvqa": "vqa_accuracy",
    "chartqa": "relaxed_accuracy",
    "coco_captions": "captions",
}


def _prompt_messages(messages: list[dict]) -> list[dict]:
    """Everything before the final assistant turn (what the model must answer)."""
    if messages and messages[-1]["role"] == "assistant":
        return messages[:-1]
    return messages


@torch.no_grad()
def generate_answers(model, processor, rows, batch_size: int = 32, max_new_tokens: int = 32, desc="eval"):
    """Greedy answers for dataset rows (`messages` + `images`), batched with left padding.

    Returns:
        `list[str]`: one decoded answer per row, special tokens removed and stripped.
    """
    model.eval()
    device = next(model.parameters()).device
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    answers = []
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch"):
        batch = [rows[i] for i in range(start, min(start + batch_size, len(rows)))]
        texts = [processor.apply_chat_template(_prompt_messages(r["messages"]), add_generation_prompt=True)
                 for r in batch]
        images = [list(r.get("images") or []) for r in batch]
        inputs = processor(text=texts, images=images if any(images) else None, padding=True, padding_side="left",
                           return_tensors="pt").to(device)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                             pad_token_id=processor.tokenizer.pad_token_id)
        new = out[:, inputs["input_ids"].shape[1]:]
        answers.extend(t.strip() for t in processor.batch_decode(new, skip_special_tokens=True))
    return answers


def score(task: str, predictions: list[str], rows) -> dict:
    """Metrics for a task; shapes also reports per question type, with chance levels."""
    references = [list(r["answers"]) for r in rows]
    kind = TASKS[task]
    if kind == "captions":
        result = metrics.caption_scores(predictions, references)
    else:
        result = {kind: getattr(metrics, kind)(predictions, references)}
    if task == "shapes":
        by_type = defaultdict(lambda: ([], []))
        for p, r, row in zip(predictions, references, rows):
            by_type[row["question_type"]][0].append(p)
            by_type[row["question_type"]][1].append(r)
        result["by_question_type"] = {
            q: {"exact_match": metrics.exact_match(p, r), "n": len(p)} for q, (p, r) in sorted(by_type.items())
        }
        # The best a text-only model can do: the most common *training* answer for each exact question.
        chance = data.chance_accuracy(rows, train_data=data.load_shapes("train", num_samples=4000))
        for q, entry in result["by_question_type"].items():
            entry["chance"] = chance.get(q)
        target = [p for q in ("color", "shape") for p in zip(*by_type[q])] if by_type else []
        if target:
            result["color_shape_accuracy"] = metrics.exact_match([p for p, _ in target], [r for _, r in target])
    result["n"] = len(predictions)
    return result


def load_task(task: str, path: str | None, split: str, limit: int | None, seed: int = 0):
    """The rows of a task's dataset: shapes is generated (its test split by default), the others read from `path`."""
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; allowed: {sorted(TASKS)}")
    if task == "shapes":
        return data.get_dataset(task, split=split or "test", limit=limit, seed=seed)
    if path is None:
        raise ValueError(f"--data PATH (local folder/file or Hub id) is required for task {task!r}")
    return data.get_dataset(task, path_or_hub_id=path, split=split or "validation", limit=limit)


def format_report(task: str, result: dict) -> str:
    lines = [f"task {task}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float))]
    for q, entry in result.get("by_question_type", {}).items():
        chance = entry.get("chance")
        chance_s = f"chance {chance:6.1%}" if chance is not None else ""
        lines.append(f"  {q:<9} exact match {entry['exact_match']:6.1%}  {chance_s}  (n={entry['n']})")
    if "color_shape_accuracy" in result:
        lines.append(f"  colour+shape held-out accuracy: {result['color_shape_accuracy']:.1%}")
    return "\n".join(lines)


def evaluate(model, processor, task: str, rows, batch_size=32, max_new_tokens=None, out_dir=None) -> dict:
    """Runs generation + scoring; writes `predictions.jsonl` and `metrics.json` under `out_dir` if given."""
    if max_new_tokens is None:
        max_new_tokens = 48 if task in ("coco_captions", "shapes") else 16
    predictions = generate_answers(model, processor, rows, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                   desc=f"eval {task}")
    result = score(task, predictions, rows)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "predictions.jsonl"), "w") as f:
            for row, pred in zip(rows, predictions):
                question = next((p["text"] for p in row["messages"][0]["content"] if p["type"] == "text"), "")
                f.write(json.dumps({"question": question, "prediction": pred, "answers": list(row["answers"]),
                                    "question_type": row.get("question_type")}) + "\n")
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            json.dump({"task": task, **result}, f, indent=2)
    return result


def main(argv=None) -> int:
    """`ghostvis eval --model PATH --task shapes|vqav2|textvqa|chartqa|coco_captions [--limit N]`."""
    parser = argparse.ArgumentParser(prog="ghostvis eval", description=main.__doc__)
    parser.add_argument("--model", required=True, help="checkpoint folder or Hub id")
    parser.add_argument("--task", required=True, choices=sorted(TASKS))
    parser.add_argument("--data", default=None, help="dataset folder/file or Hub id (all tasks but shapes)")
    parser.add_argument("--split", default=None)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--out", default=None, help="folder for predictions.jsonl and metrics.json")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    rows = load_task(args.task, args.data, args.split, args.limit)
    model = AutoModelForImageTextToText.from_pretrained(args.model, trust_remote_code=True).to(args.device)
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    out_dir = args.out or os.path.join(args.model if os.path.isdir(args.model) else ".", f"eval_{args.task}")
    result = evaluate(model, processor, args.task, rows, batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens, out_dir=out_dir)
    print(format_report(args.task, result))
    print(f"wrote {out_dir}/metrics.json and predictions.jsonl")
    return 0
