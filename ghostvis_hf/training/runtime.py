"""Process set-up a recipe does before anything else: logging, CPU threads, and TRL's fused head on the CPU."""

import logging
import os

import torch

from .arguments import GhostVisArguments

logger = logging.getLogger("ghostvis")


def setup_logging(level: int = logging.INFO) -> None:
    """Timestamped INFO logging for the recipe's process (the `ghostvis` logger and the libraries')."""
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def set_cpu_threads(args: GhostVisArguments) -> None:
    """Applies `cpu_threads` when no GPU is in use (a no-op when it is unset)."""
    if args.cpu_threads is None or torch.cuda.is_available():
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(args.cpu_threads or cores)
    logger.info("CPU threads: %d", torch.get_num_threads())


def score_labelled_positions_only() -> bool:
    """Makes TRL's fused LM head score only the labelled positions on the CPU too, as it already does on CUDA.

    TRL computes per-token log-probs over *every* position off Triton devices (fixed tile shapes for compilers such
    as Neuron's); in the tiny main job only ~15 % of positions carry a label, and the head's forward and backward over
    the rest were ~20 % of a CPU step. The labelled positions' values are the same either way. Patches one name in
    `trl.trainer.utils` (TRL 1.x); returns False and changes nothing if that name is gone.
    """
    try:
        import trl.trainer.utils as trl_utils
    except ImportError:
        return False
    original = getattr(trl_utils, "_use_triton", None)
    if original is None or getattr(original, "_ghostvis_compact", False):
        return original is not None

    def use_compact(device: torch.device) -> bool:
        return device.type == "cpu" or original(device)

    use_compact._ghostvis_compact = True
    trl_utils._use_triton = use_compact
    return True
