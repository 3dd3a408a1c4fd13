"""OpenAI chat-completions request/response shapes and OpenAI-style errors.

Requests are validated strictly, as JSON, at the edge: types as JSON spells them (`"max_tokens": true` is not 1),
ranges as OpenAI documents them, integers within int64, no NaN or infinity, so the engine only sees values it can
hold. Unknown request fields are ignored (clients send `user`, `metadata`, … freely), but fields this server cannot
honour with a non-default value (`tools`, `response_format` other than text, `logprobs`, penalties, …) are refused
with a 400 rather than silently ignored.
"""

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_MAX_MESSAGE_CHARS = 2000  # error messages echo client input (a model name, a tag): never all of it


def _printable(text: str) -> str:
    """`text` cut to a readable length, with lone surrogates replaced (they cannot be encoded as UTF-8 JSON)."""
    if len(text) > _MAX_MESSAGE_CHARS:
        text = text[:_MAX_MESSAGE_CHARS] + "…"
    return text.encode("utf-8", "replace").decode("utf-8")


class APIError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        message, param = _printable(message), None if param is None else _printable(param)
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL | str


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]


def _int(low: int, high: int = INT64_MAX):
    return Field(default=None, ge=low, le=high)


class ChatCompletionRequest(_Strict):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = _int(1)
    max_completion_tokens: int | None = _int(1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = _int(-1)  # extension, as vLLM has it: -1 (or 0) keeps every token
    repetition_penalty: float | None = Field(default=None, gt=0, le=100)  # extension
    n: int | None = _int(1, 16)
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: int | None = _int(INT64_MIN)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    logprobs: bool | None = False
    top_logprobs: int | None = _int(0, 20)
    logit_bias: dict[str, Annotated[int, Field(ge=-100, le=100)]] | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: Literal["none", "auto"] | dict[str, Any] | None = None
    modalities: list[Literal["text", "audio"]] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None

    def unsupported(self) -> APIError | None:
        """A 400 for the first option this server cannot honour (rather than ignoring it), else `None`."""
        honoured = {  # field -> is the value one this server gives (or nothing was asked)
            "frequency_penalty": not self.frequency_penalty,
            "presence_penalty": not self.presence_penalty,
            "logprobs": not self.logprobs,
            "top_logprobs": not self.top_logprobs,
            "logit_bias": not self.logit_bias,
            "response_format": self.response_format is None or self.response_format.type == "text",
            "tools": not self.tools,
            "tool_choice": self.tool_choice in (None, "none"),
            "functions": not self.functions,
            "function_call": self.function_call in (None, "none"),
            "modalities": self.modalities in (None, ["text"]),
            "audio": self.audio is None,
            "prediction": self.prediction is None,
            "web_search_options": self.web_search_options is None,
        }
        hints = {"frequency_penalty": "; use repetition_penalty instead", "presence_penalty":
                 "; use repetition_penalty instead", "response_format": ' (only {"type": "text"})'}
        for name, ok in honoured.items():
            if not ok:
                return APIError(400, f"{name} is not supported by this server{hints.get(name, '')}", param=name,
                                code="unsupported_parameter")
        return None


def validation_error(errors: list[dict]) -> APIError:
    """Turns pydantic validation errors (of `model_validate_json`) into one OpenAI-style 400."""
    first = errors[0] if errors else {}
    kind = first.get("type")
    loc = [str(x) for x in first.get("loc", ()) if x not in ("body",)]
    param = ".".join(loc) or None
    if kind == "json_invalid":  # malformed, nested past the parser's depth limit, lone surrogates
        return APIError(400, f"We could not parse the JSON body of your request: {first.get('msg')}",
                        code="invalid_json")
    if kind in ("model_type", "model_attributes_type") and not loc:
        return APIError(400, "the request body must be a JSON object", code="invalid_json")
    if kind == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param=param,
                        code="missing_required_parameter")
    return APIError(400, f"Invalid value for '{param}': {first.get('msg', 'invalid request')}.", param=param,
                    code="invalid_value")


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
