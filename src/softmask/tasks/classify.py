"""What the classification tasks (visual entailment, NLVR2) share: the training objective with
ALBEF's momentum distillation, the prediction loop and the accuracy metrics.

A classifier model maps normalised pixels (B, 3, S, S), or image pairs (B, 2, 3, S, S), token ids
and mask (B, T) to (B, C) logits.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from softmask.config import Config
from softmask.data.dataset import TaskDataset, eval_loader
from softmask.data.transforms import EvalTransform, training_transform
from softmask.objectives.distill import distilled_cross_entropy
from softmask.tasks.momentum import DistilledObjective
from softmask.train import dist
from softmask.train.loop import inference_autocast

log = logging.getLogger("softmask")


def transform_images(transform: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> float (B, 3, s, s), or uint8 pairs (B, K, 3, S, S) -> (B, K, 3, s, s) with the
    same random draws for image k of every pair (the CPU generator state is replayed; the transforms
    draw all their parameters there), so both images of a pair get the same crop, flip and operations."""
    if images.dim() == 4:
        return transform(images)
    state = torch.get_rng_state()
    views = []
    for k in range(images.shape[1]):
        torch.set_rng_state(state)
        views.append(transform(images[:, k]))
    return torch.stack(views, dim=1)


class ClassifierObjective(DistilledObjective):
    """Cross-entropy around a classifier (``.model``), with a momentum copy supplying soft targets
    when ``distill.alpha > 0`` (ALBEF): ``(1 - alpha) * CE(label) + alpha * CE(softmax(momentum logits))``,
    alpha ramped from 0 over ``alpha_warmup_steps``."""

    def __init__(self, cfg: Config, model: nn.Module, alpha_warmup_steps: int):
        super().__init__(cfg, model, alpha_warmup_steps, momentum=cfg.distill.alpha > 0)
        self.augment = training_transform(cfg.model.vision.image_size, cfg.data.augment)

    def forward(self, batch: dict, step: int, micro: int = 0) -> dict[str, torch.Tensor]:
        """``images`` uint8 (B, 3, S, S) or (B, 2, 3, S, S), ``input_ids``/``attention_mask`` (B, T),
        ``label`` (B,) -> ``loss`` (with gradient), ``loss_ce``, batch accuracy ``acc`` and ``alpha``."""
        device = next(self.model.parameters()).device
        pixels = transform_images(self.augment, batch["images"].to(device, non_blocking=True))
        ids = batch["input_ids"].to(device, non_blocking=True)
        mask = batch["attention_mask"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True).long()
        logits = self.model(pixels, ids, mask)
        teacher, alpha = None, self.alpha(step)
        if self.momentum_model is not None:
            with torch.no_grad():
                teacher = self.momentum_model(pixels, ids, mask)
        loss = distilled_cross_entropy(logits, labels, teacher, alpha)
        with torch.no_grad():
            loss_ce = F.cross_entropy(logits.float(), labels)
            acc = (logits.argmax(-1) == labels).float().mean()
        return {"loss": loss, "loss_ce": loss_ce, "acc": acc, "alpha": torch.tensor(alpha)}


@torch.inference_mode()
def predict_classes(cfg: Config, model: nn.Module, dataset: TaskDataset, task: str
                    ) -> tuple[list[tuple[int, int, int]], int]:
    """Every rank's ``[(record index, predicted class, gold class), ...]`` (gathered, sorted) and the
    number of samples skipped as bad."""
    device = next(model.parameters()).device
    transform = EvalTransform(cfg.model.vision.image_size).to(device)
    rows, skipped = [], 0
    for batch in eval_loader(cfg, dataset, dist.rank(), dist.world_size()):
        skipped += batch["skipped"]
        for sample in batch["skipped_samples"]:
            log.warning(f"{task}: skipped bad sample: {sample}")
        if not len(batch["indices"]):
            continue
        with inference_autocast(cfg.train.precision, device):
            pixels = transform_images(transform, batch["images"].to(device))
            logits = model(pixels, batch["input_ids"].to(device), batch["attention_mask"].to(device))
        preds = logits.float().argmax(-1).cpu().tolist()
        rows.extend(zip(batch["indices"].tolist(), preds, batch["label"].tolist(), strict=True))
    return sorted(dist.gather_objects(rows)), sum(dist.gather_objects([skipped]))


def accuracy_metrics(predictions: list[int], labels: list[int], classes: tuple[str, ...]) -> dict[str, float]:
    """Accuracy in % (``acc``), per gold class (``acc_<class>``, 0 without samples) and the counts
    (``count``, ``count_<class>``)."""
    total = len(labels)
    correct = sum(p == g for p, g in zip(predictions, labels, strict=True))
    metrics: dict[str, float] = {"acc": 100.0 * correct / total if total else 0.0, "count": total}
    for index, name in enumerate(classes):
        gold = [p for p, g in zip(predictions, labels, strict=True) if g == index]
        metrics[f"acc_{name}"] = 100.0 * sum(p == index for p in gold) / len(gold) if gold else 0.0
        metrics[f"count_{name}"] = len(gold)
    return metrics
