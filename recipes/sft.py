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

Your own data in TRL's conversational format (a jsonl/parquet file, a save_to_disk folder, an imagefolder, a Hub id),
with a held-out tenth scored after training (exact match on the final assistant turn):

    accelerate launch recipes/sft.py --dataset_name data/train.jsonl --eval_split_fraction 0.1

The held-out rows' loss during training as well: `--eval_strategy steps --eval_steps 100` (logged as `eval_loss`).

Loss is on assistant tokens only (`assistant_only_loss`) and never on image placeholders (the collator masks them).
"""

import logging
import os
import sys

import ghostvis_hf  # noqa: F401  (before TRL: quiets bitsandbytes' import-time CPU "kernels" warning)
from trl import ModelConfig, ScriptArguments, SFTConfig, TrlParser

from ghostvis_hf.hub import training_origin
from ghostvis_hf.training import (
    GhostVisArguments,
    apply_gpu_speedups,
    build_sft_collator,
    describe_data,
    finish,
    freeze,
    held_out_for_loss,
    load_model_and_processor,
    load_train_and_eval_data,
    log_parameter_counts,
    make_optimizer,
    parse_with_default_config,
    peft_config_for,
    start_recipe,
    step_callbacks,
    training_rows,
)
from ghostvis_hf.training.optimizer import precision_of
from ghostvis_hf.training.qat import convert_qat, prepare_qat
from ghostvis_hf.training.throughput import throughput_summary
from ghostvis_hf.training.trainer import GhostVisSFTTrainer

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "sft_tiny.yaml")
logger = logging.getLogger("ghostvis")


def main(script_args, training_args, model_args, gv_args):
    start_recipe(gv_args)  # logging, --cpu_threads, --nccl_max_ctas, TRL's head on labelled positions
    ################
    # Model
    ################
    model, processor = load_model_and_processor(gv_args, model_args, training_args)
    freeze(model, gv_args.freeze_vision_tower, gv_args.freeze_language_model)
    # --qat int8: int8 fake-quant on the layers --quantize int8 quantizes (refuses LoRA/QLoRA, DeepSpeed/FSDP)
    qat = prepare_qat(model, gv_args.qat, model_args, training_args)
    # Liger + cuDNN/varlen attention (or compiled layers) for the GPU the trainer moves the model to; CPU: PyTorch
    apply_gpu_speedups(model, gv_args)
    peft_config = peft_config_for(model_args)
    if peft_config is not None and (gv_args.vision_tower_lr or gv_args.projector_lr):
        raise ValueError("vision_tower_lr/projector_lr apply to full fine-tuning, not LoRA")

    ################
    # Dataset
    ################
    dataset_name = script_args.dataset_name or "shapes"  # a registry name, or a path / Hub id of your own data
    train_dataset, held_out = load_train_and_eval_data(dataset_name, gv_args, script_args.dataset_train_split,
                                                       script_args.dataset_test_split)
    data_info = describe_data(dataset_name, gv_args)  # sources, answer_style (what evaluation must use too)
    # --bad_rows skip|error; refused here when no row is left
    train_dataset, report = training_rows(train_dataset, processor, training_args, gv_args, dataset_name)
    # --eval_strategy steps|epoch: the held-out rows' loss during training (checked as the training rows are)
    eval_dataset = held_out_for_loss(held_out, processor, training_args, gv_args)
    # GhostVis packing with --packing (TRL refuses it for image data), else TRL's collator + image-label masking
    data_collator, callbacks = build_sft_collator(processor, training_args, gv_args)
    # --profile_steps, --gc_every_steps, --fsdp_forward_prefetch (FSDP2), --sync_steps
    callbacks += step_callbacks(gv_args, training_args.output_dir)

    ################
    # Training
    ################
    # bf16 parameters + fp32 master weights on the GPU (--precision); None: the trainer's own AdamW
    optimizer = make_optimizer(model, training_args, gv_args, use_peft=peft_config is not None)
    fused_loss = getattr(model, "linear_cross_entropy", None) is not None
    trainer = GhostVisSFTTrainer(  # SFTTrainer + token-budget steps + speed log
        model_loss=gv_args.loss == "model" or (gv_args.loss == "auto" and fused_loss),
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        peft_config=peft_config,
        data_collator=data_collator,
        callbacks=callbacks,
        optimizers=(optimizer, None),
        cuda_graphs=gv_args.cuda_graphs,  # --cuda_graphs: decoder + loss replayed as CUDA graphs
        cuda_graphs_vision=gv_args.cuda_graphs_vision,  # --cuda_graphs_vision: the vision side too
    )
    counts = log_parameter_counts(trainer.model)  # after TRL's LoRA wrapping
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if qat:
        convert_qat(trainer.model)  # fake-quant off: the saved checkpoint is a plain float one
    # Complete checkpoint (LoRA merged, adapter kept), model card, held-out eval of the saved folder, plot, summary
    finish(trainer, processor, training_args.output_dir,
           origin=training_origin("recipes/sft.py", "multimodal SFT", data_info, training_args, model_args, gv_args),
           summary={"parameters": counts, "data": {**report, **data_info}, "precision": precision_of(trainer),
                    "throughput": throughput_summary(trainer), **({"qat": qat} if qat else {})},
           summary_file="sft_summary.json",
           plot=gv_args.plot, title="GhostVis SFT", plot_keys=("loss", "mean_token_accuracy"),
           held_out=held_out if gv_args.eval_after_training else None, eval_batch_size=gv_args.eval_batch_size)


def make_parser():
    return TrlParser((ScriptArguments, SFTConfig, ModelConfig, GhostVisArguments))


def parse_args(argv: list[str]):
    """Without `--config`, the main job's YAML; its tiny-model settings stay with the tiny preset."""
    return parse_with_default_config(make_parser(), argv, DEFAULT_CONFIG)


if __name__ == "__main__":
    main(*parse_args(sys.argv[1:]))
