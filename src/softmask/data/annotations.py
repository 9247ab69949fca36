"""ALBEF-format annotations: JSON lists of records, checked by one validator (:func:`load_records`).

Pretraining records are ``{"image": path, "caption": str or [str, ...]}`` (:func:`load_annotations`);
a task names the fields its records need (:class:`Field`).

Every file is read and every record checked before anything is returned, so a typo in record
3,000,000 fails at start-up with a message naming the file, the record and the problem, not hours
into training. Whether the image files exist is *not* checked here (a missing or broken image is a
per-sample skip at load time, see :mod:`softmask.data.images`), except with a ``path_map``
(``data.path_map``, :mod:`softmask.data.path_map`): then every record's image must exist once mapped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from softmask.config import ConfigError
from softmask.data.path_map import PathMap


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


@dataclass(frozen=True)
class Field:
    """A required record field: its name, the JSON types allowed, an optional check of the value that
    returns a problem description (or None when the value is fine), and how to name the allowed types
    in a message (by default from ``types``)."""

    name: str
    types: tuple[type, ...]
    check: Callable[[object], str | None] | None = None
    expected: str = ""

    def problem(self, value: object) -> str | None:
        """What is wrong with ``value``, as the end of a message ("must be a string, got int"), or None."""
        if not isinstance(value, self.types) or (isinstance(value, bool) and bool not in self.types):
            return f"must be {self.expected or _describe(self.types)}, got {_type_name(value)}"
        return self.check(value) if self.check else None


def _describe(types: tuple[type, ...]) -> str:
    names = {str: "a string", list: "a list", int: "an integer", float: "a number", dict: "an object",
             bool: "true/false"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def _image_paths_problem(value: object) -> str | None:
    paths = [value] if isinstance(value, str) else value
    if not paths or not all(isinstance(p, str) and p.strip() for p in paths):
        return f"must hold non-empty path strings, got {value!r}"
    return None


def _non_empty_string_problem(value: object) -> str | None:
    return "must be a non-empty string, got an empty string" if not str(value).strip() else None


def _captions_problem(value: object) -> str | None:
    if isinstance(value, str):
        return None
    if not value:
        return "must be a string or a non-empty list of strings, got []"
    for j, text in enumerate(value):
        if not isinstance(text, str):
            return f"must be a string or a list of strings, got {_type_name(text)} at caption {j}"
    return None


#: The fields of a pretraining record: one image path and one caption or a list of them.
PRETRAIN_FIELDS = (
    Field("image", (str,), _non_empty_string_problem, expected="a non-empty string"),
    Field("caption", (str, list), _captions_problem, expected="a string or a list of strings"),
)


def load_records(files: Sequence[str], image_root: str, fields: Sequence[Field], image_key: str = "image",
                 key: str = "finetune.train", path_map: Mapping[str, str] | None = None) -> list[dict]:
    """Read and check annotation files: the one validator of pretraining and task annotations.

    Args:
        files: JSON files, each a list of objects.
        image_root: folder joined to relative image paths ("" keeps them as they are); absolute
            paths are kept.
        fields: the required fields besides ``image_key`` (other keys are kept and ignored); a field
            named ``image_key`` replaces the default image check.
        image_key: ``"image"`` (one path) or ``"images"`` (a non-empty list of paths).
        key: the config key ``files`` came from, for the message when it is empty.
        path_map: image-path prefixes to rewrite before joining (``data.path_map``); with one, every
            image must exist once mapped.

    Returns:
        The records of all files in file order, as dicts with the image path(s) mapped, joined to
        ``image_root`` and ``_source`` ("file: record i") added for messages.

    Raises:
        AnnotationError: a file is missing, not valid JSON (with line and column), not a list, or a
            record is malformed, or (with a path map) its image maps to no existing file; the message
            names the file, the record index and the problem.
    """
    if not files:
        raise ConfigError(f"{key} is empty: give {key}=[FILE.json,...] (ALBEF-format annotations), or world=DIR "
                          "for a folder written by `softmask world`")
    checks = list(fields) if any(f.name == image_key for f in fields) else [
        Field(image_key, (str, list), _image_paths_problem), *fields]
    wanted = [f"'{field.name}'" for field in checks]
    wanted = ", ".join(wanted[:-1]) + f" and {wanted[-1]}" if len(wanted) > 1 else wanted[0]
    prefixes = PathMap(path_map)
    records = []
    for path in map(str, files):
        data = _read_json(path)
        if not isinstance(data, list):
            raise AnnotationError(f"{path}: the top level must be a JSON list of records, got {_type_name(data)}")
        for index, item in enumerate(data):
            where = f"{path}: record {index}"
            if not isinstance(item, dict):
                raise AnnotationError(f"{where}: must be an object with {wanted}, got {_type_name(item)}")
            for field in checks:
                if field.name not in item:
                    keys = ", ".join(map(str, item)) or "none"
                    raise AnnotationError(f"{where}: missing '{field.name}' (keys: {keys})")
                problem = field.problem(item[field.name])
                if problem:
                    raise AnnotationError(f"{where}: '{field.name}' {problem}")
            paths = item[image_key]
            joined = []
            for image in [paths] if isinstance(paths, str) else paths:
                resolved, problem = prefixes.resolve(image, image_root)
                if problem:
                    raise AnnotationError(f"{where}: {problem}")
                joined.append(resolved)
            record = dict(item)
            record[image_key] = joined if image_key == "images" else joined[0]
            record["_source"] = where
            records.append(record)
    return records


def load_annotations(files: Sequence[str], image_root: str, path_map: Mapping[str, str] | None = None) -> list[Record]:
    """Read and validate ALBEF pretraining JSON files (:func:`load_records` with :data:`PRETRAIN_FIELDS`).

    Args:
        files: JSON files, each a list of ``{"image": str, "caption": str | [str, ...]}`` objects
            (other keys are allowed and ignored).
        image_root: folder that relative ``image`` paths are joined to ("" leaves them relative to
            the working directory); absolute paths are kept.
        path_map: image-path prefixes rewritten first (``data.path_map``; see :func:`load_records`).

    Returns:
        The records of all files, in file order.

    Raises:
        AnnotationError: as :func:`load_records`.
    """
    records = []
    for item in load_records(files, image_root, PRETRAIN_FIELDS, key="data.train", path_map=path_map) if files else []:
        source, index = item["_source"].rsplit(": record ", 1)
        caption = item["caption"]
        records.append(Record(image=item["image"], captions=[caption] if isinstance(caption, str) else list(caption),
                              source=source, index=int(index)))
    return records
