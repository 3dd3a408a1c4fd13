"""`--profile_steps START:STOP`: the recipes' optimizer steps START..STOP-1 under `torch.profiler`, on every rank.

Each rank writes `profile_rank<R>.txt` to the output folder (`bench.profiling.kernel_summary`): kernel time by kind,
the GPU's busy time, and the communication a multi-GPU run did not hide behind compute; with `--profile_python true`
also the Python functions that took the host's time (DeepSpeed's or FSDP's hooks, the Trainer's loop: recording
Python stacks slows those steps much more). The profiler slows the steps it records: put them after the last logging
step whose speed you want (the scaling benchmark runs `max_steps` = STOP with the last log at START), or read the
speed log knowing it.
"""

import logging
import os
import time

import torch
from transformers.trainer_callback import TrainerCallback

from ..bench.profiling import kernel_summary

logger = logging.getLogger("ghostvis")


def parse_profile_steps(text: str | None, name: str = "profile_steps") -> tuple[int, int] | None:
    """`"START:STOP"` -> `(START, STOP)` with 0 <= START < STOP; `None`/`""` -> `None` (`name`: the argument's name,
    for the error).

    Example:
    ```python
    >>> parse_profile_steps("30:33")
    (30, 33)

    ```
    """
    if not text:
        return None
    try:
        start, stop = (int(x) for x in str(text).split(":"))
    except ValueError:
        raise ValueError(f"{name} must be START:STOP (optimizer steps, e.g. 30:33), got {text!r}") from None
    if not 0 <= start < stop:
        raise ValueError(f"{name} {text!r}: need 0 <= START < STOP")
    return start, stop


class StepWindowCallback(TrainerCallback):
    """Calls `_open(args)` when optimizer step `start` begins and `_close(args, steps)` when step `stop - 1` has
    ended (or when training ends inside the window), once: the frame of `--profile_steps` and `--sync_steps`, whose
    callbacks define the two methods."""

    def __init__(self, start: int, stop: int):
        self.start, self.stop, self.active, self.done = start, stop, False, False

    def on_step_begin(self, args, state, control, **kwargs):
        if not self.active and not self.done and state.global_step == self.start:
            self.active = True
            self._open(args)

    def on_step_end(self, args, state, control, **kwargs):
        if self.active and state.global_step >= self.stop:
            self._end(args, state)

    def on_train_end(self, args, state, control, **kwargs):
        if self.active:  # training ended inside the window
            self._end(args, state)

    def _end(self, args, state) -> None:
        self.active, self.done = False, True
        self._close(args, state.global_step - self.start)


class ProfilerCallback(StepWindowCallback):
    """Profiles optimizer steps `start`..`stop - 1` and writes their `kernel_summary` to `output_dir`."""

    def __init__(self, start: int, stop: int, output_dir: str, python: bool = False):
        super().__init__(start, stop)
        self.output_dir, self.python = output_dir, python
        self.prof, self.t0, self.path, self.on_cuda = None, 0.0, None, False

    def _open(self, args) -> None:
        from torch.profiler import ProfilerActivity, profile

        self.on_cuda = torch.cuda.is_available() and args.device.type == "cuda"
        if self.on_cuda:
            torch.cuda.synchronize()
        self.prof = profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * self.on_cuda,
                            with_stack=self.python)
        self.prof.__enter__()
        self.t0 = time.perf_counter()

    def _close(self, args, steps: int) -> None:
        if self.on_cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - self.t0
        self.prof.__exit__(None, None, None)
        text = kernel_summary(self.prof, steps, wall, python=self.python)
        self.prof = None
        os.makedirs(self.output_dir, exist_ok=True)
        self.path = os.path.join(self.output_dir, f"profile_rank{args.process_index}.txt")
        with open(self.path, "w") as f:
            f.write(text)
        logger.info("profile of steps %d-%d: %s\n%s", self.start, self.start + steps - 1, self.path,
                    "\n".join(text.splitlines()[:3]))


def profiler_callbacks(profile_steps: str | None, output_dir: str, python: bool = False) -> list:
    """`[ProfilerCallback]` for `--profile_steps` (`python`: `--profile_python`), else `[]`."""
    window = parse_profile_steps(profile_steps)
    return [] if window is None else [ProfilerCallback(*window, output_dir, python=python)]
