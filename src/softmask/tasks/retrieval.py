"""Image-text retrieval: fine-tuning (ALBEF's recipe) and evaluation.

Fine-tuning trains the plain :class:`~softmask.models.vlp.VisionLanguageModel` with

- ITC with momentum distillation against the momentum features of the (global) batch and of the
  feature queues, where *every caption of the same image is a positive*: an id queue is kept next
  to the feature queues, and the hard targets of a row are its positives (same ``image_id``, in the
  batch or in the queue) normalised to sum to 1, mixed with the momentum model's softmax by
  ``distill.alpha`` (ramped from 0 over the first epoch, as in pretraining);
- ITM on the positive pairs and one hard negative text per image and image per text, drawn from
  the batch's similarities with every pair of the same image id (and identical captions) excluded.

No MLM and no soft masks: the MLM head is frozen (it gets no gradient, which DDP would reject).
The fine-tuned model is an ordinary softmask model folder (``save_pretrained``), so evaluation
takes it, a pretrained model (zero-shot) or an ALBEF checkpoint alike.

Evaluation (:func:`evaluate`): every image and every caption of the split (records with a caption
list per image), ITC similarities for all pairs, each query's top ``finetune.k_test`` candidates
re-ranked by ITM (``finetune.score``), recall@1/5/10 in both directions
(:func:`softmask.eval.retrieval.evaluate_retrieval`).

Shapes: B batch per process, G = world_size * B the global batch, Q queue length, E embed_dim,
T tokens, D text width, Dv image width, N patches.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from softmask.config import Config
from softmask.data.annotations import AnnotationError, Field, load_records
from softmask.data.dataset import TaskDataset, train_loader
from softmask.data.images import BadSample, load_image, to_tensor
from softmask.data.sources import LoaderSource
from softmask.data.text import open_tokenizer, pre_caption
from softmask.data.transforms import EvalTransform
from softmask.eval.retrieval import evaluate_retrieval
from softmask.models.vlp import VisionLanguageModel, create_model
from softmask.tasks.contrastive import ContrastiveObjective
from softmask.train.schedule import alpha_warmup_steps

log = logging.getLogger("softmask")

# Submodules of the backbone the retrieval objectives never use: frozen so that they get no gradient.
UNUSED_MODULES = ("mlm_head",)


# --------------------------------------------------------------------------------------------------
# Annotation fields
# --------------------------------------------------------------------------------------------------


def _check_image_id(value: object) -> str | None:
    if isinstance(value, str) and not value.strip():
        return "must not be empty"
    return None


def _check_caption(value: object) -> str | None:
    return "must not be empty" if not str(value).strip() else None


def _check_caption_list(value: object) -> str | None:
    captions = [value] if isinstance(value, str) else value
    if not captions:
        return "must hold at least one caption"
    for i, caption in enumerate(captions):
        if not isinstance(caption, str) or not caption.strip():
            return f"item {i} must be a non-empty string, got {caption!r}"
    return None


TRAIN_FIELDS = (Field("caption", (str,), _check_caption), Field("image_id", (int, str), _check_image_id))
EVAL_FIELDS = (Field("caption", (str, list), _check_caption_list),)


def dense_image_ids(records: list[dict]) -> dict[object, int]:
    """Each distinct ``image_id`` (int or str, as in the files) -> 0, 1, 2, ... in order of first
    appearance. Ids from the files may be any JSON int or string; the queue needs non-negative ints."""
    mapping: dict[object, int] = {}
    for record in records:
        mapping.setdefault(record["image_id"], len(mapping))
    return mapping


def _image_index(record: dict) -> dict:
    """The extra sample value of a training record: its dense image id (a module-level function, so
    the dataset pickles into loader workers)."""
    return {"image_id": record["_image_index"]}


# --------------------------------------------------------------------------------------------------
# The objective
# --------------------------------------------------------------------------------------------------


class RetrievalObjective(ContrastiveObjective):
    """ITC (id-aware positives, momentum distillation, queues with ids) + ITM (hard negatives, never of
    the same image id nor an identical caption) around a :class:`VisionLanguageModel`: the forward pass
    is :meth:`ContrastiveObjective.forward` with an id queue; each batch holds ``image_id`` (B,)."""

    def __init__(self, cfg: Config, model: VisionLanguageModel, alpha_warmup_steps: int):
        super().__init__(cfg, model, alpha_warmup_steps, queue_ids=True, frozen=UNUSED_MODULES)


# --------------------------------------------------------------------------------------------------
# The task interface (softmask.tasks.finetune.TaskDefinition)
# --------------------------------------------------------------------------------------------------


def build_model(cfg: Config) -> VisionLanguageModel:
    """The plain model with ``model.init`` (a pretrained softmask folder or ALBEF checkpoint; position
    embeddings interpolated when the image size differs) loaded."""
    return create_model(cfg)


def build_objective(cfg: Config, model: VisionLanguageModel, batches_per_epoch: int | None) -> RetrievalObjective:
    return RetrievalObjective(cfg, model, alpha_warmup_steps(cfg, batches_per_epoch))


def load_train_records(cfg: Config) -> list[dict]:
    """The checked ``finetune.train`` records, each with ``_image_index`` (its dense image id)."""
    records = load_records(cfg.finetune.train, cfg.data.image_root, TRAIN_FIELDS)
    mapping = dense_image_ids(records)
    for record in records:
        record["_image_index"] = mapping[record["image_id"]]
    return records


def build_train_data(cfg: Config, rank: int, world_size: int) -> LoaderSource:
    dataset = TaskDataset(load_train_records(cfg), cfg, "caption", extras=_image_index)
    loader, sampler = train_loader(cfg, dataset, rank, world_size)
    return LoaderSource(loader, sampler)


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


class _Images(Dataset):
    """Image paths -> uint8 (3, S, S), or the error text (raised by :func:`load_eval_images`)."""

    def __init__(self, records: list[dict], size: int, max_pixels: int):
        self.records, self.size, self.max_pixels = records, size, max_pixels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> torch.Tensor | str:
        record = self.records[index]
        try:
            return to_tensor(load_image(record["image"], self.max_pixels, draft_size=self.size), self.size)
        except BadSample as exc:
            return f"{record['_source']}: {exc}"


def _stack_or_error(items: list) -> torch.Tensor:
    errors = [item for item in items if isinstance(item, str)]
    if errors:
        raise AnnotationError(f"retrieval evaluation needs every image: {errors[0]}")
    return torch.stack(items)


def load_eval_images(cfg: Config, records: list[dict]) -> torch.Tensor:
    """Every record's image as uint8 (I, 3, S, S) (``data.num_workers`` decoding processes). An
    unreadable image is an :class:`AnnotationError` (skipping it would change the metric)."""
    dataset = _Images(records, cfg.model.vision.image_size, cfg.data.max_image_pixels)
    loader = DataLoader(dataset, batch_size=cfg.finetune.eval_batch_size, shuffle=False,
                        num_workers=cfg.data.num_workers, collate_fn=_stack_or_error)
    return torch.cat(list(loader))


def eval_captions(records: list[dict], max_words: int) -> tuple[list[str], np.ndarray]:
    """The cleaned captions of all records in order (C,) and the image index of each (C,) int."""
    texts, text_to_image = [], []
    for index, record in enumerate(records):
        captions = record["caption"]
        for caption in [captions] if isinstance(captions, str) else captions:
            texts.append(pre_caption(caption, max_words))
            text_to_image.append(index)
    return texts, np.asarray(text_to_image, dtype=np.int64)


class NormalisedImages:
    """uint8 images (I, 3, S, S) presented to :func:`evaluate_retrieval` as normalised float pixels:
    ``shape`` and slicing like a tensor, each slice transformed when taken (a quarter of the memory
    of a float copy of the whole split)."""

    def __init__(self, images: torch.Tensor, transform: nn.Module):
        self.images, self.transform = images, transform

    @property
    def shape(self) -> torch.Size:
        return self.images.shape

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index) -> torch.Tensor:
        """A slice -> float32 (n, 3, size, size), normalised."""
        return self.transform(self.images[index])


def evaluate(cfg: Config, model: VisionLanguageModel, split: str, out_dir: Path | None) -> dict[str, float]:
    """Recall@1/5/10 (in %) of text retrieval (tr*, image queries) and image retrieval (ir*, caption
    queries) and their mean (r_mean) on ``finetune.<split>``, plus ``k`` and the split's sizes."""
    records = load_records(getattr(cfg.finetune, split), cfg.data.image_root, EVAL_FIELDS,
                                key=f"finetune.{split}")
    images = load_eval_images(cfg, records)
    texts, text_to_image = eval_captions(records, cfg.data.max_words)
    input_ids, attention_mask = open_tokenizer(cfg.data.tokenizer, cfg.data.max_tokens).encode(texts)
    pixels = NormalisedImages(images, EvalTransform(cfg.model.vision.image_size))
    k, score = cfg.finetune.k_test, cfg.finetune.score
    log.info(f"retrieval {split}: {len(records)} images, {len(texts)} captions; top-{k} ITC candidates of each "
             f"query re-ranked by {'the ITM match logit + ITC similarity' if score == 'itm+itc' else 'ITM'}")
    result = evaluate_retrieval(model, pixels, input_ids, attention_mask, text_to_image, k=k, score=score,
                                batch_size=cfg.finetune.eval_batch_size, amp=cfg.train.precision != "fp32")
    return {**result.metrics, "k": k, "images": len(records), "texts": len(texts)}
