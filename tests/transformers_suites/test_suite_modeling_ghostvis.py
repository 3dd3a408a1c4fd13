"""transformers' own model suites (ModelTesterMixin, ConfigTester) run on a tiny GhostVis, as for an in-tree model.

The suites are fetched from the transformers sdist matching the installed version (see `conftest.py`); the tester
follows `tests/models/llava/test_modeling_llava.py`: Qwen2 decoder + SigLIP vision tower, both resampler variants
that compress the patch grid (perceiver, avgpool) and the one that keeps it (none).
"""

import copy
import unittest
from unittest import mock

import torch
from transformers.models.auto import modeling_auto
from transformers_tests.generation.test_utils import GenerationTesterMixin
from transformers_tests.test_configuration_common import ConfigTester
from transformers_tests.test_modeling_common import ModelTesterMixin, floats_tensor, ids_tensor

from ghostvis_hf import GhostVisConfig, GhostVisForConditionalGeneration, GhostVisModel

TEXT_CONFIG = {
    "model_type": "qwen2",
    "vocab_size": 99,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 37,
    "hidden_act": "silu",
    "max_position_embeddings": 512,
    "initializer_range": 0.02,
    "pad_token_id": 1,
    "bos_token_id": 2,
    "eos_token_id": 2,
}
VISION_CONFIG = {
    "model_type": "siglip_vision_model",
    "image_size": 8,
    "patch_size": 2,
    "num_channels": 3,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 37,
    "vision_use_head": False,
    "initializer_range": 0.02,
}


class GhostVisModelTester:
    def __init__(self, parent, resampler_type="perceiver", num_image_tokens=4, seq_length=7, batch_size=3):
        self.parent = parent
        self.resampler_type = resampler_type
        self.num_image_tokens = num_image_tokens
        self.batch_size = batch_size
        self.image_token_id = 0
        self.pad_token_id = TEXT_CONFIG["pad_token_id"]
        self.vocab_size = TEXT_CONFIG["vocab_size"]
        self.hidden_size = TEXT_CONFIG["hidden_size"]
        self.num_hidden_layers = TEXT_CONFIG["num_hidden_layers"]
        self.num_attention_heads = TEXT_CONFIG["num_attention_heads"]
        self.is_training = True
        self.text_config = TEXT_CONFIG  # as llava's tester: the suites read sizes from these dicts
        self.vision_config = VISION_CONFIG  # (e.g. the image encoder's layer count)
        self.image_seq_length = self.get_config().image_seq_length
        self.seq_length = seq_length + self.image_seq_length
        self.encoder_seq_length = self.seq_length

    def get_config(self):
        return GhostVisConfig(
            text_config=copy.deepcopy(TEXT_CONFIG),
            vision_config=copy.deepcopy(VISION_CONFIG),
            resampler_type=self.resampler_type,
            num_image_tokens=self.num_image_tokens,
            resampler_depth=1,
            resampler_heads=4,
            resampler_mlp_ratio=2,
            image_token_id=self.image_token_id,
        )

    def prepare_config_and_inputs(self):
        size = VISION_CONFIG["image_size"]
        pixel_values = floats_tensor([self.batch_size, VISION_CONFIG["num_channels"], size, size])
        return self.get_config(), pixel_values

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values = self.prepare_config_and_inputs()
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size - 2) + 2
        input_ids[input_ids == self.image_token_id] = self.pad_token_id
        input_ids[:, : self.image_seq_length] = self.image_token_id  # one image per row, at the start
        attention_mask = torch.ones(input_ids.shape, dtype=torch.long, device=input_ids.device)
        return config, {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}


class _GhostVisSuite(ModelTesterMixin, GenerationTesterMixin):
    """The common model tests; a subclass per resampler variant picks the tester."""

    all_model_classes = (GhostVisModel, GhostVisForConditionalGeneration)
    _is_composite = True
    resampler_type = "perceiver"
    num_image_tokens = 4

    def setUp(self):
        # The suites decide what a class is (base model without a head, causal LM that takes labels) by looking its
        # name up in transformers' auto-class name tables, where in-tree models are listed; list GhostVis there as
        # its config's `auto_map` registers it (AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText).
        for table, name in (
            (modeling_auto.MODEL_MAPPING_NAMES, "GhostVisModel"),
            (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "GhostVisForConditionalGeneration"),
            (modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, "GhostVisForConditionalGeneration"),
        ):
            patcher = mock.patch.dict(table, {"ghostvis": name})
            patcher.start()
            self.addCleanup(patcher.stop)
        self.model_tester = GhostVisModelTester(self, self.resampler_type, self.num_image_tokens)
        self.config_tester = ConfigTester(
            self, config_class=GhostVisConfig, has_text_modality=False,
            common_properties=["image_token_id", "vision_feature_layer", "image_seq_length"],
        )

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_mismatching_num_image_tokens(self):
        """More placeholders than image features (or the reverse) is refused with a message naming both counts."""
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config).eval()
            model(**inputs)
            with self.assertRaisesRegex(ValueError, "placeholder tokens"):
                model(**{**inputs, "pixel_values": inputs["pixel_values"][-1:]})
            ids = torch.cat([inputs["input_ids"][:1]] * 2)
            with self.assertRaisesRegex(ValueError, "placeholder tokens"):
                model(input_ids=ids, pixel_values=inputs["pixel_values"][:1])
            model(input_ids=ids, pixel_values=torch.cat([inputs["pixel_values"][:1]] * 2))


class GhostVisPerceiverModelTest(_GhostVisSuite, unittest.TestCase):
    resampler_type = "perceiver"


class GhostVisAvgPoolModelTest(_GhostVisSuite, unittest.TestCase):
    resampler_type = "avgpool"


class GhostVisNoResamplerModelTest(_GhostVisSuite, unittest.TestCase):
    resampler_type = "none"
