"""GhostVis-HF: a Hugging Face-native vision-language model (config, model, processor registered with the Auto
classes), its TRL training recipes, and fast serving."""

from . import quantization  # noqa: F401  first: quiets bitsandbytes' import-time CPU "kernels" warning (see there)
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .compose import compose
from .configuration_ghostvis import GhostVisConfig
from .modeling_ghostvis import GhostVisForConditionalGeneration, GhostVisModel, GhostVisPreTrainedModel
from .processing_ghostvis import GhostVisProcessor
from .presets import PRESETS, create

__version__ = "0.1.0"

AutoConfig.register("ghostvis", GhostVisConfig, exist_ok=True)
AutoModel.register(GhostVisConfig, GhostVisModel, exist_ok=True)
AutoModelForCausalLM.register(GhostVisConfig, GhostVisForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(GhostVisConfig, GhostVisForConditionalGeneration, exist_ok=True)
AutoProcessor.register(GhostVisConfig, GhostVisProcessor, exist_ok=True)
# save_pretrained copies the modeling/configuration/processing files next to the weights (trust_remote_code).
GhostVisConfig.register_for_auto_class()
GhostVisModel.register_for_auto_class("AutoModel")
GhostVisForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
GhostVisProcessor.register_for_auto_class("AutoProcessor")


__all__ = [
    "GhostVisConfig",
    "GhostVisModel",
    "GhostVisPreTrainedModel",
    "GhostVisForConditionalGeneration",
    "GhostVisProcessor",
    "PRESETS",
    "create",
    "compose",
]
