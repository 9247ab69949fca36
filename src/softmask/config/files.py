"""Where the shipped configs live: inside the package (``softmask/configs/``), so that an installed
wheel has the configs its commands default to. In a checkout, the repository's ``configs/`` is a link
to that folder, so ``configs/pretrain/tiny.yaml`` names the same file either way.
"""

from __future__ import annotations

from pathlib import Path

#: The folder of the configs shipped with the package (``pretrain/``, ``finetune/``, ``vision/``).
PACKAGED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def packaged_config(name: str) -> Path:
    """The shipped config ``name``, a path under ``configs/`` such as ``"pretrain/world_mini.yaml"``."""
    return PACKAGED_CONFIGS / name


def resolve_config_path(path: str | Path) -> Path:
    """``path`` when it names a file; otherwise, for a relative ``configs/...`` path (as the docs write
    them) with no such file here, e.g. outside a checkout, the shipped config of that name when there
    is one; otherwise ``path`` unchanged, for the caller to report as missing."""
    given = Path(path)
    if given.is_file() or given.is_absolute() or not given.parts or given.parts[0] != "configs":
        return given
    shipped = PACKAGED_CONFIGS.joinpath(*given.parts[1:])
    return shipped if shipped.is_file() else given
