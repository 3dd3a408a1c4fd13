"""A slot-based static KV cache and the decode attention that reads it.

Each running sequence owns one row ("slot") of preallocated `[max_batch, kv_heads, max_seq_len, head_dim]` buffers
per layer and writes its next key/value at its own position. Unlike `transformers`' `StaticCache` (one shared
`cache_position` for the whole batch) sequences of any length can join and leave the batch between two steps without
left-padding or moving anybody's cache, and the buffers never move, so a decode step can be captured in a CUDA graph.

The decode step hands the decoder a ready-made boolean mask through the `{"full_attention": mask}` form of
`attention_mask` (skipping `transformers`' mask construction) and runs attention through `slot_attention`, registered
in `transformers`' `AttentionInterface`: it folds the query heads onto the KV heads instead of materialising
`repeat_kv` copies of the whole cache (what SDPA with a mask otherwise costs on CUDA), and defers to the model's
original attention function for every other call (prefill, training, stock `generate`).
"""

import sys

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

ATTN_PREFIX = "ghostvis_slots_"  # + the original implementation, e.g. "ghostvis_slots_sdpa"


def slot_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention for `AttentionInterface`: packed-GQA SDPA on decode steps marked `ghostvis_decode=True`."""
    if not kwargs.pop("ghostvis_decode", False):
        original = module.config._attn_implementation[len(ATTN_PREFIX) :]
        # "eager" lives in each model's own file, not in the shared interface.
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        fn = eager if original == "eager" and eager is not None else ALL_ATTENTION_FUNCTIONS[original]
        return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    b, n_heads, q_len, head_dim = query.shape  # [B, H, 1, D]
    n_kv = key.shape[1]
    q = query.reshape(b, n_kv, (n_heads // n_kv) * q_len, head_dim)  # [B, H_kv, G, D]: heads of a group share KV
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=attention_mask, scale=scaling)  # [B, H_kv, G, D]
    return out.reshape(b, n_heads, q_len, head_dim).transpose(1, 2), None  # [B, 1, H, D]


def install_slot_attention(language_model) -> None:
    """Routes the decoder's attention through `slot_attention`; other calls keep their original function and mask."""
    config = language_model.config
    current = config._attn_implementation or "sdpa"
    if current.startswith(ATTN_PREFIX):
        return
    if current not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping and current != "eager":
        raise ValueError(f"attn_implementation={current!r} is not supported by the engine; use 'sdpa' or 'eager'")
    name = ATTN_PREFIX + current
    AttentionInterface.register(name, slot_attention)
    # transformers builds no padding mask for implementations it has no mask function for: reuse the original's.
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[current])
    try:
        language_model.set_attn_implementation(name)
    except Exception:  # backbones that refuse the switch: set the config field directly
        config._attn_implementation = name


class SlotKVCache:
    """Per-slot static KV buffers, duck-typed to the part of `transformers.Cache` a decoder calls (`update`).

    Args:
        num_layers (`int`), max_batch (`int`), num_kv_heads (`int`), max_seq_len (`int`), head_dim (`int`)
        dtype (`torch.dtype`), device (`torch.device`)
    """

    is_compileable = True

    def __init__(self, num_layers, max_batch, num_kv_heads, max_seq_len, head_dim, dtype, device):
        shape = (max_batch, num_kv_heads, max_seq_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        # Set by `begin_step` before each decode forward.
        self._rows: torch.Tensor | None = None
        self._pos: torch.Tensor | None = None
        self._batch = max_batch
        self._length = max_seq_len

    @classmethod
    def for_model(cls, text_config, max_batch: int, max_seq_len: int, dtype, device) -> "SlotKVCache":
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        n_kv = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
        return cls(text_config.num_hidden_layers, max_batch, n_kv, max_seq_len, head_dim, dtype, device)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def begin_step(self, rows: torch.Tensor, positions: torch.Tensor, batch: int, length: int) -> None:
        """Next `update`s write one token per row at `positions`, return `batch` slots x `length` columns."""
        self._rows, self._pos, self._batch, self._length = rows, positions, batch, length

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        # key_states: [B, H_kv, 1, D]; advanced indices on dims 0 and 2 put B first: target is [B, H_kv, D].
        self.keys[layer_idx][self._rows, :, self._pos] = key_states[:, :, 0]
        self.values[layer_idx][self._rows, :, self._pos] = value_states[:, :, 0]
        return (
            self.keys[layer_idx][: self._batch, :, : self._length],
            self.values[layer_idx][: self._batch, :, : self._length],
        )

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._length

    def write_prefill(self, slots, rows, starts, layer_keys: list, layer_values: list) -> None:
        """Copies prefilled K/V into slots: batch row `rows[j]` from column `starts[j]` (left padding) goes to slot
        `slots[j]` from column 0. Columns past a prompt's end get filler that decode steps overwrite before reading.

        Args:
            slots, rows, starts (`torch.LongTensor` of shape `[n]`)
            layer_keys, layer_values (`list[torch.Tensor]`): per layer, `[k, H_kv, T, D]`.
        """
        width = layer_keys[0].shape[2]
        cols = (starts[:, None] + torch.arange(width, device=starts.device)[None, :]).clamp(max=width - 1)  # [n, T]
        for layer, (k, v) in enumerate(zip(layer_keys, layer_values)):
            idx = cols[:, None, :, None].expand(len(rows), k.shape[1], width, k.shape[3])  # [n, H_kv, T, D]
            self.keys[layer][slots, :, :width] = k[rows].gather(2, idx)
            self.values[layer][slots, :, :width] = v[rows].gather(2, idx)


def decode_mask(positions: torch.Tensor, length: int, sliding_window: int | None = None) -> torch.Tensor:
    """Boolean `[B, 1, 1, length]` mask: row b sees columns `0..positions[b]` (within the window, if any)."""
    cols = torch.arange(length, device=positions.device)[None, :]
    mask = cols <= positions[:, None]
    if sliding_window:
        mask = mask & (cols > positions[:, None] - sliding_window)
    return mask[:, None, None, :]
