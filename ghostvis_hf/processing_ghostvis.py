# Copyright 2026 The GhostVis-HF authors. Licensed under the Apache License, Version 2.0.
"""GhostVis processor: a SigLIP image processor + a tokenizer + a Qwen-style chat template.

Each `<image>` marker in the text becomes `<|vision_start|>` + `<|image_pad|>` x N + `<|vision_end|>`, N being the
number of features the model scatters into the placeholder positions (`num_image_tokens`).

NOTE: the expansion happens on token ids, not on the text, and every expanded token keeps the character span of its
`<image>` marker. The offsets returned for `return_assistant_tokens_mask` therefore point into the rendered chat text
on every transformers 5.x release, whichever way that release maps offsets back (with or without text-replacement
offsets).

Self-contained on purpose: this file is copied next to every checkpoint for `trust_remote_code`.
"""

import torch
from transformers import BatchFeature
from transformers.image_utils import ImageInput
from transformers.processing_utils import (
    AudioKwargs,
    ImagesKwargs,
    MultiModalData,
    ProcessingKwargs,
    ProcessorMixin,
    Unpack,
    VideosKwargs,
)
from transformers.tokenization_utils_base import PreTokenizedInput, TextInput

from .image_utils_ghostvis import to_rgb_image

IMAGE_TOKEN = "<image>"
IMAGE_PAD_TOKEN = "<|image_pad|>"
VISION_START_TOKEN = "<|vision_start|>"
VISION_END_TOKEN = "<|vision_end|>"
SPECIAL_TOKENS = [IMAGE_TOKEN, VISION_START_TOKEN, VISION_END_TOKEN, IMAGE_PAD_TOKEN]

# Qwen2.5-style ChatML; no default system prompt (it would cost the tiny model tokens for nothing).
# Assistant turns are wrapped in {% generation %} so `return_assistant_tokens_mask=True` works (TRL assistant_only_loss).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\n' -}}"
    "{% generation %}"
    "{%- for part in parts -%}{%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}{%- endfor -%}"
    "{{- '<|im_end|>' -}}"
    "{% endgeneration %}"
    "{{- '\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' -}}"
    "{%- for part in parts -%}"
    "{%- if part['type'] == 'image' -%}{{- '<image>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}"
    "{{- '<|im_end|>\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)

_TEXT_KWARGS = {
    "padding", "padding_side", "truncation", "max_length", "pad_to_multiple_of", "add_special_tokens",
    "return_offsets_mapping", "return_attention_mask", "return_mm_token_type_ids", "return_tensors",
}
# The input rules, as transformers' own processors apply them: image-processor options (transformers' `ImagesKwargs`,
# e.g. `do_rescale`, `rescale_factor`) go to the image processor; options of modalities GhostVis does not have (video
# frames, audio sampling) are ignored, as callers such as pipelines and lmms-eval pass them to every processor; any
# other name is refused (a typo must not pass silently).
_IMAGE_KWARGS = set(ImagesKwargs.__annotations__) - {"return_tensors", "image_seq_length"}
_IGNORED_KWARGS = (set(VideosKwargs.__annotations__) | set(AudioKwargs.__annotations__)) - _IMAGE_KWARGS - _TEXT_KWARGS
_KWARG_GROUPS = ("text_kwargs", "images_kwargs", "videos_kwargs", "audio_kwargs", "common_kwargs")


class GhostVisProcessorKwargs(ProcessingKwargs, total=False):
    """The options `GhostVisProcessor.__call__` takes: transformers' text and image-processor options."""

    _defaults = {}


# transformers 5.2x mirrors these two between the flat and the `text_kwargs` form (backward compatibility).
_MIRRORED_KWARGS = ("return_mm_token_type_ids", "return_text_replacement_offsets")


def _flatten_kwargs(kwargs: dict) -> dict:
    """Merges the per-modality dicts (`text_kwargs=...`, `images_kwargs=...`) into one. A name given both flat and in a
    dict is an error, as in transformers' processors (`Keyword argument ... was passed two times`)."""
    flat = dict(kwargs.get("common_kwargs") or {})  # defaults for every modality, below the flat options
    flat.update({k: v for k, v in kwargs.items() if k not in _KWARG_GROUPS})
    given = set(kwargs) - set(_KWARG_GROUPS)
    for group in _KWARG_GROUPS[:-1]:  # common_kwargs excluded: merged above
        for key, value in (kwargs.get(group) or {}).items():
            if key in given and not (key in _MIRRORED_KWARGS and flat[key] == value):
                raise ValueError(f"Processor argument {key!r} given twice: as a keyword argument and in {group}")
            flat[key] = value
    return flat


