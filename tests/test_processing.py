"""Processor: placeholder expansion, chat template + assistant mask, padding, truncation, and every bad input."""

import io

import numpy as np
import pytest
import torch
import transformers
from packaging.version import Version
from PIL import Image

from conftest import make_image, user_turn


def test_each_image_marker_becomes_a_framed_run(tiny):
    _, processor = tiny
    out = processor(text="<image>a<image>b", images=[make_image(), make_image()], return_tensors="pt")
    ids = out["input_ids"][0].tolist()
    n = processor.num_image_tokens
    assert ids.count(processor.image_token_id) == 2 * n
    start = ids.index(processor.vision_start_token_id)
    assert ids[start + 1 : start + 1 + n] == [processor.image_token_id] * n
    assert ids[start + 1 + n] == processor.vision_end_token_id
    assert out["pixel_values"].shape == (2, 3, 32, 32)


def test_round_trip_decode(tiny):
    _, processor = tiny
    text = "What color is the circle? It is red."
    ids = processor(text=text)["input_ids"][0]
    assert processor.decode(ids) == text


@pytest.mark.skipif(Version(transformers.__version__) < Version("5.18"),
                    reason="assistant masks on image conversations need transformers >= 5.18 (the train extra's floor)")
def test_chat_template_generation_prompt_and_assistant_mask(tiny):
    _, processor = tiny
    conv = [user_turn("What color is the square?"), {"role": "assistant", "content": [{"type": "text", "text": "blue"}]}]
    rendered = processor.apply_chat_template(conv)
    assert rendered == ("<|im_start|>user\n<image>What color is the square?<|im_end|>\n"
                        "<|im_start|>assistant\nblue<|im_end|>\n")
    prompt = processor.apply_chat_template(conv[:1], add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    # Images sit in their content parts (TRL's `prepare_multimodal_messages` layout): an `images=` argument beside
    # the conversations is read by transformers >= 5.19 only, and 5.18 passes it twice to the processor.
    with_image = [{"role": "user", "content": [{"type": "image", "image": make_image()},
                                               {"type": "text", "text": "What color is the square?"}]}, conv[1]]
    batch = processor.apply_chat_template(
        [with_image, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]],
        tokenize=True, return_dict=True, return_tensors="pt", return_assistant_tokens_mask=True,
        processor_kwargs={"padding": True, "padding_side": "right"},
    )
    assert batch["pixel_values"].shape[0] == 1
    masks = batch["assistant_masks"]
    decoded = [processor.decode(batch["input_ids"][i][masks[i].bool()]) for i in range(2)]
    assert decoded == ["blue<|im_end|>", "hello there<|im_end|>"]
    # never an image token under the assistant mask
    assert not (masks.bool() & (batch["input_ids"] == processor.image_token_id)).any()


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_sides(tiny, side):
    _, processor = tiny
    out = processor(text=["<image> short", "<image> a much longer text here"], images=[make_image(), make_image()],
                    padding=True, padding_side=side, return_tensors="pt")
    mask = out["attention_mask"]
    pad = processor.tokenizer.pad_token_id
    short = out["input_ids"][0]
    if side == "left":
        assert mask[0, 0] == 0 and short[0] == pad and mask[0, -1] == 1
    else:
        assert mask[0, -1] == 0 and short[-1] == pad and mask[0, 0] == 1


def test_truncation_never_splits_an_image_run(tiny):
    _, processor = tiny
    n = processor.num_image_tokens
    # cutting after the run is fine
    ok = processor(text="<image> and some words after the image", images=make_image(), truncation=True,
                   max_length=n + 4)
    assert len(ok["input_ids"][0]) == n + 4
    with pytest.raises(ValueError, match="cut through or drop 1 image placeholder run"):
        processor(text="words before <image>", images=make_image(), truncation=True, max_length=n)


