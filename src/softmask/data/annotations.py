"""ALBEF-format pretraining annotations: JSON lists of ``{"image": path, "caption": str or [str, ...]}``.

Every file is read and every record checked before anything is returned, so a typo in record
3,000,000 fails at start-up with a message naming the file, the record and the problem, not hours
into training. Whether the image files exist is *not* checked here: a missing or broken image is a
per-sample skip at load time (see :mod:`softmask.data.images`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from softmask.config import ConfigError


class AnnotationError(ConfigError):
    """An annotation file is missing or malformed; the message names the file, the record and the problem."""


@dataclass
class Record:
    """One image with its captions.

    Attributes:
        image: the image path, absolute or joined to ``image_root``.
        captions: one or more raw (uncleaned) captions.
        source: the annotation file the record came from.
        index: the record's position in that file (0-based).
    """

    image: str
    captions: list[str]
    source: str
    index: int


def _type_name(value: object) -> str:
    """JSON-ish name of a parsed value's type: null, object, list, str, int, float, bool."""
    if value is None:
        return "null"
    return "object" if isinstance(value, dict) else type(value).__name__


def _read_json(path: str) -> object:
    if not os.path.isfile(path):
        raise AnnotationError(f"{path}: annotation file not found")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as exc:
        raise AnnotationError(
            f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}"
        ) from None
    except UnicodeDecodeError as exc:
        raise AnnotationError(f"{path}: not UTF-8 text (byte {exc.start}): {exc.reason}") from None


def _check_record(item: object, path: str, index: int) -> tuple[str, list[str]]:
    """Validate one record; returns (image, captions) or raises an AnnotationError."""
    where = f"{path}: record {index}"
    if not isinstance(item, dict):
        raise AnnotationError(f"{where}: must be an object with 'image' and 'caption', got {_type_name(item)}")
    for key in ("image", "caption"):
        if key not in item:
            raise AnnotationError(f"{where}: missing '{key}' (keys: {', '.join(map(str, item)) or 'none'})")
    image = item["image"]
    if not isinstance(image, str) or not image.strip():
        got = "an empty string" if isinstance(image, str) else _type_name(image)
        raise AnnotationError(f"{where}: 'image' must be a non-empty string, got {got}")
    caption = item["caption"]
    if isinstance(caption, str):
        return image, [caption]
    if isinstance(caption, list):
        if not caption:
            raise AnnotationError(f"{where}: 'caption' must be a string or a non-empty list of strings, got []")
        for j, text in enumerate(caption):
            if not isinstance(text, str):
                raise AnnotationError(
                    f"{where}: 'caption' must be a string or a list of strings, "
                    f"got {_type_name(text)} at caption {j}"
                )
        return image, list(caption)
    raise AnnotationError(f"{where}: 'caption' must be a string or a list of strings, got {_type_name(caption)}")


def load_annotations(files: list[str], image_root: str) -> list[Record]:
    """Read and validate ALBEF pretraining JSON files.

    Args:
        files: JSON files, each a list of ``{"image": str, "caption": str | [str, ...]}`` objects
            (other keys are allowed and ignored).
        image_root: folder that relative ``image`` paths are joined to ("" leaves them relative to
            the working directory); absolute paths are kept.

    Returns:
        The records of all files, in file order.

    Raises:
        AnnotationError: a file is missing, not valid JSON (with line and column), not a list, or a
            record is malformed; the message names the file, the record index and the problem.
    """
    records: list[Record] = []
    for path in map(str, files):
        data = _read_json(path)
        if not isinstance(data, list):
            raise AnnotationError(f"{path}: the top level must be a JSON list of records, got {_type_name(data)}")
        for index, item in enumerate(data):
            image, captions = _check_record(item, path, index)
            if image_root and not os.path.isabs(image):
                image = os.path.join(image_root, image)
            records.append(Record(image=image, captions=captions, source=path, index=index))
    return records
