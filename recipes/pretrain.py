"""Text-only (continued) pretraining of GhostVis's decoder with TRL's `SFTTrainer` on packed plain text: the first
stage of the pipeline (pretrain -> align -> SFT -> RL).

The default (no arguments) is the tiny preset of the main job on the built-in shapes captions as plain text, on the
CPU; any text file trains the same way:

    accelerate launch recipes/pretrain.py
    accelerate launch recipes/pretrain.py --dataset_name corpus.txt --output_dir outputs/my-pretrain
    accelerate launch recipes/pretrain.py --dataset_name corpus.jsonl --model_name_or_path outputs/ghostvis-tiny

Data: a `.txt`/`.md` file (a row per paragraph; `--text_sample_by line|paragraph|document`), a `.jsonl`/`.json`/
`.parquet`/`.csv` file or a `save_to_disk` folder with a `text` column (`--dataset_text_field`), or a Hub id.
TRL appends the end-of-text token to every row and packs rows into `max_length`-token sequences (best-fit decreasing,
long rows split, attention kept within each row through `position_ids`).

Of the GhostVis options it takes the model source, the run set-up (`--cpu_threads`, `--nccl_max_ctas`) and the step
callbacks (`--profile_steps`, `--gc_every_steps`, `--fsdp_forward_prefetch`, `--sync_steps`); it trains with TRL's
own trainer and optimizer, without GhostVis's kernel swaps or precision modes, and refuses the SFT options it does not
implement rather than ignore them.

Only the decoder and its LM head train; the vision tower, resampler and projector are frozen and unused. The whole
GhostVis model is saved, so the next stages start from the folder as from any checkpoint:

    accelerate launch recipes/align.py --model_name_or_path outputs/ghostvis-tiny-pretrain
    accelerate launch recipes/sft.py --model_name_or_path outputs/ghostvis-tiny-pretrain
"""

import logging
import os
import sys
from dataclasses import dataclass, field

import ghostvis_hf  # noqa: F401  before TRL: quiets bitsandbytes' import-time CPU "kernels" warning
from trl import ModelConfig, ScriptArguments, SFTConfig, SFTTrainer, TrlParser

from ghostvis_hf.hub import training_origin
from ghostvis_hf.training import (
    GhostVisArguments,
    finish,
    load_model_and_processor,
    log_parameter_counts,
    parse_with_default_config,
    refuse_unused,
    start_recipe,
    step_callbacks,
)

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "pretrain_tiny.yaml")
TEXT_FILE_BUILDERS = {".txt": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet",
                      ".csv": "csv"}
logger = logging.getLogger("ghostvis")
# The GhostVisArguments this recipe reads (the model source, the shapes-captions sample, the run set-up and the step
# callbacks); any other one set away from its default is refused (the SFT/alignment options: data mixtures and
# validation, token budgets, precision, kernel swaps, CUDA graphs, ...).
PRETRAIN_ARGUMENTS = {"preset", "text_model", "vision_model", "resampler_type", "num_image_tokens",
                      "config_overrides", "dataset_seed", "num_train_samples", "cpu_threads", "nccl_max_ctas",
                      "profile_steps", "profile_python", "sync_steps", "fsdp_forward_prefetch", "gc_every_steps",
                      "plot", "qat"}


@dataclass
class TextArguments:
    """How plain text becomes rows."""

    text_sample_by: str = field(
        default="paragraph",
        metadata={"help": "Rows of a .txt/.md file: line | paragraph (blank-line separated) | document."})


