"""Document functions of the `ghostvis_shapes` lmms-eval task (ghostvis_shapes.yaml.in).

The prompt is the one `ghostvis eval` renders for a shapes row (the image, then the question, in one user turn), and
a prediction is scored with GhostVis's own exact match, so both tools score the same way.

NOTE: importing `ghostvis_hf` registers its classes with the Auto classes, which then win over a checkpoint's own code.
lmms-eval 0.7.3 imports this file after it has built the model and processor (checked: the checkpoint's
`transformers_modules` were loaded and `ghostvis_hf` was not), so they stay the checkpoint's own.
"""

from ghostvis_hf.evaluation import exact_match


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def doc_to_messages(doc, lmms_eval_specific_kwargs=None):
    return [{"role": "user", "content": [{"type": "image", "url": doc["image"].convert("RGB")},
                                         {"type": "text", "text": doc["question"]}]}]


def doc_to_target(doc):
    return doc["answers"][0]


def process_results(doc, results):
    # `ghostvis eval` strips its decoded answers; lmms-eval's `huggingface` model does not.
    return {"ghostvis_exact_match": exact_match([results[0].strip()], [list(doc["answers"])])}
