"""Fuzz the chat endpoint of a live tiny server (127.0.0.1 only): no 5xx, every error OpenAI-style, and good streams
running alongside finish normally.

The invalid requests are generated from the request's own JSON schema (`ChatCompletionRequest.model_json_schema()`:
every field of every model, each given the JSON types it does not accept, values just past its bounds, strings outside
its enums, arrays past their item limits, missing required fields), plus seeded families the schema cannot describe:
bad images, bad image URLs, malformed JSON, oversize bodies and unicode junk. A seeded `random.Random`, no hypothesis
(it is not a test dependency); the run is bounded (a few hundred requests, ~10-20 s on 2 CPU cores).
"""

import base64
import copy
import io
import json
import random
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from ghostvis_hf.inference import GenerationEngine, load_model  # noqa: E402
from ghostvis_hf.serve.schemas import ChatCompletionRequest  # noqa: E402
from ghostvis_hf.serve.server import BackgroundServer, create_app  # noqa: E402
from conftest import png_bytes, png_header_only  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = "ghostvis-tiny"
SEED = 14
LIMITS = dict(max_image_bytes=64 * 1024, max_image_pixels=1_000_000, max_images=2, max_request_bytes=512 * 1024,
              max_tokens_limit=32)
SAMPLES = {"null": None, "boolean": True, "integer": 7, "number": 2.5, "string": "x", "array": [1], "object": {"a": 1}}


SMALL = (24, 16)  # image size of the requests here


def data_url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def base_request() -> dict:
    """A valid request with every model of the schema present, to mutate one field at a time."""
    content = [{"type": "image_url", "image_url": {"url": data_url(png_bytes(SMALL))}}, {"type": "text", "text": "hi"}]
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 2}


# Where each model of the schema sits in `base_request()`.
MODEL_PATHS = {"ChatCompletionRequest": (), "ChatMessage": ("messages", 0), "ImagePart": ("messages", 0, "content", 0),
               "TextPart": ("messages", 0, "content", 1), "ImageURL": ("messages", 0, "content", 0, "image_url"),
               "StreamOptions": ("stream_options",), "ResponseFormat": ("response_format",)}


def _json_types(node: dict, defs: dict) -> set[str]:
    if "$ref" in node:
        return {"object"}
    options = node.get("anyOf") or node.get("oneOf")
    if options:
        return set().union(*(_json_types(o, defs) for o in options))
    kind = node.get("type")
    if kind is None:
        return set(SAMPLES)
    return {"number", "integer"} if kind == "number" else {kind}


def _bounds(option: dict) -> list:
    kind, out = option.get("type"), []
    step = 1 if kind == "integer" else 0.001
    if "minimum" in option:
        out += [("below minimum", option["minimum"] - step), ("far below", -(2**64) if step == 1 else -1e308)]
    if "maximum" in option:
        out += [("above maximum", option["maximum"] + step), ("far above", 2**64 if step == 1 else 1e308)]
    for key in ("exclusiveMinimum", "exclusiveMaximum"):
        if key in option:
            out.append((f"at {key}", option[key]))
    return out


def bad_values(node: dict, defs: dict) -> list[tuple[str, object]]:
    """(label, value) pairs that `node`'s schema refuses: wrong JSON types, out of bounds, outside enums, bad items."""
    accepted = _json_types(node, defs)
    out = [(f"type {t}", v) for t, v in SAMPLES.items() if t not in accepted]
    for option in node.get("anyOf") or node.get("oneOf") or [node]:
        if "$ref" in option:
            continue  # the referenced model's fields are mutated at its own path
        out += _bounds(option)
        allowed = option.get("enum") or ([option["const"]] if "const" in option else [])
        if allowed:
            out += [("outside enum", "not-" + allowed[0]), ("enum upper-cased", allowed[0].upper())]
        if option.get("type") == "array":
            items = option.get("items", {})
            if "maxItems" in option:
                out.append(("too many items", ["s"] * (option["maxItems"] + 1)))
            if option.get("minItems", 0) > 0:
                out.append(("too few items", []))
            out += [(f"item {label}", [value]) for label, value in bad_values(items, defs)]
        extra = option.get("additionalProperties")
        if option.get("type") == "object" and isinstance(extra, dict) and extra:
            out += [(f"value {label}", {"k": value}) for label, value in bad_values(extra, defs)]
    return out


def _set(request: dict, path: tuple, value, delete: bool = False) -> dict:
    request = copy.deepcopy(request)
    node = request
    for key in path[:-1]:
        node = node.setdefault(key, {}) if isinstance(key, str) else node[key]
    if delete:
        node.pop(path[-1], None)
    else:
        node[path[-1]] = value
    return request


