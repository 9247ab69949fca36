"""Per-image task items: VQA questions, visual-entailment statements and minimal-edit test items.

Every item carries its structured meaning next to its text (``query`` for VQA, ``claim`` for VE and the
minimal edits), so that answers and labels are computed from the scene, never written by hand.

``forbidden`` is the set of held-out (colour, shape) pairs for train/val images (empty for test): no
generated text for a train/val image states such a pair, not even as a negative.

VE labels:

- ``entailment``: a true statement (an object described by some of its attributes exists, or a relation
  between two objects holds);
- ``contradiction``: a statement made false by changing one attribute of an object (so that nothing in
  the image matches) or by flipping one relation (left/right, above/below, bigger/smaller);
- ``neutral``: a statement about a real object, named correctly, of a property the renderer never draws
  (what it is made of, its weight, temperature, softness or wetness): the image cannot decide it.
"""

from __future__ import annotations

import random

from softmask.world.language import (
    attributes_of,
    edit_values,
    matching,
    phrase,
    plural_phrase,
    refer,
    relation_pieces,
    relation_truth,
    resolve,
    sentence,
    words,
)
from softmask.world.vocab import INVERSE, OBJECT_EDITS, SHAPES, UNRENDERED, VALUES

ANSWERS_PER_QUESTION = 10
WRONG_ANSWERS = (0, 1, 1, 2)  # how many of the 10 answers disagree, drawn uniformly from these
SIDES = {"left of": "left", "right of": "right", "above": "above", "below": "below"}


# ---------------------------------------------------------------- VQA


def answer_query(query: dict, scene: dict) -> str:
    """The true answer of a VQA query in a scene."""
    kind, objects = query["type"], scene["objects"]
    if kind in ("colour", "shape", "size", "pattern"):
        return resolve(query["ref"], objects)[kind]
    if kind == "count":
        return str(len(matching(query["ref"], objects)))
    if kind == "exists":
        return "yes" if matching(query["ref"], objects) else "no"
    if kind == "relation":
        return "yes" if relation_truth(query["subject"], query["relation"], query["object"], scene) else "no"
    if kind == "side":
        held = [name for name in query["choices"] if relation_truth(query["subject"], name, query["object"], scene)]
        return SIDES[held[0]]
    raise ValueError(f"unknown query type {kind!r}")


def _refer_without(obj: dict, objects: list[dict], attribute: str, r: random.Random) -> dict | None:
    """A reference to ``obj`` alone that does not state ``attribute`` (None if there is none)."""
    ref = {} if attribute == "shape" else {"shape": obj["shape"]}
    keys = [key for key in ("colour", "size", "pattern") if key != attribute]
    r.shuffle(keys)
    while keys and (not ref or len(matching(ref, objects)) > 1):
        key = keys.pop()
        ref[key] = obj[key]
    return ref if ref and len(matching(ref, objects)) == 1 else None


def _attribute_question(scene: dict, r: random.Random, attribute: str) -> tuple | None:
    objects = list(scene["objects"])
    r.shuffle(objects)
    for obj in objects:
        ref = _refer_without(obj, scene["objects"], attribute, r)
        if ref is not None:
            the = phrase(ref, None, r, "the", "adjective")
            text = {"colour": [("what color is", None), *the], "shape": [("what shape is", None), *the],
                    "size": [("what size is", None), *the],
                    "pattern": [("what pattern does", None), *the, ("have", None)]}[attribute]
            wrong = [v for v in VALUES[attribute] if v != obj[attribute]]
            return text, {"type": attribute, "ref": ref}, wrong
    return None


def _count_question(scene: dict, r: random.Random) -> tuple:
    objects = scene["objects"]
    choice = r.random()
    if choice < 0.5:
        shape = r.choice(objects)["shape"] if r.random() < 0.7 else r.choice(SHAPES)
        ref = {"shape": shape}
    elif choice < 0.8:
        ref = {"colour": r.choice(objects)["colour"]}
    else:
        ref = {}
    count = len(matching(ref, objects))
    text = [("how many", None), *plural_phrase(ref, r), ("are there", None)]
    return text, {"type": "count", "ref": ref}, [str(n) for n in (count - 1, count + 1) if 0 <= n <= 4]


