"""README.md's Python snippet runs as printed, on a tiny model the test saves where the snippet looks for
the demo's ALBEF run, and its ITC and ITM scores are the ones the library's Grad-CAM computes for the pair."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from softmask.cli import main

from helpers import TINY

ROOT = Path(__file__).resolve().parents[1]


def readme_snippet() -> str:
    blocks = re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), re.MULTILINE | re.DOTALL)
    assert len(blocks) == 1, f"README.md should hold one python block, found {len(blocks)}"
    return blocks[0]


def test_readme_snippet_scores_and_draws_on_a_tiny_model(tmp_path, monkeypatch, capsys):
    snippet = readme_snippet()
    assert len(snippet.splitlines()) <= 16
    monkeypatch.chdir(tmp_path)
    assert main(["-q", "export", "--config", str(TINY), "--out", "runs/demo/albef"]) == 0
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)).save("image.png")
    capsys.readouterr()
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    itc, itm, maps, files = scope["itc"], scope["itm"], scope["maps"], scope["files"]
    assert -1.0 <= itc <= 1.0 and 0.0 <= itm <= 1.0
    # The snippet's own ITC and ITM equal what the Grad-CAM code computed for the same pair.
    assert abs(itc - maps["itc_sim"]) < 1e-5 and abs(itm - maps["itm_prob"]) < 1e-5
    assert maps["words"] == ["a", "red", "circle", "left", "of", "a", "blue", "square"]
    assert maps["maps"].shape[0] == 8 and Path("figs/02_red.png") in [Path(f) for f in files]
    assert all(Path(f).is_file() for f in files)
    printed = capsys.readouterr().out
    assert printed.startswith(f"ITC {itc:.3f}, ITM {itm:.3f}; Grad-CAM per word: figs/01_a.png, figs/02_red.png")
