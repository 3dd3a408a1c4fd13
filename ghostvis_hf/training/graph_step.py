"""`--cuda_graphs`: the recipes' decoder and loss replayed as CUDA graphs (issue 16).

`ghostvis bench train`'s fixed scenario reached 50 % MFU only once the forward and backward ran as CUDA graphs
(docs/benchmarks/train_graphs.md): launching the decoder's thousands of kernels one by one, and waiting for the GPU
at each host sync, left it idle for part of every step. A token-budget step (`--packing --token_budget`) has the
fixed shapes a graph needs for its decoder, `rows x max_length` tokens every step; what still varies from step to
step is the number of images and of packed sequences. So a step here is:

- eager: the token embedding, the vision tower, resampler and projector (their batch is the step's images, whose
  number varies; the vision attention's cuDNN graphs are built per image count before the first step), and the image
  features written over the placeholders without a host sync (`scatter_image_features(static=True)`);
- two CUDA graphs (`torch.cuda.make_graphed_callables`), captured at the first step: the decoder, the LM head and
  the fused cross-entropy (`DecoderLoss`), forward and backward. Their inputs are the embeddings, `position_ids`,
  `labels`, `cu_seq_lens` padded to a fixed length with empty sequences at the end, and the loss's denominator as a
  device scalar; the attention takes its varlen path with `max_length` as the longest sequence, the cross-entropy
  its static path (every position, the ignored ones weighted 0): nothing in the graphs reads back from the GPU.

With `--cuda_graphs_vision` the vision side (tower, resampler, projector: `ImageFeatures`) is replayed too, one
forward/backward pair per image count of the run's plan (the token-budget sampler knows every step's count),
captured when training begins (before the DataLoader's pin-memory thread runs: make_graphed_callables captures
in CUDA's global mode, where another thread's pinned allocation breaks a capture) in one shared memory pool. The
aim: the graphed recipe's profile (call 8 of 2026-11-30g) had the GPU idle ~17 % of the step while the host launched
the eager part's kernels one by one (~1,600 a step, the vision side's forward and backward among them). Measured on
an H200 (docs/benchmarks/train_recipe_graphs.md): 43.7 % MFU against 42.3 % without, and 45.5-45.8 % with
`--compile_layers true` (the vision layers then compile during the capture).

The backward graph's input gradient flows on into the eager part (scatter, projector, vision tower), and the
parameters' gradients reach `.grad` as in an eager step, so the Trainer's clipping, optimizer and logging are
unchanged. A batch that does not fit the captured shapes (other rows or row length, more sequences than the
sampler's plan allows) runs the model's eager forward instead (`GraphedStepMixin`, with a warning).
"""

import logging
import time

import torch
from torch import nn
from transformers.trainer_callback import TrainerCallback

from ..kernels.cross_entropy import IGNORE_INDEX, LinearCrossEntropy, liger_row_kernel
from ..modeling_ghostvis import scatter_image_features

logger = logging.getLogger(__name__)


def no_mask_mapping(config) -> dict:
    """The decoder's mask mapping ready-made, `None` for each of its layer types (transformers' decoders take a dict of
    prepared masks as `attention_mask`): causal attention over whole rows, or packed rows kept apart by
    `cu_seq_lens`. Left to build it while a stream captures, transformers cannot look at `position_ids` on the host
    and materializes a dense `[B, 1, T, T]` mask."""
    text = config.get_text_config()
    return dict.fromkeys(getattr(text, "layer_types", None) or ["full_attention"])


class DecoderLoss(nn.Module):
    """A GhostVis model's decoder, LM head and fused cross-entropy as one module of tensors, for
    `torch.cuda.make_graphed_callables`: `(inputs_embeds, position_ids, labels, cu_seq_lens, num_items) -> loss`.

    Its parameters are the decoder's and the head's only (the vision side runs before it). The packed rows reach the
    attention as `cu_seq_lens` (varlen) with a ready-made mask mapping (`no_mask_mapping`).

    Args:
        model (`GhostVisForConditionalGeneration`): the model; its decoder and head are shared, not copied.
        max_length (`int`): tokens per row, the longest a packed sequence can be.
        cross_entropy (`LinearCrossEntropy`): the loss, `static=True` for a capture.
    """

    def __init__(self, model, max_length: int, cross_entropy: LinearCrossEntropy):
        super().__init__()
        self.language_model = model.language_model
        self.lm_head = model.lm_head
        self.cross_entropy = cross_entropy
        self.max_length = max_length
        self.masks = no_mask_mapping(model.config)

    def forward(self, inputs_embeds, position_ids, labels, cu_seq_lens, num_items):
        hidden = self.language_model(
            inputs_embeds=inputs_embeds, position_ids=position_ids, attention_mask=self.masks, use_cache=False,
            cu_seq_lens_q=cu_seq_lens, cu_seq_lens_k=cu_seq_lens,
            max_length_q=self.max_length, max_length_k=self.max_length,
        ).last_hidden_state
        return self.cross_entropy(hidden, self.lm_head, labels, num_items_in_batch=num_items)


