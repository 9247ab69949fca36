"""``data.path_map``: image paths of annotation files rewritten by prefix as the files are read, so that
files written for another machine (ALBEF's released pretraining JSONs hold absolute paths of ALBEF's
cluster) are used as they are. :func:`softmask.data.annotations.load_records` applies it and reports a
record whose image maps to no existing file."""

from __future__ import annotations

import os
from collections.abc import Mapping


class PathMap:
    """Prefix rewrites ``{old: new}``; the longest ``old`` that starts a path wins."""

    def __init__(self, prefixes: Mapping[str, str] | None = None):
        self.prefixes = sorted((prefixes or {}).items(), key=lambda item: len(item[0]), reverse=True)

    def __bool__(self) -> bool:
        return bool(self.prefixes)

    def mapped(self, path: str) -> str | None:
        """``path`` with its longest matching prefix replaced, or None when no prefix matches."""
        for old, new in self.prefixes:
            if path.startswith(old):
                return new + path[len(old):]
        return None

    def resolve(self, path: str, image_root: str) -> tuple[str, str | None]:
        """``(image file, problem)``: the path mapped (when a prefix matches) and joined to ``image_root``
        (when relative); with a map, ``problem`` says why that file does not exist, else it is None."""
        mapped = self.mapped(path)
        resolved = mapped if mapped is not None else path
        if image_root and not os.path.isabs(resolved):
            resolved = os.path.join(image_root, resolved)
        if not self.prefixes or os.path.isfile(resolved):
            return resolved, None
        olds = ", ".join(repr(old) for old, _ in self.prefixes)
        how = (f"maps to '{resolved}'" if mapped is not None
               else f"starts with none of data.path_map's prefixes ({olds}) and is '{resolved}'")
        return resolved, f"image '{path}' {how}, which is not a file"
