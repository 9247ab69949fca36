"""The one training loop shared by pretraining, pretrain-vision and every fine-tuning task.

It trains an *objective*: an ``nn.Module`` whose ``forward(batch, step, micro)`` returns a dict with the
total ``loss`` (with gradient) and detached scalars to log, and which holds the model to export as
``objective.model``; an objective with a momentum model defines ``momentum_update()``, which the loop
calls once after every optimiser step. Data comes from a :class:`DataSource`. The loop owns: the
optimiser and schedule, gradient accumulation and clipping, autocast, DDP, non-finite-loss handling,
logging, atomic checkpoints and exact resume (model, momentum model, queues, optimiser, step, RNG
states, data position).

Read :func:`train`, then :class:`_Loop` top to bottom: :meth:`~_Loop.run` goes through the epochs,
:meth:`~_Loop.epoch` through the batches, each a :meth:`~_Loop.micro_step`; every ``train.grad_accum``
of them end in an :meth:`~_Loop.optimiser_step`, after which the loop may :meth:`~_Loop.log`,
:meth:`~_Loop.save` and stop at the step boundary (:meth:`~_Loop.stop_here`).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from softmask.config import Config, read_yaml, save_config, to_dict
from softmask.runs import OBJECTIVE_KEY, RUN_CONFIG, RUN_MODEL_DIR, checkpoint_path, list_checkpoints
from softmask.train import dist
from softmask.train.bad_samples import BadDataError, BadSampleMonitor
from softmask.train.checkpoint import config_changes, load_resume_checkpoint, rng_state, save_checkpoint, set_rng_state
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
    """Samples in a batch (0 for a task's batch whose every sample was bad: it holds no tensor)."""
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
    """The objective's momentum (EMA) step, if it has one: once per optimiser step, right after it, never for
    a dropped step (so with ``train.grad_accum=k`` the momentum model still moves once per step)."""
    update = getattr(_unwrap(module), "momentum_update", None)
    if callable(update):
        update()


def _unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, DistributedDataParallel) else module


def _wrap(objective: nn.Module, info: dist.DistInfo) -> nn.Module:
    """The objective as the loop calls it: DDP-wrapped with several processes, itself with one."""
    if info.world_size == 1:
        return objective
    ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(objective, device_ids=ids, **_no_buffer_sync())


@dataclass
class _Accumulation:
    """What the micro-batches of the current optimiser step have gathered: how many ran (``micro``), the
    sums of their outputs divided by ``train.grad_accum`` (tensors: no device sync per micro-batch), and
    whether a step is under way (from a micro-batch's forward until the optimiser step or its skip: not a
    step boundary). ``pairs`` counts the pairs of every rank since the last log line."""

    micro: int = 0
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    in_step: bool = False
    pairs: int = 0
    since: float = field(default_factory=time.perf_counter)


def train(cfg: Config, objective: nn.Module, data: DataSource, info: dist.DistInfo) -> TrainState:
    """Run (or resume) training to ``total_steps``; returns the final state. The main process then saves
    the model (``output_dir/model``, with the tokenizer's vocabulary when the model reads text)."""
    loop = _Loop(cfg, objective, data, info)
    loop.run()
    if info.is_main:
        model = objective.model
        model.save_pretrained(loop.out / RUN_MODEL_DIR)
        if hasattr(model.config, "text"):  # a model that reads text: its folder records the tokenizer
            from softmask.data.text import save_vocab

            save_vocab(cfg.data.tokenizer, loop.out / RUN_MODEL_DIR)
    dist.barrier()
    return loop.state


