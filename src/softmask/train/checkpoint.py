"""Writing training checkpoints: atomic writes, keep-last-K, ``resume: auto|PATH``, RNG state capture.

A checkpoint is one ``torch.save`` file ``checkpoints/step_{N:08d}.pt`` holding only tensors and
plain containers, so it loads with ``torch.load(weights_only=True)``. Its name, place and entries, and
reading one, are :mod:`softmask.runs`'.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import numpy as np
import torch

from softmask.checkpoint_files import CheckpointError
from softmask.config import ConfigError
from softmask.runs import checkpoint_dir, checkpoint_path, list_checkpoints, load_checkpoint

log = logging.getLogger("softmask")

def save_checkpoint(state: dict, output_dir: str | Path, step: int, keep_last: int) -> Path:
    """Write ``state`` atomically (temporary file, fsync, rename) and delete all but the newest
    ``keep_last`` checkpoints."""
    folder = checkpoint_dir(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(output_dir, step)
    tmp = folder / f".{path.name}.tmp"
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    for old in list_checkpoints(output_dir)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """``""`` -> None; ``auto`` -> the newest checkpoint of ``output_dir`` or None; else the given
    file, or the newest checkpoint of the given run folder."""
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume).expanduser()
    if path.is_dir():
        found = list_checkpoints(path)
        if not found:
            raise ConfigError(f"resume: no checkpoints under {checkpoint_dir(path)}")
        return found[-1]
    if not path.is_file():
        raise ConfigError(f"resume: checkpoint not found: {path}")
    return path


def load_resume_checkpoint(resume: str, output_dir: str | Path) -> tuple[Path, dict] | None:
    """The checkpoint ``resume`` names (see :func:`resolve_resume`), loaded; None when there is none.

    With ``auto`` (or a run folder), a damaged newest checkpoint (e.g. a write cut short by a crash) is
    reported and the one before it used.

    Raises:
        CheckpointError: the named file is not a training checkpoint, or no checkpoint of the run is readable.
        ConfigError: the named file or folder does not exist.
    """
    path = resolve_resume(resume, output_dir)
    if path is None:
        return None
    if resume != "auto" and not Path(resume).expanduser().is_dir():
        return path, load_checkpoint(path)
    candidates = list_checkpoints(path.parent.parent)
    problems = []
    for candidate in reversed(candidates):
        try:
            ckpt = load_checkpoint(candidate)
        except CheckpointError as exc:
            problems.append(str(exc))
            log.warning(f"{exc}; trying the checkpoint before it")
            continue
        return candidate, ckpt
    raise CheckpointError(f"{checkpoint_dir(path.parent.parent)}: no readable checkpoint to resume from "
                          f"({len(problems)} damaged; the newest: {problems[0]})")


def rng_state() -> dict:
    """Every RNG the training step may touch, as tensors and plain values."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]) + [random.getstate()[2]],
        "python_version": random.getstate()[0],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    internal = state["python"]
    random.setstate((state["python_version"], tuple(internal[:-1]), internal[-1]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
