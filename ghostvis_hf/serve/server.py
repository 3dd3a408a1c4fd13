"""`ghostvis serve --model PATH`: an OpenAI-compatible chat server (FastAPI + uvicorn) and a web page at `/`.

    ghostvis serve --model ./ghostvis-tiny --port 8000 [--api-key KEY] [--allowed-image-dir ./images]

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")
    client.chat.completions.create(model="ghostvis-tiny", messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
        {"type": "text", "text": "What is in the image?"}]}])

Every request goes to one shared `GenerationEngine`, which batches concurrent requests continuously. Every bad
request is answered with a 4xx and an OpenAI-style `{"error": {...}}` body; nothing a client sends stops the server.
The handlers are plain functions on an `APIRouter`: they find the engine and the `ServerSettings` on
`request.app.state`, so several apps (say, one with an API key and one without) can share the routes and one engine.
"""

import argparse
import asyncio
import json
import os
import time
from dataclasses import dataclass

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .schemas import (
    APIError, ChatCompletionRequest, chunk, completion, completion_id, to_engine_messages, usage, validation_error,
)

STATIC = os.path.join(os.path.dirname(__file__), "static")
DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024


@dataclass
class ServerSettings:
    """What the handlers need besides the engine; `create_app` puts both on `app.state`."""

    model_name: str
    api_key: str | None
    allowed_image_dir: str | None
    max_image_bytes: int
    max_tokens_limit: int
    max_request_bytes: int
    created: int  # the `created` time `/v1/models` reports


# ------------------------------------------------------------------ errors


def _error_response(error: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


async def _api_error(request, exc: APIError):
    return _error_response(exc)


async def _validation(request, exc: RequestValidationError):
    return _error_response(validation_error(exc.errors()))


async def _http(request, exc: StarletteHTTPException):
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return _error_response(APIError(exc.status_code, str(exc.detail), code=code))


async def _unexpected(request, exc: Exception):
    return _error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error"))


EXCEPTION_HANDLERS = {APIError: _api_error, RequestValidationError: _validation,
                      StarletteHTTPException: _http, Exception: _unexpected}


# ------------------------------------------------------------------ request helpers


async def check_auth(request: Request) -> None:
    """Every `/v1` route depends on this: with an API key set, `Authorization: Bearer <key>` is required."""
    api_key = request.app.state.settings.api_key
    if api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or token.strip() != api_key:
        raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                       code="invalid_api_key")


async def read_json(request: Request) -> dict:
    """The request's JSON object body, refused with 413 past the size limit (also for chunked uploads)."""
    limit = request.app.state.settings.max_request_bytes
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise APIError(413, f"request body is over the server's limit of {limit} bytes", code="request_too_large")
    body = bytearray()
    async for piece in request.stream():  # a chunked upload has no Content-Length: count as we go
        body += piece
        if len(body) > limit:
            raise APIError(413, f"request body is over the server's limit of {limit} bytes",
                           code="request_too_large")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"We could not parse the JSON body of your request ({e})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    return data


async def _chat_request(request: Request, settings: ServerSettings) -> tuple[ChatCompletionRequest, int | None]:
    """The validated request and its `max_tokens` (None when the client asked for none)."""
    try:
        req = ChatCompletionRequest.model_validate(await read_json(request))
    except ValidationError as e:
        raise validation_error(e.errors()) from None
    if req.model != settings.model_name:
        raise APIError(404, f"The model '{req.model}' does not exist; this server serves '{settings.model_name}'",
                       param="model", code="model_not_found")
    if (err := req.unsupported()) is not None:
        raise err
    max_tokens = req.max_completion_tokens or req.max_tokens
    if max_tokens is not None and max_tokens > settings.max_tokens_limit:
        raise APIError(400, f"max_tokens={max_tokens} is over this server's limit of {settings.max_tokens_limit}",
                       param="max_tokens", code="invalid_value")
    return req, max_tokens


# ------------------------------------------------------------------ routes

router = APIRouter()
v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_auth)])


@router.get("/health")
async def health(request: Request):
    return {"status": "ok", "model": request.app.state.settings.model_name}


@router.get("/")
async def index():
    return FileResponse(os.path.join(STATIC, "index.html"), media_type="text/html")


