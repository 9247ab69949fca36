"""Grounding of word Grad-CAM maps against object boxes: the pointing game and the share of map
energy inside the box. Pure functions on one (g, g) patch-grid map and a pixel box."""

from __future__ import annotations

import numpy as np


def _cell_centres(grid: int, image_size: int) -> np.ndarray:
    """(grid,) pixel coordinates of the patch centres along one axis."""
    return (np.arange(grid) + 0.5) * image_size / grid


def box_cells(box, grid: int, image_size: int) -> np.ndarray:
    """(grid, grid) bool: patches whose centre lies inside ``box`` = (x0, y0, x1, y1) in pixels
    (x1, y1 exclusive). A box smaller than a patch still covers the patch containing its centre."""
    x0, y0, x1, y1 = box
    centres = _cell_centres(grid, image_size)
    inside = (((centres >= y0) & (centres < y1))[:, None]) & (((centres >= x0) & (centres < x1))[None, :])
    if not inside.any():
        cy = min(grid - 1, int((y0 + y1) / 2 * grid / image_size))
        cx = min(grid - 1, int((x0 + x1) / 2 * grid / image_size))
        inside[cy, cx] = True
    return inside


def pointing_hit(word_map: np.ndarray, box, image_size: int) -> bool:
    """The pointing game: does the map's maximum fall inside the box? Ties at the maximum count as a
    hit only if every maximal patch is inside (a flat map does not point anywhere)."""
    word_map = np.asarray(word_map, dtype=np.float64)
    inside = box_cells(box, word_map.shape[0], image_size)
    peaks = word_map >= word_map.max()
    return bool(inside[peaks].all()) and not peaks.all()


def energy_in_box(word_map: np.ndarray, box, image_size: int) -> float:
    """Share of the (non-negative) map's total inside the box; 0 for an all-zero map."""
    word_map = np.clip(np.asarray(word_map, dtype=np.float64), 0, None)
    total = word_map.sum()
    if total <= 0:
        return 0.0
    return float(word_map[box_cells(box, word_map.shape[0], image_size)].sum() / total)
