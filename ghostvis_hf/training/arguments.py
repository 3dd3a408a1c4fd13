"""The recipes' own arguments, next to TRL's `SFTConfig`/`GRPOConfig`/`RLOOConfig` and `ModelConfig` in one `TrlParser`.

`GhostVisArguments` is shared by `recipes/align.py` and `recipes/sft.py`, `RLArguments` by `recipes/grpo.py` and
`recipes/rloo.py`. Like open-r1's script arguments, every field can be set in the recipe's YAML or on the command line.
"""

import json
import logging
from dataclasses import dataclass, field, fields

from .qat import normalize_qat
from .garbage_collection import check_gc_every_steps
from .fsdp_prefetch import check_forward_prefetch
from .graph_step import check_graph_flags
from .profiling import parse_profile_steps

logger = logging.getLogger("ghostvis")


@dataclass
class GhostVisArguments:
    """Model-source and data arguments shared by the alignment and SFT recipes."""

    preset: str = field(default="tiny", metadata={"help": "Preset to create when no model path/backbones are given."})
    text_model: str | None = field(default=None, metadata={"help": "Pretrained LM (path/Hub id) to compose from."})
    vision_model: str | None = field(default=None, metadata={"help": "Pretrained encoder (path/Hub id) to compose."})
    resampler_type: str | None = field(default=None, metadata={"help": "perceiver | avgpool | none (new models)."})
    num_image_tokens: int | None = field(default=None, metadata={"help": "Image tokens per image (new models)."})
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Overrides of the preset's GhostVisConfig for new models, comma-separated key=value with "
                          "dotted keys into the sub-configs, e.g. 'text_config.num_hidden_layers=4,resampler_depth=2'."},
    )
    dataset_mixture: list[str] | None = field(
        default=None,
        metadata={"help": "Datasets to mix, each `name:path_or_hub_id:weight` (e.g. vqav2:/data/vqa:0.8 "
                          "conversations:data/train.jsonl:0.5 text_chat:/data/smoltalk.jsonl:0.2); overrides "
                          "dataset_name. `conversations` is your own data in TRL's format, with or without images."},
    )
    image_root: str | None = field(
        default=None,
        metadata={"help": "Folder that relative image paths of the data resolve against (default: the folder of "
                          "each data file)."},
    )
    answer_style: str | None = field(
        default=None,
        metadata={"help": "short | none: append 'Answer the question using a single word or phrase.' to each "
                          "question, or keep it as written. Default: each source's own (short for vqav2, textvqa, "
                          "chartqa; none for conversations). The final evaluation uses the same."},
    )
    dataset_seed: int = field(default=0, metadata={"help": "Seed of the built-in data (same held-out set as eval)."})
    num_train_samples: int | None = field(
        default=None,
        metadata={"help": "Rows of training data: generated for shapes; for other data a cap (rows are never "
                          "repeated; without it the data is used as given); with a mixture, the mixture's size."},
    )
    shapes_train_samples: int | None = field(
        default=None,
        metadata={"help": "Built-in shapes data: rows to generate when num_train_samples is not given (other data "
                          "ignores it)."},
    )
    eval_dataset_name: str | None = field(
        default=None,
        metadata={"help": "Held-out data for the final evaluation: a registry name or a path/Hub id as for "
                          "dataset_name (its dataset_test_split)."},
    )
    eval_split_fraction: float | None = field(
        default=None,
        metadata={"help": "Hold out this fraction of each training source (seeded by dataset_seed, before mixing) "
                          "for the final evaluation."},
    )
    num_eval_samples: int | None = field(
        default=None,
        metadata={"help": "Held-out rows for the final evaluation: a cap on the held-out set; without "
                          "eval_dataset_name/eval_split_fraction, that many rows held out of the training sources "
                          "(shapes: generated test rows)."},
    )
    shapes_max_turns: int = field(
        default=1,
        metadata={"help": "Built-in shapes data: up to this many QA turns per training image (the held-out split "
                          "stays single-turn)."},
    )
    freeze_vision_tower: bool = field(default=False, metadata={"help": "Keep the vision encoder frozen."})
    freeze_language_model: bool = field(default=False, metadata={"help": "Keep the decoder and LM head frozen."})
    vision_tower_lr: float | None = field(
        default=None, metadata={"help": "Learning rate of the vision tower (LLaVA's mm_vision_tower_lr); "
                                        "defaults to learning_rate."})
    projector_lr: float | None = field(
        default=None, metadata={"help": "Learning rate of the resampler + projector (LLaVA's mm_projector_lr); "
                                        "defaults to learning_rate."})
    cpu_threads: int | None = field(
        default=None,
        metadata={"help": "PyTorch threads when training on the CPU. Default (unset): the cores this process may use "
                          "(affinity, cgroup quota, shared among the host's processes) minus those other work keeps "
                          "busy (1-minute load average), at least 1, so a shared CPU is not oversubscribed (that ran "
                          "5x slower per step); 0 = every usable core whatever else runs; N = exactly N. Replaces "
                          "the OMP_NUM_THREADS=1 that `accelerate launch` without a config sets."},
    )
    bad_rows: str = field(default="skip", metadata={"help": "skip (count and drop) | error (refuse, naming the row)."})
    token_budget: bool = field(
        default=True,
        metadata={"help": "With --packing: every step is per_device_train_batch_size rows x max_length tokens, filled "
                          "by best-fit decreasing from a window of the shuffled stream, every conversation once per "
                          "epoch (false: pack only the per_device_train_batch_size conversations of each batch)."})
    packing_window: int = field(
        default=1024, metadata={"help": "token_budget: conversations packed together by best-fit decreasing."})
    truncate_long_rows: bool = field(
        default=False, metadata={"help": "token_budget: cut conversations longer than max_length instead of refusing "
                                         "the dataset (the error names the first such row)."})
    loss: str = field(
        default="auto",
        metadata={"help": "model: the training loss from the model's forward (the fused linear cross-entropy with "
                          "the kernels; no per-step GPU reads, no entropy/token-accuracy logs); trl: TRL's fused LM "
                          "head and its metrics; auto: model when the fused cross-entropy is active (CUDA)."})
    precision: str = field(
        default="auto",
        metadata={"help": "auto (default): bf16_master on CUDA with --bf16 where it applies (single GPU / DDP with "
                          "AdamW, no gradient accumulation; not DeepSpeed/FSDP, LoRA or a quantized model), else "
                          "autocast; bf16_master: bf16 "
                          "parameters and activations, fp32 master weights and AdamW state in the optimizer (one "
                          "fused kernel steps them); autocast: the Trainer's --bf16 autocast over fp32 weights. Over 3 "
                          "seeds of the small preset their mean loss curves are within the seeds' own spread "
                          "(docs/benchmarks/precision_curve.md)."})
    fp32_residual: bool = field(
        default=False,
        metadata={"help": "With bf16_master: keep the residual stream (the sum every layer adds to) in fp32, as "
                          "autocast over fp32 weights does (Megatron-LM's fp32_residual_connection; "
                          "ghostvis_hf.kernels.residual). Embeddings return fp32, each norm casts its input to bf16. "
                          "Other precisions already have it. Measured on the small preset (3 seeds, "
                          "docs/benchmarks/precision_curve_fp32res.md): no resolvable change of the loss curve, 3.8 %% "
                          "slower on one H200; off by default."})
    master_autocast: bool = field(
        default=True,
        metadata={"help": "With bf16_master: run the forward under bf16 autocast, which keeps some ops in fp32 "
                          "(layer norms, softmax, losses) and casts around them (default, the cautious choice); "
                          "false: no autocast, those ops run on bf16 tensors (their reductions in fp32 inside) "
                          "without the casts. Measured 6 %% slower in ghostvis bench train's eager step on one H200 "
                          "(docs/benchmarks/train_graphs.md)."})
    compact_master_weights: bool = field(
        default=False,
        metadata={"help": "With bf16_master: keep each fp32 master weight as the bf16 parameter's bits plus a 16-bit "
                          "remainder (ghostvis_hf.kernels.master_bits): the same fp32 masters, exactly, in 2 bytes a "
                          "parameter instead of 4 (4 GB less at the 1.5b preset); the fused AdamW kernel on CUDA only; "
                          "not under FSDP2. Checkpoints hold fp32 masters either way."})
    qat: str | None = field(
        default=None,
        metadata={"help": "int8: quantization-aware training, int8 fake-quantized weights on the layers that "
                          "--quantize int8 quantizes (the decoder's projections; torchao QAT); the saved checkpoint is "
                          "plain float, quantized at load time (ghostvis eval --quantize int8). none (default): off."})
    kernels: bool = field(default=True, metadata={"help": "Swap in fused kernels on CUDA (ghostvis_hf.kernels)."})
    recompute_mlp: bool = field(
        default=False,
        metadata={"help": "CUDA: the decoder MLPs make silu(gate) * up again in the backward instead of keeping it "
                          "(ghostvis_hf.kernels.mlp): a third less MLP activation memory (~4 GB at the 1.5b preset's "
                          "8,192 tokens a step) for one elementwise pass per layer; lighter than "
                          "--gradient_checkpointing."})
    compile_layers: bool = field(
        default=False,
        metadata={"help": "CUDA: torch.compile every decoder and vision-encoder layer in place (regional compilation: "
                          "one graph per layer kind; names and checkpoints unchanged); Inductor then fuses the norms, "
                          "RoPE and SwiGLU instead of the Liger swaps; the fused cross-entropy and attention kernels "
                          "stay. The first steps compile (about a minute). Not with DeepSpeed ZeRO-3."})
    cuda_graphs: bool = field(
        default=False,
        metadata={"help": "CUDA, one process, --packing --token_budget, bf16 parameters (--precision bf16_master, the "
                          "GPU default): the decoder, LM head and loss of every step "
                          "run as two CUDA graphs (forward, backward) captured at the first step; the embedding and "
                          "the vision side stay eager (or see --cuda_graphs_vision; ghostvis_hf.training.graph_step). "
                          "Removes the decoder's kernel "
                          "launches and host syncs; the loss is the model's own (as --loss model) and scores every position "
                          "(the ignored ones weighted 0). Not with gradient checkpointing or LoRA. Measured on an H200: "
                          "1.14-1.25x the eager recipe (docs/benchmarks/train_recipe_graphs.md)."})
    cuda_graphs_vision: bool = field(
        default=False,
        metadata={"help": "With --cuda_graphs: the vision tower, resampler and projector run as CUDA graphs too, one "
                          "forward/backward pair per number of images a step of the run's plan has, captured when "
                          "training begins in one shared memory pool (each pair keeps its own gradient buffers: about "
                          "the vision side's parameter bytes per image count). Measured on an H200 with "
                          "--compile_layers true: 45.5-45.8 %% MFU against 42.3 %% for --cuda_graphs alone "
                          "(docs/benchmarks/train_recipe_graphs.md)."})
    profile_steps: str | None = field(
        default=None,
        metadata={"help": "START:STOP: profile optimizer steps START..STOP-1 on every rank (torch.profiler); "
                          "profile_rank<R>.txt in the output folder has kernel time by kind, GPU busy time and the "
                          "communication not hidden behind compute."})
    profile_python: bool = field(
        default=False,
        metadata={"help": "with --profile_steps: also record Python stacks and list the Python functions that took "
                          "the host's time (the launcher's hooks, the Trainer's loop); slows the profiled steps more. "
                          "Torch's Python tracer recorded nothing on one GPU image (Python 3.12, torch 2.11): the "
                          "profile says so when that happens."})
    sync_steps: str | None = field(
        default=None,
        metadata={"help": "START:STOP: on CUDA, every time optimizer steps START..STOP-1 made the host wait for the "
                          "GPU, by call stack (torch's sync debug mode), in syncs_rank<R>.txt in the output folder."})
    fsdp_forward_prefetch: int = field(
        default=0,
        metadata={"help": "FSDP2: each sharded layer starts the all-gathers of the next N layers of its stack when "
                          "its forward starts (0: FSDP2's own order, each layer's when the host reaches it)."})
    nccl_max_ctas: int | None = field(
        default=None,
        metadata={"help": "NCCL_MAX_CTAS for this run: the most thread blocks (SMs) one NCCL collective may take, so "
                          "collectives that run beside compute (FSDP2's all-gathers and reduce-scatters) leave it "
                          "more SMs. FSDP2 at 8 rows x 2048 on 2x H200: 8 measured 3-7 %% faster than NCCL's own "
                          "choice (docs/benchmarks/scaling_8rows.md); ZeRO-2, whose parameter all-gather waits "
                          "exposed after each step, was slower in the one run at 8. Applied before the run's first "
                          "collective; an NCCL_MAX_CTAS already in the environment wins. Unset: NCCL's choice."})
    gc_every_steps: int = field(
        default=50,
        metadata={"help": "Python's automatic garbage collection off during training and a young-generation "
                          "collection every N optimizer steps (torchtitan's gc_freq; a full automatic collection "
                          "over torch.compile's objects pauses a step); 0: Python's automatic collection."})
    eval_after_training: bool = field(default=True, metadata={"help": "Generate on the held-out split and score."})
    eval_batch_size: int = field(default=32, metadata={"help": "Batch size of the final generation-based eval."})
    plot: bool = field(default=True, metadata={"help": "Save a learning-curve plot in the output folder."})

    def __post_init__(self):
        if self.answer_style not in (None, "short", "none"):
            raise ValueError(f"answer_style={self.answer_style!r} is not supported; allowed: short, none")
        if self.loss not in ("auto", "model", "trl"):
            raise ValueError(f"loss={self.loss!r} is not supported; allowed: auto, model, trl")
        self.qat = normalize_qat(self.qat)
        parse_profile_steps(self.profile_steps)  # refuses a malformed window before anything loads
        parse_profile_steps(self.sync_steps, "sync_steps")
        check_gc_every_steps(self.gc_every_steps)
        check_forward_prefetch(self.fsdp_forward_prefetch)
        if self.nccl_max_ctas is not None and not 1 <= self.nccl_max_ctas <= 64:
            raise ValueError(f"nccl_max_ctas must be in [1, 64] (NCCL's channels), got {self.nccl_max_ctas}")
        check_graph_flags(self.cuda_graphs, self.cuda_graphs_vision)
        if self.eval_split_fraction is not None and not 0 < self.eval_split_fraction < 1:
            raise ValueError(f"eval_split_fraction must be in (0, 1), got {self.eval_split_fraction}")
        # 0 rows: refused here (it meant no rows to one loader and the default count to another)
        for name in ("num_train_samples", "shapes_train_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (or left unset), got {getattr(self, name)}")
        if self.num_eval_samples is not None and self.num_eval_samples < 0:
            raise ValueError(f"num_eval_samples must be >= 0, got {self.num_eval_samples}")


