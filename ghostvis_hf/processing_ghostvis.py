"""GhostVis processor: a SigLIP image processor + a tokenizer + a Qwen-style chat template.

Each `<image>` marker in the text becomes `<|vision_start|>` + `<|image_pad|>` x N + `<|vision_end|>`, N being the
number of features the model scatters into the placeholder positions (`num_image_tokens`).

NOTE: the expansion happens on token ids, not on the text, and every expanded token keeps the character span of its
`<image>` marker. The offsets returned for `return_assistant_tokens_mask` therefore point into the rendered chat text
on every transformers 5.x release, whichever way that release maps offsets back (with or without text-replacement
offsets).

Self-contained on purpose: this file is copied next to every checkpoint for `trust_remote_code`.
"""

import base64
import io
import os

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from transformers import BatchFeature
from transformers.processing_utils import AudioKwargs, ImagesKwargs, MultiModalData, ProcessorMixin, VideosKwargs

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


def _flatten_kwargs(kwargs: dict) -> dict:
    """Merges the per-modality dicts (`text_kwargs=...`, `images_kwargs=...`) into one; a name given twice with two
    different values is an error rather than a silent pick."""
    flat = {k: v for k, v in kwargs.items() if k not in _KWARG_GROUPS}
    for group in _KWARG_GROUPS:
        for key, value in (kwargs.get(group) or {}).items():
            if key in flat and flat[key] is not value and flat[key] != value:
                raise ValueError(f"Processor argument {key!r} given twice with different values ({flat[key]!r} and "
                                 f"{value!r} in {group})")
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


def _image_error(where: str, problem: str) -> ValueError:
    return ValueError(f"{where}: {problem}")


def to_rgb_image(image, where: str = "image") -> Image.Image:
    """Turns one image-like object into an RGB `PIL.Image`, or raises a `ValueError` that says what is wrong.

    Accepts a `PIL.Image`, a numpy array or torch tensor (HWC or CHW, uint8 or float in [0, 1]), raw bytes, a
    `{"bytes": …}`/`{"path": …}` dict (the `datasets` layout), a local path, a `data:` base64 URL or an http(s) URL.
    Grayscale, CMYK, 16-bit and palette images become RGB; images with transparency (an alpha channel, or a palette
    or colour-key `transparency` entry) are composited onto white. An RGB `PIL.Image` is returned as it is.

    Example:
    ```python
    >>> from PIL import Image
    >>> palette = Image.new("P", (2, 1))
    >>> palette.putpalette([0, 0, 0, 255, 0, 0])
    >>> palette.putpixel((1, 0), 1)
    >>> palette.info["transparency"] = 0  # palette entry 0 (black) is transparent
    >>> to_rgb_image(palette).getpixel((0, 0)), to_rgb_image(palette).getpixel((1, 0))
    ((255, 255, 255), (255, 0, 0))
    >>> to_rgb_image(Image.new("RGBA", (1, 1), (0, 0, 255, 0))).getpixel((0, 0))
    (255, 255, 255)
    ```
    """
    image = _as_pil_image(image, where)
    if image.width == 0 or image.height == 0:
        raise _image_error(where, f"zero-size image ({image.width}x{image.height})")
    try:
        if image.mode == "RGB":
            return image
        # NOTE: a plain .convert("RGB") shows transparent pixels in their stored colour (often black): it ruins charts
        # and logos. Same test as Pillow >= 10.1's `has_transparency_data`, spelled out for older Pillows.
        if image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            background = Image.new("RGB", rgba.size, (255, 255, 255))
            background.paste(rgba, mask=rgba.getchannel("A"))
            return background
        return image.convert("RGB")
    except OSError as e:  # truncated files fail only when decoded
        raise _image_error(where, f"image data could not be decoded ({e})") from None


def _as_pil_image(image, where: str) -> Image.Image:
    """Decodes what `to_rgb_image` accepts into a `PIL.Image` (any mode), or raises a `ValueError`."""
    if isinstance(image, dict):
        if image.get("bytes") is not None:
            image = image["bytes"]
        elif image.get("path"):
            image = image["path"]
        else:
            raise _image_error(where, f"dict without 'bytes' or 'path' keys ({sorted(image)})")
    if isinstance(image, str):
        if image.startswith("data:"):
            try:
                image = base64.b64decode(image.split(",", 1)[1], validate=True)
            except Exception as e:  # binascii.Error, IndexError
                raise _image_error(where, f"invalid base64 data URL ({e})") from None
        elif image.startswith(("http://", "https://")):
            from transformers.image_utils import load_image

            image = load_image(image)
        elif os.path.isfile(image):
            with open(image, "rb") as f:
                image = f.read()
        else:
            raise _image_error(where, f"no such image file: {image!r}")
    if isinstance(image, (bytes, bytearray, memoryview)):
        try:
            image = Image.open(io.BytesIO(bytes(image)))
            image.load()
        except UnidentifiedImageError:
            raise _image_error(where, "bytes are not a readable image (unknown or corrupt format)") from None
        except (OSError, SyntaxError) as e:
            raise _image_error(where, f"bytes are not a readable image ({e})") from None
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        if image.ndim not in (2, 3) or 0 in image.shape:
            raise _image_error(where, f"array of shape {tuple(image.shape)} is not a non-empty HW/HWC/CHW image")
        if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4):
            image = image.transpose(1, 2, 0)  # CHW -> HWC
        if image.dtype != np.uint8:
            image = (np.clip(image.astype(np.float32), 0.0, 1.0) * 255).round().astype(np.uint8)
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise _image_error(
            where,
            f"got a {type(image).__name__}, which is not an image (expected a PIL.Image, numpy array, torch tensor, "
            "bytes, a path or a data URL)",
        )
    return image


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
        """How many placeholder tokens each image takes (what vLLM's Transformers backend asks): the framed run of
        `num_image_tokens` placeholders plus its start/end tokens, whatever the image size (images are resized)."""
        data = {}
        if image_sizes is not None:
            per_image = len(image_placeholder_run(self.image_token_id, self.num_image_tokens,
                                                  self.vision_start_token_id, self.vision_end_token_id))
            data.update(num_image_tokens=[per_image] * len(image_sizes), num_image_patches=[1] * len(image_sizes))
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

    def __call__(self, images=None, text=None, videos=None, audio=None, **kwargs) -> BatchFeature:
        """Tokenizes `text` (str or list of str) and processes `images`.

        Args:
            images: one image, a flat list (assigned to the `<image>` markers in order), or one list per text.
            text: a string or a list of strings with `<image>` markers.
            padding (`bool` or `str`): `True`/`"longest"`, `"max_length"` or `False`.
            padding_side (`str`): `"left"` or `"right"` (defaults to the tokenizer's).
            truncation, max_length: truncation never cuts an image's placeholder run (`ValueError` instead).
            return_tensors (`str`): `"pt"`, `"np"` or `None` (lists).
            add_special_tokens, return_offsets_mapping, return_mm_token_type_ids, pad_to_multiple_of: as for
                tokenizers.
        """
        for name, value in (("videos", videos), ("audio", audio)):
            if value is not None and not (isinstance(value, (list, tuple)) and len(value) == 0):
                raise ValueError(f"GhostVis handles images and text only (got {name})")
        kwargs = _flatten_kwargs(kwargs)
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
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("text must be a string or a list of strings")
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
