"""The training loop's data sources (:class:`softmask.train.loop.DataSource`): an annotation-file
DataLoader with a resumable distributed sampler, or a webdataset shard stream."""

from __future__ import annotations

from softmask.config import Config, ConfigError
from softmask.data.dataset import build_pretrain_loader, is_shard_entry
from softmask.data.shards import build_shard_loader


class LoaderSource:
    """ALBEF JSON annotations through a DataLoader with a resumable distributed sampler."""

    def __init__(self, loader, sampler):
        self.loader, self.sampler = loader, sampler
        self.batches_per_epoch = sampler.batches_per_epoch

    def batches(self, epoch: int, start_batch: int):
        self.sampler.set_epoch(epoch)
        self.sampler.set_start_batch(start_batch)
        return iter(self.loader)


class ShardSource:
    """webdataset shards: a stream of unknown length (``train.max_steps`` is required)."""

    batches_per_epoch = None

    def __init__(self, cfg: Config, rank: int, world_size: int):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size

    def batches(self, epoch: int, start_batch: int):
        return iter(build_shard_loader(self.cfg, self.rank, self.world_size, epoch, skip_batches=start_batch))


def build_pretrain_data(cfg: Config, rank: int, world_size: int):
    """Validate ``data.train`` (every annotation file, before any model is built) and return a DataSource."""
    if cfg.data.train and all(is_shard_entry(entry) for entry in cfg.data.train):
        if cfg.train.max_steps <= 0:
            raise ConfigError("train.max_steps must be set when training on webdataset shards")
        return ShardSource(cfg, rank, world_size)
    return LoaderSource(*build_pretrain_loader(cfg, rank, world_size))  # raises on empty or mixed data.train
