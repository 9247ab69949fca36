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

# Options added after runs were saved without them: the value such a run trained with. Resuming it with
# today's default would silently switch it (e.g. SoftMask's masked pairs were "positives" before the option).
EARLIER_VALUES = {"softmask.masked_pairs": "positives"}
# What a resumed run may change without changing what it trains: how long it runs, what it logs and saves,
# where it is and the initial weights (the checkpoint replaces them).
BOOKKEEPING_KEYS = ("output_dir", "train.max_steps", "train.epochs", "train.log_every", "train.save_every",
                    "train.keep_last", "data.num_workers", "model.init", "model.vision.init", "model.text.init")


def _flat(mapping: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(saved: dict, now: dict) -> tuple[list[str], list[str]]:
    """How a resumed run's config ``now`` differs from the ``saved`` one it started with (both as written
    to ``config.yaml``): ``(changes to what it trains, changes to how long it runs or what it logs)``, each
    ``"key: old -> new"``. A key the saved config lacks counts with the value of :data:`EARLIER_VALUES` (when
    soft masks are on), or not at all (an option added later whose default keeps what the run did)."""
    old, new = _flat(saved), _flat(now)
    training, length = [], []
    earlier = EARLIER_VALUES if new.get("softmask.soft_masks") else {}  # without soft masks they change nothing
    for key in new:
        if key == "resume":  # the resumed run says resume, the one it continues did not
            continue
        before = old.get(key, earlier.get(key, new[key]))
        if before != new[key]:
            note = " (not in the saved config: the value before the option existed)" if key not in old else ""
            (length if key in BOOKKEEPING_KEYS else training).append(f"{key}: {before!r} -> {new[key]!r}{note}")
    return training, length


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