def image_placeholder_run(image_token_id: int, num_image_tokens: int, vision_start_token_id: int,
                          vision_end_token_id: int) -> list[int]:
    """The token ids one `<image>` marker expands to: `<|vision_start|>`, `<|image_pad|>` x N, `<|vision_end|>`.

    The processor, the inference engine's prompt encoding and synthetic benchmark samples all build the run here.

    Args:
        image_token_id (`int`): the placeholder (`<|image_pad|>`) the image features replace.
        num_image_tokens (`int`): placeholders per image (`config.image_seq_length`).
        vision_start_token_id, vision_end_token_id (`int`): the ids framing the run.

    Example:
    ```python
    >>> image_placeholder_run(image_token_id=9, num_image_tokens=3, vision_start_token_id=7, vision_end_token_id=8)
    [7, 9, 9, 9, 8]
    ```
    """
    return [vision_start_token_id] + [image_token_id] * num_image_tokens + [vision_end_token_id]


def _text_list(text) -> list[str]:
    """`text` as a non-empty list of strings, or a `ValueError` that names what was passed instead."""
    texts = [text] if isinstance(text, str) else list(text) if isinstance(text, (list, tuple)) else None
    odd = [type(t).__name__ for t in texts if not isinstance(t, str)] if texts is not None else []
    if texts is None or odd:
        got = f"a list holding {odd[0]}" if odd else type(text).__name__
        raise ValueError(f"text must be a string or a list of strings, got {got}")
    if not texts:
        raise ValueError("text is an empty list: pass a string or a list of strings, one per sample")
    return texts


