"""The package as a user gets it: the configs ship inside it, a wheel installed outside the repository
runs `softmask demo`, `make demo` needs no browser, and the license pyproject names is there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from softmask.config import load_config
from softmask.config.files import PACKAGED_CONFIGS, packaged_config, resolve_config_path

ROOT = Path(__file__).resolve().parents[1]


def test_the_repository_configs_are_the_packaged_ones():
    shipped = sorted(p.relative_to(PACKAGED_CONFIGS) for p in PACKAGED_CONFIGS.rglob("*.yaml"))
    linked = sorted(p.relative_to(ROOT / "configs") for p in (ROOT / "configs").rglob("*.yaml"))
    assert shipped == linked and len(shipped) >= 16
    assert (ROOT / "configs").resolve() == PACKAGED_CONFIGS
    assert packaged_config("pretrain/world_mini.yaml").is_file()


def test_a_configs_path_reads_the_shipped_config_where_there_is_no_such_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here: the shipped copy is read
    assert resolve_config_path("configs/pretrain/tiny.yaml") == packaged_config("pretrain/tiny.yaml")
    assert load_config("configs/pretrain/tiny.yaml").model.vision.width == 64
    # A file of that name in the working folder wins over the shipped one.
    own = tmp_path / "configs" / "pretrain" / "tiny.yaml"
    own.parent.mkdir(parents=True)
    own.write_text("model: {vision: {width: 32, num_heads: 2}}\n")
    assert resolve_config_path("configs/pretrain/tiny.yaml") == Path("configs/pretrain/tiny.yaml")
    assert load_config("configs/pretrain/tiny.yaml").model.vision.width == 32
    # Anything else is left alone, and a missing file is still reported under the name given.
    assert resolve_config_path("configs/pretrain/nope.yaml") == Path("configs/pretrain/nope.yaml")
    assert resolve_config_path("my/tiny.yaml") == Path("my/tiny.yaml")


def test_make_demo_needs_no_browser_and_make_test_installs_one():
    demo = subprocess.run(["make", "-n", "-B", "demo"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    test = subprocess.run(["make", "-n", "-B", "test"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "softmask demo" in demo and "chromium" not in demo
    assert "chromium" in test and "pytest" in test


def test_license_file_is_the_one_pyproject_names():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("BSD 3-Clause License") and "the softmask authors" in text
    assert 'license = "BSD-3-Clause"' in (ROOT / "pyproject.toml").read_text()


def test_wheel_installed_outside_the_repository_runs_the_demo(tmp_path):
    """pip wheel, pip install --target DIR, DIR first on PYTHONPATH, and a tiny demo from a folder outside
    the checkout: the installed copy (not this checkout's) runs it, with the configs it ships."""
    wheels, site, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(wheels), str(ROOT)], check=True, cwd=tmp_path)
    (wheel,) = wheels.glob("softmask-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, cwd=tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    where = subprocess.run([sys.executable, "-c", "import softmask; print(softmask.__file__)"], cwd=elsewhere, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(site), where
    demo = [sys.executable, "-m", "softmask", "-q", "demo", "--out", "demo", "--images", "200",
            "--vision-images", "200", "--steps", "2", "--vision-steps", "2", "--batch-size", "4",
            "--vision-batch-size", "8", "--eval-k", "3", "--grounding-captions", "2", "itc.queue_size=8"]
    result = subprocess.run(demo, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    report = (elsewhere / "demo" / "report.md").read_text()
    assert "| metric (%) | albef | softmask |" in report
    shipped = site / "softmask" / "configs"
    assert f"--config {shipped / 'pretrain' / 'world_mini.yaml'}" in report
    assert f"--config {shipped / 'vision' / 'world_vit.yaml'}" in report
