"""The server's limits, and the checks that apply them before any work: body size, JSON, images, prompt length.

A request is refused as early as it can be: the body while it is read (past `max_request_bytes`, chunked uploads
included), the JSON while it is parsed (pydantic's parser stops at 200 levels of nesting and refuses lone
surrogates), then the count of images and the length of the text (before any image is decoded or any text
tokenized). What is left to find out only by tokenizing (the exact prompt length) is checked after.
"""

from dataclasses import dataclass

from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from .images import count_images, text_chars
from .schemas import APIError, ChatCompletionRequest, validation_error

DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024
# NOTE: 25 Mpx is a 48 Mpx phone photo halved, ~75 MB of RGB once decoded; Pillow's own bomb limit (89 Mpx) would
# let one request take gigabytes.
DEFAULT_MAX_IMAGE_PIXELS = 25_000_000
DEFAULT_MAX_IMAGES = 8


@dataclass
class ServerSettings:
    """What the handlers need besides the engine; `create_app` puts both on `app.state`."""

    model_name: str
    api_key: str | None
    allowed_image_dir: str | None
    max_image_bytes: int
    max_image_pixels: int
    max_images: int
    max_tokens_limit: int
    max_request_bytes: int
    created: int  # the `created` time `/v1/models` reports


def _too_large(limit: int) -> APIError:
    return APIError(413, f"request body is over the server's limit of {limit} bytes (--max-request-bytes)",
                    code="request_too_large")


async def read_body(request, limit: int) -> bytes:
    """The request's body, refused with 413 past `limit` bytes (also for chunked uploads, which have no length)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise _too_large(limit)
    body = bytearray()
    try:
        async for piece in request.stream():
            body += piece
            if len(body) > limit:
                raise _too_large(limit)
    except ClientDisconnect:  # nobody reads the answer; answered as a 4xx, not logged as a server error
        raise APIError(400, "the client disconnected while sending the request", code="client_disconnected") from None
    return bytes(body)


def parse_chat_request(body: bytes) -> ChatCompletionRequest:
    """The validated request (strict JSON types and ranges), or an `APIError` 400 saying what is wrong."""
    try:
        return ChatCompletionRequest.model_validate_json(body)
    except ValidationError as e:
        raise validation_error(e.errors(include_input=False)) from None


def check_request_limits(req: ChatCompletionRequest, settings: ServerSettings, max_prompt_chars: int) -> None:
    """The limits that need neither an image decoded nor a token: the number of images and the text's length."""
    images = count_images(req)
    if images > settings.max_images:
        raise APIError(400, f"the request has {images} images, over the server's limit of {settings.max_images} "
                       "images per request (--max-images)", param="messages", code="too_many_images")
    chars = text_chars(req)
    if chars > max_prompt_chars:
        raise APIError(400, f"the messages hold {chars} characters of text, more than this model's context can hold "
                       f"(at most {max_prompt_chars} characters)", param="messages", code="context_length_exceeded")
