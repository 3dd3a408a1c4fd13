"""Image URLs of a chat request → image bytes, with every limit checked before any pixel is decoded.

Checked in this order, cheapest first: the number of images in the request, the size of the (base64) payload or
file, then the image's header (format and width x height, read by `PIL.Image.open`, which decodes no pixels). Only
then does the engine decode the image, so a 0.4 MB PNG that claims 12000 x 12000 pixels costs a header read, not
2.5 GB. Every refusal is an `APIError` naming the limit.
"""

import base64
import binascii
import io
import os

from PIL import Image, UnidentifiedImageError

from .schemas import APIError, ChatCompletionRequest, ImagePart, TextPart

# NOTE: Pillow reads ~40 formats, some rarely exercised (and some with a history of decoder bugs); clients send these.
IMAGE_FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP", "TIFF")
Image.init()  # registers every plugin: `Image.open(formats=...)` knows only the registered ones
IMAGE_FORMATS = tuple(f for f in IMAGE_FORMATS if f in Image.OPEN)  # WEBP needs libwebp


def _decode_base64(url: str, max_bytes: int, param: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or ";base64" not in header.lower():
        raise APIError(400, "image data URLs must look like data:image/png;base64,<base64 data>", param=param,
                       code="invalid_image_url")
    # RFC 2045 base64 comes in lines of 76 characters; many clients send it that way.
    for space in ("\r", "\n", " ", "\t"):
        payload = payload.replace(space, "")
    if len(payload) * 3 // 4 > max_bytes:  # refuse before decoding a huge payload
        raise APIError(413, f"image is larger than the server's limit of {max_bytes} bytes (--max-image-bytes)",
                       param=param, code="image_too_large")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(400, f"invalid base64 in image data URL ({e})", param=param, code="invalid_base64") from None
    if len(data) > max_bytes:
        raise APIError(413, f"image is {len(data)} bytes, over the server's limit of {max_bytes} bytes "
                       "(--max-image-bytes)", param=param, code="image_too_large")
    return data


def _read_file(path: str, allowed_dir: str | None, max_bytes: int, param: str) -> bytes:
    if allowed_dir is None:
        raise APIError(403, "local image paths are disabled on this server (start it with --allowed-image-dir to "
                       "allow a folder); send the image as a data URL", param=param, code="image_path_not_allowed")
    if "\x00" in path:  # os.path raises ValueError on it
        raise APIError(400, "image path contains a NUL character", param=param, code="invalid_image_url")
    try:
        real, folder = os.path.realpath(path), os.path.realpath(allowed_dir)
        if os.path.commonpath([real, folder]) != folder:
            raise APIError(403, "image path is outside the server's allowed image folder", param=param,
                           code="image_path_not_allowed")
        if not os.path.isfile(real):
            raise APIError(400, "image file not found in the allowed image folder", param=param,
                           code="image_not_found")
        with open(real, "rb") as f:
            data = f.read(max_bytes + 1)
    except (OSError, ValueError) as e:  # too long a name, a folder we may not read, ...
        raise APIError(400, f"image file could not be read ({type(e).__name__})", param=param,
                       code="image_not_found") from None
    if len(data) > max_bytes:
        raise APIError(413, f"image file is over the server's limit of {max_bytes} bytes (--max-image-bytes)",
                       param=param, code="image_too_large")
    return data


def load_image_url(url: str, allowed_dir: str | None, max_bytes: int, param: str) -> bytes:
    """The raw bytes behind an `image_url`: a `data:` URL, or a local file under `allowed_dir`.

    Raises:
        `APIError`: 400 for remote or malformed URLs and bad base64, 403 for paths outside `allowed_dir` (or when
            no folder is allowed), 413 for images over `max_bytes`.
    """
    if url.startswith("data:"):
        return _decode_base64(url, max_bytes, param)
    if url.startswith(("http://", "https://")):
        raise APIError(400, "remote image URLs are not fetched by this server (no outbound requests); send the image "
                       "inline as a data URL: data:image/png;base64,<base64 data>", param=param,
                       code="remote_image_url_not_supported")
    if "://" in url and not url.startswith("file://"):
        raise APIError(400, f"unsupported image URL scheme in {url[:40]!r}; use a data: URL", param=param,
                       code="invalid_image_url")
    path = url[len("file://") :] if url.startswith("file://") else url
    return _read_file(path, allowed_dir, max_bytes, param)


def check_image_header(data: bytes, max_pixels: int, param: str) -> None:
    """Refuses an image by its header alone: an unknown format (400) or more than `max_pixels` pixels (413)."""
    limit = f"the server's limit of {max_pixels} pixels (--max-image-pixels)"
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:  # reads the header, decodes nothing
            width, height = image.size
    except Image.DecompressionBombError:  # Pillow's own limit, which is above ours
        raise APIError(413, f"image has too many pixels: over {limit}", param=param, code="image_too_large") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
        raise APIError(400, f"the data is not an image in a supported format ({', '.join(IMAGE_FORMATS)}): "
                       f"{type(e).__name__}", param=param, code="invalid_image") from None
    if width * height > max_pixels:
        raise APIError(413, f"image is {width}x{height} = {width * height} pixels, over {limit}", param=param,
                       code="image_too_large")
    if width == 0 or height == 0:
        raise APIError(400, f"image has zero size ({width}x{height})", param=param, code="invalid_image")


def count_images(request: ChatCompletionRequest) -> int:
    return sum(isinstance(p, ImagePart) for m in request.messages if isinstance(m.content, list) for p in m.content)


def text_chars(request: ChatCompletionRequest) -> int:
    """Characters of text in the messages (a lower bound on the rendered prompt's)."""
    total = 0
    for m in request.messages:
        if isinstance(m.content, str):
            total += len(m.content)
        elif m.content:
            total += sum(len(p.text) for p in m.content if isinstance(p, TextPart))
    return total


def to_engine_messages(request: ChatCompletionRequest, allowed_dir: str | None, max_bytes: int,
                       max_pixels: int) -> list[dict]:
    """OpenAI messages → the engine's chat format (`{"type": "image", "image": bytes}` parts), images checked."""
    out = []
    for i, message in enumerate(request.messages):
        role = "system" if message.role == "developer" else message.role
        if message.content is None or isinstance(message.content, str):
            out.append({"role": role, "content": message.content or ""})
            continue
        parts = []
        for j, part in enumerate(message.content):
            if isinstance(part, TextPart):
                parts.append({"type": "text", "text": part.text})
            else:
                url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
                param = f"messages.{i}.content.{j}.image_url"
                data = load_image_url(url, allowed_dir, max_bytes, param=param)
                check_image_header(data, max_pixels, param)
                parts.append({"type": "image", "image": data})
        out.append({"role": role, "content": parts})
    return out
