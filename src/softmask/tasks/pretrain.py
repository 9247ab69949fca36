"""Pretraining (ALBEF): ITC with momentum distillation and feature queues, ITM with hard negatives,
MLM with distillation.

:class:`PretrainTask` holds the online model, its momentum copy, the two feature queues and the
device-side augmentation; its ``forward(batch, step)`` returns the losses of one micro-batch.

Distributed runs use the global batch: momentum features and the queues are all-gathered, hard
negatives (``itm.negatives: global``) are drawn from the whole batch with one random stream shared
by every rank, and MLM masks are drawn for the whole batch too, each rank taking its rows. With
dropout and augmentation off, N processes reproduce one process with the same global batch.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from softmask.config import Config
from softmask.data.sources import build_pretrain_data
from softmask.data.transforms import Distort
from softmask.models.vlp import VisionLanguageModel
from softmask.objectives.itc import focal_itc_loss, itc_targets, similarities
from softmask.objectives.itm import identical_rows, itm_loss
from softmask.objectives.mlm import mask_tokens, mlm_loss
from softmask.objectives.softmask import (
    apply_soft_mask,
    attention_maps,
    choose_words,
    gradcam_maps,
    make_soft_mask,
)
from softmask.tasks.contrastive import ContrastiveTask, MomentumBank
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


class PretrainTask(ContrastiveTask):
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
        self._last_weight_fraction = torch.zeros(())
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

    def forward(self, batch: dict, step: int, micro: int = 0) -> dict[str, torch.Tensor]:
        """One micro-batch: ``images`` uint8 (B, 3, S, S), ``input_ids``/``attention_mask`` (B, T).
        Returns the weighted total ``loss`` (with gradient) and the detached parts."""
        cfg, sm, model = self.cfg, self.cfg.softmask, self.model
        device = model.temp.device
        ids, mask = self.captions(batch, device)
        images_m = self.augment(batch["images"].to(device, non_blocking=True))  # ALBEF's augmentation
        images = self.distort(images_m) if sm.image_distortion else images_m  # the online encoders' view
        b, rank = ids.shape[0], dist.rank()
        rows = torch.arange(b, device=device) + rank * b
        gen = step_generator(self.cfg.seed, step, micro, device)
        ids_all, mask_all = dist.all_gather(ids), dist.all_gather(mask)
        with torch.no_grad():
            model.temp.clamp_(0.001, 0.5)

        masked_ids, mlm_targets = self._mlm_masks(ids_all, mask_all, rows, gen)
        online_ids = masked_ids if sm.text_masking else ids  # multi-modal augmentation: the masked caption
        image_embeds = model.encode_image(images)
        text_embeds = model.encode_text(online_ids, mask)
        image_feat, text_feat = model.image_feat(image_embeds), model.text_feat(text_embeds, mask)
        if step == 0 and micro == 0 and rank == 0:
            self._check_text_features(ids, mask)
        bank = self.momentum_bank(images_m, ids, mask)  # targets from the clean caption
        loss_itc = self._itc_loss(image_feat, text_feat, bank, rows, step)
        fused_pos, logits_pos, soft_images, soft_rows = self._positives(
            image_embeds, text_embeds, images, ids, online_ids, mask, step, micro)
        loss_itm, itm = self._itm_loss(image_feat, text_feat, image_embeds, text_embeds, mask, bank,
                                       identical_rows(ids_all, mask_all), gen, rows, step, logits_pos,
                                       soft_images, soft_rows)
        loss_mlm = self._mlm_loss(fused_pos, image_embeds, masked_ids, mlm_targets, mask, bank, step)
        self.enqueue(bank)

        loss = cfg.itc.weight * loss_itc + cfg.itm.weight * loss_itm + cfg.mlm.weight * loss_mlm
        out = {"loss": loss, "loss_itc": loss_itc.detach(), "loss_itm": loss_itm.detach(),
               "loss_mlm": loss_mlm.detach(), "alpha": torch.tensor(self.alpha(step)), "temp": model.temp.detach(),
               "itm_missing_negatives": itm["missing"]}
        if sm.soft_masks:
            out.update({key: itm[key] for key in ("loss_itm_soft", "loss_itm_pairs", "itm_pairs")})
            out["soft_mask_share"] = soft_rows.float().mean()
            out["mask_weight_fraction"] = self._last_weight_fraction
        return out

    def _mlm_masks(self, ids_all: torch.Tensor, mask_all: torch.Tensor, rows: torch.Tensor,
                   gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """MLM masks drawn for the whole global batch (G, T), so that every rank draws the same stream;
        returns this process's masked ids (B, T) and targets (B, T) (-100 where not masked)."""
        cfg = self.cfg
        masked_all, targets_all = mask_tokens(ids_all, mask_all, cfg.model.text.vocab_size, self.mlm_excluded,
                                              cfg.mlm.probability, gen, self.mask_id)
        return masked_all[rows], targets_all[rows]

    def _itc_loss(self, image_feat: torch.Tensor, text_feat: torch.Tensor, bank: MomentumBank,
                  rows: torch.Tensor, step: int) -> torch.Tensor:
        """ITC of the online features (B, E) against the global batch's momentum features and the
        queues, the targets mixed with the momentum model's similarities by the ramped alpha."""
        cfg, temp = self.cfg, self.model.temp
        image_bank, text_bank = self.candidates(bank)  # (G + Q, E)
        with torch.no_grad():
            sim_i2t_m, sim_t2i_m = similarities(bank.image, bank.text, image_bank, text_bank, temp)
            positives = torch.zeros_like(sim_i2t_m)
            positives[torch.arange(len(rows), device=rows.device), rows] = 1.0
            targets_i2t, targets_t2i = itc_targets(sim_i2t_m, sim_t2i_m, positives, self.alpha(step))
        sim_i2t, sim_t2i = similarities(image_feat, text_feat, image_bank, text_bank, temp)
        return focal_itc_loss(sim_i2t, sim_t2i, targets_i2t, targets_t2i, cfg.itc.gamma, cfg.itc.focal,
                              positives=positives.bool())

    def _positives(self, image_embeds, text_embeds, images, ids, online_ids, mask, step, micro):
        """The fusion pass of the positive pairs (ITM positives, MLM, and Grad-CAM for the soft masks).

        Returns the fused tokens (B, T, D), the ITM logits (B, 2), and the soft-masked image tokens
        (S, 1 + N, Dv) with the (B,) bool of their pairs (None and all False without soft masks)."""
        sm, model = self.cfg.softmask, self.model
        layer = sm.layer if sm.soft_masks else None
        fused = model.fuse(text_embeds, mask, image_embeds, attention_layer=layer)
        fused, attn = fused if layer is not None else (fused, None)
        logits = model.itm_logits(fused, mask)
        if not sm.soft_masks:
            return fused, logits, None, torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        # Word choice draws from its own per-rank stream, so that the shared stream (hard negatives)
        # stays identical on every rank.
        gen_words = step_generator(self.cfg.seed + 7919 * (dist.rank() + 1), step, micro, ids.device)
        soft_images, soft_rows = self._soft_masked_images(logits, attn, images, image_embeds, ids, online_ids,
                                                          mask, gen_words)
        return fused, logits, soft_images, soft_rows

    def _itm_loss(self, image_feat, text_feat, image_embeds, text_embeds, mask, bank, same_caption, gen, rows, step,
                  logits_pos, soft_images, soft_rows) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """ITM over the B positives, 2 * (valid rows) hard negatives and the soft-masked positives (and,
        with ``softmask.masked_negatives``, each soft-masked image with its hard-negative caption), the
        non-positive pairs in one fusion pass. Returns the loss and the detached diagnostics
        (``missing`` negatives; ``loss_itm_soft`` and ``itm_pairs`` with soft masks)."""
        model, device, b = self.model, mask.device, mask.shape[0]
        text_neg, mask_neg, image_neg, valid = self.hard_negatives(image_feat, text_feat, image_embeds, text_embeds,
                                                                   mask, bank, same_caption, gen, rows, step)
        texts = [text_embeds[valid], text_neg[valid]]
        masks = [mask[valid], mask_neg[valid]]
        images_fused = [image_neg[valid], image_embeds[valid]]
        num_soft_neg = 0
        if soft_images is not None:
            texts.append(text_embeds[soft_rows])
            masks.append(mask[soft_rows])
            images_fused.append(soft_images)
            if self.cfg.softmask.masked_negatives:  # each soft-masked image with its hard-negative caption: 0
                keep = valid[soft_rows]
                texts.append(text_neg[soft_rows & valid])
                masks.append(mask_neg[soft_rows & valid])
                images_fused.append(soft_images[keep])
                num_soft_neg = int(keep.sum())
        masks_rest = torch.cat(masks)
        logits_rest = model.itm_logits(model.fuse(torch.cat(texts), masks_rest, torch.cat(images_fused)), masks_rest)
        num_neg, num_soft = 2 * int(valid.sum()), int(soft_rows.sum())
        labels = torch.cat([torch.ones(b, dtype=torch.long, device=device),
                            torch.zeros(num_neg, dtype=torch.long, device=device),
                            torch.ones(num_soft, dtype=torch.long, device=device),
                            torch.zeros(num_soft_neg, dtype=torch.long, device=device)])
        logits = torch.cat([logits_pos, logits_rest])
        loss = dist.global_mean(itm_loss(logits, labels), len(labels), device, dist.world_size())
        info = {"missing": (~valid).sum().detach().float()}
        if soft_images is not None:
            # The ITM loss on the soft-masked pairs alone (positives, and negatives with masked_negatives):
            # near 0 while the rest sits at its prior means the head tells masked images apart, not pairs.
            soft_logits = logits[b + num_neg:].detach()
            info["loss_itm_soft"] = (F.cross_entropy(soft_logits.float(), labels[b + num_neg:]) if num_soft
                                     else torch.zeros((), device=device))
            # ... and on the ordinary pairs alone (positives and hard negatives; their prior is ALBEF's).
            info["loss_itm_pairs"] = F.cross_entropy(logits[:b + num_neg].detach().float(), labels[:b + num_neg])
            info["itm_pairs"] = torch.tensor(float(len(labels)), device=device)
        return loss, info

    def _mlm_loss(self, fused_pos, image_embeds, masked_ids, mlm_targets, mask, bank, step) -> torch.Tensor:
        """MLM with distillation on the masked positions: with text masking, the positive pass already
        saw the masked caption; else (ALBEF) a separate pass of it. The teacher (the momentum model)
        sees the same masked caption as the student."""
        model, mm, device = self.model, self.momentum_model, mask.device
        chosen = mlm_targets != -100
        if self.cfg.softmask.text_masking:
            fused = fused_pos
        else:
            fused = model.fuse(model.encode_text(masked_ids, mask), mask, image_embeds)
        logits = model.mlm_logits(fused[chosen])  # (M, vocab): only the masked positions
        with torch.no_grad():
            teacher = mm.mlm_logits(mm.fuse(mm.encode_text(masked_ids, mask), mask, bank.image_embeds)[chosen])
        return dist.global_mean(mlm_loss(logits, mlm_targets[chosen], teacher, self.alpha(step)),
                                int(chosen.sum()), device, dist.world_size())

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

    def _soft_masked_images(self, logits_pos, attn, images, image_embeds, clean_ids, online_ids, mask,
                            gen_words):
        """Word-conditional Grad-CAM of the ITM match logit w.r.t. the kept cross-attention (a partial
        backward to that attention only), one word per pair, normalised and half-compensated soft masks,
        applied to the image tokens (or patch embeddings, re-encoded).

        Returns soft-masked image tokens (S, 1 + N, Dv) for the S pairs that had an eligible word, and
        the (B,) bool of those pairs."""
        sm = self.cfg.softmask
        if sm.mask_source == "gradcam":
            (grad,) = torch.autograd.grad(logits_pos[:, 1].sum(), attn, retain_graph=True)
            token_maps = gradcam_maps(attn.detach(), grad)
        else:
            token_maps = attention_maps(attn.detach())
        with torch.no_grad():
            word_maps, has_word, _ = choose_words(token_maps.float(), clean_ids, online_ids, mask,
                                                  self.continuation, self.special_ids, self.mask_id, gen_words)
            soft = make_soft_mask(word_maps, sm.ratio)  # (B, N), detached
            self._last_weight_fraction = (1.0 - soft[has_word]).mean() if has_word.any() \
                else torch.zeros((), device=soft.device)
        if sm.apply_to == "features":
            return apply_soft_mask(image_embeds[has_word], soft[has_word]), has_word
        return self.model.encode_image(images[has_word], patch_scale=soft[has_word]), has_word


