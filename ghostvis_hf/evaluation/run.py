"""`ghostvis eval`: batched, left-padded greedy generation over a task, per-sample predictions and a metrics JSON.

Tasks: shapes (exact match per question type, with the text-prior chance level beside it), vqav2 and textvqa (VQA
soft accuracy), chartqa (relaxed accuracy), coco_captions (CIDEr, BLEU-4). Real datasets come from local paths or Hub
ids through the adapters in `ghostvis_hf.data`. Any data set in TRL's conversational format (`--data PATH` without
`--task`: the `conversations` loader) is scored on its final assistant turn, the prompt being every turn before it
with its images, by `--metric` (normalised exact match by default).
"""

import argparse
import inspect
import json
import logging
import os
from collections import defaultdict

import torch
from tqdm.auto import tqdm

from .. import data
from ..arg_types import folder_or_hub_id, positive_int
from ..inference.loader import QUANTIZE_CHOICES, QUANTIZE_HELP, load_model
from . import metrics

logger = logging.getLogger("ghostvis")

# A task is a dataset of the data registry (`ghostvis_hf.data.DATASETS`, loaded through `get_dataset`) and the metric
# that scores the whole set by default ("captions" = CIDEr + BLEU-4); `--metric` picks another from `metrics.METRICS`.
TASKS = {
    "shapes": "exact_match",
    "vqav2": "vqa_accuracy",
    "textvqa": "vqa_accuracy",
    "chartqa": "relaxed_accuracy",
    "coco_captions": "captions",
    "conversations": "exact_match",
}


def _prompt_messages(messages: list[dict]) -> list[dict]:
    """Everything before the final assistant turn (what the model must answer)."""
    if messages and messages[-1]["role"] == "assistant":
        return messages[:-1]
    return messages


def _final_answer(messages: list[dict]) -> str | None:
    """The text of the final assistant turn, or None if the conversation does not end with one."""
    if not messages or messages[-1]["role"] != "assistant":
        return None
    content = messages[-1]["content"]
    if isinstance(content, str):
        return content
    return "".join(part.get("text") or "" for part in content if part.get("type") == "text")


def _column(rows, name: str) -> list:
    """One column of a `datasets.Dataset` (read without decoding the images) or of a list of row dicts."""
    if isinstance(rows, list):
        return [row.get(name) for row in rows]
    return list(rows[name]) if name in rows.column_names else [None] * len(rows)


def references(rows) -> list[list[str]]:
    """Each row's reference answers: its `answers` column, else the text of its final assistant turn."""
    refs = []
    for answers, messages in zip(_column(rows, "answers"), _column(rows, "messages"), strict=True):
        answers = [a for a in (answers or []) if a is not None]
        if not answers:
            final = _final_answer(messages)
            answers = [final] if final is not None else []
        refs.append(answers)
    return refs


@torch.no_grad()
def generate_answers(model, processor, rows, batch_size: int = 32, max_new_tokens: int = 32, desc="eval"):
    """Greedy answers for dataset rows (`messages` + `images`), batched with left padding.

    Returns:
        `list[str]`: one decoded answer per row, special tokens removed and stripped.
    """
    return _decode(processor, generate_token_ids(model, processor, rows, batch_size, max_new_tokens, desc))


@torch.no_grad()
def generate_token_ids(model, processor, rows, batch_size: int = 32, max_new_tokens: int = 32,
                       desc="eval") -> list[list[int]]:
    """`model.generate`'s greedy tokens for each row's prompt, up to (not including) the end of the turn."""
    model.eval()
    device = next(model.parameters()).device
    stops = _stop_ids(model, processor)
    out_ids = []
    for texts, images in _prompt_batches(processor, rows, batch_size, desc):
        inputs = processor(text=texts, images=images if any(images) else None, padding=True, padding_side="left",
                           return_tensors="pt").to(device)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=sorted(stops),
                             pad_token_id=processor.tokenizer.pad_token_id)
        out_ids.extend(_until_stop(ids, stops) for ids in out[:, inputs["input_ids"].shape[1]:].tolist())
    return out_ids


