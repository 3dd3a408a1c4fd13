"""Processor input rules (issue 14, item 8): an array's pixel scale is read as transformers reads it, and whatever fits
no rule is refused with a `ValueError` naming the argument, never turned into a silently wrong image."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_image
from ghostvis_hf.processing_ghostvis import to_rgb_image


def _photo():
    """A 6x4 RGB uint8 image using the whole 0..255 range, so a wrong scale shows."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(4, 6, 3), dtype=np.uint8)
    pixels[0, 0], pixels[0, 1] = 0, 255
    return pixels


def _pixels(image):
    return np.asarray(to_rgb_image(image))


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.int16, np.uint16, np.float16, np.float32, np.float64])
def test_whole_numbers_0_to_255_in_any_dtype_are_the_uint8_image(tiny, dtype):
    # These were clipped to [0, 1] and came out white.
    _, processor = tiny
    pixels = _photo()
    np.testing.assert_array_equal(_pixels(pixels.astype(dtype)), pixels)
    np.testing.assert_array_equal(_pixels(torch.from_numpy(pixels.astype(dtype)).permute(2, 0, 1)), pixels)
    ref = processor(text="<image>", images=Image.fromarray(pixels), return_tensors="pt")["pixel_values"]
    out = processor(text="<image>", images=pixels.astype(dtype), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(out, ref)


def test_floats_in_0_1_are_rescaled_and_bf16_is_read_as_float32():
    pixels = _photo()
    np.testing.assert_array_equal(_pixels(pixels.astype(np.float32) / 255), pixels)
    bf16 = torch.from_numpy(pixels.astype(np.float32) / 255).to(torch.bfloat16).permute(2, 0, 1)
    assert np.abs(_pixels(bf16).astype(int) - pixels).max() <= 1  # bf16 keeps 8 bits of mantissa
    # A binary float mask stays black and white (the [0, 1] reading, transformers' `is_scaled_image`).
    mask = np.array([[0.0, 1.0]], dtype=np.float32)
    assert _pixels(mask).tolist() == [[[0, 0, 0], [255, 255, 255]]]
    assert _pixels(np.array([[False, True]])).tolist() == [[[0, 0, 0], [255, 255, 255]]]


@pytest.mark.parametrize(
    "array,match",
    [
        (np.full((4, 6, 3), 300, dtype=np.int64), r"int64 array with values in \[300, 300\]"),
        (np.full((4, 6, 3), -1, dtype=np.int32), r"int32 array with values in \[-1, -1\]"),
        (np.full((4, 6), 65535, dtype=np.uint16), r"uint16 array with values in \[65535, 65535\]"),
        (np.full((4, 6, 3), 127.5, dtype=np.float32), r"float32 array with values in \[127.5, 127.5\]"),
        (np.full((4, 6, 3), -0.5, dtype=np.float32), r"float32 array with values in \[-0.5, -0.5\]"),
    ],
)
def test_values_that_fit_no_pixel_scale_are_refused(tiny, array, match):
    _, processor = tiny
    with pytest.raises(ValueError, match=r"image 0 of sample 0: " + match + r".*uint8.*\[0, 1\]"):
        processor(text="<image>", images=[array])


@pytest.mark.parametrize(
    "image,match",
    [
        (np.full((4, 6, 3), np.nan, dtype=np.float32), "NaN or infinite"),
        (np.full((4, 6, 3), np.inf, dtype=np.float64), "NaN or infinite"),
        (np.zeros((4, 6, 3), dtype=np.complex64), "dtype complex64 is not an image"),
        (np.full((4, 6), "a"), "dtype <U1 is not an image"),
        (np.full((4, 6), None, dtype=object), "dtype object is not an image"),
        (np.zeros((8, 6, 2), dtype=np.uint8), r"shape \(8, 6, 2\) has no channel axis of 1, 3 or 4"),
        (np.zeros((2, 8, 6), dtype=np.uint8), r"shape \(2, 8, 6\) has no channel axis"),
        (np.zeros((8, 6, 5), dtype=np.uint8), r"shape \(8, 6, 5\) has no channel axis"),
        (np.zeros((1, 8, 6, 3), dtype=np.uint8), r"shape \(1, 8, 6, 3\) is not a non-empty HW/HWC/CHW image"),
        (torch.zeros(3, 8, 6, dtype=torch.complex64), "dtype complex64 is not an image"),
    ],
)
def test_arrays_that_are_no_image_are_refused(tiny, image, match):
    _, processor = tiny
    with pytest.raises(ValueError, match=r"image 0 of sample 0: .*" + match):
        processor(text="<image>", images=[image])


@pytest.mark.parametrize(
    "text,match",
    [
        ([], "text is an empty list"),
        (123, "text must be a string or a list of strings, got int"),
        (["<image>", 7], "text must be a string or a list of strings, got a list holding int"),
        ([None], "got a list holding NoneType"),
    ],
)
def test_bad_text_is_refused_naming_the_argument(tiny, text, match):
    _, processor = tiny
    with pytest.raises(ValueError, match=match):
        processor(text=text, images=None)


def test_premultiplied_and_16_bit_and_float_pil_images_convert_correctly():
    # 'La'/'RGBa' (premultiplied alpha): PIL cannot convert 'La' to RGB at all; it must equal its 'LA' twin.
    rgba = Image.new("RGBA", (2, 1), (200, 30, 30, 128))
    assert _pixels(rgba.convert("LA").convert("La")).tolist() == _pixels(rgba.convert("LA")).tolist()
    assert np.abs(_pixels(rgba.convert("RGBa")).astype(int) - _pixels(rgba)).max() <= 1
    # 16-bit PIL images: PIL's own convert clips at 255 (a 16-bit PNG came out white).
    pixels = _photo()[..., 0]
    sixteen = Image.fromarray(pixels.astype(np.uint16) * 257)
    assert sixteen.mode.startswith("I;16")
    buf = io.BytesIO()
    sixteen.save(buf, format="PNG")
    for source in (sixteen, buf.getvalue()):
        np.testing.assert_array_equal(_pixels(source)[..., 0], pixels)
    # Float ('F') images follow the float-array rules: [0, 1] is rescaled, not truncated to black.
    np.testing.assert_array_equal(_pixels(Image.fromarray(pixels.astype(np.float32) / 255))[..., 0], pixels)


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/cat.png", "https://example.com/cat.png"])
def test_urls_are_refused_never_fetched(tiny, monkeypatch, url):
    import transformers.image_utils

    def no_fetch(*args, **kwargs):
        raise AssertionError("the processor fetched a URL")

    monkeypatch.setattr(transformers.image_utils, "load_image", no_fetch)
    _, processor = tiny
    with pytest.raises(ValueError, match="image 0 of sample 0: .*URL.*load the image yourself"):
        processor(text="<image>", images=[url])


def test_local_paths_str_or_pathlike(tiny, tmp_path):
    _, processor = tiny
    path = tmp_path / "x.png"
    make_image((10, 200, 30)).save(path)
    ref = processor(text="<image>", images=make_image((10, 200, 30)), return_tensors="pt")["pixel_values"]
    for source in (str(path), path):
        torch.testing.assert_close(processor(text="<image>", images=source, return_tensors="pt")["pixel_values"], ref)
    with pytest.raises(ValueError, match="image 0 of sample 0: no such image file"):
        processor(text="<image>", images=[tmp_path / "missing.png"])
