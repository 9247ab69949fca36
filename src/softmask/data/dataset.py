"""Samples, batch collation and DataLoaders: the one data pipeline of pretraining and the tasks.

Pretraining reads image-caption records (:class:`CaptionDataset`, or the shard stream of
:mod:`softmask.data.shards`); a task reads records with its own fields (:class:`TaskDataset`), whose
extra sample values (labels, answers, ...) are its extension of the common sample. A sample is
decoded on the CPU (in DataLoader workers) into a uint8 ``(3, S, S)`` tensor and a cleaned text
(caption, question, sentence); random augmentation happens later, batched on the training device
(:mod:`softmask.data.transforms`). Bad samples (unreadable images, captions empty after cleaning)
do not stop training: they become ``{"bad": "path: reason"}`` items, which the :class:`Collator`
drops and counts, so every batch reports how many samples it lost and why.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Sequence

import braceexpand
import numpy as np
import torch
from PIL import Image
from tokenizers import BertWordPieceTokenizer
from torch.utils.data import DataLoader, Dataset

from softmask.config import BAD_SAMPLE_POLICIES, Config, ConfigError, describe_choices
from softmask.data.annotations import Record, load_annotations
from softmask.data.images import BadSample, load_image, to_tensor
from softmask.data.sampler import ResumableSampler
from softmask.data.text import load_tokenizer, pre_caption, tokenize
from softmask.data.workers import ignore_ctrl_c


def is_shard_entry(entry: str) -> bool:
    """Whether a ``data.train`` entry names webdataset tar shards (rather than a JSON annotation file)."""
    return entry.endswith(".tar")


def expand_entries(entries: Sequence[str], key: str = "data.train") -> list[str]:
    """``data.train`` entries -> file names, in order: brace patterns (``part-{000..009}.tar``) and then
    glob patterns (``shards/*.tar``, sorted) of local paths are expanded; URLs and ``pipe:`` commands
    are kept as they are.

    Raises:
        ConfigError: a glob pattern that matches no file.
    """
    files = []
    for entry in entries:
        for path in braceexpand.braceexpand(entry):
            if "://" in path or path.startswith("pipe:") or not glob.has_magic(path):
                files.append(path)
                continue
            matches = sorted(glob.glob(os.path.expanduser(path)))
            if not matches:
                raise ConfigError(f"{key}: the pattern '{path}' matches no file")
            files.extend(matches)
    return files


def choose_caption(captions: Sequence[str], seed: int, epoch: int, index: int) -> str:
    """One of ``captions``, chosen deterministically from ``(seed, epoch, index)`` (all >= 0)."""
    if len(captions) == 1:
        return captions[0]
    rng = np.random.default_rng([seed, epoch, index])
    return captions[int(rng.integers(len(captions)))]


def make_item(
    name: str, read_image: Callable[[], Image.Image | list[Image.Image]], texts: Sequence[str], index: int,
    epoch: int, *, seed: int, image_size: int, max_words: int, on_bad_sample: str, what: str = "caption",
) -> dict:
    """Build one sample: clean the texts, choose one, read and resize the image(s).

    Texts that are empty after :func:`pre_caption` are dropped before the choice; a sample none of
    whose texts survives is bad. The text is checked first, so such a sample costs no decoding.

    Args:
        read_image: returns one image, or a list of them (stacked, e.g. NLVR2's pair).
        what: how the text is named in the message of a bad sample.

    Returns:
        ``{"image": uint8 (3, S, S) or (K, 3, S, S), "text": str, "index": int}``, or
        ``{"bad": "name: reason"}`` for a bad sample when ``on_bad_sample == "skip"``.

    Raises:
        BadSample: for a bad sample when ``on_bad_sample == "raise"``.
    """
    try:
        cleaned = [text for text in (pre_caption(t, max_words) for t in texts) if text]
        if not cleaned:
            raise BadSample(f"{name}: {what} empty after cleaning ({texts[0][:60]!r})")
        text = choose_caption(cleaned, seed, epoch, index)
        decoded = read_image()
        image = (torch.stack([to_tensor(i, image_size) for i in decoded]) if isinstance(decoded, list)
                 else to_tensor(decoded, image_size))
    except BadSample as exc:
        if on_bad_sample == "raise":
            raise
        return {"bad": str(exc)}
    return {"image": image, "text": text, "index": index}


def _check_on_bad_sample(value: str) -> None:
    if value not in BAD_SAMPLE_POLICIES:
        raise ValueError(f"on_bad_sample must be {describe_choices(BAD_SAMPLE_POLICIES)}, got {value!r}")


class CaptionDataset(Dataset):
    """Map-style dataset over :class:`Record` s, indexed by ``(index, epoch)`` (from
    :class:`ResumableSampler`) or a plain ``index`` (epoch 0).

    Args:
        records: from :func:`load_annotations`.
        image_size: side of the square uint8 images returned.
        max_words: caption word limit of :func:`pre_caption`.
        max_pixels: decoded-size cap (width * height) against decompression bombs.
        seed: with the epoch and index, picks one caption of a multi-caption record.
        on_bad_sample: "skip" returns ``{"bad": "path: reason"}``; "raise" raises :class:`BadSample`.
    """

    def __init__(
        self, records: Sequence[Record], image_size: int, max_words: int, max_pixels: int, seed: int = 0,
        on_bad_sample: str = "skip",
    ) -> None:
        _check_on_bad_sample(on_bad_sample)
        self.records = list(records)
        self.image_size = image_size
        self.max_words = max_words
        self.max_pixels = max_pixels
        self.seed = seed
        self.on_bad_sample = on_bad_sample

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        """``{"image": uint8 (3, S, S), "text": str, "index": int}`` or ``{"bad": "path: reason"}``."""
        index, epoch = (int(key[0]), int(key[1])) if isinstance(key, tuple) else (int(key), 0)
        record = self.records[index]

        def read() -> Image.Image:
            return load_image(record.image, self.max_pixels, draft_size=self.image_size)

        return make_item(
            record.image, read, record.captions, index, epoch, seed=self.seed, image_size=self.image_size,
            max_words=self.max_words, on_bad_sample=self.on_bad_sample,
        )


class TaskDataset(Dataset):
    """Task records -> samples ``{"image": uint8 (3, S, S) or (K, 3, S, S), "text": str, "index": int,
    **extras(record)}``, or ``{"bad": "path: reason"}`` (skipped and counted by :class:`Collator`).

    Args:
        records: from :func:`softmask.data.annotations.load_records`.
        text_key: the record field holding the text (caption, question, sentence, hypothesis).
        extras: record -> the task's extra sample values (tensors, numbers or any Python object).
        image_key: "image" (one path) or "images" (several; stacked to (K, 3, S, S)).
    """

    def __init__(self, records: Sequence[dict], cfg: Config, text_key: str,
                 extras: Callable[[dict], dict] | None = None, image_key: str = "image") -> None:
        _check_on_bad_sample(cfg.data.on_bad_sample)
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

        def read() -> Image.Image | list[Image.Image]:
            if isinstance(paths, str):
                return load_image(paths, self.max_pixels, draft_size=self.image_size)
            return [load_image(p, self.max_pixels, draft_size=self.image_size) for p in paths]

        item = make_item(record["_source"], read, [str(record[self.text_key])], index, 0, seed=0,
                         image_size=self.image_size, max_words=self.max_words, on_bad_sample=self.on_bad_sample,
                         what=f"'{self.text_key}'")
        if "bad" not in item and self.extras is not None:
            item.update(self.extras(record))
        return item


class Collator:
    """Samples of :class:`CaptionDataset`, :class:`TaskDataset` or the shard stream -> one batch dict.

    Args:
        tokenizer: from :func:`softmask.data.text.load_tokenizer`; truncation to ``max_tokens`` (with
            [SEP] kept last) and padding to the longest text are (re)enabled on it.
        max_tokens: WordPiece tokens per text, [CLS] and [SEP] included.
        image_size: side of the images, used only for the shape of an all-bad (empty) batch; None
            gives ``(0, 3, 0, 0)`` images then.

    Returns (``__call__``):
        ``images`` uint8 (B, 3, S, S) or (B, K, 3, S, S); ``input_ids`` long (B, T) and ``attention_mask``
        long (B, T) with T = the longest text in the batch (at most ``max_tokens``); ``indices`` long (B,);
        ``texts`` list[str] (B); ``skipped`` int; ``skipped_samples`` list[str] ("path: reason"); and
        every task extra, stacked when its values are tensors or numbers, else kept as a list.
        B counts the good samples only; when every sample is bad, B = 0 and T = ``max_tokens``.
    """

    COMMON = ("image", "text", "index")

    def __init__(self, tokenizer: BertWordPieceTokenizer, max_tokens: int, image_size: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.image_size = image_size
        tokenizer.enable_truncation(max_length=max_tokens)
        if tokenizer.padding is None:
            tokenizer.enable_padding(pad_id=tokenizer.token_to_id("[PAD]"), pad_token="[PAD]")

    @classmethod
    def for_config(cls, cfg: Config) -> Collator:
        """The collator of ``cfg.data``'s tokenizer and token limit at ``cfg.model.vision.image_size``."""
        return cls(load_tokenizer(cfg.data.tokenizer, cfg.data.max_tokens), cfg.data.max_tokens,
                   cfg.model.vision.image_size)

    def __call__(self, items: Sequence[dict]) -> dict:
        good = [item for item in items if "bad" not in item]
        skipped = [item["bad"] for item in items if "bad" in item]
        texts = [item["text"] for item in good]
        if good:
            images = torch.stack([item["image"] for item in good])
            input_ids, attention_mask = tokenize(self.tokenizer, texts)
        else:
            size = self.image_size or 0
            images = torch.empty(0, 3, size, size, dtype=torch.uint8)
            input_ids = torch.empty(0, self.max_tokens, dtype=torch.long)
            attention_mask = torch.empty(0, self.max_tokens, dtype=torch.long)
        batch = {
            "images": images,
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "indices": torch.tensor([item["index"] for item in good], dtype=torch.long),
            "texts": texts,
        }
        for key in (k for k in (good[0] if good else ()) if k not in self.COMMON):
            values = [item[key] for item in good]
            if all(isinstance(v, torch.Tensor) for v in values):
                batch[key] = torch.stack(values)
            elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                batch[key] = torch.tensor(values)
            else:
                batch[key] = values
        batch["skipped"], batch["skipped_samples"] = len(skipped), skipped
        return batch


def data_loader(cfg: Config, dataset: Dataset, batch_size: int, workers: int | None = None, **options) -> DataLoader:
    """A DataLoader with the pipeline's common settings: :class:`Collator` of ``cfg``, ``workers`` workers
    (default ``cfg.data.num_workers``) that ignore Ctrl-C, memory pinned only when CUDA is available,
    and its own seeded generator: creating an iterator must not draw from the global RNG, or a resumed
    run (which creates one mid-epoch) would diverge from an uninterrupted one. ``options`` go to the
    DataLoader (sampler, persistent_workers, ...)."""
    workers = cfg.data.num_workers if workers is None else workers
    return DataLoader(dataset, batch_size=batch_size, collate_fn=Collator.for_config(cfg), num_workers=workers,
                      pin_memory=torch.cuda.is_available(), drop_last=False, worker_init_fn=ignore_ctrl_c,
                      generator=torch.Generator().manual_seed(cfg.seed), **options)


def train_loader(cfg: Config, dataset: Dataset, rank: int, world_size: int) -> tuple[DataLoader, ResumableSampler]:
    """Shuffled, resumable, distributed batches of ``cfg.train.batch_size`` per rank over a map-style
    dataset (call ``sampler.set_epoch(e)`` before each epoch and ``sampler.set_start_batch(k)`` to
    resume); workers are persistent when there are any.

    Raises:
        ConfigError: the data is smaller than one global batch.
    """
    try:
        sampler = ResumableSampler(len(dataset), cfg.train.batch_size, rank, world_size, seed=cfg.seed)
    except ValueError as exc:  # a setting to change, not a crash
        raise ConfigError(str(exc)) from None
    loader = data_loader(cfg, dataset, cfg.train.batch_size, sampler=sampler,
                         persistent_workers=cfg.data.num_workers > 0)
    return loader, sampler


def eval_loader(cfg: Config, dataset: Dataset, rank: int = 0, world_size: int = 1) -> DataLoader:
    """This rank's share (records ``rank::world_size``, in order) in batches of ``finetune.eval_batch_size``.
    Combine the ranks' results with :func:`softmask.train.dist.gather_objects`."""
    indices = list(range(rank, len(dataset), world_size))
    return data_loader(cfg, torch.utils.data.Subset(dataset, indices), cfg.finetune.eval_batch_size)


def build_pretrain_loader(cfg: Config, rank: int, world_size: int) -> tuple[DataLoader, ResumableSampler]:
    """The training DataLoader over ``cfg.data.train``'s JSON annotation files.

    Images are decoded at ``cfg.model.vision.image_size``; batches of ``cfg.train.batch_size`` per
    rank follow :class:`ResumableSampler` (call ``sampler.set_epoch(e)`` before each epoch and
    ``sampler.set_start_batch(k)`` to resume), as :func:`train_loader`.

    Raises:
        ConfigError: ``data.train`` has no JSON file or contains tar shards (use
            :func:`softmask.data.shards.build_shard_loader`), or the data is smaller than one global
            batch; AnnotationError for a bad file.
    """
    files = expand_entries(cfg.data.train)
    if not files:
        raise ConfigError("data.train is empty: list ALBEF JSON annotation files or .tar shards")
    shards = [entry for entry in files if is_shard_entry(entry)]
    if shards:
        raise ConfigError(
            f"data.train lists tar shards ({shards[0]}); build_pretrain_loader reads JSON annotation files "
            "only (shards go through softmask.data.shards.build_shard_loader; mixing both is not supported)"
        )
    records = load_annotations(files, cfg.data.image_root, cfg.data.path_map)
    dataset = CaptionDataset(
        records, cfg.model.vision.image_size, cfg.data.max_words, cfg.data.max_image_pixels, seed=cfg.seed,
        on_bad_sample=cfg.data.on_bad_sample,
    )
    return train_loader(cfg, dataset, rank, world_size)
