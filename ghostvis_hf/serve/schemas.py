"""OpenAI chat-completions request/response shapes, OpenAI-style errors, and image-URL resolution.

Only what a vision chat server needs is modelled; unknown request fields are ignored (clients send `user`,
`logprobs: false`, … freely), but fields this server cannot honour with a non-default value are refused with a 400
rather than silently ignored.
"""

import base64
import binascii
import os
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class APIError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL | str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart | ImagePart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)  # extension (vLLM also accepts it)
    repetition_penalty: float | None = Field(default=None, gt=0)  # extension
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = 0.0
    presence_penalty: float | None = 0.0
    logprobs: bool | None = False

    def unsupported(self) -> APIError | None:
        """A 400 for options this server cannot honour (rather than ignoring them)."""
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                return APIError(400, f"{name} is not supported by this server; use repetition_penalty instead",
                                param=name, code="unsupported_parameter")
        if self.logprobs:
            return APIError(400, "logprobs are not supported by this server", param="logprobs",
                            code="unsupported_parameter")
        return None


def validation_error(errors: list[dict]) -> APIError:
    """Turns pydantic/FastAPI validation errors into one OpenAI-style 400."""
    first = errors[0] if errors else {}
    loc = [str(x) for x in first.get("loc", ()) if x not in ("body",)]
    param = ".".join(loc) or None
    if first.get("type") == "missing":
        message = f"Missing required parameter: '{param}'."
    else:
        message = f"Invalid value for '{param}': {first.get('msg', 'invalid request')}."
    return APIError(400, message, param=param, code="missing_required_parameter" if first.get("type") == "missing"
                    else "invalid_value")


def _within(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def load_image_url(url: str, allowed_dir: str | None, max_bytes: int, param: str) -> bytes:
    """The raw bytes behind an `image_url`: a `data:` URL, or a local file under `allowed_dir`.

    Raises:
        `APIError`: 400 for remote or malformed URLs and bad base64, 403 for paths outside `allowed_dir` (or when
            no folder is allowed), 413 for images over `max_bytes`.
    """
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or ";base64" not in header:
            raise APIError(400, "image data URLs must look like data:image/png;base64,<base64 data>", param=param,
                           code="invalid_image_url")
        if len(payload) * 3 // 4 > max_bytes:  # refuse before decoding a huge payload
            raise APIError(413, f"image is larger than the server's limit of {max_bytes} bytes", param=param,
                           code="image_too_large")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise APIError(400, f"invalid base64 in image data URL ({e})", param=param, code="invalid_base64") from None
        if len(data) > max_bytes:
            raise APIError(413, f"image is {len(data)} bytes, over the server's limit of {max_bytes} bytes",
                           param=param, code="image_too_large")
        return data
    if url.startswith(("http://", "https://")):
        raise APIError(400, "remote image URLs are not fetched by this server (no outbound requests); send the image "
                       "inline as a data URL: data:image/png;base64,<base64 data>", param=param,
                       code="remote_image_url_not_supported")
    if "://" in url and not url.startswith("file://"):
        raise APIError(400, f"unsupported image URL scheme in {url[:40]!r}; use a data: URL", param=param,
                       code="invalid_image_url")
    path = url[len("file://") :] if url.startswith("file://") else url
    if allowed_dir is None:
        raise APIError(403, "local image paths are disabled on this server (start it with --allowed-image-dir to "
                       "allow a folder); send the image as a data URL", param=param, code="image_path_not_allowed")
    if not _within(path, allowed_dir):
        raise APIError(403, "image path is outside the server's allowed image folder", param=param,
                       code="image_path_not_allowed")
    if not os.path.isfile(path):
        raise APIError(400, "image file not found in the allowed image folder", param=param, code="image_not_found")
    if os.path.getsize(path) > max_bytes:
        raise APIError(413, f"image file is over the server's limit of {max_bytes} bytes", param=param,
                       code="image_too_large")
    with open(path, "rb") as f:
        return f.read()


def to_engine_messages(request: ChatCompletionRequest, allowed_dir: str | None, max_bytes: int) -> list[dict]:
    """OpenAI messages → the processor's chat format (`{"type": "image", "image": bytes}` parts)."""
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
                data = load_image_url(url, allowed_dir, max_bytes, param=f"messages.{i}.content.{j}.image_url")
                parts.append({"type": "image", "image": data})
        out.append({"role": role, "content": parts})
    return out


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def chunk(cid: str, model: str, created: int, index: int, delta: dict, finish_reason: str | None = None) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(cid: str, model: str, results: list, prompt_tokens: int) -> dict:
    choices = [{"index": r.index, "message": {"role": "assistant", "content": r.text}, "logprobs": None,
                "finish_reason": r.finish_reason} for r in results]
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model, "choices": choices,
            "usage": usage(prompt_tokens, sum(len(r.token_ids) for r in results))}
