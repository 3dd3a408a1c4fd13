"""GenerationEngine: greedy == `generate`, sampling, stop strings, streaming, vision cache, concurrency, chat CLI."""

import os
import re
import subprocess
import sys
import threading

import pytest
import torch
from PIL import Image
from conftest import varied_tiny

from ghostvis_hf.inference import ContextLengthError, GenerationEngine, SamplingParams, load_model
from ghostvis_hf.inference.detokenizer import IncrementalDetokenizer, TokenTable
from ghostvis_hf.inference.sampling import filter_top_k_top_p, hash_uniform

GREEDY = SamplingParams(temperature=0, max_new_tokens=24)


def chat(text, image=True):
    return f"<|im_start|>user\n{'<image>' if image else ''}{text}<|im_end|>\n<|im_start|>assistant\n"


def image(color):
    return Image.new("RGB", (40, 30), color)


@pytest.fixture(scope="module")
def tiny_model():
    return varied_tiny()


@pytest.fixture(scope="module")
def engine(tiny_model):
    eng = GenerationEngine(*tiny_model)
    yield eng
    eng.close()


def reference(model, processor, prompts, images, **kwargs):
    """Stock `model.generate` continuations (left-padded batch), as lists of new token ids."""
    batch = processor(text=prompts, images=images, padding=True, padding_side="left", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, do_sample=False, max_new_tokens=GREEDY.max_new_tokens, **kwargs)
    return out[:, batch["input_ids"].shape[1] :].tolist()


def trim(ref, eos):
    return ref[: ref.index(eos) + 1] if eos in ref else ref


def test_prompt_ids_match_processor(engine, tiny_model):
    _, processor = tiny_model
    prompt = chat("What color?")
    assert engine.encode_prompt(prompt) == processor(text=prompt, images=[image("red")])["input_ids"][0]


@pytest.mark.parametrize("with_image", [True, False])
def test_greedy_equals_generate_batch1(engine, tiny_model, with_image):
    model, processor = tiny_model
    prompt, images = chat("What color is this?", with_image), [image("red")] if with_image else None
    expected = reference(model, processor, [prompt], [images] if images else None)[0]
    result = engine.generate(prompt=prompt, images=images, params=GREEDY)[0]
    assert result.token_ids == trim(expected, processor.tokenizer.eos_token_id)
    assert result.finish_reason in ("length", "stop")


def test_greedy_equals_generate_mixed_batch(engine, tiny_model):
    model, processor = tiny_model
    prompts = [chat("Describe it."), chat("A much longer question about the picture, with more words?", False),
               chat("Two?"), chat("Plain text only", False)]
    images = [[image("red")], [], [image("blue")], []]
    expected = reference(model, processor, prompts, images)
    results = engine.generate_batch([dict(prompt=p, images=i) for p, i in zip(prompts, images)], GREEDY)
    for res, exp in zip(results, expected):
        assert res[0].token_ids == trim(exp, processor.tokenizer.eos_token_id)


def test_graph_code_paths_match_generate(tiny_model):
    """`cuda_graphs=True` on the CPU runs the bucketed decode, right-padded single prefill and static vision input
    without capture: the same code the GPU captures must still give `generate`'s tokens."""
    model, processor = tiny_model
    eng = GenerationEngine(model, processor, cuda_graphs=True, batch_buckets=[1, 2, 4], seq_buckets=[128])
    try:
        prompts = [chat("Describe it."), chat("A much longer question about the picture, with more words?", False)]
        images = [[image("red")], []]
        expected = reference(model, processor, prompts, images)
        eos = processor.tokenizer.eos_token_id
        assert eng.generate(prompt=prompts[0], images=images[0], params=GREEDY)[0].token_ids == trim(expected[0], eos)
        results = eng.generate_batch([dict(prompt=p, images=i) for p, i in zip(prompts, images)], GREEDY)
        assert [r[0].token_ids for r in results] == [trim(e, eos) for e in expected]
    finally:
        eng.close()


def test_repetition_penalty_matches_generate(engine, tiny_model):
    model, processor = tiny_model
    prompt = chat("Say something.", False)
    expected = reference(model, processor, [prompt], None, repetition_penalty=1.5)[0]
    params = SamplingParams(temperature=0, max_new_tokens=GREEDY.max_new_tokens, repetition_penalty=1.5)
    result = engine.generate(prompt=prompt, params=params)[0]
    assert result.token_ids == trim(expected, processor.tokenizer.eos_token_id)


