"""`--sync_steps START:STOP`: every time optimizer steps START..STOP-1 made the host wait for the GPU, by call stack.

A sync (`.item()`, `nonzero`, a boolean-mask selection, a tensor made on the GPU from a Python number, `torch.equal`)
holds the host until the GPU has run everything queued; the next kernels start only once the host launches them
again. On a step bound by the host every one costs GPU time, and under DDP / FSDP2 / DeepSpeed, where the ranks meet
in collectives, one rank's stall holds the others. torch's sync debug mode (`torch.cuda.set_sync_debug_mode("warn")`)
warns at each one; this callback turns it on for the window, keeps the call stack of each warning and writes
`syncs_rank<R>.txt` to the output folder: the count a step and the stacks, most frequent first. It found the syncs
docs/benchmarks/scaling_8rows.md lists (twelfth session). CUDA only: elsewhere the file says nothing was recorded.
"""

import collections
import logging
import os
import traceback
import warnings

import torch

from .profiling import StepWindowCallback, parse_profile_steps

logger = logging.getLogger("ghostvis")


def _frame(f: traceback.FrameSummary) -> str:
    path = f.filename.replace(os.sep, "/")
    path = path.split("site-packages/")[-1].replace(os.getcwd().replace(os.sep, "/") + "/", "")
    return f"{path}:{f.lineno} {f.name}"


class SyncReportCallback(StepWindowCallback):
    """Records the host<->GPU syncs of optimizer steps `start`..`stop - 1` (`frames`: the stack's innermost frames
    kept per sync) and writes them to `output_dir/syncs_rank<R>.txt`."""

    def __init__(self, start: int, stop: int, output_dir: str, frames: int = 8):
        super().__init__(start, stop)
        self.output_dir, self.frames = output_dir, frames
        self.counts, self.path, self._warnings = collections.Counter(), None, None

    def _show(self, message, category, filename, lineno, file=None, line=None):
        text = str(message).lower()
        if "synchroniz" not in text or filename.replace(os.sep, "/").endswith("torch/cuda/__init__.py"):
            return self._shown(message, category, filename, lineno, file, line)  # not a sync, or the mode switch
        stack = [f for f in traceback.extract_stack()[:-1]
                 if not f.filename.replace(os.sep, "/").endswith(("/warnings.py", "/sync_report.py"))]
        self.counts["\n    ".join(_frame(f) for f in reversed(stack[-self.frames:]))] += 1

    def _open(self, args) -> None:
        self._warnings = warnings.catch_warnings()  # restores the filters and showwarning when left
        self._warnings.__enter__()
        warnings.simplefilter("always")
        self._shown, warnings.showwarning = warnings.showwarning, self._show
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("warn")

    def _close(self, args, steps: int) -> None:
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
        self._warnings.__exit__(None, None, None)
        self._warnings = None
        total = sum(self.counts.values())
        lines = [f"{total} syncs in {steps} optimizer steps ({total / max(steps, 1):.1f} a step), steps "
                 f"{self.start}-{self.start + steps - 1}"]
        if not cuda:
            lines.append("no CUDA device: torch's sync debug mode applies to CUDA only, nothing was recorded")
        lines += [f"\n{n / max(steps, 1):.1f} a step ({n} in all) at\n    {stack}"
                  for stack, n in self.counts.most_common()]
        os.makedirs(self.output_dir, exist_ok=True)
        self.path = os.path.join(self.output_dir, f"syncs_rank{args.process_index}.txt")
        with open(self.path, "w") as f:
            f.write("\n".join(lines) + "\n")
        logger.info("host syncs of steps %d-%d: %s (%s)", self.start, self.start + steps - 1, self.path, lines[0])


def sync_report_callbacks(sync_steps: str | None, output_dir: str) -> list:
    """`[SyncReportCallback]` for `--sync_steps START:STOP`, else `[]`."""
    window = parse_profile_steps(sync_steps, "sync_steps")
    return [] if window is None else [SyncReportCallback(*window, output_dir)]
