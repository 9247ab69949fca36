"""What a training run folder is, and the one rule that turns "a run folder, a checkpoint file or a saved
model folder" into the files to read.

A run folder (``output_dir``) holds ``config.yaml`` (the resolved config), ``checkpoints/step_*.pt``
(the training state; the online model's tensors under ``"task"`` with the ``model.`` prefix) and, at
the end of the run, ``model/`` (a saved model folder: ``config.yaml`` with a ``model`` section, and
``task`` for a fine-tuned one; ``model.safetensors``; ``vocab.txt``, the tokenizer it was trained with).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from softmask.checkpoint_files import CheckpointError, check_torch_file, read_safetensors
from softmask.models.vlp import CONFIG_FILE, WEIGHTS_FILE
from softmask.train.checkpoint import CHECKPOINT_DIR, list_checkpoints, load_checkpoint

RUN_CONFIG = "config.yaml"
RUN_MODEL_DIR = "model"
MODEL_PREFIX = "model."


@dataclass(frozen=True)
class ModelFiles:
    """Where a model's tensors and config are. ``checkpoint``: a training checkpoint file (its run's
    ``config.yaml`` is ``config``), or None for a saved folder (``folder``, with its own ``config.yaml``)."""

    given: Path
    config: Path
    checkpoint: Path | None = None
    folder: Path | None = None
    run: Path | None = None  # the run folder, when there is one (its config.yaml is the run's config)

    @property
    def source(self) -> Path:
        """The file or folder the tensors come from (for messages)."""
        return self.checkpoint if self.checkpoint is not None else self.folder

    def saved_config(self) -> dict:
        """The ``config.yaml`` mapping (a run's whole config, or a saved folder's ``model``/``task``)."""
        return yaml.safe_load(self.config.read_text()) or {}

    def state(self) -> dict[str, torch.Tensor]:
        """The model's tensors (a checkpoint's ``model.*`` entries of its ``task`` state, prefix removed)."""
        if self.checkpoint is None:
            return read_safetensors(self.folder / WEIGHTS_FILE)
        task = load_checkpoint(self.checkpoint, entries=("task",))["task"]
        state = {k[len(MODEL_PREFIX):]: v for k, v in task.items() if k.startswith(MODEL_PREFIX)}
        if not state:
            raise CheckpointError(f"{self.checkpoint}: the 'task' state dict has no '{MODEL_PREFIX}*' tensors")
        return state


def load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path, what: str) -> None:
    """Load every tensor of ``model`` from ``state`` (nothing missing, nothing left over, every shape
    equal), or raise a CheckpointError naming ``source``, ``what`` it had to fit and the first keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)):
            if keys:
                more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
                parts.append(f"{label}: {', '.join(keys[:5])}{more}")
        raise CheckpointError(f"{source}: does not fit {what}; " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def is_saved_folder(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def is_run_folder(path: Path) -> bool:
    return (path / RUN_CONFIG).is_file() and (bool(list_checkpoints(path)) or is_saved_folder(path / RUN_MODEL_DIR))


def model_files(path: str | Path) -> ModelFiles:
    """The one rule: a checkpoint file inside a run's ``checkpoints/`` folder; a saved model folder; or a
    run folder, whose newest checkpoint is used, else its ``model/`` folder.

    Raises:
        CheckpointError: ``path`` is missing or none of the three (a file that is not a checkpoint at all
            is said to be so, rather than where checkpoints must lie).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_file():
        run_config = path.parent.parent / RUN_CONFIG
        if path.parent.name != CHECKPOINT_DIR or not run_config.is_file():
            # Not a checkpoint at all: say that, not where checkpoints lie (a header check; nothing is loaded).
            check_torch_file(path, f"a softmask training checkpoint ({CHECKPOINT_DIR}/step_*.pt of a run)")
            raise CheckpointError(
                f"{path}: a checkpoint file must lie in a training run's {CHECKPOINT_DIR}/ folder, next to "
                f"the run's {RUN_CONFIG} ({run_config} not found)")
        return ModelFiles(path, run_config, checkpoint=path, run=path.parent.parent)
    if is_saved_folder(path):
        return ModelFiles(path, path / CONFIG_FILE, folder=path)
    if is_run_folder(path):
        found = list_checkpoints(path)
        if found:
            return ModelFiles(path, path / RUN_CONFIG, checkpoint=found[-1], run=path)
        return ModelFiles(path, path / RUN_MODEL_DIR / CONFIG_FILE, folder=path / RUN_MODEL_DIR, run=path)
    raise CheckpointError(
        f"{path}: not a training run folder ({RUN_CONFIG} + {CHECKPOINT_DIR}/step_*.pt or {RUN_MODEL_DIR}/), a "
        f"checkpoint file in a run's {CHECKPOINT_DIR}/ folder, or a saved model folder ({CONFIG_FILE} + "
        f"{WEIGHTS_FILE})")
