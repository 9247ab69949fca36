"""The world's attributes and the words that name them.

Every word below is a whole word of the bert-base-uncased vocabulary (checked by the tests), so the
captions tokenise without word pieces. An attribute value may have synonyms; the first one is the
canonical word (used where wording must not vary, e.g. minimal edits).
"""

from __future__ import annotations

# Base fill colours (RGB); each object jitters its colour a little around these.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 90, 225),
    "yellow": (240, 205, 35),
    "purple": (140, 60, 190),
    "orange": (245, 135, 25),
    "pink": (245, 130, 195),
    "brown": (125, 75, 35),
}
SHAPES = ("square", "circle", "triangle", "diamond", "star", "cross")
# Object radius (half its extent) as a fraction of the image side, before a +-7% jitter.
SIZES: dict[str, float] = {"small": 0.085, "medium": 0.125, "large": 0.18}
PATTERNS = ("plain", "striped", "dotted")

# Adjective order in a phrase ("a big red striped circle"); shape is the noun.
ATTRIBUTES = ("size", "colour", "pattern", "shape")
# What a minimal-edit distractor changes (its "attribute"): one attribute of one object, in this order,
# or a relation.
OBJECT_EDITS = ("colour", "shape", "size", "pattern")
EDIT_ATTRIBUTES = (*OBJECT_EDITS, "relation")
VALUES: dict[str, tuple[str, ...]] = {
    "size": tuple(SIZES),
    "colour": tuple(COLOURS),
    "pattern": PATTERNS,
    "shape": SHAPES,
}

SYNONYMS: dict[str, dict[str, tuple[str, ...]]] = {
    "size": {"small": ("small", "little", "tiny"), "medium": ("medium",), "large": ("large", "big")},
    "colour": {name: (name,) for name in COLOURS},
    "pattern": {"plain": ("plain", "solid"), "striped": ("striped",), "dotted": ("dotted", "spotted")},
    "shape": {
        "square": ("square",),
        "circle": ("circle", "disc"),
        "triangle": ("triangle",),
        "diamond": ("diamond",),
        "star": ("star",),
        "cross": ("cross",),
    },
}
# "a circle with stripes": the pattern as a noun after "with".
PATTERN_NOUNS: dict[str, tuple[str, ...]] = {"striped": ("stripes",), "dotted": ("dots", "spots")}
PLURALS: dict[str, str] = {
    "square": "squares",
    "circle": "circles",
    "triangle": "triangles",
    "diamond": "diamonds",
    "star": "stars",
    "cross": "crosses",
}

INVERSE: dict[str, str] = {
    "left of": "right of",
    "right of": "left of",
    "above": "below",
    "below": "above",
    "bigger than": "smaller than",
    "smaller than": "bigger than",
}
RELATION_WORDS: dict[str, tuple[tuple[str, ...], ...]] = {
    "left of": (("left", "of"), ("to", "the", "left", "of"), ("on", "the", "left", "of")),
    "right of": (("right", "of"), ("to", "the", "right", "of"), ("on", "the", "right", "of")),
    # no "over"/"under": with overlapping objects they could be read as depth
    "above": (("above",), ("higher", "than")),
    "below": (("below",), ("lower", "than")),
    "bigger than": (("bigger", "than"), ("larger", "than")),
    "smaller than": (("smaller", "than"),),
}

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")

# Properties the renderer never draws: statements about them are VE "neutral".
UNRENDERED = (
    ("made", "of", "wood"),
    ("made", "of", "metal"),
    ("made", "of", "glass"),
    ("made", "of", "plastic"),
    ("made", "of", "paper"),
    ("made", "of", "stone"),
    ("heavy",),
    ("warm",),
    ("cold",),
    ("soft",),
    ("wet",),
)


def naming_words(attribute: str, value: str) -> frozenset[str]:
    """Every word that may name ``value`` of ``attribute`` in a caption (synonyms, pattern nouns)."""
    words = set(SYNONYMS[attribute][value])
    if attribute == "pattern":
        words.update(PATTERN_NOUNS.get(value, ()))
    return frozenset(words)


def answer_list() -> list[str]:
    """Every VQA answer the world can give, sorted."""
    answers = {*COLOURS, *SHAPES, *SIZES, *PATTERNS, "yes", "no", "left", "right", "above", "below"}
    answers.update(str(n) for n in range(5))
    return sorted(answers)
