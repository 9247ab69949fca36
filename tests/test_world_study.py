"""benchmarks/world_study.py: its summary arithmetic, and one tiny run end to end."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("world_study", ROOT / "benchmarks" / "world_study.py")
world_study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(world_study)


def test_summary_is_mean_and_sample_std_over_seeds():
    runs = {"albef": {"0": {"tr1": 1.0, "itm_all": 50.0}, "1": {"tr1": 3.0, "itm_all": 52.0}},
            "softmask": {"0": {"tr1": 4.0}}}
    summary = world_study.summarise(runs)
    assert summary["albef"]["tr1"] == pytest.approx([2.0, 2 ** 0.5, 2])
    assert summary["softmask"]["tr1"] == [4.0, 0.0, 1]
    text = world_study.table(summary, keys=("tr1", "itm_all"))
    assert "| tr1 | 2.0 ± 1.4 | 4.0 ± 0.0 |" in text and "| itm_all | 51.0 ± 1.4 | - |" in text


def test_a_tiny_study_runs_end_to_end(tmp_path):
    from softmask.world import generate_world

    generate_world(tmp_path / "world", images=40, size=32, seed=1)
    out = tmp_path / "study"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "world_study.py"), "--out", str(out), "--world",
           str(tmp_path / "world"), "--config", str(ROOT / "configs" / "pretrain" / "tiny.yaml"),
           "--variants", "albef", "--seeds", "0", "--steps", "2", "--k", "2", "train.batch_size=4"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((out / "study.json").read_text())
    assert result["settings"]["steps"] == 2 and result["settings"]["failed_runs"] == []
    metrics = result["runs"]["albef"]["0"]
    assert {"tr1", "ir1", "r_mean", "itm_all", "pointing_all"} <= set(metrics)
    assert result["summary"]["albef"]["tr1"][2] == 1
    assert "| tr1 |" in (out / "study.md").read_text()
