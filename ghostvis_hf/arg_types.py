"""argparse value types the `ghostvis` commands share, so a bad number, name or path is refused by the parser, with
the option's name, before a model loads or a benchmark spends its first minutes.

    >>> import argparse
    >>> p = argparse.ArgumentParser(prog="demo", exit_on_error=False)
    >>> _ = p.add_argument("--batch-sizes", type=positive_int_list, default=[1])
    >>> _ = p.add_argument("--modes", type=choice_list("eager", "fused"), default=["eager"])
    >>> p.parse_args(["--batch-sizes", "1,32", "--modes", "fused"])
    Namespace(batch_sizes=[1, 32], modes=['fused'])
    >>> p.parse_args(["--batch-sizes", "0"])
    Traceback (most recent call last):
    ...
    argparse.ArgumentError: argument --batch-sizes: must be >= 1, got 0
"""

import argparse
import os


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    return _int_at_least(text, 0)


def tcp_port(text: str) -> int:
    """A TCP port, 0 to 65535 (0: any free one)."""
    value = _int_at_least(text, 0)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be <= 65535, got {value}")
    return value


def positive_int_list(text: str) -> list[int]:
    """A comma-separated list of integers >= 1 (`"1,32"`), at least one."""
    items = [t for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("needs at least one value")
    return [positive_int(t) for t in items]


def choice_list(*choices: str):
    """A type for a comma-separated list of names out of `choices` (`"fused,graphs"`), at least one."""

    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        unknown = [t for t in items if t not in choices]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(map(repr, unknown))}; choose from "
                                             f"{', '.join(choices)}" if unknown else "needs at least one value")
        return items

    return parse


def written_as_path(text: str) -> bool:
    """Whether a model or data argument is written as a local path (absolute, `./`, `../`, `~`, more than one `/`)
    rather than as a Hub id (`name`, `owner/name`)."""
    return os.path.isabs(text) or text.startswith((".", "~")) or text.count("/") > 1


def folder_or_hub_id(text: str) -> str:
    """A local folder, or a Hub id; a path to nothing is refused (the Hub would answer "Repo id must be ...")."""
    if written_as_path(text) and not os.path.isdir(os.path.expanduser(text)):
        raise argparse.ArgumentTypeError(f"no such folder: {text!r}")
    return text


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value
