"""A world folder's images with their object labels, for pretraining the image encoder alone
(``softmask pretrain-vision world=DIR``). Per image:

  * ``objects`` (K, 4) long: the shape, colour, size and pattern index of each of up to K objects,
    in :data:`OBJECT_ATTRIBUTES` order, ``-100`` for the slots of absent objects;
  * ``boxes`` (K, 4) float: each object's visible box ``[x0, y0, x1, y1]`` in pixels of the image as
    stored (x1/y1 exclusive), zeros for absent objects;
  * ``presence`` (P,) float: multi-hot over :func:`presence_names` (every attribute value and every
    colour-shape pair the image holds).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from softmask.config import ConfigError
from softmask.data.labelled_images import LabelledImages, read_images
from softmask.world.vocab import COLOURS, SHAPES, VALUES

OBJECT_ATTRIBUTES = ("shape", "colour", "size", "pattern")  # the order of the ``objects`` columns
MAX_OBJECTS = 4


def presence_names() -> list[str]:
    """The world's presence labels: ``attribute=value`` for every value, then ``colour shape`` pairs."""
    names = [f"{a}={v}" for a in OBJECT_ATTRIBUTES for v in VALUES[a]]
    return names + [f"{c} {s}" for c in COLOURS for s in SHAPES]


def heldout_pairs_of(world: str | Path) -> set[tuple[str, str]]:
    path = Path(world) / "world.json"
    try:
        return {tuple(pair) for pair in json.loads(path.read_text())["heldout_pairs"]}
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(f"image_pretrain.exclude_heldout_of: cannot read the held-out pairs of {path} "
                          f"({type(exc).__name__}: {exc}); expected a folder written by `softmask world`") from None


def world_objects(world: str | Path, split: str, image_size: int, max_pixels: int = 100_000_000,
                  exclude_pairs: set[tuple[str, str]] = frozenset()) -> LabelledImages:
    """The images of one split of a world folder with their object labels (see the module docstring).
    Images holding an object whose (colour, shape) is in ``exclude_pairs`` are left out. Boxes are
    rescaled to ``image_size``."""
    path = Path(world) / "annotations" / "objects.json"
    if not path.is_file():
        raise ConfigError(f"world: {path} not found; expected a folder written by `softmask world`")
    try:
        scenes = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    index = {a: {v: i for i, v in enumerate(VALUES[a])} for a in OBJECT_ATTRIBUTES}
    presence_index = {name: i for i, name in enumerate(presence_names())}
    chosen, objects, boxes, presence = [], [], [], []
    for n, scene in enumerate(scenes):
        try:
            if scene["split"] != split:
                continue
            items = scene["objects"]
            if any((o["colour"], o["shape"]) in exclude_pairs for o in items):
                continue
            rows = torch.full((MAX_OBJECTS, len(OBJECT_ATTRIBUTES)), -100, dtype=torch.long)
            box = torch.zeros(MAX_OBJECTS, 4)
            hot = torch.zeros(len(presence_index))
            scale = image_size / float(scene["size"])
            for k, obj in enumerate(items[:MAX_OBJECTS]):
                rows[k] = torch.tensor([index[a][obj[a]] for a in OBJECT_ATTRIBUTES])
                box[k] = torch.tensor([float(v) for v in obj["box"]]) * scale
                for a in OBJECT_ATTRIBUTES:
                    hot[presence_index[f"{a}={obj[a]}"]] = 1.0
                hot[presence_index[f"{obj['colour']} {obj['shape']}"]] = 1.0
            image = Path(world) / scene["image"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{path}: record {n} is not a world scene ({type(exc).__name__}: {exc})") from None
        chosen.append(image)
        objects.append(rows)
        boxes.append(box)
        presence.append(hot)
    if not chosen:
        raise ConfigError(f"{path}: no '{split}' images" + (" left after excluding the held-out pairs"
                                                            if exclude_pairs else ""))
    tensors, kept = read_images(chosen, image_size, max_pixels)
    if not kept:
        raise ConfigError(f"world: none of the {len(chosen)} '{split}' images could be read (e.g. {chosen[0]})")
    classes = {**{a: list(VALUES[a]) for a in OBJECT_ATTRIBUTES}, "presence": presence_names()}
    return LabelledImages(torch.stack(tensors),
                          {"objects": torch.stack([objects[i] for i in kept]),
                           "boxes": torch.stack([boxes[i] for i in kept]),
                           "presence": torch.stack([presence[i] for i in kept])},
                          classes, [str(chosen[i]) for i in kept])
