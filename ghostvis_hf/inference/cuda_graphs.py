"""Capture-once, replay-many CUDA graphs keyed by shape, for the engine's decode step, prefill and vision encoder.

On the machines this was measured on, launching one eager kernel costs 30-50 µs of Python and driver time; a decode
step of a 28-layer decoder is ~400 kernels, so eager decoding is launch-bound by 10x. A graph replays them all
with one launch. (`torch.compile(mode="reduce-overhead")` does the same with its own buffer management; capturing
ourselves keeps the inputs in buffers the engine owns, so admitting a request between steps never re-records.)
"""

import logging

import torch

logger = logging.getLogger(__name__)


class GraphCache:
    """Runs `fn(*key)` through one CUDA graph per key, captured at first use.

    `fn` must read its inputs from and write its side effects to tensors that outlive the graph (static buffers).
    Warm-up runs before capture execute `fn` for real; tensors listed in `state` are restored afterwards, so warm-up
    does not advance, e.g., decode positions.

    Args:
        fn (`Callable`): the work to capture; returns the output (tensors, or a tuple/list of tensors).
        state (`list[torch.Tensor]`, *optional*): tensors `fn` updates in place that warm-up must leave unchanged.
        name (`str`, *optional*): for log messages.
        capture (`bool`, *optional*, defaults to `True`): `False` just calls `fn` (CPU runs of the same code path).
    """

    def __init__(self, fn, state=(), name: str = "graph", capture: bool = True):
        self.fn, self.state, self.name, self.capture = fn, list(state), name, capture
        self.graphs: dict[tuple, tuple] = {}
        self.pool = None  # one memory pool per cache: its outputs are consumed before the next replay

    def __contains__(self, key) -> bool:
        return key in self.graphs

    def __call__(self, *key):
        if not self.capture:
            return self.fn(*key)
        if key not in self.graphs:
            self.graphs[key] = self._capture(key)
        graph, out = self.graphs[key]
        graph.replay()
        return out

    def _capture(self, key: tuple):
        saved = [t.clone() for t in self.state]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # also where torch.compile compiles, and cuBLAS picks its kernels
                self.fn(*key)
        torch.cuda.current_stream().wait_stream(stream)
        for t, s in zip(self.state, saved):
            t.copy_(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.fn(*key)
        if self.pool is None:
            self.pool = graph.pool()
        logger.debug("captured %s %s", self.name, key)
        return graph, out
