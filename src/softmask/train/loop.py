"""The one training loop shared by pretraining and every fine-tuning task.

A task is an ``nn.Module`` whose ``forward(batch, step, micro)`` returns a dict with the total
``loss`` (with gradient) and detached scalars to log, and which holds the model to export as
``task.model``; a task with a momentum model defines ``momentum_update()``, which the loop calls once
after every optimiser step. Data comes from a :class:`DataSource`. The loop owns: the optimiser and schedule,
gradient accumulation and clipping, autocast, DDP, non-finite-loss handling, logging, atomic
checkpoints and exact resume (model, momentum model, queues, optimiser, step, RNG states, data
position).
"""

from __future__ import annotations

import contextlib
import logging
import signal
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
from softmask.train.bad_samples import BadDataError, BadSampleMonitor
from softmask.train.checkpoint import (
    checkpoint_path,
    list_checkpoints,
    load_resume_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from softmask.train.log import RunLogger
from softmask.train.schedule import lr_at, make_optimizer, total_steps_for
from softmask.train.stop import Interrupted, StopRequest, signal_name

log = logging.getLogger("softmask")


class TrainingError(RuntimeError):
    """Training cannot go on: too many consecutive non-finite losses (a checkpoint was saved), or
    training data that cannot be read."""


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


def _batch_size(batch: dict) -> int:
    """Samples in a batch (0 for a task batch whose every sample was bad: it holds no tensor)."""
    return next((v.shape[0] for v in batch.values() if torch.is_tensor(v)), 0)


def _synced(batches: Iterator[dict], device: torch.device, monitor: BadSampleMonitor
            ) -> Iterator[tuple[dict | None, int]]:
    """Yield ``(batch, bad samples skipped on all ranks)`` while every rank has a batch; the epoch ends
    on all ranks together when one runs out (shard streams can differ in length). Every rank must
    run the same collectives, so batches are trimmed to the smallest local batch (after bad samples
    were dropped); ``batch`` is None when some rank has no good sample. Every batch's good and bad
    samples (summed over ranks, so that all ranks decide alike) go to ``monitor``."""
    it = iter(batches)
    while True:
        batch = next(it, None)
        size = -1 if batch is None else _batch_size(batch)
        common = -dist.all_reduce_max_int(-size, device)
        if common < 0:
            return
        local_bad = list(batch.get("skipped_samples", []))
        counts = dist.all_reduce_sum(torch.tensor([float(batch.get("skipped", 0)), float(size)],
                                                  dtype=torch.float64, device=device)).tolist()
        skipped, good = int(counts[0]), int(counts[1])
        monitor.record(good, local_bad, bad_elsewhere=skipped - len(local_bad))
        yield (_trim(batch, common) if common > 0 else None), skipped


def _trim(batch: dict, n: int) -> dict:
    size = _batch_size(batch)
    if n == size:
        return batch
    return {k: (v[:n] if torch.is_tensor(v) and v.shape[:1] == (size,) else v) for k, v in batch.items()}


def _bad_data_hint(cfg: Config) -> str:
    """What to check when most samples cannot be read, for the stop message."""
    from softmask.data.dataset import is_shard_entry

    if cfg.data.train and all(is_shard_entry(entry) for entry in cfg.data.train):
        return "the shards of data.train"
    root = cfg.data.image_root
    return (f"data.image_root (now '{root}'), the folder the annotation files' image paths start from" if root
            else "data.image_root (not set: the annotation files' image paths are used as they are)")


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


def _momentum_update(module: nn.Module) -> None:
    """The task's momentum (EMA) step, if it has one: once per optimiser step, right after it, never for
    a dropped step (so with ``train.grad_accum=k`` the momentum model still moves once per step)."""
    update = getattr(_unwrap(module), "momentum_update", None)
    if callable(update):
        update()


def _unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, DistributedDataParallel) else module


