"""Model invariants on the tiny random preset: shapes, loss masking, image scatter, generation, configs."""

import pytest
import torch

from ghostvis_hf import GhostVisConfig, create
from ghostvis_hf.modeling_ghostvis import sincos_2d_positions
from conftest import make_image, user_turn


def _batch(processor, texts, images, **kw):
    kw.setdefault("padding_side", "right")  # the tests below compare positions from the left
    return processor(text=texts, images=images, padding=True, return_tensors="pt", **kw)


def test_forward_backward_and_image_labels_masked(tiny):
    model, processor = tiny
    model.train()
    text = processor.apply_chat_template([user_turn("What color?"), {"role": "assistant", "content": "red"}])
    batch = _batch(processor, [text], [make_image()])
    out = model(**batch, labels=batch["input_ids"].clone())
    assert out.logits.shape == (*batch["input_ids"].shape, model.config.text_config.vocab_size)
    out.loss.backward()
    # every part of the model is reached by the gradient
    for name in ("vision_tower", "resampler", "multi_modal_projector", "language_model"):
        grads = [p.grad for p in getattr(model.model, name).parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), name
    # labels at image placeholders (and their frame tokens) never count
    masked = model.mask_image_labels(batch["input_ids"], batch["input_ids"].clone())
    n_run = processor.num_image_tokens + 2
    assert int((masked == -100).sum()) == n_run


def test_multi_image_and_text_only_in_one_batch(tiny):
    model, processor = tiny
    texts = ["<image> and <image>: which is red?", "no image here", "<image> left"]
    images = [[make_image((255, 0, 0)), make_image((0, 0, 255))], [], [make_image((0, 255, 0))]]
    batch = _batch(processor, texts, images)
    assert batch["pixel_values"].shape[0] == 3
    with torch.no_grad():
        out = model(**batch)
    assert out.image_hidden_states.shape[:2] == (3, processor.num_image_tokens)
    # the text-only sample's logits don't depend on the other samples' images
    alone = _batch(processor, ["no image here"], None)
    with torch.no_grad():
        solo = model(**alone).logits[0]
    n = alone["input_ids"].shape[1]
    torch.testing.assert_close(out.logits[1, :n], solo, atol=1e-5, rtol=1e-4)


def test_images_fill_placeholders_in_order(tiny):
    model, processor = tiny
    red, blue = make_image((255, 0, 0)), make_image((0, 0, 255))
    a = _batch(processor, ["<image><image> x"], [[red, blue]])
    b = _batch(processor, ["<image><image> x"], [[blue, red]])
    with torch.no_grad():
        la, lb = model(**a).logits, model(**b).logits
    assert not torch.allclose(la[0, -1], lb[0, -1])


def test_placeholder_feature_mismatch_raises(tiny):
    model, processor = tiny
    batch = _batch(processor, ["<image> hi"], [make_image()])
    ids = batch["input_ids"].clone()
    ids[0, 2] = 100  # one placeholder becomes a text token
    with pytest.raises(ValueError, match=r"15 placeholder tokens .* but 16 image features"):
        model(input_ids=ids, pixel_values=batch["pixel_values"])


def test_placeholders_without_pixel_values_run_as_text(tiny):
    # LLaVA's rule: with no pixel_values the placeholders are ordinary token embeddings (assisted decoding runs the
    # assistant's prefill this way); the count check applies to real multimodal prefills only.
    model, processor = tiny
    batch = _batch(processor, ["<image> hi"], [make_image()])
    with torch.no_grad():
        text_only = model(input_ids=batch["input_ids"]).logits
        with_image = model(**batch).logits
    assert text_only.shape == with_image.shape
    assert not torch.allclose(text_only[0, -1], with_image[0, -1])


@pytest.mark.parametrize("cls_name", ["GhostVisModel", "GhostVisForConditionalGeneration"])
def test_return_dict_false_gives_tuples(tiny, cls_name):
    import ghostvis_hf.modeling_ghostvis as modeling

    model, processor = tiny
    if cls_name == "GhostVisModel":
        model = model.model
    batch = _batch(processor, ["<image> hi"], [make_image()])
    with torch.no_grad():
        as_dict = model(**batch)
        as_tuple = model(**batch, return_dict=False)
        model.config.return_dict = False
        from_config = model(**batch)
        model.config.return_dict = True
    assert isinstance(as_tuple, tuple) and isinstance(from_config, tuple)
    assert len(as_tuple) == len(as_dict.to_tuple())
    torch.testing.assert_close(as_tuple[0], as_dict.to_tuple()[0])
    assert getattr(modeling, cls_name) is type(model)


