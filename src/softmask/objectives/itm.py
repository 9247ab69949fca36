"""Image-text matching (ITM) with in-batch hard negatives, as in ALBEF, made robust.

ALBEF samples, for each image, one negative text with probability ``softmax(sim_i2t)`` over the
batch (the positive set to 0) and, for each text, one negative image from ``softmax(sim_t2i)``.
The reference code crashes on a batch of one, on NaN similarities and when every weight
underflows; :func:`sample_hard_negatives` never does, and reports rows it cannot serve.

Hard-negative mining has two halves. This module holds *the draw* (:func:`sample_hard_negatives`), the
labels (:func:`itm_labels`) and the loss (:func:`itm_loss`), as pure functions. *Where the negatives
come from* (which similarities and temperature, this process's batch or the global one, which pairs are
never negatives, fetching the chosen tokens across ranks) and which pairs ITM scores is
:class:`softmask.tasks.contrastive.ContrastiveObjective` (``hard_negatives``, ``itm_pairs``, ``score_pairs``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _sampling_weights(sim: torch.Tensor, allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ready for ``torch.multinomial`` and which rows have any allowed entry.

    Args:
        sim: (B, B) similarities (any float dtype, NaN/inf allowed).
        allowed: (B, B) bool, the entries that may be drawn.

    Returns:
        ``(weights (B, B) float32, has_any (B,) bool)``: the softmax over the allowed entries; where
        that is not finite or sums to 0, uniform over the allowed entries; where nothing is allowed,
        a one-hot on the diagonal (a placeholder the caller marks invalid).
    """
    masked = sim.float().masked_fill(~allowed, float("-inf"))
    weights = F.softmax(masked, dim=1).masked_fill(~allowed, 0.0)
    good = torch.isfinite(weights).all(dim=1) & (weights.sum(dim=1) > 0)
    uniform = allowed.float()
    weights = torch.where(good.unsqueeze(1), weights, uniform)
    has_any = allowed.any(dim=1)
    eye = torch.eye(sim.shape[0], dtype=torch.float32, device=sim.device)
    weights = torch.where(has_any.unsqueeze(1), weights, eye)
    return weights, has_any


def sample_hard_negatives(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, generator: torch.Generator | None = None,
                          exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw one hard negative text per image and one hard negative image per text.

    Args:
        sim_i2t: (B, B) image-to-text similarities within the batch (row: image, column: text),
            e.g. the first B columns of the ITC similarities. NaN/inf allowed.
        sim_t2i: (B, B) text-to-image similarities (row: text, column: image).
        generator: a ``torch.Generator`` on the similarities' device for reproducible draws; None
            uses the global RNG.
        exclude: (B, B) bool, ``exclude[i, j]`` = the pair (image i, text j) must not be a negative
            (identical captions, same image id). It masks ``sim_i2t`` as given and ``sim_t2i``
            transposed; the diagonal is always excluded.

    Returns:
        ``(neg_text_idx (B,), neg_image_idx (B,), valid (B,) bool)``, all on the similarities'
        device: image i is paired with text ``neg_text_idx[i]`` and text i with image
        ``neg_image_idx[i]``. Each row samples from the softmax over its allowed entries; if that is
        not finite (NaN/inf similarities) or sums to 0, uniformly over the allowed entries. Row i
        is valid when both of its directions have an allowed entry (always the same for a symmetric
        ``exclude``); an invalid row's indices are ``i`` itself and the caller drops that row (a
        batch of one has no valid row).

    Computed under no_grad, vectorised (one ``torch.multinomial`` call on the stacked rows).
    """
    if sim_i2t.dim() != 2 or sim_i2t.shape[0] != sim_i2t.shape[1] or sim_t2i.shape != sim_i2t.shape:
        raise ValueError("sample_hard_negatives expects square (B, B) sim_i2t and sim_t2i of the same shape, "
                         f"got {tuple(sim_i2t.shape)} and {tuple(sim_t2i.shape)}")
    batch = sim_i2t.shape[0]
    device = sim_i2t.device
    if exclude is not None and exclude.shape != sim_i2t.shape:
        raise ValueError(f"exclude must be ({batch}, {batch}) bool, got {tuple(exclude.shape)}")
    with torch.no_grad():
        rows = torch.arange(batch, device=device)
        if batch == 0:
            empty = rows.clone()
            return empty, empty.clone(), torch.zeros(0, dtype=torch.bool, device=device)
        allowed_i2t = ~torch.eye(batch, dtype=torch.bool, device=device)
        if exclude is not None:
            allowed_i2t = allowed_i2t & ~exclude.to(device=device, dtype=torch.bool)
        allowed_t2i = allowed_i2t.t()
        w_i2t, ok_i2t = _sampling_weights(sim_i2t.detach(), allowed_i2t)
        w_t2i, ok_t2i = _sampling_weights(sim_t2i.detach(), allowed_t2i)
        drawn = torch.multinomial(torch.cat([w_i2t, w_t2i]), 1, generator=generator).squeeze(1)
        valid = ok_i2t & ok_t2i
        neg_text_idx = torch.where(valid, drawn[:batch], rows)
        neg_image_idx = torch.where(valid, drawn[batch:], rows)
    return neg_text_idx, neg_image_idx, valid


def itm_labels(num_pos: int, num_neg: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(num_pos + num_neg,) long: ``num_pos`` ones (match) then ``num_neg`` zeros (no match)."""
    return torch.cat([torch.ones(num_pos, dtype=torch.long, device=device),
                      torch.zeros(num_neg, dtype=torch.long, device=device)])


def itm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the ITM head, float32 also under autocast.

    Args:
        logits: (M, 2) [no-match, match] logits of all pairs (positives, negatives, extra positives).
        labels: (M,) long, 1 = match, 0 = no match (see :func:`itm_labels`).

    Returns:
        A float32 scalar (mean over the M pairs).
    """
    with torch.autocast(device_type=logits.device.type, enabled=False):
        return F.cross_entropy(logits.float(), labels)


def pad_to(x: torch.Tensor, length: int) -> torch.Tensor:
    """(B, T) -> (B, length) with zeros on the right."""
    return F.pad(x, (0, length - x.shape[1])) if x.shape[1] < length else x


def identical_rows(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) ids and mask -> (B, B) bool: captions with the same tokens (duplicates are not negatives)."""
    ids = ids * mask
    return (ids[:, None, :] == ids[None, :, :]).all(-1)