def _exists_question(scene: dict, r: random.Random, forbidden) -> tuple:
    obj = r.choice(scene["objects"])
    ref = refer(obj, scene["objects"], r)
    if r.random() < 0.5:
        ref = attributes_of(obj, [key for key in ("size", "colour", "pattern", "shape")
                                  if key in ref or r.random() < 0.5])
        edits = [(key, value) for key in ref for value in edit_values(ref, key, scene["objects"], forbidden)]
        key, value = r.choice(edits)
        ref = {**ref, key: value}
    text = [("is there", None), *phrase(ref, None, r, "a")]
    return text, {"type": "exists", "ref": ref}, None


def _pair_refs(scene: dict, relation: dict) -> tuple[dict, dict]:
    objects = scene["objects"]
    a, b = objects[relation["subject"]], objects[relation["object"]]
    return {"colour": a["colour"], "shape": a["shape"]}, {"colour": b["colour"], "shape": b["shape"]}


def _relation_question(scene: dict, r: random.Random) -> tuple | None:
    if not scene["relations"]:
        return None
    relation = r.choice(scene["relations"])
    subject, obj = _pair_refs(scene, relation)
    the_a, the_b = phrase(subject, None, r, "the", "adjective"), phrase(obj, None, r, "the", "adjective")
    name = relation["relation"]
    if name in SIDES and r.random() < 0.5:
        first, second = sorted((name, INVERSE[name]), key=("left of", "above", "right of", "below").index)
        middle = "to the left or to the right of" if first == "left of" else "above or below"
        query = {"type": "side", "subject": subject, "object": obj, "choices": [first, second]}
        return [("is", None), *the_a, *words(middle), *the_b], query, [SIDES[INVERSE[name]]]
    if r.random() < 0.5:
        name = INVERSE[name]
    query = {"type": "relation", "subject": subject, "relation": name, "object": obj}
    return [("is", None), *the_a, *relation_pieces(name, 0, r), *the_b], query, None


def _answers(truth: str, wrong: list[str], r: random.Random) -> list[str]:
    """Ten annotator answers: the truth, with 0-2 replaced by plausible wrong answers."""
    count = r.choice(WRONG_ANSWERS) if wrong else 0
    answers = [truth] * (ANSWERS_PER_QUESTION - count) + [r.choice(wrong) for _ in range(count)]
    r.shuffle(answers)
    return answers


def vqa_items(scene: dict, r: random.Random, forbidden=()) -> list[dict]:
    """Questions about colour, shape, count, existence, a relation (or size/pattern without one) and
    size or pattern, in VQA format plus ``type`` and ``query``."""
    built = [
        _attribute_question(scene, r, "colour"),
        _attribute_question(scene, r, "shape"),
        _count_question(scene, r),
        _exists_question(scene, r, forbidden),
        _relation_question(scene, r),
        _attribute_question(scene, r, r.choice(("size", "pattern"))),
    ]
    items = []
    for number, question in enumerate(q for q in built if q is not None):
        pieces, query, wrong = question
        truth = answer_query(query, scene)
        wrong = wrong or [{"yes": "no", "no": "yes"}[truth]]
        items.append({
            "question_id": scene["image_id"] * 16 + number, "question": sentence(pieces, "?"),
            "answer": _answers(truth, wrong, r), "image": scene["image"], "dataset": "vqa",
            "type": query["type"], "query": query,
        })
    return items


# ---------------------------------------------------------------- statements (VE, minimal edits)


def claim_sentence(claim: dict, r: random.Random | None) -> str:
    """A sentence saying a claim; ``r`` None gives the canonical wording (minimal edits)."""
    if claim["type"] == "relation":
        pieces = phrase(claim["subject"], None, r, "the", "adjective") + words("is")
        pieces += relation_pieces(claim["relation"], 0, r) + phrase(claim["object"], None, r, "the", "adjective")
        return sentence(pieces)
    if claim["type"] == "unrendered":
        return sentence(phrase(claim["ref"], None, r, "the", "adjective") + words("is " + claim["property"]))
    noun = phrase(claim["refs"][0], None, r, "a")
    frame = 0 if r is None else r.randrange(3)
    pieces = [words("there is") + noun, words("the image contains") + noun, noun + words("is in the picture")][frame]
    return sentence(pieces)


