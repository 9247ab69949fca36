"""Learning-rate schedule and optimiser parameter groups."""

from __future__ import annotations

import math

import torch
from torch import nn

from softmask.config import TrainConfig

NO_DECAY_NAMES = ("pos_embed", "cls_token", "temp")
# Modules whose parameters train.cross_attention_lr_scale applies to.
CROSS_ATTENTION_NAMES = ("cross_attn", "cross_norm", "itm_head")


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warm-up from ``lr_start`` to ``lr_peak`` over ``warmup_steps``, then cosine decay to
    ``lr_end`` at ``total_steps`` (the paper: 2e-5 -> 2e-4 over 1,000 iterations -> 2e-5)."""
    if step < cfg.warmup_steps:
        return cfg.lr_start + (cfg.lr_peak - cfg.lr_start) * step / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr_end + (cfg.lr_peak - cfg.lr_end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(module: nn.Module, weight_decay: float, cross_attention_lr_scale: float = 1.0) -> list[dict]:
    """AdamW groups: weight decay on weight matrices only; none on biases, norms, embeddings of
    position/[CLS] and the temperature. With ``cross_attention_lr_scale`` != 1 the parameters named in
    :data:`CROSS_ATTENTION_NAMES` get their own groups whose ``lr_scale`` the loop multiplies the rate by."""
    # (no decay?, scaled?) -> parameters, in the order of the returned groups
    groups: dict[tuple[bool, bool], list] = {(nd, s): [] for s in (False, True) for nd in (False, True)}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or name.endswith(".bias") or name.split(".")[-1] in NO_DECAY_NAMES
        scaled = cross_attention_lr_scale != 1.0 and any(part in name.split(".") for part in CROSS_ATTENTION_NAMES)
        groups[no_decay, scaled].append(param)
    return [{"params": params, "weight_decay": 0.0 if no_decay else weight_decay,
             "lr_scale": cross_attention_lr_scale if scaled else 1.0}
            for (no_decay, scaled), params in groups.items() if params or not scaled]


def make_optimizer(module: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` at ``lr_start``; with ``cfg.fused_optimizer`` its fused kernel (one
    pass over each parameter and its moments instead of one per operation: the same update up to float
    rounding) where every trainable parameter is a floating-point tensor on a CPU or CUDA device."""
    groups = param_groups(module, cfg.weight_decay, cfg.cross_attention_lr_scale)
    params = [p for group in groups for p in group["params"]]
    fused = cfg.fused_optimizer and bool(params) and all(
        p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr_start, fused=fused or None)


def total_steps_for(cfg, batches_per_epoch: int | None) -> int:
    """Optimiser steps of a run: ``train.max_steps`` when > 0, else ``train.epochs`` epochs."""
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    if batches_per_epoch is None:
        raise ValueError("train.max_steps must be set for data of unknown length (webdataset shards)")
    return cfg.train.epochs * max(1, batches_per_epoch // cfg.train.grad_accum)


def alpha_warmup_steps(cfg, batches_per_epoch: int | None) -> int:
    """Steps over which the distillation weight ramps up: ``distill.alpha_warmup_steps``, else one epoch
    of optimiser steps (ALBEF), else (data of unknown length) the whole run."""
    per_epoch = batches_per_epoch // cfg.train.grad_accum if batches_per_epoch else 0
    return max(1, cfg.distill.alpha_warmup_steps or per_epoch or total_steps_for(cfg, batches_per_epoch))


def ramped_alpha(alpha: float, step: int, warmup_steps: int) -> float:
    """The distillation weight at ``step``: ``alpha`` ramped linearly from 0 over ``warmup_steps`` (ALBEF)."""
    return alpha * min(1.0, step / max(1, warmup_steps))
