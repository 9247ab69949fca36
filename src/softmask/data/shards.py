"""Webdataset ``.tar`` shards: reading them into the same batches as the JSON pipeline, and writing them.

A shard sample is the tar members sharing a key (``<key>.<ext>``): an image under ``jpg``, ``jpeg``,
``png`` or ``webp``, and a caption under ``txt`` (UTF-8) or ``json`` (an object whose ``caption`` is a
string or a list of strings). Members are read with webdataset's tar iterators; the rest is ours.

How an epoch is read (``build_shard_loader``):

1. The shard list (``data.train`` entries ending in ``.tar``, brace-expanded, in the order given) is
   shuffled with a generator seeded by ``(seed, epoch)``, the same on every rank.
2. Rank ``r`` takes every ``world_size``-th shard from position ``r``; shard group ``g`` of that rank
   is every ``num_workers``-th of those from position ``g``, and DataLoader worker ``w`` reads group
   ``w`` (rotated on resume, see 4). Ranks and workers therefore read disjoint shards.
   The worker count is lowered, if needed, so that every worker has at least one shard.
3. Each worker passes its undecoded samples through a shuffle buffer seeded by
   ``(seed, epoch, rank, group)``, then decodes them (bad samples become ``{"bad": ...}`` items,
   counted by the :class:`~softmask.data.dataset.Collator` as in the JSON pipeline).
4. ``skip_batches`` (resume): the DataLoader hands out worker batches round-robin (batch ``i`` comes
   from worker ``i % num_workers``), so the reader of shard group ``g`` skips its share of the first
   ``skip_batches`` batches as undecoded samples, ``batch_size`` per batch. As the round-robin always
   restarts at worker 0, the groups are rotated on resume: worker ``w`` reads group
   ``(w + skip_batches) % num_workers``, which makes the resumed batches the tail of the full epoch.

Approximations, stated honestly:

- Shuffling is shard order plus a bounded buffer (``shuffle_buffer`` samples), not a full permutation.
- Ranks get equal numbers of *shards*, not of samples; with unequal shard sizes or a shard count not
  divisible by ``world_size * num_workers``, ranks can see different numbers of batches in an epoch.
  A DDP trainer must stop the epoch together (e.g. all-reduce a "done" flag, or count steps with
  ``train.max_steps``). Each worker's last batch of the epoch may be short.
- ``skip_batches`` is exact while every worker still has data at the resume point; near the end of an
  epoch, when some workers have run dry, the round-robin order (and so the skip) shifts slightly.
- A sample's ``index`` is ``shard_position * 2**32 + sample_position_in_shard`` (unique and stable
  across epochs, but not a dense 0..N-1 range); it also seeds the choice among several captions.
- A tar file that is itself corrupt (not a sample in it) is logged and the rest of that shard skipped
  with ``on_bad_sample="skip"``; its lost samples are not counted, as their number is unknown.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset import TarWriter
from webdataset.tariterators import tarfile_samples

from softmask.config import BAD_SAMPLE_POLICIES, Config, ConfigError, describe_choices
from softmask.data.annotations import Record
from softmask.data.dataset import data_loader, expand_entries, is_shard_entry, make_item
from softmask.data.images import BadSample, decode_image
from softmask.data.sampler import mix_seed

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
SHUFFLE_BUFFER = 1000  # undecoded samples held per worker for shuffling
INDEX_STRIDE = 2**32  # index = shard position * INDEX_STRIDE + sample position in the shard


def describe_shard_error(exc: Exception) -> str:
    """A readable sentence for an error webdataset's tar reader hands its handler: it appends the stream
    and the shard's URL to the exception's args, and the file object's repr to its message."""
    args = [a for a in getattr(exc, "args", ()) if a is not None]
    reason = str(args[0]).split(" @ ")[0] if args else type(exc).__name__
    url = next((a for a in reversed(args[1:]) if isinstance(a, str)), None)
    where = f"shard {url}" if url else "a shard"
    return f"skipping the rest of damaged {where}: {reason or type(exc).__name__}"


def expand_shards(entries: Iterable[str]) -> list[str]:
    """Brace- and glob-expand the ``.tar`` entries of ``data.train`` into shard paths, in order.

    Raises:
        ConfigError: no shards, or local shard files that do not exist (the first few are named).
    """
    shards = expand_entries([entry for entry in entries if is_shard_entry(entry)])
    if not shards:
        raise ConfigError("data.train names no .tar shards")
    local = [path for path in shards if "://" not in path and not path.startswith("pipe:")]
    missing = [path for path in local if not os.path.isfile(path)]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ConfigError(f"data.train: {len(missing)} shard file(s) not found: {', '.join(missing[:3])}{more}")
    return shards


