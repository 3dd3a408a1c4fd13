"""`GenerationEngine`: continuous batching over a slot KV cache, CUDA-graph decode steps, streaming, image caching.

The engine is the public face of three parts: `RequestIntake` (requests.py) tokenizes and validates a request in the
caller's thread, so a bad one fails at once; the `Scheduler` (scheduler.py) thread admits queued requests between
decode steps and streams their tokens; the `ModelRunner` (model_runner.py) owns every tensor, kernel and CUDA graph.
"""

from .detokenizer import TokenTable
from .model_runner import ModelRunner
from .requests import ContextLengthError, GenerationResult, RequestHandle, RequestIntake, StreamEvent
from .sampling import SamplingParams
from .scheduler import Scheduler
from .vision_cache import ImagePreparer, VisionCache

__all__ = ["ContextLengthError", "GenerationEngine", "GenerationResult", "RequestHandle", "StreamEvent"]


class GenerationEngine:
    """Batched, streaming generation for a GhostVis model.

    Args:
        model (`GhostVisForConditionalGeneration`): in eval mode, on its device and dtype.
        processor (`GhostVisProcessor`): tokenizer, chat template and image processor.
        max_batch_size (`int`, *optional*): sequences decoded together (KV slots); 32 on CUDA, 8 on the CPU.
        max_seq_len (`int`, *optional*): context per sequence (prompt + output); defaults to
            `min(max_position_embeddings, 4096)`.
        cuda_graphs (`bool`, *optional*): run decode steps, vision encoder and single prefills as CUDA graphs;
            defaults to `True` on CUDA for unquantized and int8 weight-only models (on the CPU, `True` runs the same
            code uncaptured).
        compile (`bool` or `dict`, *optional*, defaults to `False`): `torch.compile` the decode step (before
            capturing it); a dict is passed as inductor `options`, e.g. `{"coordinate_descent_tuning": True}`.
        vision_cache_size (`int`, *optional*, defaults to 256): images whose features are kept (0 disables).
        preprocess_workers (`int`, *optional*, defaults to 4): threads decoding and resizing images.
        max_prefill_tokens (`int`, *optional*, defaults to 8192): padded prompt tokens prefilled together.
        batch_buckets, seq_buckets (`list[int]`, *optional*): decode shapes captured as CUDA graphs (a step runs
            in the smallest bucket that fits); default powers of two up to `max_batch_size` / from 256 up to
            `max_seq_len`. Fewer buckets mean fewer captures (and compilations).
        fused (`bool`, *optional*): decode with `FusedDecoder` (4-5 Triton kernels per layer, stacked q|k|v and
            gate|up weights) instead of the `transformers` forward; defaults to `True` on CUDA when the decoder is
            supported (float or int8 weight-only projections), Triton is installed and `compile` is not asked for.
            `True` raises a `ValueError` naming the reason when it cannot (off CUDA it runs in Triton's interpreter:
            tests only).
    """

    def __init__(self, model, processor, max_batch_size=None, max_seq_len=None, cuda_graphs=None, compile=False,
                 vision_cache_size=256, preprocess_workers=4, max_prefill_tokens=8192, batch_buckets=None,
                 seq_buckets=None, fused=None):
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.vision_cache = VisionCache(vision_cache_size)
        self.runner = ModelRunner(
            self.model, processor.image_token_id, self.pad_id, self.vision_cache, max_batch_size=max_batch_size,
            max_seq_len=max_seq_len, cuda_graphs=cuda_graphs, compile=compile, batch_buckets=batch_buckets,
            seq_buckets=seq_buckets, fused=fused,
        )
        r = self.runner
        self.device, self.dtype = r.device, r.dtype
        self.max_batch_size, self.max_seq_len = r.max_batch_size, r.max_seq_len
        self.batch_buckets, self.seq_buckets = r.batch_buckets, r.seq_buckets
        self.cache, self.fused, self.stats = r.cache, r.fused, r.stats
        eos = model.generation_config.eos_token_id
        eos = eos if isinstance(eos, (list, tuple)) else [eos]
        self.eos_ids = {int(e) for e in [*eos, self.tokenizer.eos_token_id] if e is not None}
        self.token_table = TokenTable(self.tokenizer)
        self.preparer = ImagePreparer(processor, self.vision_cache, workers=preprocess_workers)
        self.intake = RequestIntake(processor, self.preparer, self.max_seq_len, self.max_batch_size)
        self.scheduler = Scheduler(self.runner, self.eos_ids, self.token_table, max_prefill_tokens)

    @property
    def cuda_graphs(self) -> bool:
        return self.runner.cuda_graphs

    @property
    def profile(self) -> bool:
        """When `True`, each admission's stages are timed (with device syncs) into `last_admission`."""
        return self.scheduler.profile

    @profile.setter
    def profile(self, value: bool) -> None:
        self.scheduler.profile = value

    @property
    def last_admission(self) -> dict:
        """Seconds from the start of the last admission to the end of its `images_s`, `prefill_s`, `total_s`."""
        return self.scheduler.last_admission

    @property
    def _slots(self) -> list:  # the sequence in each KV slot (None when free); tests check slots are freed
        return self.scheduler.slots

    # ------------------------------------------------------------------ requests
    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids of a rendered prompt, each `<image>` expanded to its placeholder run (as the processor does)."""
        return self.intake.encode_prompt(prompt)

    def render_messages(self, messages: list[dict]) -> tuple[str, list]:
        """Chat messages (parts `{"type": "image", "image": …}` / `{"type": "text", …}`) → (prompt, images)."""
        return self.intake.render_messages(messages)

    def encode_messages(self, messages: list[dict]) -> tuple[list[int], list]:
        """Chat messages → (prompt ids, images), as `submit(messages=…)` tokenizes them: text typed in a message
        (`<|im_end|>`, `<image>`) stays text, it never becomes a control token or an image marker."""
        return self.intake.encode_messages(messages)

    @property
    def max_prompt_chars(self) -> int:
        """Longer prompts (in characters) cannot fit in `max_seq_len` tokens: refused before tokenizing them."""
        return self.intake.max_prompt_chars

    def submit(self, prompt=None, images=None, messages=None, params: SamplingParams | None = None,
               prompt_ids: list[int] | None = None) -> RequestHandle:
        """Queues one request; raises `ValueError` at once for a bad prompt or image, `ContextLengthError` if too long.

        Args:
            prompt (`str`, *optional*): a rendered prompt with one `<image>` marker per image.
            images (`list`, *optional*): PIL images, bytes, data URLs or paths, in marker order.
            messages (`list[dict]`, *optional*): chat messages instead of `prompt`/`images` (their text stays text,
                see `encode_messages`).
            params (`SamplingParams`, *optional*)
            prompt_ids (`list[int]`, *optional*): already tokenized prompt (placeholders expanded) instead of `prompt`.
        """
        request = dict(prompt=prompt, images=images, messages=messages, prompt_ids=prompt_ids)
        return self.submit_many([request], params)[0]

    def submit_many(self, requests: list[dict], params: SamplingParams | None = None) -> list[RequestHandle]:
        """Queues several requests (dicts of `submit`'s arguments) at once, so they are prefilled together."""
        made = [self.intake.make(**{**r, "params": r.get("params") or params}) for r in requests]
        self.scheduler.add(made)
        return [r.handle for r in made]

    def generate(self, prompt=None, images=None, messages=None, params=None, prompt_ids=None) -> list[GenerationResult]:
        """Blocking: the `n` results of one request (arguments as for `submit`)."""
        return self.submit(prompt, images, messages, params, prompt_ids).result()

    def generate_batch(self, requests: list[dict], params=None) -> list[list[GenerationResult]]:
        """Blocking: results for several requests (dicts of `prompt`/`images`/`messages`), prefilled together."""
        return [h.result() for h in self.submit_many(requests, params)]

    def stream(self, prompt=None, images=None, messages=None, params=None):
        """Yields the text deltas of one sample as they are decoded."""
        params = params or SamplingParams()
        if params.n != 1:
            raise ValueError("stream() yields one sample; submit() and iterate the handle for n > 1")
        handle = self.submit(prompt, images, messages, params)
        try:
            for event in handle:
                if event.text:
                    yield event.text
        finally:
            handle.cancel()

    def close(self) -> None:
        """Stops the scheduler thread (running requests end with `cancelled`)."""
        self.scheduler.close()
        self.preparer.close()

    def warmup(self, batch_sizes=None, seq_lens=None) -> None:
        """Captures (and compiles) the decode graphs for these buckets now instead of at first use."""
        self.runner.warmup(batch_sizes, seq_lens)
