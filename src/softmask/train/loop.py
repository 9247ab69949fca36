"""The one training loop shared by pretraining and every fine-tuning task.

A task is an ``nn.Module`` whose ``forward(batch, step, micro)`` returns a dict with the total
``loss`` (with gradient) and detached scalars to log, and which holds the model to export as
``task.model``. Data comes from a :class:`DataSource`. The loop owns: the optimiser and schedule,
gradient accumulation and clipping, autocast, DDP, non-finite-loss handling, logging, atomic
checkpoints and exact resume (model, momentum model, queues, optimiser, step, RNG states, data
position).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from softmask.config import Config, save_config
from softmask.train import dist
from softmask.train.checkpoint import load_checkpoint, resolve_resume, rng_state, save_checkpoint, set_rng_state
from softmask.train.log import RunLogger
from softmask.train.schedule import lr_at, param_groups

log = logging.getLogger("softmask")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many consecutive non-finite losses); a checkpoint was saved."""


class DataSource(Protocol):
    batches_per_epoch: int | None  # None for streams of unknown length (then train.max_steps is required)

    def batches(self, epoch: int, start_batch: int) -> Iterator[dict]:
        """Batches of ``epoch`` from ``start_batch`` on; each has ``skipped`` (bad samples dropped)."""


@dataclass
class TrainState:
    step: int = 0  # optimiser steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of this epoch consumed
    skipped_samples: int = 0
    nonfinite_steps: int = 0
    nonfinite_in_a_row: int = 0


def total_steps_for(cfg: Config, batches_per_epoch: int | None) -> int:
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    if batches_per_epoch is None:
        raise ValueError("train.max_steps must be set for data of unknown length (webdataset shards)")
    return cfg.train.epochs * max(1, batches_per_epoch // cfg.train.grad_accum)


def _batch_size(batch: dict) -> int:
    return next(v.shape[0] for v in batch.values() if torch.is_tensor(v))


def _synced(batches: Iterator[dict], device: torch.device) -> Iterator[tuple[dict | None, int]]:
    """Yield ``(batch, bad samples skipped on all ranks)`` while every rank has a batch; the epoch ends
    on all ranks together when one runs out (shard streams can differ in length). Every rank must
    run the same collectives, so batches are trimmed to the smallest local batch (after bad samples
    were dropped); ``batch`` is None when some rank has no good sample."""
    it = iter(batches)
    while True:
        batch = next(it, None)
        size = -1 if batch is None else _batch_size(batch)
        common = -dist.all_reduce_max_int(-size, device)
        if common < 0:
            return
        for sample in batch.get("skipped_samples", []):
            log.warning(f"skipped bad sample: {sample}")
        skipped = int(_reduce(float(batch.get("skipped", 0)), device))
        yield (_trim(batch, common) if common > 0 else None), skipped


def _trim(batch: dict, n: int) -> dict:
    size = _batch_size(batch)
    if n == size:
        return batch
    return {k: (v[:n] if torch.is_tensor(v) and v.shape[:1] == (size,) else v) for k, v in batch.items()}


def _reduce(value: float, device: torch.device) -> float:
    """Sum of a float over ranks."""
    return float(dist.all_reduce_sum(torch.tensor(value, dtype=torch.float64, device=device)).item())


def _autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def inference_autocast(precision: str, device: torch.device):
    """Autocast for evaluation: ``train.precision`` on CUDA devices, none elsewhere (bf16 matmuls on a
    CPU are far slower than fp32)."""
    return _autocast(precision, device) if device.type == "cuda" else contextlib.nullcontext()


def _no_buffer_sync() -> dict:
    """DDP keyword for "sync buffers (queues) at construction, not at every forward"; newer PyTorch
    renamed it."""
    import inspect

    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def _unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, DistributedDataParallel) else module


