"""Drawing for the procedural shapes set: box layout, shape masks and rendering into a `[H, W, 3]` uint8 array.

Numpy only, no PIL per image: each shape's mask is drawn once at 8x supersampling and cached, a whole image is a few
array writes, and pixel noise comes from a fixed bank of tiles (`make_noise_bank`). NOTE: every call here draws from
the caller's RNG stream in a fixed order; reordering those draws changes every image of every seed (and the main
job's data with it).
"""

import functools
import math
import random

import numpy as np
from PIL import Image, ImageDraw


PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 190),
    "orange": (245, 120, 20),
}
ALL_SHAPES = ("circle", "square", "triangle", "cross", "diamond", "star")
COLOR_JITTER = 12  # per-channel jitter of each shape's colour, for a little variety without ambiguity
BG_RANGE = (205, 250)  # background grey level; every palette colour has a channel <= 60, far below this
BG_TINT = 8
NOISE_BANK_SIZE = 1024


def make_noise_bank(noise: int, seed: int, image_size: int) -> np.ndarray | None:
    """`[bank, H, W, 3]` int16 tiles of uniform noise in `[-noise, noise]` (from their own numpy stream), or None."""
    if noise <= 0:
        return None
    np_rng = np.random.default_rng(seed)
    bank_size = min(NOISE_BANK_SIZE, max(16, 3_000_000 // (3 * image_size**2)))  # <= ~6 MB for big images
    return np_rng.integers(-noise, noise + 1, (bank_size, image_size, image_size, 3), dtype=np.int16)


def _randint(rng: random.Random, lo: int, hi: int) -> int:
    # 2x faster than rng.randint, which would otherwise show up in the profile.
    return lo + int(rng.random() * (hi - lo + 1))


def _free_position(rng: random.Random, boxes, s: int, image_size: int, gap: int) -> tuple[int, int] | None:
    """A uniformly random top-left corner where an `s`-box keeps `gap` px from `boxes`, or None if there is none."""
    n = image_size - s - 1  # candidate corners are 1..n: a 1 px margin from the border
    ok = np.ones((n, n), dtype=bool)  # [y, x], index i <-> coordinate i + 1
    for bx, by, bs in boxes:
        # Corners whose padded box would intersect this one form a rectangle: x in (bx - s - gap, bx + bs + gap).
        ok[max(0, by - s - gap) : max(0, by + bs + gap - 1), max(0, bx - s - gap) : max(0, bx + bs + gap - 1)] = False
    free = ok.ravel().nonzero()[0]
    if not len(free):
        return None
    y, x = divmod(int(free[_randint(rng, 0, len(free) - 1)]), n)
    return x + 1, y + 1


def layout(rng: random.Random, n: int, image_size: int, min_size: int, max_size: int, gap: int):
    """Place `n` square boxes `(x, y, size)` at least `gap` px apart; a box that does not fit anywhere shrinks."""
    for _ in range(10):
        boxes: list[tuple[int, int, int]] = []
        for _ in range(n):
            s = _randint(rng, min_size, max_size)
            while (pos := _free_position(rng, boxes, s, image_size, gap)) is None and s > min_size:
                s = max(min_size, (s + min_size) // 2 if s - min_size > 2 else s - 1)  # few retries, each costs a scan
            if pos is None:
                break
            boxes.append((*pos, s))
        if len(boxes) == n:
            return boxes
    # Always fits (checked in make_shapes_dataset): one min-size shape per cell of a k x k grid.
    k = math.ceil(math.sqrt(n))
    cell = image_size // k
    boxes = []
    for c in rng.sample(range(k * k), n):
        room = cell - min_size - gap
        x0, y0 = (c % k) * cell + gap // 2, (c // k) * cell + gap // 2
        boxes.append((x0 + _randint(rng, 0, room), y0 + _randint(rng, 0, room), min_size))
    return boxes


@functools.cache
def _mask(shape: str, s: int) -> np.ndarray:
    """
    Boolean `[s, s]` mask of a shape, drawn once and reused (drawing per image would be the slow part).

    Drawn at 8x and kept where at least half a pixel is covered: at 10 px PIL's direct rasterisation gives lopsided
    triangles (the apex falls between two pixels) and blocky circles.
    """
    k = 8
    big = s * k
    image = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(image)
    m = big - 1
    if shape == "circle":
        draw.ellipse((0, 0, m, m), fill=255)
    elif shape == "square":
        draw.rectangle((0, 0, m, m), fill=255)
    elif shape == "triangle":
        draw.polygon([(m / 2, 0), (0, m), (m, m)], fill=255)
    elif shape == "diamond":
        draw.polygon([(m / 2, 0), (m, m / 2), (m / 2, m), (0, m / 2)], fill=255)
    elif shape == "cross":
        t = max(2, round(s / 3)) * k
        o = (big - t) // 2
        draw.rectangle((o, 0, o + t - 1, m), fill=255)
        draw.rectangle((0, o, m, o + t - 1), fill=255)
    elif shape == "star":
        points = []
        for i in range(10):
            r = m / 2 if i % 2 == 0 else m / 2 * 0.45
            angle = -math.pi / 2 + i * math.pi / 5
            points.append((m / 2 + r * math.cos(angle), m / 2 + r * math.sin(angle)))
        draw.polygon(points, fill=255)
    else:
        raise ValueError(f"Unknown shape {shape!r}; allowed: {ALL_SHAPES}.")
    coverage = np.asarray(image, dtype=np.float32).reshape(s, k, s, k).mean(axis=(1, 3)) / 255
    return coverage >= 0.5


def render(rng: random.Random, noise_bank: np.ndarray | None, objects, boxes, image_size: int):
    """Draw the objects into a `[H, W, 3]` uint8 array (numpy only; the PNG is written directly from it)."""
    g = _randint(rng, *BG_RANGE)
    pixels = np.empty((image_size, image_size, 3), dtype=np.int16)
    pixels[...] = np.array([min(255, g + _randint(rng, -BG_TINT, BG_TINT)) for _ in range(3)], dtype=np.int16)
    for (shape, color), (x, y, s) in zip(objects, boxes):
        fill = np.array([c + _randint(rng, -COLOR_JITTER, COLOR_JITTER) for c in PALETTE[color]], dtype=np.int16)
        pixels[y : y + s, x : x + s][_mask(shape, s)] = fill
    if noise_bank is not None:
        # NOTE: noise tiles are drawn from a fixed bank: a fresh 32x32x3 draw per image cost more than the drawing.
        # The noise carries no label information, so reusing tiles across images is harmless.
        pixels += noise_bank[_randint(rng, 0, len(noise_bank) - 1)]
    return pixels.clip(0, 255).astype(np.uint8)
