# Copyright 2026 The GhostVis-HF authors. Licensed under the Apache License, Version 2.0.
"""GhostVis modeling, laid out like transformers' LLaVA so TRL and PEFT drive it without patches.

vision tower (AutoModel) → resampler (perceiver | avgpool | none) → 2-layer MLP projector → text decoder (AutoModel)
The image features are scattered into the positions of the image placeholder tokens (`config.image_token_id`), so
any number of images can sit anywhere in a sample and text-only samples can share a batch with image samples.

Self-contained on purpose: this file is copied next to every checkpoint for `trust_remote_code`.
NOTE: `GhostVisForConditionalGeneration` keeps the decoder as `model.language_model` (a bare `AutoModel`) and
the head at the top: TRL's fused LM-head paths call `model.base_model(...)` and read `.last_hidden_state`.

Training speed hooks (filled by `ghostvis_hf.kernels`, which this file never imports):
- `linear_cross_entropy`: when set, a training forward with `labels` computes the loss from the hidden states and
  `lm_head` in one fused pass and returns `logits=None` (never materialises `[tokens, vocab]` logits).
- Packed batches: several samples per row with `position_ids` restarting at 0 and no `attention_mask`; the kwargs
  `cu_seq_lens_q/k`, `max_length_q/k` (as TRL's padding-free collator writes them) pass through to the attention.
"""

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_outputs import (
    BaseModelOutput,
    BaseModelOutputWithPast,
    BaseModelOutputWithPooling,
    CausalLMOutputWithPast,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple

from .configuration_ghostvis import GhostVisConfig

# Version tolerance (this file travels with every checkpoint and must run on each transformers release it meets):
# the output classes below extend transformers' own, so they carry the library's field names, and the forwards never
# name the KV cache: it travels in `**kwargs` to the decoder and comes back in the decoder's output, whatever the
# installed release calls it. NOTE: transformers 5.24 renamed the cache from `past_key_values` to `cache` (forward
# argument and output field; 5.17-5.23 say `past_key_values`). `CACHE_KWARG` is the one place that knows that, read
# off the library's output class rather than written down, for callers that must pass a cache by keyword.
CACHE_KWARG = next(iter({f.name for f in fields(BaseModelOutputWithPast)} - {f.name for f in fields(BaseModelOutput)}))


@dataclass
class GhostVisModelOutputWithPast(BaseModelOutputWithPast):
    """`BaseModelOutputWithPast` plus the projected image features (`image_hidden_states`, `[n_images, n_img_tokens, d_text]`)
    and the image encoder's output (`image_outputs`: `get_image_features`'s, as transformers' multimodal outputs
    carry it; `None` when no image was encoded)."""

    image_hidden_states: torch.FloatTensor | None = None
    image_outputs: BaseModelOutputWithPooling | None = None


@dataclass
class GhostVisCausalLMOutputWithPast(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus the projected image features (`image_hidden_states`, `[n_images, n_img_tokens, d_text]`)
    and the image encoder's output (`image_outputs`: `get_image_features`'s, as transformers' multimodal outputs
    carry it; `None` when no image was encoded)."""

    image_hidden_states: torch.FloatTensor | None = None
    image_outputs: BaseModelOutputWithPooling | None = None


class GhostVisPerceiverBlock(nn.Module):
    """Latents attend to [image tokens; latents] (Flamingo-style), then an MLP; pre-norm residuals."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"resampler_heads={heads} must divide the vision hidden size {dim}")
        self.heads = heads
        self.norm_latents = nn.LayerNorm(dim)
        self.norm_media = nn.LayerNorm(dim)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.kv_proj = nn.Linear(dim, 2 * dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, latents: torch.Tensor, media: torch.Tensor) -> torch.Tensor:
        b, n, d = latents.shape
        q_in = self.norm_latents(latents)  # [B, N, d_v]
        kv_in = torch.cat([self.norm_media(media), q_in], dim=1)  # [B, P + N, d_v]
        q = self.q_proj(q_in).view(b, n, self.heads, -1).transpose(1, 2)  # [B, H, N, d_h]
        k, v = self.kv_proj(kv_in).view(b, kv_in.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v)  # [B, H, N, d_h]
        latents = latents + self.o_proj(attn.transpose(1, 2).reshape(b, n, d))
        return latents + self.mlp(self.norm_mlp(latents))


class GhostVisResampler(nn.Module):
    """Maps `[n_images, n_patches, d_v]` to `[n_images, config.image_seq_length, d_v]`."""

    def __init__(self, config: GhostVisConfig):
        super().__init__()
        self.type = config.resampler_type
        self.num_tokens = config.num_image_tokens
        dim = config.vision_config.hidden_size
        if self.type == "perceiver":
            self.latents = nn.Parameter(torch.randn(config.num_image_tokens, dim) * 0.02)
            self.blocks = nn.ModuleList(
                GhostVisPerceiverBlock(dim, config.resampler_heads, config.resampler_mlp_ratio)
                for _ in range(config.resampler_depth)
            )
            self.norm_out = nn.LayerNorm(dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.type == "none":
            return features
        if self.type == "avgpool":
            n, p, d = features.shape
            side = int(p**0.5)
            if side * side != p:
                raise ValueError(f"avgpool resampler needs a square patch grid, got {p} tokens")
            grid = features.transpose(1, 2).reshape(n, d, side, side)
            out = int(self.num_tokens**0.5)
            return F.adaptive_avg_pool2d(grid, out).flatten(2).transpose(1, 2)  # [n, out*out, d_v]
        latents = self.latents.unsqueeze(0).expand(features.shape[0], -1, -1).to(features.dtype)
        for block in self.blocks:
            latents = block(latents, features)
        return self.norm_out(latents)  # [n, N, d_v]


class GhostVisProjector(nn.Module):
    """2-layer MLP from the vision width to the text width."""

    def __init__(self, config: GhostVisConfig):
        super().__init__()
        self.linear_1 = nn.Linear(config.vision_config.hidden_size, config.text_config.hidden_size)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(config.text_config.hidden_size, config.text_config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class GhostVisPreTrainedModel(PreTrainedModel):
    config_class = GhostVisConfig
    config: GhostVisConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = [CACHE_KWARG]
    _no_split_modules = ["GhostVisPerceiverBlock"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True

    def save_pretrained(self, save_directory, *args, **kwargs):
        # FSDP2's `fully_shard` swaps the instance's class for a subclass it creates inside torch, so saving the custom
        # code would copy torch's file and point `auto_map` at that subclass. Save as the GhostVis class underneath
        # (FSDP's hooks live on the instance, so they are untouched while the class is swapped back).
        own = next(c for c in type(self).__mro__ if c.__module__ == __name__)
        swapped = type(self)
        if own is swapped:
            return super().save_pretrained(save_directory, *args, **kwargs)
        self.__class__ = own
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self.__class__ = swapped

    @classmethod
    def is_custom_code(cls) -> bool:
        # NOTE: transformers treats remote/custom code as possibly writing weights in place, so while initialising it
        # skips every module whose own parameters all look initialised, which includes modules that own none: the
        # in-tree towers' attention/MLP-level inits (SigLIP's xavier init of q/k/v/out) were skipped, and a model built
        # from a state dict with missing tower weights differed from one built by __init__ (transformers 5.18-5.24;
        # caught by test_can_init_all_missing_weights). GhostVis needs no such guard: its `_init_weights` uses
        # transformers.initialization (flag-aware) and it ties parameters, never modules.
        return False

    @torch.no_grad()
    def _init_weights(self, module):
        # The towers are PreTrainedModels and initialise themselves; this covers the glue (and the head).
        super()._init_weights(module)
        if isinstance(module, GhostVisResampler) and module.type == "perceiver":
            init.normal_(module.latents, mean=0.0, std=getattr(self.config.text_config, "initializer_range", 0.02))


def sincos_2d_positions(grid: int, dim: int) -> torch.Tensor:
    """`[grid * grid, dim]` 2D sine-cosine table, row-major like the patch sequence: half the channels encode the
    row, half the column, each as sin/cos pairs over geometric frequencies (MAE's table)."""
    if dim % 4:
        raise ValueError(f"a 2D sine-cosine table needs a width divisible by 4, got {dim}")
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # [dim/4]
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def encode(x):  # [grid*grid] -> [grid*grid, dim/2]
        angles = x.reshape(-1, 1) * freqs
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()


def image_label_mask(input_ids: torch.Tensor, tokens) -> torch.Tensor:
    """True at image placeholders and their frame tokens: inputs, never text to predict (labels there become -100).

    Args:
        input_ids (`torch.Tensor`): token ids, any shape.
        tokens: anything with `image_token_id`, `vision_start_token_id` and `vision_end_token_id` (a `GhostVisConfig`
            or a `GhostVisProcessor`); unset ids are ignored.

    Returns:
        `torch.BoolTensor` of the shape of `input_ids`. The model, the SFT collator and the packing collator all mask
        with this one function (TRL's fused LM head skips the model's own masking, so the collators must do it too).
    """
    ids = [tokens.image_token_id, tokens.vision_start_token_id, tokens.vision_end_token_id]
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for i in ids:  # comparisons with Python ints: no host-to-device copy (a CUDA-graph capture allows none)
        if i is not None:
            mask |= input_ids == i
    return mask


def _capturing(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda and torch.cuda.is_current_stream_capturing()


def scatter_image_features(inputs_embeds: torch.Tensor, mask: torch.Tensor, image_features: torch.Tensor,
                           static: bool | None = None) -> torch.Tensor:
    """`inputs_embeds` with the image features written, in order, over the placeholder positions (`mask`, expanded
    to the shape of `inputs_embeds`).

    Eager forwards use `masked_scatter`, as LLaVA does. Its backward selects the masked gradient (`masked_select`, whose
    output size is read on the host), which a CUDA-graph capture does not allow; `static=True` (the default while a
    CUDA stream is capturing) gathers instead: each position reads feature `cumsum(mask) - 1`, and `torch.where`
    keeps the text embeddings elsewhere. Same values, fixed shapes, no host sync forward or backward.
    """
    if static is None:
        static = _capturing(inputs_embeds)
    if not static:
        return inputs_embeds.masked_scatter(mask, image_features)
    d = inputs_embeds.shape[-1]
    token_mask = mask[..., 0].reshape(-1)  # [B*T]
    index = (token_mask.cumsum(0) - 1).clamp_min(0)  # feature row each placeholder reads, in order
    gathered = image_features.reshape(-1, d).index_select(0, index)  # [B*T, d]
    return torch.where(mask, gathered.view_as(inputs_embeds), inputs_embeds)


class GhostVisModel(GhostVisPreTrainedModel):
    """Vision tower + resampler + projector + bare decoder; returns hidden states (no LM head)."""

    def __init__(self, config: GhostVisConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.resampler = GhostVisResampler(config)
        self.multi_modal_projector = GhostVisProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def init_weights(self):
        super().init_weights()
        if self.config.vision_position_init == "sincos2d":
            self._init_vision_positions()

    @torch.no_grad()
    def _init_vision_positions(self) -> None:
        # NOTE: here, not in `_init_weights`: transformers initialises the tower's modules with the tower's own
        # `_init_weights`. `init_weights` runs when weights are initialised (not on load: loading overwrites them).
        embeddings = getattr(getattr(self.vision_tower, "vision_model", self.vision_tower), "embeddings", None)
        table = getattr(embeddings, "position_embedding", None)
        grid = self.config.patch_grid_size
        if not isinstance(table, nn.Embedding) or table.num_embeddings not in (grid * grid, grid * grid + 1):
            raise ValueError(
                f"vision_position_init='sincos2d' needs a vision tower with a learned position embedding per patch of "
                f"the {grid}x{grid} grid (SigLIP/CLIP style); {type(self.vision_tower).__name__} has none"
            )
        if table.weight.is_meta or table.weight.shape != (table.num_embeddings, table.embedding_dim):
            return  # meta-device construction, or a sharded (ZeRO-3) parameter: weights come later
        values = sincos_2d_positions(grid, table.embedding_dim).to(table.weight)
        if table.num_embeddings == grid * grid + 1:  # CLIP: the class token's row first
            values = torch.cat([torch.zeros_like(values[:1]), values])
        table.weight.copy_(values)

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    @can_return_tuple
    def get_image_features(
        self, pixel_values: torch.Tensor, output_hidden_states=None, output_attentions=None, **kwargs
    ) -> BaseModelOutputWithPooling:
        """Encodes images; `pooler_output` holds the `[n_images, image_seq_length, d_text]` features ready to scatter
        into the text (one `[N, d_text]` entry per image), `last_hidden_state` the vision tower's last layer, and
        `hidden_states` / `attentions` the tower's on request (transformers v5's convention, as in LLaVA)."""
        layer = self.config.vision_feature_layer
        tower_config = self.vision_tower.config
        # Unset flags fall back to the config, as in every transformers model.
        want_hidden = tower_config.output_hidden_states if output_hidden_states is None else output_hidden_states
        want_attentions = tower_config.output_attentions if output_attentions is None else output_attentions
        tower = self.vision_tower(
            pixel_values=pixel_values.to(self.vision_tower.dtype),
            output_hidden_states=bool(want_hidden or layer != -1),
            output_attentions=bool(want_attentions),
        )
        features = tower.last_hidden_state if layer == -1 else tower.hidden_states[layer]  # [n, P, d_v]
        if self.config.vision_feature_select_strategy == "default":
            features = features[:, 1:]
        features = self.multi_modal_projector(self.resampler(features))  # [n, N, d_t]
        return BaseModelOutputWithPooling(
            last_hidden_state=tower.last_hidden_state,
            pooler_output=features,
            hidden_states=tower.hidden_states if want_hidden else None,  # only what was asked for
            attentions=tower.attentions if want_attentions else None,
        )

    def get_placeholder_mask(self, input_ids, inputs_embeds, image_features):
        """Boolean mask of the placeholder positions; raises if their count differs from the features' (eager
        forwards; `torch.compile`/`torch.export` trace through without a data-dependent branch)."""
        if input_ids is None:
            token = self.get_input_embeddings()(
                torch.tensor(self.config.image_token_id, dtype=torch.long, device=inputs_embeds.device)
            )
            mask = (inputs_embeds == token).all(-1)
        else:
            mask = input_ids == self.config.image_token_id
        n_features = image_features.shape[0] * image_features.shape[1]
        # NOTE: the count lives on the device; reading it is a data-dependent step that a compiled graph cannot take
        # (torch 2.11's dynamo also fails on `torch._check_tensor_all` of it here) and a CUDA-graph capture may not
        # sync, so compiled graphs and captures skip the check (`is_compiling` is constant while tracing: no graph
        # break) and eager forwards, where inputs come from users, keep it.
        check = not torch.compiler.is_compiling() and not _capturing(inputs_embeds)
        if check and (n_tokens := int(mask.sum())) != n_features:
            raise ValueError(
                f"Image features and image placeholder tokens do not match: {n_tokens} placeholder tokens "
                f"(id {self.config.image_token_id}) in the text but {n_features} image features "
                f"({image_features.shape[0]} images x {image_features.shape[1]} tokens)"
            )
        return mask.unsqueeze(-1).expand_as(inputs_embeds)

    @can_return_tuple
    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        position_ids=None,
        inputs_embeds=None,
        use_cache=None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> GhostVisModelOutputWithPast:
        r"""
        The KV cache (`cache` on transformers >= 5.24, `past_key_values` before) and the attention kwargs pass
        through `**kwargs` to the decoder unchanged.

        Like LLaVA, a forward with placeholder ids but no `pixel_values` embeds them as ordinary tokens (text-only
        prefills, assisted decoding's assistant prefill); with `pixel_values` the counts must match.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)  # [B, T, d_t]
        image_features = image_outputs = None
        if pixel_values is not None and pixel_values.shape[0] > 0:
            image_outputs = self.get_image_features(pixel_values, return_dict=True)
            image_features = image_outputs.pooler_output.to(inputs_embeds.dtype)  # [n, N, d_t]
            mask = self.get_placeholder_mask(input_ids, inputs_embeds, image_features)
            inputs_embeds = scatter_image_features(inputs_embeds, mask, image_features)
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        # `**outputs`: the decoder's own field names (whatever this release calls the cache), non-None ones only.
        return GhostVisModelOutputWithPast(
            **outputs, image_hidden_states=image_features, image_outputs=image_outputs
        )


class GhostVisForConditionalGeneration(GhostVisPreTrainedModel, GenerationMixin):
    """GhostVis with a language-modeling head; what training recipes, `generate` and the server use."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    # Tensor parallelism (`from_pretrained(..., tp_plan="auto")`): the towers bring their own plans; the head is
    # split by vocabulary column and gathered, as in LLaVA.
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: GhostVisConfig):
        super().__init__(config)
        self.model = GhostVisModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        # `(hidden_states [B, T, d], lm_head, labels [B, T], num_items_in_batch) -> loss`; set by
        # `ghostvis_hf.kernels.apply_kernels(fused_ce=True)`. Runtime-only: not saved with the checkpoint.
        self.linear_cross_entropy = None
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        return self.model.get_image_features(pixel_values, **kwargs)

    @property
    def language_model(self):
        return self.model.language_model

    @property
    def vision_tower(self):
        return self.model.vision_tower

    def mask_image_labels(self, input_ids: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
        """Never train on image placeholders or their frame tokens: they are inputs, not text to predict."""
        if input_ids is None:
            return labels
        drop = image_label_mask(input_ids, self.config)
        return labels.masked_fill(drop, -100)  # unconditionally: `drop.any()` would wait for the GPU every step

    @can_return_tuple
    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        skip_logits=None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> GhostVisCausalLMOutputWithPast:
        r"""
        skip_logits (`bool`, *optional*):
            Compute the loss with `self.linear_cross_entropy` and return `logits=None`. Defaults to `True` when
            training with `labels` and a fused cross-entropy is installed.
        """
        if labels is not None and use_cache is None:
            # A training forward never needs a cache, and with one transformers stops detecting packed sequences
            # from `position_ids` (masking_utils only looks when `past_key_values is None`): samples would attend
            # across their boundaries.
            use_cache = False
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state  # [B, T, d_t]
        if labels is not None:
            labels = self.mask_image_labels(input_ids, labels)
        if skip_logits is None:
            skip_logits = self.training and labels is not None and self.linear_cross_entropy is not None
        if skip_logits:
            if labels is None or self.linear_cross_entropy is None:
                raise ValueError("skip_logits=True needs labels and a fused cross-entropy (ghostvis_hf.kernels)")
            loss = self.linear_cross_entropy(
                hidden_states, self.lm_head, labels, num_items_in_batch=kwargs.get("num_items_in_batch")
            )
            logits = None
        else:
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden_states[:, keep, :])  # [B, T_keep, V]
            loss = None
            if labels is not None:
                loss = self.loss_function(
                    logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
                )
        rest = {k: v for k, v in outputs.items() if k != "last_hidden_state"}  # cache, hidden states, image features
        return GhostVisCausalLMOutputWithPast(loss=loss, logits=logits, **rest)


__all__ = ["GhostVisPreTrainedModel", "GhostVisModel", "GhostVisForConditionalGeneration"]