def train(cfg: Config, task: nn.Module, data: DataSource, info: dist.DistInfo) -> TrainState:
    """Run (or resume) training to ``total_steps``; returns the final state."""
    out = Path(cfg.output_dir)
    total_steps = total_steps_for(cfg, data.batches_per_epoch)
    task.to(info.device)
    optimizer = torch.optim.AdamW(param_groups(task, cfg.train.weight_decay, cfg.train.cross_attention_lr_scale),
                                  lr=cfg.train.lr_start)
    scaler = torch.amp.GradScaler(enabled=cfg.train.precision == "fp16")
    state = TrainState()

    resume_path = resolve_resume(cfg.resume, out)
    if resume_path is not None:
        ckpt = load_checkpoint(resume_path)
        task.load_state_dict(ckpt["task"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        state = TrainState(**ckpt["state"])
        set_rng_state(ckpt["rng"][info.rank if info.rank < len(ckpt["rng"]) else 0])
        log.info(f"resumed from {resume_path} at step {state.step} (epoch {state.epoch}, "
                 f"batch {state.batch_in_epoch})")
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")

    module = task
    if info.world_size > 1:
        ids = [info.device.index] if info.device.type == "cuda" else None
        module = DistributedDataParallel(task, device_ids=ids, **_no_buffer_sync())

    logger = RunLogger(out, info.is_main, total_steps, state.step)

    def checkpoint() -> None:
        rngs = [rng_state()]
        if dist.is_distributed():
            rngs = [None] * info.world_size
            torch.distributed.all_gather_object(rngs, rng_state())
        if info.is_main:
            payload = {"task": _unwrap(module).state_dict(), "optimizer": optimizer.state_dict(),
                       "scaler": scaler.state_dict(), "state": asdict(state), "rng": rngs}
            path = save_checkpoint(payload, out, state.step, cfg.train.keep_last)
            log.info(f"saved {path}")
        dist.barrier()

    accum = cfg.train.grad_accum
    sums: dict[str, torch.Tensor] = {}
    micro, pairs, last_log = 0, 0, time.perf_counter()
    module.train()
    try:
        while state.step < total_steps:
            seen = 0
            for batch, skipped in _synced(data.batches(state.epoch, state.batch_in_epoch), info.device):
                seen += 1
                state.batch_in_epoch += 1
                state.skipped_samples += skipped
                if batch is None:  # every sample of some rank's batch was bad
                    continue
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(state.step, cfg.train, total_steps) * group.get("lr_scale", 1.0)
                last_micro = micro == accum - 1
                sync = module.no_sync() if isinstance(module, DistributedDataParallel) and not last_micro \
                    else contextlib.nullcontext()
                with sync, _autocast(cfg.train.precision, info.device):
                    outputs = module(batch, state.step, micro)
                    loss = outputs["loss"] / accum
                with sync:
                    scaler.scale(loss).backward()
                for key, value in outputs.items():  # kept as tensors: no device sync per micro-step
                    part = value.detach().float() / accum
                    sums[key] = sums[key] + part if key in sums else part
                pairs += _batch_size(batch) * info.world_size
                micro += 1
                if micro < accum:
                    continue
                micro = 0
                finite = torch.isfinite(sums["loss"]).to(info.device, torch.float64)
                if dist.all_reduce_sum(finite).item() < info.world_size:  # the step's one sync
                    optimizer.zero_grad(set_to_none=True)
                    state.nonfinite_steps += 1
                    state.nonfinite_in_a_row += 1
                    log.warning(f"step {state.step}: non-finite loss, step skipped "
                                f"({state.nonfinite_in_a_row} in a row)")
                    sums = {}
                    if state.nonfinite_in_a_row >= cfg.train.max_nonfinite:
                        checkpoint()
                        raise TrainingError(
                            f"{state.nonfinite_in_a_row} consecutive non-finite losses (train.max_nonfinite); "
                            f"the last good state is saved in {out / 'checkpoints'}")
                    continue
                state.nonfinite_in_a_row = 0
                if cfg.train.clip_grad > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(task.parameters(), cfg.train.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                logger.step()
                if state.step % cfg.train.log_every == 0 or state.step == total_steps:
                    elapsed = time.perf_counter() - last_log
                    metrics = {k: _reduce(float(v), info.device) / info.world_size for k, v in sums.items()}
                    logger.record({"step": state.step, **metrics, "epoch": state.epoch,
                                   "lr": optimizer.param_groups[0]["lr"], "pairs_per_s": pairs / elapsed,
                                   "skipped_samples": state.skipped_samples,
                                   "nonfinite_steps": state.nonfinite_steps})
                    pairs, last_log = 0, time.perf_counter()
                sums = {}
                if state.step % cfg.train.save_every == 0 or state.step == total_steps:
                    checkpoint()
                if state.step >= total_steps:
                    break
            if state.step >= total_steps:
                break
            if seen == 0:
                raise TrainingError(f"epoch {state.epoch} produced no batches: is the training data empty?")
            state.epoch += 1
            state.batch_in_epoch = 0
            micro, sums = 0, {}
            optimizer.zero_grad(set_to_none=True)  # an incomplete accumulation does not carry over
    except KeyboardInterrupt:
        log.warning("interrupted: saving a checkpoint of the last completed step")
        state.batch_in_epoch -= micro  # batches of an unfinished accumulation are seen again on resume
        checkpoint()
        raise
    finally:
        logger.close()
    if info.is_main:
        _unwrap(module).model.save_pretrained(out / "model")
    dist.barrier()
    return state
