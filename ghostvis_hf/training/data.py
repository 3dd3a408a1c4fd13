"""What the recipes train on: conversational rows (+ a held-out split) for SFT and alignment, prompt-only rows for RL.

The sources themselves live in `ghostvis_hf.data`; this module only picks and mixes them from the recipe arguments.
"""

import os

from .arguments import GhostVisArguments, RLArguments


def load_train_and_eval_data(dataset_name: str | None, args: GhostVisArguments):
    """(train, held-out) datasets in TRL's conversational vision format; held-out is `None` except for shapes.

    The rows the loaders drop follow `args.bad_rows`: refused under `"error"`; under `"skip"` their record rides on the
    training set (`data.validate.DROPPED_AT_LOAD`) so that `validate_rows` counts them in the report with its own.
    """
    from ..data.validate import DROPPED_AT_LOAD, recording_bad_rows

    with recording_bad_rows(args.bad_rows) as dropped:
        train, held_out = _load(dataset_name, args)
    setattr(train, DROPPED_AT_LOAD, dropped)
    return train, held_out


def _load(dataset_name: str | None, args: GhostVisArguments):
    from .. import data

    if args.dataset_mixture:
        parts = []
        for spec in args.dataset_mixture:
            try:
                name, path, weight = spec.rsplit(":", 2) if spec.count(":") >= 2 else (*spec.split(":"), "1")
            except ValueError:
                raise ValueError(f"dataset_mixture entry {spec!r} is not name:path:weight") from None
            parts.append((data.get_dataset(name, path_or_hub_id=path, split="train"), float(weight)))
        return data.mix_datasets(parts, num_samples=args.num_train_samples, seed=args.dataset_seed), None
    name = dataset_name or "shapes"
    if name in ("shapes", "shapes_captions"):
        # shapes_captions: the alignment stage's caption-only variant
        kw = {"question_types": ("caption",)} if name == "shapes_captions" else {}
        train = data.load_shapes("train", num_samples=args.num_train_samples, seed=args.dataset_seed,
                                 max_turns=args.shapes_max_turns, **kw)
        held_out = data.load_shapes("test", num_samples=args.num_eval_samples, seed=args.dataset_seed, **kw)
        return train, held_out
    if os.path.exists(name) or "/" in name:
        raise ValueError(f"Name the source of {name!r} with --dataset_mixture name:path:weight "
                         f"(names: {sorted(data.DATASETS)})")
    return data.get_dataset(name, split="train", limit=args.num_train_samples), None


def prompt_dataset(args: RLArguments):
    """Prompt-only rows (`prompt`, `images`, `answers`) as TRL's GRPO/RLOO trainers expect."""
    from .. import data

    if args.dataset_name == "shapes":
        ds = data.load_shapes("train", num_samples=args.num_train_samples, seed=args.dataset_seed,
                              question_types=tuple(args.question_types or ("color", "shape")))
    else:
        if args.dataset_path is None:
            raise ValueError(f"--dataset_path is required for dataset_name={args.dataset_name!r}")
        ds = data.get_dataset(args.dataset_name, path_or_hub_id=args.dataset_path, split="train",
                              limit=args.num_train_samples)

    def to_prompt(row):
        return {"prompt": [m for m in row["messages"] if m["role"] != "assistant"]}

    return ds.map(to_prompt, remove_columns=["messages"])
