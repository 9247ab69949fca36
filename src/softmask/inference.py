"""Loading a trained model for inference, visualisation and evaluation.

:func:`load_model` accepts the three things a user is likely to hold after training:

* a training run's ``output_dir`` (``config.yaml`` plus ``checkpoints/step_*.pt`` and/or ``model/``):
  the newest checkpoint is used, else the ``model/`` folder written at the end of the run;
* one checkpoint file inside a run's ``checkpoints/`` folder (the run's ``config.yaml`` is two levels up);
* a ``save_pretrained`` folder (``config.yaml`` with a ``model`` section + ``model.safetensors``).

Training checkpoints hold the :class:`~softmask.tasks.pretrain.PretrainObjective` state dict under
``"task"``; the online model's tensors are the ones under the ``model.`` prefix (the momentum copy,
queues and optimiser state are not needed here).
"""

from __future__ import annotations

from pathlib import Path

import torch

from softmask.config import Config, load_config
from softmask.models.vlp import VisionLanguageModel, create_model, from_pretrained
from softmask.runs import RUN_CONFIG, RUN_MODEL_DIR, ModelFiles, load_strict, model_files


def tokenizer_source(path: str | Path) -> str:
    """The vocabulary a model at ``path`` (as :func:`load_model` takes it) was trained with: the
    ``vocab.txt`` of its saved model folder, else its run's ``data.tokenizer``, else "" (the default
    bert-base-uncased vocabulary, for folders saved before models recorded theirs)."""
    from softmask.data.text import VOCAB_FILE

    path = Path(path).expanduser()
    run = path.parent.parent if path.is_file() else path
    for folder in (path, path / RUN_MODEL_DIR):
        if folder.is_dir() and (folder / VOCAB_FILE).is_file():
            return str(folder / VOCAB_FILE)
    if (run / RUN_CONFIG).is_file():
        return load_run_config(run).data.tokenizer
    return ""


def load_run_config(run_dir: str | Path) -> Config:
    """The resolved config of a training run (``run_dir/config.yaml``) with every ``init`` field
    cleared, so that building a model from it never loads the initial checkpoints again."""
    cfg = load_config(Path(run_dir) / RUN_CONFIG)
    cfg.model.init = cfg.model.vision.init = cfg.model.text.init = ""
    return cfg


def model_state_from_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The online model's state dict from a training checkpoint: the ``model.``-prefixed tensors of
    its ``"task"`` entry, prefix removed. Read with ``torch.load(weights_only=True)``."""
    path = Path(path)
    return ModelFiles(path, path.parent.parent / RUN_CONFIG, checkpoint=path).state()


def load_model(path: str | Path, *, device: str | torch.device | None = None
               ) -> tuple[VisionLanguageModel, Config | None]:
    """Load a trained model for inference.

    Args:
        path: a training run's ``output_dir`` (newest ``checkpoints/step_*.pt``, else ``model/``), a
            checkpoint file inside a run's ``checkpoints/`` folder, or a ``save_pretrained`` folder
            (:func:`softmask.runs.model_files`).
        device: where to put the model (default: stays on the CPU).

    Returns:
        (model in eval mode, the run's config with the ``init`` fields cleared); the config is None
        for a ``save_pretrained`` folder, which only holds the model section.

    Raises:
        CheckpointError: ``path`` is missing, is none of the three, or its tensors do not fit its config.
        ConfigError: the run's ``config.yaml`` is invalid.
    """
    files = model_files(path)
    cfg = load_run_config(files.run) if files.run is not None else None
    if files.checkpoint is not None:
        model = create_model(cfg, load_weights=False)
        load_strict(model, files.state(), files.checkpoint, "the model of the run's config.yaml")
    else:
        model = from_pretrained(files.folder)
    if device is not None:
        model.to(device)
    return model.eval(), cfg