@pytest.mark.parametrize(
    "images,text,match",
    [
        ([make_image(), make_image()], "<image> only one marker", "2 images but the text has 1 <image> markers"),
        (None, "<image> marker without image", "1 <image> markers but no images"),
        ([make_image()], "no marker", "1 images but the text has 0 <image> markers"),
        ([["not an image"]], "<image>", "no such image file"),
        ([[42]], "<image>", "got a int, which is not an image"),
        ([[b"definitely not a png"]], "<image>", "bytes are not a readable image"),
        ([[Image.new("RGB", (0, 5))]], "<image>", "zero-size image"),
        ([[np.zeros((0, 4, 3), dtype=np.uint8)]], "<image>", "not a non-empty"),
        ([["data:image/png;base64,@@@"]], "<image>", "invalid base64"),
        ([[make_image()], [make_image()]], ["<image>", "<image><image>"], "Sample 1 has 2 <image> markers but 1"),
    ],
)
def test_bad_inputs_raise_clear_errors(tiny, images, text, match):
    _, processor = tiny
    with pytest.raises(ValueError, match=match):
        processor(text=text, images=images, padding=True, return_tensors="pt")


def test_truncated_image_file_raises(tiny, tmp_path):
    _, processor = tiny
    buf = io.BytesIO()
    make_image(size=(64, 64)).save(buf, format="PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buf.getvalue()[:60])
    with pytest.raises(ValueError, match="image 0 of sample 0"):
        processor(text="<image>", images=[str(path)])


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "LA", "I;16"])
def test_modes_become_rgb(tiny, mode):
    _, processor = tiny
    image = Image.new("RGB", (20, 20), (200, 30, 30)).convert(mode)
    out = processor(text="<image>", images=image, return_tensors="pt")
    assert out["pixel_values"].shape == (1, 3, 32, 32)
    assert torch.isfinite(out["pixel_values"]).all()


def _png_bytes(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_transparency_is_composited_onto_white_and_rgb_is_untouched():
    from ghostvis_hf.data.common import encode_png
    from ghostvis_hf.processing_ghostvis import to_rgb_image

    # Palette PNG whose entry 0 is transparent (a tRNS chunk): transparent pixels turn white, not the stored black.
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 200, 30, 30])
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0
    decoded = Image.open(io.BytesIO(_png_bytes(palette)))
    assert decoded.mode == "P" and "transparency" in decoded.info
    # RGBA: fully transparent -> white, half transparent -> halfway to white, opaque -> its colour.
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(0, 0, 255, 0), (0, 0, 255, 128), (0, 0, 255, 255)])
    cases = [
        (decoded, [(255, 255, 255), (200, 30, 30)]),
        (rgba, [(255, 255, 255), (127, 127, 255), (0, 0, 255)]),
        (rgba.convert("LA"), [(255, 255, 255), (142, 142, 142), (29, 29, 29)]),
        (Image.new("P", (1, 1)), [(0, 0, 0)]),  # a palette without transparency is a plain conversion
    ]
    for image, pixels in cases:
        for source in (image, _png_bytes(image)):
            rgb = to_rgb_image(source)
            assert rgb.mode == "RGB" and list(rgb.getdata()) == pixels, (image.mode, type(source))
        # The data side (`encode_png`) converts with the same function as the processor.
        stored = Image.open(io.BytesIO(encode_png(image)["bytes"]))
        assert list(stored.convert("RGB").getdata()) == pixels, image.mode
    rgb = make_image()
    assert to_rgb_image(rgb) is rgb


def test_image_sources_agree(tiny, tmp_path):
    import base64

    _, processor = tiny
    image = make_image((10, 200, 30))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    path = tmp_path / "x.png"
    path.write_bytes(buf.getvalue())
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    wrapped = "data:image/png;base64," + base64.encodebytes(buf.getvalue()).decode()  # RFC 2045: 76-char lines
    assert "\n" in wrapped.rstrip()
    arr = np.asarray(image)
    ref = processor(text="<image>", images=image, return_tensors="pt")["pixel_values"]
    for source in (buf.getvalue(), str(path), url, wrapped, arr, torch.from_numpy(arr.copy()).permute(2, 0, 1)):
        torch.testing.assert_close(processor(text="<image>", images=source, return_tensors="pt")["pixel_values"], ref)


