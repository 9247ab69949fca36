"""Fine-tuning and evaluation on the downstream tasks, on the shared training loop.

Each task is a module of :mod:`softmask.tasks` with four functions (see :class:`TaskDefinition`):
its model (a pretrained backbone plus heads, loaded from ``model.init``), its training objective
(an ``nn.Module`` for :func:`softmask.train.loop.train`), its training data, and its evaluation.
This module picks the task, runs training then evaluation (``softmask finetune TASK``), and loads a
fine-tuned checkpoint for evaluation alone (``softmask evaluate TASK``).
"""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from softmask.config import FINETUNE_TASKS, Config, ConfigError, model_config_from_dict
from softmask.models.loading import CheckpointError
from softmask.models.vlp import freeze_modules, save_model_folder
from softmask.runs import load_strict, model_files
from softmask.train import dist

log = logging.getLogger("softmask")

TASK_MODULES = {task: f"softmask.tasks.{task}" for task in FINETUNE_TASKS}  # each downstream task's module


class TaskDefinition(Protocol):
    """What a task module provides."""

    def build_model(self, cfg: Config) -> nn.Module:
        """The task's model with ``cfg.model.init`` (and the vision/text inits) loaded; it has
        ``save_pretrained(directory)``."""

    def build_objective(self, cfg: Config, model: nn.Module, batches_per_epoch: int | None) -> nn.Module:
        """The training objective: ``forward(batch, step, micro)`` -> dict with ``loss``; ``.model`` is ``model``."""

    def build_train_data(self, cfg: Config, rank: int, world_size: int):
        """A :class:`softmask.train.loop.DataSource` over ``finetune.train`` (files checked first)."""

    def evaluate(self, cfg: Config, model: nn.Module, split: str, out_dir: Path | None) -> dict[str, float]:
        """Metrics on ``finetune.<split>`` (every rank calls it; all return the same metrics). Extra files
        (e.g. VQA's results JSON) go to ``out_dir`` on the main process."""


def get_task(name: str) -> TaskDefinition:
    if name not in TASK_MODULES:
        raise ConfigError(f"unknown task '{name}': choose one of {', '.join(FINETUNE_TASKS)}")
    return importlib.import_module(TASK_MODULES[name])


