"""Words for scenes: referring phrases, captions with word-to-object links, and the truth of statements.

A caption is built from *pieces* ``(word, meta)``: ``meta`` is ``{"object": id, "attribute": a}`` for a
word naming an object's attribute (colour, shape, size or pattern), ``{"relation": k}`` for the words of
the k-th relation, or None. Joining the words gives the caption; the links are the word indices after
``pre_caption(caption, 30).split()`` (punctuation is only ever attached to a word, never a word itself,
so the indices survive the cleaning).

A *reference* is a dict of stated attributes, ``{"shape": "circle", "colour": "red", ...}`` (shape always
stated); it matches an object whose attributes agree on every stated one.
"""

from __future__ import annotations

import random

from softmask.world.vocab import (
    ATTRIBUTES,
    INVERSE,
    PATTERN_NOUNS,
    PLURALS,
    RELATION_WORDS,
    SYNONYMS,
    VALUES,
)

Piece = tuple[str, "dict | None"]
ADJECTIVES = ("size", "colour", "pattern")


# ---------------------------------------------------------------- references and truth


def matches(ref: dict, obj: dict) -> bool:
    """Whether an object has every attribute the reference states."""
    return ref.items() <= obj.items()


def matching(ref: dict, objects: list[dict]) -> list[dict]:
    """The objects a reference matches."""
    return [obj for obj in objects if matches(ref, obj)]


def attributes_of(obj: dict, keys=ATTRIBUTES) -> dict:
    """An object's attributes as a reference (all four by default)."""
    return {key: obj[key] for key in keys}


def refer(obj: dict, objects: list[dict], r: random.Random, p_colour=0.85, p_size=0.5, p_pattern=0.5) -> dict:
    """A reference that picks out ``obj`` alone: shape, a random choice of the other attributes, plus
    colour (then the rest) if that is not yet unique. Colour and shape together are always unique."""
    ref = {"shape": obj["shape"]}
    for key, p in (("colour", p_colour), ("size", p_size), ("pattern", p_pattern)):
        if r.random() < p:
            ref[key] = obj[key]
    for key in ("colour", "size", "pattern"):
        if len(matching(ref, objects)) == 1:
            break
        ref[key] = obj[key]
    return ref


def is_forbidden(ref: dict, forbidden) -> bool:
    """Whether a reference states a (colour, shape) pair from ``forbidden``."""
    return "colour" in ref and (ref["colour"], ref["shape"]) in forbidden


def edit_values(ref: dict, attribute: str, objects: list[dict], forbidden=()) -> list[str]:
    """New values of one stated attribute that make the reference match no object (and state no forbidden
    pair), in vocabulary order."""
    values = []
    for value in VALUES[attribute]:
        edited = {**ref, attribute: value}
        if value != ref[attribute] and not matching(edited, objects) and not is_forbidden(edited, forbidden):
            values.append(value)
    return values


def resolve(ref: dict, objects: list[dict]) -> dict | None:
    """The one object a reference picks out, or None if it matches none or several."""
    found = matching(ref, objects)
    return found[0] if len(found) == 1 else None


def relation_truth(subject: dict, relation: str, obj: dict, scene: dict) -> bool | None:
    """Truth of "SUBJECT RELATION OBJECT" (references) in a scene: True, False (the subject or object is
    absent, or the inverse relation holds), or None (ambiguous reference or unclear geometry)."""
    a, b = matching(subject, scene["objects"]), matching(obj, scene["objects"])
    if not a or not b:
        return False
    if len(a) > 1 or len(b) > 1:
        return None
    held = {(rel["subject"], rel["relation"], rel["object"]) for rel in scene["relations"]}
    if (a[0]["id"], relation, b[0]["id"]) in held:
        return True
    if (a[0]["id"], INVERSE[relation], b[0]["id"]) in held:
        return False
    return None


def statement_truth(refs: list[dict], relations: list[dict], scene: dict) -> bool | None:
    """Truth of a caption-like statement: every reference matches an object and every relation
    (``{"subject": ref, "relation": name, "object": ref}``) holds. None when it cannot be decided."""
    if any(not matching(ref, scene["objects"]) for ref in refs):
        return False
    truths = [relation_truth(rel["subject"], rel["relation"], rel["object"], scene) for rel in relations]
    if False in truths:
        return False
    return None if None in truths else True


# ---------------------------------------------------------------- phrases


def word_for(attribute: str, value: str, r: random.Random | None) -> str:
    """A word naming the value: a random synonym, or the canonical one when ``r`` is None."""
    words = SYNONYMS[attribute][value]
    return words[0] if r is None else r.choice(words)


