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
from softmask.objectives.itc import focal_itc_loss, id_positives, itc_targets, similarities
from softmask.objectives.itm import identical_rows, itm_loss
from softmask.tasks.contrastive import ContrastiveTask, MomentumBank
from softmask.train import dist
from softmask.train.dist import step_generator
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


def retrieval_itc_targets(ids: torch.Tensor, id_bank: torch.Tensor, sim_i2t_m: torch.Tensor,
                          sim_t2i_m: torch.Tensor, alpha: float
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The id-aware ITC targets of retrieval fine-tuning.

    Args:
        ids: (B,) long image ids of this process's batch rows.
        id_bank: (K,) long ids of the candidates: the global batch's ids, then the id queue's
            (``-1`` in never written slots, which match nothing).
        sim_i2t_m: (B, K) image-to-text similarities of the momentum model.
        sim_t2i_m: (B, K) text-to-image similarities of the momentum model.
        alpha: distillation weight in [0, 1].

    Returns:
        ``(targets_i2t, targets_t2i, positives)``: the targets (B, K) float32, rows summing to 1,
        ``alpha * softmax(sim_m) + (1 - alpha) * positives / row sum``; and the (B, K) float32
        positives (1 where the candidate shares the row's image id).
    """
    positives = id_positives(ids, id_bank)
    targets_i2t, targets_t2i = itc_targets(sim_i2t_m, sim_t2i_m, positives, alpha)
    return targets_i2t, targets_t2i, positives


def same_image_or_caption(image_ids: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(G,) ids, (G, T) tokens and mask -> (G, G) bool: pairs that must not be ITM negatives (the
    same image id, or identical captions)."""
    return (image_ids[:, None] == image_ids[None, :]) | identical_rows(input_ids, mask)


class RetrievalTask(ContrastiveTask):
    """ITC (id-aware positives, momentum distillation, queues with ids) + ITM (hard negatives) around
    a :class:`VisionLanguageModel`."""

    def __init__(self, cfg: Config, model: VisionLanguageModel, alpha_warmup_steps: int):
        super().__init__(cfg, model, alpha_warmup_steps, queue_ids=True, frozen=UNUSED_MODULES)

    def forward(self, batch: dict, step: int, micro: int = 0) -> dict[str, torch.Tensor]:
        """One micro-batch: ``images`` uint8 (B, 3, S, S), ``input_ids``/``attention_mask`` (B, T),
        ``image_id`` long (B,). Returns the total ``loss`` (with gradient) and detached parts."""
        cfg, model = self.cfg, self.model
        device = model.temp.device
        ids, mask = self.captions(batch, device)
        image_ids = batch["image_id"].to(device, non_blocking=True).long()
        images = self.augment(batch["images"].to(device, non_blocking=True))
        b = ids.shape[0]
        rows = torch.arange(b, device=device) + dist.rank() * b
        with torch.no_grad():
            model.temp.clamp_(0.001, 0.5)

        image_embeds = model.encode_image(images)
        text_embeds = model.encode_text(ids, mask)
        image_feat, text_feat = model.image_feat(image_embeds), model.text_feat(text_embeds, mask)
        bank = self.momentum_bank(images, ids, mask)
        image_ids_all = dist.all_gather(image_ids)
        loss_itc = self._itc_loss(image_feat, text_feat, image_ids, image_ids_all, bank, step)
        exclude = same_image_or_caption(image_ids_all, dist.all_gather(ids), bank.mask_all)
        loss_itm, missing = self._itm_loss(image_feat, text_feat, image_embeds, text_embeds, mask, bank, exclude,
                                           rows, step, micro)
        self.enqueue(bank, image_ids_all)
        loss = cfg.itc.weight * loss_itc + cfg.itm.weight * loss_itm
        return {"loss": loss, "loss_itc": loss_itc.detach(), "loss_itm": loss_itm.detach(),
                "alpha": torch.tensor(self.alpha(step)), "temp": model.temp.detach(),
                "itm_missing_negatives": missing}

    def _itc_loss(self, image_feat: torch.Tensor, text_feat: torch.Tensor, image_ids: torch.Tensor,
                  image_ids_all: torch.Tensor, bank: MomentumBank, step: int) -> torch.Tensor:
        """ITC of the online features (B, E) against the global batch's momentum features and the
        queues (G + Q candidates), with every candidate of the same image id a positive."""
        cfg, temp = self.cfg, self.model.temp
        image_all, text_all = self.candidates(bank)  # (G + Q, E)
        id_bank = torch.cat([image_ids_all, self.image_queue.all_ids()])  # (G + Q,)
        with torch.no_grad():
            sim_i2t_m, sim_t2i_m = similarities(bank.image, bank.text, image_all, text_all, temp)
            targets_i2t, targets_t2i, positives = retrieval_itc_targets(image_ids, id_bank, sim_i2t_m, sim_t2i_m,
                                                                        self.alpha(step))
        sim_i2t, sim_t2i = similarities(image_feat, text_feat, image_all, text_all, temp)
        return focal_itc_loss(sim_i2t, sim_t2i, targets_i2t, targets_t2i, cfg.itc.gamma, cfg.itc.focal,
                              positives=positives.bool())

    def _itm_loss(self, image_feat, text_feat, image_embeds, text_embeds, mask, bank, exclude, rows, step, micro
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """ITM cross-entropy over the B positive pairs and 2 * (valid rows) hard negatives (never of the
        same image id nor an identical caption), one fusion pass; returns the loss and the count of rows
        without an allowed negative (detached)."""
        model, device = self.model, mask.device
        gen = step_generator(self.cfg.seed, step, micro, device)
        text_neg, mask_neg, image_neg, valid = self.hard_negatives(image_feat, text_feat, image_embeds,
                                                                   text_embeds, mask, bank, exclude, gen, rows,
                                                                   step)
        texts = torch.cat([text_embeds, text_embeds[valid], text_neg[valid]])
        masks = torch.cat([mask, mask[valid], mask_neg[valid]])
        images = torch.cat([image_embeds, image_neg[valid], image_embeds[valid]])
        logits = model.itm_logits(model.fuse(texts, masks, images), masks)
        b, num_neg = mask.shape[0], 2 * int(valid.sum())
        labels = torch.cat([torch.ones(b, dtype=torch.long, device=device),
                            torch.zeros(num_neg, dtype=torch.long, device=device)])
        loss = dist.global_mean(itm_loss(logits, labels), b + num_neg, device, dist.world_size())
        return loss, (~valid).sum().detach().float()


# --------------------------------------------------------------------------------------------------
# The task interface (softmask.tasks.finetune.TaskDefinition)
# --------------------------------------------------------------------------------------------------


def build_model(cfg: Config) -> VisionLanguageModel:
    """The plain model with ``model.init`` (a pretrained softmask folder or ALBEF checkpoint; position
    embeddings interpolated when the image size differs) loaded."""
    return create_model(cfg)


def build_task(cfg: Config, model: VisionLanguageModel, batches_per_epoch: int | None) -> RetrievalTask:
    return RetrievalTask(cfg, model, alpha_warmup_steps(cfg, batches_per_epoch))


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
