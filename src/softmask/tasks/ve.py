"""Visual entailment (SNLI-VE; METHOD.md section 5): does the image entail, contradict or say nothing
about the sentence?

The model (:class:`VEModel`) is the pretrained backbone with ALBEF's classifier on the fused [CLS]:
``Linear(D, 2D) -> ReLU -> Linear(2D, 3)``. Training minimises the cross-entropy of the three
labels; with ``distill.alpha > 0`` a momentum (EMA) copy of the whole model supplies soft targets
as in ALBEF: ``(1 - alpha) * CE(logits, label) + alpha * CE(logits, softmax(momentum logits))``,
alpha ramped from 0 over ``distill.alpha_warmup_steps`` (0: the first epoch).

Evaluation: accuracy in %, overall and per gold label, over the split's records; the predictions go
to ``out_dir/ve_predictions_<split>.json``.

Shapes: B batch, T tokens, D text width, S image size.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from softmask.config import Config
from softmask.data.task_data import Field, TaskDataset, eval_loader, load_task_records, train_loader
from softmask.data.transforms import EvalTransform, TrainAugment
from softmask.models.vlp import VisionLanguageModel, create_model
from softmask.objectives.distill import ema_update, momentum_copy
from softmask.objectives.itc import soft_cross_entropy
from softmask.tasks.finetune import TaskModel
from softmask.tasks.pretrain import LoaderSource
from softmask.train import dist

log = logging.getLogger("softmask")

LABELS = ("entailment", "neutral", "contradiction")
# Backbone parts the classifier never uses: frozen so that they get no gradient (DDP rejects unused
# parameters); they stay in the saved weights.
UNUSED_MODULES = ("vision_proj", "text_proj", "itm_head", "mlm_head")


def _check_label(value: object) -> str | None:
    return None if value in LABELS else f"must be one of {', '.join(LABELS)}, got {value!r}"


FIELDS = (Field("sentence", (str,)), Field("label", (str,), _check_label))


def _label_index(record: dict) -> dict:
    """The extra sample value of a record: its label index (module level, so it pickles into workers)."""
    return {"label": LABELS.index(record["label"])}


# --------------------------------------------------------------------------------------------------
# Model and objective
# --------------------------------------------------------------------------------------------------


class VEModel(TaskModel):
    """A :class:`VisionLanguageModel` backbone plus the 3-way classifier ``cls_head`` (PyTorch's default
    initialisation, as ALBEF's)."""

    task_name = "ve"

    def __init__(self, backbone: VisionLanguageModel):
        super().__init__(backbone)
        width = backbone.config.text.hidden_size
        self.cls_head = nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, len(LABELS)))
        for name in UNUSED_MODULES:
            for param in getattr(backbone, name).parameters():
                param.requires_grad_(False)
        backbone.temp.requires_grad_(False)

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Normalised pixels (B, 3, S, S), tokens and mask (B, T) -> (B, 3) logits in ``LABELS`` order."""
        net = self.backbone
        fused = net.fuse(net.encode_text(input_ids, attention_mask), attention_mask, net.encode_image(pixels))
        return self.cls_head(fused[:, 0])


def ve_loss(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None = None,
            alpha: float = 0.0) -> torch.Tensor:
    """Cross-entropy of (B, 3) logits against (B,) long labels, float32; with ``teacher_logits``
    (B, 3) and ``alpha > 0``: ``(1 - alpha) * CE + alpha * soft CE against softmax(teacher)``."""
    with torch.autocast(device_type=logits.device.type, enabled=False):
        hard = F.cross_entropy(logits.float(), labels)
        if teacher_logits is None or alpha == 0.0:
            return hard
        soft = F.softmax(teacher_logits.detach().float(), dim=-1)
        return (1.0 - alpha) * hard + alpha * soft_cross_entropy(logits, soft)


class VETask(nn.Module):
    """The training objective around a :class:`VEModel` (``.model``), with a momentum copy when
    ``distill.alpha > 0``."""

    def __init__(self, cfg: Config, model: VEModel, alpha_warmup_steps: int):
        super().__init__()
        self.cfg = cfg
        self.model = model
        self.momentum_model = momentum_copy(model) if cfg.distill.alpha > 0 else None
        size = cfg.model.vision.image_size
        self.augment = TrainAugment(size, cfg.data.augment) if cfg.data.augment.enabled else EvalTransform(size)
        self.alpha_warmup_steps = max(1, alpha_warmup_steps)

    def alpha(self, step: int) -> float:
        return self.cfg.distill.alpha * min(1.0, step / self.alpha_warmup_steps)

    def forward(self, batch: dict, step: int, micro: int = 0) -> dict[str, torch.Tensor]:
        """``images`` uint8 (B, 3, S, S), ``input_ids``/``attention_mask`` (B, T), ``label`` long (B,)
        -> ``loss`` (with gradient), ``loss_ce`` and the batch accuracy ``acc`` (detached)."""
        device = next(self.model.parameters()).device
        pixels = self.augment(batch["images"].to(device, non_blocking=True))
        ids = batch["input_ids"].to(device, non_blocking=True)
        mask = batch["attention_mask"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True).long()
        logits = self.model(pixels, ids, mask)
        teacher, alpha = None, self.alpha(step)
        if self.momentum_model is not None:
            with torch.no_grad():
                ema_update(self.model, self.momentum_model, self.cfg.distill.momentum)
                teacher = self.momentum_model(pixels, ids, mask)
        loss = ve_loss(logits, labels, teacher, alpha)
        with torch.no_grad():
            loss_ce = F.cross_entropy(logits.float(), labels)
            acc = (logits.argmax(-1) == labels).float().mean()
        return {"loss": loss, "loss_ce": loss_ce, "acc": acc, "alpha": torch.tensor(alpha)}


# --------------------------------------------------------------------------------------------------
# The task interface (softmask.tasks.finetune.TaskDefinition)
# --------------------------------------------------------------------------------------------------


def build_model(cfg: Config) -> VEModel:
    """The backbone with ``model.init`` loaded (position embeddings interpolated to the image size)
    and a freshly initialised classifier."""
    return VEModel(create_model(cfg))


def build_task(cfg: Config, model: VEModel, batches_per_epoch: int | None) -> VETask:
    from softmask.train.loop import total_steps_for

    per_step = batches_per_epoch // cfg.train.grad_accum if batches_per_epoch else 0
    warmup = cfg.distill.alpha_warmup_steps or per_step or total_steps_for(cfg, batches_per_epoch)
    return VETask(cfg, model, warmup)


def build_train_data(cfg: Config, rank: int, world_size: int) -> LoaderSource:
    records = load_task_records(cfg.finetune.train, cfg.data.image_root, FIELDS)
    loader, sampler = train_loader(cfg, TaskDataset(records, cfg, "sentence", extras=_label_index), rank, world_size)
    return LoaderSource(loader, sampler)


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


def _autocast(cfg: Config, device: torch.device):
    if cfg.train.precision == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.inference_mode()
def predict(cfg: Config, model: VEModel, dataset: TaskDataset) -> tuple[list[tuple[int, int, int]], int]:
    """This process's share of ``dataset``: ``[(record index, predicted label, gold label), ...]`` and
    the number of samples skipped as bad."""
    device = next(model.parameters()).device
    transform = EvalTransform(cfg.model.vision.image_size).to(device)
    rows, skipped = [], 0
    for batch in eval_loader(cfg, dataset, dist.rank(), dist.world_size()):
        skipped += batch["skipped"]
        for sample in batch["skipped_samples"]:
            log.warning(f"ve: skipped bad sample: {sample}")
        if batch["images"] is None:
            continue
        with _autocast(cfg, device):
            logits = model(transform(batch["images"].to(device)), batch["input_ids"].to(device),
                           batch["attention_mask"].to(device))
        preds = logits.float().argmax(-1).cpu().tolist()
        rows.extend(zip(batch["indices"].tolist(), preds, batch["label"].tolist(), strict=True))
    return rows, skipped


def ve_metrics(predictions: list[int], labels: list[int]) -> dict[str, float]:
    """Accuracy in % (``acc``), per gold label (``acc_<label>``, 0 for a label without samples) and
    the counts (``count``, ``count_<label>``)."""
    total = len(labels)
    correct = sum(p == g for p, g in zip(predictions, labels, strict=True))
    metrics: dict[str, float] = {"acc": 100.0 * correct / total if total else 0.0, "count": total}
    for index, name in enumerate(LABELS):
        gold = [p for p, g in zip(predictions, labels, strict=True) if g == index]
        metrics[f"acc_{name}"] = 100.0 * sum(p == index for p in gold) / len(gold) if gold else 0.0
        metrics[f"count_{name}"] = len(gold)
    return metrics


def evaluate(cfg: Config, model: VEModel, split: str, out_dir: Path | None) -> dict[str, float]:
    """Accuracy on ``finetune.<split>`` (every rank returns the same metrics)."""
    if not isinstance(model, VEModel):
        raise TypeError(f"ve evaluation needs a VEModel, got {type(model).__name__}")
    records = load_task_records(getattr(cfg.finetune, split), cfg.data.image_root, FIELDS)
    model.eval()
    rows, skipped = predict(cfg, model, TaskDataset(records, cfg, "sentence", extras=_label_index))
    rows = sorted(dist.gather_objects(rows))
    skipped = sum(dist.gather_objects([skipped]))
    metrics = ve_metrics([r[1] for r in rows], [r[2] for r in rows])
    metrics["skipped"] = skipped
    if out_dir is not None and dist.rank() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        items = [{"image": records[i]["image"], "sentence": records[i]["sentence"], "label": LABELS[gold],
                  "prediction": LABELS[pred]} for i, pred, gold in rows]
        (out_dir / f"ve_predictions_{split}.json").write_text(json.dumps(items, indent=1))
    return metrics
