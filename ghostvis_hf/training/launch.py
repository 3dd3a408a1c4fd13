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


def fsdp_version(training_args) -> int | None:
    """FSDP's version (1 or 2) when FSDP shards this run, else `None`: the Trainer's `--fsdp_config` `version`
    (transformers' default 2), or the `FSDP_VERSION` that `accelerate launch` sets from its config (its default 1).

    Example:
    ```python
    >>> from types import SimpleNamespace
    >>> fsdp_version(SimpleNamespace(deepspeed=None, fsdp="full_shard", fsdp_config={"version": 2}))
    2

    ```
    """
    if sharded_by(training_args) != "FSDP":
        return None
    if getattr(training_args, "fsdp", None):
        return int((getattr(training_args, "fsdp_config", None) or {}).get("version", 2))
    return int(os.environ.get("FSDP_VERSION", "1"))