class TaskModel(nn.Module):
    """Base of the downstream models: a backbone plus heads, saved with the task's name so that
    evaluation rebuilds the same architecture. ``config`` is the model section."""

    task_name = ""
    # ALBEF's fine-tuned checkpoints of this task: the prefixes of its head tensors (the same names
    # here), and the backbone modules the task does not use (absent from such a checkpoint). Empty
    # ``albef_heads``: loading them is not supported.
    albef_heads: tuple[str, ...] = ()
    unused_modules: tuple[str, ...] = ()
    albef_paired_fusion = False  # NLVR2: the file's fusion layers come in pairs, one per image

    def albef_head_rule(self, key: str):
        """Where an ALBEF task checkpoint's head tensor ``key`` goes in this model (a ``(target, part)``
        pair, an ``Ignore`` or None); by default the ``albef_heads`` prefixes keep their names."""
        return (key, None) if self.albef_heads and key.startswith(self.albef_heads) else None

    def fit_albef_checkpoint(self, state: dict[str, torch.Tensor]) -> None:
        """Reshape what the file decides before its tensors are loaded (e.g. VQA: the decoder's depth)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config

    def freeze_unused(self) -> None:
        """Freeze the backbone's ``unused_modules`` and its ITC temperature, which the task's objective
        never uses (DDP rejects trainable parameters without gradient)."""
        freeze_modules(self.backbone, (*self.unused_modules, "temp"))

    def save_pretrained(self, directory: str | Path) -> Path:
        """``config.yaml`` (task name and model section, init fields cleared) and ``model.safetensors``."""
        return save_model_folder(self, self.config, directory, self.task_name)


# --------------------------------------------------------------------------------------------------
# Loading a fine-tuned model for evaluation
# --------------------------------------------------------------------------------------------------


def saved_state(path: Path) -> tuple[dict[str, torch.Tensor], dict, Path]:
    """(model state, the saved config mapping, the file or folder read) from a fine-tuning run folder
    (newest checkpoint, else ``model/``), a checkpoint file in a run's ``checkpoints/``, or a saved model
    folder (:func:`softmask.runs.model_files`)."""
    files = model_files(path)
    return files.state(), files.saved_config(), files.source


def load_albef_task_model(cfg: Config, path: Path) -> nn.Module:
    """The model of ``cfg.finetune.task`` (architecture from ``cfg.model``) with an ALBEF fine-tuned task
    checkpoint's weights. Every tensor the task uses must come from the file.

    Raises:
        CheckpointError: the file is not one (not a checkpoint, not ALBEF's layout, another architecture),
            or the task does not support ALBEF's checkpoints yet.
    """
    from softmask.models.loading import compact_keys, load_albef_task_checkpoint

    task_name = cfg.finetune.task
    cfg.model.init = cfg.model.vision.init = cfg.model.text.init = ""
    model = get_task(task_name).build_model(cfg)
    report = load_albef_task_checkpoint(model, path, model.albef_head_rule, model.albef_paired_fusion,
                                        prepare=model.fit_albef_checkpoint)
    unused = tuple(f"backbone.{name}" for name in (*model.unused_modules, "temp"))
    needed = [k for k in report.missing if not k.startswith(unused)]
    if needed or report.unexpected:
        problems = [f"{label} ({len(keys)}): {compact_keys(keys)}"
                    for label, keys in (("not in the file", needed), ("not understood", report.unexpected)) if keys]
        raise CheckpointError(f"{path}: does not fit the {task_name} model of the config; " + "; ".join(problems))
    log.info(report.summary())
    return model


def saved_task_name(saved: dict) -> str:
    """The task a saved config belongs to: a model folder's ``task``, a run config's ``finetune.task``."""
    return saved.get("task") or (saved.get("finetune") or {}).get("task") or ""


def load_task_model(cfg: Config, path: str | Path) -> nn.Module:
    """The model of ``cfg.finetune.task`` with the weights at ``path``.

    Retrieval also takes any pretrained model (zero-shot): a pretraining run folder, checkpoint or
    ``save_pretrained`` folder, or a checkpoint file for ``model.init`` (e.g. ALBEF's ``.pth``).
    Other tasks need a checkpoint fine-tuned on that task (their heads are not pretrained).
    """
    task_name = cfg.finetune.task
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state, saved, source = saved_state(path)
    except CheckpointError:
        if not path.is_file():
            raise
        if task_name != "retrieval":
            return load_albef_task_model(cfg, path)
        state, saved, source = None, {}, path  # a foreign checkpoint: loaded through model.init
    found = saved_task_name(saved)
    if task_name == "retrieval" and found in ("", "retrieval"):
        if state is None:
            cfg.model.init = str(path)
            return get_task("retrieval").build_model(cfg)
    elif found != task_name:
        what = f"a checkpoint of task '{found}'" if found else "a pretrained model, not fine-tuned"
        raise CheckpointError(f"{source}: {what}; evaluating {task_name} needs a model fine-tuned on it "
                              f"(softmask finetune {task_name} ...)")
    cfg.model = model_config_from_dict(saved.get("model", {}), where=f"{source}: model")
    cfg.model.init = cfg.model.vision.init = cfg.model.text.init = ""
    model = get_task(task_name).build_model(cfg)
    load_strict(model, state, source, f"the {task_name} model")
    return model


# --------------------------------------------------------------------------------------------------
# The commands
# --------------------------------------------------------------------------------------------------


def _splits_with_data(cfg: Config, splits: list[str]) -> list[str]:
    return [split for split in splits if getattr(cfg.finetune, split)]


def _report(cfg: Config, task: TaskDefinition, model: nn.Module, splits: list[str], out: Path | None,
            info: dist.DistInfo) -> dict[str, dict[str, float]]:
    results = {}
    model.to(info.device).eval()
    for split in _splits_with_data(cfg, splits):
        metrics = task.evaluate(cfg, model, split, out)
        results[split] = metrics
        text = ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        log.info(f"{cfg.finetune.task} {split}: {text}")
        if out is not None and info.is_main:
            out.mkdir(parents=True, exist_ok=True)
            (out / f"metrics_{split}.json").write_text(json.dumps(metrics, indent=2))
    return results


def finetune(cfg: Config) -> dict[str, dict[str, float]]:
    """Fine-tune ``cfg.finetune.task`` from ``model.init`` into ``output_dir``, then evaluate the
    splits of ``finetune.eval_splits`` that have files; returns {split: metrics}."""
    from softmask.train.loop import train

    if not cfg.finetune.task:
        raise ConfigError("finetune.task is not set (softmask finetune TASK sets it)")
    task_def = get_task(cfg.finetune.task)
    info = dist.init_distributed()
    try:
        torch.manual_seed(cfg.seed)
        data = task_def.build_train_data(cfg, info.rank, info.world_size)  # checks the files first
        model = task_def.build_model(cfg)
        objective = task_def.build_objective(cfg, model, data.batches_per_epoch)
        torch.manual_seed(cfg.seed + 1 + info.rank)
        train(cfg, objective, data, info)
        return _report(cfg, task_def, objective.model, cfg.finetune.eval_splits, Path(cfg.output_dir), info)
    finally:
        dist.cleanup()


def evaluate_task(cfg: Config, checkpoint: str | Path, splits: list[str] | None = None,
                  out_dir: str | Path | None = None) -> dict[str, dict[str, float]]:
    """Evaluate the model at ``checkpoint`` on ``splits`` (default ``finetune.eval_splits``)."""
    if not cfg.finetune.task:
        raise ConfigError("finetune.task is not set (softmask evaluate TASK sets it)")
    task_def = get_task(cfg.finetune.task)
    info = dist.init_distributed()
    try:
        model = load_task_model(cfg, checkpoint)
        out = Path(out_dir) if out_dir else None
        return _report(cfg, task_def, model, splits or cfg.finetune.eval_splits, out, info)
    finally:
        dist.cleanup()

