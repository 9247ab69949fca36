"""Loading a trained model for inference, visualisation and evaluation.

:func:`load_model` accepts the three things a user is likely to hold after training:

* a training run's ``output_dir`` (``config.yaml`` plus ``checkpoints/step_*.pt`` and/or ``model/``):
  the newest checkpoint is used, else the ``model/`` folder written at the end of the run;
* one checkpoint file inside a run's ``checkpoints/`` folder (the run's ``config.yaml`` is two levels up);
* a ``save_pretrained`` folder (``config.yaml`` with a ``model`` section + ``model.safetensors``).

Which files those are and how they are read is :mod:`softmask.runs` (also the model's tokenizer:
:func:`softmask.runs.tokenizer_source`); building the model is :mod:`softmask.models.vlp`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from softmask.config import Config
from softmask.models.vlp import VisionLanguageModel, create_model, from_pretrained
from softmask.runs import model_files


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
    cfg = files.run_config()
    if files.checkpoint is not None:
        model = create_model(cfg, load_weights=False)
        files.load_into(model, "the model of the run's config.yaml")
    else:
        model = from_pretrained(files.folder)
    if device is not None:
        model.to(device)
    return model.eval(), cfg