class _Loop:
    """One call of :func:`train`: the objective (``module``: DDP-wrapped with several processes), its
    optimiser and gradient scaler, the :class:`TrainState`, the accumulation of the current step, the
    run's logger, bad-sample monitor and stop request. Built, it has resumed (when ``resume`` says so)
    and written the run's ``config.yaml``."""

    def __init__(self, cfg: Config, objective: nn.Module, data: DataSource, info: dist.DistInfo):
        self.cfg, self.data, self.info = cfg, data, info
        self.out = Path(cfg.output_dir)
        self.total_steps = total_steps_for(cfg, data.batches_per_epoch)
        objective.to(info.device)
        self.objective = objective
        self.optimizer = make_optimizer(objective, cfg.train)
        self.scaler = torch.amp.GradScaler(enabled=cfg.train.precision == "fp16")
        self.state = self._resume()
        if info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / RUN_CONFIG)
        self.module = _wrap(objective, info)
        self.logger = RunLogger(self.out, info.is_main, self.total_steps, self.state.step)
        self.monitor = BadSampleMonitor(cfg.data.max_bad_share, cfg.data.bad_sample_window, _bad_data_hint(cfg))
        self.stop = StopRequest()
        self.saved_at = -1  # the step of the last checkpoint this call wrote
        self.acc = _Accumulation()

    def _resume(self) -> TrainState:
        """The state to start from: a fresh one, or the checkpoint ``resume`` names, loaded into the
        objective, optimiser, scaler and this rank's random number generators."""
        resumed = load_resume_checkpoint(self.cfg.resume, self.out)
        if resumed is None:
            return TrainState()
        path, ckpt = resumed
        self._report_config_changes(path.parent.parent / RUN_CONFIG)
        self.objective.load_state_dict(ckpt[OBJECTIVE_KEY])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        state = TrainState(**ckpt["state"])
        rank = self.info.rank
        set_rng_state(ckpt["rng"][rank if rank < len(ckpt["rng"]) else 0])
        log.info(f"resumed from {path} at step {state.step} (epoch {state.epoch}, batch {state.batch_in_epoch})")
        return state

    def _report_config_changes(self, saved_path: Path) -> None:
        """Warn when the resumed run now trains differently from the config it was saved with (its
        ``config.yaml``, about to be overwritten); say what changed in its length or logging."""
        if not saved_path.is_file():
            return
        saved = read_yaml(saved_path)
        training, length = config_changes(saved, to_dict(self.cfg))
        if training:
            log.warning(f"resuming {saved_path.parent}, which was saved with another config; it continues with "
                        f"the new values: {'; '.join(training)}. To continue as it started, set the old values "
                        "as overrides.")
        if length:
            log.info(f"resuming with {'; '.join(length)}")

    @property
    def done(self) -> bool:
        return self.state.step >= self.total_steps

    # ---- the loop, top down ------------------------------------------------------------------------

    def run(self) -> None:
        """Epochs until ``total_steps``; Ctrl-C/SIGTERM stop at a step boundary with a checkpoint."""
        self.module.train()
        if self.state.step == 0:
            # ALBEF updates the momentum model at the start of every forward, so its first step starts with an
            # EMA of two identical models (a no-op up to rounding); doing it here keeps every step's momentum
            # weights bit for bit ALBEF's, while the loop's update after each step moves them once per step.
            _momentum_update(self.module)
        self.stop.install()
        try:
            while not self.done:
                self.epoch()
        except BadDataError as exc:
            raise TrainingError(str(exc)) from None
        except Exception as exc:
            self._stopped_by_the_data(exc)
        finally:
            self.stop.restore()
            self.monitor.summary()
            self.logger.close()

    def epoch(self) -> None:
        """The batches of epoch ``state.epoch`` from ``state.batch_in_epoch`` on (synced across ranks), until
        the epoch or the run ends; then the next epoch starts at its first batch."""
        state = self.state
        seen, resumed_at = 0, state.batch_in_epoch  # > 0 when resuming mid-epoch (or at its very end)
        batches = self.data.batches(state.epoch, state.batch_in_epoch)
        for batch, skipped in _synced(batches, self.info.device, self.monitor):
            seen += 1
            state.batch_in_epoch += 1
            state.skipped_samples += skipped
            if batch is None:  # every sample of some rank's batch was bad
                continue
            self.micro_step(batch)
            if self.acc.micro < self.cfg.train.grad_accum:
                continue
            stepped, stopping = self.optimiser_step()
            if not stepped:  # a non-finite loss: the step was skipped
                continue
            self.log()
            self.save()
            if self.done:
                return
            if stopping:  # a step boundary: the state a regular checkpoint holds
                self.stop_here(self.stop.signum or signal.SIGTERM)  # (no signum: another rank was told)
        if seen == 0 and resumed_at == 0:
            raise TrainingError(f"epoch {state.epoch} produced no batches: is the training data empty?")
        self.monitor.end_epoch()
        state.epoch += 1
        state.batch_in_epoch = 0
        self.acc.micro, self.acc.sums = 0, {}
        self.optimizer.zero_grad(set_to_none=True)  # an incomplete accumulation does not carry over

    def micro_step(self, batch: dict) -> None:
        """Forward and backward of one micro-batch (autocast, loss scaled by 1 / ``grad_accum``, gradients
        synced across ranks only on the last micro-batch of a step), at the learning rate of the step."""
        cfg, acc, state = self.cfg, self.acc, self.state
        accum = cfg.train.grad_accum
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(state.step, cfg.train, self.total_steps) * group.get("lr_scale", 1.0)
        last_micro = acc.micro == accum - 1
        sync = self.module.no_sync() if isinstance(self.module, DistributedDataParallel) and not last_micro \
            else contextlib.nullcontext()
        acc.in_step = True
        with sync, _autocast(cfg.train.precision, self.info.device):
            outputs = self.module(batch, state.step, acc.micro)
            loss = outputs["loss"] / accum
        with sync:
            self.scaler.scale(loss).backward()
        for key, value in outputs.items():
            part = value.detach().float() / accum
            acc.sums[key] = acc.sums[key] + part if key in acc.sums else part
        acc.pairs += _batch_size(batch) * self.info.world_size
        acc.micro += 1

    def optimiser_step(self) -> tuple[bool, bool]:
        """After the step's last micro-batch: the step's one sync (is the loss finite on every rank, has any
        rank been told to stop?), then clipping, the optimiser and momentum steps. Returns (whether the
        step was taken, whether a rank was told to stop); a step with a non-finite loss is skipped, and
        ``train.max_nonfinite`` of them in a row raise :class:`TrainingError` after a checkpoint."""
        cfg, state, info, acc = self.cfg, self.state, self.info, self.acc
        acc.micro = 0
        flags = torch.stack([torch.isfinite(acc.sums["loss"]).to(info.device, torch.float64),
                             torch.tensor(float(self.stop.requested), dtype=torch.float64, device=info.device)])
        finite_ranks, stopping_ranks = dist.all_reduce_sum(flags).tolist()
        if finite_ranks < info.world_size:
            self.optimizer.zero_grad(set_to_none=True)
            state.nonfinite_steps += 1
            state.nonfinite_in_a_row += 1
            log.warning(f"step {state.step}: non-finite loss, step skipped ({state.nonfinite_in_a_row} in a row)")
            acc.sums, acc.in_step = {}, False
            if state.nonfinite_in_a_row >= cfg.train.max_nonfinite:
                self.checkpoint()
                raise TrainingError(
                    f"{state.nonfinite_in_a_row} consecutive non-finite losses (train.max_nonfinite); "
                    f"the last good state is saved in {self.out / 'checkpoints'}")
            return False, stopping_ranks > 0
        state.nonfinite_in_a_row = 0
        scaler, optimizer = self.scaler, self.optimizer
        if cfg.train.clip_grad > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(self.objective.parameters(), cfg.train.clip_grad)
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if scaler.get_scale() >= scale:  # fp16: a lowered scale means the step was skipped (inf grads)
            _momentum_update(self.module)
        state.step += 1
        acc.in_step = False
        self.logger.step()
        return True, stopping_ranks > 0

    def log(self) -> None:
        """Every ``train.log_every`` steps and at the last: the step's outputs averaged over ranks, the
        learning rate, pairs per second since the last log line and the data counters."""
        cfg, state, acc, info = self.cfg, self.state, self.acc, self.info
        if state.step % cfg.train.log_every == 0 or state.step == self.total_steps:
            elapsed = time.perf_counter() - acc.since
            metrics = {k: _reduce(float(v), info.device) / info.world_size for k, v in acc.sums.items()}
            self.logger.record({"step": state.step, **metrics, "epoch": state.epoch,
                                "lr": self.optimizer.param_groups[0]["lr"], "pairs_per_s": acc.pairs / elapsed,
                                "skipped_samples": state.skipped_samples, "nonfinite_steps": state.nonfinite_steps})
            acc.pairs, acc.since = 0, time.perf_counter()
        acc.sums = {}

    def save(self) -> None:
        """A checkpoint every ``train.save_every`` steps and at the last."""
        step = self.state.step
        if step % self.cfg.train.save_every == 0 or step == self.total_steps:
            self.checkpoint()

    def checkpoint(self) -> Path:
        """Save the whole training state of this step (every rank's RNG states gathered; the main process
        writes) and return its path."""
        info = self.info
        rngs = [rng_state()]
        if dist.is_distributed():
            rngs = [None] * info.world_size
            torch.distributed.all_gather_object(rngs, rng_state())
        if info.is_main:
            payload = {OBJECTIVE_KEY: self.objective.state_dict(), "optimizer": self.optimizer.state_dict(),
                       "scaler": self.scaler.state_dict(), "state": asdict(self.state), "rng": rngs}
            path = save_checkpoint(payload, self.out, self.state.step, self.cfg.train.keep_last)
            log.info(f"saved {path}")
        self.saved_at = self.state.step
        dist.barrier()
        return checkpoint_path(self.out, self.state.step)

    # ---- stopping on a signal ------------------------------------------------------------------------

    def stop_here(self, signum: int) -> None:
        """Save the state at this step boundary (unless just saved) and raise Interrupted."""
        step = self.state.step
        path = self.checkpoint() if self.saved_at != step else checkpoint_path(self.out, step)
        raise Interrupted(f"stopped by {signal_name(signum)} at step {step} of {self.total_steps}; saved {path}",
                          signum)

    def _stopped_by_the_data(self, exc: Exception) -> None:
        """Re-raise ``exc``, unless a signal stopped the data: a SIGTERM to every process of the job (as
        some clusters send) also ends the DataLoader workers, and PyTorch then raises in this process.
        Between steps the state is still exact, so it is saved; inside a step it is not, so the message
        says where the run can continue from."""
        stop = self.stop
        if not stop.requested or isinstance(exc, (Interrupted, TrainingError)):
            raise exc
        log.info(f"the data stopped with the signal ({type(exc).__name__}: {str(exc).strip()[:200]})")
        if self.acc.micro == 0 and not self.acc.in_step:
            self.stop_here(stop.signum)
        found = list_checkpoints(self.out)
        last = found[-1] if found else "the start"
        raise Interrupted(f"stopped by {signal_name(stop.signum)} inside step {self.state.step + 1} of "
                          f"{self.total_steps}, which the data workers did not live to finish: nothing was saved; "
                          f"resume=auto continues from {last}", stop.signum) from None