def shuffle_buffer(samples: Iterable, size: int, rng: random.Random) -> Iterator:
    """Shuffle a stream approximately with a buffer of ``size`` items (size <= 1: no shuffling)."""
    if size <= 1:
        yield from samples
        return
    buffer: list = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        slot = rng.randrange(size)
        yield buffer[slot]
        buffer[slot] = sample
    rng.shuffle(buffer)
    yield from buffer


def worker_skip(skip_batches: int, group: int, num_workers: int) -> int:
    """How many of the first ``skip_batches`` round-robin batches came from shard group ``group``."""
    return len(range(group, skip_batches, num_workers))


def _parse_captions(sample: dict, name: str) -> list[str]:
    if "txt" in sample:
        try:
            return [sample["txt"].decode("utf-8")]
        except UnicodeDecodeError:
            raise BadSample(f"{name}: txt caption is not UTF-8") from None
    if "json" in sample:
        try:
            caption = json.loads(sample["json"]).get("caption")
        except (ValueError, AttributeError):
            raise BadSample(f"{name}: json is not an object with a 'caption'") from None
        if isinstance(caption, str):
            return [caption]
        if isinstance(caption, list) and caption and all(isinstance(c, str) for c in caption):
            return caption
        raise BadSample(f"{name}: json 'caption' must be a string or a non-empty list of strings")
    raise BadSample(f"{name}: no caption (txt or json member)")


class ShardStream(IterableDataset):
    """One rank's samples of one epoch from tar shards, as :func:`make_item` dicts
    (``{"image": uint8 (3, S, S), "text": str, "index": int}`` or ``{"bad": "shard#key: reason"}``).

    See the module docstring for the splitting, shuffling and skipping rules.
    """

    def __init__(
        self, shards: Sequence[str], *, rank: int, world_size: int, epoch: int, seed: int, image_size: int,
        max_words: int, max_pixels: int, on_bad_sample: str = "skip", batch_size: int = 1, skip_batches: int = 0,
        shuffle_buffer: int = SHUFFLE_BUFFER,
    ) -> None:
        if on_bad_sample not in BAD_SAMPLE_POLICIES:
            raise ValueError(f"on_bad_sample must be {describe_choices(BAD_SAMPLE_POLICIES)}, got {on_bad_sample!r}")
        self.shards = list(shards)
        self.rank, self.world_size, self.epoch, self.seed = rank, world_size, epoch, seed
        self.image_size, self.max_words, self.max_pixels = image_size, max_words, max_pixels
        self.on_bad_sample = on_bad_sample
        self.batch_size, self.skip_batches, self.buffer = batch_size, skip_batches, shuffle_buffer

    def shard_order(self) -> list[int]:
        """All shard positions in this epoch's order (identical on every rank)."""
        order = list(range(len(self.shards)))
        random.Random(mix_seed(self.seed, self.epoch)).shuffle(order)
        return order

    def worker_shards(self, group: int, num_workers: int) -> list[int]:
        """The shard positions of this rank's shard group ``group`` (one per DataLoader worker)."""
        return self.shard_order()[self.rank::self.world_size][group::num_workers]

    def _handle(self, exc: Exception) -> bool:
        if self.on_bad_sample == "raise":
            raise exc
        log.warning(describe_shard_error(exc))
        return True

    def _raw(self, positions: Sequence[int]) -> Iterator[tuple[int, dict]]:
        for position in positions:
            stream = tarfile_samples([{"url": self.shards[position]}], handler=self._handle)
            for number, sample in enumerate(stream):
                yield position * INDEX_STRIDE + number, sample

    def _item(self, index: int, sample: dict) -> dict:
        name = f"{sample.get('__url__', '?')}#{sample.get('__key__', '?')}"
        try:
            key = next((k for k in IMAGE_KEYS if k in sample), None)
            if key is None:
                raise BadSample(f"{name}: no image member ({'/'.join(IMAGE_KEYS)})")
            captions = _parse_captions(sample, name)
        except BadSample as exc:
            if self.on_bad_sample == "raise":
                raise
            return {"bad": str(exc)}

        def read():
            return decode_image(sample[key], name, self.max_pixels, draft_size=self.image_size)

        return make_item(
            name, read, captions, index, self.epoch, seed=self.seed, image_size=self.image_size,
            max_words=self.max_words, on_bad_sample=self.on_bad_sample,
        )

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # the DataLoader always starts its round-robin at worker 0, but batch skip_batches belongs to
        # the reader of shard group skip_batches % num_workers: rotate the groups so that worker 0 reads it
        group = (worker + self.skip_batches) % num_workers
        rng = random.Random(mix_seed(self.seed, self.epoch, self.rank, group))
        raw = shuffle_buffer(self._raw(self.worker_shards(group, num_workers)), self.buffer, rng)
        to_skip = worker_skip(self.skip_batches, group, num_workers) * self.batch_size
        for number, (index, sample) in enumerate(raw):
            if number >= to_skip:
                yield self._item(index, sample)


