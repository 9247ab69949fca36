"""Labelled images for pretraining the image encoder alone (``softmask pretrain-vision``), held in
memory as uint8 tensors: the objects of a world folder (from its ``objects.json``) or an
ImageNet-style folder (``class_name/image.jpg``).

World labels, per image:
  * ``objects`` (K, 4) long: the shape, colour, size and pattern index of each of up to K objects,
    in :data:`OBJECT_ATTRIBUTES` order, ``-100`` for the slots of absent objects;
  * ``boxes`` (K, 4) float: each object's visible box ``[x0, y0, x1, y1]`` in pixels of the image as
    stored (x1/y1 exclusive), zeros for absent objects;
  * ``presence`` (P,) float: multi-hot over :func:`presence_names` (every attribute value and every
    colour-shape pair the image holds).
Folder labels: ``label`` () long, the index of the image's class folder in sorted order.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from softmask.config import ConfigError
from softmask.data.images import BadSample, load_image, to_tensor
from softmask.world.vocab import COLOURS, SHAPES, VALUES

log = logging.getLogger("softmask")

OBJECT_ATTRIBUTES = ("shape", "colour", "size", "pattern")  # the order of the ``objects`` columns
MAX_OBJECTS = 4
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def presence_names() -> list[str]:
    """The world's presence labels: ``attribute=value`` for every value, then ``colour shape`` pairs."""
    names = [f"{a}={v}" for a in OBJECT_ATTRIBUTES for v in VALUES[a]]
    return names + [f"{c} {s}" for c in COLOURS for s in SHAPES]


@dataclass
class LabelledImages:
    """``images`` (N, 3, S, S) uint8 and ``labels`` name -> (N, ...) tensors; ``classes`` names the
    values of each label (``objects`` columns in :data:`OBJECT_ATTRIBUTES` order, ``presence``,
    ``label``); ``paths`` the source files."""

    images: torch.Tensor
    labels: dict[str, torch.Tensor]
    classes: dict[str, list[str]]
    paths: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.images.shape[0]


def _read_images(paths: list[Path], size: int, max_pixels: int) -> tuple[list[torch.Tensor], list[int]]:
    """Decoded (3, size, size) uint8 tensors and the indices of the paths that could be read; every
    unreadable file is logged and counted, not fatal."""
    tensors, kept, bad = [], [], 0
    for i, path in enumerate(paths):
        try:
            tensors.append(to_tensor(load_image(str(path), max_pixels, draft_size=size), size))
            kept.append(i)
        except BadSample as exc:
            bad += 1
            if bad <= 5:
                log.warning(f"skipped bad image: {exc}")
    if bad:
        log.warning(f"skipped {bad} unreadable image(s) of {len(paths)}")
    return tensors, kept


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
    tensors, kept = _read_images(chosen, image_size, max_pixels)
    if not kept:
        raise ConfigError(f"world: none of the {len(chosen)} '{split}' images could be read (e.g. {chosen[0]})")
    classes = {**{a: list(VALUES[a]) for a in OBJECT_ATTRIBUTES}, "presence": presence_names()}
    return LabelledImages(torch.stack(tensors),
                          {"objects": torch.stack([objects[i] for i in kept]),
                           "boxes": torch.stack([boxes[i] for i in kept]),
                           "presence": torch.stack([presence[i] for i in kept])},
                          classes, [str(chosen[i]) for i in kept])


def image_folder(root: str | Path, image_size: int, val_share: float, seed: int = 0,
                 max_pixels: int = 100_000_000) -> tuple[LabelledImages, LabelledImages]:
    """An ImageNet-style folder (``root/class_name/*.jpg``, one sub-folder per class, sorted names) split
    into (train, held-out): ``val_share`` of each class's images (at least one, when it has two) are held
    out, chosen with ``seed``."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"image_pretrain.folder: {root} is not a folder")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(class_dirs) < 2:
        raise ConfigError(f"image_pretrain.folder: {root} needs at least two class folders (class_name/image.jpg), "
                          f"found {len(class_dirs)}")
    rng = random.Random(seed)
    splits: dict[str, tuple[list[Path], list[int]]] = {"train": ([], []), "val": ([], [])}
    for label, folder in enumerate(class_dirs):
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise ConfigError(f"image_pretrain.folder: class folder {folder} holds no images "
                              f"({', '.join(IMAGE_SUFFIXES)})")
        rng.shuffle(files)
        held = max(1, round(val_share * len(files))) if len(files) > 1 else 0
        for name, part in (("val", files[:held]), ("train", files[held:])):
            splits[name][0].extend(part)
            splits[name][1].extend([label] * len(part))
    classes = {"label": [p.name for p in class_dirs]}
    out = []
    for name in ("train", "val"):
        paths, labels = splits[name]
        tensors, kept = _read_images(paths, image_size, max_pixels)
        if not kept:
            raise ConfigError(f"image_pretrain.folder: no readable {name} image under {root}")
        out.append(LabelledImages(torch.stack(tensors), {"label": torch.tensor([labels[i] for i in kept])},
                                  classes, [str(paths[i]) for i in kept]))
    return out[0], out[1]


class InMemorySource:
    """A :class:`softmask.train.loop.DataSource` over :class:`LabelledImages`: every epoch a permutation
    drawn from ``(seed, epoch)``, cut into global batches of ``batch_size * world_size`` (the last,
    incomplete one dropped), each rank taking its slice; resumable at any batch."""

    def __init__(self, data: LabelledImages, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = len(data) // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise ConfigError(f"{len(data)} training images are fewer than one global batch "
                              f"(train.batch_size {batch_size} x {world_size} process(es))")

    def batches(self, epoch: int, start_batch: int) -> Iterator[dict]:
        order = torch.randperm(len(self.data), generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
        step = self.batch_size * self.world_size
        for b in range(start_batch, self.batches_per_epoch):
            rows = order[b * step + self.rank * self.batch_size:][:self.batch_size]
            yield {"images": self.data.images[rows], **{k: v[rows] for k, v in self.data.labels.items()},
                   "skipped": 0}