def _true_claim(scene: dict, r: random.Random) -> dict:
    if scene["relations"] and r.random() < 0.4:
        relation = r.choice(scene["relations"])
        subject, obj = _pair_refs(scene, relation)
        return {"type": "relation", "subject": subject, "relation": relation["relation"], "object": obj}
    obj = r.choice(scene["objects"])
    return {"type": "exists", "refs": [refer(obj, scene["objects"], r, p_colour=0.7)]}


def _contradict(claim: dict, scene: dict, r: random.Random, forbidden) -> dict | None:
    """The claim made false by one change: a flipped relation, or one attribute edited so nothing matches."""
    if claim["type"] == "relation":
        return {**claim, "relation": INVERSE[claim["relation"]]}
    ref = claim["refs"][0]
    edits = [(key, value) for key in ref for value in edit_values(ref, key, scene["objects"], forbidden)]
    if not edits:
        return None
    key, value = r.choice(edits)
    return {"type": "exists", "refs": [{**ref, key: value}]}


def ve_items(scene: dict, r: random.Random, forbidden=()) -> list[dict]:
    """One entailment, one contradiction and one neutral statement (see the module docstring), in SNLI-VE
    format plus ``claim``."""
    claims = [("entailment", _true_claim(scene, r))]
    for _ in range(5):
        false = _contradict(_true_claim(scene, r), scene, r, forbidden)
        if false is not None:
            claims.append(("contradiction", false))
            break
    obj = r.choice(scene["objects"])
    prop = " ".join(r.choice(UNRENDERED))
    claims.append(("neutral", {"type": "unrendered", "ref": refer(obj, scene["objects"], r), "property": prop}))
    return [{"image": scene["image"], "sentence": claim_sentence(claim, r), "label": label, "claim": claim}
            for label, claim in claims]


def _object_edit_item(scene: dict, obj: dict, r: random.Random) -> dict:
    ref = attributes_of(obj)
    distractors = []
    for key in OBJECT_EDITS:
        values = edit_values(ref, key, scene["objects"])
        if values:
            claim = {"type": "exists", "refs": [{**ref, key: r.choice(values)}]}
            distractors.append({"caption": claim_sentence(claim, None), "claim": claim, "attribute": key,
                                "from": obj[key], "to": claim["refs"][0][key]})
    truth = {"type": "exists", "refs": [ref]}
    return {"kind": "object", "caption": claim_sentence(truth, None), "claim": truth, "distractors": distractors,
            "object": obj["id"], "objects": [obj["id"]], "heldout_object": obj["heldout"]}


def _relation_edit_item(scene: dict, relation: dict) -> dict:
    subject, obj = _pair_refs(scene, relation)
    truth = {"type": "relation", "subject": subject, "relation": relation["relation"], "object": obj}
    false = {**truth, "relation": INVERSE[relation["relation"]]}
    ids = [relation["subject"], relation["object"]]
    distractor = {"caption": claim_sentence(false, None), "claim": false, "attribute": "relation",
                  "from": truth["relation"], "to": false["relation"]}
    return {"kind": "relation", "caption": claim_sentence(truth, None), "claim": truth, "distractors": [distractor],
            "object": relation["subject"], "objects": ids,
            "heldout_object": any(scene["objects"][i]["heldout"] for i in ids)}


def minimal_edit_items(scene: dict, r: random.Random) -> list[dict]:
    """For every object, its full canonical description and one distractor per attribute changing only that
    attribute (so that nothing in the image matches); for every related pair (subject id < object id), each
    relation and its flip. Canonical wording, so a distractor differs from the truth in one word or
    phrase."""
    items = [_object_edit_item(scene, obj, r) for obj in scene["objects"]]
    items += [_relation_edit_item(scene, rel) for rel in scene["relations"] if rel["subject"] < rel["object"]]
    for item in items:
        item.update(image=scene["image"], image_id=scene["image_id"], salient=item["object"] == scene["salient"],
                    heldout_image=scene["heldout"])
    return items
