"""Text-driven soft masks (Park & Han, CVPR 2023), as pure functions.

Word-conditional Grad-CAM of the ITM match logit with respect to one fusion layer's cross-attention,
one word per pair, min-max normalisation, the supplement's half-compensation, and the soft mask
applied to the image tokens. Shapes: B pairs, H heads, T text tokens, N image patches ([CLS] excluded),
V vocabulary size, D width of the image tokens.

The pipeline, in a training step (``attn`` the kept cross-attention, ``grad`` its gradient)::

    token_maps = gradcam_maps(attn, grad)            # or attention_maps(attn) for the ablation
    word_maps, has_word, chosen = choose_words(token_maps, clean_ids, seen_ids, attention_mask,
                                               continuation, special_ids, mask_id, generator)
    mask = make_soft_mask(word_maps, ratio)          # (B, N), detached, rows sum to (1 - ratio) * N
    masked = apply_soft_mask(image_embeds, mask)     # keep the pairs where has_word is True
"""

from __future__ import annotations

import torch


def gradcam_maps(attn: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Word-conditional Grad-CAM: mean over heads of ``attn * max(0, grad)`` on the patch columns.

    Args:
        attn: (B, H, T, 1 + N) cross-attention probabilities (after softmax) of one fusion layer.
        grad: (B, H, T, 1 + N) gradient of the (summed) ITM match logit with respect to ``attn``.

    Returns:
        (B, T, N): one map over the patches per text token.
    """
    return (attn[..., 1:] * grad[..., 1:].clamp(min=0)).mean(dim=1)


def attention_maps(attn: torch.Tensor) -> torch.Tensor:
    """The ablation of the supplement's Table 9: the cross-attention itself, mean over heads.

    (B, H, T, 1 + N) -> (B, T, N)."""
    return attn[..., 1:].mean(dim=1)


# --------------------------------------------------------------------------------------------------
# Words: WordPiece segmentation and the random choice of one word per pair
# --------------------------------------------------------------------------------------------------


def _real_tokens(clean_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids) -> torch.Tensor:
    """(B, T) bool: attended tokens whose id is not one of ``special_ids``."""
    special = torch.as_tensor(list(special_ids), dtype=clean_ids.dtype, device=clean_ids.device)
    return attention_mask.to(clean_ids.device).bool() & ~torch.isin(clean_ids, special)


def word_ids(clean_ids: torch.Tensor, attention_mask: torch.Tensor, continuation: torch.Tensor,
             special_ids) -> torch.Tensor:
    """The word number of every token, from WordPiece continuation marks.

    A real token (attended, id not in ``special_ids``) starts a new word unless it is a continuation
    piece (``##...``); a continuation piece belongs to the word of the last real token before it
    (special tokens in between are skipped). A continuation piece with no real token before it in its
    row starts word 0 (it cannot come out of the tokenizer, but ids edited by hand must not break
    this). Special tokens and padding get -1.

    Args:
        clean_ids: (B, T) long token ids (the caption before any MLM masking).
        attention_mask: (B, T) 1/True for tokens, 0/False for padding.
        continuation: (V,) bool from :func:`softmask.data.text.continuation_table` (moved to the ids' device).
        special_ids: the ids that are never words, e.g. [CLS], [SEP], [PAD].

    Returns:
        (B, T) long: 0, 1, 2, ... along each row for its words, -1 elsewhere.
    """
    real = _real_tokens(clean_ids, attention_mask, special_ids)
    piece = continuation.to(clean_ids.device)[clean_ids]
    first_real = real & (real.long().cumsum(dim=1) == 1)
    starts = real & (~piece | first_real)
    ids = starts.long().cumsum(dim=1) - 1
    return ids.masked_fill(~real, -1)


def choose_words(token_maps: torch.Tensor, clean_ids: torch.Tensor, seen_ids: torch.Tensor,
                 attention_mask: torch.Tensor, continuation: torch.Tensor, special_ids, mask_id: int,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pick one word per pair uniformly at random and average its tokens' maps.

    Words are segmented on ``clean_ids`` (see :func:`word_ids`). A token is *usable* when it belongs
    to a word and the model did not see it as [MASK] (``seen_ids != mask_id``; a token replaced by a
    random id or left unchanged by MLM stays usable). A word is eligible when at least one of its
    tokens is usable; each pair's word is drawn uniformly among its eligible words, and its map is
    the mean of the maps of its usable tokens (so a word split into several WordPiece tokens counts
    once). Vectorised over the batch; the draw consumes exactly one ``torch.rand((B, T))`` from
    ``generator`` (on the ids' device), so it is deterministic given the generator state.

    Args:
        token_maps: (B, T, N) one map over the N patches per text token (e.g. :func:`gradcam_maps`).
        clean_ids: (B, T) long ids of the caption before MLM masking.
        seen_ids: (B, T) long ids the model actually saw (MLM-masked or equal to ``clean_ids``).
        attention_mask: (B, T) 1/True for tokens, 0/False for padding.
        continuation: (V,) bool from :func:`softmask.data.text.continuation_table`.
        special_ids: ids that are never words ([CLS], [SEP], [PAD], ...).
        mask_id: the [MASK] id.
        generator: a ``torch.Generator`` on the ids' device, or None for the global generator.

    Returns:
        ``(word_maps, has_word, chosen)``: (B, N) the chosen word's map (dtype of ``token_maps``;
        zeros where there is no word), (B,) bool whether the pair had an eligible word, (B, T) bool
        the usable tokens of the chosen word (all False without a word). Maps of other tokens never
        leak in, even when they hold NaN.
    """
    batch, length = clean_ids.shape
    device = clean_ids.device
    words = word_ids(clean_ids, attention_mask, continuation, special_ids)
    usable = (words >= 0) & (seen_ids.to(device) != mask_id)
    # Scatter the usable tokens onto their word slots; slot `length` collects everything else.
    slot = torch.where(usable, words, torch.full_like(words, length))
    usable_per_word = torch.zeros(batch, length + 1, dtype=torch.long, device=device)
    usable_per_word.scatter_add_(1, slot, torch.ones_like(slot))
    eligible = usable_per_word[:, :length] > 0
    has_word = eligible.any(dim=1)
    scores = torch.rand((batch, length), generator=generator, device=device)
    word = scores.masked_fill(~eligible, -1.0).argmax(dim=1) if length else torch.zeros_like(has_word).long()
    chosen = usable & (words == word.unsqueeze(1)) & has_word.unsqueeze(1)
    picked = token_maps.masked_fill(~chosen.unsqueeze(-1), 0).sum(dim=1)
    count = chosen.sum(dim=1, keepdim=True).clamp_min(1).to(token_maps.dtype)
    return picked / count, has_word, chosen


# --------------------------------------------------------------------------------------------------
# From a word's map to the soft mask
# --------------------------------------------------------------------------------------------------


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each row to [0, 1]; a constant row (all zeros included) or a row holding
    NaN becomes all zeros. (B, N) -> (B, N), same dtype."""
    low = maps.amin(dim=-1, keepdim=True)
    span = maps.amax(dim=-1, keepdim=True) - low
    varies = span > 0  # False for constant rows and for NaN
    scaled = (maps - low) / torch.where(varies, span, torch.ones_like(span))
    return torch.where(varies, scaled.clamp(0, 1), torch.zeros_like(maps))


def _work_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float64 for the compensation's sums, except on devices without it (MPS)."""
    return torch.float32 if tensor.device.type == "mps" else torch.float64


def half_compensate(g: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    """The supplement's compensation: masked weights ``w = clip(c * g, 0, 1)`` summing to ``ratio * N``.

    For each row, ``c > 0`` is found exactly by water-filling on the sorted row ``s_0 >= s_1 >= ...``:
    with the top k entries saturated, ``c_k = (R - k) / sum_{i >= k} s_i`` (R = ratio * N), and the
    answer is the smallest k with ``c_k * s_k <= 1`` (then ``c_k * s_{k-1} >= 1`` follows, so the
    clip is consistent). Where even saturating every non-zero entry cannot reach R (at most R
    non-zero entries, e.g. a one-hot or an all-zero row), the non-zero entries become 1 and the
    remainder ``R - nnz`` is spread evenly over the zero entries. Every row then sums to R, values
    lie in [0, 1], and ``g_i >= g_j`` implies ``w_i >= w_j`` (ties stay tied). The sums are done in
    float64 (float32 on MPS) and the result is cast back.

    Args:
        g: (B, N) non-negative maps, e.g. from :func:`normalize_maps`; negative entries are read as 0
            and NaN as 0.
        ratio: in [0, 1]; the share of the patches' total weight that is masked.

    Returns:
        (B, N) weights in [0, 1], dtype of ``g``, each row summing to ``ratio * N``.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"half_compensate: ratio must be in [0, 1], got {ratio}")
    if g.shape[-1] == 0 or g.numel() == 0:
        return g.clone()
    x = torch.nan_to_num(g.to(_work_dtype(g)), nan=0.0).clamp_min(0)
    n = x.shape[-1]
    budget = ratio * n
    s = x.sort(dim=-1, descending=True).values
    tail = s.flip(-1).cumsum(dim=-1).flip(-1)  # tail[k] = sum_{i >= k} s_i, without cancellation
    k = torch.arange(n, device=x.device, dtype=x.dtype)
    # (R - k) * s_k <= tail_k is c_k * s_k <= 1 without the division; k <= R keeps c_k >= 0.
    fits = ((budget - k) * s <= tail) & (k <= budget)
    first = torch.where(fits, k, torch.full_like(k, n)).amin(dim=-1, keepdim=True).clamp(max=n - 1)
    scale = (budget - first) / tail.gather(-1, first.long()).clamp_min(torch.finfo(x.dtype).tiny)
    exact = (scale * x).clamp(0, 1)
    nonzero = x > 0
    nnz = nonzero.sum(dim=-1, keepdim=True).to(x.dtype)
    fill = ((budget - nnz) / (n - nnz).clamp_min(1)).clamp(0, 1)
    spread = torch.where(nonzero, torch.ones_like(x), fill.expand_as(x))
    return torch.where(nnz <= budget, spread, exact).to(g.dtype)


def make_soft_mask(word_maps: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    """The soft mask ``m = 1 - half_compensate(normalize_maps(word_maps), ratio)``, detached.

    Args:
        word_maps: (B, N) one map per pair (from :func:`choose_words`).
        ratio: the compensation ratio (``softmask.ratio``); each row of ``m`` sums to ``(1 - ratio) * N``.

    Returns:
        (B, N) in [0, 1], dtype of ``word_maps``, without a graph (``requires_grad`` False). A pair
        without a word (a zero map) gets the uniform mask ``1 - ratio``: drop it with ``has_word``.
    """
    with torch.no_grad():
        return 1 - half_compensate(normalize_maps(word_maps.detach()), ratio)


def apply_soft_mask(image_embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Soft-masked image tokens ``[v_cls, m_1 v_1, ..., m_N v_N]``.

    Args:
        image_embeds: (B, 1 + N, D) image encoder output ([CLS] first).
        mask: (B, N) soft mask; it is detached here, so no gradient ever reaches it.

    Returns:
        (B, 1 + N, D), dtype of ``image_embeds``; gradients flow to ``image_embeds`` only.
    """
    batch, tokens = image_embeds.shape[:2]
    if mask.shape != (batch, tokens - 1):
        raise ValueError(f"apply_soft_mask: mask of shape {tuple(mask.shape)} does not fit image tokens "
                         f"{tuple(image_embeds.shape)} (expected ({batch}, {tokens - 1}))")
    weights = mask.detach().to(device=image_embeds.device, dtype=image_embeds.dtype).unsqueeze(-1)
    return torch.cat([image_embeds[:, :1], image_embeds[:, 1:] * weights], dim=1)