def train(cfg: Config, task: nn.Module, data: DataSource, info: dist.DistInfo) -> TrainState:
    """Run (or resume) training to ``total_steps``; returns the final state."""
    out = Path(cfg.output_dir)
    total_steps = total_steps_for(cfg, data.batches_per_epoch)
    task.to(info.device)
    optimizer = make_optimizer(task, cfg.train)
    scaler = torch.amp.GradScaler(enabled=cfg.train.precision == "fp16")
    state = TrainState()

    resumed = load_resume_checkpoint(cfg.resume, out)
    if resumed is not None:
        resume_path, ckpt = resumed
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
    monitor = BadSampleMonitor(cfg.data.max_bad_share, cfg.data.bad_sample_window, _bad_data_hint(cfg))
    stop = StopRequest()
    saved_at = -1
    in_step = False

    def checkpoint() -> Path:
        nonlocal saved_at
        rngs = [rng_state()]
        if dist.is_distributed():
            rngs = [None] * info.world_size
            torch.distributed.all_gather_object(rngs, rng_state())
        if info.is_main:
            payload = {"task": _unwrap(module).state_dict(), "optimizer": optimizer.state_dict(),
                       "scaler": scaler.state_dict(), "state": asdict(state), "rng": rngs}
            path = save_checkpoint(payload, out, state.step, cfg.train.keep_last)
            log.info(f"saved {path}")
        saved_at = state.step
        dist.barrier()
        return checkpoint_path(out, state.step)

    def stop_here(signum: int) -> None:
        """Save the state at this step boundary (unless just saved) and raise Interrupted."""
        path = checkpoint() if saved_at != state.step else checkpoint_path(out, state.step)
        raise Interrupted(f"stopped by {signal_name(signum)} at step {state.step} of {total_steps}; saved {path}",
                          signum)

    accum = cfg.train.grad_accum
    sums: dict[str, torch.Tensor] = {}
    micro, pairs, last_log = 0, 0, time.perf_counter()
    module.train()
    if state.step == 0:
        # ALBEF updates the momentum model at the start of every forward, so its first step starts with an
        # EMA of two identical models (a no-op up to rounding); doing it here keeps every step's momentum
        # weights bit for bit ALBEF's, while the loop's update after each step moves them once per step.
        _momentum_update(module)
    stop.install()
    try:
        while state.step < total_steps:
            seen, resumed_at = 0, state.batch_in_epoch  # > 0 when resuming mid-epoch (or at its very end)
            for batch, skipped in _synced(data.batches(state.epoch, state.batch_in_epoch), info.device, monitor):
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
                in_step = True  # from here until the optimiser step (or its skip), not a step boundary
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
                # The step's one sync: is the loss finite on every rank, and has any rank been told to stop?
                flags = torch.stack([torch.isfinite(sums["loss"]).to(info.device, torch.float64),
                                     torch.tensor(float(stop.requested), dtype=torch.float64, device=info.device)])
                finite_ranks, stopping_ranks = dist.all_reduce_sum(flags).tolist()
                if finite_ranks < info.world_size:
                    optimizer.zero_grad(set_to_none=True)
                    state.nonfinite_steps += 1
                    state.nonfinite_in_a_row += 1
                    log.warning(f"step {state.step}: non-finite loss, step skipped "
                                f"({state.nonfinite_in_a_row} in a row)")
                    sums, in_step = {}, False
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
                scale = scaler.get_scale()
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                if scaler.get_scale() >= scale:  # fp16: a lowered scale means the step was skipped (inf grads)
                    _momentum_update(module)
                state.step += 1
                in_step = False
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
                if stopping_ranks > 0:  # a step boundary: the state a regular checkpoint holds
                    stop_here(stop.signum or signal.SIGTERM)  # (no signum: another rank was told)
            if state.step >= total_steps:
                break
            if seen == 0 and resumed_at == 0:
                raise TrainingError(f"epoch {state.epoch} produced no batches: is the training data empty?")
            monitor.end_epoch()
            state.epoch += 1
            state.batch_in_epoch = 0
            micro, sums = 0, {}
            optimizer.zero_grad(set_to_none=True)  # an incomplete accumulation does not carry over
    except BadDataError as exc:
        raise TrainingError(str(exc)) from None
    except Exception as exc:
        # A SIGTERM to every process of the job (as some clusters send) also ends the DataLoader workers,
        # and PyTorch then raises in this process: between steps the state is still exact, so save it;
        # inside a step it is not, so say where the run can continue from.
        if not stop.requested or isinstance(exc, (Interrupted, TrainingError)):
            raise
        log.info(f"the data stopped with the signal ({type(exc).__name__}: {str(exc).strip()[:200]})")
        if micro == 0 and not in_step:
            stop_here(stop.signum)
        found = list_checkpoints(out)
        last = found[-1] if found else "the start"
        raise Interrupted(f"stopped by {signal_name(stop.signum)} inside step {state.step + 1} of {total_steps}, "
                          f"which the data workers did not live to finish: nothing was saved; resume=auto "
                          f"continues from {last}", stop.signum) from None
    finally:
        stop.restore()
        monitor.summary()
        logger.close()
    if info.is_main:
        model = _unwrap(module).model
        model.save_pretrained(out / "model")
        if hasattr(model.config, "text"):  # a model that reads text: its folder records the tokenizer
            from softmask.data.text import save_vocab

            save_vocab(cfg.data.tokenizer, out / "model")
    dist.barrier()
    return state
