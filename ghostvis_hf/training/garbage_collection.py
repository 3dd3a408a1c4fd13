"""`--gc_every_steps N`: Python's garbage collector on a schedule instead of whenever its counters say.

A training process holds millions of long-lived Python objects (torch.compile's graphs and guards above all), and
CPython's automatic full collection walks all of them: on an H200, `ghostvis bench train`'s compiled + CUDA-graphed
step (0.19 s) took 0.50 s once in 24 steps, a pause of the whole step. Large training frameworks (torchtitan's
`training.gc_freq`, Megatron-LM's `--manual-gc`) turn automatic collection off for the loop and collect the young
generations every N steps; this callback does the same: one full collection and `gc.disable()` when training starts,
`gc.collect(1)` every N optimizer steps, and the collector handed back as it was when training ends.

Example:
```python
>>> import gc
>>> from ghostvis_hf.training.garbage_collection import GarbageCollectionCallback
>>> callback = GarbageCollectionCallback(every_steps=50)
>>> was_enabled = gc.isenabled()
>>> callback.on_train_begin(None, None, None)
>>> gc.isenabled()
False
>>> callback.on_train_end(None, None, None)
>>> gc.isenabled() == was_enabled
True
```
"""

import gc

from transformers.trainer_callback import TrainerCallback


class GarbageCollectionCallback(TrainerCallback):
    """Automatic garbage collection off during training; `gc.collect(generation)` every `every_steps` steps."""

    def __init__(self, every_steps: int, generation: int = 1):
        if every_steps < 1:
            raise ValueError(f"every_steps must be >= 1, got {every_steps}")
        self.every_steps, self.generation = every_steps, generation
        self._was_enabled = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._was_enabled = gc.isenabled()
        gc.collect()  # everything set-up left behind, once, before the clock matters
        gc.disable()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every_steps == 0:
            gc.collect(self.generation)

    def on_train_end(self, args, state, control, **kwargs):
        if self._was_enabled:
            gc.enable()


def check_gc_every_steps(every_steps: int) -> None:
    """Refuses a negative `--gc_every_steps` (0: Python's automatic collection)."""
    if every_steps < 0:
        raise ValueError(f"gc_every_steps must be >= 0 (0: Python's automatic collection), got {every_steps}")


def gc_callbacks(every_steps: int) -> list:
    """`[GarbageCollectionCallback(every_steps)]`, or `[]` for 0 (Python's automatic collection)."""
    check_gc_every_steps(every_steps)
    return [GarbageCollectionCallback(every_steps)] if every_steps else []
