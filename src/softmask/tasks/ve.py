"""Visual entailment (SNLI-VE): does the image entail, contradict or say nothing
about the sentence?

The model (:class:`VEModel`) is the pretrained backbone with ALBEF's classifier on the fused [CLS]:
``Linear(D, D) -> ReLU -> Linear(D, 3)`` (``cls_head``, ALBEF's names, so its fine-tuned VE checkpoints
load: ``softmask evaluate ve --checkpoint ALBEF_ve.pth``). Training minimises the cross-entropy of the three
labels; with ``distill.alpha > 0`` a momentum (EMA) copy of the whole model supplies soft targets
as in ALBEF: ``(1 - alpha) * CE(logits, label) + alpha * CE(logits, softmax(momentum logits))``,
alpha ramped from 0 over ``distill.alpha_warmup_steps`` (0: the first epoch).

Evaluation: accuracy in %, overall and per gold label, over the split's records; the predictions go
to ``out_dir/ve_predictions_<split>.json``.

Shapes: B batch, T tokens, D text width, S image size.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from softmask.config import Config
from softmask.data.annotations import Field, load_records
from softmask.data.dataset import TaskDataset, train_loader
from softmask.data.sources import LoaderSource
from softmask.models.vlp import VisionLanguageModel, create_model
from softmask.tasks.classify import ClassifierObjective, accuracy_metrics, predict_classes
from softmask.tasks.finetune import TaskModel
from softmask.train import dist
from softmask.train.schedule import alpha_warmup_steps

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
    albef_heads = ("cls_head.",)
    unused_modules = UNUSED_MODULES

    def __init__(self, backbone: VisionLanguageModel):
        super().__init__(backbone)
        width = backbone.config.text.hidden_size
        self.cls_head = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, len(LABELS)))
        self.freeze_unused()

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Normalised pixels (B, 3, S, S), tokens and mask (B, T) -> (B, 3) logits in ``LABELS`` order."""
        net = self.backbone
        fused = net.fuse(net.encode_text(input_ids, attention_mask), attention_mask, net.encode_image(pixels))
        return self.cls_head(net.fused_summary(fused, attention_mask))


# --------------------------------------------------------------------------------------------------
# The task interface (softmask.tasks.finetune.TaskDefinition)
# --------------------------------------------------------------------------------------------------


def build_model(cfg: Config) -> VEModel:
    """The backbone with ``model.init`` loaded (position embeddings interpolated to the image size)
    and a freshly initialised classifier."""
    return VEModel(create_model(cfg))


def build_objective(cfg: Config, model: VEModel, batches_per_epoch: int | None) -> ClassifierObjective:
    return ClassifierObjective(cfg, model, alpha_warmup_steps(cfg, batches_per_epoch))


def build_train_data(cfg: Config, rank: int, world_size: int) -> LoaderSource:
    records = load_records(cfg.finetune.train, cfg.data.image_root, FIELDS)
    loader, sampler = train_loader(cfg, TaskDataset(records, cfg, "sentence", extras=_label_index), rank, world_size)
    return LoaderSource(loader, sampler)


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


def evaluate(cfg: Config, model: VEModel, split: str, out_dir: Path | None) -> dict[str, float]:
    """Accuracy on ``finetune.<split>`` (every rank returns the same metrics)."""
    if not isinstance(model, VEModel):
        raise TypeError(f"ve evaluation needs a VEModel, got {type(model).__name__}")
    records = load_records(getattr(cfg.finetune, split), cfg.data.image_root, FIELDS, key=f"finetune.{split}")
    model.eval()
    dataset = TaskDataset(records, cfg, "sentence", extras=_label_index)
    rows, skipped = predict_classes(cfg, model, dataset, "ve")
    metrics = accuracy_metrics([r[1] for r in rows], [r[2] for r in rows], LABELS)
    metrics["skipped"] = skipped
    if out_dir is not None and dist.rank() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        items = [{"image": records[i]["image"], "sentence": records[i]["sentence"], "label": LABELS[gold],
                  "prediction": LABELS[pred]} for i, pred, gold in rows]
        (out_dir / f"ve_predictions_{split}.json").write_text(json.dumps(items, indent=1))
    return metrics
