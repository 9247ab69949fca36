"""The base of every objective trained with a momentum (EMA) teacher, as ALBEF trains them all."""

from __future__ import annotations

import torch
from torch import nn

from softmask.config import Config
from softmask.objectives.distill import ema_update, momentum_copy
from softmask.train.schedule import ramped_alpha


class DistilledObjective(nn.Module):
    """``cfg``, the trained ``model``, its frozen momentum copy (None with ``momentum=False``) and the
    distillation ramp. The training loop calls :meth:`momentum_update` once after every optimiser step
    (never inside ``forward``: with gradient accumulation that would move it once per micro-batch).
    ``train.frozen_image_layers`` is applied here, before the copy."""

    def __init__(self, cfg: Config, model: nn.Module, alpha_warmup_steps: int, momentum: bool = True):
        super().__init__()
        if cfg.train.frozen_image_layers:
            model.visual_encoder.freeze_lowest(cfg.train.frozen_image_layers)
        self.cfg = cfg
        self.model = model
        self.momentum_model = momentum_copy(model) if momentum else None
        self.alpha_warmup_steps = max(1, alpha_warmup_steps)

    def alpha(self, step: int) -> float:
        """Distillation weight ``distill.alpha``, ramped linearly from 0 over ``alpha_warmup_steps`` (ALBEF:
        the first epoch)."""
        return ramped_alpha(self.cfg.distill.alpha, step, self.alpha_warmup_steps)

    @torch.no_grad()
    def momentum_update(self) -> None:
        """momentum <- ``distill.momentum`` * momentum + (1 - ``distill.momentum``) * online."""
        if self.momentum_model is not None:
            ema_update(self.model, self.momentum_model, self.cfg.distill.momentum)
