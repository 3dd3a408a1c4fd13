"""`ghostvis chat --model PATH`: a streaming chat REPL, or a one-shot answer with `--prompt` (and `--image`).

    ghostvis chat --model ./ghostvis-tiny --prompt "What color?" --image img.png
    ghostvis chat --model ./ghostvis-1.5b --quantize int8       # interactive: /image PATH, /clear, /quit

Images attached with `/image` join the next message. Earlier turns keep their images, so the whole conversation is
re-sent each turn; the engine's vision cache makes the repeated images free.
"""

import argparse
import sys

from ..arg_types import folder_or_hub_id
from .loader import QUANTIZE_CHOICES, QUANTIZE_HELP

HELP = "commands: /image PATH (attach to the next message), /clear (new conversation), /quit"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ghostvis chat", description="Chat with a GhostVis checkpoint (streaming).")
    p.add_argument("--model", required=True, type=folder_or_hub_id, help="checkpoint folder or Hub id")
    p.add_argument("--prompt", help="one-shot: answer this and exit")
    p.add_argument("--image", action="append", default=[], help="image for the one-shot prompt (repeatable)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, help=QUANTIZE_HELP)
    p.add_argument("--device", help="cuda, cpu, … (default: cuda when available)")
    p.add_argument("--dtype", help="bfloat16, float16 or float32 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    return p


def _user_turn(text: str, images: list) -> dict:
    parts = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": text}]
    return {"role": "user", "content": parts}


def _answer(engine, messages: list, params, out=sys.stdout) -> str:
    """Streams one assistant answer to `out`; returns its text."""
    pieces = []
    for delta in engine.stream(messages=messages, params=params):
        pieces.append(delta)
        out.write(delta)
        out.flush()
    out.write("\n")
    out.flush()
    return "".join(pieces)


def _check_image(path: str):
    from ghostvis_hf.processing_ghostvis import to_rgb_image

    return to_rgb_image(path, where=path)


def repl(engine, params, system: str | None = None, stdin=sys.stdin, out=sys.stdout) -> None:
    """The interactive loop (reads `stdin` until `/quit` or end of input)."""
    history = [{"role": "system", "content": system}] if system else []
    pending: list = []
    out.write(f"GhostVis chat. {HELP}\n")
    while True:
        out.write(">>> ")
        out.flush()
        line = stdin.readline()
        if not line:
            out.write("\n")
            return
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return
        if line == "/clear":
            history = history[:1] if system else []
            pending = []
            out.write("(conversation cleared)\n")
            continue
        if line.startswith("/image"):
            path = line[len("/image") :].strip()
            try:
                pending.append(_check_image(path))
                out.write(f"(image attached: {path})\n")
            except ValueError as e:
                out.write(f"error: {e}\n")
            continue
        if line.startswith("/"):
            out.write(f"unknown command {line.split()[0]}; {HELP}\n")
            continue
        turn = _user_turn(line, pending)
        try:
            answer = _answer(engine, history + [turn], params, out)
        except ValueError as e:  # e.g. the conversation outgrew the context
            out.write(f"error: {e}\n")
            continue
        history += [turn, {"role": "assistant", "content": answer}]
        pending = []


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .engine import GenerationEngine
    from .loader import load_model
    from .sampling import SamplingParams

    try:
        params = SamplingParams(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
            repetition_penalty=args.repetition_penalty, seed=args.seed,
        )
        images = [_check_image(p) for p in args.image]
        model, processor = load_model(args.model, quantize=args.quantize, dtype=args.dtype, device=args.device)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"ghostvis chat: {e}", file=sys.stderr)
        return 2
    from .loader import memory_footprint

    quant = f", {args.quantize}" if args.quantize else ""
    print(f"loaded {args.model}: {memory_footprint(model)} of weights on {model.device}{quant}",
          file=sys.stderr)
    engine = GenerationEngine(model, processor)
    try:
        if args.prompt is None:
            if args.image:
                print("ghostvis chat: --image needs --prompt (interactive mode uses /image PATH)", file=sys.stderr)
                return 2
            repl(engine, params, system=args.system)
            return 0
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            _user_turn(args.prompt, images)
        ]
        try:
            _answer(engine, messages, params)
        except ValueError as e:
            print(f"ghostvis chat: {e}", file=sys.stderr)
            return 2
        return 0
    finally:
        engine.close()


if __name__ == "__main__":
    sys.exit(main())
