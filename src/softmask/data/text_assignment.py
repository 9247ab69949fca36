"""NLVR2's text-assignment records made from image-caption pairs (``softmask text-assignment``).

ALBEF pretrains its two-image NLVR2 model one epoch on a three-way task drawn from the pretraining
corpus: given a caption and two images, does the caption describe the first image (label 0), the
second (1), or neither (2, the caption of a third image)? ALBEF draws these triplets on the fly within
each batch, the partner images by image-feature similarity; softmask's ``finetune.stage:
text_assignment`` reads them from a file, which :func:`text_assignment_records` writes once: one
triplet per record, each label with the same chance, partners drawn uniformly from images other than
the caption's own.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from softmask.config import ConfigError
from softmask.data.annotations import Record


def _other_image(records: Sequence[Record], avoid: set[str], r: random.Random) -> str:
    """The image of a uniformly drawn record whose image is none of ``avoid``."""
    while True:
        image = records[r.randrange(len(records))].image
        if image not in avoid:
            return image


def text_assignment_records(records: Sequence[Record], seed: int = 0) -> list[dict]:
    """One ``{"images": [a, b], "sentence", "label": 0 | 1 | 2}`` record per image-caption record.

    Args:
        records: image-caption pairs (:func:`softmask.data.annotations.load_annotations`), image paths
            as they will be read.
        seed: the random draws (caption, label, partner images) follow it.

    Returns:
        For each record, one of its captions with: label 0, its image first and another image second;
        label 1, the other way round; label 2, two other images (it describes neither).

    Raises:
        ConfigError: fewer than three distinct images.
    """
    if len({record.image for record in records}) < 3:
        raise ConfigError(f"text assignment needs at least 3 distinct images, got {len(records)} records of fewer")
    r = random.Random(seed)
    items = []
    for record in records:
        sentence = r.choice(record.captions)
        label = r.randrange(3)
        other = _other_image(records, {record.image}, r)
        if label == 0:
            images = [record.image, other]
        elif label == 1:
            images = [other, record.image]
        else:
            images = [other, _other_image(records, {record.image, other}, r)]
        items.append({"images": images, "sentence": sentence, "label": label})
    return items
