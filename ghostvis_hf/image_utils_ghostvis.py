# Copyright 2026 The GhostVis-HF authors. Licensed under the Apache License, Version 2.0.
"""Image decoding for the GhostVis processor: anything image-like to an RGB `PIL.Image`, or a `ValueError` naming it.

Travels with every checkpoint next to `processing_ghostvis.py`, which imports it (`trust_remote_code` copies both);
self-contained on purpose.
"""

import base64
import io
import os

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError


def _image_error(where: str, problem: str) -> ValueError:
    return ValueError(f"{where}: {problem}")


def to_rgb_image(image, where: str = "image") -> Image.Image:
    """Turns one image-like object into an RGB `PIL.Image`, or raises a `ValueError` that says what is wrong.

    Accepts a `PIL.Image`, a numpy array or torch tensor (HW, HWC or CHW; 1, 3 or 4 channels), raw bytes, a
    `{"bytes": …}`/`{"path": …}` dict (the `datasets` layout), a local path (`str` or `os.PathLike`) or a `data:` base64
    URL. http(s) URLs are refused, never fetched: load the image yourself (`transformers.image_utils.load_image`).
    Arrays are read as transformers' `to_pil_image`/`is_scaled_image` read them: integer dtypes hold 0..255, floats
    [0, 1] (rescaled) or whole numbers in 0..255, bool is black/white, bf16 is read as float32; other dtypes, ranges,
    NaN/inf or channel counts are refused. `do_rescale`, `rescale_factor`, `do_normalize` then act on this 8-bit image,
    as on a PIL image in transformers. Grayscale, CMYK, 16-bit, float and palette images become RGB; transparency (an
    alpha channel, premultiplied too, or a `transparency` entry) is composited onto white; RGB is returned as it is.

    Example:
    ```python
    >>> import numpy as np
    >>> to_rgb_image(np.array([[[0, 128, 255]]], dtype=np.int64)).getpixel((0, 0))
    (0, 128, 255)
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
        if image.mode.startswith("I;16"):  # NOTE: PIL's convert clips at 255: a 16-bit PNG came out white
            image = Image.fromarray((np.asarray(image, dtype=np.float32) / 257).round().astype(np.uint8))
        elif image.mode in ("I", "F"):  # 32-bit int / float pixels: the array rules, not PIL's clipping
            image = _array_to_pil(np.asarray(image), where)
        elif image.mode == "La":  # premultiplied alpha, which PIL cannot turn into RGBA
            image = image.convert("LA")
        # NOTE: a plain .convert("RGB") shows transparent pixels in their stored colour (often black): it ruins charts
        # and logos. Same test as Pillow >= 10.1's `has_transparency_data`, spelled out for older Pillows.
        if image.mode in ("RGBA", "RGBa", "LA", "PA") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            background = Image.new("RGB", rgba.size, (255, 255, 255))
            background.paste(rgba, mask=rgba.getchannel("A"))
            return background
        return image.convert("RGB")
    except OSError as e:  # truncated files fail only when decoded
        raise _image_error(where, f"image data could not be decoded ({e})") from None


def _array_to_pil(array: np.ndarray, where: str) -> Image.Image:
    """An HW/HWC/CHW array as an 8-bit `PIL.Image` by `to_rgb_image`'s scale rules, or a `ValueError`."""
    if array.dtype.kind not in "buif":  # complex, object, str, bytes, datetime ...
        raise _image_error(where, f"array of dtype {array.dtype} is not an image (expected integers, floats or bool)")
    if array.ndim not in (2, 3) or 0 in array.shape:
        raise _image_error(where, f"array of shape {tuple(array.shape)} is not a non-empty HW/HWC/CHW image")
    if array.ndim == 3 and array.shape[-1] not in (1, 3, 4):
        if array.shape[0] not in (1, 3, 4):
            raise _image_error(where, f"array of shape {tuple(array.shape)} has no channel axis of 1, 3 or 4 "
                                      "(gray, RGB, RGBA) first or last")
        array = array.transpose(1, 2, 0)  # CHW -> HWC
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise _image_error(where, f"{array.dtype} array holds NaN or infinite values")
    if array.dtype.kind == "b":
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        lo, hi = array.min().item(), array.max().item()
        if array.dtype.kind == "f" and 0 <= lo and hi <= 1:
            array = array.astype(np.float32) * 255  # already rescaled (transformers' `is_scaled_image`)
        elif not (0 <= lo and hi <= 255 and (array.dtype.kind in "iu" or np.array_equal(array, np.round(array)))):
            raise _image_error(where, f"{array.dtype} array with values in [{lo}, {hi}] fits no pixel scale: pass "
                                      "uint8, whole numbers in [0, 255] or floats in [0, 1] (16-bit: a / 257 as uint8)")
        array = np.round(array).astype(np.uint8)
    return Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array)


def _as_pil_image(image, where: str) -> Image.Image:
    """Decodes what `to_rgb_image` accepts into a `PIL.Image` (any mode), or raises a `ValueError`."""
    if isinstance(image, dict):
        if image.get("bytes") is None and not image.get("path"):
            raise _image_error(where, f"dict without 'bytes' or 'path' keys ({sorted(image)})")
        image = image["bytes"] if image.get("bytes") is not None else image["path"]
    if isinstance(image, os.PathLike):
        image = os.fspath(image)
    if isinstance(image, str):
        if image.startswith("data:"):
            try:
                # RFC 2045 base64 comes in lines of 76 characters (as `ghostvis serve` accepts it too)
                image = base64.b64decode("".join(image.split(",", 1)[1].split()), validate=True)
            except Exception as e:  # binascii.Error, IndexError
                raise _image_error(where, f"invalid base64 data URL ({e})") from None
        elif image[:8].lower().startswith(("http://", "https://")):
            raise _image_error(where, f"{image[:100]!r} is a URL, and the processor never fetches from the network: "
                                      "load the image yourself (e.g. transformers.image_utils.load_image) and pass it")
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
        image = image.detach().cpu()  # bf16 (and the other floats numpy lacks) is read as float32
        image = (image.float() if image.is_floating_point() and image.element_size() < 4 else image).numpy()
    if isinstance(image, np.ndarray):
        image = _array_to_pil(image, where)
    if not isinstance(image, Image.Image):
        raise _image_error(where, f"got a {type(image).__name__}, which is not an image (expected a PIL.Image, numpy "
                                  "array, torch tensor, bytes, a path or a data URL)")
    return image


__all__ = ["to_rgb_image"]
