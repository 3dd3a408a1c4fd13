"""Process set-up a recipe does before anything else: logging, CPU threads, NCCL's thread blocks per collective,
and TRL's fused head on the CPU."""

import logging
import os

import torch

from .arguments import GhostVisArguments

logger = logging.getLogger("ghostvis")


def setup_logging(level: int = logging.INFO) -> None:
    """Timestamped INFO logging for the recipe's process (the `ghostvis` logger and the libraries')."""
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def usable_cores() -> int:
    """CPU cores this process may run on: its affinity mask, capped by a cgroup v2 CPU quota (containers)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def resolve_cpu_threads(requested: int | None, cores: int | None = None, load: float | None = None,
                        local_processes: int | None = None) -> int:
    """The PyTorch thread count for `cpu_threads`.

    NOTE: on a CPU other work shares, more threads than free cores is far slower than fewer (every op waits for its
    slowest thread: 5x slower per step with 2 threads on 2 cores next to another busy process than with 1), so the
    default counts the cores other processes keep busy (the 1-minute load average) as taken.

    Args:
        requested (`int` or `None`): `None` = auto: the usable cores (affinity, cgroup quota) shared among this
            host's training processes (`LOCAL_WORLD_SIZE`), minus the cores the load average says are busy, at least
            1; `0` = every usable core (per process), whatever else runs; `N > 0` = exactly N.
        cores, load, local_processes: the machine's state (default: read from the system), for tests.

    Returns:
        `int`: threads, at least 1.

    Example:
    ```python
    >>> from ghostvis_hf.training.runtime import resolve_cpu_threads

    >>> resolve_cpu_threads(None, cores=8, load=0.1), resolve_cpu_threads(None, cores=8, load=5.8)
    (8, 2)
    >>> resolve_cpu_threads(0, cores=8, load=5.8), resolve_cpu_threads(3, cores=8, load=5.8)
    (8, 3)

    ```
    """
    if requested is not None and requested < 0:
        raise ValueError(f"cpu_threads must be None (auto), 0 (every core) or a positive count, got {requested}")
    if requested:
        return requested
    cores = usable_cores() if cores is None else cores
    if local_processes is None:
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    per_process = max(1, cores // max(1, local_processes))
    if requested == 0:
        return per_process
    load = (os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0) if load is None else load
    free = cores - round(load)
    return max(1, min(per_process, free // max(1, local_processes)))


def set_cpu_threads(args: GhostVisArguments) -> int | None:
    """Applies `cpu_threads` (see `resolve_cpu_threads`) when no GPU is in use; returns the thread count set."""
    if torch.cuda.is_available():
        return None
    threads = resolve_cpu_threads(args.cpu_threads)
    torch.set_num_threads(threads)
    how = "auto: free cores" if args.cpu_threads is None else "cpu_threads"
    logger.info("CPU threads: %d (%s of %d usable)", threads, how, usable_cores())
    return threads


def set_nccl_max_ctas(args: GhostVisArguments) -> str | None:
    """Applies `nccl_max_ctas` as `NCCL_MAX_CTAS`, which NCCL reads when it makes a communicator: at the process
    group's first collective (accelerate starts the group without a `device_id`, so no communicator exists while a
    recipe parses its arguments). A different value already in the environment wins, with a warning. Returns the value
    in effect (`None`: NCCL's own choice)."""
    current = os.environ.get("NCCL_MAX_CTAS")
    if args.nccl_max_ctas is None:
        return current
    if current is not None and current != str(args.nccl_max_ctas):
        logger.warning("nccl_max_ctas=%d not applied: NCCL_MAX_CTAS=%s is set in the environment", args.nccl_max_ctas,
                       current)
        return current
    os.environ["NCCL_MAX_CTAS"] = str(args.nccl_max_ctas)
    logger.info("NCCL_MAX_CTAS=%d (nccl_max_ctas): at most that many thread blocks per NCCL collective",
                args.nccl_max_ctas)
    return os.environ["NCCL_MAX_CTAS"]


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


def start_recipe(args: GhostVisArguments) -> None:
    """What every recipe does first, before loading anything: logging, `--cpu_threads` (CPU runs),
    `--nccl_max_ctas` (before the first collective) and TRL's LM head scoring only labelled positions on the CPU."""
    setup_logging()
    set_cpu_threads(args)
    set_nccl_max_ctas(args)
    score_labelled_positions_only()
