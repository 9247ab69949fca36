"""Scenes: sampling objects and backgrounds, occlusion, boxes, relations and saliency.

One image is a pure function of ``(seed, index, size, held-out pairs)``: its random numbers come from
``numpy.random.default_rng([seed, index])`` (a Python ``random.Random`` seeded from it makes the many
small discrete choices, which is faster), so images are independent and can be made in any order.

Conventions:

- Objects are listed, and given ids ``0..n-1``, in drawing order: later objects cover earlier ones
  (``depth`` 0 is the back). Within an image every (colour, shape) pair is unique, so "the red circle"
  always names one object.
- ``box`` is ``[x0, y0, x1, y1]`` of the object's *visible* pixels, x1/y1 exclusive; ``area`` counts
  the pixels of the whole shape, ``visible_area`` those not covered; every object keeps at least
  ``MIN_VISIBLE`` of its area visible.
- The most salient object has the largest visible area, ties broken by contrast with the background
  under it (``saliency_rank`` 0).
- Relations hold with margins so that none is ambiguous: "left of" needs both the shape centres and the
  visible-box centres ``RELATION_MARGIN * size`` apart horizontally ("above"/"below" likewise
  vertically); "bigger than" needs a larger size class, ``SIZE_AREA_RATIO`` times the area and a larger
  visible area. Pairs that miss a margin get no relation on that axis.
"""

from __future__ import annotations

import math
import random

import numpy as np

from softmask.world import render
from softmask.world.vocab import COLOURS, INVERSE, PATTERNS, SHAPES, SIZES

MIN_VISIBLE = 0.4
MIN_VISIBLE_PIXELS = 4
POSITION_TRIES = 25
RELATION_MARGIN = 0.12
SIZE_AREA_RATIO = 1.5
OBJECT_COUNTS = (1, 2, 3, 4)
COUNT_WEIGHTS = (0.15, 0.3, 0.3, 0.25)
MAX_OBJECTS = max(OBJECT_COUNTS)
BACKGROUNDS = ("plain", "gradient", "noise", "stripes")
SPLIT_NAMES = ("train", "val", "test")
TASK_STREAM = 2**31 - 1  # seeds the world-level choices: default_rng([seed, TASK_STREAM, purpose])


def split_of(index: int) -> str:
    """Split of image ``index``: 8 of every 10 train, then one val, one test (index % 10 == 8, 9)."""
    return {8: "val", 9: "test"}.get(index % 10, "train")


