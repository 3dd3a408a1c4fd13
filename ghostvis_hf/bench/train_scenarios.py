"""The workloads `ghostvis bench train` times (see its docstring): the stock LLaVA model of GhostVis's shapes, the
FLOPs of one step, and the batches of the `fixed` and `mix` scenarios, all deterministic from `--seed`.
"""

import math
import random

import torch


# ---------------------------------------------------------------- model


def build_stock(gv_config, device):
    """`LlavaForConditionalGeneration` with GhostVis's vision/text configs: SigLIP features of the last layer,
    all patches (no CLS to drop), the 2-layer GELU projector, random weights."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    vc = gv_config.vision_config
    n_patches = (vc.image_size // vc.patch_size) ** 2
    config = LlavaConfig(
        vision_config=vc.to_dict(), text_config=gv_config.text_config.to_dict(),
        image_token_index=gv_config.image_token_id, image_seq_length=n_patches, projector_hidden_act="gelu",
        vision_feature_select_strategy="full", vision_feature_layer=-1,
        tie_word_embeddings=gv_config.text_config.tie_word_embeddings,
    )
    with torch.device(device):
        model = LlavaForConditionalGeneration(config)
    return model.train(), n_patches


def _numel(p) -> int:
    """A parameter's full size, also when DeepSpeed ZeRO-3 has partitioned it away (`ds_numel`; its `numel()` is 0
    then: the 7b ZeRO-3 run of 2026-11-30 logged 0.6 % MFU before this)."""
    return getattr(p, "ds_numel", None) or p.numel()


def _param_counts(model, kind):
    """Parameter counts for the FLOP formula: (text matmul params incl. head, vision, glue)."""
    inner = model.model
    text, vision = inner.language_model, inner.vision_tower
    emb = text.get_input_embeddings().weight
    head = model.lm_head.weight
    n_text = sum(_numel(p) for p in text.parameters()) - _numel(emb) + _numel(head)  # tied: head counted once
    n_vision = sum(_numel(p) for p in vision.parameters())
    glue = [inner.multi_modal_projector] + ([inner.resampler] if kind == "ghostvis" else [])
    n_glue = sum(_numel(p) for m in glue for p in m.parameters())
    return n_text, n_vision, n_glue


def flop_coefficients(model, kind, n_patches) -> dict:
    """The formula in `bench.train`'s docstring as three coefficients: FLOPs of a step =
    `token` * sum(s) + `token_sq` * sum(s^2) over sequences + `image` * images (also used by the recipes' speed log,
    `training.throughput`)."""
    tc, vc = model.config.text_config, model.config.vision_config
    n_text, n_vision, n_glue = _param_counts(model, kind)
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    return {
        "token": 6 * n_text,
        "token_sq": 12 * tc.num_hidden_layers * tc.num_attention_heads * head_dim,
        "image": 6 * (n_vision + n_glue) * n_patches + 12 * vc.num_hidden_layers * vc.hidden_size * n_patches**2,
    }


def step_flops(model, kind, seq_lens, n_images, n_patches):
    """FLOPs of one training step on sequences of `seq_lens` tokens, by the formula in `bench.train`'s docstring."""
    c = flop_coefficients(model, kind, n_patches)
    return c["token"] * sum(seq_lens) + c["token_sq"] * sum(s * s for s in seq_lens) + c["image"] * n_images


# ---------------------------------------------------------------- batches


def _ids(rng, n, vocab):
    return torch.randint(100, vocab - 100, (n,), generator=rng)


def _sample(kind, cfg, length, rng, n_patches):
    """One conversation of `length` tokens (this model's own length) with one image near the start."""
    from ghostvis_hf.processing_ghostvis import image_placeholder_run

    ids = _ids(rng, length, cfg.text_config.vocab_size)
    if kind == "ghostvis":
        run = image_placeholder_run(cfg.image_token_id, cfg.image_seq_length, cfg.vision_start_token_id,
                                    cfg.vision_end_token_id)
    else:
        run = [cfg.image_token_id] * n_patches
    ids[1 : 1 + len(run)] = torch.tensor(run)
    labels = ids.clone()
    labels[1 : 1 + len(run)] = -100
    return {"input_ids": ids, "labels": labels}


