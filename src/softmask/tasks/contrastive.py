"""The base of the tasks trained with ITC and ITM (pretraining and retrieval fine-tuning): the
momentum feature bank of the global batch, the feature queues, and ITM's hard negatives.

Shapes: B batch per process, G = world_size * B the global batch, Q queue length, E embed_dim,
T tokens, D text width, Dv image width, N patches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from softmask.config import Config
from softmask.data.transforms import training_transform
from softmask.models.vlp import freeze_modules
from softmask.objectives.itm import pad_to, sample_hard_negatives
from softmask.objectives.queue import FeatureQueue
from softmask.train import dist
from softmask.train.momentum import DistilledTask


@dataclass
class MomentumBank:
    """The momentum model's view of one batch (no gradient).

    Attributes:
        image_embeds: (B, 1 + N, Dv) momentum image tokens (the MLM teacher fuses them).
        image: (B, E) and ``text`` (B, E): this process's momentum ITC features.
        image_all: (G, E) and ``text_all`` (G, E): the global batch's, in rank order.
        mask_all: (G, T) the global batch's attention masks.
    """

    image_embeds: torch.Tensor
    image: torch.Tensor
    text: torch.Tensor
    image_all: torch.Tensor
    text_all: torch.Tensor
    mask_all: torch.Tensor

    def finite(self) -> bool:
        """Whether the global features are finite (a non-finite batch must not enter the queues)."""
        return bool(torch.isfinite(self.image_all).all() and torch.isfinite(self.text_all).all())


class ContrastiveTask(DistilledTask):
    """A :class:`DistilledTask` with an image and a text :class:`FeatureQueue` (the image queue with an
    id queue when ``queue_ids``), ALBEF's training augmentation, and the parts of ITC and ITM that
    pretraining and retrieval share. ``frozen`` names submodules of the model that the objectives never
    use; they are frozen before the momentum copy (DDP rejects trainable parameters without gradient)."""

    def __init__(self, cfg: Config, model: nn.Module, alpha_warmup_steps: int, *, queue_ids: bool = False,
                 frozen: tuple[str, ...] = ()):
        freeze_modules(model, frozen)
        super().__init__(cfg, model, alpha_warmup_steps)
        dim = cfg.model.embed_dim
        self.image_queue = FeatureQueue(dim, cfg.itc.queue_size, with_ids=queue_ids)
        self.text_queue = FeatureQueue(dim, cfg.itc.queue_size)
        self.augment = training_transform(cfg.model.vision.image_size, cfg.data.augment)

    @staticmethod
    def captions(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's ``input_ids`` and ``attention_mask`` (B, T) on ``device``, padded to the longest
        caption of all ranks (the global batch's features and tokens are gathered)."""
        ids = batch["input_ids"].to(device, non_blocking=True)
        mask = batch["attention_mask"].to(device, non_blocking=True)
        length = dist.all_reduce_max_int(ids.shape[1], device)
        return pad_to(ids, length), pad_to(mask, length)

    @torch.no_grad()
    def momentum_bank(self, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> MomentumBank:
        """The momentum features of ``images`` uint8-augmented (B, 3, S, S) and the captions ``ids``/``mask``
        (B, T), and those of the global batch."""
        mm = self.momentum_model
        image_embeds = mm.encode_image(images)
        image, text = mm.image_feat(image_embeds), mm.text_feat(mm.encode_text(ids, mask), mask)
        return MomentumBank(image_embeds, image, text, dist.all_gather(image), dist.all_gather(text),
                            dist.all_gather(mask))

    def candidates(self, bank: MomentumBank) -> tuple[torch.Tensor, torch.Tensor]:
        """ITC's candidates: the global batch's momentum features, then the queues: (G + Q, E) each."""
        return torch.cat([bank.image_all, self.image_queue.all()]), torch.cat([bank.text_all, self.text_queue.all()])

    @torch.no_grad()
    def enqueue(self, bank: MomentumBank, image_ids: torch.Tensor | None = None) -> None:
        """Push the global batch's momentum features (and ``image_ids`` (G,) into the id queue); skipped
        when they are not finite."""
        if bank.finite():
            self.image_queue.enqueue(bank.image_all, image_ids)
            self.text_queue.enqueue(bank.text_all)

    def hard_negatives(self, image_feat: torch.Tensor, text_feat: torch.Tensor, image_embeds: torch.Tensor,
                       text_embeds: torch.Tensor, mask: torch.Tensor, bank: MomentumBank, exclude: torch.Tensor,
                       gen: torch.Generator, rows: torch.Tensor, step: int):
        """For each image a hard negative text and for each text a hard negative image, sampled from
        softmax(online vs momentum similarity / temperature) over the batch, as ALBEF: this process's
        batch with ``itm.negatives=local`` (or one process), else the global batch with one random
        stream shared by every rank. Before optimiser step ``itm.easy_negatives_steps`` the draw is
        uniform over the allowed pairs; the temperature is at least ``itm.negative_temp_min``.

        Args:
            image_feat, text_feat: (B, E) online ITC features.
            image_embeds: (B, 1 + N, Dv) and ``text_embeds`` (B, T, D), ``mask`` (B, T): what the
                negatives are taken from (gathered with gradient for global negatives).
            exclude: (G, G) bool, pairs of the global batch that are never negatives (positives,
                identical captions, the same image id).
            rows: (B,) this process's rows in the global batch.
            step: the optimiser step (for ``itm.easy_negatives_steps``).

        Returns:
            text_neg (B, T, D), mask_neg (B, T), image_neg (B, 1 + N, Dv), valid (B,) bool (False for
            a row without any allowed negative; its negative is then meaningless).
        """
        itm = self.cfg.itm
        temp = self.model.temp.detach()
        if itm.negative_temp_min > 0:
            temp = temp.clamp_min(itm.negative_temp_min)
        easy = step < itm.easy_negatives_steps
        local = itm.negatives == "local" or dist.world_size() == 1
        with torch.no_grad():
            if local:
                img, txt, pick = image_feat, text_feat, slice(None)
                img_m, txt_m, exclude = bank.image_all[rows], bank.text_all[rows], exclude[rows][:, rows]
            else:
                img, txt, pick = dist.all_gather(image_feat), dist.all_gather(text_feat), rows
                img_m, txt_m = bank.image_all, bank.text_all
            sim_i2t, sim_t2i = img @ txt_m.T / temp, txt @ img_m.T / temp
            if easy:  # equal weights: a uniform draw over the allowed pairs, from the same random stream
                sim_i2t, sim_t2i = torch.zeros_like(sim_i2t), torch.zeros_like(sim_t2i)
            neg_text, neg_image, valid = sample_hard_negatives(sim_i2t, sim_t2i, gen, exclude=exclude)
            neg_text, neg_image, valid = neg_text[pick], neg_image[pick], valid[pick]
        if local:
            image_pool, text_pool, mask_pool = image_embeds, text_embeds, mask
        else:
            image_pool = dist.all_gather_with_grad(image_embeds)
            text_pool = dist.all_gather_with_grad(text_embeds)
            mask_pool = bank.mask_all
        return text_pool[neg_text], mask_pool[neg_text], image_pool[neg_image], valid
