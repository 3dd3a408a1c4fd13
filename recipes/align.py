"""Vision-language alignment of GhostVis with TRL's `SFTTrainer`: the LLM and the vision encoder stay frozen, the
resampler + projector learn to map image features into the LLM's embedding space from captions.

    accelerate launch recipes/align.py                                   # tiny preset, CPU, shapes captions
    accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/align.py \
        --config recipes/configs/align_1.5b.yaml                         # Qwen2.5-1.5B + SigLIP, COCO captions

Then run `recipes/sft.py --model_name_or_path <output_dir>` for multimodal SFT.
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
    make_optimizer,
    parse_with_default_config,
    start_recipe,
    step_callbacks,
    training_rows,
)
from ghostvis_hf.training.throughput import throughput_summary
from ghostvis_hf.training.trainer import GhostVisSFTTrainer

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "align_tiny.yaml")
logger = logging.getLogger("ghostvis")


def main(script_args, training_args, model_args, gv_args):
    start_recipe(gv_args)  # logging, --cpu_threads, --nccl_max_ctas, TRL's head on labelled positions
    ################
    # Model
    ################
    if not (gv_args.freeze_vision_tower and gv_args.freeze_language_model):
        logger.warning("alignment normally freezes both towers (freeze_vision_tower/freeze_language_model)")
    if model_args.use_peft:
        raise ValueError("Alignment trains the resampler + projector fully; LoRA belongs to recipes/sft.py")
    if gv_args.qat:
        raise ValueError("--qat belongs to recipes/sft.py: alignment trains the resampler + projector, which "
                         "--quantize int8 leaves in float")
    model, processor = load_model_and_processor(gv_args, model_args, training_args)
    counts = freeze(model, gv_args.freeze_vision_tower, gv_args.freeze_language_model)
    apply_gpu_speedups(model, gv_args)  # Liger + cuDNN/varlen attention (or compiled layers) for the trainer's GPU
    print(f"trainable parameters: {counts['trainable']:,} | frozen: {counts['frozen']:,}", flush=True)

    ################
    # Dataset
    ################
    dataset_name = script_args.dataset_name or "shapes_captions"  # a registry name, or a path / Hub id of your data
    train_dataset, held_out = load_train_and_eval_data(dataset_name, gv_args, script_args.dataset_train_split,
                                                       script_args.dataset_test_split)
    # --bad_rows skip|error; refused here when no row is left
    train_dataset, report = training_rows(train_dataset, processor, training_args, gv_args, dataset_name)
    eval_dataset = held_out_for_loss(held_out, processor, training_args, gv_args)  # --eval_strategy steps|epoch

    ################
    # Training
    ################
    data_collator, callbacks = build_sft_collator(processor, training_args, gv_args)  # masks image placeholders
    # --profile_steps, --gc_every_steps, --fsdp_forward_prefetch (FSDP2), --sync_steps
    callbacks += step_callbacks(gv_args, training_args.output_dir)
    trainer = GhostVisSFTTrainer(model=model, args=training_args, train_dataset=train_dataset,
                                 eval_dataset=eval_dataset, processing_class=processor, data_collator=data_collator,
                                 callbacks=callbacks,
                                 optimizers=(make_optimizer(model, training_args, gv_args), None),
                                 cuda_graphs=gv_args.cuda_graphs, cuda_graphs_vision=gv_args.cuda_graphs_vision)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    data_info = describe_data(dataset_name, gv_args)
    finish(trainer, processor, training_args.output_dir,
           origin=training_origin("recipes/align.py", "vision-language alignment (towers frozen)", data_info,
                                  training_args, model_args, gv_args),
           summary={"parameters": counts, "data": {**report, **data_info},
                    "throughput": throughput_summary(trainer)},
           summary_file="align_summary.json", plot=gv_args.plot, title="GhostVis alignment",
           held_out=held_out if gv_args.eval_after_training else None, eval_batch_size=gv_args.eval_batch_size)


if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig, GhostVisArguments))
    main(*parse_with_default_config(parser, sys.argv[1:], DEFAULT_CONFIG))