def schema_cases() -> dict[str, bytes]:
    schema = ChatCompletionRequest.model_json_schema()
    defs = {**schema.pop("$defs"), "ChatCompletionRequest": schema}
    base, cases = base_request(), {}
    for name, model in defs.items():
        path = MODEL_PATHS[name]
        for field, node in model["properties"].items():
            for label, value in bad_values(node, defs):
                cases[f"{name}.{field}: {label}"] = json.dumps(_set(base, path + (field,), value)).encode()
        for field in model.get("required", []):
            if path or field != "model":  # (a missing model is covered at the top level too)
                cases[f"{name}.{field}: missing"] = json.dumps(_set(base, path + (field,), None, delete=True)).encode()
    return cases


def _with_image(url: str) -> bytes:
    return json.dumps(_set(base_request(), ("messages", 0, "content", 0, "image_url", "url"), url)).encode()


def image_cases(rng: random.Random, allowed_dir: str) -> dict[str, bytes]:
    good = png_bytes(SMALL)
    corrupt = bytearray(png_bytes((64, 64)))
    corrupt[60:80] = rng.randbytes(20)
    blobs = {"random bytes": rng.randbytes(300), "truncated png": good[:40], "corrupt idat": bytes(corrupt),
             "text": b"just text", "empty": b"", "bomb header": png_header_only(20000, 20000),
             "wide header": png_header_only(1_000_001, 1), "zero width": png_header_only(0, 10),
             "svg": b"<svg xmlns='http://www.w3.org/2000/svg'/>", "pdf": b"%PDF-1.4\n%\xe2\xe3\n",
             "gif header only": b"GIF89a\xff\xff\xff\xff\x00\x00\x00", "png signature only": good[:8]}
    cases = {f"image: {k}": _with_image(data_url(v)) for k, v in blobs.items()}
    urls = {"bad base64": "data:image/png;base64,@@@", "no base64 flag": "data:image/png," + "A" * 8,
            "no comma": "data:image/png;base64", "bad padding": "data:image/png;base64,iVBORw0KGgo=A",
            "too large": data_url(rng.randbytes(70 * 1024)), "http": "http://127.0.0.1:1/x.png",
            "https": "https://example.com/x.png", "ftp": "ftp://example.com/x.png", "outside dir": "/etc/hostname",
            "escape": f"file://{allowed_dir}/../../etc/passwd", "nul": f"file://{allowed_dir}/a\x00b.png",
            "missing file": f"file://{allowed_dir}/missing.png", "long path": f"{allowed_dir}/" + "a" * 5000,
            "dir itself": allowed_dir, "empty url": "", "javascript": "javascript:alert(1)"}
    cases.update({f"image url: {k}": _with_image(v) for k, v in urls.items()})
    three = [{"type": "image_url", "image_url": {"url": data_url(png_bytes(SMALL, (i, 9, 9)))}} for i in range(3)]
    cases["image: over max_images"] = json.dumps(_set(base_request(), ("messages", 0, "content"), three)).encode()
    return cases


JUNK = ["\x00", "\x1b[31m", "\u200b", "\u202e", "\ufeff", "\ufffe", "\uffff", "\ue000", "\U0001f600", "e\u0301" * 50,
        "<|im_end|>", "<|im_start|>system\n", "<image>", "<|image_pad|>", "<|vision_start|>", "\r\n", "\\", "\"",
        "{{ raise('x') }}", "{% for x in range(10**9) %}", "%s%n", "\U0010ffff"]


def junk(rng: random.Random, n: int = 6) -> str:
    return "".join(rng.choice(JUNK) for _ in range(n))


def text_cases(rng: random.Random) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """(invalid, hostile): invalid ones must get a 4xx; hostile ones are valid JSON the server may answer."""
    invalid, hostile = {}, {}
    for i in range(12):
        text = junk(rng)
        text_path = ("messages", 0, "content", 1, "text")
        hostile[f"junk text {i}"] = json.dumps(_set(base_request(), text_path, text)).encode()
        hostile[f"junk stop {i}"] = json.dumps({**base_request(), "stop": [text]}).encode()
        invalid[f"junk model {i}"] = json.dumps({**base_request(), "model": text}).encode()
        invalid[f"junk role {i}"] = json.dumps(_set(base_request(), ("messages", 0, "role"), text)).encode()
        surrogate = "\\ud%03x" % rng.randrange(0x800, 0xfff)  # lone, as a JSON escape
        raw = json.dumps({**base_request(), "messages": [{"role": "user", "content": "a@b"}]})
        invalid[f"lone surrogate {i}"] = raw.replace("@", surrogate).encode()
    long_text = "x" * 20_000  # past the tiny model's character bound: refused before tokenizing
    invalid["text past the prompt bound"] = json.dumps({**base_request(), "messages": [
        {"role": "user", "content": long_text}]}).encode()
    invalid["tokens past the context"] = json.dumps({**base_request(), "messages": [
        {"role": "user", "content": "hi " * 2000}]}).encode()
    invalid["body past the limit"] = json.dumps({**base_request(), "pad": "y" * (600 * 1024)}).encode()
    invalid["n past the batch"] = json.dumps({**base_request(), "n": 9}).encode()
    invalid["max_tokens past the limit"] = json.dumps({**base_request(), "max_tokens": 33}).encode()
    for name in ("tools", "response_format", "logit_bias", "audio", "prediction", "web_search_options"):
        value = {"response_format": {"type": "json_object"}, "tools": [{"type": "function"}]}.get(name, {"a": 1})
        invalid[f"unsupported {name}"] = json.dumps({**base_request(), name: value}).encode()
    return invalid, hostile


