"""NLVR2: is a sentence true of a pair of images? Two stages, ``finetune.stage``:

- ``text_assignment``: ALBEF's extra pretraining of the new two-image layers, a 3-way classifier:
  records ``{"images": [a, b], "sentence", "label": 0|1|2}`` where 0 = the sentence describes image
  a (and not b), 1 = it describes image b (and not a), 2 = it describes neither (a caption of a
  third image). The world's ``nlvr_ta.json`` is made this way. ALBEF draws these triplets on the fly
  from the 4M image-caption pairs; softmask reads them from files.
- ``finetune``: the 2-way classifier on ALBEF's NLVR2 records
  ``{"images": [left, right], "sentence", "label": "True"|"False"}`` (JSON true/false accepted too);
  class 1 is True.

The model (:class:`NLVR2Model`) is the two-image model of :mod:`softmask.models.nlvr2` plus the
classifier ``cls_head`` on the fused [CLS] (3 or 2 classes by the stage). ``model.init`` is either a
single-image pretrained checkpoint (a ``softmask pretrain`` model folder or an ALBEF/TCL ``.pth``:
loaded by :func:`softmask.models.vlp.create_model`, position embeddings interpolated, then expanded
to two images), or an NLVR2 run (its folder, its ``model/`` folder or one of its checkpoints), whose
weights load as they are; when the saved head has another number of classes (text assignment ->
fine-tuning), it is dropped and the new head starts random (logged).

Training: the same augmentation for both images of a pair (one draw of crop, flip and RandAugment
per pair; ALBEF draws them independently per image), cross-entropy, and with ``distill.alpha > 0``
ALBEF's momentum distillation: ``(1 - alpha) * CE + alpha * CE(softmax(momentum logits))``, alpha
ramped from 0 over ``distill.alpha_warmup_steps`` (0: the first epoch). ALBEF distils in fine-tuning,
not in text assignment (``configs/finetune/nlvr2_ta.yaml`` sets alpha 0).

Evaluation: accuracy in % (``acc``), per gold class (``acc_<class>``), counts, and the predictions in
``out_dir/nlvr2_predictions_<split>.json``.

Shapes: B batch, T tokens, D text width, S image side.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import yaml

from softmask.config import Config, ConfigError, ModelConfig, model_config_from_dict, to_dict
from softmask.data import annotations
from softmask.data.annotations import Field
from softmask.data.dataset import TaskDataset, train_loader
from softmask.data.sources import LoaderSource
from softmask.models.loading import CheckpointError
from softmask.models.nlvr2 import TwoImageModel, classifier_head, two_image_state
from softmask.models.vit import resize_pos_embed
from softmask.models.vlp import create_model, summarise_fused
from softmask.tasks.classify import ClassifierObjective, accuracy_metrics, predict_classes
from softmask.tasks.finetune import TaskModel, saved_state, saved_task_name
from softmask.train import dist
from softmask.train.schedule import alpha_warmup_steps

log = logging.getLogger("softmask")

TASK = "nlvr2"
# Class names by stage, in label-index order.
CLASSES = {"finetune": ("false", "true"), "text_assignment": ("image1", "image2", "neither")}
FINETUNE_LABELS = {"False": 0, "True": 1, False: 0, True: 1}
POS_EMBED = "backbone.visual_encoder.pos_embed"
HEAD_PREFIX = "cls_head."


def num_classes(stage: str) -> int:
    """3 for text assignment, 2 for fine-tuning."""
    return len(CLASSES[stage])


# --------------------------------------------------------------------------------------------------
# Annotation fields and labels
# --------------------------------------------------------------------------------------------------


def _check_pair(value: object) -> str | None:
    return None if isinstance(value, list) and len(value) == 2 else f"must list exactly 2 images, got {value!r}"


def _check_finetune_label(value: object) -> str | None:
    return None if value in FINETUNE_LABELS else f"must be \"True\" or \"False\", got {value!r}"


def _check_ta_label(value: object) -> str | None:
    return None if value in (0, 1, 2) else f"must be 0 (image 1), 1 (image 2) or 2 (neither), got {value!r}"


FIELDS = {
    "finetune": (Field("images", (list,), _check_pair), Field("sentence", (str,)),
                 Field("label", (str, bool), _check_finetune_label)),
    "text_assignment": (Field("images", (list,), _check_pair), Field("sentence", (str,)),
                        Field("label", (int,), _check_ta_label)),
}


def _finetune_label(record: dict) -> dict:
    """A fine-tuning record's extra sample value: ``label`` 1 (True) or 0 (False). Module level, so
    it pickles into loader workers."""
    return {"label": FINETUNE_LABELS[record["label"]]}


def _ta_label(record: dict) -> dict:
    """A text-assignment record's extra sample value: ``label`` 0, 1 or 2."""
    return {"label": int(record["label"])}


