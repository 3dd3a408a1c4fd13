"""Multimodal SFT of GhostVis with TRL's `SFTTrainer`: full fine-tune, LoRA or QLoRA.

The default (no arguments) is the main job: the tiny preset trained from scratch on the built-in shapes data on the
CPU, then evaluated on the held-out split (exact match next to the text-prior chance level):

    accelerate launch recipes/sft.py

With a config (dataclass default < YAML < command line; unknown YAML keys fail):

    accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/sft.py \
        --config recipes/configs/sft_1.5b.yaml
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml recipes/sft.py \
        --config recipes/configs/sft_1.5b_zero3.yaml
    accelerate launch recipes/sft.py --config recipes/configs/sft_tiny.yaml --use_peft --lora_r 16

Loss is on assistant tokens only (`assistant_only_loss`) and never on image placeholders (the model masks them).
"""

import json
import logging
import os
import sys

import torch
from trl import ModelConfig, ScriptArguments, SFTConfig, SFTTrainer, TrlParser

from ghostvis_hf.data.collator import build_sft_collator
from ghostvis_hf.kernels import apply_kernels

from ghostvis_hf.training import (
    GhostVisArguments,
    freeze,
    load_model_and_processor,
    load_train_and_eval_data,
    make_optimizer,
    peft_config_for,
    score_labelled_positions_only,
    set_cpu_threads,
)

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "sft_tiny.yaml")
logger = logging.getLogger("ghostvis")


def main(script_args, training_args, model_args, gv_args):
    from ghostvis_hf.data.validate import validate_rows
    from ghostvis_hf.hub import model_card
    from ghostvis_hf.plotting import plot_learning_curve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    set_cpu_threads(gv_args)
    score_labelled_positions_only()
    ################
    # Model
    ################
    model, processor = load_model_and_processor(gv_args, model_args, training_args)
    counts = freeze(model, gv_args.freeze_vision_tower, gv_args.freeze_language_model)
    if gv_args.kernels and torch.cuda.is_available():
        logger.info("kernels: %s", apply_kernels(model))  # Liger + cuDNN/varlen attention; CPU keeps plain PyTorch
    peft_config = peft_config_for(model_args)
    if peft_config is not None and (gv_args.vision_tower_lr or gv_args.projector_lr):
        raise ValueError("vision_tower_lr/projector_lr apply to full fine-tuning, not LoRA")

    ################
    # Dataset
    ################
    train_dataset, held_out = load_train_and_eval_data(script_args.dataset_name, gv_args)
    train_dataset, report = validate_rows(train_dataset, processor, training_args.max_length, gv_args.bad_rows)
    logger.info("training rows: %d (checked %d, skipped %s)", len(train_dataset), report["checked"],
                report["skipped"] or "none")
    # GhostVis packing with --packing (TRL refuses it for image data), else TRL's collator + image-label masking
    data_collator, callbacks = build_sft_collator(processor, training_args)

    ################
    # Training
    ################
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=processor,
        peft_config=peft_config,
        data_collator=data_collator,
        callbacks=callbacks,
        optimizers=(make_optimizer(model, training_args, gv_args), None),  # None: the trainer's own AdamW
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)

    out = training_args.output_dir
    if peft_config is not None:
        trainer.save_model(os.path.join(out, "adapter"))
        trainer.model = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
    trainer.save_model(out)
    if not trainer.is_world_process_zero():
        return
    processor.save_pretrained(out)
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(model_card(trainer.accelerator.unwrap_model(trainer.model), repo=out,
                           origin=f"Fine-tuned with `recipes/sft.py` on {script_args.dataset_name or 'shapes'}."))
    summary = {"parameters": counts, "data": report, "steps": trainer.state.global_step}
    if gv_args.eval_after_training and held_out is not None:
        summary["eval"] = evaluate_checkpoint(out, held_out, gv_args.eval_batch_size, training_args.device)
    if gv_args.plot:
        acc = summary.get("eval", {}).get("color_shape_accuracy")
        plot_learning_curve(trainer.state.log_history, os.path.join(out, "learning_curve.png"),
                            title="GhostVis SFT", keys=("loss", "mean_token_accuracy"),
                            annotate=f"held-out colour+shape accuracy {acc:.1%}" if acc is not None else None)
    with open(os.path.join(out, "sft_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    logger.info("checkpoint saved to %s", out)


def evaluate_checkpoint(path, held_out, batch_size, device="cpu"):
    """Reloads the saved checkpoint (as users will) and scores it on the held-out split."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ghostvis_hf.evaluation.run import evaluate, format_report

    model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True).to(device)
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    result = evaluate(model, processor, "shapes", held_out, batch_size=batch_size,
                      out_dir=os.path.join(path, "eval_shapes"))
    print(format_report("shapes", result), flush=True)
    return result


def make_parser():
    return TrlParser((ScriptArguments, SFTConfig, ModelConfig, GhostVisArguments))


if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--config" not in argv:
        argv = ["--config", DEFAULT_CONFIG, *argv]
    main(*make_parser().parse_args_and_config(argv))
