"""The base of the objectives trained with ITC and ITM (pretraining and retrieval fine-tuning): their one
forward skeleton, the momentum feature bank of the global batch, the feature queues, ITM's hard
negatives and the pairs ITM scores.

Hard-negative mining has two halves. This module holds *where the negatives come from*: which
similarities the draw is made over (this process's batch or the global one; uniform weights before
``itm.easy_negatives_steps``; the temperature floor ``itm.negative_temp_min``), which pairs are never
negatives (identical captions, the same image id), and fetching the chosen negatives' tokens, with
gradient, across ranks. :mod:`softmask.objectives.itm` holds *the draw*: one negative per row from the
softmax over the allowed pairs, robust to NaN, underflow and rows without any allowed pair.

The pairs ITM scores are assembled in one place, :meth:`ContrastiveObjective.itm_pairs` (pretraining
adds its soft-masked pairs to them), as :class:`PairBlock` s whose labels :meth:`ContrastiveObjective.score_pairs`
makes.

Shapes: B batch per process, G = world_size * B the global batch, Q queue length, E embed_dim,
T tokens, D text width, Dv image width, N patches, S image side.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from softmask.config import Config
from softmask.data.transforms import training_transform
from softmask.models.vlp import freeze_modules
from softmask.objectives.itc import focal_itc_loss, id_positives, itc_targets, similarities
from softmask.objectives.itm import identical_rows, itm_labels, itm_loss, pad_to, sample_hard_negatives
from softmask.objectives.queue import FeatureQueue
from softmask.tasks.momentum import DistilledObjective
from softmask.train import dist
from softmask.train.dist import step_generator


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


@dataclass
class MaskedCaptions:
    """MLM's masks of this process's captions: ``ids`` (B, T) the masked captions and ``targets`` (B, T)
    the original token where one was chosen, -100 elsewhere."""

    ids: torch.Tensor
    targets: torch.Tensor


@dataclass
class ContrastiveStep:
    """The tensors of one micro-batch that the objectives read.

    Attributes:
        step, micro: the optimiser step and the micro-batch within it.
        gen: the micro-batch's shared random stream (MLM masks, then hard negatives): the same on every rank.
        rows: (B,) this process's rows in the global batch.
        ids, mask: (B, T) the clean captions, padded to the longest caption of all ranks.
        ids_all, mask_all: (G, T) the global batch's.
        image_ids, image_ids_all: (B,) and (G,) long image ids (with an id queue), else None.
        masked: MLM's masks (objectives with MLM), else None.
        images: (B, 3, S, S) the online encoders' view of the images (normalised float).
        text_ids: (B, T) the caption the online text encoder read (``ids`` or ``masked.ids``).
        image_embeds: (B, 1 + N, Dv), ``text_embeds`` (B, T, D): the online encoders' tokens.
        image_feat, text_feat: (B, E) the online ITC features.
        bank: the momentum model's view (:class:`MomentumBank`).
    """

    step: int
    micro: int
    gen: torch.Generator
    rows: torch.Tensor
    ids: torch.Tensor
    mask: torch.Tensor
    ids_all: torch.Tensor
    mask_all: torch.Tensor
    image_ids: torch.Tensor | None
    image_ids_all: torch.Tensor | None
    masked: MaskedCaptions | None
    images: torch.Tensor
    text_ids: torch.Tensor
    image_embeds: torch.Tensor
    text_embeds: torch.Tensor
    image_feat: torch.Tensor
    text_feat: torch.Tensor
    bank: MomentumBank


@dataclass
class HardNegatives:
    """One hard negative per row (see :meth:`ContrastiveObjective.hard_negatives`): ``text`` (B, T, D) and
    ``mask`` (B, T) a negative caption for each image, ``image`` (B, 1 + N, Dv) a negative image for each
    caption, ``valid`` (B,) bool (False for a row without any allowed negative; its negatives are then
    meaningless); ``image_index`` (B,) long, the negative image's row in the batch it was drawn from (this
    process's with ``local``, else the global batch in rank order)."""

    text: torch.Tensor
    mask: torch.Tensor
    image: torch.Tensor
    valid: torch.Tensor
    image_index: torch.Tensor
    local: bool

    def missing(self) -> torch.Tensor:
        """How many rows have no negative (a detached float scalar, for the log)."""
        return (~self.valid).sum().detach().float()


