"""The per-step trainer callbacks that `GhostVisArguments` ask for, in one place for every recipe that takes them."""

from .fsdp_prefetch import fsdp_prefetch_callbacks
from .garbage_collection import gc_callbacks
from .profiling import profiler_callbacks
from .sync_report import sync_report_callbacks


def step_callbacks(args, output_dir: str) -> list:
    """Callbacks for `--profile_steps` (and `--profile_python`), `--gc_every_steps`, `--fsdp_forward_prefetch` and
    `--sync_steps`; none for options left unset.

    Args:
        args (`GhostVisArguments`): the recipe's parsed arguments.
        output_dir (`str`): where the profiler traces and the sync report go.
    """
    return (profiler_callbacks(args.profile_steps, output_dir, args.profile_python)
            + gc_callbacks(args.gc_every_steps)
            + fsdp_prefetch_callbacks(args.fsdp_forward_prefetch)  # FSDP2 only
            + sync_report_callbacks(args.sync_steps, output_dir))
