"""What files a training run and a saved model have, and how they are read: the one owner of those names.

A run folder (``output_dir``) holds ``config.yaml`` (the resolved config), ``checkpoints/step_*.pt``
(the training state: the objective's state dict under ``"task"``, the online model's tensors in it
with the ``model.`` prefix; the optimiser; the step; RNG states) and, at the end of the run, ``model/``,
a saved model folder. A saved model folder holds ``config.yaml`` (a ``model`` section, and ``task`` for a
fine-tuned model), ``model.safetensors`` and ``vocab.txt`` (the tokenizer it was trained with).

The writers take these names from here (``softmask.train.checkpoint`` the checkpoints,
``softmask.train.loop`` a run's ``config.yaml`` and ``model/``, ``softmask.models.vlp`` a saved folder,
``softmask.data.text`` its ``vocab.txt``). Every reader goes through :func:`model_files`, the one rule
for "a run folder, a checkpoint file or a saved model folder", and the :class:`ModelFiles` it returns:
the config, the tensors and the tokenizer of what was given. Building the model is the caller's
(:func:`softmask.inference.load_model`), so loading reads downward: here, then ``softmask.models``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from softmask.checkpoint_files import CheckpointError, check_torch_file, read_safetensors, read_torch_file
from softmask.config import Config, load_config

RUN_CONFIG = "config.yaml"
RUN_MODEL_DIR = "model"
CHECKPOINT_DIR = "checkpoints"
SAVED_CONFIG = "config.yaml"  # a saved model folder's
WEIGHTS_FILE = "model.safetensors"
VOCAB_FILE = "vocab.txt"  # a saved model's own copy of the vocabulary it was trained with
# The objective's state dict in a checkpoint (model, momentum model, queues). The key keeps the name
# checkpoints have always used for it, so that every checkpoint written so far resumes and loads.
OBJECTIVE_KEY = "task"
TRAINING_ENTRIES = (OBJECTIVE_KEY, "optimizer", "state")
MODEL_PREFIX = "model."  # the online model's tensors in the objective's state dict
_CHECKPOINT_NAME = re.compile(r"step_(\d{8})\.pt$")


# --------------------------------------------------------------------------------------------------
# Training checkpoints
# --------------------------------------------------------------------------------------------------


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of ``step`` goes: ``OUTPUT_DIR/checkpoints/step_{step:08d}.pt``."""
    return checkpoint_dir(output_dir) / f"step_{step:08d}.pt"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoints of a run, oldest first."""
    folder = checkpoint_dir(output_dir)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _CHECKPOINT_NAME.search(p.name))


def load_checkpoint(path: str | Path, entries: tuple[str, ...] = TRAINING_ENTRIES) -> dict:
    """A training checkpoint, checked for the ``entries`` the caller needs (all three to resume;
    ``(OBJECTIVE_KEY,)`` to read the model).

    Raises:
        CheckpointError: one line, when the file is not one (not a torch.save file, damaged, or
            lacking one of ``entries``).
    """
    what = f"a softmask training checkpoint ({CHECKPOINT_DIR}/step_*.pt of a run)"
    ckpt = read_torch_file(path, what)
    if not isinstance(ckpt, dict) or not all(isinstance(ckpt.get(k), dict) for k in entries):
        keys = ", ".join(map(str, ckpt)) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: not a checkpoint of a softmask training run (expected {what} with "
                              f"{'/'.join(entries)} entries; it holds {keys[:80] or 'nothing'})")
    return ckpt


# --------------------------------------------------------------------------------------------------
# The files of a run folder, a checkpoint file or a saved model folder
# --------------------------------------------------------------------------------------------------


def run_config(run_dir: str | Path) -> Config:
    """The resolved config of a training run (``run_dir/config.yaml``) with every ``init`` field
    cleared, so that building a model from it never loads the initial checkpoints again."""
    cfg = load_config(Path(run_dir) / RUN_CONFIG)
    cfg.model.init = cfg.model.vision.init = cfg.model.text.init = ""
    return cfg


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

    def run_config(self) -> Config | None:
        """The run's resolved config, ``init`` fields cleared (:func:`run_config`); None without a run."""
        return run_config(self.run) if self.run is not None else None

    def state(self) -> dict[str, torch.Tensor]:
        """The model's tensors (a checkpoint's ``model.*`` entries of its objective state, prefix removed)."""
        if self.checkpoint is None:
            return read_safetensors(self.folder / WEIGHTS_FILE)
        objective = load_checkpoint(self.checkpoint, entries=(OBJECTIVE_KEY,))[OBJECTIVE_KEY]
        state = {k[len(MODEL_PREFIX):]: v for k, v in objective.items() if k.startswith(MODEL_PREFIX)}
        if not state:
            raise CheckpointError(f"{self.checkpoint}: the '{OBJECTIVE_KEY}' state dict has no '{MODEL_PREFIX}*' "
                                  "tensors")
        return state

    def load_into(self, model: torch.nn.Module, what: str) -> None:
        """Load :meth:`state` into ``model`` strictly (:func:`load_strict`); ``what`` it had to fit, for the message."""
        load_strict(model, self.state(), self.source, what)


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
    return (path / SAVED_CONFIG).is_file() and (path / WEIGHTS_FILE).is_file()


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
        config = path.parent.parent / RUN_CONFIG
        if path.parent.name != CHECKPOINT_DIR or not config.is_file():
            # Not a checkpoint at all: say that, not where checkpoints lie (a header check; nothing is loaded).
            check_torch_file(path, f"a softmask training checkpoint ({CHECKPOINT_DIR}/step_*.pt of a run)")
            raise CheckpointError(
                f"{path}: a checkpoint file must lie in a training run's {CHECKPOINT_DIR}/ folder, next to "
                f"the run's {RUN_CONFIG} ({config} not found)")
        return ModelFiles(path, config, checkpoint=path, run=path.parent.parent)
    if is_saved_folder(path):
        return ModelFiles(path, path / SAVED_CONFIG, folder=path)
    if is_run_folder(path):
        found = list_checkpoints(path)
        if found:
            return ModelFiles(path, path / RUN_CONFIG, checkpoint=found[-1], run=path)
        return ModelFiles(path, path / RUN_MODEL_DIR / SAVED_CONFIG, folder=path / RUN_MODEL_DIR, run=path)
    raise CheckpointError(
        f"{path}: not a training run folder ({RUN_CONFIG} + {CHECKPOINT_DIR}/step_*.pt or {RUN_MODEL_DIR}/), a "
        f"checkpoint file in a run's {CHECKPOINT_DIR}/ folder, or a saved model folder ({SAVED_CONFIG} + "
        f"{WEIGHTS_FILE})")