def forces_heldout(index: int) -> bool:
    """Whether test image ``index`` must contain a held-out pair (every other test image)."""
    return split_of(index) == "test" and (index // 10) % 2 == 0


HELD_OUT_PAIRS = 4  # (colour, shape) pairs a world keeps out of train/val by default


def heldout_pairs(seed: int, count: int = HELD_OUT_PAIRS) -> list[tuple[str, str]]:
    """The (colour, shape) pairs kept out of train/val images, chosen from the seed.

    The pairs use distinct colours and distinct shapes, so every colour and every shape still occurs in
    training, only never in these combinations.
    """
    rng = world_random(seed, 0)
    colours, shapes = list(COLOURS), list(SHAPES)
    rng.shuffle(colours)
    rng.shuffle(shapes)
    return sorted(zip(colours[:count], shapes[:count], strict=True))


def world_random(seed: int, purpose: int) -> random.Random:
    """A random stream for world-level choices (NLVR pairs, ...), ``purpose`` numbering them."""
    return random.Random(int(np.random.default_rng([seed, TASK_STREAM, purpose]).integers(2**63)))


def image_random(seed: int, index: int) -> random.Random:
    """The random stream of image ``index``: a ``random.Random`` seeded from ``default_rng([seed, index])``."""
    return random.Random(int(np.random.default_rng([seed, index]).integers(2**63)))


def _grey(r: random.Random, low: float, high: float) -> list[int]:
    level = r.uniform(low, high)
    return [int(min(255, max(0, round(level + r.uniform(-18, 18))))) for _ in range(3)]


def sample_background(r: random.Random, size: int) -> dict:
    """A background record: a muted colour, plus a second colour, angle, period or noise as its kind needs."""
    kind = r.choice(BACKGROUNDS)
    spec = {"kind": kind, "colour": _grey(r, 110, 220)}
    if kind == "gradient":
        spec["colour2"] = _grey(r, 110, 220)
        spec["angle"] = r.randrange(0, 360, 15)
    elif kind == "stripes":
        delta = r.choice((-14, 14))
        spec["colour2"] = [min(255, max(0, c + delta)) for c in spec["colour"]]
        spec["angle"] = r.choice((0, 45, 90, 135))
        spec["period"] = max(2, round(size / r.choice((6, 8, 10))))
    elif kind == "noise":
        spec["sigma"] = 6.0
        spec["noise_seed"] = r.randrange(2**31)
    return spec


def _pick_pairs(r: random.Random, count: int, allowed: list[tuple[str, str]], forced: tuple | None) -> list[tuple]:
    """``count`` distinct (colour, shape) pairs from ``allowed``; ``forced`` (if any) at a random slot."""
    pool = [pair for pair in allowed if pair != forced]
    chosen = r.sample(pool, count - (forced is not None))
    if forced is not None:
        chosen.insert(r.randrange(count), forced)
    return chosen


def _shade(rgb: list[int]) -> list[int]:
    """The pattern colour: a darker tone of a light colour, a lighter tone of a dark one."""
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    if luminance > 100:
        return [int(round(c * 0.5)) for c in rgb]
    return [int(round(c * 0.5 + 127.5)) for c in rgb]


def _new_object(r: random.Random, size: int, colour: str, shape: str) -> dict:
    """An object's attributes and colours (position comes later, from :func:`_place`)."""
    size_name = r.choice(tuple(SIZES))
    rgb = [int(min(255, max(0, c + r.randint(-12, 12)))) for c in COLOURS[colour]]
    return {
        "shape": shape,
        "colour": colour,
        "size": size_name,
        "pattern": r.choice(PATTERNS),
        "radius": round(SIZES[size_name] * size * r.uniform(0.93, 1.07), 2),
        "rgb": rgb,
        "pattern_rgb": _shade(rgb),
    }


def _place(r: random.Random, objects: list[dict], size: int) -> None:
    """Give every object a centre that keeps the whole shape inside the image."""
    for obj in objects:
        margin = obj["radius"] + 1.0
        obj["center"] = [round(r.uniform(margin, size - margin), 2), round(r.uniform(margin, size - margin), 2)]


def _visible_counts(layers: list[render.Layer], owner: np.ndarray) -> list[int]:
    return [int(np.count_nonzero(owner[layer.window] == index)) for index, layer in enumerate(layers)]


def _layout(r: random.Random, objects: list[dict], size: int) -> list[render.Layer] | None:
    """Try positions until every object keeps enough of itself visible; its layers, or None on failure."""
    for _ in range(POSITION_TRIES):
        _place(r, objects, size)
        layers = [render.object_layer(obj, size) for obj in objects]
        seen = _visible_counts(layers, render.owner_map(layers, size))
        if all(v >= max(MIN_VISIBLE_PIXELS, MIN_VISIBLE * int(np.count_nonzero(layer.inside)))
               for v, layer in zip(seen, layers, strict=True)):
            return layers
    return None


def _measure(objects: list[dict], layers: list[render.Layer], bg: np.ndarray, size: int) -> None:
    """Fill in ids, depth, boxes, areas, visible fractions and contrast from the layers."""
    owner = render.owner_map(layers, size)
    for index, (obj, layer) in enumerate(zip(objects, layers, strict=True)):
        seen = owner[layer.window] == index
        area, seen_area = int(np.count_nonzero(layer.inside)), int(np.count_nonzero(seen))
        under = bg[layer.window][layer.inside].mean(axis=0)
        contrast = float(np.linalg.norm(np.asarray(obj["rgb"], dtype=np.float64) - under)) / (255 * math.sqrt(3))
        obj.update(
            id=index, depth=index, box=render.bounding_box(seen, layer.x0, layer.y0), area=area,
            visible_area=seen_area, visible_fraction=round(seen_area / area, 4), contrast=round(contrast, 4),
        )


def _rank_saliency(objects: list[dict]) -> int:
    """Set ``saliency_rank`` (0 = most salient: largest visible area, then contrast); returns its id."""
    order = sorted(objects, key=lambda o: (-o["visible_area"], -o["contrast"], o["id"]))
    for rank, obj in enumerate(order):
        obj["saliency_rank"] = rank
    return order[0]["id"]


def _box_center(obj: dict) -> tuple[float, float]:
    x0, y0, x1, y1 = obj["box"]
    return (x0 + x1) / 2, (y0 + y1) / 2


def _axis_relation(a: dict, b: dict, axis: int, margin: float) -> int:
    """+1 if ``a`` is clearly before ``b`` on the axis (left of / above), -1 if clearly after, 0 if unclear."""
    deltas = (b["center"][axis] - a["center"][axis], _box_center(b)[axis] - _box_center(a)[axis])
    if min(deltas) >= margin:
        return 1
    if max(deltas) <= -margin:
        return -1
    return 0


def _bigger(a: dict, b: dict) -> bool:
    order = tuple(SIZES)
    return (order.index(a["size"]) > order.index(b["size"]) and a["area"] >= SIZE_AREA_RATIO * b["area"]
            and a["visible_area"] > b["visible_area"])


def pair_relations(a: dict, b: dict, size: int) -> list[str]:
    """The unambiguous relations "a REL b" (the inverse relations hold for "b REL a")."""
    margin = RELATION_MARGIN * size
    found = []
    for axis, names in ((0, ("left of", "right of")), (1, ("above", "below"))):
        side = _axis_relation(a, b, axis, margin)
        if side:
            found.append(names[0] if side > 0 else names[1])
    if _bigger(a, b):
        found.append("bigger than")
    elif _bigger(b, a):
        found.append("smaller than")
    return found


def scene_relations(objects: list[dict], size: int) -> list[dict]:
    """All directed relations ``{"subject", "relation", "object"}`` between object pairs, both directions."""
    found = []
    for a in objects:
        for b in objects:
            if a["id"] < b["id"]:
                for name in pair_relations(a, b, size):
                    found.append({"subject": a["id"], "relation": name, "object": b["id"]})
                    found.append({"subject": b["id"], "relation": INVERSE[name], "object": a["id"]})
    return sorted(found, key=lambda rel: (rel["subject"], rel["object"], rel["relation"]))


def _sample_objects(r: random.Random, index: int, size: int, heldout: list[tuple],
                    max_objects: int = MAX_OBJECTS) -> tuple[list[dict], list]:
    """Objects with a valid layout (dropping objects if a crowded scene cannot be laid out); at most
    ``max_objects`` of them (the count is drawn as usual, then capped)."""
    split = split_of(index)
    allowed = [(c, s) for c in COLOURS for s in SHAPES if split == "test" or (c, s) not in heldout]
    forced = r.choice(heldout) if heldout and forces_heldout(index) else None
    count = min(r.choices(OBJECT_COUNTS, weights=COUNT_WEIGHTS)[0], max_objects)
    objects = [_new_object(r, size, c, s) for c, s in _pick_pairs(r, count, allowed, forced)]
    while True:
        layers = _layout(r, objects, size)
        if layers is not None:
            return objects, layers
        keep = [o for o in objects if (o["colour"], o["shape"]) == forced]
        drop = max(i for i, o in enumerate(objects) if o not in keep)
        objects.pop(drop)


def make_scene(r: random.Random, index: int, size: int, heldout: list[tuple[str, str]],
               max_objects: int = MAX_OBJECTS) -> tuple[dict, np.ndarray]:
    """Sample and draw image ``index`` from its random stream ``r`` (:func:`image_random`): its scene
    record (objects.json entry, without captions) and its (size, size, 3) uint8 pixels."""
    bg_spec = sample_background(r, size)
    objects, layers = _sample_objects(r, index, size, heldout, max_objects)
    bg = render.background(bg_spec, size)
    _measure(objects, layers, bg, size)
    salient = _rank_saliency(objects)
    pairs = set(map(tuple, heldout))
    for obj in objects:
        obj["heldout"] = (obj["colour"], obj["shape"]) in pairs
    scene = {
        "image": f"images/{index:06d}.png",
        "image_id": index,
        "split": split_of(index),
        "size": size,
        "background": bg_spec,
        "objects": objects,
        "depth_order": [obj["id"] for obj in objects],
        "salient": salient,
        "relations": scene_relations(objects, size),
        "heldout": any(obj["heldout"] for obj in objects),
    }
    return scene, render.render(bg, objects, layers)
