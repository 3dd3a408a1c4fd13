"""Dataset-level metrics for `ghostvis eval`."""

from .metrics import caption_scores, exact_match, relaxed_accuracy, vqa_accuracy


__all__ = ["caption_scores", "exact_match", "relaxed_accuracy", "vqa_accuracy"]