# --------------------------------------------------------------------------------------------------
# The `softmask pretrain` entry point
# --------------------------------------------------------------------------------------------------




def build_task(cfg: Config, model: VisionLanguageModel, alpha_warmup_steps: int) -> PretrainTask:
    """The pretraining task with the tokenizer's special ids and WordPiece continuation table."""
    from softmask.data.text import open_tokenizer

    tokenizer = open_tokenizer(cfg.data.tokenizer, cfg.data.max_tokens)
    tokenizer.check_fits(cfg.model.text.vocab_size)
    task = PretrainTask(cfg, model, tokenizer.special, alpha_warmup_steps,
                        tokenizer.continuation_for(cfg.model.text.vocab_size))
    if cfg.model.init:
        continue_from_albef(task, cfg.model.init)
    return task


def continue_from_albef(task: PretrainTask, init: str) -> None:
    """Continued pretraining, as ALBEF's own script does it: when ``model.init`` is an ALBEF/TCL
    pretraining checkpoint holding momentum encoders and queues, the momentum model and the queues
    start from them instead of from a copy of the online weights and random vectors. Other checkpoints
    (fine-tuned ones, softmask folders) change nothing. Both steps are logged."""
    from softmask.models.loading import load_albef_momentum, read_albef_training_state

    state = read_albef_training_state(init)
    if state is None:
        return
    source, momentum, queues = state
    log.info(load_albef_momentum(task.momentum_model, source, momentum).summary())
    log.info(task.load_albef_queues(queues, str(source)))


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
            task = build_task(cfg, model, alpha_warmup_steps(cfg, data.batches_per_epoch))  # equal queues on all ranks
        torch.manual_seed(cfg.seed + 1 + info.rank)  # dropout and augmentation differ across ranks
        return train(cfg, task, data, info)
    finally:
        dist.cleanup()
