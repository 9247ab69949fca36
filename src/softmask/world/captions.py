"""Captions of one image, with word-to-object links.

Kinds (five captions per image, distinct texts, in this order):

1. ``full``: every object, all attributes ("there is a big red striped circle, a small blue square and
   a green dotted star"; a plain pattern is said only sometimes);
2. and 3. ``salient``: only the most salient object;
4. ``secondary``: one other object (``salient`` again when there is only one object);
5. ``relation``: two objects and a relation between them ("the red circle is to the left of the blue
   square"); ``secondary`` (or ``full``) when the scene has no unambiguous relation.

Single-object references always pick out their object alone (see :func:`language.refer`).
"""

from __future__ import annotations

import random

from softmask.data.text import pre_caption
from softmask.world.language import (
    Piece,
    assemble,
    attributes_of,
    join_list,
    phrase,
    phrase_styles,
    refer,
    relation_pieces,
    words,
)

MAX_WORDS = 25  # every caption has at most this many words (pre_caption keeps 30)
TRIES = 12
FULL_PREFIXES = ("", "there is", "this image shows", "a picture of", "we can see")
OBJECT_FRAMES = (("", ""), ("there is", ""), ("a picture of", ""), ("", "in the picture"),
                 ("this image shows", ""), ("", "in the image"), ("we can see", ""))


def _record(kind: str, pieces: list[Piece], refs: list[tuple[int, dict]], relations: list[tuple]) -> dict:
    """A caption record: text, kind, mentioned objects, attribute links, references and relations."""
    text, links, relation_words = assemble(pieces)
    cleaned = pre_caption(text, 30).split()
    expected = [word.rstrip(",").lower() for word, _ in pieces]
    if cleaned != expected or len(cleaned) > MAX_WORDS:  # a bug in a template, not a data problem
        raise AssertionError(f"caption {text!r} does not clean to its own words")
    return {
        "caption": text,
        "kind": kind,
        "objects": sorted({obj_id for obj_id, _ in refs}),
        "links": links,
        "refs": [{"object": obj_id, "attributes": ref} for obj_id, ref in refs],
        "relations": [{"subject": s, "relation": name, "object": o, "words": relation_words.get(k, [])}
                      for k, (s, name, o) in enumerate(relations)],
    }


def full_caption(scene: dict, r: random.Random) -> dict:
    """All objects in random order, each with all its attributes (plain said 30% of the time)."""
    objects = list(scene["objects"])
    r.shuffle(objects)
    refs, items = [], []
    for obj in objects:
        ref = attributes_of(obj)
        if obj["pattern"] == "plain" and r.random() >= 0.3:
            del ref["pattern"]
        style = "adjective" if len(objects) > 2 else r.choice(phrase_styles(ref))
        items.append(phrase(ref, obj["id"], r, "a", style))
        refs.append((obj["id"], ref))
    body = join_list(items)
    prefix = r.choice(FULL_PREFIXES)
    if len(body) + len(prefix.split()) > MAX_WORDS:
        prefix = ""
    return _record("full", words(prefix) + body, refs, [])


def object_caption(scene: dict, obj: dict, r: random.Random, kind: str) -> dict:
    """One object, named by a reference that picks it out alone, in a random frame."""
    ref = refer(obj, scene["objects"], r)
    before, after = r.choice(OBJECT_FRAMES)
    pieces = words(before) + phrase(ref, obj["id"], r, "a") + words(after)
    return _record(kind, pieces, [(obj["id"], ref)], [])


def _relation_ref(obj: dict, r: random.Random) -> dict:
    ref = {"colour": obj["colour"], "shape": obj["shape"]}
    for key in ("size", "pattern"):
        if r.random() < 0.25:
            ref[key] = obj[key]
    return ref


def relation_caption(scene: dict, r: random.Random) -> dict:
    """Two objects (by colour and shape, sometimes more) and one relation that holds between them."""
    relation = r.choice(scene["relations"])
    a, b = scene["objects"][relation["subject"]], scene["objects"][relation["object"]]
    ref_a, ref_b = _relation_ref(a, r), _relation_ref(b, r)
    rel_words = relation_pieces(relation["relation"], 0, r)
    if r.random() < 0.5:  # "the A is REL the B"
        pieces = phrase(ref_a, a["id"], r, "the", "adjective") + words("is") + rel_words
    else:  # "there is a A REL the B"
        pieces = words("there is") + phrase(ref_a, a["id"], r, "a", "adjective") + rel_words
    pieces += phrase(ref_b, b["id"], r, "the", "adjective")
    rel = (a["id"], relation["relation"], b["id"])
    return _record("relation", pieces, [(a["id"], ref_a), (b["id"], ref_b)], [rel])


def caption_plan(scene: dict) -> list[str]:
    """The kinds of the five captions of a scene (see the module docstring)."""
    several = len(scene["objects"]) > 1
    last = "relation" if scene["relations"] else ("secondary" if several else "full")
    return ["full", "salient", "salient", "secondary" if several else "salient", last]


def _one(scene: dict, kind: str, r: random.Random) -> dict:
    if kind == "full":
        return full_caption(scene, r)
    if kind == "relation":
        return relation_caption(scene, r)
    if kind == "salient":
        return object_caption(scene, scene["objects"][scene["salient"]], r, kind)
    others = [obj for obj in scene["objects"] if obj["id"] != scene["salient"]]
    return object_caption(scene, r.choice(others), r, kind)


def make_captions(scene: dict, r: random.Random) -> list[dict]:
    """The five caption records of a scene, with distinct texts where the wording allows."""
    captions, seen = [], set()
    for kind in caption_plan(scene):
        for _ in range(TRIES):
            record = _one(scene, kind, r)
            if record["caption"] not in seen:
                break
        seen.add(record["caption"])
        captions.append(record)
    return captions
