"""`ghostvis serve --model PATH`: an OpenAI-compatible chat server (FastAPI + uvicorn) and a web page at `/`.

    ghostvis serve --model ./ghostvis-tiny --port 8000 [--api-key KEY] [--allowed-image-dir ./images]
                   [--max-image-pixels 25000000] [--max-images 8] [--max-request-bytes N]

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")
    client.chat.completions.create(model="ghostvis-tiny", messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
        {"type": "text", "text": "What is in the image?"}]}])

Every request goes to one shared `GenerationEngine`, which batches concurrent requests continuously. Every bad
request is answered with a 4xx and an OpenAI-style `{"error": {...}}` body, and refused before the work it would cost
(limits.py); nothing a client sends stops the server or another client's request. A client that hangs up, streaming
or not, has its request cancelled and its slots freed.
The handlers are plain functions on an `APIRouter`: they find the engine and the `ServerSettings` on
`request.app.state`, so several apps (say, one with an API key and one without) can share the routes and one engine.
"""

import argparse
import asyncio
import json
import os
import secrets
import time

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..arg_types import folder_or_hub_id, positive_int, tcp_port
from .images import to_engine_messages
from .limits import (
    DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_IMAGES, ServerSettings, check_request_limits,
    parse_chat_request, read_body,
)
from .schemas import APIError, ChatCompletionRequest, chunk, completion, completion_id, usage, validation_error

STATIC = os.path.join(os.path.dirname(__file__), "static")


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
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
        raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                       code="invalid_api_key")


async def _chat_request(request: Request, settings: ServerSettings) -> tuple[ChatCompletionRequest, int | None]:
    """The validated request and its `max_tokens` (None when the client asked for none)."""
    body = await read_body(request, settings.max_request_bytes)
    req = await asyncio.to_thread(parse_chat_request, body)  # a big body parses off the event loop
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