def config_files(path: str | Path) -> list[Path]:
    """The ``config.yaml`` files that say what was saved at ``path``, read without any tensor: a folder's
    own and its ``model/`` folder's (a saved folder, or a run folder and its saved model), or a checkpoint
    file's run's; [] for anything else (e.g. a foreign checkpoint file)."""
    path = Path(path).expanduser()
    if path.is_dir():
        found = [path / SAVED_CONFIG, path / RUN_MODEL_DIR / SAVED_CONFIG]
    elif path.is_file() and path.parent.name == CHECKPOINT_DIR:
        found = [path.parent.parent / RUN_CONFIG]
    else:
        found = []
    return [config for config in found if config.is_file()]


def tokenizer_source(path: str | Path) -> str:
    """The vocabulary a model at ``path`` (as :func:`model_files` takes it) was trained with: the
    ``vocab.txt`` of its saved model folder, else its run's ``data.tokenizer``, else "" (the default
    bert-base-uncased vocabulary, for folders saved before models recorded theirs)."""
    path = Path(path).expanduser()
    run = path.parent.parent if path.is_file() else path
    for folder in (path, path / RUN_MODEL_DIR):
        if folder.is_dir() and (folder / VOCAB_FILE).is_file():
            return str(folder / VOCAB_FILE)
    if (run / RUN_CONFIG).is_file():
        return run_config(run).data.tokenizer
    return ""
