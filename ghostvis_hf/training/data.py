"""What the recipes train on: conversational rows (+ a held-out split) for SFT and alignment, prompt-only rows for RL.

The sources themselves live in `ghostvis_hf.data`; this module picks, splits and mixes them from the recipe arguments:
- `--dataset_name` is a registry name (`shapes`, `vqav2`, ...) or your own data, a path or Hub id read by
  `data.load_conversations`; `--dataset_mixture name:path:weight ...` mixes sources (`conversations:PATH:W`).
- Sizes: `num_train_samples` is how many shapes rows are generated, and only a cap for other data, which is never
  repeated (without it, shapes generates `shapes_train_samples` and other data is used as given); with a mixture it is
  the mixture's size.
- Held-out rows, the first rule that applies: `eval_dataset_name`; `eval_split_fraction` of each source (split off
  before mixing, so no held-out row is trained on); the shapes test split when every source is shapes;
  `num_eval_samples` rows held out of the sources (by weight; shapes parts generate test rows). `num_eval_samples`
  caps the held-out set in every case.
- `answer_style`: each source's default unless given; logged once, and reported in the run's summary (`describe_data`).
"""

import logging
from dataclasses import dataclass

from .arguments import GhostVisArguments, RLArguments

logger = logging.getLogger("ghostvis")

SHAPES = ("shapes", "shapes_captions")  # generated; shapes_captions is the alignment stage's caption-only variant
# The sources whose adapter rewrites questions (`answer_style`), with their default.
ANSWER_STYLE_DEFAULTS = {"vqav2": "short", "textvqa": "short", "chartqa": "short", "conversations": "none"}


@dataclass
class Source:
    """One data source of a run: a registry name, its path or Hub id (`None` for shapes) and its mixture weight."""

    name: str
    path: str | None = None
    weight: float = 1.0


def data_source(name_or_path: str) -> Source:
    """A `--dataset_name`/`--eval_dataset_name` value: a registry name, else a path or Hub id of your own data."""
    from .. import data

    if name_or_path in SHAPES or (name_or_path in data.DATASETS and name_or_path != "conversations"):
        return Source(name_or_path)
    if name_or_path == "conversations":
        raise ValueError("Pass the data itself: --dataset_name PATH_OR_HUB_ID (or conversations:PATH:WEIGHT in a "
                         "--dataset_mixture)")
    return Source("conversations", name_or_path)


def data_sources(dataset_name: str | None, args: GhostVisArguments) -> list[Source]:
    """The run's sources: the `--dataset_mixture` entries (`name:path:weight`), else `dataset_name` alone."""
    if not args.dataset_mixture:
        return [data_source(dataset_name or "shapes")]
    sources = []
    for spec in args.dataset_mixture:
        try:
            name, path, weight = spec.rsplit(":", 2) if spec.count(":") >= 2 else (*spec.split(":"), "1")
            sources.append(Source(name, path or None, float(weight)))
        except ValueError:
            raise ValueError(f"dataset_mixture entry {spec!r} is not name:path:weight") from None
    return sources


def answer_styles(sources: list[Source], args: GhostVisArguments) -> dict[str, str]:
    """`{source name: answer_style}` for the sources whose adapter rewrites questions (`--answer_style` or their
    default)."""
    return {s.name: args.answer_style or ANSWER_STYLE_DEFAULTS[s.name] for s in sources
            if s.name in ANSWER_STYLE_DEFAULTS}


def describe_data(dataset_name: str | None, args: GhostVisArguments) -> dict:
    """What the run trains and evaluates on, for its summary (`answer_style` is what evaluation must use too)."""
    sources = data_sources(dataset_name, args)
    held = [data_source(args.eval_dataset_name)] if args.eval_dataset_name else []
    return {"sources": [{"name": s.name, "path": s.path, "weight": s.weight} for s in sources],
            "eval_dataset": args.eval_dataset_name, "eval_split_fraction": args.eval_split_fraction,
            "answer_style": answer_styles(sources + held, args)}


def load_train_and_eval_data(dataset_name: str | None, args: GhostVisArguments, train_split: str = "train",
                             test_split: str = "test"):
    """(train, held-out) datasets in TRL's conversational vision format; held-out is `None` when no rule of the
    module docstring gives one.

    The rows the loaders drop follow `args.bad_rows`: refused under `"error"`; under `"skip"` their record rides on the
    training set (`data.validate.DROPPED_AT_LOAD`) so that `validate_rows` counts them in the report with its own.
    """
    from ..data.validate import DROPPED_AT_LOAD, recording_bad_rows

    with recording_bad_rows(args.bad_rows) as dropped:
        train, held_out = _load(dataset_name, args, train_split, test_split)
    setattr(train, DROPPED_AT_LOAD, dropped)
    return train, held_out


