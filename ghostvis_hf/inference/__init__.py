"""Fast generation for GhostVis: `GenerationEngine` (continuous batching, CUDA graphs, streaming, image cache)."""

from .engine import ContextLengthError, GenerationEngine, GenerationResult, RequestHandle, StreamEvent
from .loader import load_model
from .sampling import SamplingParams

__all__ = [
    "ContextLengthError",
    "GenerationEngine",
    "GenerationResult",
    "RequestHandle",
    "SamplingParams",
    "StreamEvent",
    "load_model",
]
