"""Labelled images held in memory as uint8 tensors, for pretraining the image encoder alone
(``softmask pretrain-vision``): an ImageNet-style folder (``class_name/image.jpg``; ``label`` () long,
the index of the image's class folder in sorted order) here, a world's objects in
:mod:`softmask.world.objects`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from softmask.config import ConfigError
from softmask.data.images import BadSample, load_image, to_tensor

log = logging.getLogger("softmask")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


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


def read_images(paths: list[Path], size: int, max_pixels: int) -> tuple[list[torch.Tensor], list[int]]:
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
        tensors, kept = read_images(paths, image_size, max_pixels)
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