def training_rows(train_dataset, processor, training_args, args: GhostVisArguments, dataset_name: str):
    """The training rows checked (`validate_rows`, `--bad_rows`) and counted in the log; returns `(rows, report)`.

    A `ValueError` when no row is left (every row skipped as bad, or a source without rows), here and not in the
    trainer, whose first look at the data stops with a bare `StopIteration`."""
    from ..data.validate import validate_rows

    rows, report = validate_rows(train_dataset, processor, training_args.max_length, args.bad_rows)
    logger.info("training rows: %d (checked %d, skipped %s)", len(rows), report["checked"], report["skipped"] or "none")
    if len(rows) == 0:
        sources = data_sources(dataset_name, args)
        named = ", ".join(s.name if s.path is None else f"{s.name} ({s.path})" for s in sources)
        raise ValueError(f"no training rows left in {named}: {report['checked']} checked, skipped "
                         f"{report['skipped'] or 'none'} (first of each: {report['first'] or 'none'})")
    return rows, report


def held_out_for_loss(held_out, processor, training_args, args: GhostVisArguments):
    """The held-out rows whose loss the Trainer logs during training (`--eval_strategy steps|epoch`, every
    `--eval_steps`), checked as the training rows are (`--bad_rows`); `None` when the run does not evaluate then.

    Refused up front, not at the first evaluation, when the run has no held-out rows."""
    from ..data.validate import validate_rows

    strategy = str(getattr(training_args.eval_strategy, "value", training_args.eval_strategy))
    if strategy == "no":
        return None
    if held_out is None or len(held_out) == 0:
        raise ValueError(f"--eval_strategy {strategy} logs the held-out rows' loss during "
                         "training, and this run holds none out: pass --eval_dataset_name, --eval_split_fraction or "
                         "--num_eval_samples")
    rows, report = validate_rows(held_out, processor, training_args.max_length, args.bad_rows)
    logger.info("held-out rows for the loss during training: %d (skipped %s)", len(rows), report["skipped"] or "none")
    if len(rows) == 0:
        raise ValueError(f"--eval_strategy {strategy}: every one of the {report['checked']} held-out rows was skipped "
                         f"as bad ({report['skipped']}); fix them or pass --eval_strategy no")
    return rows


def _load(dataset_name: str | None, args: GhostVisArguments, train_split: str, test_split: str):
    from .. import data

    sources = data_sources(dataset_name, args)
    eval_source = data_source(args.eval_dataset_name) if args.eval_dataset_name else None
    styles = answer_styles(sources + ([eval_source] if eval_source else []), args)
    if styles:
        logger.info("answer_style: %s (short appends %r to each question)",
                    ", ".join(f"{name} {style}" for name, style in styles.items()), data.common.SHORT_ANSWER_PROMPT)
    elif args.answer_style:
        logger.warning("answer_style=%s has no effect on %s", args.answer_style, [s.name for s in sources])
    mixture = bool(args.dataset_mixture)
    fraction = args.eval_split_fraction if eval_source is None else None
    n_eval = args.num_eval_samples
    held_quotas = None
    if eval_source is None and fraction is None and n_eval and not all(s.name in SHAPES for s in sources):
        held_quotas = data.mixture.quotas([s.weight for s in sources], n_eval)
    parts, held = [], []
    for i, source in enumerate(sources):
        cap = None if mixture else args.num_train_samples
        if source.name in SHAPES:  # generated: `num_train_samples` (or `shapes_train_samples`) rows
            size = cap if cap is not None else args.shapes_train_samples
            part = _load_source(source, "train", args, styles, size)
            if fraction:
                part, held_part = _split_off(part, fraction, args.dataset_seed, source)
                held.append(held_part)
            elif held_quotas and held_quotas[i]:
                held.append(_load_source(source, "test", args, styles, held_quotas[i]))
        else:  # read: all of it, the held-out rows split off, then capped (never repeated)
            split_off = fraction or (held_quotas[i] if held_quotas else None)
            part = _load_source(source, train_split, args, styles, None if split_off else cap)
            if split_off:
                part, held_part = _split_off(part, split_off, args.dataset_seed, source)
                held.append(held_part)
                part = part.select(range(min(cap, len(part)))) if cap is not None else part
        parts.append(part)
    train = data.mix_datasets([(p, s.weight) for p, s in zip(parts, sources)], num_samples=args.num_train_samples,
                              seed=args.dataset_seed) if mixture else parts[0]
    if eval_source is not None:
        from ..data.validate import recording_bad_rows

        with recording_bad_rows("skip"):  # its loader logs its own drops; they are not training rows
            held = [_load_source(eval_source, test_split, args, styles, n_eval)]
    elif not held and all(s.name in SHAPES for s in sources):
        held = [_load_source(sources[0], "test", args, styles, n_eval)]
    if not held:
        logger.info("no held-out evaluation: pass --eval_dataset_name, --eval_split_fraction or --num_eval_samples")
        return train, None
    return train, _capped(held, n_eval, args.dataset_seed)


