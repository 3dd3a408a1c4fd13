"""Stand-in for transformers' `tests/generation/test_utils.py`, which the transformers sdist does not ship.

`test_modeling_common.py` imports `GenerationTesterMixin` from here; it checks that a tester of a model that can
`generate` inherits the mixin (`test_generation_tester_mixin_inheritance`) and uses `_check_caches_are_equal` when
present. The generation behaviours the real mixin checks (greedy / sampling / beam search with and without cache,
left padding, static cache, assisted decoding, `inputs_embeds`, compile) are GhostVis's own tests in
`tests/test_modeling.py`.
"""

import torch


class GenerationTesterMixin:
    def _check_caches_are_equal(self, cache1, cache2):
        """Both caches hold the same keys and values, layer by layer."""
        self.assertEqual(len(cache1.layers), len(cache2.layers))
        self.assertGreater(cache1.get_seq_length(), 0)
        for layer1, layer2 in zip(cache1.layers, cache2.layers):
            torch.testing.assert_close(layer1.keys, layer2.keys)
            torch.testing.assert_close(layer1.values, layer2.values)
