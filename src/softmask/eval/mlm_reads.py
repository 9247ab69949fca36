"""What a model's fusion reads from the image, word group by word group: MLM on one masked word of each
world test caption, with the caption's own image vs a random other one.

For each word group (colour, shape, size, pattern, relation) the test captions holding a word of the group
give one item each (the first ``per_group``), one such word masked; the word is predicted from the fused
MLM logits at the mask, argmax over the group's words only, and counts as right when it names the same
value as the masked word (a synonym counts: "big" for "large", "spots" for "dots"). A group whose two
accuracies (own image, shuffled image) agree is guessed from the text alone: the fusion does not read it
from the image. Chance is 1 / the group's values (colour 12.5, shape 16.7, size and pattern 33.3,
relation 16.7) for a model that knows only the group.
"""

from __future__ import annotations

import random

import torch

from softmask.world.vocab import PATTERN_NOUNS, RELATION_WORDS, SYNONYMS

# The words that name each group's values in captions, each mapped to the value it names: every synonym of
# an attribute value (and the pattern nouns of "with stripes"), and each relation phrase's key word ("left"
# of "to the left of"; the phrases' function words say nothing about the image).
_FUNCTION_WORDS = {"to", "the", "on", "of", "than"}
WORD_GROUPS: dict[str, dict[str, str]] = {
    **{attribute: {word: value for value, words in SYNONYMS[attribute].items() for word in words}
       for attribute in ("colour", "shape", "size")},
    "pattern": {word: value for value, words in (*SYNONYMS["pattern"].items(), *PATTERN_NOUNS.items())
                for word in words},
    "relation": {word: relation for relation, phrases in RELATION_WORDS.items() for phrase in phrases
                 for word in phrase if word not in _FUNCTION_WORDS},
}


def masked_items(test: list[dict], per_group: int, rng: random.Random) -> dict[str, list[tuple[str, str, str]]]:
    """{group: [(image, caption, masked word)]}: each caption holding a word of a group gives one item per
    group, the word drawn at random among its words of that group; the first ``per_group`` per group."""
    items: dict[str, list[tuple[str, str, str]]] = {group: [] for group in WORD_GROUPS}
    for record in test:
        for caption in record["caption"]:
            words = caption.lower().rstrip(".").split()
            for group, names in WORD_GROUPS.items():
                found = [w for w in words if w in names]
                if found and len(items[group]) < per_group:
                    items[group].append((record["image"], caption, rng.choice(found)))
    return items


@torch.no_grad()
def masked_word_accuracy(model, enc, test: list[dict], per_group: int = 600, seed: int = 0,
                         batch_size: int = 128) -> dict[str, float]:
    """See the module docstring. ``model`` a VisionLanguageModel in eval mode, ``enc`` the world's image and
    caption encoder (:class:`softmask.eval.world.WorldEncoder`), ``test`` the world's retrieval_test.json
    records. Returns ``<group>_right``, ``<group>_shuffled``, ``<group>_gap`` (%, points) and ``<group>_n``."""
    rng = random.Random(seed)
    vocab = enc.tokenizer.wordpiece.get_vocab()
    mask_id = enc.tokenizer.special["mask"]
    images = [record["image"] for record in test]
    row_of = {image: i for i, image in enumerate(images)}
    embeds = torch.cat([model.encode_image(enc.pixels(images[start:start + batch_size]))
                        for start in range(0, len(images), batch_size)])  # each test image encoded once
    out: dict[str, float] = {}
    for group, items in masked_items(test, per_group, rng).items():
        words = list(WORD_GROUPS[group])
        candidates = torch.tensor([vocab[w] for w in words])
        value_of = torch.tensor([sorted(set(WORD_GROUPS[group].values())).index(WORD_GROUPS[group][w]) for w in words])
        for condition in ("right", "shuffled"):
            hits = 0
            for start in range(0, len(items), batch_size):
                chunk = items[start:start + batch_size]
                shown = [image if condition == "right" else rng.choice([i for i in images if i != image])
                         for image, _, _ in chunk]
                ids, mask = enc.text([caption for _, caption, _ in chunk])
                targets = torch.tensor([vocab[word] for _, _, word in chunk])
                target_values = value_of[[words.index(word) for _, _, word in chunk]]
                positions = (ids == targets[:, None]).int().argmax(1)  # the word's first occurrence
                ids[torch.arange(len(chunk)), positions] = mask_id
                fused = model.fuse(model.encode_text(ids, mask), mask, embeds[[row_of[image] for image in shown]])
                logits = model.mlm_logits(fused[torch.arange(len(chunk)), positions])[:, candidates]  # the masks only
                hits += int((value_of[logits.argmax(-1)] == target_values).sum())
            out[f"{group}_{condition}"] = round(100.0 * hits / max(1, len(items)), 1)
        out[f"{group}_n"] = len(items)
        out[f"{group}_gap"] = round(out[f"{group}_right"] - out[f"{group}_shuffled"], 1)
    return out