@dataclass
class RLArguments:
    """Arguments shared by `recipes/grpo.py` and `recipes/rloo.py`."""

    reward_funcs: list[str] = field(
        default_factory=lambda: ["exact_match", "format"],
        metadata={"help": "Reward names from ghostvis_hf.rewards.REWARD_FUNCS (weights: reward_weights)."},
    )
    reward_kwargs: dict | str | None = field(
        default=None,
        metadata={"help": "Arguments of the reward factories, per reward name, e.g. in YAML `reward_kwargs: "
                          "{length_penalty: {budget: 16, unit: words}}` (a JSON string on the command line); "
                          "configurable: ghostvis_hf.rewards.REWARD_FACTORIES."},
    )
    dataset_name: str = field(default="shapes", metadata={"help": "shapes | vqav2 | textvqa | chartqa | coco_captions"})
    dataset_path: str | None = field(default=None, metadata={"help": "Local folder/file or Hub id (not for shapes)."})
    question_types: list[str] | None = field(
        default_factory=lambda: ["color", "shape"], metadata={"help": "shapes question types to train on."}
    )
    num_train_samples: int = field(default=2000, metadata={"help": "Prompts to train on."})
    dataset_seed: int = field(default=1, metadata={"help": "Seed of the built-in data (1: other rows than SFT's)."})
    bootstrap_sft_steps: int = field(
        default=250, metadata={"help": "Steps of the short SFT run that makes a starting checkpoint if none exists."}
    )
    plot: bool = field(default=True, metadata={"help": "Save a reward curve in the output folder."})
    bad_rows: str = field(default="skip", metadata={"help": "skip (count and drop) | error (refuse, naming the row)."})
    num_eval_samples: int = field(
        default=500,
        metadata={"help": "shapes: held-out questions (of the trained types) scored greedily before and after RL on "
                          "a single process; 0 skips."},
    )

    def __post_init__(self):
        if self.bad_rows not in ("skip", "error"):
            raise ValueError(f"bad_rows={self.bad_rows!r} is not supported; allowed: skip, error")
        if self.num_train_samples < 1 or self.num_eval_samples < 0:
            raise ValueError(f"num_train_samples must be >= 1 and num_eval_samples >= 0, got {self.num_train_samples} "
                             f"and {self.num_eval_samples}")
        if isinstance(self.reward_kwargs, str):  # from the command line, as TRL's own `*_kwargs` fields
            self.reward_kwargs = json.loads(self.reward_kwargs)
        if self.reward_kwargs is not None and not isinstance(self.reward_kwargs, dict):
            raise ValueError(f"reward_kwargs must map reward names to their arguments, got {self.reward_kwargs!r}")