def test_messages_render_like_processor(engine):
    messages = [{"role": "user", "content": [{"type": "image", "image": image("red")}, {"type": "text", "text": "Hi"}]}]
    via_messages = engine.generate(messages=messages, params=GREEDY)[0]
    via_prompt = engine.generate(prompt=chat("Hi"), images=[image("red")], params=GREEDY)[0]
    assert via_messages.token_ids == via_prompt.token_ids


def test_n_samples_share_prefill_and_seed_is_reproducible(engine):
    params = SamplingParams(temperature=1.0, top_p=0.95, top_k=50, max_new_tokens=16, n=3, seed=1234)
    prefills = engine.stats["prefills"]
    first = engine.generate(prompt=chat("Tell me."), images=[image("green")], params=params)
    assert engine.stats["prefills"] == prefills + 1  # three samples, one prefill
    again = engine.generate(prompt=chat("Tell me."), images=[image("green")], params=params)
    assert [r.token_ids for r in first] == [r.token_ids for r in again]
    assert len({tuple(r.token_ids) for r in first}) > 1  # the samples differ from each other
    other = engine.generate(prompt=chat("Tell me."), images=[image("green")],
                            params=SamplingParams(temperature=1.0, max_new_tokens=16, n=3, seed=99))
    assert [r.token_ids for r in other] != [r.token_ids for r in first]


def test_top_k_1_is_greedy(engine):
    greedy = engine.generate(prompt=chat("x", False), params=GREEDY)[0]
    top1 = engine.generate(prompt=chat("x", False), params=SamplingParams(temperature=0.8, top_k=1, max_new_tokens=24))
    assert top1[0].token_ids == greedy.token_ids


def test_stop_string(engine):
    full = engine.generate(prompt=chat("Stop test", False), params=GREEDY)[0].text
    pairs = [full[i : i + 2] for i in range(3, len(full) - 2)]
    stop = next(p for p in pairs if p.strip() and "\ufffd" not in p)
    cut = full.index(stop)
    params = SamplingParams(temperature=0, max_new_tokens=GREEDY.max_new_tokens, stop=[stop])
    result = engine.generate(prompt=chat("Stop test", False), params=params)[0]
    assert result.text == full[:cut]
    assert result.finish_reason == "stop"
    deltas = list(engine.stream(prompt=chat("Stop test", False), params=params))
    assert "".join(deltas) == full[:cut]  # the held-back prefix of the stop string is never streamed


def test_stream_deltas_concatenate_to_text(engine, tiny_model):
    _, processor = tiny_model
    params = SamplingParams(temperature=0.9, max_new_tokens=40, seed=3)
    deltas = list(engine.stream(prompt=chat("Stream"), images=[image("red")], params=params))
    result = engine.generate(prompt=chat("Stream"), images=[image("red")], params=params)[0]
    assert "".join(deltas) == result.text
    assert result.text == processor.tokenizer.decode(result.token_ids, skip_special_tokens=True)


@pytest.mark.parametrize("byte_table", [True, False])
def test_detokenizer_multibyte_and_stop(tiny_model, byte_table):
    _, processor = tiny_model
    table = TokenTable(processor.tokenizer)
    if not byte_table:
        table.table = None  # the generic (re-decode) path for non-byte-level tokenizers
    text = "héllo wörld 你好 🎉 ok"
    ids = processor.tokenizer(text)["input_ids"]
    detok = IncrementalDetokenizer(table)
    deltas = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)  # no character was split across deltas
    detok = IncrementalDetokenizer(table, stop=["wör"])
    out = "".join(detok.push(i) for i in ids)
    assert out == "héllo " and detok.stopped


def test_vision_cache_hit_skips_encoder(tiny_model):
    model, processor = tiny_model
    eng = GenerationEngine(model, processor, vision_cache_size=4)
    calls = []
    original = model.model.get_image_features
    model.model.get_image_features = lambda pv, **kw: calls.append(pv.shape[0]) or original(pv, **kw)
    try:
        first = eng.generate(prompt=chat("A"), images=[image((1, 2, 3))], params=GREEDY)[0]
        again = eng.generate(prompt=chat("A"), images=[image((1, 2, 3))], params=GREEDY)[0]
        assert calls == [1] and eng.vision_cache.hits == 1
        assert again.token_ids == first.token_ids
        eng.generate(prompt=chat("A"), images=[image((9, 9, 9))], params=GREEDY)
        assert calls == [1, 1]
    finally:
        del model.model.get_image_features
        eng.close()