def build_shard_loader(cfg: Config, rank: int, world_size: int, epoch: int, skip_batches: int = 0) -> DataLoader:
    """One epoch's DataLoader over the ``.tar`` shards in ``cfg.data.train``.

    Yields the batch dicts of :class:`~softmask.data.dataset.Collator` (``cfg.train.batch_size``
    samples read per batch, bad ones counted in ``skipped``). Build a new loader for each epoch.

    Args:
        cfg: the run config (data.train, data.*, model.vision.image_size, train.batch_size, seed).
        rank, world_size: this process and the number of processes.
        epoch: seeds the shard order, the shuffle buffers and the caption choice.
        skip_batches: batches of this epoch already consumed (resume); they are skipped undecoded.

    Raises:
        ConfigError: no shards, missing shard files, JSON files mixed in, or fewer shards than ranks.
    """
    if any(not is_shard_entry(entry) for entry in cfg.data.train):
        raise ConfigError("data.train mixes .tar shards with JSON files; use one kind per run")
    shards = expand_shards(cfg.data.train)
    if len(shards) < world_size:
        raise ConfigError(f"data.train has {len(shards)} shard(s) for {world_size} processes; need at least one each")
    workers = min(cfg.data.num_workers, len(shards) // world_size)
    if workers < cfg.data.num_workers:
        log.info("using %d data workers instead of %d: %d shards for %d processes", workers,
                 cfg.data.num_workers, len(shards), world_size)
    image_size = cfg.model.vision.image_size
    dataset = ShardStream(
        shards, rank=rank, world_size=world_size, epoch=epoch, seed=cfg.seed, image_size=image_size,
        max_words=cfg.data.max_words, max_pixels=cfg.data.max_image_pixels, on_bad_sample=cfg.data.on_bad_sample,
        batch_size=cfg.train.batch_size, skip_batches=skip_batches,
    )
    return data_loader(cfg, dataset, cfg.train.batch_size, workers=workers)


def write_shards(records: Sequence[Record], out_dir: str, samples_per_shard: int) -> list[str]:
    """Write records as webdataset shards ``out_dir/shard-000000.tar``, ... and return their paths.

    Each image file's bytes are stored unchanged under its extension (jpg, jpeg, png or webp); a
    single caption goes to ``txt``, several to ``json`` as ``{"caption": [...]}``. Keys are the
    records' running numbers (``000000000``, ...). Files are written with a fixed mtime, so the same
    records give byte-identical shards.

    Raises:
        ValueError: an image extension other than jpg/jpeg/png/webp, or samples_per_shard < 1.
        FileNotFoundError: an image file is missing.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for start in range(0, len(records), samples_per_shard):
        path = os.path.join(out_dir, f"shard-{start // samples_per_shard:06d}.tar")
        with TarWriter(path, encoder=False, mtime=0.0) as writer:
            for number, record in enumerate(records[start:start + samples_per_shard], start):
                ext = Path(record.image).suffix.lower().lstrip(".")
                if ext not in IMAGE_KEYS:
                    raise ValueError(f"{record.image}: image extension must be one of {', '.join(IMAGE_KEYS)}")
                sample = {"__key__": f"{number:09d}", ext: Path(record.image).read_bytes()}
                if len(record.captions) == 1:
                    sample["txt"] = record.captions[0].encode("utf-8")
                else:
                    sample["json"] = json.dumps({"caption": list(record.captions)}).encode("utf-8")
                writer.write(sample)
        paths.append(path)
    return paths