@v1.get("/models")
async def models(request: Request):
    settings = request.app.state.settings
    return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": settings.created,
                                        "owned_by": "ghostvis"}]}


@v1.get("/models/{name:path}")
async def model_info(name: str, request: Request):
    settings = request.app.state.settings
    if name != settings.model_name:
        raise APIError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")
    return {"id": settings.model_name, "object": "model", "created": settings.created, "owned_by": "ghostvis"}


@v1.post("/chat/completions")
async def chat_completions(request: Request):
    settings, engine = request.app.state.settings, request.app.state.engine
    req, max_tokens = await _chat_request(request, settings)
    handle = await asyncio.to_thread(_submit, engine, req, max_tokens, settings)
    cid = completion_id()
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_sse(handle, cid, settings.model_name, include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:  # NOTE: a non-streaming client that disconnects is noticed only when its answer is done
        async for _ in handle.events_async():
            pass
    finally:  # cancelled by the server shutting down
        if not handle.done:
            handle.cancel()
    results = handle.results
    if any(r.finish_reason == "error" for r in results):
        raise APIError(500, next(r.error for r in results if r.error) or "generation failed", type="server_error")
    return completion(cid, settings.model_name, results, handle.prompt_tokens)


router.include_router(v1)


def create_app(engine, model_name: str, api_key: str | None = None, allowed_image_dir: str | None = None,
               max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES, max_tokens_limit: int | None = None,
               max_request_bytes: int | None = None) -> FastAPI:
    """Builds the FastAPI app around a running `GenerationEngine`.

    Args:
        engine (`GenerationEngine`): shared by all requests.
        model_name (`str`): the id clients must send as `model` (and that `/v1/models` lists).
        api_key (`str`, *optional*): when set, `/v1/*` requires `Authorization: Bearer <api_key>`.
        allowed_image_dir (`str`, *optional*): folder whose files may be named by path or `file://` URL;
            without it only `data:` URLs are accepted.
        max_image_bytes (`int`, *optional*, defaults to 20 MiB): larger images are refused with 413.
        max_tokens_limit (`int`, *optional*): most `max_tokens` a request may ask for (and the default when it asks
            for none); defaults to the engine's context.
        max_request_bytes (`int`, *optional*): larger request bodies are refused with 413; defaults to
            8 images' worth of base64 plus 1 MiB of text.
    """
    app = FastAPI(title="GhostVis", version="0.1.0", exception_handlers=EXCEPTION_HANDLERS)
    app.state.engine = engine
    app.state.settings = ServerSettings(
        model_name=model_name, api_key=api_key, allowed_image_dir=allowed_image_dir, max_image_bytes=max_image_bytes,
        max_tokens_limit=max_tokens_limit or engine.max_seq_len,
        max_request_bytes=max_request_bytes or 8 * (max_image_bytes * 4 // 3 + 4) + (1 << 20),
        created=int(time.time()),
    )
    app.include_router(router)
    return app


def _sampling_params(req: ChatCompletionRequest, max_tokens: int | None):
    from ghostvis_hf.inference import SamplingParams

    try:
        return SamplingParams(
            max_new_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            repetition_penalty=req.repetition_penalty or 1.0,
            stop=req.stop or [],
            seed=req.seed,
            n=req.n,
        )
    except ValueError as e:
        raise APIError(400, str(e), code="invalid_value") from None


def _submit(engine, req: ChatCompletionRequest, max_tokens: int | None, settings: ServerSettings):
    """Validates images and sampling options, tokenizes once and queues the request (in a worker thread)."""
    from ghostvis_hf.inference import ContextLengthError

    messages = to_engine_messages(req, settings.allowed_image_dir, settings.max_image_bytes)
    params = _sampling_params(req, max_tokens)
    try:
        prompt, images = engine.render_messages(messages)
        prompt_ids = engine.encode_prompt(prompt)  # the engine takes these ids: the prompt is tokenized once
        if max_tokens is None:  # as much as fits, up to the server's limit
            room = engine.max_seq_len - len(prompt_ids)
            params.max_new_tokens = max(1, min(settings.max_tokens_limit, room))
        return engine.submit(prompt_ids=prompt_ids, images=images, params=params)
    except ContextLengthError as e:
        raise APIError(400, f"This model's maximum context length is {engine.max_seq_len} tokens: {e}",
                       param="messages", code="context_length_exceeded") from None
    except ValueError as e:  # bad image bytes, image/marker mismatch, too many samples
        raise APIError(400, str(e), param="messages", code="invalid_request") from None


async def _sse(handle, cid: str, model: str, include_usage: bool):
    """Server-sent events: a role chunk per choice, content deltas, finish chunks, optional usage, `[DONE]`."""
    created = int(time.time())

    def line(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    try:
        for i in range(handle.n):
            yield line(chunk(cid, model, created, i, {"role": "assistant", "content": ""}))
        async for event in handle.events_async():
            if event.finish_reason == "error":
                error = APIError(500, handle.results[event.index].error or "generation failed", type="server_error")
                yield line(error.body())
                continue
            if event.text:
                yield line(chunk(cid, model, created, event.index, {"content": event.text}))
            if event.finish_reason is not None:
                reason = "stop" if event.finish_reason == "cancelled" else event.finish_reason
                yield line(chunk(cid, model, created, event.index, {}, reason))
        if include_usage:
            tokens = sum(len(r.token_ids) for r in handle.results if r is not None)
            yield line({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [], "usage": usage(handle.prompt_tokens, tokens)})
        yield "data: [DONE]\n\n"
    finally:  # the client went away (or we are done): free the slots
        if not handle.done:
            handle.cancel()


class BackgroundServer:
    """A uvicorn server for `app` in a daemon thread (tests, notebooks); `url` is its base URL, `stop()` ends it.

    Args:
        app: the ASGI app (e.g. from `create_app`).
        host (`str`, *optional*, defaults to `"127.0.0.1"`)
        port (`int`, *optional*, defaults to 0): 0 picks a free port.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import socket
        import threading

        import uvicorn

        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))  # bound here, so the port is known before uvicorn starts
        self.url = f"http://{host}:{self._socket.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self._socket.close()


def build_parser() -> argparse.ArgumentParser:
    from ghostvis_hf.inference.loader import QUANTIZE_CHOICES

    p = argparse.ArgumentParser(prog="ghostvis serve", description="OpenAI-compatible GhostVis server + web page.")
    p.add_argument("--model", required=True, help="checkpoint folder or Hub id")
    p.add_argument("--served-model-name", help="model id clients send (default: the folder's name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("GHOSTVIS_API_KEY"), help="require this Bearer token")
    p.add_argument("--allowed-image-dir", help="folder whose images may be named by path / file:// URL")
    p.add_argument("--max-image-bytes", type=int, default=DEFAULT_MAX_IMAGE_BYTES)
    p.add_argument("--max-tokens-limit", type=int, help="most tokens one request may generate")
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, help="bitsandbytes quantization (CUDA only)")
    p.add_argument("--device", help="cuda, cpu, … (default: cuda when available)")
    p.add_argument("--dtype", help="bfloat16, float16 or float32")
    p.add_argument("--max-batch-size", type=int, help="sequences decoded together")
    p.add_argument("--max-seq-len", type=int, help="context per sequence")
    p.add_argument("--compile", action="store_true", help="decode with the torch.compiled transformers forward instead of the fused Triton step (CUDA)")
    p.add_argument("--log-level", default="info")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import uvicorn

    from ghostvis_hf.inference import GenerationEngine, load_model

    if args.allowed_image_dir and not os.path.isdir(args.allowed_image_dir):
        print(f"ghostvis serve: --allowed-image-dir {args.allowed_image_dir!r} is not a folder")
        return 2
    try:
        model, processor = load_model(args.model, quantize=args.quantize, dtype=args.dtype, device=args.device)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"ghostvis serve: {e}")
        return 2
    from ghostvis_hf.inference.loader import memory_footprint

    quant = f", {args.quantize}" if args.quantize else ""
    print(f"loaded {args.model}: {memory_footprint(model)} of weights on {model.device}{quant}")
    engine = GenerationEngine(model, processor, max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len,
                              compile=args.compile)
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    app = create_app(engine, name, api_key=args.api_key, allowed_image_dir=args.allowed_image_dir,
                     max_image_bytes=args.max_image_bytes, max_tokens_limit=args.max_tokens_limit)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.close()
    return 0