def load_text(name: str, script_args, training_args, gv_args, text_args):
    """A dataset with one `text` column: the shapes captions (`shapes_captions`), a text file, a folder or Hub id."""
    import datasets

    from ghostvis_hf.data import load_shapes

    if name == "shapes_captions":  # the words the later stages need, as plain sentences
        rows = load_shapes("train", num_samples=gv_args.num_train_samples or 8000, seed=gv_args.dataset_seed,
                           question_types=("caption",))
        return datasets.Dataset.from_dict({"text": [r[-1]["content"][0]["text"] for r in rows["messages"]]})
    ext = os.path.splitext(name)[1].lower()
    if os.path.isfile(name):
        if ext not in TEXT_FILE_BUILDERS:
            raise ValueError(f"{name!r}: a text file is one of {sorted(TEXT_FILE_BUILDERS)}")
        kwargs = {"sample_by": text_args.text_sample_by} if TEXT_FILE_BUILDERS[ext] == "text" else {}
        ds = datasets.load_dataset(TEXT_FILE_BUILDERS[ext], data_files=name, split="train", **kwargs)
    elif os.path.isfile(os.path.join(name, "dataset_info.json")):
        ds = datasets.load_from_disk(name)
    else:
        ds = datasets.load_dataset(name, split=script_args.dataset_train_split)
    field_name = training_args.dataset_text_field
    if field_name not in ds.column_names:
        raise ValueError(f"{name!r} has no {field_name!r} column (columns: {ds.column_names}); "
                         "name the text column with --dataset_text_field")
    ds = ds.select_columns([field_name]).filter(lambda row: bool(row[field_name] and row[field_name].strip()))
    if gv_args.num_train_samples is not None:
        ds = ds.select(range(min(gv_args.num_train_samples, len(ds))))
    return ds


def train_only_the_decoder(model) -> None:
    """Freezes everything but the decoder (embeddings included) and the LM head."""
    model.requires_grad_(False)
    model.model.language_model.requires_grad_(True)
    model.lm_head.requires_grad_(True)


def main(script_args, training_args, model_args, gv_args, text_args):
    start_recipe(gv_args)  # logging, --cpu_threads, --nccl_max_ctas, TRL's head on labelled positions
    ################
    # Model
    ################
    if model_args.use_peft:
        raise ValueError("Continued pretraining trains the decoder fully; LoRA belongs to recipes/sft.py")
    if gv_args.qat:
        raise ValueError("--qat int8 is implemented in recipes/sft.py only (fine-tune the pretrained decoder there)")
    refuse_unused(gv_args, PRETRAIN_ARGUMENTS, "recipes/pretrain.py")
    model, processor = load_model_and_processor(gv_args, model_args, training_args)
    train_only_the_decoder(model)

    ################
    # Dataset
    ################
    dataset_name = script_args.dataset_name or "shapes_captions"
    train_dataset = load_text(dataset_name, script_args, training_args, gv_args, text_args)
    logger.info("text rows: %d from %s", len(train_dataset), dataset_name)

    ################
    # Training
    ################
    trainer = SFTTrainer(model=model, args=training_args, train_dataset=train_dataset,
                         processing_class=processor.tokenizer,  # the tokenizer: plain text, no chat template
                         # --profile_steps, --gc_every_steps, --fsdp_forward_prefetch (FSDP2), --sync_steps
                         callbacks=step_callbacks(gv_args, training_args.output_dir))
    counts = log_parameter_counts(trainer.model)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    summary = {"parameters": counts, "data": {"source": dataset_name, "rows": len(train_dataset)},
               "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None}
    if losses:
        print(f"loss: {losses[0]:.3f} -> {losses[-1]:.3f} (first and last of {len(losses)} logged steps)", flush=True)
    # The whole VLM (towers untouched) as a complete checkpoint: the next stages load it with --model_name_or_path
    origin = training_origin("recipes/pretrain.py", "text-only continued pretraining of the decoder",
                             f"{dataset_name} (plain text, {len(train_dataset):,} rows, packed)", training_args,
                             model_args, gv_args)
    finish(trainer, processor, training_args.output_dir, origin=origin, summary=summary,
           summary_file="pretrain_summary.json", plot=gv_args.plot, title="GhostVis text pretraining")


def make_parser():
    return TrlParser((ScriptArguments, SFTConfig, ModelConfig, GhostVisArguments, TextArguments))


if __name__ == "__main__":
    main(*parse_with_default_config(make_parser(), sys.argv[1:], DEFAULT_CONFIG))
