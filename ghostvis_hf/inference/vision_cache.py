"""Image preparation for the engine: validation, content hashing, parallel preprocessing, and an LRU of features.

A chat about one picture sends the same image with every turn, and benchmarks or multi-sample requests repeat it
too; the vision tower (SigLIP-so400m: 27 layers over 729 patches) is most of the time to first token. Features are
cached under a hash of the decoded RGB pixels, so the same picture hits whether it arrives as PNG bytes, a data URL
or a path. Decoding, hashing and resizing run in a thread pool (PIL releases the GIL for most of it).
"""

import hashlib
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch


def image_digest(image) -> str:
    """SHA-256 of an RGB `PIL.Image`'s size and pixels (what the vision tower sees before resizing)."""
    h = hashlib.sha256(f"{image.width}x{image.height}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()


@dataclass
class PreparedImage:
    """One image ready for the engine: its content key, and either cached features or preprocessed pixels."""

    key: str
    features: torch.Tensor | None = None  # [N, d_text] on the model's device
    pixel_values: torch.Tensor | None = None  # [3, H, W] on the CPU


class VisionCache:
    """A thread-safe LRU of image features, keyed by content hash.

    Args:
        capacity (`int`, *optional*, defaults to 256): images kept; 0 disables caching.
    """

    def __init__(self, capacity: int = 256):
        self.capacity = capacity
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str, count: bool = True) -> torch.Tensor | None:
        """Cached features or `None`; `count=False` leaves the hit/miss counters alone (re-checks)."""
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += count
                return None
            self._items.move_to_end(key)
            self.hits += count
            return value

    def put(self, key: str, features: torch.Tensor) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            self._items[key] = features
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


class ImagePreparer:
    """Validates, hashes and (on a cache miss) preprocesses images in a thread pool.

    Args:
        processor: the `GhostVisProcessor` (its `image_processor` resizes and normalises).
        cache (`VisionCache`): consulted before preprocessing, so a hit skips the resize too.
        workers (`int`, *optional*, defaults to 4): threads of the pool.
    """

    def __init__(self, processor, cache: VisionCache, workers: int = 4):
        self.processor = processor
        self.cache = cache
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="ghostvis-image")

    def _prepare_one(self, image, where: str) -> PreparedImage:
        from ghostvis_hf.processing_ghostvis import to_rgb_image

        try:
            rgb = to_rgb_image(image, where=where)
        except ValueError:
            raise
        except Exception as e:  # NOTE: Pillow raises more than OSError on broken files (SyntaxError, struct.error,
            # DecompressionBombError, ...): a bad image is the caller's error, never the engine's
            raise ValueError(f"{where}: the image could not be decoded ({type(e).__name__}: {e})") from None
        key = image_digest(rgb)
        features = self.cache.get(key)
        if features is not None:
            return PreparedImage(key, features=features)
        pixels = self.processor.image_processor(rgb, return_tensors="pt")["pixel_values"][0]  # [3, H, W]
        return PreparedImage(key, pixel_values=pixels)

    def prepare(self, images: list, where: str = "image") -> list[PreparedImage]:
        """Prepares a flat list of images in parallel; raises the first `ValueError` (bad image) in list order."""
        if not images:
            return []
        if len(images) == 1:
            return [self._prepare_one(images[0], f"{where} 0")]
        futures = [self.pool.submit(self._prepare_one, im, f"{where} {k}") for k, im in enumerate(images)]
        return [f.result() for f in futures]

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
