"""`ghostvis bench train|generate|quantize`: GPU benchmarks that write JSON + a markdown table under `docs/benchmarks/`."""

import importlib
import sys

BENCHMARKS = {
    "train": ("ghostvis_hf.bench.train", "training throughput"),
    "generate": ("ghostvis_hf.bench.generate", "generation: stock generate vs the engine, time to first token"),
    "quantize": ("ghostvis_hf.bench.quantize", "unquantized vs int8 vs bnb-int8 vs bnb-nf4: memory, logits, decode speed"),
}


def main(argv=None) -> int:
    """Dispatches `ghostvis bench <name> [options]` to `ghostvis_hf.bench.<name>:main`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHMARKS:
        lines = ["usage: ghostvis bench <benchmark> [options]", "", "benchmarks:"]
        lines += [f"  {name:<9} {help_}" for name, (_, help_) in BENCHMARKS.items()]
        print("\n".join(lines), file=sys.stdout if not argv or argv[0] in ("-h", "--help") else sys.stderr)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(BENCHMARKS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)