def _determiner(det: str, pieces: list[Piece]) -> list[Piece]:
    if not det:
        return pieces
    if det == "a" and pieces[0][0][0] in "aeiou":
        det = "an"
    return [(det, None), *pieces]


def _adjective_style(ref: dict, r, obj_id) -> list[Piece]:
    pieces = [(word_for(key, ref[key], r), {"object": obj_id, "attribute": key}) for key in ATTRIBUTES if key in ref]
    return pieces if "shape" in ref else [*pieces, ("object", None)]


def _with_style(ref: dict, r, obj_id) -> list[Piece]:
    head = _adjective_style({k: v for k, v in ref.items() if k != "pattern"}, r, obj_id)
    nouns = PATTERN_NOUNS[ref["pattern"]]
    noun = nouns[0] if r is None else r.choice(nouns)
    return [*head, ("with", None), (noun, {"object": obj_id, "attribute": "pattern"})]


def _that_style(ref: dict, r, obj_id) -> list[Piece]:
    adjectives = [(word_for(key, ref[key], r), {"object": obj_id, "attribute": key})
                  for key in ADJECTIVES if key in ref]
    if len(adjectives) == 2:
        adjectives.insert(1, ("and", None))
    shape = (word_for("shape", ref["shape"], r), {"object": obj_id, "attribute": "shape"})
    return [shape, ("that", None), ("is", None), *adjectives]


def phrase_styles(ref: dict) -> list[str]:
    """The phrase styles a reference can be said in."""
    styles = ["adjective"]
    if "shape" not in ref:
        return styles
    if ref.get("pattern") in PATTERN_NOUNS:
        styles.append("with")
    if 1 <= sum(key in ref for key in ADJECTIVES) <= 2:
        styles.append("that")
    return styles


def phrase(ref: dict, obj_id: int | None, r: random.Random | None, det: str = "a", style: str | None = None
           ) -> list[Piece]:
    """Pieces of a noun phrase for a reference: "a big red striped circle" (adjective style), "a big red
    circle with stripes" (with), "a circle that is red and striped" (that); "a red object" when the
    reference states no shape. ``r`` None: canonical words, adjective style unless ``style`` is given."""
    if style is None:
        style = "adjective" if r is None else r.choice(phrase_styles(ref))
    build = {"adjective": _adjective_style, "with": _with_style, "that": _that_style}[style]
    return _determiner(det, build(ref, r, obj_id))


def plural_phrase(ref: dict, r: random.Random | None) -> list[Piece]:
    """Pieces of a plural noun phrase without determiner: "red circles", "striped objects", "objects"."""
    pieces = [(word_for(key, ref[key], r), None) for key in ADJECTIVES if key in ref]
    noun = PLURALS[ref["shape"]] if "shape" in ref else "objects"
    return [*pieces, (noun, None)]


def relation_pieces(relation: str, k: int, r: random.Random | None) -> list[Piece]:
    """The words of a relation ("to the left of"), tagged as relation ``k``."""
    options = RELATION_WORDS[relation]
    words = options[0] if r is None else r.choice(options)
    return [(word, {"relation": k}) for word in words]


def words(text: str) -> list[Piece]:
    """Untagged pieces of a fixed text."""
    return [(word, None) for word in text.split()]


def join_list(items: list[list[Piece]]) -> list[Piece]:
    """"A, B and C": commas attached to the words before them."""
    pieces: list[Piece] = []
    for index, item in enumerate(items):
        if 0 < index == len(items) - 1:
            pieces.append(("and", None))
        item = list(item)
        if index < len(items) - 2:
            word, meta = item[-1]
            item[-1] = (word + ",", meta)
        pieces.extend(item)
    return pieces


def assemble(pieces: list[Piece], end: str = ".") -> tuple[str, list[dict], dict[int, list[int]]]:
    """(text, attribute links, relation word indices) of a piece list; the text is capitalised and ends
    with ``end``."""
    links, relation_words = [], {}
    for index, (_, meta) in enumerate(pieces):
        if meta and "object" in meta:
            links.append({"word": index, "object": meta["object"], "attribute": meta["attribute"]})
        elif meta and "relation" in meta:
            relation_words.setdefault(meta["relation"], []).append(index)
    text = " ".join(word for word, _ in pieces) + end
    return text[0].upper() + text[1:], links, relation_words


def sentence(pieces: list[Piece], end: str = ".") -> str:
    """Only the text of :func:`assemble`."""
    return assemble(pieces, end)[0]
