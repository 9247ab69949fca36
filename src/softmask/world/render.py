"""Drawing scenes with numpy: shape masks, surface patterns, backgrounds, and the PNG encoding.

Geometry is exact and aliased (no anti-aliasing), so a pixel belongs to exactly one object or to the
background, and an object's visible pixels can be recomputed from its record (``center``, ``radius``,
``shape``, ``pattern``) with :func:`object_layers`: the renderer and the annotations cannot disagree.

Pixel ``(x, y)`` covers the square ``[x, x+1) x [y, y+1)``; shapes are tested at pixel centres.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

PNG_COMPRESS_LEVEL = 1
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _shape_test(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Which points lie inside ``shape``; (u, v) are offsets from the centre in units of the radius."""
    au, av = np.abs(u), np.abs(v)
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(au, av) <= 0.85
    if shape == "triangle":  # apex up at v=-1, base at v=0.8, half-width 1 at the base
        return (v <= 0.8) & (au * 1.8 <= v + 1.0)
    if shape == "diamond":
        return au + av <= 1.0
    if shape == "cross":
        return ((au <= 0.33) & (av <= 1.0)) | ((av <= 0.33) & (au <= 1.0))
    if shape == "star":  # five points at radius 1, inner corners at radius 0.42
        theta = np.arctan2(u, -v) * (5.0 / (2.0 * math.pi))
        off = np.abs(theta - np.round(theta))  # 0 at a point, 0.5 between points
        return np.hypot(u, v) <= 1.0 - 0.58 * (off / 0.5)
    raise ValueError(f"unknown shape {shape!r}")


def window(center: list[float] | tuple[float, float], radius: float, size: int) -> tuple[int, int, int, int]:
    """The pixel window ``(y0, y1, x0, x1)`` (end-exclusive, clipped to the image) holding the shape."""
    cx, cy = center
    x0, x1 = max(0, int(math.floor(cx - radius)) - 1), min(size, int(math.ceil(cx + radius)) + 2)
    y0, y1 = max(0, int(math.floor(cy - radius)) - 1), min(size, int(math.ceil(cy + radius)) + 2)
    return y0, y1, x0, x1


def pattern_period(size: int) -> tuple[int, int]:
    """(half stripe period, dot spacing) in pixels for an image side of ``size``."""
    return max(2, round(size / 42)), max(4, round(size / 18))