def _generation_inputs(processor, batched=True):
    texts = [processor.apply_chat_template([user_turn("What shape is it?")], add_generation_prompt=True)]
    images = [[make_image((0, 255, 0))]]
    if batched:
        texts.append(processor.apply_chat_template([user_turn("Hello, who are you and what do you see?")],
                                                   add_generation_prompt=True))
        images.append([make_image((0, 0, 255), size=(64, 64))])
    return processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")


@pytest.mark.parametrize("batched", [False, True])
def test_greedy_generation_cache_equals_no_cache(tiny, batched):
    model, processor = tiny
    batch = _generation_inputs(processor, batched)
    kw = dict(max_new_tokens=12, do_sample=False, min_new_tokens=12)
    cached = model.generate(**batch, **kw)
    uncached = model.generate(**batch, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    assert cached.shape[1] == batch["input_ids"].shape[1] + 12


@pytest.mark.parametrize("resampler,n", [("perceiver", 9), ("avgpool", 16), ("none", 64)])
def test_resamplers(resampler, n):
    model, processor = create("tiny", resampler_type=resampler, num_image_tokens=n)
    assert model.config.image_seq_length == processor.num_image_tokens == (64 if resampler == "none" else n)
    batch = _batch(processor, ["<image> hi"], [make_image()])
    assert model(**batch).image_hidden_states.shape[1] == processor.num_image_tokens


def _position_table(model):
    tower = model.model.vision_tower
    return getattr(tower, "vision_model", tower).embeddings.position_embedding.weight


def test_sincos2d_vision_positions_set_at_init_and_kept_on_load(tmp_path):
    model, processor = create("tiny", vision_position_init="sincos2d")  # 8x8 grid of 4 px patches, width 64
    table = _position_table(model)
    torch.testing.assert_close(table, sincos_2d_positions(8, 64))
    # Row-major grid: patches 0 and 1 share a row (identical row half), patches 0 and 8 share a column.
    assert torch.equal(table[0, :32], table[1, :32]) and not torch.equal(table[0, 32:], table[1, 32:])
    assert torch.equal(table[0, 32:], table[8, 32:]) and not torch.equal(table[0, :32], table[8, :32])
    default = _position_table(create("tiny")[0])
    assert not torch.allclose(default, table)
    with torch.no_grad():
        table.add_(0.5)  # "trained": loading must keep these values, not re-initialise them
    model.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path)
    torch.testing.assert_close(_position_table(again), table)


def test_sincos2d_on_a_clip_tower_skips_the_class_token():
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, image_size=32, patch_size=8)
    model, _ = create("tiny", vision_config=vision, resampler_type="none", vision_position_init="sincos2d")
    table = _position_table(model)  # CLIP: class token row first, left at zero
    assert torch.equal(table[0], torch.zeros(32)) and torch.allclose(table[1:], sincos_2d_positions(4, 32))


def test_clip_vision_tower():
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, image_size=32, patch_size=8)
    model, processor = create("tiny", vision_config=vision, resampler_type="none",
                              vision_feature_select_strategy="default")
    # vision_config override replaces only the keys it names; make sure the tower is CLIP
    assert model.config.vision_config.model_type == "clip_vision_model"
    batch = _batch(processor, ["<image> hi"], [make_image()])
    assert model(**batch).image_hidden_states.shape[1] == 16


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(resampler_type="qformer"), "allowed: \\['perceiver', 'avgpool', 'none'\\]"),
        (dict(vision_feature_select_strategy="cls"), "allowed: \\['full', 'default'\\]"),
        (dict(resampler_type="avgpool", num_image_tokens=10), "perfect square"),
        (dict(num_image_tokens=0), "positive int"),
        (dict(vision_feature_layer=99), "out of range"),
        (dict(vision_position_init="rope"), "allowed: \\['default', 'sincos2d'\\]"),
    ],
)
def test_invalid_config_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GhostVisConfig(**kwargs)


def test_config_round_trip_and_dict_subconfigs(tmp_path):
    cfg = GhostVisConfig(text_config={"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 1,
                                      "num_attention_heads": 4, "intermediate_size": 128})
    assert cfg.text_config.model_type == "llama" and cfg.vision_config.model_type == "siglip_vision_model"
    cfg.save_pretrained(tmp_path)
    again = GhostVisConfig.from_pretrained(tmp_path)
    assert again.text_config.hidden_size == 64 and again.image_seq_length == cfg.image_seq_length