def json_cases() -> dict[str, bytes]:
    good = json.dumps(base_request())
    bodies = [b"", b"{", b"}", b"null", b"[]", b'"text"', b"123", b"true", b"{}", good[:-1].encode(),
              (good + "}").encode(), (good[:-1] + ",}").encode(), good.replace('"', "'").encode(),
              b"\xef\xbb\xbf" + good.encode(), good.replace('"hi"', '"\xff\xfe"').encode("latin-1"),
              b"[" * 100_000 + b"]" * 100_000, (good[:-1] + ', "x": ' + "[" * 5000 + "]" * 5000 + "}").encode(),
              b'{"model": "ghostvis-tiny", "messages": [' + b"[" * 300 + b"]" * 300 + b"]}",
              good.replace("2}", "NaN}").encode(), good.replace("2}", "1e999}").encode(),
              good.replace("2}", "-0}").encode(), good.replace("2}", "2.0}").encode(),
              good.replace("2}", "0x10}").encode(), (good + "\x00").encode(), good.replace(":", ": /* c */").encode(),
              b'{"model": "ghostvis-tiny", "messages": ' + json.dumps([{"role": "user"}] * 3 + [7]).encode() + b"}"]
    return {f"json {i}": body for i, body in enumerate(bodies)}


def check_error(r: httpx.Response, name: str) -> None:
    assert r.status_code < 500, (name, r.status_code, r.text[:300])
    if r.status_code >= 400:
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, (name, error)
        assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str), name
        assert all(error[k] is None or isinstance(error[k], str) for k in ("param", "code")), (name, error)


@pytest.fixture(scope="module")
def served(tiny_checkpoint, tmp_path_factory):
    model, processor = load_model(tiny_checkpoint, device="cpu")
    engine = GenerationEngine(model, processor)
    images = tmp_path_factory.mktemp("allowed")
    (images / "ok.png").write_bytes(png_bytes(SMALL))
    server = BackgroundServer(create_app(engine, MODEL, allowed_image_dir=str(images), **LIMITS))
    yield {"url": server.url, "engine": engine, "images": str(images)}
    server.stop()
    engine.close()


def good_streams(url: str, stop: threading.Event, outcomes: list) -> None:
    """Streams answers one after another until `stop`; records each stream's finish reasons and error events."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "tell me a story"}], "max_tokens": 32,
            "temperature": 0, "stream": True}
    with httpx.Client(timeout=60) as client:
        while not stop.is_set() or not outcomes:
            reasons, errors, done = [], [], False
            with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
                for line in r.iter_lines():
                    done |= line == "data: [DONE]"
                    if line.startswith("data: {"):
                        event = json.loads(line[6:])
                        errors += [event["error"]] if "error" in event else []
                        reasons += [c["finish_reason"] for c in event.get("choices", []) if c["finish_reason"]]
            outcomes.append((r.status_code, reasons, errors, done))


def test_fuzz_request_schema(served):
    rng = random.Random(SEED)
    url = served["url"]
    invalid = {**schema_cases(), **image_cases(rng, served["images"]), **json_cases()}
    more_invalid, hostile = text_cases(rng)
    invalid.update(more_invalid)
    assert len(set(invalid.values())) >= 150, len(set(invalid.values()))
    with httpx.Client(timeout=60) as client:
        assert client.post(url + "/v1/chat/completions", json=base_request()).status_code == 200

    stop, outcomes = threading.Event(), []
    streamer = threading.Thread(target=good_streams, args=(url, stop, outcomes))
    streamer.start()
    statuses = {}
    client = httpx.Client(timeout=60)  # shared by the senders (its pool is thread-safe)

    def send(item):
        name, body = item
        r = client.post(url + "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
        check_error(r, name)
        statuses[name] = r.status_code

    try:
        cases = list(invalid.items()) + list(hostile.items())
        rng.shuffle(cases)
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(send, cases))
        for method, path in [("GET", "/v1/chat/completions"), ("PUT", "/v1/chat/completions"),
                             ("POST", "/v1/completions"), ("GET", "/v1/models/nope"), ("DELETE", "/v1/models")]:
            check_error(client.request(method, url + path), f"{method} {path}")  # the same shape off the route
    finally:
        client.close()
        stop.set()
        streamer.join(timeout=120)
    not_refused = sorted(name for name in invalid if statuses[name] < 400)
    assert not not_refused, not_refused
    assert outcomes and all(s == 200 and not e and done and r in (["stop"], ["length"]) for s, r, e, done in outcomes)
    with httpx.Client(timeout=60) as client:
        assert client.get(url + "/health").json()["status"] == "ok"
