"""Sampling parameters and one batched, per-row sampler for the engine's decode steps.

Every row of a decode batch can carry its own temperature, top-k, top-p, repetition penalty and seed, so the sampler
works on `[B, V]` logits with `[B]` parameter tensors and never loops over rows.

NOTE: random draws come from a counter-based hash of `(seed, step, token id)` (splitmix64) fed to the Gumbel-max
trick, not from a `torch.Generator`. With continuous batching a request shares its decode batch with whoever happens
to be running; a stateful generator per batch would make a seeded request's output depend on its neighbours, and one
generator per row would cost one kernel launch per row and step. The hash gives the same sample for the same seed,
step and logits whatever the batch, slot or device.
"""

from dataclasses import dataclass, field

import torch

_MASK64 = (1 << 64) - 1


def wrap_int64(x: int) -> int:
    """Any Python int as the int64 with the same low 64 bits (torch has no uint64 arithmetic, and seeds wrap)."""
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN = wrap_int64(0x9E3779B97F4A7C15)
_MIX1 = wrap_int64(0xBF58476D1CE4E5B9)
_MIX2 = wrap_int64(0x94D049BB133111EB)
_STEP = wrap_int64(0xD1B54A32D192ED03)


@dataclass
class SamplingParams:
    """How to pick tokens for one request.

    Args:
        max_new_tokens (`int` or `None`, *optional*, defaults to 256):
            Tokens to generate at most; `None` fills the engine's context (`max_seq_len` minus the prompt).
        temperature (`float`, *optional*, defaults to 1.0): 0 means greedy decoding.
        top_p (`float`, *optional*, defaults to 1.0): nucleus sampling mass in (0, 1].
        top_k (`int`, *optional*, defaults to 0): keep the k most likely tokens; 0 keeps all.
        repetition_penalty (`float`, *optional*, defaults to 1.0):
            CTRL-style penalty on every token already in the prompt or the output (as `transformers` applies it).
        stop (`list[str]`, *optional*): strings that end the output; the match itself is not returned.
        seed (`int`, *optional*): makes sampling reproducible; sample `i` of `n` uses `seed + i` (wrapped to int64).
        n (`int`, *optional*, defaults to 1): samples generated from one shared prefill.
        ignore_eos (`bool`, *optional*, defaults to `False`): keep going past end-of-sequence (benchmarks).
    """

    max_new_tokens: int | None = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    n: int = 1
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        checks = [
            (self.max_new_tokens is None or (_is_int(self.max_new_tokens) and self.max_new_tokens >= 1),
             "max_new_tokens", "an int >= 1 or None"),
            (self.temperature >= 0, "temperature", ">= 0"),
            (0 < self.top_p <= 1, "top_p", "in (0, 1]"),
            (_is_int(self.top_k) and self.top_k >= 0, "top_k", "an int >= 0"),
            (self.repetition_penalty > 0, "repetition_penalty", "> 0"),
            (_is_int(self.n) and self.n >= 1, "n", "an int >= 1"),
            (all(isinstance(s, str) for s in self.stop), "stop", "a string or a list of strings"),
            (self.seed is None or _is_int(self.seed), "seed", "an int or None"),
        ]
        for ok, name, allowed in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: must be {allowed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)  # `True` is an int to Python, not to a JSON client


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's `>>` is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    x = x + _GOLDEN
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def hash_uniform(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Uniform floats in (0, 1), `[B, V]`, a pure function of `(seed, step, token id)`.

    Args:
        seeds (`torch.LongTensor` of shape `[B]`): one seed per row.
        steps (`torch.LongTensor` of shape `[B]`): index of the token being generated in each row.
        vocab_size (`int`): V.
    """
    base = _splitmix64(seeds * _GOLDEN + steps * _STEP)  # [B]
    ids = torch.arange(vocab_size, device=seeds.device, dtype=torch.long) * _MIX1
    bits = _shr(_splitmix64(base[:, None] + ids[None, :]), 11)  # [B, V], 53 random bits
    return (bits.double() + 0.5) * 2.0**-53


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """`transformers`' repetition penalty: divide positive / multiply negative logits of seen tokens.

    Args:
        logits (`torch.FloatTensor` of shape `[B, V]`)
        seen (`torch.BoolTensor` of shape `[B, V]`): tokens in the prompt or the output so far.
        penalty (`torch.FloatTensor` of shape `[B]`)
    """
    p = penalty[:, None]
    return torch.where(seen, torch.where(logits < 0, logits * p, logits / p), logits)


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Sets logits outside each row's top-k / nucleus to -inf (top-k first, as `transformers` orders them).

    Args:
        logits (`torch.FloatTensor` of shape `[B, V]`): already divided by the temperature.
        top_k (`torch.LongTensor` of shape `[B]`): 0 disables top-k for that row.
        top_p (`torch.FloatTensor` of shape `[B]`): 1.0 disables top-p for that row.
    """
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, V]
    rank = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)[:, None]
    drop = rank >= k
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # Mass of the strictly more likely tokens; the most likely token is always kept.
    before = probs.cumsum(dim=-1) - probs
    drop = drop | ((before >= top_p[:, None]) & (rank > 0))
    return logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))


def sample_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
    steps: torch.Tensor,
    penalty: torch.Tensor | None = None,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """Picks one token per row: greedy where `temperature == 0`, else Gumbel-max sampling.

    Args:
        logits (`torch.FloatTensor` of shape `[B, V]`)
        temperature, top_p (`torch.FloatTensor` of shape `[B]`), top_k, seeds, steps (`torch.LongTensor` of shape `[B]`)
        penalty (`torch.FloatTensor` of shape `[B]`, *optional*) and seen (`torch.BoolTensor` of shape `[B, V]`,
            *optional*): repetition penalty and the tokens it applies to.

    Returns:
        `torch.LongTensor` of shape `[B]`.
    """
    logits = logits.float()
    if penalty is not None:
        logits = apply_repetition_penalty(logits, seen, penalty)
    greedy = temperature <= 0
    if bool(greedy.all()):
        return logits.argmax(dim=-1)
    scaled = logits / torch.where(greedy, 1.0, temperature)[:, None]
    if bool(((top_k > 0) | (top_p < 1)).any()):
        scaled = filter_top_k_top_p(scaled, top_k, top_p)
    gumbel = -torch.log(-torch.log(hash_uniform(seeds, steps, logits.shape[-1])))  # [B, V]
    sampled = (scaled + gumbel.float()).argmax(dim=-1)
    return torch.where(greedy, logits.argmax(dim=-1), sampled)
