"""Loading a trained model for inference, visualisation and evaluation.

:func:`load_model` accepts the three things a user is likely to hold after training:

* a training run's ``output_dir`` (``config.yaml`` plus ``checkpoints/step_*.pt`` and/or ``model/``):
  the newest checkpoint is used, else the ``model/`` folder written at the end of the run;
* one checkpoint file inside a run's ``checkpoints/`` folder (the run's ``config.yaml`` is two levels up);
* a ``save_pretrained`` folder (``config.yaml`` with a ``model`` section + ``model.safetensors``).

Which files those are and how they are read is :mod:`softmask.runs` (also the model's tokenizer:
:func:`softmask.runs.tokenizer_source`); building the model is :mod:`softmask.models.vlp`.
:func:`load_for_world` adds what the scripts that read one checkpoint on a synthetic world need.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from softmask.checkpoint_files import CheckpointError
from softmask.config import Config, ConfigError
from softmask.models.vlp import VisionLanguageModel, create_model, from_pretrained
from softmask.runs import model_files, tokenizer_source


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


def load_for_world(checkpoint: str | Path, world: str | Path):
    """A trained model in eval mode, its image and caption encoder on a world and the world's test records.

    Args:
        checkpoint: what :func:`load_model` accepts.
        world: a folder written by ``softmask world``.

    Returns:
        ``(model, enc, test)``: the model, a :class:`softmask.eval.world.WorldEncoder` with the model's own
        tokenizer, and the records of ``annotations/retrieval_test.json``.

    Raises:
        ConfigError: naming ``world`` when it has no test split, or ``checkpoint`` when it does not load.
    """
    from softmask.eval.world import WorldEncoder

    test = Path(world) / "annotations" / "retrieval_test.json"
    if not test.is_file():
        raise ConfigError(f"world {world}: no annotations/retrieval_test.json (not a folder written by "
                          "`softmask world`)")
    try:
        model = load_model(checkpoint)[0]
    except (CheckpointError, ConfigError, OSError) as err:
        raise ConfigError(f"checkpoint {checkpoint}: {err}") from None
    return model, WorldEncoder(model, Path(world), tokenizer_source(checkpoint)), json.loads(test.read_text())
