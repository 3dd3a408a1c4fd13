"""Dataset-level metrics for `ghostvis eval`."""

from .metrics import METRICS, anls, caption_scores, exact_match, relaxed_accuracy, vqa_accuracy


__all__ = ["METRICS", "anls", "caption_scores", "exact_match", "relaxed_accuracy", "vqa_accuracy"]