def test_tied_embeddings_and_attn_implementation(tiny):
    model, _ = tiny
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    model, _ = create("tiny", text_config={"tie_word_embeddings": False})
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    model.set_attn_implementation("eager")
    assert model.config.text_config._attn_implementation == "eager"
    assert model.config.vision_config._attn_implementation == "eager"


def test_gradient_checkpointing_reaches_both_towers(tiny):
    model, processor = tiny
    model.train()
    model.gradient_checkpointing_enable()
    assert model.model.language_model.gradient_checkpointing
    tower = model.model.vision_tower
    assert getattr(tower, "vision_model", tower).encoder.gradient_checkpointing
    batch = _batch(processor, ["<image> hi"], [make_image()])
    model(**batch, labels=batch["input_ids"]).loss.backward()


def test_logits_to_keep(tiny):
    model, processor = tiny
    batch = _batch(processor, ["<image> hello"], [make_image()])
    full = model(**batch).logits
    last = model(**batch, logits_to_keep=1).logits
    torch.testing.assert_close(full[:, -1:], last)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(text_config={"num_hiden_layers": 2}), r"text_config \(qwen2\) has no field\(s\) \['num_hiden_layers'\]"),
        (dict(vision_config={"patch_sise": 8}), r"vision_config \(siglip_vision_model\) has no field\(s\) \['patch_si"),
        (dict(resampler_typ="none"), r"no overridable field 'resampler_typ'; allowed: \[.*'resampler_type'"),
        (dict(image_token_id=5), "no overridable field 'image_token_id'"),  # create sets it from the tokenizer
    ],
)
def test_create_refuses_misspelt_overrides(overrides, match):
    with pytest.raises(ValueError, match=match):
        create("tiny", **overrides)


def test_create_accepts_legacy_subconfig_keys():
    model, _ = create("tiny", text_config={"num_hidden_layers": 1, "rope_theta": 500.0})  # -> rope_parameters
    assert model.config.text_config.num_hidden_layers == 1
    assert model.config.text_config.rope_parameters["rope_theta"] == 500.0


def test_get_image_features_follows_transformers_v5(tiny):
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    model, processor = tiny
    pixel_values = processor(images=[make_image(), make_image((0, 0, 255))],
                             return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model.get_image_features(pixel_values)
        with_hidden = model.get_image_features(pixel_values, output_hidden_states=True)
        as_tuple = model.get_image_features(pixel_values, return_dict=False)
    assert isinstance(out, BaseModelOutputWithPooling) and out.hidden_states is None
    assert out.pooler_output.shape == (2, processor.num_image_tokens, model.config.text_config.hidden_size)
    assert out.last_hidden_state.shape[0] == 2
    assert len(with_hidden.hidden_states) == model.config.vision_config.num_hidden_layers + 1
    torch.testing.assert_close(as_tuple[1], out.pooler_output)


def test_assisted_decoding_with_itself_as_assistant(tiny):
    # transformers runs the assistant's prefill without pixel_values: placeholders must embed as plain tokens there.
    model, processor = tiny
    text = processor.apply_chat_template([user_turn("What color?")], add_generation_prompt=True)
    inputs = processor(text=text, images=make_image(), return_tensors="pt")
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    plain = model.generate(**inputs, **kw)
    assisted = model.generate(**inputs, assistant_model=model, **kw)
    assert torch.equal(plain, assisted)


def test_forward_compiles_fullgraph_with_a_static_cache(tiny):
    """`_can_compile_fullgraph = True` is a promise: a static-cache prefill and decode step trace without a graph
    break (dynamo with the eager backend: the tracing is what breaks, inductor's code generation is not tested)."""
    from transformers import StaticCache

    from ghostvis_hf.modeling_ghostvis import CACHE_KWARG

    model, processor = tiny
    inputs = processor(text="<image> hi", images=make_image(), return_tensors="pt")
    n = inputs["input_ids"].shape[1]
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    results = []
    for fn in (model, compiled):
        cache = StaticCache(config=model.config.text_config, max_cache_len=n + 4)
        with torch.no_grad():
            prefill = fn(**inputs, use_cache=True, **{CACHE_KWARG: cache})
            step = fn(input_ids=prefill.logits[:, -1:].argmax(-1), position_ids=torch.tensor([[n]]),
                      use_cache=True, **{CACHE_KWARG: cache})
        results.append((prefill.logits, step.logits))
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1], results[0][1])