class GhostVisProcessor(ProcessorMixin):
    r"""
    Processor for GhostVis: images through the SigLIP image processor, text through the tokenizer, with every
    `<image>` marker expanded to the image's placeholder run.

    Args:
        image_processor (`SiglipImageProcessor`): resizes and normalises images.
        tokenizer (`PreTrainedTokenizerFast`): must know the `<image>`, `<|vision_start|>`, `<|vision_end|>` and
            `<|image_pad|>` tokens (`ghostvis_hf.compose` adds them).
        chat_template (`str`, *optional*): defaults to the built-in ChatML template with generation markers.
        num_image_tokens (`int`, *optional*, defaults to 64): placeholders per image (`config.image_seq_length`).
    """

    valid_processor_kwargs = GhostVisProcessorKwargs

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, num_image_tokens=64, **kwargs):
        if chat_template is None:
            chat_template = CHAT_TEMPLATE
        self.num_image_tokens = num_image_tokens
        self.image_token = IMAGE_TOKEN
        missing = [t for t in SPECIAL_TOKENS if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
        if missing:
            raise ValueError(f"The tokenizer lacks the GhostVis special tokens {missing}; add them with "
                             "tokenizer.add_tokens(..., special_tokens=True) (ghostvis_hf.compose does this)")
        self.image_marker_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD_TOKEN)
        self.vision_start_token_id = tokenizer.convert_tokens_to_ids(VISION_START_TOKEN)
        self.vision_end_token_id = tokenizer.convert_tokens_to_ids(VISION_END_TOKEN)
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    # ------------------------------------------------------------------ images
    def _group_images(self, images, texts: list[str]) -> list[list]:
        """Returns one list of images per text, checking each text's `<image>` count against its images."""
        counts = [t.count(IMAGE_TOKEN) for t in texts]
        if images is None:
            if any(counts):
                raise ValueError(f"The text has {sum(counts)} {IMAGE_TOKEN} markers but no images were given")
            return [[] for _ in texts]
        nested = isinstance(images, (list, tuple)) and len(images) > 0 and all(
            isinstance(x, (list, tuple)) for x in images
        )
        if nested:
            if len(images) != len(texts):
                raise ValueError(f"Got image lists for {len(images)} samples but {len(texts)} texts")
            groups = [list(x) for x in images]
            for i, (group, n) in enumerate(zip(groups, counts)):
                if len(group) != n:
                    raise ValueError(
                        f"Sample {i} has {n} {IMAGE_TOKEN} markers but {len(group)} images: each image needs exactly "
                        f"one {IMAGE_TOKEN} marker in the text"
                    )
            return groups
        flat = list(images) if isinstance(images, (list, tuple)) else [images]
        if len(flat) != sum(counts):
            raise ValueError(
                f"Got {len(flat)} images but the text has {sum(counts)} {IMAGE_TOKEN} markers: each image needs "
                f"exactly one {IMAGE_TOKEN} marker in the text"
            )
        groups, start = [], 0
        for n in counts:
            groups.append(flat[start : start + n])
            start += n
        return groups

    def preprocess_images(self, images: list, where: str = "image", **image_kwargs) -> torch.Tensor:
        """Validates and converts a flat list of images to `pixel_values` `[n_images, 3, H, W]`; `image_kwargs` are
        the image processor's options (`do_rescale`, `rescale_factor`, ...)."""
        rgb = [to_rgb_image(img, where=f"{where} {k}") for k, img in enumerate(images)]
        return self.image_processor(rgb, return_tensors="pt", **image_kwargs)["pixel_values"]

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs) -> MultiModalData:
        """How many placeholder tokens each image takes (what vLLM's Transformers backend asks): the
        `num_image_tokens` placeholders its features replace (`mm_token_type_ids == 1`), whatever the image size
        (images are resized); the `<|vision_start|>`/`<|vision_end|>` frame around them is ordinary text."""
        data = {}
        if image_sizes is not None:
            data.update(num_image_tokens=[self.num_image_tokens] * len(image_sizes),
                        num_image_patches=[1] * len(image_sizes))
        return MultiModalData(**data)

    # ------------------------------------------------------------------ text
    def _expand(self, ids: list[int], offsets: list | None):
        """Replaces each `<image>` id with its framed placeholder run; offsets repeat the marker's span."""
        run = image_placeholder_run(self.image_token_id, self.num_image_tokens, self.vision_start_token_id,
                                    self.vision_end_token_id)
        out_ids, out_offsets = [], [] if offsets is not None else None
        for pos, tok in enumerate(ids):
            if tok == self.image_marker_id:
                out_ids.extend(run)
                if offsets is not None:
                    out_offsets.extend([tuple(offsets[pos])] * len(run))
            else:
                out_ids.append(tok)
                if offsets is not None:
                    out_offsets.append(tuple(offsets[pos]))
        return out_ids, out_offsets

    def _truncate(self, ids, offsets, max_length: int, sample: int):
        if len(ids) <= max_length:
            return ids, offsets
        # Refuse to cut an image's run (or drop an image whose pixels we would still return).
        dropped_images = sum(1 for t in ids[max_length:] if t == self.vision_end_token_id)
        if dropped_images:
            raise ValueError(
                f"Sample {sample} is {len(ids)} tokens long; truncating it to max_length={max_length} would cut "
                f"through or drop {dropped_images} image placeholder run(s) of {self.num_image_tokens + 2} tokens. "
                "Raise max_length or shorten/drop the sample."
            )
        return ids[:max_length], None if offsets is None else offsets[:max_length]

    def __call__(
        self,
        images: ImageInput | None = None,
        text: TextInput | PreTokenizedInput | list[TextInput] | None = None,
        **kwargs: Unpack[GhostVisProcessorKwargs],
    ) -> BatchFeature:
        """Tokenizes `text` (str or list of str) and processes `images`.

        Args:
            images: one image, a flat list (in `<image>` marker order) or one list per text; `to_rgb_image` lists the
                accepted kinds and array scales (an http(s) URL is refused, never fetched).
            text: a string or a list of strings with `<image>` markers.
            padding (`bool` or `str`): `True`/`"longest"`, `"max_length"` or `False`.
            padding_side (`str`): `"left"` or `"right"` (defaults to the tokenizer's).
            truncation, max_length: truncation never cuts an image's placeholder run (`ValueError` instead).
            return_tensors (`str`): `"pt"`, `"np"` or `None` (lists).
            add_special_tokens, return_offsets_mapping, return_mm_token_type_ids, pad_to_multiple_of: as for
                tokenizers.
        """
        # Callers such as lmms-eval pass every modality (`videos=[]`, `audios=[]`, the older spelling of `audio`):
        # empty ones are nothing to process.
        for name in ("videos", "audio", "audios"):
            value = kwargs.pop(name, None)
            if value is not None and not (isinstance(value, (list, tuple)) and len(value) == 0):
                raise ValueError(f"GhostVis handles images and text only (got {name})")
        # Defaults: what the tokenizer was created with (`padding`, `max_length`, `padding_side`, ...), then the call.
        init_kwargs = getattr(self.tokenizer, "init_kwargs", {})
        defaults = {k: getattr(self.tokenizer, k, init_kwargs[k]) for k in _TEXT_KWARGS if k in init_kwargs}
        kwargs = {**defaults, **_flatten_kwargs(kwargs)}
        kwargs.pop("return_text_replacement_offsets", None)  # offsets already refer to the unexpanded text
        unknown = set(kwargs) - _TEXT_KWARGS - _IMAGE_KWARGS - _IGNORED_KWARGS
        if unknown:
            raise ValueError(f"Unexpected processor arguments {sorted(unknown)}; allowed: text options "
                             f"{sorted(_TEXT_KWARGS)} and image-processor options {sorted(_IMAGE_KWARGS)}")
        image_kwargs = {k: v for k, v in kwargs.items() if k in _IMAGE_KWARGS}
        return_tensors = kwargs.get("return_tensors")
        if text is None:
            if images is None:
                raise ValueError("Pass text, images or both")
            flat = images if isinstance(images, (list, tuple)) else [images]
            flat = [im for x in flat for im in (x if isinstance(x, (list, tuple)) else [x])]
            pixel_values = self.preprocess_images(flat, **image_kwargs)
            return BatchFeature({"pixel_values": pixel_values}, tensor_type=return_tensors)
        texts = _text_list(text)
        groups = self._group_images(images, texts)
        flat_images = [(i, k, im) for i, g in enumerate(groups) for k, im in enumerate(g)]
        data = {}
        if flat_images:
            rgb = [to_rgb_image(im, where=f"image {k} of sample {i}") for i, k, im in flat_images]
            data["pixel_values"] = self.image_processor(rgb, return_tensors="pt", **image_kwargs)["pixel_values"]

        want_offsets = bool(kwargs.get("return_offsets_mapping"))
        enc = self.tokenizer(
            texts,
            add_special_tokens=kwargs.get("add_special_tokens", True),
            return_offsets_mapping=want_offsets,
            return_attention_mask=False,
        )
        all_ids, all_offsets = [], []
        max_length = kwargs.get("max_length")
        truncation = kwargs.get("truncation") not in (None, False, "do_not_truncate")
        for i, ids in enumerate(enc["input_ids"]):
            ids, offsets = self._expand(ids, enc["offset_mapping"][i] if want_offsets else None)
            if truncation and max_length is not None:
                ids, offsets = self._truncate(ids, offsets, max_length, i)
            all_ids.append(ids)
            all_offsets.append(offsets)

        masks = self._pad(all_ids, all_offsets if want_offsets else None, kwargs)
        data["input_ids"] = all_ids
        if kwargs.get("return_attention_mask", True):
            data["attention_mask"] = masks
        if want_offsets:
            data["offset_mapping"] = [[list(o) for o in offs] for offs in all_offsets]
        if kwargs.get("return_mm_token_type_ids"):
            data["mm_token_type_ids"] = [[int(t == self.image_token_id) for t in ids] for ids in all_ids]
        if return_tensors is None and "pixel_values" in data:
            data["pixel_values"] = data["pixel_values"].tolist()
        return BatchFeature(data, tensor_type=return_tensors)

    def _pad(self, all_ids: list[list[int]], all_offsets: list | None, kwargs: dict) -> list[list[int]]:
        """Pads `all_ids` (and `all_offsets`) in place as `kwargs` asks; returns the attention masks."""
        padding, max_length = kwargs.get("padding", False), kwargs.get("max_length")
        lengths = [len(x) for x in all_ids]
        if not padding:
            if kwargs.get("return_tensors") is not None and len(set(lengths)) > 1:
                raise ValueError("Texts have different lengths; pass padding=True to batch them into tensors")
            return [[1] * n for n in lengths]
        target = max(lengths) if lengths else 0
        if padding == "max_length":
            if max_length is None:
                raise ValueError("padding='max_length' needs max_length")
            target = max(target, max_length)
        if multiple := kwargs.get("pad_to_multiple_of"):
            target = -(-target // multiple) * multiple
        side = kwargs.get("padding_side") or self.tokenizer.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            raise ValueError("The tokenizer has no pad token; set tokenizer.pad_token to pad batches")
        masks = []
        for i, ids in enumerate(all_ids):
            n = target - len(ids)
            mask, pad = [1] * len(ids), [pad_id] * n
            all_ids[i], mask = (pad + ids, [0] * n + mask) if side == "left" else (ids + pad, mask + [0] * n)
            if all_offsets is not None:
                zeros = [(0, 0)] * n
                all_offsets[i] = zeros + all_offsets[i] if side == "left" else all_offsets[i] + zeros
            masks.append(mask)
        return masks

    def _adjust_assistant_masks_indices(self, processed_dict, generation_indices):
        # `apply_chat_template(..., return_assistant_tokens_mask=True)` (TRL's assistant-only loss) walks the offsets
        # token by token in Python; on a tensor every step is a tensor op, and it was 12 % of the tiny SFT run.
        offsets = processed_dict.get("offset_mapping")
        if isinstance(offsets, torch.Tensor):
            processed_dict["offset_mapping"] = offsets.tolist()
        return super()._adjust_assistant_masks_indices(processed_dict, generation_indices)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values"]


__all__ = ["GhostVisProcessor", "image_placeholder_run", "to_rgb_image"]