def test_unknown_kwarg_is_refused(tiny):
    _, processor = tiny
    with pytest.raises(ValueError, match="Unexpected processor arguments"):
        processor(text="hi", paddding=True)


def test_image_processor_options_reach_the_image_processor(tiny):
    _, processor = tiny
    image = make_image((200, 100, 50))
    ref = processor(text="<image>", images=image, return_tensors="pt")["pixel_values"]
    raw = processor(text="<image>", images=image, return_tensors="pt", do_rescale=False, do_normalize=False)
    assert raw["pixel_values"][0, :, 0, 0].tolist() == [200, 100, 50]  # neither rescaled nor normalised
    nested = processor(text="<image>", images=image, return_tensors="pt", images_kwargs={"do_normalize": False})
    assert not torch.allclose(nested["pixel_values"], ref)
    alone = processor(images=[image], do_rescale=False, do_normalize=False, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(alone, raw["pixel_values"])


def test_other_modalities_options_and_empty_lists_are_ignored(tiny):
    # lmms-eval passes `videos=[]`, `audios=[]`; pipelines pass video/audio options to every processor.
    _, processor = tiny
    ref = processor(text="<image> hi", images=make_image(), return_tensors="pt")
    out = processor(text="<image> hi", images=make_image(), videos=[], audio=[], num_frames=8, fps=2,
                    sampling_rate=16000, return_tensors="pt")
    assert torch.equal(out["input_ids"], ref["input_ids"])
    torch.testing.assert_close(out["pixel_values"], ref["pixel_values"])
    with pytest.raises(ValueError, match="images and text only"):
        processor(text="hi", videos=[np.zeros((2, 8, 8, 3), dtype=np.uint8)])


def test_options_given_twice_are_refused(tiny):
    # transformers' rule: a name given as a keyword argument and again in a modality dict is an error, even when the
    # values agree; `common_kwargs` are defaults that a keyword argument overrides.
    _, processor = tiny
    with pytest.raises(ValueError, match="'padding' given twice"):
        processor(text=["a", "bb"], padding=True, text_kwargs={"padding": False})
    with pytest.raises(ValueError, match="'do_normalize' given twice"):
        processor(text="<image>", images=make_image(), do_normalize=False, images_kwargs={"do_normalize": False})
    out = processor(text=["a", "bb"], padding=True, common_kwargs={"return_tensors": "np"}, return_tensors="pt")
    assert isinstance(out["input_ids"], torch.Tensor)


def test_tokenizer_defaults_apply_unless_overridden(tiny, tmp_path):
    # Options the tokenizer was created with (here padding to max_length=12) are the processor's defaults.
    from ghostvis_hf import GhostVisProcessor

    _, processor = tiny
    processor.tokenizer.save_pretrained(tmp_path)
    tokenizer = processor.tokenizer.__class__.from_pretrained(tmp_path, padding="max_length", max_length=12)
    padded = GhostVisProcessor(processor.image_processor, tokenizer, num_image_tokens=processor.num_image_tokens)
    assert len(padded(text=["hi"])["input_ids"][0]) == 12
    assert len(padded(text=["hi"], padding=False)["input_ids"][0]) == len(processor(text=["hi"])["input_ids"][0])


def test_num_multimodal_tokens_counts_the_placeholders_features_fill(tiny):
    # vLLM's count: the positions that take image features (`mm_token_type_ids == 1`); the start/end frame is text.
    _, processor = tiny
    counts = processor._get_num_multimodal_tokens(image_sizes=[(30, 40), (300, 500)])
    out = processor(text="<image>hi", images=make_image(size=(300, 500)), return_mm_token_type_ids=True)
    assert counts.num_image_tokens == [sum(out["mm_token_type_ids"][0])] * 2 == [processor.num_image_tokens] * 2
    assert counts.num_image_patches == [1, 1]
