"""How well ITM tells ordinary pairs apart on images it never trained on: the training objective's ITM loss
on the test split, with no augmentation and no soft masks.

During training, the ordinary pairs' ITM loss of two recipes says how well each learned *its own* task: a
recipe that augments images and captions, or whose batches hold soft-masked pairs, learns a harder or
different task, so its training loss is not comparable with ALBEF's. This measure gives every model the
same kind of pairs, as ALBEF's ITM sees them: the test images in consecutive batches of ``batch_size``
(the run's training batch size when known), each image with its first caption (a match), each caption
with a hard negative image and each image with a hard negative caption, drawn from the batch with
probability ``softmax(ITC similarity / temperature)`` as in training (identical captions are never
negatives; the draw is seeded). So

    itm_test_loss = mean cross-entropy of the ITM head over the 3 B pairs of every batch

with the same prior as in training (0.637 when a third of the pairs match), and ``itm_test_accuracy`` the
share of those pairs the head labels right. The negatives come from each model's own ITC, as in training.
Shapes: B images per batch, T tokens, E the ITC width.
"""

from __future__ import annotations

import torch

from softmask.objectives.itm import identical_rows, itm_labels, itm_loss, sample_hard_negatives


@torch.no_grad()
def itm_test_loss(model, enc, test: list[dict], batch_size: int = 32, seed: int = 0) -> dict[str, float]:
    """The measure of the module docstring over every test image.

    Args:
        model: a VisionLanguageModel in eval mode; enc: a :class:`softmask.eval.world.WorldEncoder`.
        test: the world's retrieval_test.json records (``image``, ``caption`` list).
        batch_size: images per batch, at least 2 (the negatives are drawn within a batch).
        seed: seeds the draw of the negatives.

    Returns:
        ``itm_test_loss`` (mean cross-entropy per pair), ``itm_test_accuracy`` (%) and ``itm_test_pairs``.
    """
    if batch_size < 2:
        raise ValueError(f"itm_test_loss draws negatives within a batch: batch_size must be >= 2, got {batch_size}")
    if len(test) < 2:
        raise ValueError("itm_test_loss needs at least two test images")
    generator = torch.Generator().manual_seed(seed)  # the draw runs on the CPU, on any device
    device = model.temp.device
    total, correct, count = 0.0, 0, 0
    for start in range(0, len(test), batch_size):
        records = test[start:start + batch_size]
        if len(records) < 2:  # a last batch of one has no negative
            break
        image_embeds = model.encode_image(enc.pixels([r["image"] for r in records]).to(device))
        ids, mask = (x.to(device) for x in enc.text([r["caption"][0] for r in records]))
        text_embeds = model.encode_text(ids, mask)
        image_feat, text_feat = model.image_feat(image_embeds).float(), model.text_feat(text_embeds, mask).float()
        sim = image_feat @ text_feat.T / model.temp.float()  # (B, B)
        neg_text, neg_image, valid = sample_hard_negatives(sim.cpu(), sim.T.cpu(), generator,
                                                           exclude=identical_rows(ids, mask).cpu())
        neg_text, neg_image, valid = (x.to(device) for x in (neg_text, neg_image, valid))
        texts = torch.cat([text_embeds, text_embeds[valid], text_embeds[neg_text[valid]]])
        masks = torch.cat([mask, mask[valid], mask[neg_text[valid]]])
        images = torch.cat([image_embeds, image_embeds[neg_image[valid]], image_embeds[valid]])
        logits = model.itm_logits(model.fuse(texts, masks, images), masks).float()
        labels = itm_labels(len(records), 2 * int(valid.sum()), logits.device)
        total += float(itm_loss(logits, labels)) * len(labels)
        correct += int((logits.argmax(-1) == labels).sum())
        count += len(labels)
    return {"itm_test_loss": total / count, "itm_test_accuracy": 100.0 * correct / count,
            "itm_test_pairs": float(count)}
