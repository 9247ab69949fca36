"""Image-text contrastive loss (ITC) with momentum distillation, as in ALBEF.

Shapes: B batch, E embedding size, K = B + queue length candidates (the batch's own momentum
features first, then the queue, so the positive of row i is column i in pretraining).

Usage in a training step (momentum features ``*_m``, queues of momentum features)::

    image_all = torch.cat([image_feat_m, image_queue.all()])          # (K, E)
    text_all = torch.cat([text_feat_m, text_queue.all()])             # (K, E)
    sim_i2t, sim_t2i = similarities(image_feat, text_feat, image_all, text_all, temp)
    with torch.no_grad():
        sim_i2t_m, sim_t2i_m = similarities(image_feat_m, text_feat_m, image_all, text_all, temp)
    pos = one_hot_positives(B, K, device)          # or id_positives(ids, all_ids) for retrieval
    t_i2t, t_t2i = itc_targets(sim_i2t_m, sim_t2i_m, pos, alpha)
    loss = itc_loss(sim_i2t, sim_t2i, t_i2t, t_t2i)

The temperature is clamped to [0.001, 0.5] by the caller (ALBEF clamps the parameter in place).

The focal variant (SoftMask) is :func:`focal_itc_loss` / :func:`focal_soft_cross_entropy`, computing
``-sum_j y_j (1 - p_j)^gamma log p_j``; with ``gamma == 0`` they call :func:`itc_loss` /
:func:`soft_cross_entropy` themselves, so they equal ALBEF's loss bit for bit::

    loss = focal_itc_loss(sim_i2t, sim_t2i, t_i2t, t_t2i, cfg.itc.gamma, cfg.itc.focal, positives=pos)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from softmask.config.choices import FOCAL_TERMS, describe_choices


def float32_log_softmax(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``log_softmax`` computed in float32 with autocast disabled; same shape as ``logits``."""
    with torch.autocast(device_type=logits.device.type, enabled=False):
        return F.log_softmax(logits.float(), dim=dim)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft targets: mean over rows of ``-sum_j target_j * log_softmax_j``.

    Args:
        logits: (N, C) scores (any float dtype; the math is float32).
        targets: (N, C) target distributions (rows summing to 1; not differentiated through when
            they come from a no_grad computation).

    Returns:
        A float32 scalar. With one-hot targets it equals ``F.cross_entropy``.
    """
    log_p = float32_log_softmax(logits, dim=-1)
    return -(targets.float() * log_p).sum(dim=-1).mean()


def similarities(image_feat: torch.Tensor, text_feat: torch.Tensor, image_all: torch.Tensor,
                 text_all: torch.Tensor, temp: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled cosine similarities against all candidates.

    Args:
        image_feat: (B, E) L2-normalised image features (online or momentum model).
        text_feat: (B, E) L2-normalised text features.
        image_all: (K, E) candidate image features (momentum batch + image queue).
        text_all: (K, E) candidate text features (momentum batch + text queue).
        temp: the temperature, a float or a 0-dim tensor (a learnable one keeps its gradient).

    Returns:
        ``(sim_i2t, sim_t2i)``, both (B, K): ``image_feat @ text_all.T / temp`` and
        ``text_feat @ image_all.T / temp``.
    """
    sim_i2t = image_feat @ text_all.t() / temp
    sim_t2i = text_feat @ image_all.t() / temp
    return sim_i2t, sim_t2i