class ImageFeatures(nn.Module):
    """`pixel_values -> [n_images, image_seq_length, d_text]` features (the model's `get_image_features`), as a module
    whose parameters are the vision side's only (tower, resampler, projector: shared, not copied), for a capture.

    Args:
        model (`GhostVisForConditionalGeneration`): the model.
    """

    def __init__(self, model):
        super().__init__()
        inner = model.model
        self.vision_tower, self.resampler = inner.vision_tower, inner.resampler
        self.multi_modal_projector = inner.multi_modal_projector
        self._encode = inner.get_image_features  # a bound method: the model is not registered as a submodule

    def forward(self, pixel_values):
        return self._encode(pixel_values, return_dict=True).pooler_output


def _capture_autocast(device_type: str):
    """The caller's autocast (on or off, its dtype) without the weight cache, which a capture does not allow: each
    replay would reuse the first step's casts."""
    return torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type),
                          enabled=torch.is_autocast_enabled(device_type), cache_enabled=False)


def embed_with_images(model, input_ids, pixel_values, image_features):
    """The decoder's input embeddings with the image features over the placeholders (the model's own forward, up to
    the decoder), without host syncs: the gathering scatter, and no placeholder-count check (the packing collator
    builds placeholders and images from the same processor call). `image_features` (a callable of `pixel_values`:
    the model's `get_image_features` or its graphs) gives the `[n_images, image_seq_length, d_text]` features."""
    embeds = model.get_input_embeddings()(input_ids)  # [B, T, d]
    if pixel_values is not None and pixel_values.shape[0] > 0:
        features = image_features(pixel_values).to(embeds.dtype)
        mask = (input_ids == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = scatter_image_features(embeds, mask, features, static=True)
    return embeds


class GraphedStep:
    """The loss of a token-budget batch, its decoder part replayed as CUDA graphs (see the module docstring).

    Args:
        model (`GhostVisForConditionalGeneration`): in training mode, on CUDA, with bf16 (or autocast) compute.
        rows (`int`): rows per step (`per_device_train_batch_size`).
        max_length (`int`): tokens per row.
        max_sequences (`int`): the most packed sequences (conversations and padding) a step can have; `cu_seq_lens`
            is padded to `max_sequences + 1` entries.
        capture (`bool`, *optional*, defaults to `True`): `False` runs `DecoderLoss` eagerly on the same padded
            inputs (what the graphs compute, on any device: the CPU tests).
        chunk_size (`int`, *optional*, defaults to 4096): tokens per chunk of the static cross-entropy.
        image_counts (`Iterable[int]`, *optional*): also replay the vision side (`ImageFeatures`: tower, resampler,
            projector) as CUDA graphs, one forward/backward pair per number of images a step can have (the
            sampler's plan knows them all), sharing one memory pool (`capture_vision`; else at the first step with
            images); a step with another count runs it eagerly. `None`: the vision side stays eager.
    """

    def __init__(self, model, rows: int, max_length: int, max_sequences: int, capture: bool = True,
                 chunk_size: int = 4096, image_counts=None):
        if getattr(model, "linear_cross_entropy", None) is None:
            raise ValueError("cuda_graphs needs the fused cross-entropy (--kernels true): the graphs take the loss "
                             "straight from the hidden states")
        self.model, self.rows, self.max_length, self.max_sequences = model, rows, max_length, max_sequences
        self.capture = capture
        backend = "liger" if liger_row_kernel() is not None else "torch"
        self.module = DecoderLoss(model, max_length, LinearCrossEntropy(backend, static=True, chunk_size=chunk_size))
        self.graphed = None
        self.eager_steps = 0
        self.image_counts = sorted({int(n) for n in image_counts or () if n > 0})  # empty: the vision side eager
        self.vision_graphs: dict[int, object] = {}  # images per step -> graphed `ImageFeatures`
        self.pixel_shape = None  # one image's shape in the vision graphs

    def fits(self, inputs: dict) -> bool:
        """Whether the batch has the captured shapes (a token-budget batch of this run always should)."""
        ids, cu = inputs["input_ids"], inputs.get("cu_seq_lens_q")
        return (tuple(ids.shape) == (self.rows, self.max_length) and cu is not None
                and cu.numel() <= self.max_sequences + 1 and "attention_mask" not in inputs)

    def _graph_inputs(self, inputs: dict, num_items_in_batch) -> tuple:
        model, ids = self.model, inputs["input_ids"]
        embeds = embed_with_images(model, ids, inputs.get("pixel_values"), self._image_features)
        labels = model.mask_image_labels(ids, inputs["labels"])
        cu = inputs["cu_seq_lens_q"].to(torch.int32)
        cu = nn.functional.pad(cu, (0, self.max_sequences + 1 - cu.numel()), value=ids.numel())  # empty sequences
        if num_items_in_batch is None:  # the mean over the scored (shifted) positions, as the model's loss
            shifted = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
            num_items = (shifted != IGNORE_INDEX).sum().clamp_min(1)
        elif torch.is_tensor(num_items_in_batch):
            num_items = num_items_in_batch
        else:
            num_items = torch.tensor(num_items_in_batch)
        num_items = num_items.to(embeds.device, torch.float32).reshape(())
        return embeds, inputs["position_ids"], labels, cu, num_items

    def _image_features(self, pixel_values):
        """The step's image features: the graphs of its image count, else (no graph for it, or images of another
        size) the eager vision side."""
        graphed = self.vision_graphs.get(pixel_values.shape[0])
        if graphed is not None and tuple(pixel_values.shape[1:]) == self.pixel_shape:
            return graphed(pixel_values)
        return self.model.get_image_features(pixel_values, return_dict=True).pooler_output

    def capture_vision(self, pixel_shape: tuple, dtype: torch.dtype = torch.float32, device=None) -> None:
        """One graphed `ImageFeatures` per image count, largest first, in one shared memory pool: a step runs one of
        them, forward then backward, before any other (a later capture reuses what an earlier one freed; what each
        keeps, its outputs and gradient buffers, stays its own). Runs under the caller's autocast (as the steps).

        `pixel_shape` is one image's `(channels, height, width)`, `dtype` the batches' `pixel_values` dtype; the
        sample images are random (the warm-up runs take gradients with `torch.autograd.grad`, which leaves `.grad`
        alone). The trainer calls this when training begins, before the DataLoader's pin-memory thread starts:
        make_graphed_callables captures in CUDA's global mode, where that thread's pinned allocations would break a
        capture (otherwise the first step with images captures them)."""
        device = torch.device(device) if device is not None else next(self.model.parameters()).device
        start, self.pixel_shape = time.perf_counter(), tuple(pixel_shape)
        pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None
        trained = [p for p in ImageFeatures(self.model).parameters() if p.requires_grad]
        grad_bytes = sum(p.numel() * p.element_size() for p in trained)  # each count's gradient buffers
        with _capture_autocast(device.type):
            for n in sorted(self.image_counts, reverse=True):
                sample = torch.randn(n, *self.pixel_shape, dtype=dtype, device=device)
                # NOTE: a module comes back from make_graphed_callables itself, its forward replaced by the replay:
                # one (cheap: it shares the model's towers) per count, or every count would replay the last capture
                # (a `vision_feature_layer` below the last leaves the tower's top layers out: no gradient for them)
                self.vision_graphs[n] = torch.cuda.make_graphed_callables(
                    ImageFeatures(self.model), (sample,), num_warmup_iters=3, allow_unused_input=True, pool=pool)
        logger.info("cuda_graphs: captured the vision side for %d image counts per step (%d-%d) in %.1f s; their "
                    "gradient buffers hold %.1f GiB", len(self.image_counts), self.image_counts[0],
                    self.image_counts[-1], time.perf_counter() - start, len(self.image_counts) * grad_bytes / 2**30)

    def _capture(self, sample: tuple):
        device = sample[0].device.type
        # static inputs: the graphs read their inputs from these tensors, the replays copy each batch into them; the
        # embeddings always take a gradient (an input that needs none discards it)
        static = tuple(t.detach().clone().requires_grad_(i == 0) for i, t in enumerate(sample))
        logger.info("cuda_graphs: capturing the decoder + loss (%d x %d tokens, up to %d sequences a step)",
                    self.rows, self.max_length, self.max_sequences)
        with _capture_autocast(device):
            return torch.cuda.make_graphed_callables(self.module, static, num_warmup_iters=3)

    def __call__(self, inputs: dict, num_items_in_batch=None, accumulate: bool = False) -> torch.Tensor:
        """The batch's loss (backward through it as usual); the batch must `fit`.

        `accumulate=True` (gradient accumulation: more backwards before the gradients are used): the replayed
        backward hands each parameter a view of the graph's own gradient buffer, which autograd keeps as `.grad`
        when `.grad` is unset and the next replay then overwrites; so unset gradients are made zeros first, and
        autograd adds into them instead."""
        if not self.fits(inputs):
            raise ValueError(f"batch of {tuple(inputs['input_ids'].shape)} tokens does not fit the captured "
                             f"{self.rows} x {self.max_length} with <= {self.max_sequences} sequences")
        pixels = inputs.get("pixel_values")
        if self.capture and self.image_counts and not self.vision_graphs and pixels is not None:
            # not captured when training began; before the decoder's, as there (captured after it, with fp32
            # parameters under autocast, the vision backward's capture failed on an H200:
            # cudaErrorStreamCaptureImplicit; the order the recipe uses passed)
            self.capture_vision(pixels.shape[1:], pixels.dtype, pixels.device)
        if self.capture and self.graphed is None:
            # NOTE: the sample inputs carry no autograd history: an eager embedding graph alive during the capture
            # would hold the tied embedding's gradient accumulator, made on the default stream, and the captured
            # head gradient would have to join that stream (cudaErrorStreamCaptureImplicit, measured on an H200)
            with torch.no_grad():
                sample = self._graph_inputs(inputs, num_items_in_batch)
            check_varlen_attention(self.model, sample[0].device, sample[0].dtype)
            self.graphed = self._capture(sample)
            del sample
        if accumulate:
            for p in self.model.parameters():
                if p.requires_grad and p.grad is None:
                    p.grad = torch.zeros_like(p)
        args = self._graph_inputs(inputs, num_items_in_batch)
        if not self.capture:
            check_varlen_attention(self.model, args[0].device, args[0].dtype)
            return self.module(*args)
        return self.graphed(*args)

    def note_eager_step(self, inputs: dict) -> None:
        """Counts (and logs, the first and every 100th) a batch that did not fit and ran the eager forward."""
        self.eager_steps += 1
        if self.eager_steps == 1 or self.eager_steps % 100 == 0:
            cu = inputs.get("cu_seq_lens_q")
            logger.warning("cuda_graphs: %d batch(es) did not fit the captured shapes (%d x %d tokens, <= %d sequences;"
                           " this one: %s tokens, %s sequences) and ran eagerly", self.eager_steps, self.rows,
                           self.max_length, self.max_sequences, tuple(inputs["input_ids"].shape),
                           None if cu is None else cu.numel() - 1)


class GraphedStepMixin:
    """Trainer mixin: `cuda_graphs=True` computes training losses with a `GraphedStep` (captured at the first step);
    evaluation, `return_outputs` and a batch that does not fit run the trainer's own `compute_loss`.
    `cuda_graphs_vision=True` replays the vision side too, one graph pair per image count of the plan.

    `class GhostVisSFTTrainer(GraphedStepMixin, ..., TokenBudgetMixin, SFTTrainer)`: the shapes come from the token
    budget (`TokenBudgetMixin` keeps its sampler, whose plan bounds the sequences per step, and the plan's image
    counts).
    """

    def __init__(self, *args, cuda_graphs: bool = False, cuda_graphs_vision: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        check_graph_flags(cuda_graphs, cuda_graphs_vision)
        self.cuda_graphs, self.cuda_graphs_vision = cuda_graphs, cuda_graphs_vision
        self._graphed_step = None
        if cuda_graphs:
            check_cuda_graphs(self)
        if cuda_graphs_vision:
            self.add_callback(_CaptureVisionAtTrainBegin(self))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.cuda_graphs or return_outputs or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        step = self.graphed_step(model)
        if not step.fits(inputs):
            step.note_eager_step(inputs)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return step(inputs, num_items_in_batch, accumulate=self.args.gradient_accumulation_steps > 1)


    def graphed_step(self, model) -> GraphedStep:
        """The run's `GraphedStep` (made at the first call), shaped by the token budget and the sampler's plan."""
        if self._graphed_step is None:
            budget, sampler = self.data_collator.token_budget, self._token_budget_sampler
            self._graphed_step = GraphedStep(
                self.accelerator.unwrap_model(model), rows=budget.rows, max_length=budget.max_length,
                max_sequences=sampler.max_sequences_per_step(),
                image_counts=self._image_counts if self.cuda_graphs_vision else None)
        return self._graphed_step


class _CaptureVisionAtTrainBegin(TrainerCallback):
    """`cuda_graphs_vision`: captures the vision side's graphs when training begins (the model is on its device, the
    DataLoader not yet iterated), under the trainer's autocast, for the vision tower's configured image size."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        step = trainer.graphed_step(trainer.model)
        if not step.image_counts or step.vision_graphs or not step.capture:
            return
        vision = step.model.config.vision_config
        with trainer.autocast_smart_context_manager():
            step.capture_vision((vision.num_channels, vision.image_size, vision.image_size))


def check_graph_flags(cuda_graphs: bool, cuda_graphs_vision: bool) -> None:
    """Refuses `cuda_graphs_vision` without `cuda_graphs` (the vision graphs run inside the graphed steps)."""
    if cuda_graphs_vision and not cuda_graphs:
        raise ValueError("cuda_graphs_vision replays the vision side inside --cuda_graphs steps: set --cuda_graphs "
                         "true too")


def check_cuda_graphs(trainer) -> None:
    """Refuses, before training, a run whose steps `cuda_graphs` cannot capture."""
    args, model = trainer.args, trainer.model
    problems = []
    if getattr(trainer.data_collator, "token_budget", None) is None:
        problems.append("token-budget steps (--packing true --token_budget true: every step rows x max_length)")
    if args.device.type != "cuda":
        problems.append(f"a CUDA device (this run is on {args.device.type})")
    if args.world_size > 1:
        problems.append(f"one process (this run has {args.world_size}: DDP/FSDP/DeepSpeed hook the model's forward)")
    if args.gradient_checkpointing:
        problems.append("--gradient_checkpointing false (recomputation inside a capture is not supported here)")
    if hasattr(model, "peft_config"):
        problems.append("full fine-tuning (not LoRA/QLoRA)")
    if getattr(model, "linear_cross_entropy", None) is None:
        problems.append("the fused cross-entropy (--kernels true)")
    param = next(model.parameters(), None)
    if param is not None and param.dtype not in (torch.bfloat16, torch.float16):
        # NOTE: with fp32 weights the bf16 compute comes from accelerate's autocast around the model's forward, which
        # the graphed step does not call (it runs the towers and the decoder itself)
        problems.append(f"bf16 parameters (--precision bf16_master, the GPU default; these are {param.dtype}: "
                        "--precision autocast puts its autocast around the model's forward, which the graphs bypass)")
    if problems:
        raise ValueError("cuda_graphs needs " + "; ".join(problems))


def check_varlen_attention(model, device, dtype) -> None:
    """Refuses a decoder attention that would not keep the packed sequences apart: the graphs pass no mask, only
    `cu_seq_lens`, which GhostVis's attention (varlen kernels, on CUDA, bf16/fp16 or autocast) and flash-attn read."""
    from ..kernels.attention import reads_cu_seq_lens

    impl = model.config.get_text_config()._attn_implementation
    if not reads_cu_seq_lens(model.config, device, dtype):
        raise ValueError(f"cuda_graphs needs a decoder attention that reads cu_seq_lens (GhostVis's varlen attention "
                         f"on CUDA in bf16 with --kernels, or flash_attention_2); this model's is {impl!r} on "
                         f"{device.type} in {dtype}")


__all__ = ["DecoderLoss", "GraphedStep", "GraphedStepMixin", "ImageFeatures", "check_cuda_graphs",
           "check_graph_flags", "check_varlen_attention", "embed_with_images", "no_mask_mapping"]