def _load_source(source: Source, split: str, args: GhostVisArguments, styles: dict[str, str], limit: int | None):
    """One source's rows of `split` (shapes: generated; `split` other than train means its test split)."""
    from .. import data

    if source.name in SHAPES:
        kw = {"question_types": ("caption",)} if source.name == "shapes_captions" else {}
        if split == "train":
            kw["max_turns"] = args.shapes_max_turns
        return data.load_shapes("train" if split == "train" else "test", num_samples=limit, seed=args.dataset_seed,
                                **kw)
    if source.name == "synthetic":  # generated from the seed (ghostvis_hf.data.synthetic): no path
        return data.get_dataset("synthetic", split=split, limit=limit, seed=args.dataset_seed)
    if not source.path:
        raise ValueError(f"{source.name!r} needs its data: --dataset_mixture {source.name}:PATH_OR_HUB_ID:1")
    kwargs = {"path_or_hub_id": source.path, "split": split, "image_root": args.image_root, "limit": limit}
    if source.name in styles:
        kwargs["answer_style"] = styles[source.name]
    return data.get_dataset(source.name, **kwargs)


def _split_off(dataset, size: float | int, seed: int, source: Source):
    """(rest, held-out): a seeded split; `size` is a fraction or a number of rows."""
    n = round(size * len(dataset)) if isinstance(size, float) else size
    if not 0 < n < len(dataset):
        raise ValueError(f"Cannot hold out {n} of the {len(dataset)} rows of {source.path or source.name} (at least "
                         "one row must stay on each side); change --eval_split_fraction or --num_eval_samples")
    split = dataset.train_test_split(test_size=n, seed=seed)
    return split["train"], split["test"]


def _capped(held: list, n_eval: int | None, seed: int):
    """The held-out parts as one set, at most `n_eval` rows, a seeded sample across them."""
    import datasets

    rows = datasets.concatenate_datasets(held) if len(held) > 1 else held[0]
    if len(held) > 1:
        rows = rows.shuffle(seed=seed)
    return rows.select(range(min(n_eval, len(rows)))) if n_eval is not None else rows


def prompt_dataset(args: RLArguments):
    """Prompt-only rows (`prompt`, `images`, `answers`) as TRL's GRPO/RLOO trainers expect.

    Bad rows are handled as in SFT, before any model is loaded: the loaders' (unusable turns, no answer, image count
    mismatch, missing images) and unreadable images are refused naming the row under `bad_rows="error"`, else dropped
    and counted per reason in one warning.
    """
    from .. import data
    from ..data.validate import DROPPED_AT_LOAD, recording_bad_rows, validate_rows

    with recording_bad_rows(args.bad_rows) as dropped:
        if args.dataset_name == "shapes":
            ds = data.load_shapes("train", num_samples=args.num_train_samples, seed=args.dataset_seed,
                                  question_types=tuple(args.question_types or ("color", "shape")))
        else:
            if args.dataset_path is None:
                raise ValueError(f"--dataset_path is required for dataset_name={args.dataset_name!r}")
            ds = data.get_dataset(args.dataset_name, path_or_hub_id=args.dataset_path, split="train",
                                  limit=args.num_train_samples)
    setattr(ds, DROPPED_AT_LOAD, dropped)
    ds, report = validate_rows(ds, processor=None, policy=args.bad_rows)  # images decode (no token counts: no model)
    logger.info("prompt rows: %d (checked %d, skipped %s)", len(ds), report["checked"], report["skipped"] or "none")
    if len(ds) == 0:
        raise ValueError(f"no usable prompt rows in {args.dataset_path or args.dataset_name!r}: {report['skipped']}")

    def to_prompt(row):
        return {"prompt": [m for m in row["messages"] if m["role"] != "assistant"]}

    return ds.map(to_prompt, remove_columns=["messages"])
