"""The ITM shortcut of soft-masked positives: does soft-masking an image, by itself, make the matching head
call a pair a match?

Soft masks as positives only (the paper's reading) pair every masked image with its own caption and the
label "match", so a head can learn to recognise a masked image instead of a matching pair. The measure:
for test images ``i`` and a caption ``j`` of another image (a mismatched pair), the soft mask of image
``i`` is made exactly as in training, from the model's own word Grad-CAM for one word of image ``i``'s
own caption (fusion layer ``softmask.layer``, a word drawn at random, normalised and half-compensated
with ``softmask.ratio``, applied to the image tokens or to the patch embeddings as ``softmask.apply_to``
says), and

    itm_shortcut = mean over the pairs of  P_match(masked image i, caption j) - P_match(image i, caption j)

A head that matches pairs scores near 0 (masking half of an image does not make a wrong caption right);
a head that learned the shortcut scores near 1. Shapes: P pairs, T tokens, N patches, Dv image width.
"""

from __future__ import annotations

import random

import torch

from softmask.config import SoftMaskConfig
from softmask.objectives.softmask import (
    apply_soft_mask,
    attention_maps,
    choose_words,
    gradcam_maps,
    make_soft_mask,
)


def soft_masked_image_tokens(model, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                             soft: SoftMaskConfig, layer: int, tables: dict, mask_id: int,
                             generator: torch.Generator | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The model's soft-masked view of each image, its mask drawn from a word of its own caption.

    Args:
        model: a VisionLanguageModel in eval mode.
        pixels: (P, 3, S, S) normalised images; ids/mask: (P, T) their own captions.
        soft: the run's ``softmask`` section (``mask_source``, ``ratio``, ``apply_to``).
        layer: the fusion layer whose cross-attention makes the maps.
        tables: the tokenizer's ``word_tables()`` (``special_ids``, ``continuation``).
        mask_id: the [MASK] id (no caption token is [MASK] here, so every word is eligible).

    Returns:
        ``(image_embeds, masked_embeds, has_word)``: (P, 1 + N, Dv) the plain and the soft-masked image
        tokens, and (P,) bool whether the caption had a word (rows without one keep a uniform mask).
    """
    with torch.no_grad():
        image_embeds = model.encode_image(pixels)
        text_embeds = model.encode_text(ids, mask)
    with torch.enable_grad():  # the fusion input requires grad so that the attention is in a graph
        fused, attn = model.fuse(text_embeds.detach().requires_grad_(True), mask, image_embeds,
                                 attention_layer=layer)
        if soft.mask_source == "gradcam":
            (grad,) = torch.autograd.grad(model.itm_logits(fused, mask)[:, 1].sum(), attn)
            token_maps = gradcam_maps(attn.detach(), grad)
        else:
            token_maps = attention_maps(attn.detach())
    with torch.no_grad():
        continuation = tables["continuation"].to(ids.device)
        word_maps, has_word, _ = choose_words(token_maps.float(), ids, ids, mask, continuation,
                                              sorted(tables["special_ids"]), mask_id, generator)
        weights = make_soft_mask(word_maps, soft.ratio)
        if soft.apply_to == "features":
            masked = apply_soft_mask(image_embeds, weights)
        else:
            masked = model.encode_image(pixels, patch_scale=weights)
    return image_embeds, masked, has_word


@torch.no_grad()
def match_probability(model, image_embeds: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(P,) ITM match probability of P pairs of image tokens (P, 1 + N, Dv) and captions (P, T)."""
    fused = model.fuse(model.encode_text(ids, mask), mask, image_embeds)
    return model.itm_logits(fused, mask).float().softmax(-1)[:, 1]


def itm_shortcut(model, enc, test: list[dict], soft: SoftMaskConfig, layer: int, pairs: int = 200,
                 batch_size: int = 50, seed: int = 0) -> dict[str, float]:
    """The shortcut measure of the module docstring on the first ``pairs`` test images (each with its first
    caption; the mismatched caption is the first caption of another image drawn with ``seed``).

    Args:
        model: a VisionLanguageModel in eval mode; enc: a :class:`softmask.eval.world.WorldEncoder`.
        test: the world's retrieval_test.json records; soft, layer: as :func:`soft_masked_image_tokens`.

    Returns:
        ``itm_shortcut`` (in [-1, 1]) and its two terms ``itm_mismatched_masked`` and ``itm_mismatched``
        (mean match probabilities), ``itm_masked_own`` (the soft-masked image with its own caption: what
        training labels a match) and ``itm_shortcut_pairs`` (pairs with a word, those averaged).
    """
    if pairs < 1:
        raise ValueError(f"itm_shortcut needs at least one pair, got {pairs}")
    rng = random.Random(seed)
    records = test[:pairs]
    if len(records) < 2:
        raise ValueError("itm_shortcut needs at least two test images")
    others = [rng.choice([j for j in range(len(records)) if j != i]) for i in range(len(records))]
    generator = torch.Generator().manual_seed(seed)
    tables, mask_id = enc.tokenizer.word_tables(), enc.tokenizer.special["mask"]
    sums = {"itm_mismatched_masked": 0.0, "itm_mismatched": 0.0, "itm_masked_own": 0.0}
    count = 0
    for start in range(0, len(records), batch_size):
        rows = range(start, min(start + batch_size, len(records)))
        pixels = enc.pixels([records[i]["image"] for i in rows])
        ids, mask = enc.text([records[i]["caption"][0] for i in rows])
        plain, masked, has_word = soft_masked_image_tokens(model, pixels, ids, mask, soft, layer, tables, mask_id,
                                                           generator)
        other_ids, other_mask = enc.text([records[others[i]]["caption"][0] for i in rows])
        keep = has_word.cpu()
        terms = {"itm_mismatched_masked": match_probability(model, masked, other_ids, other_mask),
                 "itm_mismatched": match_probability(model, plain, other_ids, other_mask),
                 "itm_masked_own": match_probability(model, masked, ids, mask)}
        for key, values in terms.items():
            sums[key] += float(values.cpu()[keep].sum())
        count += int(keep.sum())
    out = {key: value / max(1, count) for key, value in sums.items()}
    out["itm_shortcut"] = out["itm_mismatched_masked"] - out["itm_mismatched"]
    out["itm_shortcut_pairs"] = float(count)
    return out
