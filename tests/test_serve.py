"""`ghostvis serve`: the official `openai` client against a real uvicorn server on 127.0.0.1, bad requests, API key."""

import base64
import io
import json
import threading

import httpx
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from ghostvis_hf.inference import GenerationEngine, SamplingParams, load_model  # noqa: E402
from ghostvis_hf.serve.server import BackgroundServer, create_app  # noqa: E402

MODEL = "ghostvis-tiny"
MAX_IMAGE_BYTES = 64 * 1024


def png_bytes(color=(255, 0, 0), size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def user(text, url=None):
    parts = [{"type": "image_url", "image_url": {"url": url}}] if url else []
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def served(tiny_checkpoint, tmp_path_factory):
    model, processor = load_model(tiny_checkpoint, device="cpu")
    engine = GenerationEngine(model, processor)
    images = tmp_path_factory.mktemp("allowed")
    (images / "red.png").write_bytes(png_bytes())
    kwargs = dict(allowed_image_dir=str(images), max_image_bytes=MAX_IMAGE_BYTES, max_tokens_limit=64)
    open_server = BackgroundServer(create_app(engine, MODEL, **kwargs))
    keyed_server = BackgroundServer(create_app(engine, MODEL, api_key="sekret", **kwargs))
    yield {"url": open_server.url, "keyed_url": keyed_server.url, "engine": engine, "images": images}
    open_server.stop()
    keyed_server.stop()
    engine.close()


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served["url"] + "/v1", api_key="unused", max_retries=0)


def test_models_and_health(served, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(served["url"] + "/health").json()["status"] == "ok"
    assert httpx.get(served["url"] + f"/v1/models/{MODEL}").status_code == 200
    assert httpx.get(served["url"] + "/v1/models/other").status_code == 404


def test_non_stream_and_stream_with_image(served, client):
    messages = user("What color?", data_url(png_bytes()))
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    engine_messages = [{"role": "user", "content": [{"type": "image", "image": png_bytes()},
                                                     {"type": "text", "text": "What color?"}]}]
    params = SamplingParams(temperature=0, max_new_tokens=12)
    expected = served["engine"].generate(messages=engine_messages, params=params)
    assert choice.message.content == expected[0].text
    assert reply.usage.prompt_tokens > 16 and reply.usage.completion_tokens == len(expected[0].token_ids)

    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_n_samples_and_seed(client):
    kwargs = dict(model=MODEL, messages=user("Hi"), max_tokens=8, temperature=1.0, n=2, seed=5)
    first, again = client.chat.completions.create(**kwargs), client.chat.completions.create(**kwargs)
    assert len(first.choices) == 2
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]


def test_local_path_under_allowed_dir(served, client):
    path = served["images"] / "red.png"
    for url in (str(path), f"file://{path}"):
        reply = client.chat.completions.create(model=MODEL, messages=user("Color?", url), max_tokens=4)
        assert reply.choices[0].message.content is not None


def noise_png(side=256) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def body(**overrides) -> bytes:
    return json.dumps({"model": MODEL, "messages": user("hi"), "max_tokens": 4, **overrides}).encode()


BAD_REQUESTS = {
    "malformed_json": (b'{"model": "ghostvis-tiny", "messages": [', 400, "invalid_json"),
    "not_an_object": (b"[1, 2]", 400, "invalid_json"),
    "missing_messages": (json.dumps({"model": MODEL}).encode(), 400, "missing_required_parameter"),
    "empty_messages": (body(messages=[]), 400, "invalid_value"),
    "bad_role": (body(messages=[{"role": "robot", "content": "hi"}]), 400, "invalid_value"),
    "unknown_model": (body(model="gpt-17"), 404, "model_not_found"),
    "bad_base64": (body(messages=user("hi", "data:image/png;base64,@@@not-base64@@@")), 400, "invalid_base64"),
    "not_an_image": (body(messages=user("hi", data_url(b"just some text, no pixels"))), 400, "invalid_image"),
    "image_too_large": (body(messages=user("hi", data_url(noise_png()))), 413, "image_too_large"),
    "prompt_too_long": (body(messages=user("hi " * 700)), 400, "context_length_exceeded"),
    "max_tokens_over_context": (body(messages=user("hi " * 470), max_tokens=60), 400, "context_length_exceeded"),
    "max_tokens_over_limit": (body(max_tokens=10_000), 400, "invalid_value"),
    "remote_url": (body(messages=user("hi", "https://example.com/cat.png")), 400, "remote_image_url_not_supported"),
    "path_outside_dir": (body(messages=user("hi", "/etc/hostname")), 403, "image_path_not_allowed"),
    "path_escape": (body(messages=user("hi", "file:///tmp/../etc/hostname")), 403, "image_path_not_allowed"),
    "bad_temperature": (body(temperature="hot"), 400, "invalid_value"),
    "unsupported_penalty": (body(frequency_penalty=0.5), 400, "unsupported_parameter"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_request_gets_openai_error_and_server_keeps_serving(served, name):
    payload, status, code = BAD_REQUESTS[name]
    r = httpx.post(served["url"] + "/v1/chat/completions", content=payload,
                   headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["code"] == code
    assert httpx.get(served["url"] + "/health").status_code == 200


def test_openai_client_sees_errors(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=user("hi", "https://example.com/x.png"))
    assert "data URL" in info.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=user("hi"))


def test_api_key(served):
    url = served["keyed_url"]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
        r = httpx.post(url + "/v1/chat/completions", content=body(), headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(url + "/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    good = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0)
    assert good.chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=3).choices
    assert httpx.get(url + "/health").status_code == 200  # health checks need no key


def test_concurrent_requests(served, client):
    prompts = [f"Question number {i}" + "?" * i for i in range(8)]
    images = [data_url(png_bytes((20 * i, 100, 0))) if i % 2 else None for i in range(8)]
    ask = lambda i, stream=False: client.chat.completions.create(  # noqa: E731
        model=MODEL, messages=user(prompts[i], images[i]), max_tokens=6 + i, temperature=0, stream=stream)
    expected = [ask(i).choices[0].message.content for i in range(8)]
    results, errors = [None] * 8, []

    def worker(i):
        try:
            if i % 2:
                results[i] = "".join(c.choices[0].delta.content or "" for c in ask(i, stream=True) if c.choices)
            else:
                results[i] = ask(i).choices[0].message.content
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and results == expected


def test_client_disconnect_frees_slots(served):
    engine = served["engine"]
    with httpx.stream("POST", served["url"] + "/v1/chat/completions", timeout=30,
                      content=body(stream=True, max_tokens=60, messages=user("long answer please"))) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # one event, then hang up
    for _ in range(200):
        if not any(engine._slots):
            break
        threading.Event().wait(0.02)
    assert not any(engine._slots)
    assert httpx.get(served["url"] + "/health").status_code == 200


def test_web_page_is_self_contained(served):
    html = httpx.get(served["url"] + "/").text
    assert "/v1/chat/completions" in html and "<script" in html
    assert "http://" not in html and "https://" not in html  # no CDN, nothing external


def test_one_tokenization_per_request(served, client, monkeypatch):
    """Without max_tokens the server sizes the answer from the prompt's length; the engine reuses those ids."""
    engine, calls = served["engine"], []
    tokenizer = engine.intake.tokenizer

    def counting_tokenizer(*args, **kwargs):
        calls.append(args)
        return tokenizer(*args, **kwargs)

    monkeypatch.setattr(engine.intake, "tokenizer", counting_tokenizer)
    reply = client.chat.completions.create(model=MODEL, messages=user("What color?", data_url(png_bytes())),
                                           temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert len(calls) == 1
