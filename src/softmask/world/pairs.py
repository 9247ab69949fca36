"""Two-image items: NLVR2-style statements and the text-assignment pretraining task.

NLVR statements (``claim`` gives their meaning; the label is computed from the two scenes):

- ``more`` / ``fewer``: "the left image has more red objects than the right image";
- ``both``: "both images contain a striped square";
- ``only``: "only the right image contains a blue circle";
- ``neither``: "neither image contains a star";
- ``exactly``: "the left image contains exactly two circles".

Counted things are given by a reference without a determiner: a shape, a colour, a colour and a shape,
a pattern and a shape, or nothing ("objects"). Labels are drawn True/False half and half, then a
statement with that label is searched for.

Text assignment (``nlvr_ta.json``, train images only): a caption of image 0 that is false of image 1
(label 0), of image 1 false of image 0 (label 1), or of a third image false of both (label 2).
"""

from __future__ import annotations

import random

from softmask.world.language import matching, phrase, plural_phrase, sentence, statement_truth, words
from softmask.world.vocab import NUMBER_WORDS, VALUES

STATEMENTS_PER_IMAGE = 2
TRIES = 30
SIDE_NAMES = ("left", "right")
REF_KEYS = (("shape",), ("colour",), ("colour", "shape"), ("pattern", "shape"), ("size", "shape"), ())


def _count(ref: dict, scene: dict) -> int:
    return len(matching(ref, scene["objects"]))


def nlvr_truth(claim: dict, scenes: tuple[dict, dict]) -> bool:
    """Whether an NLVR claim holds of (left, right) scenes."""
    counts = [_count(claim["ref"], scene) for scene in scenes]
    kind = claim["type"]
    if kind in ("more", "fewer", "exactly", "only"):
        side = SIDE_NAMES.index(claim["side"])
        mine, other = counts[side], counts[1 - side]
        return {"more": mine > other, "fewer": mine < other, "exactly": mine == claim.get("count"),
                "only": mine > 0 and other == 0}[kind]
    if kind == "both":
        return min(counts) > 0
    if kind == "neither":
        return max(counts) == 0
    raise ValueError(f"unknown NLVR claim {kind!r}")


def _random_ref(scenes: tuple[dict, dict], r: random.Random, forbidden, counting: bool) -> dict:
    keys = r.choice(REF_KEYS if counting else REF_KEYS[:-1])  # "both images contain an object": vacuous
    objects = scenes[0]["objects"] + scenes[1]["objects"]
    if r.random() < 0.8:
        source = r.choice(objects)
        ref = {key: source[key] for key in keys}
    else:
        ref = {key: r.choice(VALUES[key]) for key in keys}
    if "colour" in ref and "shape" in ref and (ref["colour"], ref["shape"]) in forbidden:
        del ref["colour"]
    return ref


def _random_claim(scenes: tuple[dict, dict], r: random.Random, forbidden) -> dict:
    kind = r.choice(("more", "fewer", "both", "only", "neither", "exactly"))
    claim = {"type": kind, "ref": _random_ref(scenes, r, forbidden, kind in ("more", "fewer", "exactly"))}
    if kind in ("more", "fewer", "only", "exactly"):
        claim["side"] = r.choice(SIDE_NAMES)
    if kind == "exactly":  # colour and shape together are unique within an image: at most one
        both = "colour" in claim["ref"] and "shape" in claim["ref"]
        claim["count"] = 1 if both else r.randint(1, 4)
    return claim


def _singular_or_plural(ref: dict, count: int, r: random.Random) -> list:
    return phrase(ref, None, r, "", "adjective") if count == 1 else plural_phrase(ref, r)


def nlvr_sentence(claim: dict, r: random.Random) -> str:
    """The sentence of an NLVR claim."""
    kind, ref = claim["type"], claim["ref"]
    if kind in ("more", "fewer"):
        other = SIDE_NAMES[1 - SIDE_NAMES.index(claim["side"])]
        pieces = words(f"the {claim['side']} image has {kind}") + plural_phrase(ref, r)
        pieces += words(f"than the {other} image")
    elif kind == "exactly":
        count = claim["count"]
        pieces = words(f"the {claim['side']} image contains exactly {NUMBER_WORDS[count]}")
        pieces += _singular_or_plural(ref, count, r)
    else:
        head = {"both": "both images contain", "neither": "neither image contains",
                "only": f"only the {claim.get('side')} image contains"}[kind]
        pieces = words(head) + phrase(ref, None, r, "a", "adjective")
    return sentence(pieces)


def nlvr_items(scenes: list[dict], r: random.Random, forbidden=()) -> list[dict]:
    """``STATEMENTS_PER_IMAGE`` statements about each image of a split paired with another image of it."""
    items = []
    if len(scenes) < 2:
        return items
    for index, left in enumerate(scenes):
        right = scenes[(index + 1 + r.randrange(len(scenes) - 1)) % len(scenes)]
        pair = (left, right)
        for _ in range(STATEMENTS_PER_IMAGE):
            target = r.random() < 0.5
            for _ in range(TRIES):
                claim = _random_claim(pair, r, forbidden)
                if nlvr_truth(claim, pair) == target:
                    break
            items.append({"images": [left["image"], right["image"]], "sentence": nlvr_sentence(claim, r),
                          "label": str(nlvr_truth(claim, pair)), "claim": claim})
    return items


def caption_truth(caption: dict, scene: dict) -> bool | None:
    """Whether a caption record (its references and relations) is true of a scene."""
    by_id = {ref["object"]: ref["attributes"] for ref in caption["refs"]}
    relations = [{"subject": by_id[rel["subject"]], "relation": rel["relation"], "object": by_id[rel["object"]]}
                 for rel in caption["relations"]]
    return statement_truth(list(by_id.values()), relations, scene)


def _false_caption(source: dict, others: list[dict], r: random.Random) -> str | None:
    """A caption of ``source`` that is false (not merely undecided) of every scene in ``others``."""
    captions = list(source["captions"])
    r.shuffle(captions)
    for caption in captions:
        if all(caption_truth(caption, other) is False for other in others):
            return caption["caption"]
    return None


def _other_index(count: int, taken: tuple[int, ...], r: random.Random) -> int:
    """A random index in ``range(count)`` outside ``taken`` (count > len(taken))."""
    while True:
        index = r.randrange(count)
        if index not in taken:
            return index


def text_assignment_items(scenes: list[dict], r: random.Random) -> list[dict]:
    """One text-assignment item per image (when a suitable caption exists): label 0, 1 or 2 at random."""
    items = []
    if len(scenes) < 3:
        return items
    for index, first in enumerate(scenes):
        partner = (index + 1 + r.randrange(len(scenes) - 1)) % len(scenes)
        second = scenes[partner]
        label = r.randrange(3)
        if label == 2:
            third = scenes[_other_index(len(scenes), (index, partner), r)]
            text = _false_caption(third, [first, second], r)
        else:
            source, other = (first, second) if label == 0 else (second, first)
            text = _false_caption(source, [other], r)
        if text is not None:
            items.append({"images": [first["image"], second["image"]], "sentence": text, "label": label})
    return items