LABEL_OF = {"finetune": _finetune_label, "text_assignment": _ta_label}


def load_records(cfg: Config, split: str) -> list[dict]:
    """The checked records of ``finetune.<split>`` for the configured stage (AnnotationError naming
    the file and record otherwise)."""
    return annotations.load_records(getattr(cfg.finetune, split), cfg.data.image_root, FIELDS[cfg.finetune.stage],
                                    image_key="images", key=f"finetune.{split}")


def make_dataset(cfg: Config, records: list[dict]) -> TaskDataset:
    """Samples with ``image`` uint8 (2, 3, S, S), ``text`` and ``label``."""
    return TaskDataset(records, cfg, "sentence", extras=LABEL_OF[cfg.finetune.stage], image_key="images")


# --------------------------------------------------------------------------------------------------
# Model and objective
# --------------------------------------------------------------------------------------------------


class NLVR2Model(TaskModel):
    """A :class:`TwoImageModel` backbone plus the classifier ``cls_head`` (3 classes for text
    assignment, 2 for fine-tuning) on the fused [CLS]."""

    task_name = TASK
    albef_heads = ("cls_head.",)
    albef_paired_fusion = True

    def __init__(self, backbone: TwoImageModel, classes: int):
        super().__init__(backbone)
        self.num_classes = classes
        self.cls_head = classifier_head(backbone.config.text.hidden_size, classes)

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Normalised image pairs (B, 2, 3, S, S), tokens and mask (B, T) -> (B, C) logits."""
        fused = self.backbone(pixels, input_ids, attention_mask)
        return self.cls_head(summarise_fused(fused, attention_mask, self.backbone.config.fused_pooling))


# --------------------------------------------------------------------------------------------------
# Building the model: from a single-image checkpoint, or from an NLVR2 run
# --------------------------------------------------------------------------------------------------


def saved_task_of(init: str) -> str:
    """The fine-tuning task a ``model.init`` path was saved by ("" for a pretrained model or a foreign
    checkpoint, e.g. ALBEF's .pth, which loads as a single-image model): read from the config files of a
    run folder, a saved model folder or a checkpoint file in a run's checkpoints/
    (:func:`softmask.runs.config_files`; no tensors are read)."""
    from softmask.runs import config_files

    for config in config_files(init):
        try:
            task = saved_task_name(yaml.safe_load(config.read_text()) or {})
        except (yaml.YAMLError, AttributeError):
            task = ""
        if task:
            return task
    return ""


def _architecture(model_cfg: ModelConfig) -> dict:
    """The model section without what may differ between the stages (init paths, image size)."""
    section = to_dict(model_cfg)
    for part in (section, section["vision"], section["text"]):
        part.pop("init")
    section["vision"].pop("image_size")
    return section


def _differences(ours: dict, theirs: dict, prefix: str = "model") -> list[str]:
    found = []
    for key, value in ours.items():
        if isinstance(value, dict):
            found += _differences(value, theirs.get(key, {}), f"{prefix}.{key}")
        elif theirs.get(key) != value:
            found.append(f"{prefix}.{key} is {value} but the checkpoint has {theirs.get(key)}")
    return found


def _fit_pos_embed(state: dict[str, torch.Tensor], own: torch.Tensor, source: Path) -> None:
    """Resize the saved position embeddings to this image size (in place), logging it."""
    saved = state[POS_EMBED]
    if saved.shape == own.shape:
        return
    grid = int(round((own.shape[1] - 1) ** 0.5))
    try:
        state[POS_EMBED] = resize_pos_embed(saved, grid, num_prefix_tokens=1)
    except ValueError as exc:
        raise CheckpointError(f"{source}: '{POS_EMBED}': {exc}") from None
    side = int(round((saved.shape[1] - 1) ** 0.5))
    log.info(f"nlvr2: position embeddings resized from a {side}x{side} to a {grid}x{grid} patch grid")


def _drop_other_head(state: dict[str, torch.Tensor], classes: int, source: Path) -> None:
    """Remove a saved head of another number of classes (in place), logging it."""
    saved = state.get(f"{HEAD_PREFIX}2.weight")
    if saved is None or saved.shape[0] == classes:
        return
    for key in [k for k in state if k.startswith(HEAD_PREFIX)]:
        del state[key]
    log.info(f"nlvr2: dropped the saved {saved.shape[0]}-way head of {source} (another stage); the new "
             f"{classes}-way head starts random")


def load_nlvr2_run(cfg: Config, init: str, classes: int) -> NLVR2Model:
    """The model of an NLVR2 run or saved model folder at ``init``, with this config's architecture
    (which must be the saved one, the image size aside: position embeddings are interpolated)."""
    state, saved, source = saved_state(Path(init).expanduser())
    saved_cfg = model_config_from_dict(saved.get("model", {}), where=f"{source}: model")
    problems = _differences(_architecture(cfg.model), _architecture(saved_cfg))
    if problems:
        raise CheckpointError(f"model.init {source}: another architecture: " + "; ".join(problems))
    if cfg.model.vision.init or cfg.model.text.init:
        log.info("nlvr2: model.vision.init and model.text.init are not used: model.init is an nlvr2 run")
    model = NLVR2Model(TwoImageModel(cfg.model), classes)
    _fit_pos_embed(state, model.state_dict()[POS_EMBED], source)
    _drop_other_head(state, classes, source)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(HEAD_PREFIX)]
    if missing or unexpected:
        raise CheckpointError(f"model.init {source}: does not fit the nlvr2 model; missing: {missing[:5]}; "
                              f"unexpected: {unexpected[:5]}")
    log.info(f"nlvr2: loaded {len(state)} tensors of the two-image model from {source}")
    return model


def expand_pretrained(cfg: Config, classes: int) -> NLVR2Model:
    """The single-image model of ``cfg`` (with ``model.init`` and the vision/text inits loaded)
    expanded to two images, and a new head."""
    single = create_model(cfg)
    _, dropped = two_image_state(single.state_dict())
    backbone = TwoImageModel.from_single(single)
    if cfg.model.init:
        log.info(f"nlvr2: expanded the single-image model of {cfg.model.init} to two images (each fusion layer "
                 f"-> two blocks, K/V shared); left out: {', '.join(sorted({k.split('.')[0] for k in dropped}))}; "
                 f"the {classes}-way head starts random")
    return NLVR2Model(backbone, classes)


def build_model(cfg: Config) -> NLVR2Model:
    """The NLVR2 model of ``finetune.stage`` from ``model.init`` (see the module docstring)."""
    classes = num_classes(cfg.finetune.stage)
    task = saved_task_of(cfg.model.init) if cfg.model.init else ""
    if task == TASK:
        return load_nlvr2_run(cfg, cfg.model.init, classes)
    if task:
        raise CheckpointError(f"model.init {cfg.model.init}: a model fine-tuned on '{task}'; nlvr2 starts from a "
                              "pretrained model or an nlvr2 (text-assignment) run")
    return expand_pretrained(cfg, classes)


def build_objective(cfg: Config, model: NLVR2Model, batches_per_epoch: int | None) -> ClassifierObjective:
    from softmask.data.text import open_tokenizer

    open_tokenizer(cfg.data.tokenizer, cfg.data.max_tokens).check_fits(cfg.model.text.vocab_size)
    return ClassifierObjective(cfg, model, alpha_warmup_steps(cfg, batches_per_epoch))


def build_train_data(cfg: Config, rank: int, world_size: int) -> LoaderSource:
    loader, sampler = train_loader(cfg, make_dataset(cfg, load_records(cfg, "train")), rank, world_size)
    return LoaderSource(loader, sampler)


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


def _write_predictions(out_dir: Path, split: str, records: list[dict], rows: list, classes: tuple[str, ...]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    items = [{"images": records[i]["images"], "sentence": records[i]["sentence"], "label": classes[gold],
              "prediction": classes[pred]} for i, pred, gold in rows]
    (out_dir / f"nlvr2_predictions_{split}.json").write_text(json.dumps(items, indent=1))


def evaluate(cfg: Config, model: NLVR2Model, split: str, out_dir: Path | None) -> dict[str, float]:
    """Accuracy on ``finetune.<split>`` for the configured stage (every rank returns the same metrics)."""
    if not isinstance(model, NLVR2Model):
        raise TypeError(f"nlvr2 evaluation needs an NLVR2Model, got {type(model).__name__}")
    classes = CLASSES[cfg.finetune.stage]
    if model.num_classes != len(classes):
        raise ConfigError(f"finetune.stage is {cfg.finetune.stage} ({len(classes)} classes) but the model has a "
                          f"{model.num_classes}-way head")
    records = load_records(cfg, split)
    model.eval()
    rows, skipped = predict_classes(cfg, model, make_dataset(cfg, records), TASK)
    metrics = accuracy_metrics([r[1] for r in rows], [r[2] for r in rows], classes)
    metrics["skipped"] = skipped
    if out_dir is not None and dist.rank() == 0:
        _write_predictions(out_dir, split, records, rows, classes)
    return metrics