@dataclass
class PairBlock:
    """Pairs for ITM, all matches (``match``) or all non-matches: caption tokens ``text`` (n, T, D) with
    their ``mask`` (n, T), and image tokens ``image`` (n, 1 + N, Dv). ``logits`` (n, 2): already scored
    by a fusion pass of their own, else None (scored by :meth:`ContrastiveObjective.score_pairs`).
    ``kind`` names the block's group for diagnostics ("pairs": the ordinary ITM pairs)."""

    kind: str
    match: bool
    text: torch.Tensor
    mask: torch.Tensor
    image: torch.Tensor
    logits: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.mask.shape[0]


@dataclass
class ITMScores:
    """ITM over a list of :class:`PairBlock` s: ``loss`` (this rank's share of the global mean, with
    gradient), ``logits`` (M, 2) and ``labels`` (M,) of every pair in block order."""

    loss: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor
    blocks: list[PairBlock]

    def of(self, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The detached logits (m, 2) and labels (m,) of the blocks of ``kind``, in block order."""
        rows = rows_of_kind(self.blocks, kind, self.labels.device)
        return self.logits.detach()[rows], self.labels[rows]


def rows_of_kind(blocks: list[PairBlock], kind: str, device: torch.device) -> torch.Tensor:
    """(m,) the indices of the pairs of ``blocks`` (concatenated in order) that belong to blocks of ``kind``."""
    spans, start = [], 0
    for block in blocks:
        if block.kind == kind:
            spans.append(torch.arange(start, start + len(block), device=device))
        start += len(block)
    return torch.cat(spans) if spans else torch.zeros(0, dtype=torch.long, device=device)


class ContrastiveObjective(DistilledObjective):
    """A :class:`DistilledObjective` with an image and a text :class:`FeatureQueue` (the image queue with an
    id queue when ``queue_ids``: then the batch holds ``image_id`` (B,) and every caption of the same
    image is an ITC positive and never an ITM negative), ALBEF's training augmentation, and the forward
    pass that pretraining and retrieval share. ``frozen`` names submodules of the model that the
    objectives never use; they are frozen before the momentum copy (DDP rejects trainable parameters
    without gradient).

    A subclass changes the online encoders' view (:meth:`online_inputs`), draws MLM masks
    (:meth:`mask_captions`) and computes the fusion encoder's losses (:meth:`fused_losses`: ITM by default).
    """

    def __init__(self, cfg: Config, model: nn.Module, alpha_warmup_steps: int, *, queue_ids: bool = False,
                 frozen: tuple[str, ...] = ()):
        freeze_modules(model, frozen)
        super().__init__(cfg, model, alpha_warmup_steps)
        dim = cfg.model.embed_dim
        self.image_queue = FeatureQueue(dim, cfg.itc.queue_size, with_ids=queue_ids)
        self.text_queue = FeatureQueue(dim, cfg.itc.queue_size)
        self.augment = training_transform(cfg.model.vision.image_size, cfg.data.augment)

    # ---- the forward skeleton ------------------------------------------------------------------

    def forward(self, batch: dict, step: int, micro: int = 0) -> dict[str, torch.Tensor]:
        """One micro-batch: ``images`` uint8 (B, 3, S, S), ``input_ids``/``attention_mask`` (B, T) (and
        ``image_id`` (B,) with an id queue). Returns the weighted total ``loss`` (with gradient), each
        ``loss_<name>``, ``alpha``, ``temp`` and the fusion losses' diagnostics, all detached."""
        s = self.encode(batch, step, micro)
        losses = {"itc": self.itc_loss(s)}
        fused, logs = self.fused_losses(s)
        losses.update(fused)
        self.enqueue(s.bank, s.image_ids_all)
        weights = {"itc": self.cfg.itc.weight, "itm": self.cfg.itm.weight, "mlm": self.cfg.mlm.weight}
        total = None
        for name, value in losses.items():
            total = weights[name] * value if total is None else total + weights[name] * value
        return {"loss": total, **{f"loss_{name}": value.detach() for name, value in losses.items()},
                "alpha": torch.tensor(self.alpha(step)), "temp": self.model.temp.detach(), **logs}

    def encode(self, batch: dict, step: int, micro: int) -> ContrastiveStep:
        """Read the micro-batch, clamp the temperature to ALBEF's [0.001, 0.5], draw the MLM masks, run
        the online encoders on their view and the momentum model on ALBEF's augmentation and the clean
        caption."""
        model = self.model
        device = model.temp.device
        ids, mask = self.captions(batch, device)
        images_m = self.augment(batch["images"].to(device, non_blocking=True))  # ALBEF's augmentation
        b = ids.shape[0]
        rows = torch.arange(b, device=device) + dist.rank() * b
        gen = step_generator(self.cfg.seed, step, micro, device)
        ids_all, mask_all = dist.all_gather(ids), dist.all_gather(mask)
        image_ids = image_ids_all = None
        if self.image_queue.with_ids:
            image_ids = batch["image_id"].to(device, non_blocking=True).long()
            image_ids_all = dist.all_gather(image_ids)
        with torch.no_grad():
            model.temp.clamp_(0.001, 0.5)
        masked = self.mask_captions(ids_all, mask_all, rows, gen)
        images, text_ids = self.online_inputs(images_m, ids, masked)
        image_embeds = model.encode_image(images)
        text_embeds = model.encode_text(text_ids, mask)
        image_feat, text_feat = model.image_feat(image_embeds), model.text_feat(text_embeds, mask)
        bank = self.momentum_bank(images_m, ids, mask, mask_all)  # targets from the clean caption
        return ContrastiveStep(step, micro, gen, rows, ids, mask, ids_all, mask_all, image_ids, image_ids_all,
                               masked, images, text_ids, image_embeds, text_embeds, image_feat, text_feat, bank)

    def mask_captions(self, ids_all: torch.Tensor, mask_all: torch.Tensor, rows: torch.Tensor,
                      gen: torch.Generator) -> MaskedCaptions | None:
        """MLM's masks of this process's captions, drawn from ``gen``; None (the default): no MLM."""
        return None

    def online_inputs(self, images_m: torch.Tensor, ids: torch.Tensor, masked: MaskedCaptions | None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """What the online encoders see: the images (B, 3, S, S) and the caption ids (B, T). The default is
        the momentum model's view: ALBEF's augmentation ``images_m`` and the clean caption ``ids``."""
        return images_m, ids

    def fused_losses(self, s: ContrastiveStep) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The fusion encoder's losses by name (with gradient; ITM here) and their detached diagnostics."""
        negatives = self.hard_negatives(s)
        itm = self.score_pairs(self.itm_pairs(s, negatives))
        return {"itm": itm.loss}, {"itm_missing_negatives": negatives.missing()}

    # ---- ITC ---------------------------------------------------------------------------------------

    @staticmethod
    def captions(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's ``input_ids`` and ``attention_mask`` (B, T) on ``device``, padded to the longest
        caption of all ranks (the global batch's features and tokens are gathered)."""
        ids = batch["input_ids"].to(device, non_blocking=True)
        mask = batch["attention_mask"].to(device, non_blocking=True)
        length = dist.all_reduce_max_int(ids.shape[1], device)
        return pad_to(ids, length), pad_to(mask, length)

    @torch.no_grad()
    def momentum_bank(self, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                      mask_all: torch.Tensor) -> MomentumBank:
        """The momentum features of ``images`` uint8-augmented (B, 3, S, S) and the captions ``ids``/``mask``
        (B, T), and those of the global batch (whose masks are ``mask_all`` (G, T))."""
        mm = self.momentum_model
        image_embeds = mm.encode_image(images)
        image, text = mm.image_feat(image_embeds), mm.text_feat(mm.encode_text(ids, mask), mask)
        return MomentumBank(image_embeds, image, text, dist.all_gather(image), dist.all_gather(text), mask_all)

    def candidates(self, bank: MomentumBank) -> tuple[torch.Tensor, torch.Tensor]:
        """ITC's candidates: the global batch's momentum features, then the queues: (G + Q, E) each."""
        return torch.cat([bank.image_all, self.image_queue.all()]), torch.cat([bank.text_all, self.text_queue.all()])

    def itc_positives(self, s: ContrastiveStep, sim_m: torch.Tensor) -> torch.Tensor:
        """(B, G + Q) ITC positives of each row, shaped and typed like ``sim_m``: with image ids, every
        candidate of the same image id, in the batch or in the queue (several per row); else the row's own
        momentum feature (one per row)."""
        if s.image_ids is not None:
            return id_positives(s.image_ids, torch.cat([s.image_ids_all, self.image_queue.all_ids()]))
        positives = torch.zeros_like(sim_m)
        positives[torch.arange(len(s.rows), device=s.rows.device), s.rows] = 1.0
        return positives

    def itc_loss(self, s: ContrastiveStep) -> torch.Tensor:
        """(Focal) ITC of the online features (B, E) against the global batch's momentum features and the
        queues (G + Q candidates), the targets mixed with the momentum model's similarities by the
        ramped alpha."""
        cfg, temp = self.cfg, self.model.temp
        image_all, text_all = self.candidates(s.bank)  # (G + Q, E)
        with torch.no_grad():
            sim_i2t_m, sim_t2i_m = similarities(s.bank.image, s.bank.text, image_all, text_all, temp)
            positives = self.itc_positives(s, sim_i2t_m)
            targets_i2t, targets_t2i = itc_targets(sim_i2t_m, sim_t2i_m, positives, self.alpha(s.step))
        sim_i2t, sim_t2i = similarities(s.image_feat, s.text_feat, image_all, text_all, temp)
        return focal_itc_loss(sim_i2t, sim_t2i, targets_i2t, targets_t2i, cfg.itc.gamma, cfg.itc.focal,
                              positives=positives.bool())

    @torch.no_grad()
    def enqueue(self, bank: MomentumBank, image_ids: torch.Tensor | None = None) -> None:
        """Push the global batch's momentum features (and ``image_ids`` (G,) into the id queue); skipped
        when they are not finite."""
        if bank.finite():
            self.image_queue.enqueue(bank.image_all, image_ids)
            self.text_queue.enqueue(bank.text_all)

    # ---- ITM ---------------------------------------------------------------------------------------

    @staticmethod
    def never_negatives(s: ContrastiveStep) -> torch.Tensor:
        """(G, G) bool: pairs of the global batch that are never ITM negatives: identical captions, and
        captions of the same image id."""
        exclude = identical_rows(s.ids_all, s.mask_all)
        if s.image_ids_all is not None:
            exclude = (s.image_ids_all[:, None] == s.image_ids_all[None, :]) | exclude
        return exclude

    def hard_negatives(self, s: ContrastiveStep) -> HardNegatives:
        """For each image a hard negative caption and for each caption a hard negative image, sampled from
        softmax(online vs momentum similarity / temperature) over the batch, as ALBEF: this process's
        batch with ``itm.negatives=local`` (or one process), else the global batch with the step's random
        stream ``s.gen``, shared by every rank. Before optimiser step ``itm.easy_negatives_steps`` the draw
        is uniform over the allowed pairs; the temperature is at least ``itm.negative_temp_min``. Pairs of
        :meth:`never_negatives` are never drawn."""
        itm, bank, rows = self.cfg.itm, s.bank, s.rows
        exclude = self.never_negatives(s)
        temp = self.model.temp.detach()
        if itm.negative_temp_min > 0:
            temp = temp.clamp_min(itm.negative_temp_min)
        easy = s.step < itm.easy_negatives_steps
        local = itm.negatives == "local" or dist.world_size() == 1
        with torch.no_grad():
            if local:
                img, txt, pick = s.image_feat, s.text_feat, slice(None)
                img_m, txt_m, exclude = bank.image_all[rows], bank.text_all[rows], exclude[rows][:, rows]
            else:
                img, txt, pick = dist.all_gather(s.image_feat), dist.all_gather(s.text_feat), rows
                img_m, txt_m = bank.image_all, bank.text_all
            sim_i2t, sim_t2i = img @ txt_m.T / temp, txt @ img_m.T / temp
            if easy:  # equal weights: a uniform draw over the allowed pairs, from the same random stream
                sim_i2t, sim_t2i = torch.zeros_like(sim_i2t), torch.zeros_like(sim_t2i)
            neg_text, neg_image, valid = sample_hard_negatives(sim_i2t, sim_t2i, s.gen, exclude=exclude)
            neg_text, neg_image, valid = neg_text[pick], neg_image[pick], valid[pick]
        if local:
            image_pool, text_pool, mask_pool = s.image_embeds, s.text_embeds, s.mask
        else:
            image_pool = dist.all_gather_with_grad(s.image_embeds)
            text_pool = dist.all_gather_with_grad(s.text_embeds)
            mask_pool = bank.mask_all
        return HardNegatives(text_pool[neg_text], mask_pool[neg_text], image_pool[neg_image], valid, neg_image, local)

    @staticmethod
    def itm_pairs(s: ContrastiveStep, negatives: HardNegatives, positive_logits: torch.Tensor | None = None
                  ) -> list[PairBlock]:
        """The ordinary ITM pairs, in ALBEF's order: the B positives (already scored when
        ``positive_logits`` (B, 2) is given), each caption with its hard negative image, and each hard
        negative caption with its image (the rows with a valid negative: 2 * valid of them)."""
        valid = negatives.valid
        return [PairBlock("pairs", True, s.text_embeds, s.mask, s.image_embeds, positive_logits),
                PairBlock("pairs", False, s.text_embeds[valid], s.mask[valid], negatives.image[valid]),
                PairBlock("pairs", False, negatives.text[valid], negatives.mask[valid], s.image_embeds[valid])]

    def score_pairs(self, blocks: list[PairBlock], by_kind: bool = False) -> ITMScores:
        """ITM cross-entropy over every pair of ``blocks``: the blocks not scored yet in one fusion pass,
        the labels 1 for matches and 0 for the rest (:func:`~softmask.objectives.itm.itm_labels`). The loss
        is the mean over all pairs, or with ``by_kind`` the sum of the means of each kind of block."""
        model = self.model
        pending = [block for block in blocks if block.logits is None]
        fused_logits: list[torch.Tensor] = []
        if pending:
            masks = torch.cat([block.mask for block in pending])
            fused = model.fuse(torch.cat([block.text for block in pending]), masks,
                               torch.cat([block.image for block in pending]))
            fused_logits = list(model.itm_logits(fused, masks).split([len(block) for block in pending]))
        fused_logits.reverse()
        logits = torch.cat([block.logits if block.logits is not None else fused_logits.pop() for block in blocks])
        device = logits.device
        labels = torch.cat([itm_labels(len(block), 0, device) if block.match else itm_labels(0, len(block), device)
                            for block in blocks])
        if not by_kind:
            loss = dist.global_mean(itm_loss(logits, labels), len(labels), device, dist.world_size())
            return ITMScores(loss, logits, labels, blocks)
        loss = 0.0
        for kind in dict.fromkeys(block.kind for block in blocks):
            rows = rows_of_kind(blocks, kind, device)
            # A kind with no pairs on this rank still joins the reduction (a zero that keeps the graph).
            mean = itm_loss(logits[rows], labels[rows]) if len(rows) else logits.sum() * 0.0
            loss = loss + dist.global_mean(mean, len(rows), device, dist.world_size())
        return ITMScores(loss, logits, labels, blocks)