def one_hot_positives(batch: int, total: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(batch, total) float32 with ones on the diagonal of the first ``batch`` columns (pretraining:
    row i's positive is the batch's own momentum feature i). Needs ``total >= batch``."""
    if total < batch:
        raise ValueError(f"one_hot_positives needs total >= batch, got total={total}, batch={batch}")
    pos = torch.zeros(batch, total, device=device)
    idx = torch.arange(batch, device=device)
    pos[idx, idx] = 1.0
    return pos


def id_positives(ids: torch.Tensor, all_ids: torch.Tensor) -> torch.Tensor:
    """(B, K) float32: 1 where ``ids[i] == all_ids[j]`` (same image id: several positives per row,
    e.g. the five COCO captions of one image in retrieval fine-tuning).

    Args:
        ids: (B,) long ids of the batch.
        all_ids: (K,) long ids of the candidates (the batch's ids first, then the queue's; never
            written queue slots hold -1 and match nothing when real ids are non-negative).
    """
    return (ids.reshape(-1, 1) == all_ids.reshape(1, -1)).float()


def itc_targets(sim_i2t_m: torch.Tensor, sim_t2i_m: torch.Tensor, positives: torch.Tensor,
                alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Momentum-distillation targets ``alpha * softmax(sim_m) + (1 - alpha) * positives / row sum``.

    Args:
        sim_i2t_m: (B, K) image-to-text similarities of the momentum model.
        sim_t2i_m: (B, K) text-to-image similarities of the momentum model.
        positives: (B, K) float or bool, non-zero at each row's positives (one-hot on the diagonal
            in pretraining, several per row with :func:`id_positives`). The same matrix serves both
            directions (it is symmetric in meaning: image i and text i share the id). A row without
            any positive contributes only the ``alpha`` part (it does not produce NaN).
        alpha: distillation weight in [0, 1]; ``alpha == 0`` returns the normalised positives
            exactly, without looking at the similarities.

    Returns:
        ``(targets_i2t, targets_t2i)``, both (B, K) float32, detached, rows summing to 1.
    """
    alpha = float(alpha)
    with torch.no_grad():
        pos = positives.detach().float()
        pos = pos / pos.sum(dim=1, keepdim=True).clamp_min(1e-12)
        if alpha == 0.0:
            return pos, pos.clone()
        targets = []
        for sim in (sim_i2t_m, sim_t2i_m):
            with torch.autocast(device_type=sim.device.type, enabled=False):
                soft = F.softmax(sim.detach().float(), dim=1)
            targets.append(soft if alpha == 1.0 else alpha * soft + (1.0 - alpha) * pos)
        return targets[0], targets[1]


def itc_loss(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, targets_i2t: torch.Tensor,
             targets_t2i: torch.Tensor) -> torch.Tensor:
    """ITC loss ``(CE_i2t + CE_t2i) / 2`` with soft targets (float32, also under autocast).

    Args:
        sim_i2t: (B, K) image-to-text similarities of the online model (from :func:`similarities`).
        sim_t2i: (B, K) text-to-image similarities.
        targets_i2t: (B, K) targets from :func:`itc_targets` (or one-hot positives).
        targets_t2i: (B, K).

    Returns:
        A float32 scalar; ``CE = mean over rows of -sum_j target_j * log_softmax(sim)_j``.
    """
    return (soft_cross_entropy(sim_i2t, targets_i2t) + soft_cross_entropy(sim_t2i, targets_t2i)) / 2


def _check_focal(gamma: float, mode: str) -> float:
    """``gamma`` as a float after checking it and ``mode``; a ValueError names the bad argument."""
    gamma = float(gamma)
    if not gamma >= 0:
        raise ValueError(f"focal loss: gamma must be >= 0, got {gamma}")
    if mode not in FOCAL_TERMS:
        raise ValueError(f"focal loss: mode must be {describe_choices(FOCAL_TERMS)}, got '{mode}'")
    return gamma


def focal_soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, gamma: float, mode: str = "all",
                             positives: torch.Tensor | None = None) -> torch.Tensor:
    """Focal cross-entropy against soft targets: mean over rows of ``-sum_j y_j f_j log p_j``.

    ``p = softmax(logits)`` in float32 (autocast disabled). The focal factor is
    ``f_j = (1 - p_j)^gamma`` at every column with ``mode="all"``; with ``mode="positive"`` it applies
    only where ``positives`` is non-zero and ``f_j = 1`` elsewhere (so the distillation mass on the
    negatives keeps its plain cross-entropy). The factor is *not* detached: as in the focal loss of
    Lin et al. (2017), the gradient flows through ``(1 - p_j)^gamma`` too. ``1 - p_j`` is computed as
    ``-expm1(log p_j)`` and floored at 1e-12, so the gradient stays finite for any ``gamma >= 0``
    even when a row is saturated.

    Args:
        logits: (N, C) scores (any float dtype).
        targets: (N, C) target distributions (e.g. from :func:`itc_targets`).
        gamma: focusing parameter >= 0; ``gamma == 0`` returns :func:`soft_cross_entropy` exactly
            (``positives`` is then not needed).
        mode: ``"all"`` or ``"positive"`` (the config's ``itc.focal``).
        positives: (N, C) bool or float, non-zero at each row's positives (the matrix given to
            :func:`itc_targets`); required with ``mode="positive"``, ignored with ``mode="all"``.

    Returns:
        A float32 scalar.
    """
    gamma = _check_focal(gamma, mode)
    if gamma == 0.0:
        return soft_cross_entropy(logits, targets)
    if mode == "positive" and positives is None:
        raise ValueError("focal loss: mode='positive' needs the positives matrix")
    log_p = float32_log_softmax(logits, dim=-1)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        factor = (-torch.expm1(log_p)).clamp_min(1e-12).pow(gamma)
        if mode == "positive":
            factor = torch.where(positives.to(device=factor.device) != 0, factor, torch.ones_like(factor))
        return -(targets.float() * factor * log_p).sum(dim=-1).mean()


def focal_itc_loss(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, targets_i2t: torch.Tensor,
                   targets_t2i: torch.Tensor, gamma: float, mode: str = "all",
                   positives: torch.Tensor | None = None) -> torch.Tensor:
    """Focal ITC ``-1/2 E[sum_j y_j (1 - p_j)^gamma log p_j]`` over both directions (SoftMask).

    Args:
        sim_i2t: (B, K) image-to-text similarities of the online model.
        sim_t2i: (B, K) text-to-image similarities.
        targets_i2t: (B, K) targets from :func:`itc_targets`.
        targets_t2i: (B, K).
        gamma: focusing parameter >= 0 (``itc.gamma``); ``gamma == 0`` returns :func:`itc_loss`
            exactly.
        mode: ``"all"`` (the factor on every column) or ``"positive"`` (only on the positives).
        positives: (B, K) non-zero at the positives, the same matrix for both directions (as in
            :func:`itc_targets`); required with ``mode="positive"``.

    Returns:
        A float32 scalar; see :func:`focal_soft_cross_entropy` for the details.
    """
    if _check_focal(gamma, mode) == 0.0:
        return itc_loss(sim_i2t, sim_t2i, targets_i2t, targets_t2i)
    return (focal_soft_cross_entropy(sim_i2t, targets_i2t, gamma, mode, positives)
            + focal_soft_cross_entropy(sim_t2i, targets_t2i, gamma, mode, positives)) / 2
