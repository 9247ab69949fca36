"""Annotation records, samples and loaders shared by the downstream tasks.

A task names the fields its ALBEF-format records must have (:class:`Field`), and turns a checked
record into the extra values of a sample (labels, answers, ...). Everything else is common: every
record of every file is checked before any model is built (errors name the file, the record and the
problem); images are decoded on the CPU into uint8 ``(3, S, S)`` tensors (one per path when a record
has several images, e.g. NLVR2's pair); the text is cleaned as in pretraining; bad samples are
skipped and counted like in pretraining (``data.on_bad_sample``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from softmask.config import Config, ConfigError
from softmask.data.annotations import AnnotationError, _read_json, _type_name
from softmask.data.images import BadSample, load_image, to_tensor
from softmask.data.sampler import ResumableSampler
from softmask.data.text import load_tokenizer, pre_caption, tokenize
from softmask.data.workers import ignore_ctrl_c


@dataclass(frozen=True)
class Field:
    """A required record field: its name, the JSON types allowed, and an optional check of the value
    that returns a problem description (or None when the value is fine)."""

    name: str
    types: tuple[type, ...]
    check: Callable[[object], str | None] | None = None


def _describe(types: tuple[type, ...]) -> str:
    names = {str: "a string", list: "a list", int: "an integer", float: "a number", dict: "an object",
             bool: "true/false"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def load_task_records(files: Sequence[str], image_root: str, fields: Sequence[Field],
                      image_key: str = "image", key: str = "finetune.train") -> list[dict]:
    """Read and check task annotation files.

    Args:
        files: JSON files, each a list of objects.
        image_root: folder joined to relative image paths ("" keeps them as they are).
        fields: the required fields besides ``image_key`` (other keys are kept and ignored).
        image_key: ``"image"`` (one path) or ``"images"`` (a non-empty list of paths).
        key: the config key ``files`` came from, for the message when it is empty.

    Returns:
        The records of all files in file order, as dicts with the image path(s) joined to
        ``image_root`` and ``_source`` ("file: record i") added for messages.

    Raises:
        AnnotationError: naming the file, the record index and the problem.
    """
    if not files:
        raise ConfigError(f"{key} is empty: give {key}=[FILE.json,...] (ALBEF-format annotations), or world=DIR "
                          "for a folder written by `softmask world`")
    records = []
    for path in map(str, files):
        data = _read_json(path)
        if not isinstance(data, list):
            raise AnnotationError(f"{path}: the top level must be a JSON list of records, got {_type_name(data)}")
        for index, item in enumerate(data):
            where = f"{path}: record {index}"
            if not isinstance(item, dict):
                raise AnnotationError(f"{where}: must be an object, got {_type_name(item)}")
            for field in (Field(image_key, (str, list)), *fields):
                if field.name not in item:
                    keys = ", ".join(map(str, item)) or "none"
                    raise AnnotationError(f"{where}: missing '{field.name}' (keys: {keys})")
                value = item[field.name]
                if not isinstance(value, field.types) or (isinstance(value, bool) and bool not in field.types):
                    raise AnnotationError(f"{where}: '{field.name}' must be {_describe(field.types)}, "
                                          f"got {_type_name(value)}")
                problem = field.check(value) if field.check else None
                if problem:
                    raise AnnotationError(f"{where}: '{field.name}' {problem}")
            paths = item[image_key]
            paths = [paths] if isinstance(paths, str) else paths
            if not paths or not all(isinstance(p, str) and p.strip() for p in paths):
                raise AnnotationError(f"{where}: '{image_key}' must hold non-empty path strings, got {paths!r}")
            joined = [os.path.join(image_root, p) if image_root and not os.path.isabs(p) else p for p in paths]
            record = dict(item)
            record[image_key] = joined if image_key == "images" else joined[0]
            record["_source"] = where
            records.append(record)
    return records


class TaskDataset(Dataset):
    """Records -> samples ``{"image": uint8 (3, S, S) or (K, 3, S, S), "text": str, "index": int,
    **extras(record)}``, or ``{"bad": "path: reason"}`` (skipped and counted by :class:`TaskCollator`).

    Args:
        records: from :func:`load_task_records`.
        text_key: the record field holding the text (caption, question, sentence, hypothesis).
        extras: record -> the task's extra sample values (tensors, numbers or any Python object).
        image_key: "image" (one path) or "images" (several; stacked to (K, 3, S, S)).
    """

    def __init__(self, records: Sequence[dict], cfg: Config, text_key: str,
                 extras: Callable[[dict], dict] | None = None, image_key: str = "image") -> None:
        self.records = list(records)
        self.text_key, self.extras, self.image_key = text_key, extras, image_key
        self.image_size = cfg.model.vision.image_size
        self.max_words, self.max_pixels = cfg.data.max_words, cfg.data.max_image_pixels
        self.on_bad_sample = cfg.data.on_bad_sample

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index = int(key[0]) if isinstance(key, tuple) else int(key)
        record = self.records[index]
        paths = record[self.image_key]
        try:
            text = pre_caption(str(record[self.text_key]), self.max_words)
            if not text:
                raise BadSample(f"{record['_source']}: '{self.text_key}' empty after cleaning")
            if isinstance(paths, str):
                image = to_tensor(load_image(paths, self.max_pixels, draft_size=self.image_size), self.image_size)
            else:
                image = torch.stack([to_tensor(load_image(p, self.max_pixels, draft_size=self.image_size),
                                               self.image_size) for p in paths])
        except BadSample as exc:
            if self.on_bad_sample == "raise":
                raise
            return {"bad": str(exc)}
        item = {"image": image, "text": text, "index": index}
        if self.extras is not None:
            item.update(self.extras(record))
        return item


class TaskCollator:
    """Samples of :class:`TaskDataset` -> a batch: ``images`` uint8 (B, 3, S, S) or (B, K, 3, S, S);
    ``input_ids``/``attention_mask`` long (B, T); ``indices`` long (B,); every extra key stacked when
    its values are tensors or numbers, else kept as a list; ``skipped`` int and ``skipped_samples``."""

    def __init__(self, cfg: Config):
        self.tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.data.max_tokens)

    def __call__(self, items: Sequence[dict]) -> dict:
        good = [item for item in items if "bad" not in item]
        skipped = [item["bad"] for item in items if "bad" in item]
        if not good:
            return {"images": None, "skipped": len(skipped), "skipped_samples": skipped}
        input_ids, attention_mask = tokenize(self.tokenizer, [item["text"] for item in good])
        batch = {"images": torch.stack([item["image"] for item in good]), "input_ids": input_ids,
                 "attention_mask": attention_mask, "texts": [item["text"] for item in good],
                 "indices": torch.tensor([item["index"] for item in good], dtype=torch.long)}
        for key in good[0]:
            if key in ("image", "text", "index"):
                continue
            values = [item[key] for item in good]
            if all(isinstance(v, torch.Tensor) for v in values):
                batch[key] = torch.stack(values)
            elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                batch[key] = torch.tensor(values)
            else:
                batch[key] = values
        batch["skipped"], batch["skipped_samples"] = len(skipped), skipped
        return batch


def train_loader(cfg: Config, dataset: TaskDataset, rank: int, world_size: int) -> tuple[DataLoader, ResumableSampler]:
    """Shuffled, resumable, distributed batches of ``train.batch_size`` per rank (as in pretraining)."""
    try:
        sampler = ResumableSampler(len(dataset), cfg.train.batch_size, rank, world_size, seed=cfg.seed)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    workers = cfg.data.num_workers
    loader = DataLoader(dataset, batch_size=cfg.train.batch_size, sampler=sampler, collate_fn=TaskCollator(cfg),
                        num_workers=workers, persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
                        worker_init_fn=ignore_ctrl_c,
                        generator=torch.Generator().manual_seed(cfg.seed))
    return loader, sampler


def eval_loader(cfg: Config, dataset: TaskDataset, rank: int = 0, world_size: int = 1) -> DataLoader:
    """This rank's share (records ``rank::world_size``, in order) in batches of ``finetune.eval_batch_size``.
    Combine the ranks' results with :func:`softmask.train.dist.gather_objects`."""
    indices = list(range(rank, len(dataset), world_size))
    return DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=cfg.finetune.eval_batch_size,
                      shuffle=False, collate_fn=TaskCollator(cfg), num_workers=cfg.data.num_workers)
