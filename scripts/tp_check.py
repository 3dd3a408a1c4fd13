"""Tensor-parallel check: greedy tokens of `from_pretrained(..., tp_plan="auto")` on N GPUs vs one GPU, in float32.

    python scripts/tp_check.py save DIR          # a random `small` checkpoint + one-GPU greedy tokens (DIR/ref.json)
    torchrun --nproc_per_node 2 scripts/tp_check.py tp DIR OUT.json

float32 on purpose: with random bf16 weights greedy picks are near-ties and a comparison would say nothing.
The checkpoint is loaded through `trust_remote_code`, as a user would load it.
"""

import json
import os
import sys

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

PROMPTS = ["What color is the circle?", "Describe the picture in detail."]


def _inputs(processor, device):
    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}],
                                           add_generation_prompt=True) for p in PROMPTS]
    images = [[Image.new("RGB", (224, 224), (200, 40, 40))], [Image.new("RGB", (300, 200), (20, 90, 200))]]
    batch = processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")
    return {k: v.to(device) for k, v in batch.items()}


def _greedy(model, processor, device):
    inputs = _inputs(processor, device)
    with torch.no_grad():
        logits = model(**inputs).logits[:, -1].float()
        out = model.generate(**inputs, max_new_tokens=32, min_new_tokens=32, do_sample=False)
    return out[:, inputs["input_ids"].shape[1]:].tolist(), logits


def main(argv):
    mode, folder = argv[0], argv[1]
    if mode == "save":
        import ghostvis_hf
        from ghostvis_hf.hub import save_checkpoint

        torch.manual_seed(0)
        model, processor = ghostvis_hf.create("small", dtype=torch.float32)
        save_checkpoint(model, processor, folder)
        model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
        tokens, logits = _greedy(model.to("cuda").eval(), processor, "cuda")
        torch.save(logits.cpu(), os.path.join(folder, "ref_logits.pt"))
        json.dump({"tokens": tokens}, open(os.path.join(folder, "ref.json"), "w"))
        return 0
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32,
                                                        tp_plan="auto").eval()
    tokens, logits = _greedy(model, processor, model.device)
    if int(os.environ.get("RANK", 0)) == 0:
        ref = json.load(open(os.path.join(folder, "ref.json")))["tokens"]
        ref_logits = torch.load(os.path.join(folder, "ref_logits.pt"))
        result = {
            "world_size": int(os.environ.get("WORLD_SIZE", 1)),
            "tp_size": getattr(model, "tp_size", None),
            "same_greedy_tokens": tokens == ref,
            "tokens_compared": sum(len(t) for t in ref),
            "max_abs_logit_diff": (logits.cpu() - ref_logits).abs().max().item(),
            "transformers": __import__("transformers").__version__,
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(),
        }
        print(json.dumps(result))
        json.dump(result, open(argv[2], "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