def _pattern_test(pattern: str, center, ys: np.ndarray, xs: np.ndarray, size: int) -> np.ndarray:
    """Which pixels of a window carry the pattern colour (diagonal stripes or a grid of dots)."""
    ix = xs - int(round(center[0]))
    iy = ys - int(round(center[1]))
    half, spacing = pattern_period(size)
    if pattern == "striped":
        return ((ix + iy) // half) % 2 == 1
    if pattern == "dotted":  # round dots (2x2 pixels at the smallest spacing) on a square grid
        middle = (spacing - 1) / 2
        dx = (ix + spacing // 2) % spacing - middle
        dy = (iy + spacing // 2) % spacing - middle
        return dx * dx + dy * dy <= (0.3 * spacing) ** 2
    return np.zeros(np.broadcast(ix, iy).shape, dtype=bool)


@dataclass
class Layer:
    """One object's pixels inside its window ``[y0:y1, x0:x1]``: the shape (``inside``) and the part of it
    drawn in the pattern colour (``pattern``), ignoring occlusion."""

    y0: int
    y1: int
    x0: int
    x1: int
    inside: np.ndarray
    pattern: np.ndarray

    @property
    def window(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y1), slice(self.x0, self.x1)


def object_layer(obj: dict, size: int) -> Layer:
    """The :class:`Layer` of an object record (``shape``, ``center`` [x, y], ``radius``, ``pattern``)."""
    y0, y1, x0, x1 = window(obj["center"], obj["radius"], size)
    ys = np.arange(y0, y1)[:, None]
    xs = np.arange(x0, x1)[None, :]
    cx, cy = obj["center"]
    inside = _shape_test(obj["shape"], (xs + 0.5 - cx) / obj["radius"], (ys + 0.5 - cy) / obj["radius"])
    pattern = inside & _pattern_test(obj["pattern"], obj["center"], ys, xs, size)
    return Layer(y0, y1, x0, x1, inside, pattern)


def object_layers(obj: dict, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(full mask, pattern mask) of one object as (size, size) booleans, ignoring occlusion.

    ``obj`` needs ``shape``, ``center`` [x, y], ``radius`` and ``pattern`` (an objects.json record).
    The pattern mask is the part of the full mask drawn in ``pattern_rgb``.
    """
    layer = object_layer(obj, size)
    full = np.zeros((size, size), dtype=bool)
    pattern = np.zeros((size, size), dtype=bool)
    full[layer.window] = layer.inside
    pattern[layer.window] = layer.pattern
    return full, pattern


def owner_map(layers: list[Layer], size: int) -> np.ndarray:
    """(size, size) int8 map of the object seen at each pixel (its index in drawing order; -1: background)."""
    owner = np.full((size, size), -1, dtype=np.int8)
    for index, layer in enumerate(layers):
        owner[layer.window][layer.inside] = index
    return owner


def visible_masks(full: list[np.ndarray]) -> list[np.ndarray]:
    """Visible part of each full-size mask, given masks in drawing order (later ones cover earlier ones)."""
    visible = [mask.copy() for mask in full]
    cover = np.zeros_like(full[0]) if full else None
    for index in range(len(full) - 1, -1, -1):
        visible[index] &= ~cover
        cover |= full[index]
    return visible


def bounding_box(mask: np.ndarray, x0: int = 0, y0: int = 0) -> list[int]:
    """``[x0, y0, x1, y1]`` of a non-empty mask's pixels (x1, y1 exclusive), offset by (x0, y0)."""
    cols = np.flatnonzero(mask.any(axis=0))
    rows = np.flatnonzero(mask.any(axis=1))
    return [x0 + int(cols[0]), y0 + int(rows[0]), x0 + int(cols[-1]) + 1, y0 + int(rows[-1]) + 1]


@lru_cache(maxsize=8)
def _unit_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1] as (size, 1) and (1, size) arrays."""
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    return coords[:, None], coords[None, :]


def background(spec: dict, size: int) -> np.ndarray:
    """The (size, size, 3) float32 background described by a scene's ``background`` record.

    Kinds: ``plain`` (one colour), ``gradient`` (``colour`` to ``colour2`` along ``angle`` degrees),
    ``noise`` (``colour`` plus Gaussian noise of std ``sigma`` from ``noise_seed``), ``stripes``
    (``colour`` and ``colour2`` in bands of ``period`` pixels along ``angle`` degrees).
    """
    base = np.asarray(spec["colour"], dtype=np.float32)
    image = np.broadcast_to(base, (size, size, 3)).astype(np.float32)
    kind = spec["kind"]
    if kind == "plain":
        return image
    if kind == "noise":
        noise = np.random.default_rng(spec["noise_seed"]).standard_normal((size, size, 1), dtype=np.float32)
        return image + noise * np.float32(spec["sigma"])
    ys, xs = _unit_grid(size)
    angle = math.radians(spec["angle"])
    along = xs * math.cos(angle) + ys * math.sin(angle)
    other = np.asarray(spec["colour2"], dtype=np.float32)
    if kind == "gradient":
        t = (along - along.min()) / max(float(along.max() - along.min()), 1e-6)
        return image + t[..., None] * (other - base)
    if kind == "stripes":
        band = np.floor(along * size / spec["period"]).astype(np.int64) % 2 == 1
        return np.where(band[..., None], other, image)
    raise ValueError(f"unknown background kind {kind!r}")


def render(background_image: np.ndarray, objects: list[dict], layers: list[Layer]) -> np.ndarray:
    """Paint objects (in list order, back to front) over a float background; returns uint8 (S, S, 3).

    ``layers[i]`` is :func:`object_layer` of ``objects[i]``; each object needs ``rgb`` and ``pattern_rgb``.
    """
    image = np.clip(np.rint(background_image), 0, 255).astype(np.uint8)
    for obj, layer in zip(objects, layers, strict=True):
        patch = image[layer.window]
        patch[layer.inside] = obj["rgb"]
        patch[layer.pattern] = obj["pattern_rgb"]
    return image


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 (H, W, 3) array: 8-bit RGB, filter 0 on every row, zlib level
    ``PNG_COMPRESS_LEVEL``, no ancillary chunks (same pixels -> same bytes). Faster than Pillow's encoder
    and, on these flat-coloured pictures, smaller."""
    height, width, _ = image.shape
    rows = np.zeros((height, width * 3 + 1), dtype=np.uint8)  # a leading 0 byte per row: filter "none"
    rows[:, 1:] = image.reshape(height, width * 3)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = zlib.compress(rows.tobytes(), PNG_COMPRESS_LEVEL)
    return PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")