def engine_token_ids(model, processor, rows, batch_size: int = 32, max_new_tokens: int = 32,
                     desc="eval (engine)", fused: bool | None = None, info: dict | None = None) -> list[list[int]]:
    """The same greedy answers through the serving engine (`inference.GenerationEngine`: on CUDA its fused decode
    kernels and CUDA graphs), from the same rendered prompts and images; `fused` as the engine's argument (`None`:
    its default; `True` off CUDA needs `TRITON_INTERPRET=1` and is slow: a check of the kernels' numerics). `info`,
    if given, receives how the engine decoded: `fused`, `device`, `dtype`."""
    from ..inference import GenerationEngine, SamplingParams

    stops = _stop_ids(model, processor)
    engine = GenerationEngine(model, processor, max_batch_size=batch_size, fused=fused)
    if info is not None:
        info.update(fused=bool(engine.fused), device=str(model.device), dtype=str(model.dtype).removeprefix("torch."))
    params = SamplingParams(temperature=0, max_new_tokens=max_new_tokens)
    out_ids = []
    try:
        for texts, images in _prompt_batches(processor, rows, batch_size, desc):
            results = engine.generate_batch([dict(prompt=t, images=i or None) for t, i in zip(texts, images)],
                                            params)
            out_ids.extend(_until_stop(r[0].token_ids, stops) for r in results)
    finally:
        engine.close()
    return out_ids


def token_agreement(reference: list[list[int]], other: list[list[int]]) -> dict:
    """How far two sets of greedy answers agree: `token_agreement` (reference tokens matched at the same position,
    end of answer included as a token), `identical` (answers equal throughout) and `n`.

    Example:
    ```python
    >>> token_agreement([[1, 2, 3], [4]], [[1, 2, 9], [4]])
    {'token_agreement': 0.8333..., 'identical': 0.5, 'n': 2}

    ```
    """
    matched = total = same = 0
    for ref, oth in zip(reference, other, strict=True):
        ref, oth = [*ref, None], [*oth, None]  # None: the end of the answer
        matched += sum(a == b for a, b in zip(ref, oth))
        total += len(ref)
        same += ref == oth
    return {"token_agreement": matched / max(total, 1), "identical": same / max(len(reference), 1),
            "n": len(reference)}


def _prompt_batches(processor, rows, batch_size: int, desc: str):
    """Each batch of rows as (rendered prompts, images per prompt), under a progress bar."""
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch"):
        batch = [rows[i] for i in range(start, min(start + batch_size, len(rows)))]
        yield ([processor.apply_chat_template(_prompt_messages(r["messages"]), add_generation_prompt=True)
                for r in batch], [list(r.get("images") or []) for r in batch])


def _stop_ids(model, processor) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = {processor.tokenizer.convert_tokens_to_ids("<|im_end|>"), processor.tokenizer.eos_token_id,
           *(eos if isinstance(eos, (list, tuple)) else [eos])}
    return {int(i) for i in ids if i is not None}


def _until_stop(ids: list[int], stops: set[int]) -> list[int]:
    return next((ids[:i] for i, t in enumerate(ids) if t in stops), ids)


def _decode(processor, token_ids: list[list[int]]) -> list[str]:
    return [t.strip() for t in processor.batch_decode(token_ids, skip_special_tokens=True)]


def score(task: str, predictions: list[str], rows, metric: str | None = None) -> dict:
    """Metrics for a task: `{metric: value, "metric": name, "score": value, "n": rows}`; shapes also reports per
    question type, with chance levels; `metric` (a name in `metrics.METRICS`) replaces the task's own."""
    refs = references(rows)
    kind = metric or TASKS[task]
    if kind == "captions":
        result = metrics.caption_scores(predictions, refs)
    elif kind in metrics.METRICS:
        value = metrics.METRICS[kind](predictions, refs)
        result = {kind: value, "metric": kind, "score": value}
    else:
        raise ValueError(f"Unknown metric {kind!r}; allowed: {sorted(metrics.METRICS)}")
    if task == "shapes":
        result.update(_shapes_breakdown(predictions, refs, rows))
    result["n"] = len(predictions)
    return result