def _padded(samples, pixel, pad_id):
    """TRL-style: right padding to the longest, attention_mask, labels -100 at the padding."""
    n = max(len(s["input_ids"]) for s in samples)
    pad = lambda x, v: torch.nn.functional.pad(x, (0, n - len(x)), value=v)  # noqa: E731
    return {
        "input_ids": torch.stack([pad(s["input_ids"], pad_id) for s in samples]),
        "labels": torch.stack([pad(s["labels"], -100) for s in samples]),
        "attention_mask": torch.stack([pad(torch.ones_like(s["input_ids"]), 0) for s in samples]),
        "pixel_values": pixel.expand(len(samples), -1, -1, -1).clone(),
        "_real": sum(len(s["input_ids"]) for s in samples), "_seq": [len(s["input_ids"]) for s in samples],
        "_convs": len(samples),
    }


def _packed(samples, pixel, pad_id, max_length, padding_free=False):
    from ghostvis_hf.training.packing import pack_samples

    batch = pack_samples(samples, max_length, pad_id, padding_free=padding_free)
    batch["pixel_values"] = pixel.expand(len(samples), -1, -1, -1).clone()
    batch["_real"] = batch.pop("num_real_tokens")
    batch.pop("num_slots")
    batch["_seq"] = [len(s["input_ids"]) for s in samples]
    batch["_convs"] = len(samples)
    return batch


def _mix_lengths(args, n, seed):
    rnd = random.Random(seed)
    return [min(args.seq, max(100, round(rnd.lognormvariate(math.log(args.mix_median), args.mix_sigma))))
            for _ in range(n)]


def fixed_batches(kind, cfg, args, n_patches, pixel, pad_id, n):
    """Scenario `fixed`: `n` batches of `args.batch` conversations of `args.seq` tokens, one image each."""
    rng = torch.Generator().manual_seed(args.seed)
    out = []
    for _ in range(n):
        samples = [_sample(kind, cfg, args.seq, rng, n_patches) for _ in range(args.batch)]
        out.append(_padded(samples, pixel, pad_id))
    return out


def _mix_samples(kind, cfg, args, n_patches, lengths):
    rng = torch.Generator().manual_seed(args.seed + 1)
    extra = n_patches - (cfg.image_seq_length + 2) if kind == "stock" else 0  # LLaVA: 729 tokens per image
    return [_sample(kind, cfg, n + extra, rng, n_patches) for n in lengths]


def mix_runs(kind, cfg, args, n_patches, pixel, pad_id):
    """Batches for the mix: padded groups of `batch`; for GhostVis also BFD-packed rows and packed groups."""
    n_steps = args.warmup + args.steps
    lengths = _mix_lengths(args, 4000, args.seed)
    samples = _mix_samples(kind, cfg, args, n_patches, lengths[: n_steps * args.batch])
    groups = [samples[i * args.batch : (i + 1) * args.batch] for i in range(n_steps)]
    runs = {"padded": [_padded(g, pixel, pad_id) for g in groups]}
    if kind == "ghostvis":
        from ghostvis_hf.training.packing import best_fit_decreasing

        runs["packed_b"] = [_packed(g, pixel, pad_id, args.seq, padding_free=True) for g in groups]
        # token budget per step = batch rows x seq: BFD over a long stream, bins shuffled (BFD emits long bins first)
        stream = _mix_samples(kind, cfg, args, n_patches, lengths)
        bins = best_fit_decreasing([len(s["input_ids"]) for s in stream], args.seq)
        random.Random(args.seed).shuffle(bins)
        steps = [bins[i * args.batch : (i + 1) * args.batch] for i in range(n_steps)]
        runs["packed_rows"] = [
            _packed([stream[j] for b in step for j in b], pixel, pad_id, args.seq) for step in steps
        ]
    return runs

