"""Pretraining (ALBEF): ITC with momentum distillation and feature queues, ITM with hard negatives,
MLM with distillation.

:class:`PretrainObjective` holds the online model, its momentum copy, the two feature queues and the
device-side augmentation; its ``forward(batch, step)`` returns the losses of one micro-batch.

Distributed runs use the global batch: momentum features and the queues are all-gathered, hard
negatives (``itm.negatives: global``) are drawn from the whole batch with one random stream shared
by every rank, and MLM masks are drawn for the whole batch too, each rank taking its rows. With
dropout and augmentation off, N processes reproduce one process with the same global batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from softmask.config import Config
from softmask.data.sources import build_pretrain_data
from softmask.data.transforms import Distort
from softmask.models.vlp import VisionLanguageModel
from softmask.objectives.itm import identical_rows
from softmask.objectives.mlm import mask_tokens, mlm_loss
from softmask.objectives.softmask import (
    apply_soft_mask,
    attention_maps,
    choose_words,
    gradcam_maps,
    make_soft_mask,
)
from softmask.tasks.contrastive import (
    ContrastiveObjective,
    ContrastiveStep,
    HardNegatives,
    MaskedCaptions,
    PairBlock,
)
from softmask.train import dist
from softmask.train.dist import step_generator

# Text features of different captions closer than this (cosine) give ITC nothing to align.
COLLAPSED_TEXT_COSINE = 0.9999

log = logging.getLogger("softmask")


def pairwise_cosines(features: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """(B, E) features -> the cosine similarities between different rows (each ordered pair), leaving
    out the pairs where the (B, B) bool ``exclude`` is true (e.g. identical captions); may be empty."""
    unit = F.normalize(features.detach().float(), dim=-1)
    keep = ~torch.eye(len(unit), dtype=torch.bool, device=unit.device)
    if exclude is not None:
        keep &= ~exclude.to(unit.device)
    return (unit @ unit.T)[keep]


def min_pairwise_cosine(features: torch.Tensor, exclude: torch.Tensor | None = None) -> float:
    """The smallest of :func:`pairwise_cosines`; 1.0 if no pair is left."""
    cosines = pairwise_cosines(features, exclude)
    return float(cosines.min()) if cosines.numel() else 1.0


def warn_if_text_features_collapsed(text_feat: torch.Tensor, pooling: str,
                                    same_caption: torch.Tensor | None = None) -> None:
    """Log a warning when every row of ``text_feat`` (B, E) is (nearly) the same ITC text feature, as
    the [CLS] of a text encoder trained with mean pooling is for every caption (docs/results.md);
    ``same_caption`` (B, B) bool marks pairs of identical captions, which are not compared."""
    cosine = min_pairwise_cosine(text_feat, same_caption)
    if cosine >= COLLAPSED_TEXT_COSINE:
        advice = ("a randomly initialised text encoder can grow out of this, but one trained with mean "
                  "pooling (such as the sentence-transformers MiniLM) has the same [CLS] for every sentence "
                  "and does not: for such an encoder set model.text_pooling=mean"
                  if pooling == "cls" else "check the text encoder and its weights")
        log.warning(f"the captions of the first batch all have nearly the same text feature (min cosine "
                    f"{cosine:.5f}, model.text_pooling={pooling}): ITC starts with almost nothing to align; "
                    f"{advice} (docs/results.md)")


@dataclass
class SoftMasked:
    """The soft-masked images of one step: ``images`` (S, 1 + N, Dv) image tokens for the S pairs that had an
    eligible word, ``rows`` (B,) bool those pairs, ``weights`` (B, N) every pair's soft mask (detached; read
    only where ``rows``), ``weight_fraction`` the mean share of image weight the masks take away (a detached
    scalar, 0 without any)."""

    images: torch.Tensor
    rows: torch.Tensor
    weights: torch.Tensor
    weight_fraction: torch.Tensor


@dataclass
class Positives:
    """The fusion pass of the B positive pairs: ``fused`` (B, T, D) tokens, ITM ``logits`` (B, 2) and, with
    soft masks, the :class:`SoftMasked` images made from it (else None)."""

    fused: torch.Tensor
    logits: torch.Tensor
    soft: SoftMasked | None


class PretrainObjective(ContrastiveObjective):
    """The ALBEF pretraining objectives around a :class:`VisionLanguageModel`, with SoftMask's soft-masked
    positives, image distortion and text masking when ``cfg.softmask`` turns them on."""

    def __init__(self, cfg: Config, model: VisionLanguageModel, special_ids: dict[str, int],
                 alpha_warmup_steps: int, continuation: torch.Tensor | None = None):
        super().__init__(cfg, model, alpha_warmup_steps)
        self.distort = Distort(cfg.softmask.distortion_ops, cfg.softmask.distortion_magnitude,
                               cfg.data.augment.randaug_exclude)
        if cfg.softmask.soft_masks and continuation is None:
            raise ValueError("soft masks need the tokenizer's WordPiece continuation table")
        # (V,) bool: which vocabulary entries continue a word ("##..."); a buffer so it follows the device.
        self.register_buffer("continuation", continuation if continuation is not None
                             else torch.zeros(0, dtype=torch.bool), persistent=False)
        self.special_ids = sorted({special_ids["cls"], special_ids["sep"], special_ids["pad"]})  # not words
        # Never chosen for MLM: [CLS] and [PAD] (ALBEF), and [SEP] too with mlm.mask_sep=false.
        self.mlm_excluded = sorted({special_ids["cls"], special_ids["pad"],
                                    *([] if cfg.mlm.mask_sep else [special_ids["sep"]])})
        self.mask_id = special_ids["mask"]

    @torch.no_grad()
    def load_albef_queues(self, queues: dict[str, torch.Tensor], source: str) -> str:
        """Take an ALBEF checkpoint's ``image_queue``/``text_queue`` (dim, size) and ``queue_ptr`` (1,) into
        the feature queues (size, dim); returns what was done, for the log. Queues of another shape than
        ``(model.embed_dim, itc.queue_size)`` are not taken (the queues stay random)."""
        dim, size = self.cfg.model.embed_dim, self.cfg.itc.queue_size
        image, text, ptr = (queues.get(k) for k in ("image_queue", "text_queue", "queue_ptr"))
        if image is None or text is None or ptr is None:
            return f"queues: {source} holds none; they start random"
        if tuple(image.shape) != (dim, size) or tuple(text.shape) != (dim, size):
            return (f"queues: not taken from {source}: they are {tuple(image.shape)} (dim x entries) but "
                    f"model.embed_dim x itc.queue_size is ({dim}, {size}); they start random")
        position = int(ptr.reshape(-1)[0]) % size
        for queue, feats in ((self.image_queue, image), (self.text_queue, text)):
            queue.feats.copy_(feats.t())
            queue.ptr.fill_(position)
            queue.filled.fill_(size)
        return (f"queues: image_queue and text_queue ({size} entries of {dim}) and queue_ptr ({position}) taken "
                f"from {source}")

    # ---- the step (the skeleton is ContrastiveObjective.forward) ------------------------------------

    def mask_captions(self, ids_all: torch.Tensor, mask_all: torch.Tensor, rows: torch.Tensor,
                      gen: torch.Generator) -> MaskedCaptions:
        """MLM masks drawn for the whole global batch (G, T), so that every rank draws the same stream;
        this process's rows of them."""
        cfg = self.cfg
        masked_all, targets_all = mask_tokens(ids_all, mask_all, cfg.model.text.vocab_size, self.mlm_excluded,
                                              cfg.mlm.probability, gen, self.mask_id)
        return MaskedCaptions(masked_all[rows], targets_all[rows])

    def online_inputs(self, images_m: torch.Tensor, ids: torch.Tensor, masked: MaskedCaptions
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """SoftMask's multi-modal augmentation: with ``softmask.image_distortion`` the online encoders see a
        further distorted image, with ``softmask.text_masking`` the MLM-masked caption."""
        sm = self.cfg.softmask
        images = self.distort(images_m) if sm.image_distortion else images_m
        return images, masked.ids if sm.text_masking else ids

    def fused_losses(self, s: ContrastiveStep) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """ITM (positives, hard negatives and, with soft masks, the soft-masked pairs) and MLM; the
        diagnostics: missing negatives and, with soft masks, the ITM loss on the soft-masked and on the
        ordinary pairs, the number of pairs, the share of captions with a soft mask and the share of
        image weight the masks take away."""
        if s.step == 0 and s.micro == 0 and dist.rank() == 0:
            self._check_text_features(s.ids, s.mask)
        positives = self._positives(s)
        negatives = self.hard_negatives(s)
        itm = self.score_pairs(self._itm_pairs(s, positives, negatives),
                               by_kind=self.cfg.softmask.masked_loss == "added")
        loss_mlm = self._mlm_loss(s, positives.fused)
        logs = {"itm_missing_negatives": negatives.missing()}
        soft = positives.soft
        if soft is not None:
            # The ITM loss on the soft-masked pairs alone (positives, and negatives with masked_negatives):
            # near 0 while the rest sits at its prior means the head tells masked images apart, not pairs.
            soft_logits, soft_labels = itm.of("soft")
            logs["loss_itm_soft"] = (F.cross_entropy(soft_logits.float(), soft_labels) if len(soft_labels)
                                     else torch.zeros((), device=s.mask.device))
            # ... and on the ordinary pairs alone (positives and hard negatives; their prior is ALBEF's).
            pair_logits, pair_labels = itm.of("pairs")
            logs["loss_itm_pairs"] = F.cross_entropy(pair_logits.float(), pair_labels)
            logs["itm_pairs"] = torch.tensor(float(len(itm.labels)), device=s.mask.device)
            logs["soft_mask_share"] = soft.rows.float().mean()
            logs["mask_weight_fraction"] = soft.weight_fraction
        return {"itm": itm.loss, "mlm": loss_mlm}, logs

    def _itm_pairs(self, s: ContrastiveStep, positives: Positives, negatives: HardNegatives) -> list[PairBlock]:
        """Every pair ITM scores in a pretraining step, in fusion order: the ordinary pairs (the positives
        already scored by their own fusion pass), then with soft masks (``softmask.masked_pairs``) each
        soft-masked image with its caption (a match); with "negative_captions" or "all" also with its
        hard-negative caption (no match); with "all" also each caption with its hard-negative image, that
        image soft-masked by a word of its own caption (no match)."""
        blocks = self.itm_pairs(s, negatives, positive_logits=positives.logits)
        soft, which = positives.soft, self.cfg.softmask.masked_pairs
        if soft is None:
            return blocks
        blocks.append(PairBlock("soft", True, s.text_embeds[soft.rows], s.mask[soft.rows], soft.images))
        if which in ("negative_captions", "all"):
            both = soft.rows & negatives.valid
            blocks.append(PairBlock("soft", False, negatives.text[both], negatives.mask[both],
                                    soft.images[negatives.valid[soft.rows]]))
        if which == "all":
            rows, images = self._masked_negative_images(s, soft, negatives)
            blocks.append(PairBlock("soft", False, s.text_embeds[rows], s.mask[rows], images))
        return blocks

    def _masked_negative_images(self, s: ContrastiveStep, soft: SoftMasked, negatives: HardNegatives
                                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each caption's hard-negative image soft-masked with that image's own mask (made from a word of its
        own caption, as its own soft-masked positive was): the (B,) bool of the captions whose negative is
        valid and had a word, and those images' tokens (n, 1 + N, Dv). The masks of the batch the negatives
        were drawn from (the global one across processes) are gathered; they carry no gradient."""
        weights, has_word, pixels = soft.weights, soft.rows, s.images
        if not negatives.local:
            weights, has_word = dist.all_gather(weights), dist.all_gather(has_word.to(weights.dtype)) > 0.5
            if self.cfg.softmask.apply_to == "patch_embeddings":
                pixels = dist.all_gather(pixels)
        index = negatives.image_index
        rows = negatives.valid & has_word[index]
        chosen = index[rows]
        if self.cfg.softmask.apply_to == "features":
            return rows, apply_soft_mask(negatives.image[rows], weights[chosen])
        return rows, self.model.encode_image(pixels[chosen], patch_scale=weights[chosen])

    def _positives(self, s: ContrastiveStep) -> Positives:
        """The fusion pass of the positive pairs (ITM positives, MLM, and Grad-CAM for the soft masks)."""
        sm, model = self.cfg.softmask, self.model
        layer = sm.layer if sm.soft_masks else None
        fused = model.fuse(s.text_embeds, s.mask, s.image_embeds, attention_layer=layer)
        fused, attn = fused if layer is not None else (fused, None)
        logits = model.itm_logits(fused, s.mask)
        if not sm.soft_masks:
            return Positives(fused, logits, None)
        # Word choice draws from its own per-rank stream, so that the shared stream (hard negatives)
        # stays identical on every rank.
        gen_words = step_generator(self.cfg.seed + 7919 * (dist.rank() + 1), s.step, s.micro, s.ids.device)
        return Positives(fused, logits, self._soft_masked_images(s, logits, attn, gen_words))

    def _mlm_loss(self, s: ContrastiveStep, fused_pos: torch.Tensor) -> torch.Tensor:
        """MLM with distillation on the masked positions: with text masking, the positive pass already
        saw the masked caption; else (ALBEF) a separate pass of it. The teacher (the momentum model)
        sees the same masked caption as the student."""
        model, mm, mask, masked = self.model, self.momentum_model, s.mask, s.masked
        chosen = masked.targets != -100
        if self.cfg.softmask.text_masking:
            fused = fused_pos
        else:
            fused = model.fuse(model.encode_text(masked.ids, mask), mask, s.image_embeds)
        logits = model.mlm_logits(fused[chosen])  # (M, vocab): only the masked positions
        with torch.no_grad():
            teacher = mm.mlm_logits(mm.fuse(mm.encode_text(masked.ids, mask), mask, s.bank.image_embeds)[chosen])
        return dist.global_mean(mlm_loss(logits, masked.targets[chosen], teacher, self.alpha(s.step)),
                                int(chosen.sum()), mask.device, dist.world_size())

    @torch.no_grad()
    def _check_text_features(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Warn when the batch's captions all get nearly the same ITC text feature (without dropout,
        which would hide it; no random numbers are drawn)."""
        model, training = self.model, self.model.training
        model.eval()
        try:
            warn_if_text_features_collapsed(model.text_feat(model.encode_text(ids, mask), mask),
                                            self.cfg.model.text_pooling, identical_rows(ids, mask))
        finally:
            model.train(training)

    def _soft_masked_images(self, s: ContrastiveStep, logits_pos: torch.Tensor, attn: torch.Tensor,
                            gen_words: torch.Generator) -> SoftMasked:
        """Word-conditional Grad-CAM of the ITM match logits ``logits_pos`` (B, 2) w.r.t. the kept
        cross-attention ``attn`` (a partial backward to that attention only), one word per pair,
        normalised and half-compensated soft masks, applied to the image tokens (or patch embeddings,
        re-encoded)."""
        sm = self.cfg.softmask
        if sm.mask_source == "gradcam":
            (grad,) = torch.autograd.grad(logits_pos[:, 1].sum(), attn, retain_graph=True)
            token_maps = gradcam_maps(attn.detach(), grad)
        else:
            token_maps = attention_maps(attn.detach())
        with torch.no_grad():
            word_maps, has_word, _ = choose_words(token_maps.float(), s.ids, s.text_ids, s.mask,
                                                  self.continuation, self.special_ids, self.mask_id, gen_words)
            soft = make_soft_mask(word_maps, sm.ratio)  # (B, N), detached
            weight_fraction = (1.0 - soft[has_word]).mean() if has_word.any() \
                else torch.zeros((), device=soft.device)
        if sm.apply_to == "features":
            images = apply_soft_mask(s.image_embeds[has_word], soft[has_word])
        else:
            images = self.model.encode_image(s.images[has_word], patch_scale=soft[has_word])
        return SoftMasked(images, has_word, soft, weight_fraction)


# --------------------------------------------------------------------------------------------------
# The `softmask pretrain` entry point
# --------------------------------------------------------------------------------------------------




def build_objective(cfg: Config, model: VisionLanguageModel, alpha_warmup_steps: int) -> PretrainObjective:
    """The pretraining objective with the tokenizer's special ids and WordPiece continuation table."""
    from softmask.data.text import open_tokenizer

    tokenizer = open_tokenizer(cfg.data.tokenizer, cfg.data.max_tokens)
    tokenizer.check_fits(cfg.model.text.vocab_size)
    objective = PretrainObjective(cfg, model, tokenizer.special, alpha_warmup_steps,
                        tokenizer.continuation_for(cfg.model.text.vocab_size))
    if cfg.model.init:
        continue_from_albef(objective, cfg.model.init)
    return objective


def continue_from_albef(objective: PretrainObjective, init: str) -> None:
    """Continued pretraining, as ALBEF's own script does it: when ``model.init`` is an ALBEF/TCL
    pretraining checkpoint holding momentum encoders and queues, the momentum model and the queues
    start from them instead of from a copy of the online weights and random vectors. Other checkpoints
    (fine-tuned ones, softmask folders) change nothing. Both steps are logged."""
    from softmask.models.loading import load_albef_momentum, read_albef_training_state

    state = read_albef_training_state(init)
    if state is None:
        return
    source, momentum, queues = state
    log.info(load_albef_momentum(objective.momentum_model, source, momentum).summary())
    log.info(objective.load_albef_queues(queues, str(source)))


def pretrain(cfg: Config):
    """Pretrain ``cfg.method`` on ``cfg.data.train`` into ``cfg.output_dir`` (one process or torchrun)."""
    from softmask.models.loading import read_each_file_once
    from softmask.models.vlp import create_model
    from softmask.train.loop import train
    from softmask.train.schedule import alpha_warmup_steps

    info = dist.init_distributed()
    try:
        torch.manual_seed(cfg.seed)  # the same initial weights and queues on every rank
        data = build_pretrain_data(cfg, info.rank, info.world_size)
        with read_each_file_once():  # model.init is read once for the online and the momentum weights
            model = create_model(cfg)
            objective = build_objective(cfg, model, alpha_warmup_steps(cfg, data.batches_per_epoch))  # equal queues
        torch.manual_seed(cfg.seed + 1 + info.rank)  # dropout and augmentation differ across ranks
        return train(cfg, objective, data, info)
    finally:
        dist.cleanup()