def _shapes_breakdown(predictions: list[str], refs: list[list[str]], rows) -> dict:
    by_type = defaultdict(lambda: ([], []))
    for p, r, q in zip(predictions, refs, _column(rows, "question_type")):
        by_type[q][0].append(p)
        by_type[q][1].append(r)
    result = {"by_question_type": {
        q: {"exact_match": metrics.exact_match(p, r), "n": len(p)} for q, (p, r) in sorted(by_type.items())
    }}
    # The best a text-only model can do: the most common *training* answer for each exact question.
    chance = data.chance_accuracy(rows, train_data=data.load_shapes("train", num_samples=4000))
    for q, entry in result["by_question_type"].items():
        entry["chance"] = chance.get(q)
    target = [p for q in ("color", "shape") for p in zip(*by_type[q])] if by_type else []
    if target:
        result["color_shape_accuracy"] = metrics.exact_match([p for p, _ in target], [r for _, r in target])
    return result


def load_task(task: str, path: str | None, split: str | None, limit: int | None, seed: int = 0,
              answer_style: str | None = None, image_root: str | None = None):
    """The rows of a task's dataset: shapes is generated (its test split by default), the others read from `path`.

    `answer_style` (`short` | `none`) goes to the loaders that rewrite prompts (the VQA-style adapters default to
    `short`, conversational data to `none`); `None` keeps the loader's default.
    """
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; allowed: {sorted(TASKS)}")
    kwargs = {}
    if answer_style is not None:
        if "answer_style" not in inspect.signature(data.DATASETS[task]).parameters:
            raise ValueError(f"--answer_style does not apply to task {task!r}: its prompts are never rewritten")
        kwargs["answer_style"] = answer_style
    if task == "shapes":
        return data.get_dataset(task, split=split or "test", limit=limit, seed=seed)
    if path is None:
        raise ValueError(f"--data PATH (local folder/file or Hub id) is required for task {task!r}")
    if image_root is not None:
        kwargs["image_root"] = image_root
    # conversations: a single data file (or a source with one split) is served whatever the split's name
    default_split = "test" if task == "conversations" else "validation"
    rows = data.get_dataset(task, path_or_hub_id=path, split=split or default_split, limit=limit, **kwargs)
    logger.info("eval %s: %d rows from %s (answer_style: %s)", task, len(rows), path,
                answer_style or "the loader's default")
    return rows


def format_report(task: str, result: dict) -> str:
    head = f"task {task}: " + ", ".join(
        f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float) and k != "score")
    lines = [f"{head} (n={result['n']})" if "n" in result else head]
    for q, entry in result.get("by_question_type", {}).items():
        chance = entry.get("chance")
        chance_s = f"chance {chance:6.1%}" if chance is not None else ""
        lines.append(f"  {q:<9} exact match {entry['exact_match']:6.1%}  {chance_s}  (n={entry['n']})")
    if "color_shape_accuracy" in result:
        lines.append(f"  colour+shape held-out accuracy: {result['color_shape_accuracy']:.1%}")
    return "\n".join(lines)


def _default_max_new_tokens(task: str, processor, refs: list[list[str]]) -> int:
    if task in ("coco_captions", "shapes"):
        return 48
    if task != "conversations":
        return 16
    # Your own data: room for the longest reference answer (+ a margin to see what the model says past it).
    longest = max((len(processor.tokenizer(r)["input_ids"]) for answers in refs for r in answers), default=0)
    return min(512, longest + 8)


