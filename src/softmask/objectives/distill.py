"""Momentum (EMA) copies of a model, the teachers of ALBEF's momentum distillation."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from softmask.objectives.itc import soft_cross_entropy


def momentum_copy(model: nn.Module) -> nn.Module:
    """A frozen deep copy of ``model`` (no parameter requires a gradient)."""
    target = copy.deepcopy(model)
    for param in target.parameters():
        param.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(online: nn.Module, target: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * online, parameter by parameter (in one multi-tensor
    call per operation: the same arithmetic, element by element, as a loop over the parameters). Frozen
    online parameters (no gradient) are skipped: they never change, so neither do their copies (the update
    would otherwise drift them by float rounding)."""
    pairs = [(p_online, p_target) for p_online, p_target in zip(online.parameters(), target.parameters(), strict=True)
             if p_online.requires_grad]
    if not pairs:
        return
    targets = [p_target for _, p_target in pairs]
    torch._foreach_mul_(targets, momentum)
    torch._foreach_add_(targets, [p_online.detach() for p_online, _ in pairs], alpha=1.0 - momentum)


def distilled_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None = None,
                            alpha: float = 0.0) -> torch.Tensor:
    """Float32 cross-entropy of (B, C) logits against (B,) long labels; with ``teacher_logits`` (B, C)
    and ``alpha > 0``: ``(1 - alpha) * CE(labels) + alpha * CE(softmax(teacher))`` (ALBEF's distillation)."""
    with torch.autocast(device_type=logits.device.type, enabled=False):
        hard = F.cross_entropy(logits.float(), labels)
        if teacher_logits is None or alpha == 0.0:
            return hard
        soft = F.softmax(teacher_logits.detach().float(), dim=-1)
        return (1.0 - alpha) * hard + alpha * soft_cross_entropy(logits, soft)