def test_tensor_parallel_plan_covers_the_head():
    from ghostvis_hf.modeling_ghostvis import GhostVisForConditionalGeneration

    assert GhostVisForConditionalGeneration._tp_plan == {"lm_head": "colwise_gather_output"}


def test_every_tower_attention_layer_goes_through_attention_interface():
    """The contract serving engines build on (vLLM's Transformers backend swaps attention this way): a function
    registered with transformers' `AttentionInterface` runs in every attention layer of both towers. The perceiver
    resampler keeps torch SDPA on purpose (README, "Serving with other engines")."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    calls = []

    def counting(module, *args, **kwargs):
        calls.append(module)
        return sdpa_attention_forward(module, *args, **kwargs)

    AttentionInterface.register("ghostvis_test_counting", counting)
    torch.manual_seed(0)
    model, processor = create("tiny")
    batch = _batch(processor, ["<image> hi"], [make_image()])
    with torch.no_grad():
        reference = model(**batch).logits
        model.set_attn_implementation("ghostvis_test_counting")
        routed = model(**batch).logits
    attention_layers = {n for n, m in model.named_modules() if n.endswith("self_attn")}
    called = {n for n, m in model.named_modules() if any(m is c for c in calls)}
    assert any(n.startswith("model.vision_tower") for n in attention_layers)
    assert any(n.startswith("model.language_model") for n in attention_layers)
    assert called == attention_layers
    torch.testing.assert_close(routed, reference, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["beam_search", "sample", "static_cache"])
def test_generation_modes_agree_with_and_without_cache(tiny, mode):
    """What transformers' GenerationTesterMixin checks, for the modes GhostVis users run: beam search and seeded
    sampling give the same tokens with and without a cache, and a static cache gives greedy's tokens."""
    model, processor = tiny
    batch = _generation_inputs(processor)
    kw = dict(max_new_tokens=6, min_new_tokens=6)
    if mode == "beam_search":
        kw.update(num_beams=3, do_sample=False)
    elif mode == "sample":
        kw.update(do_sample=True, top_k=5)
    if mode == "static_cache":
        reference = model.generate(**batch, do_sample=False, **kw)
        out = model.generate(**batch, do_sample=False, cache_implementation="static", **kw)
    else:
        torch.manual_seed(0)
        reference = model.generate(**batch, use_cache=False, **kw)
        torch.manual_seed(0)
        out = model.generate(**batch, **kw)
    assert torch.equal(out, reference)


def test_generate_from_inputs_embeds_equals_from_ids(tiny):
    model, processor = tiny
    batch = _generation_inputs(processor, batched=False)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(batch["input_ids"])
        features = model.get_image_features(batch["pixel_values"]).pooler_output
        mask = model.model.get_placeholder_mask(batch["input_ids"], embeds, features)
        embeds = embeds.masked_scatter(mask, features)
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    from_ids = model.generate(**batch, **kw)[:, batch["input_ids"].shape[1]:]
    from_embeds = model.generate(inputs_embeds=embeds, attention_mask=batch["attention_mask"], **kw)
    assert torch.equal(from_embeds, from_ids)


def test_static_image_scatter_equals_masked_scatter_values_and_grads():
    """The gather path a CUDA-graph capture takes (`static=True`) writes the same features to the same positions as
    `masked_scatter`, and sends the same gradients to the text embeddings and to the features."""
    from ghostvis_hf.modeling_ghostvis import scatter_image_features

    g = torch.Generator().manual_seed(0)
    token_mask = torch.zeros(2, 11, dtype=torch.bool)
    token_mask[0, 2:5] = token_mask[1, 0:3] = token_mask[1, 7:10] = True  # 3 images of 3 tokens, one row with two
    grads = {}
    for static in (False, True):
        embeds = torch.randn(2, 11, 6, generator=torch.Generator().manual_seed(1), requires_grad=True)
        features = torch.randn(3, 3, 6, generator=torch.Generator().manual_seed(2), requires_grad=True)
        mask = token_mask.unsqueeze(-1).expand_as(embeds)
        out = scatter_image_features(embeds, mask, features, static=static)
        weights = torch.randn(out.shape, generator=g.manual_seed(3))
        (out * weights).sum().backward()
        grads[static] = (out.detach(), embeds.grad, features.grad)
    assert torch.equal(grads[True][0][token_mask], grads[False][0][token_mask])
    for want, got in zip(grads[False], grads[True]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