async def _cancel_on_disconnect(request: Request, handle) -> None:
    """Cancels `handle` when the client hangs up (the body is read: the next ASGI message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            handle.cancel()
            return
        await asyncio.sleep(0.1)  # a server that sends more (empty) body messages: do not spin


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
    watcher = asyncio.create_task(_cancel_on_disconnect(request, handle))  # an abandoned request frees its slots
    try:
        async for _ in handle.events_async():
            pass
    finally:  # also when cancelled by the server shutting down
        watcher.cancel()
        if not handle.done:
            handle.cancel()
    results = handle.results
    if any(r.finish_reason == "error" for r in results):
        raise APIError(500, next(r.error for r in results if r.error) or "generation failed", type="server_error")
    return completion(cid, settings.model_name, results, handle.prompt_tokens)


router.include_router(v1)


def create_app(engine, model_name: str, api_key: str | None = None, allowed_image_dir: str | None = None,
               max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES, max_tokens_limit: int | None = None,
               max_request_bytes: int | None = None, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
               max_images: int = DEFAULT_MAX_IMAGES) -> FastAPI:
    """Builds the FastAPI app around a running `GenerationEngine`.

    Args:
        engine (`GenerationEngine`): shared by all requests.
        model_name (`str`): the id clients must send as `model` (and that `/v1/models` lists).
        api_key (`str`, *optional*): when set, `/v1/*` requires `Authorization: Bearer <api_key>`, and the
            `/docs`, `/redoc` and `/openapi.json` pages are off. An empty key is refused (`ValueError`).
        allowed_image_dir (`str`, *optional*): folder whose files may be named by path or `file://` URL;
            without it only `data:` URLs are accepted.
        max_image_bytes (`int`, *optional*, defaults to 20 MiB): larger images are refused with 413.
        max_tokens_limit (`int`, *optional*): most `max_tokens` a request may ask for (and the default when it asks
            for none); defaults to the engine's context.
        max_request_bytes (`int`, *optional*): larger request bodies are refused with 413; defaults to
            `max_images` images' worth of base64 plus 1 MiB of text.
        max_image_pixels (`int`, *optional*, defaults to 25 million): images whose header says more pixels are
            refused with 413 before they are decoded.
        max_images (`int`, *optional*, defaults to 8): images one request may carry.
    """
    if api_key is not None and not api_key.strip():
        raise ValueError("api_key is empty: any 'Authorization: Bearer' header would match it; pass None for no key")
    docs = {"docs_url": None, "redoc_url": None, "openapi_url": None} if api_key is not None else {}
    app = FastAPI(title="GhostVis", version="0.1.0", exception_handlers=EXCEPTION_HANDLERS, **docs)
    app.state.engine = engine
    app.state.settings = ServerSettings(
        model_name=model_name, api_key=api_key, allowed_image_dir=allowed_image_dir, max_image_bytes=max_image_bytes,
        max_image_pixels=max_image_pixels, max_images=max_images,
        max_tokens_limit=max_tokens_limit or engine.max_seq_len,
        max_request_bytes=max_request_bytes or max_images * (max_image_bytes * 4 // 3 + 4) + (1 << 20),
        created=int(time.time()),
    )
    app.include_router(router)
    return app


def _sampling_params(req: ChatCompletionRequest, max_tokens: int | None):
    from ghostvis_hf.inference import SamplingParams

    top_p = 1.0 if req.top_p is None else req.top_p
    top_k = max(req.top_k or 0, 0)  # -1 is vLLM's "all tokens"
    if top_p == 0:  # the limit of a shrinking nucleus: the most likely token alone
        top_p, top_k = 1.0, 1
    try:
        return SamplingParams(
            max_new_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=req.repetition_penalty or 1.0,
            stop=req.stop or [],
            seed=req.seed,
            n=req.n or 1,
        )
    except ValueError as e:
        raise APIError(400, str(e), code="invalid_value") from None


def _submit(engine, req: ChatCompletionRequest, max_tokens: int | None, settings: ServerSettings):
    """Checks limits, images and sampling options, tokenizes once and queues the request (in a worker thread)."""
    from ghostvis_hf.inference import ContextLengthError

    check_request_limits(req, settings, engine.max_prompt_chars)  # before any image is decoded or text tokenized
    messages = to_engine_messages(req, settings.allowed_image_dir, settings.max_image_bytes, settings.max_image_pixels)
    params = _sampling_params(req, max_tokens)
    try:
        # Message text is tokenized as text: control tokens typed by a client stay characters.
        prompt_ids, images = engine.encode_messages(messages)  # the engine takes these ids: tokenized once
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

        # NOTE: proto=IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP,
        # and without it each response's body waits ~40 ms for the delayed ACK of its headers (Nagle).
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
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
    from ghostvis_hf.inference.loader import QUANTIZE_CHOICES, QUANTIZE_HELP

    p = argparse.ArgumentParser(prog="ghostvis serve", description="OpenAI-compatible GhostVis server + web page.")
    p.add_argument("--model", required=True, type=folder_or_hub_id, help="checkpoint folder or Hub id")
    p.add_argument("--served-model-name", help="model id clients send (default: the folder's name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=tcp_port, default=8000)
    p.add_argument("--api-key", default=os.environ.get("GHOSTVIS_API_KEY"),
                   help="require this Bearer token (also hides /docs); default: $GHOSTVIS_API_KEY")
    p.add_argument("--allowed-image-dir", help="folder whose images may be named by path / file:// URL")
    p.add_argument("--max-image-bytes", type=positive_int, default=DEFAULT_MAX_IMAGE_BYTES)
    p.add_argument("--max-image-pixels", type=positive_int, default=DEFAULT_MAX_IMAGE_PIXELS,
                   help="width x height an image may have (checked from its header, before decoding)")
    p.add_argument("--max-images", type=positive_int, default=DEFAULT_MAX_IMAGES, help="images per request")
    p.add_argument("--max-request-bytes", type=positive_int,
                   help="request body size (default: max-images images of max-image-bytes, plus 1 MiB)")
    p.add_argument("--max-tokens-limit", type=positive_int, help="most tokens one request may generate")
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, help=QUANTIZE_HELP)
    p.add_argument("--device", help="cuda, cpu, … (default: cuda when available)")
    p.add_argument("--dtype", help="bfloat16, float16 or float32")
    p.add_argument("--max-batch-size", type=positive_int, help="sequences decoded together")
    p.add_argument("--max-seq-len", type=positive_int, help="context per sequence")
    p.add_argument("--compile", action="store_true", help="decode with the torch.compiled transformers forward instead of the fused Triton step (CUDA)")
    p.add_argument("--log-level", default="info")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import uvicorn

    from ghostvis_hf.inference import GenerationEngine, load_model

    if args.api_key is not None and not args.api_key.strip():  # before minutes of loading
        print("ghostvis serve: the API key is empty (--api-key or $GHOSTVIS_API_KEY): an empty key would let any "
              "'Bearer' header in; give a real key, or leave both unset for no key")
        return 2
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
                     max_image_bytes=args.max_image_bytes, max_tokens_limit=args.max_tokens_limit,
                     max_request_bytes=args.max_request_bytes, max_image_pixels=args.max_image_pixels,
                     max_images=args.max_images)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.close()
    return 0
