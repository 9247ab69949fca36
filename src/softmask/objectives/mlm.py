"""Masked language modelling (MLM) with momentum distillation, as in ALBEF (BERT's 80/10/10 rule)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from softmask.objectives.itc import float32_log_softmax, soft_cross_entropy

IGNORE_INDEX = -100  # label of tokens that were not chosen (F.cross_entropy's ignore_index)


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, vocab_size: int, special_ids: Sequence[int],
                probability: float, generator: torch.Generator | None = None,
                mask_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose tokens for MLM and corrupt them with BERT's 80/10/10 rule.

    Each real token (``attention_mask != 0`` and id not in ``special_ids``) is chosen independently
    with ``probability``. Of the chosen, 80% become ``mask_id``, 10% a random id and 10% stay
    unchanged. The random id is uniform over the whole vocabulary ``[0, vocab_size)``, nothing
    excluded (as BERT and ALBEF do): it may be a special token, ``mask_id`` or the original id.

    Args:
        input_ids: (B, T) long token ids; not modified.
        attention_mask: (B, T), 1 (or any non-zero) = token, 0 = padding (never chosen).
        vocab_size: size of the vocabulary for the random replacements.
        special_ids: ids never chosen, e.g. ``[CLS]``, ``[SEP]``, ``[PAD]`` (may be empty).
        probability: chance that a real token is chosen, e.g. 0.15.
        generator: a ``torch.Generator`` on ``input_ids``' device for reproducible masks; None uses
            the global RNG. The number of draws does not depend on the content, so the same
            generator state and shapes give the same masks.
        mask_id: the ``[MASK]`` id (required; it may be passed by keyword or as the 7th argument).

    Returns:
        ``(masked_ids (B, T) long, labels (B, T) long)``: labels hold the original id where a token
        was chosen and -100 elsewhere.
    """
    if mask_id is None:
        raise TypeError("mask_tokens() needs mask_id, the [MASK] token id")
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability must be in [0, 1], got {probability}")
    device = input_ids.device
    shape = input_ids.shape
    eligible = attention_mask.to(device) != 0
    if len(special_ids):
        specials = torch.as_tensor(list(special_ids), dtype=input_ids.dtype, device=device)
        eligible = eligible & ~torch.isin(input_ids, specials)
    chosen = (torch.rand(shape, generator=generator, device=device) < probability) & eligible
    action = torch.rand(shape, generator=generator, device=device)
    random_ids = torch.randint(vocab_size, shape, generator=generator, device=device, dtype=input_ids.dtype)
    to_mask = chosen & (action < 0.8)
    to_random = chosen & (action >= 0.8) & (action < 0.9)
    masked_ids = torch.where(to_mask, torch.full_like(input_ids, mask_id), input_ids)
    masked_ids = torch.where(to_random, random_ids, masked_ids)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return masked_ids, labels


def mlm_loss(logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor | None = None,
             alpha: float = 0.0) -> torch.Tensor:
    """MLM loss on the masked positions, optionally distilled from a momentum teacher (ALBEF).

    Args:
        logits: (M, V) student logits of the M chosen positions only (the caller selects them, e.g.
            ``fused[labels != -100]``, before the vocabulary projection).
        targets: (M,) long original ids of those positions (no -100 entries).
        teacher_logits: (M, V) momentum-model logits at the same positions, or None. Detached here.
        alpha: distillation weight: ``(1 - alpha) * CE + alpha * soft_CE(softmax(teacher_logits))``.
            ``alpha == 0`` ignores the teacher and ``alpha == 1`` the hard targets, exactly.

    Returns:
        A float32 scalar (mean over the M positions). With M = 0 a zero that stays in the graph
        (``logits.sum() * 0``), not NaN.
    """
    if logits.shape[0] == 0:
        return logits.float().sum() * 0.0
    alpha = float(alpha)
    use_teacher = teacher_logits is not None and alpha != 0.0
    if use_teacher and alpha == 1.0:
        return _distill(logits, teacher_logits)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        ce = F.cross_entropy(logits.float(), targets)
    if not use_teacher:
        return ce
    return (1.0 - alpha) * ce + alpha * _distill(logits, teacher_logits)


def _distill(logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Soft cross-entropy of (M, V) student logits against softmax of (M, V) teacher logits."""
    soft = float32_log_softmax(teacher_logits.detach(), dim=-1).exp()
    return soft_cross_entropy(logits, soft)
