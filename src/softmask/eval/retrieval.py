"""Image-text retrieval evaluation: ITC similarities for all pairs, the top-k candidates of every query
re-ranked by ITM, recall@k in both directions.

Fast by construction: unimodal features are computed once (text-encoder outputs cached, so only the
fusion layers run per pair), the candidate pairs of both directions are deduplicated and each is
fused once, many pairs go through one fusion pass, under ``torch.inference_mode`` and bf16 autocast
where the device supports it. In a distributed run the pairs are split across ranks and the scores
gathered.

Shapes: I images, C captions; ``text_to_image`` (C,) maps each caption to its image;
``image_to_texts`` lists each image's captions.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from softmask.config import RETRIEVAL_SCORES, describe_choices
from softmask.models.vlp import VisionLanguageModel
from softmask.train import dist

KS = (1, 5, 10)


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


def _best_rank(scores: np.ndarray, positives: np.ndarray) -> int:
    """0-based rank of the best positive among all candidates; ties count against it (a candidate
    scoring the same as the best positive is ranked above it), so a constant score vector ranks
    the positive last, not first."""
    best = scores[positives].max()
    return int((scores[~positives] >= best).sum())


def recall_at_k(i2t: np.ndarray, t2i: np.ndarray, text_to_image: np.ndarray, ks=KS) -> dict[str, float]:
    """Recall@k (in %) of both directions and their mean.

    Args:
        i2t: (I, C) scores of every caption for each image query (higher is better; -inf allowed).
        t2i: (C, I) scores of every image for each caption query.
        text_to_image: (C,) the image index of each caption; an image's captions are all positives.

    Returns:
        ``{"tr1", "tr5", "tr10", "ir1", "ir5", "ir10", "r_mean"}`` for ks = (1, 5, 10).
    """
    text_to_image = np.asarray(text_to_image)
    num_images = i2t.shape[0]
    tr_ranks = np.array([_best_rank(i2t[i], text_to_image == i) for i in range(num_images)])
    ir_ranks = np.array([_best_rank(t2i[c], np.arange(num_images) == text_to_image[c])
                         for c in range(t2i.shape[0])])
    out = {}
    for k in ks:
        out[f"tr{k}"] = 100.0 * float((tr_ranks < k).mean())
    for k in ks:
        out[f"ir{k}"] = 100.0 * float((ir_ranks < k).mean())
    out["r_mean"] = float(np.mean([out[f"tr{k}"] for k in ks] + [out[f"ir{k}"] for k in ks]))
    return out


# --------------------------------------------------------------------------------------------------
# Features and scores
# --------------------------------------------------------------------------------------------------


@dataclass
class Features:
    """Unimodal outputs kept for the re-ranking: image tokens (I, 1+N, Dv), image ITC features (I, E),
    text-encoder outputs (C, T, D) with masks (C, T), text ITC features (C, E), and for each caption the
    index of the first caption with the same tokens (C,) (itself when it is the first)."""

    image_embeds: torch.Tensor
    image_feat: torch.Tensor
    text_embeds: torch.Tensor
    text_mask: torch.Tensor
    text_feat: torch.Tensor
    text_first: torch.Tensor


def first_of_equal_rows(tokens: torch.Tensor) -> torch.Tensor:
    """(C, T) token ids -> (C,) long: for each row, the index of the first row equal to it."""
    if tokens.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=tokens.device)
    _, group = torch.unique(tokens, dim=0, return_inverse=True)
    first = torch.full((int(group.max()) + 1,), tokens.shape[0], dtype=torch.long, device=tokens.device)
    first.scatter_reduce_(0, group, torch.arange(tokens.shape[0], device=tokens.device), reduce="amin")
    return first[group]


def _autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _shard(n: int) -> slice:
    """This rank's contiguous share of n items."""
    per = -(-n // dist.world_size())
    start = dist.rank() * per
    return slice(min(start, n), min(start + per, n))


def _gather_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """Each rank's shard (padded to equal size) -> all n rows on every rank."""
    if not dist.is_distributed():
        return x
    per = -(-n // dist.world_size())
    padded = torch.zeros((per, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    return dist.all_gather(padded)[:n]


@torch.inference_mode()
def compute_features(model: VisionLanguageModel, pixels: torch.Tensor, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor, batch_size: int = 128, amp: bool = True) -> Features:
    """Encode every image and caption once (each rank its share, then gathered).

    Args:
        pixels: (I, 3, S, S) normalised images (CPU is fine; moved per batch).
        input_ids, attention_mask: (C, T) tokenised captions.
    """
    device = model.temp.device
    rows_i, rows_c = _shard(pixels.shape[0]), _shard(input_ids.shape[0])
    image_embeds, image_feat, text_embeds, text_feat = [], [], [], []
    with _autocast(device, amp):
        for start in range(rows_i.start, rows_i.stop, batch_size):
            batch = pixels[start:min(start + batch_size, rows_i.stop)].to(device)
            embeds = model.encode_image(batch)
            image_embeds.append(embeds)
            image_feat.append(model.image_feat(embeds).float())
        for start in range(rows_c.start, rows_c.stop, batch_size):
            stop = min(start + batch_size, rows_c.stop)
            ids, mask = input_ids[start:stop].to(device), attention_mask[start:stop].to(device)
            embeds = model.encode_text(ids, mask)
            text_embeds.append(embeds)
            text_feat.append(model.text_feat(embeds, mask).float())
    cat = lambda xs, like: torch.cat(xs) if xs else like  # noqa: E731 (a rank may have no rows)
    dv, d, e = model.config.vision.width, model.config.text.hidden_size, model.config.embed_dim
    tokens, length = model.visual_encoder.num_patches + 1, input_ids.shape[1]
    empty = lambda *shape, dtype=torch.float32: torch.zeros(shape, dtype=dtype, device=device)  # noqa: E731
    dtype = image_embeds[0].dtype if image_embeds else torch.float32
    return Features(
        image_embeds=_gather_rows(cat(image_embeds, empty(0, tokens, dv, dtype=dtype)), pixels.shape[0]),
        image_feat=_gather_rows(cat(image_feat, empty(0, e)), pixels.shape[0]),
        text_embeds=_gather_rows(cat(text_embeds, empty(0, length, d, dtype=dtype)), input_ids.shape[0]),
        text_mask=_gather_rows(attention_mask[rows_c].to(device), input_ids.shape[0]),
        text_feat=_gather_rows(cat(text_feat, empty(0, e)), input_ids.shape[0]),
        # Padding ids are zero wherever the mask is: equal masked ids are equal captions.
        text_first=first_of_equal_rows((input_ids * (attention_mask != 0)).to(device)),
    )


def candidate_pairs(sim: torch.Tensor, k_i2t: int, k_t2i: int) -> torch.Tensor:
    """The top-``k_i2t`` captions of every image and the top-``k_t2i`` images of every caption, as one
    deduplicated (P, 2) tensor of (image, caption) index pairs. ``sim``: (I, C) ITC similarities."""
    num_images, num_texts = sim.shape
    top_t = sim.topk(min(k_i2t, num_texts), dim=1).indices  # (I, k)
    top_i = sim.topk(min(k_t2i, num_images), dim=0).indices  # (k, C)
    pairs_i2t = torch.stack([torch.arange(num_images, device=sim.device)[:, None].expand_as(top_t), top_t], -1)
    pairs_t2i = torch.stack([top_i, torch.arange(num_texts, device=sim.device)[None, :].expand_as(top_i)], -1)
    flat = torch.cat([pairs_i2t.reshape(-1, 2), pairs_t2i.reshape(-1, 2)])
    keys = torch.unique(flat[:, 0] * num_texts + flat[:, 1])
    return torch.stack([keys // num_texts, keys % num_texts], dim=1)


@torch.inference_mode()
def itm_scores(model: VisionLanguageModel, features: Features, pairs: torch.Tensor, batch_size: int = 256,
               amp: bool = True) -> torch.Tensor:
    """The ITM match logit (P,) of each (image, caption) pair, as ALBEF ranks candidates by it. Pairs of
    one image with captions of the same tokens (``features.text_first``) are fused once."""
    canonical = torch.stack([pairs[:, 0], features.text_first.to(pairs.device)[pairs[:, 1]]], dim=1)
    distinct, back = torch.unique(canonical, dim=0, return_inverse=True)
    return _itm_scores_of(model, features, distinct, batch_size, amp)[back.to(model.temp.device)]


def _itm_scores_of(model: VisionLanguageModel, features: Features, pairs: torch.Tensor, batch_size: int,
                   amp: bool) -> torch.Tensor:
    device = model.temp.device
    rows = _shard(pairs.shape[0])
    mine = pairs[rows]
    # Shortest captions first (stable: pairs of one length stay sorted by image), each chunk cut to its
    # longest caption: padding is most of the tokens otherwise (world captions: 12 of 26 on average).
    lengths = features.text_mask.sum(1)[mine[:, 1]] if len(mine) else torch.zeros(0, dtype=torch.long)
    order = torch.argsort(lengths, stable=True)
    scores = torch.zeros(len(mine), device=device)
    with _autocast(device, amp):
        for start in range(0, len(mine), batch_size):
            picked = order[start:start + batch_size]
            chunk = mine[picked]
            # Each distinct image's keys/values are projected once per chunk.
            images, index = torch.unique(chunk[:, 0], return_inverse=True)
            txt = chunk[:, 1]
            length = int(lengths[picked].max())
            mask = features.text_mask[txt, :length]
            fused = model.fuse(features.text_embeds[txt, :length], mask, features.image_embeds[images],
                               image_index=index)
            scores[picked] = model.itm_logits(fused, mask).float()[:, 1]
    return _gather_rows(scores, pairs.shape[0])


@dataclass
class RetrievalResult:
    metrics: dict[str, float]
    i2t: np.ndarray  # (I, C) final scores
    t2i: np.ndarray  # (C, I)
    itc: np.ndarray  # (I, C) ITC similarities


def evaluate_retrieval(model: VisionLanguageModel, pixels: torch.Tensor, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor, text_to_image, k: int = 128, score: str = "itm",
                       batch_size: int = 256, amp: bool = True) -> RetrievalResult:
    """Zero-shot or fine-tuned retrieval: ITC for all pairs, then each query's top-k re-ranked by ITM.

    Args:
        k: candidates per query (the paper: 128 Flickr30K, 256 COCO).
        score: "itm" (the ITM match logit alone decides among the candidates, as ALBEF's evaluation code
            does: it computes the candidates' ITC similarities and never uses them) or "itm+itc" (the match
            logit plus the ITC cosine similarity, a later rule: BLIP's).
    Non-candidates score -inf, so they rank below every candidate.
    """
    if score not in RETRIEVAL_SCORES:
        raise ValueError(f"score must be {describe_choices(RETRIEVAL_SCORES)}, got '{score}'")
    model.eval()
    features = compute_features(model, pixels, input_ids, attention_mask, batch_size, amp)
    sim = features.image_feat @ features.text_feat.T  # (I, C), cosine similarities
    pairs = candidate_pairs(sim, k, k)
    match = itm_scores(model, features, pairs, batch_size, amp)
    values = match + (sim[pairs[:, 0], pairs[:, 1]] if score == "itm+itc" else 0.0)
    num_images, num_texts = sim.shape
    in_i2t = torch.zeros_like(sim, dtype=torch.bool)
    in_i2t.scatter_(1, sim.topk(min(k, num_texts), dim=1).indices, True)
    in_t2i = torch.zeros_like(sim, dtype=torch.bool)
    in_t2i.scatter_(0, sim.topk(min(k, num_images), dim=0).indices, True)
    full = torch.full_like(sim, float("-inf"))
    full[pairs[:, 0], pairs[:, 1]] = values
    i2t = torch.where(in_i2t, full, torch.tensor(float("-inf"), device=sim.device))
    t2i = torch.where(in_t2i, full, torch.tensor(float("-inf"), device=sim.device)).T
    i2t, t2i = i2t.cpu().numpy(), t2i.cpu().numpy()
    metrics = recall_at_k(i2t, t2i, np.asarray(text_to_image))
    return RetrievalResult(metrics, i2t, t2i, sim.cpu().numpy())
