"""`ghostvis` command line: one subcommand per module, imported only when used (keeps `ghostvis --help` fast).

Each target module exposes `main(argv: list[str] | None) -> int | None` with its own argparse parser.
"""

import importlib
import sys

from ghostvis_hf.bench import BENCHMARKS  # only a dict of names: the benchmarks' own modules load when run

COMMANDS = {
    "init": ("ghostvis_hf.hub", "main_init", "write a randomly initialised checkpoint from a preset"),
    "upgrade": ("ghostvis_hf.hub", "main_upgrade", "refresh a checkpoint's code files (after a transformers upgrade)"),
    "compose": ("ghostvis_hf.compose", "main", "build GhostVis from a pretrained LM and vision encoder"),
    "eval": ("ghostvis_hf.evaluation.run", "main",
             "evaluate a checkpoint on shapes/vqav2/textvqa/chartqa/coco, or on your own data (--data PATH)"),
    "chat": ("ghostvis_hf.inference.chat", "main", "interactive or one-shot chat with a checkpoint"),
    "serve": ("ghostvis_hf.serve.server", "main", "OpenAI-compatible HTTP server + web page"),
    "bench": ("ghostvis_hf.bench", "main", f"GPU benchmarks: `ghostvis bench {'|'.join(BENCHMARKS)}`"),
}


def _usage() -> str:
    lines = ["usage: ghostvis <command> [options]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "`ghostvis <command> --help` shows a command's options."]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"ghostvis: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    result = getattr(importlib.import_module(module), func)(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