def refuse_unused(args, used: set[str], recipe: str) -> None:
    """Raises a `ValueError` naming every field of `args` (a dataclass) that is set to something other than its
    default but that `recipe` does not implement (`used`: the fields it reads), so an option is never ignored
    silently."""
    unused = []
    for f in fields(args):
        default = f.default_factory() if callable(f.default_factory) else f.default
        if f.name not in used and getattr(args, f.name) != default:
            unused.append(f"--{f.name}")
    if unused:
        raise ValueError(f"{recipe} does not implement {', '.join(unused)} (options of {type(args).__name__} that "
                         "other recipes read); leave them unset here")


# What sft_tiny.yaml/align_tiny.yaml set for the tiny model of the main job: the recipes read that YAML when no
# --config is given, and a run of another model must not inherit it (issue 16: a --preset 1.5b run got the tiny
# config_overrides and max_length=256, and every row was refused as cut by truncation).
TINY_MODEL_KEYS = ("resampler_type", "config_overrides", "max_length")


def parse_with_default_config(parser, argv: list[str], default_config: str):
    """`parser.parse_args_and_config(argv)`, reading `default_config` (the main job's YAML) when `argv` has no
    `--config`; then, for a model other than the tiny preset (`--preset`, `--text_model`/`--vision_model`), the
    YAML's `TINY_MODEL_KEYS` fall back to their dataclass defaults unless given on the command line."""
    if "--config" in argv or any(a.startswith("--config=") for a in argv):
        return parser.parse_args_and_config(argv)
    parsed = parser.parse_args_and_config(["--config", default_config, *argv])
    gv = next(a for a in parsed if isinstance(a, GhostVisArguments))
    if gv.preset == "tiny" and not (gv.text_model or gv.vision_model):
        return parsed
    reset = []
    for args in parsed:
        for f in fields(args) if hasattr(args, "__dataclass_fields__") else ():
            given = any(a == f"--{f.name}" or a.startswith(f"--{f.name}=") for a in argv)
            if f.name in TINY_MODEL_KEYS and not given and getattr(args, f.name) != f.default:
                setattr(args, f.name, f.default)
                reset.append(f.name)
    if reset:
        logger.info("not applying %s's tiny-model settings %s to this model", default_config, reset)
    return parsed