def evaluate(model, processor, task: str, rows, batch_size=32, max_new_tokens=None, out_dir=None,
             metric: str | None = None, save_predictions: bool = True, backend: str = "generate",
             fused: bool | None = None) -> dict:
    """Runs generation + scoring; writes `metrics.json` (and `predictions.jsonl`) under `out_dir` if given.

    Args:
        model, processor: a GhostVis model and its processor.
        task (`str`): a name in `TASKS`; decides the default metric and, for shapes, the per-type breakdown.
        rows (`datasets.Dataset`): rows in the GhostVis schema (`messages`, `images`, `answers`); each is answered
            from every turn before its final assistant turn.
        batch_size (`int`): generation batch size.
        max_new_tokens (`int`, *optional*): defaults per task (for conversations: the longest reference + 8).
        out_dir (`str`, *optional*): folder for the outputs.
        metric (`str`, *optional*): a name in `metrics.METRICS` instead of the task's own.
        save_predictions (`bool`): also write one JSON line per row (question, prediction, references).
        backend (`str`, defaults to `"generate"`): `"generate"` (`model.generate`), `"engine"` (the serving engine,
            `engine_token_ids`) or `"both"`: scored from `generate`, with the engine's metrics under `"engine"` and
            the two's greedy `token_agreement` under `"agreement"`.
        fused (`bool`, *optional*): the engine's `fused` argument (see `engine_token_ids`).

    Returns:
        `dict`: the metrics (see `score`).
    """
    if backend not in ("generate", "engine", "both"):
        raise ValueError(f"backend must be generate, engine or both, got {backend!r}")
    if task == "conversations":
        rows = _answerable(rows)
    if max_new_tokens is None:
        max_new_tokens = _default_max_new_tokens(task, processor, references(rows))
    kwargs = dict(batch_size=batch_size, max_new_tokens=max_new_tokens)
    engine_ids = reference_ids = None
    engine_info = {}
    if backend in ("engine", "both"):
        engine_ids = engine_token_ids(model, processor, rows, desc=f"eval {task} (engine)", fused=fused,
                                      info=engine_info, **kwargs)
    if backend == "both":
        reference_ids = generate_token_ids(model, processor, rows, desc=f"eval {task}", **kwargs)
    if backend == "generate":
        predictions = generate_answers(model, processor, rows, desc=f"eval {task}", **kwargs)
    else:
        predictions = _decode(processor, reference_ids if backend == "both" else engine_ids)
    result = score(task, predictions, rows, metric=metric)
    result["backend"] = "engine" if backend == "engine" else "generate"
    if engine_info:
        result["engine_decode"] = engine_info
    if backend == "both":
        result["engine"] = score(task, _decode(processor, engine_ids), rows, metric=metric)
        result["agreement"] = token_agreement(reference_ids, engine_ids)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        if save_predictions:
            _write_predictions(os.path.join(out_dir, "predictions.jsonl"), rows, predictions)
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            json.dump({"task": task, **result}, f, indent=2)
    return result


def _answerable(rows):
    """Rows whose conversation ends with an assistant turn (the answer to score); the rest are dropped, counted."""
    keep = [i for i, messages in enumerate(_column(rows, "messages")) if _final_answer(messages) is not None]
    if not keep:
        raise ValueError("eval: no row ends with an assistant turn (the answer to score)")
    if len(keep) == len(rows):
        return rows
    logger.warning("eval: %d of %d row(s) do not end with an assistant turn: nothing to score, skipped",
                   len(rows) - len(keep), len(rows))
    return [rows[i] for i in keep] if isinstance(rows, list) else rows.select(keep)


