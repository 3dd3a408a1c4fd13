"""A fixed synthetic SFT set of variable-length multi-turn conversations, one image each, made locally (issue 16).

What `recipes/configs/sft_1.5b_bench.yaml` trains on, so that the recipe's speed can be measured on any machine
without downloads: the lengths follow `ghostvis bench train`'s `mix` scenario (log-normal, median 450 tokens,
sigma 0.8, clipped), counted as GhostVis's presets tokenize them (the bundled tokenizer: every word below is one
token, every turn adds 5 template tokens, the image `image_tokens`). The text is random words, the image random
noise: only the shapes of the work matter. Rows are in the shared schema (`ghostvis_hf.data.common.FEATURES`) and
a function of `seed` alone; the registry name is `synthetic` (`get_dataset("synthetic", limit=N)`).
"""

import math
import random

import numpy as np

# Lower-case words of the bundled tokenizer that encode to one token after a space (WORDS) and also at the start of
# a turn (FIRST_WORDS).
WORDS = """
above all am and answer any are as at bar be been below beside big black blue bottom briefly brown building bus by
can caption car cat chart chat child circle circles color colors contain containing contains corner could count cross
cyan diamond did do does dog done dot ever few five food for four from graph grass gray green grey he here hi how
huge image in is it its label large least left less line long look made magenta make man many may me middle might
more most much must my next nine no none not number object objects of on one or orange our oval people person phrase
picture pink please plot purple question read rectangle red right see seen seven several shall shape shapes she
short should show showing shows side sign single six size sky small some square squares star stars street table ten
text thank that the their there these they this those three tiny title to top total train tree triangle triangles
two us using was water we were what when where who whose why will with woman word would written year yellow yes you
your zero
""".split()
FIRST_WORDS = """
am an any are as at be blue circle cross ever green he here hi how huge in it left no on one or orange our purple
red right square star tree triangle us yellow yes zero
""".split()
TURN_TOKENS = 5  # <|im_start|> role \n ... <|im_end|> \n


def synthetic_lengths(n: int, seed: int = 0, median: float = 450.0, sigma: float = 0.8, min_tokens: int = 100,
                      max_tokens: int = 2000) -> list[int]:
    """`n` conversation lengths (tokens), log-normal around `median`, clipped to `[min_tokens, max_tokens]`.

    Example:
    ```python
    >>> synthetic_lengths(4, seed=0)
    [213, 379, 837, 389]

    ```
    """
    rnd = random.Random(f"ghostvis-synthetic-lengths/{seed}")
    return [min(max_tokens, max(min_tokens, round(rnd.lognormvariate(math.log(median), sigma)))) for _ in range(n)]


def _words(rnd: random.Random, n: int) -> str:
    return " ".join([rnd.choice(FIRST_WORDS)] + [rnd.choice(WORDS) for _ in range(n - 1)])


def synthetic_conversation(rnd: random.Random, tokens: int, image_tokens: int = 66, max_turns: int = 6,
                           image_size: int = 64) -> dict:
    """One row of about `tokens` tokens: an image in the first user turn, then up to `max_turns` question/answer
    pairs; users ask short questions, the assistant writes most of the words."""
    from .common import encode_png, image_part, text_part

    pairs = rnd.randint(1, max_turns)
    words = tokens - image_tokens - 2 * TURN_TOKENS * pairs
    while pairs > 1 and words < 8 * pairs:
        pairs, words = pairs - 1, words + 2 * TURN_TOKENS
    words = max(words, 2 * pairs)
    weights = [rnd.random() + 0.1 for _ in range(pairs)]
    budget = [max(2, round(words * w / sum(weights))) for w in weights]
    messages = []
    for k, n in enumerate(budget):
        asked = max(1, min(n // 2, round(n * rnd.uniform(0.05, 0.25))))
        user = [image_part()] if k == 0 else []
        messages.append({"role": "user", "content": user + [text_part(_words(rnd, asked))]})
        messages.append({"role": "assistant", "content": [text_part(_words(rnd, n - asked))]})
    pixels = np.random.default_rng(rnd.getrandbits(32)).integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
    return {"images": [encode_png(pixels)], "messages": messages,
            "answers": [messages[-1]["content"][0]["text"]], "question_type": "synthetic", "source": "synthetic"}


def load_synthetic_conversations(path_or_hub_id: str | None = None, split: str = "train", image_root=None,
                                 limit: int | None = None, num_samples: int | None = None, seed: int = 0,
                                 median_tokens: float = 450.0, sigma: float = 0.8, max_tokens: int = 2000,
                                 image_tokens: int = 66, max_turns: int = 6, image_size: int = 64):
    """The synthetic set as a `datasets.Dataset` (the registry's call shape: `path_or_hub_id`/`image_root` unused).

    Args:
        limit / num_samples (`int`, *optional*, defaults to 2000): rows.
        seed (`int`, *optional*, defaults to 0): the set is a function of the seed (and `split`) alone.
        median_tokens, sigma, max_tokens: the length distribution (`synthetic_lengths`, minimum 100 tokens); keep
            `max_tokens` a little under the training `max_length`, the word counts being close, not exact.
        image_tokens (`int`, *optional*, defaults to 66): tokens of one image in the text (the 1.5b preset: 64
            placeholders + start + end).
        max_turns (`int`, *optional*, defaults to 6): question/answer pairs per conversation, at most.
        image_size (`int`, *optional*, defaults to 64): side of the noise images (the image processor resizes).
    """
    from .common import rows_to_dataset

    del path_or_hub_id, image_root
    n = num_samples or limit or 2000
    seed_split = f"{seed}/{split}"
    lengths = synthetic_lengths(n, seed_split, median_tokens, sigma, max_tokens=max_tokens)
    rnd = random.Random(f"ghostvis-synthetic/{seed_split}")
    rows = [synthetic_conversation(rnd, t, image_tokens, max_turns, image_size) for t in lengths]
    return rows_to_dataset(rows, encoded=True)


__all__ = ["load_synthetic_conversations", "synthetic_conversation", "synthetic_lengths"]
