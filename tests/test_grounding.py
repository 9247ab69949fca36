"""Grounding metrics on hand-built maps with known answers."""

import numpy as np

from softmask.eval.grounding import box_cells, energy_in_box, pointing_hit


def test_box_cells_uses_patch_centres():
    # 4x4 grid over 64 px: centres at 8, 24, 40, 56.
    cells = box_cells((16, 0, 48, 32), 4, 64)
    assert cells.sum() == 4 and cells[0, 1] and cells[1, 2] and not cells[0, 0]
    tiny = box_cells((30, 30, 33, 33), 4, 64)  # smaller than a patch: the patch holding its centre
    assert tiny.sum() == 1 and tiny[1, 1]


def test_pointing_game():
    m = np.zeros((4, 4))
    m[3, 0] = 1.0
    assert pointing_hit(m, (0, 48, 16, 64), 64)
    assert not pointing_hit(m, (48, 0, 64, 16), 64)
    assert not pointing_hit(np.ones((4, 4)), (0, 0, 64, 64), 64)  # a flat map points nowhere


def test_energy_in_box():
    m = np.zeros((4, 4))
    m[0, 0], m[3, 3] = 3.0, 1.0
    assert energy_in_box(m, (0, 0, 16, 16), 64) == 0.75
    assert energy_in_box(np.zeros((4, 4)), (0, 0, 64, 64), 64) == 0.0