def test_concurrent_requests_join_running_batch(tiny_model):
    model, processor = tiny_model
    eng = GenerationEngine(model, processor, max_batch_size=4)  # 8 requests, 4 slots: some wait, some join mid-way
    prompts = [chat(f"Question {i}?" + " more" * i, image=i % 2 == 0) for i in range(8)]
    images = [[image((30 * i, 0, 0))] if i % 2 == 0 else None for i in range(8)]
    lengths = [4 + 5 * i for i in range(8)]
    expected = [eng.generate(prompt=p, images=im, params=SamplingParams(temperature=0, max_new_tokens=n))[0].token_ids
                for p, im, n in zip(prompts, images, lengths)]
    steps_alone = eng.stats["steps"]
    results, barrier = [None] * 8, threading.Barrier(8)

    def worker(i):
        barrier.wait()
        params = SamplingParams(temperature=0, max_new_tokens=lengths[i])
        results[i] = eng.generate(prompt=prompts[i], images=images[i], params=params)[0].token_ids

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    eng.close()
    assert results == expected
    assert eng.stats["steps"] - steps_alone < steps_alone  # they were decoded together, not one after another


def test_errors_are_raised_at_submit(engine):
    with pytest.raises(ContextLengthError):
        engine.submit(prompt=chat("hi " * 600, False))
    with pytest.raises(ContextLengthError):
        engine.submit(prompt=chat("hi", False), params=SamplingParams(max_new_tokens=10_000))
    with pytest.raises(ValueError, match="not a readable image"):
        engine.submit(prompt=chat("hi"), images=[b"not an image"])
    with pytest.raises(ValueError, match="image markers"):
        engine.submit(prompt=chat("hi"), images=[])
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    assert engine.generate(prompt=chat("still fine", False), params=GREEDY)[0].token_ids


def test_sampling_helpers():
    seeds, steps = torch.tensor([1, 1, 2]), torch.tensor([0, 1, 0])
    u = hash_uniform(seeds, steps, 1000)
    assert torch.equal(u, hash_uniform(seeds, steps, 1000)) and ((u > 0) & (u < 1)).all()
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    assert abs(u.mean().item() - 0.5) < 0.03
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0], [4.0, 3.0, 2.0, 1.0]])
    kept = filter_top_k_top_p(logits, torch.tensor([2, 0]), torch.tensor([1.0, 0.5])).isfinite()
    assert kept.tolist() == [[True, True, False, False], [True, False, False, False]]


def test_bitsandbytes_quantize_needs_cuda(tiny_checkpoint):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU error")
    for choice in ("bnb-int8", "bnb-nf4"):
        with pytest.raises(RuntimeError, match=f"--quantize {choice} needs a CUDA GPU.*--quantize int8"):
            load_model(tiny_checkpoint, quantize=choice, device="cpu")


def test_a_missing_checkpoint_folder_is_named_not_mistaken_for_a_hub_id(tmp_path, monkeypatch, capsys):
    from ghostvis_hf.cli import main as ghostvis
    from ghostvis_hf.inference.loader import check_checkpoint_path

    monkeypatch.chdir(tmp_path)
    for path in (str(tmp_path / "nope"), "./nope", "../nope", "runs/a/final"):
        with pytest.raises(FileNotFoundError, match=f"no checkpoint folder at '{re.escape(path)}'"):
            load_model(path, device="cpu")
    (tmp_path / "runs" / "a").mkdir(parents=True)
    for path in ("namespace/name", "runs/a", str(tmp_path)):  # a Hub id, or a folder that exists: passed on
        check_checkpoint_path(path)
    for argv in (["chat", "--model", "./nope", "--prompt", "hi"], ["serve", "--model", "./nope"],
                 ["eval", "--model", "./nope", "--task", "shapes"],
                 ["compose", "--text", "./nope", "--vision", "v", "--out", "o"]):
        with pytest.raises(SystemExit) as exit_:  # refused by the parser, before anything loads
            ghostvis(argv)
        assert exit_.value.code == 2 and "no such folder: './nope'" in capsys.readouterr().err


def test_chat_one_shot(tiny_checkpoint, tmp_path):
    path = tmp_path / "img.png"
    image("blue").save(path)
    exe = os.path.join(os.path.dirname(sys.executable), "ghostvis")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "ghostvis_hf.cli"]
    out = subprocess.run(cmd + ["chat", "--model", tiny_checkpoint, "--prompt", "What color?", "--image", str(path),
                                "--max-new-tokens", "8", "--temperature", "0", "--device", "cpu"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    model, processor = load_model(tiny_checkpoint, device="cpu")
    eng = GenerationEngine(model, processor)
    parts = [{"type": "image", "image": str(path)}, {"type": "text", "text": "What color?"}]
    messages = [{"role": "user", "content": parts}]
    expected = eng.generate(messages=messages, params=SamplingParams(temperature=0, max_new_tokens=8))[0]
    eng.close()
    assert len(expected.token_ids) == 8
    assert out.stdout == expected.text + "\n"