def _write_predictions(path: str, rows, predictions: list[str]) -> None:
    columns = zip(_column(rows, "messages"), _column(rows, "question_type"), references(rows), predictions)
    with open(path, "w") as f:
        for messages, question_type, refs, pred in columns:
            # the last user turn's text: the question the prediction answers
            question = next((p["text"] for m in reversed(_prompt_messages(messages)) if m["role"] == "user"
                             for p in m["content"] if p["type"] == "text"), "")
            f.write(json.dumps({"question": question, "prediction": pred, "answers": refs,
                                "question_type": question_type}) + "\n")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ghostvis eval", description=main.__doc__)
    parser.add_argument("--model", required=True, type=folder_or_hub_id, help="checkpoint folder or Hub id")
    parser.add_argument("--task", default=None, choices=sorted(TASKS),
                        help="a built-in task; without it, --data is your own conversational data (task conversations)")
    parser.add_argument("--data", default=None,
                        help="dataset folder/file or Hub id (all tasks but shapes); alone: TRL conversational data "
                             "(jsonl/json/parquet/csv, a save_to_disk folder, an imagefolder, a Hub id)")
    parser.add_argument("--metric", default=None, choices=sorted(metrics.METRICS),
                        help="score with this metric instead of the task's (conversations: exact_match)")
    parser.add_argument("--answer_style", "--answer-style", default=None, choices=sorted(data.ANSWER_STYLES),
                        help="prompt rewriting by the loader: short appends 'Answer the question using a single word "
                             "or phrase.' (default for vqav2/textvqa/chartqa), none keeps it (default for --data)")
    parser.add_argument("--split", default=None, help="split (default: test for shapes and --data, validation for "
                                                      "the other tasks; a single data file is served as any split)")
    parser.add_argument("--image_root", "--image-root", default=None,
                        help="folder relative image paths resolve against (default: the data file's folder)")
    parser.add_argument("--limit", type=positive_int, default=None, help="score only the first N rows")
    parser.add_argument("--batch_size", "--batch-size", type=positive_int, default=32)
    parser.add_argument("--max_new_tokens", "--max-new-tokens", type=positive_int, default=None)
    parser.add_argument("--out", default=None, help="folder for metrics.json and predictions.jsonl "
                                                    "(default: MODEL/eval_TASK)")
    parser.add_argument("--predictions", action=argparse.BooleanOptionalAction, default=True,
                        help="write predictions.jsonl (one line per row: question, prediction, answers)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="weights' dtype (default: the checkpoint's own)")
    parser.add_argument("--backend", default="generate", choices=("generate", "engine", "both"),
                        help="generate: model.generate; engine: the serving engine (fused decode on CUDA); both: "
                             "score generate's answers and report the engine's next to them, with their greedy "
                             "token agreement")
    parser.add_argument("--fused", action=argparse.BooleanOptionalAction, default=None,
                        help="the engine's fused Triton decode (default: on CUDA where supported); --fused off CUDA "
                             "runs the kernels in Triton's interpreter with TRITON_INTERPRET=1 (slow: a numerics check)")
    parser.add_argument("--quantize", default=None, choices=QUANTIZE_CHOICES,
                        help=QUANTIZE_HELP + "; the checkpoint is quantized at load (`load_model`), results go to "
                             "eval_TASK_QUANTIZE by default")
    return parser


def main(argv=None) -> int:
    """`ghostvis eval --model PATH --task shapes|vqav2|textvqa|chartqa|coco_captions [--data PATH] [--limit N]`, or
    `ghostvis eval --model PATH --data PATH [--metric exact_match|vqa_accuracy|relaxed_accuracy|anls]` for your own
    conversational data."""
    args = _parser().parse_args(argv)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if args.task is None and args.data is None:
        _parser().error("give --task, or --data PATH for your own conversational data")
    task = args.task or "conversations"
    logging.basicConfig(format="%(name)s %(levelname)s: %(message)s")
    logger.setLevel(logging.INFO)
    rows = load_task(task, args.data, args.split, args.limit, answer_style=args.answer_style,
                     image_root=args.image_root)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.quantize:  # float32 on the CPU, bfloat16 on CUDA (load_model's defaults), then quantized
        model, processor = load_model(args.model, quantize=args.quantize, device=args.device,
                                      **({"dtype": dtype} if dtype else {}))
    else:
        model = AutoModelForImageTextToText.from_pretrained(args.model, trust_remote_code=True,
                                                            dtype=dtype or "auto").to(args.device)
        processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    name = f"eval_{task}" + "".join(f"_{v}" for v in (args.quantize, args.dtype) if v) + (
        f"_{args.backend}" if args.backend != "generate" else "")
    out_dir = args.out or os.path.join(args.model if os.path.isdir(args.model) else ".", name)
    result = evaluate(model, processor, task, rows, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                      out_dir=out_dir, metric=args.metric, save_predictions=args.predictions, backend=args.backend,
                      fused=args.fused)
    print(format_report(task, result))
    if "engine" in result:
        agree = result["agreement"]
        print(f"engine: score {result['engine']['score']:.4f} (generate {result['score']:.4f}); greedy tokens "
              f"agreeing with generate {agree['token_agreement']:.2%}, identical answers {agree['identical']:.2%} "
              f"(n={agree['n']})")
    print(f"wrote {out_dir}/metrics.json" + (" and predictions.jsonl" if args.predictions else ""))
    return 0
