"""Word-level Grad-CAM of the ITM match logit for one image-caption pair: one map over the image
patches per word of the caption (the same maps that make the paper's soft masks, see
:mod:`softmask.objectives.softmask`), the sentence map (their mean) and the ITM match probability.
Used by ``softmask evaluate world`` (grounding), ``softmask gradcam`` and the report's figures
(:mod:`softmask.viz.gradcam`).

Shapes: T text tokens, N = g * g image patches, W words.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

import torch

from softmask.config import MAP_SOURCES, describe_choices
from softmask.objectives.softmask import attention_maps, gradcam_maps, word_ids

CONTINUATION_PREFIX = "##"


# --------------------------------------------------------------------------------------------------
# Tokens -> words
# --------------------------------------------------------------------------------------------------


def group_words(input_ids: torch.Tensor, attention_mask: torch.Tensor, continuation: torch.Tensor,
                special_ids: Collection[int], vocab: Sequence[str]) -> tuple[list[str], list[list[int]]]:
    """Merge the WordPiece pieces of one caption back into words, with the segmentation the soft masks
    use in training (:func:`softmask.objectives.softmask.word_ids`).

    Args:
        input_ids: (T,) token ids; attention_mask: (T,), 1 = token, 0 = padding.
        continuation: (V,) bool from :func:`softmask.data.text.continuation_table`.
        special_ids: ids that are never words ([CLS], [SEP], [PAD]).
        vocab: V piece strings, ``vocab[id]`` (see :func:`vocab_strings`).

    Returns:
        (words, positions): W words (pieces joined, ``##`` removed), and each word's token positions.
    """
    numbers = word_ids(input_ids.cpu()[None], attention_mask.cpu()[None], continuation.cpu(), special_ids)[0]
    words: list[str] = []
    positions: list[list[int]] = []
    for t, (token, number) in enumerate(zip(input_ids.tolist(), numbers.tolist(), strict=True)):
        if number < 0:
            continue
        piece = vocab[token] if 0 <= token < len(vocab) else "[UNK]"
        piece = piece[len(CONTINUATION_PREFIX):] if piece.startswith(CONTINUATION_PREFIX) else piece
        if number == len(words):
            words.append(piece)
            positions.append([t])
        else:
            words[number] += piece
            positions[number].append(t)
    return words, positions


# --------------------------------------------------------------------------------------------------
# Maps


def word_gradcam(model, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int,
                 source: str = "gradcam", *, special_ids: Collection[int], continuation: torch.Tensor,
                 vocab: Sequence[str]) -> dict:
    """Per-word maps of one image-caption pair.

    Grad-CAM (``source="gradcam"``): the fusion encoder's cross-attention ``attn`` of fusion layer
    ``layer`` and the gradient of the ITM match logit with respect to it (``torch.autograd.grad``; no
    parameter gradient is computed or stored) give :func:`~softmask.objectives.softmask.gradcam_maps`.
    In the last fusion layer only the [CLS] row reaches the ITM head, so there every word's Grad-CAM
    map is zero. ``source="attention"`` uses the cross-attention itself
    (:func:`~softmask.objectives.softmask.attention_maps`). A word's map is the mean of its pieces' maps.

    Args:
        model: a :class:`~softmask.models.vlp.VisionLanguageModel`, on any device; run in eval mode
            (its training/eval mode is restored afterwards).
        pixels: (1, 3, S, S) normalised image.
        input_ids: (1, T) token ids; attention_mask: (1, T), 1 = token, 0 = padding.
        layer: fusion-layer index (0-based within the fusion encoder).
        source: ``"gradcam"`` or ``"attention"``.
        special_ids: ids that are not caption words ([CLS], [SEP], [PAD]).
        continuation: (V,) bool, True for WordPiece continuation pieces (``##...``), from
            :func:`softmask.data.text.continuation_table`.
        vocab: V piece strings, ``vocab[id]`` (see :func:`vocab_strings`).

    Returns:
        ``{"words": list of W str, "maps": (W, g, g) float32 CPU tensor, >= 0, "sentence_map": (g, g)
        mean of the word maps, "itm_prob": float, softmax of the ITM logits for the match class,
        "itc_sim": float, the cosine of the pair's ITC image and text features,
        "layer": int, "source": str}``.
    """
    if source not in MAP_SOURCES:
        raise ValueError(f"source must be {describe_choices(MAP_SOURCES)}, got '{source}'")
    if pixels.dim() != 4 or pixels.shape[0] != 1 or input_ids.shape[0] != 1:
        raise ValueError(f"word_gradcam takes one pair: pixels (1, 3, S, S) and input_ids (1, T), got "
                         f"{tuple(pixels.shape)} and {tuple(input_ids.shape)}")
    words, positions = group_words(input_ids[0], attention_mask[0], continuation, special_ids, vocab)
    if not words:
        raise ValueError("the caption has no words (only special tokens)")

    device = next(model.parameters()).device
    pixels, input_ids, attention_mask = pixels.to(device), input_ids.to(device), attention_mask.to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            image_embeds = model.encode_image(pixels)
            text_embeds = model.encode_text(input_ids, attention_mask)
            itc_sim = float((model.image_feat(image_embeds) * model.text_feat(text_embeds, attention_mask)).sum())
        with torch.enable_grad():
            # The fusion input requires grad, so the attention is in a graph even for frozen parameters;
            # autograd.grad below differentiates only with respect to the attention.
            text_embeds = text_embeds.detach().requires_grad_(True)
            fused, attn = model.fuse(text_embeds, attention_mask, image_embeds.detach(), attention_layer=layer)
            logits = model.itm_logits(fused, attention_mask)  # (1, 2)
            if source == "gradcam":
                (grad,) = torch.autograd.grad(logits[:, 1].sum(), attn)
                token_maps = gradcam_maps(attn.detach(), grad)  # (1, T, N)
            else:
                token_maps = attention_maps(attn.detach())
    finally:
        model.train(was_training)

    token_maps = token_maps[0].float().cpu()  # (T, N)
    side = math.isqrt(token_maps.shape[1])
    if side * side != token_maps.shape[1]:
        raise ValueError(f"{token_maps.shape[1]} image patches do not form a square grid")
    maps = torch.stack([token_maps[p].mean(0) for p in positions]).view(len(words), side, side)
    return {
        "words": words,
        "maps": maps,
        "sentence_map": maps.mean(0),
        "itm_prob": float(logits.detach().float().softmax(-1)[0, 1]),
        "itc_sim": itc_sim,
        "layer": layer,
        "source": source,
    }
