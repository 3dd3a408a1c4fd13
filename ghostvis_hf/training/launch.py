"""What the launcher set up for this process: whether DeepSpeed or FSDP shards the run, and accelerate's flags.

`accelerate launch` passes its config to the processes it starts as `ACCELERATE_*` environment variables; the
Trainer's own `--deepspeed` / `--fsdp` arguments say the same for runs started without it.
"""

import os


def env_flag(name: str) -> bool:
    """Whether the environment variable `name` is set to a true value (`1`, `true`, `yes`), as accelerate writes it."""
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def sharded_by(training_args) -> str | None:
    """`"DeepSpeed"` or `"FSDP"` when that shards this run (the Trainer's `--deepspeed` / `--fsdp`, or an
    `accelerate launch` config), else `None`.

    Example:
    ```python
    >>> from types import SimpleNamespace
    >>> sharded_by(SimpleNamespace(deepspeed="ds_config.json", fsdp=None))
    'DeepSpeed'

    ```
    """
    if getattr(training_args, "deepspeed", None) or env_flag("ACCELERATE_USE_DEEPSPEED"):
        return "DeepSpeed"
    if getattr(training_args, "fsdp", None) or env_flag("ACCELERATE_USE_FSDP"):
        return "FSDP"
    return None
