"""What the recipes share, one concept per module: arguments, model, optimizer, data, collators and packing, run
set-up, the shared ending (save, model card, plot, summary) and the RL helpers.

Kept out of `recipes/*.py` so the recipes stay thin TRL scripts; kept out of the model files because those travel
with every checkpoint.
"""

from .arguments import GhostVisArguments, RLArguments, parse_with_default_config, refuse_unused
from .collator import GhostVisVisionCollator, build_sft_collator
from .data import describe_data, held_out_for_loss, load_train_and_eval_data, prompt_dataset, training_rows
from .finish import evaluate_checkpoint, finish, score_final_turns
from .model import (
    LORA_MODULES_TO_SAVE,
    LORA_TARGET_REGEX,
    apply_gpu_speedups,
    freeze,
    load_model_and_processor,
    log_parameter_counts,
    parameter_counts,
    parse_config_overrides,
    peft_config_for,
)
from .optimizer import make_optimizer
from .packing import GhostVisPackingCollator, PackingStatsCallback, best_fit_decreasing, pack_samples, prepare_packing
from .plotting import plot_learning_curve
from .fsdp_prefetch import ForwardPrefetchCallback, fsdp_prefetch_callbacks, set_forward_prefetch
from .garbage_collection import GarbageCollectionCallback, gc_callbacks
from .sync_report import SyncReportCallback, sync_report_callbacks
from .profiling import ProfilerCallback, profiler_callbacks
from .step_callbacks import step_callbacks
from .rl import (
    finish_rl,
    held_out_accuracy,
    held_out_before,
    policy_checkpoint,
    reward_funcs_for,
    reward_summary,
    starting_checkpoint,
)
from .runtime import (
    resolve_cpu_threads,
    score_labelled_positions_only,
    set_cpu_threads,
    set_nccl_max_ctas,
    setup_logging,
    start_recipe,
)

__all__ = [
    "GhostVisArguments",
    "GhostVisPackingCollator",
    "GhostVisVisionCollator",
    "LORA_MODULES_TO_SAVE",
    "LORA_TARGET_REGEX",
    "PackingStatsCallback",
    "RLArguments",
    "apply_gpu_speedups",
    "best_fit_decreasing",
    "build_sft_collator",
    "describe_data",
    "evaluate_checkpoint",
    "finish",
    "finish_rl",
    "freeze",
    "GarbageCollectionCallback",
    "gc_callbacks",
    "sync_report_callbacks",
    "SyncReportCallback",
    "fsdp_prefetch_callbacks",
    "ForwardPrefetchCallback",
    "set_forward_prefetch",
    "held_out_accuracy",
    "held_out_before",
    "held_out_for_loss",
    "load_model_and_processor",
    "load_train_and_eval_data",
    "log_parameter_counts",
    "make_optimizer",
    "pack_samples",
    "parameter_counts",
    "parse_config_overrides",
    "parse_with_default_config",
    "refuse_unused",
    "peft_config_for",
    "plot_learning_curve",
    "ProfilerCallback",
    "profiler_callbacks",
    "step_callbacks",
    "training_rows",
    "prepare_packing",
    "prompt_dataset",
    "reward_funcs_for",
    "resolve_cpu_threads",
    "reward_summary",
    "score_final_turns",
    "score_labelled_positions_only",
    "set_cpu_threads",
    "set_nccl_max_ctas",
    "setup_logging",
    "start_recipe",
    "policy_checkpoint",
    "starting_checkpoint",
]
