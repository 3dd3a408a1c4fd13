"""Builds the byte-level BPE tokenizer shipped for the `tiny` preset (no network, deterministic).

Run `python -m ghostvis_hf.assets.make_tiny_tokenizer` to regenerate `assets/tiny_tokenizer/tokenizer.json`.
The corpus is small and synthetic on purpose: the tiny preset exists for tests and the CPU main job, whose data
(the procedural shapes set) uses a few hundred English words. Byte-level BPE still encodes any text.
"""

import itertools
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

VOCAB_SIZE = 1024
SPECIAL_TOKENS = [
    "<|endoftext|>",  # pad
    "<|im_start|>",
    "<|im_end|>",  # eos
    "<image>",  # marker the user writes / the chat template renders
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",  # placeholder the model fills with image features
]

_WORDS = """
a an the is are was were be been am of and or to in on at by for with from as it its this that these those there
here what which who whom whose where when why how many much more most less least few several some any all each every
no not yes none one two three four five six seven eight nine ten zero 0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000
red green blue yellow purple orange black white gray grey brown pink cyan magenta color colour colors colours
circle circles square squares triangle triangles star stars cross crosses shape shapes object objects rectangle
diamond ellipse oval line dot left right top bottom above below next beside middle center centre corner side
image picture photo photograph describe description caption show shows showing contains contain containing
question answer answers word phrase single using please briefly short long small large big tiny huge size
count number total how many there are is it the of on left right of
you i we they he she me my your our their hello hi thanks thank help helpful assistant user system chat
can could would should will shall may might must do does did done make made see seen look looks looking
chart graph plot bar value values percent percentage year years text read reads written sign title label
people person man woman child dog cat car bus train street table food room water sky tree grass building
""".split()

_TEMPLATES = [
    "What color is the {s}?", "What colour is the {s}?", "What shape is the {c} object?",
    "How many shapes are there?", "Is the {c} {s} on the left or the right?", "Describe the image.",
    "a {c} {s} and a {c2} {s2}.", "There is a {c} {s} on the {side}.", "Answer the question using a single word or phrase.",
]


def _corpus():
    colors = ["red", "green", "blue", "yellow", "purple", "orange"]
    shapes = ["circle", "square", "triangle", "star", "cross"]
    for t, c, s, c2, s2 in itertools.product(_TEMPLATES, colors, shapes, colors[:3], shapes[:3]):
        yield t.format(c=c, s=s, c2=c2, s2=s2, side="left")
    for _ in range(20):
        yield "<|im_start|>system\n<|im_start|>user\n<|im_start|>assistant\n"  # chat-template role headers
        yield " ".join(_WORDS)
        # answers follow the assistant header's newline: make "\nred" etc. merge into single tokens
        yield "\n".join(colors + shapes + ["left", "right", "yes", "no"] + [str(i) for i in range(10)])
        yield " ".join(w.capitalize() for w in _WORDS)


def build(out_dir: str) -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))


if __name__ == "__main__":
    build(os.path.join(os.path.dirname(__file__), "tiny_tokenizer"))
