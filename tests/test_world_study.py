"""benchmarks/world_study.py: its summary arithmetic, and one tiny run end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
world_study = load_benchmark("world_study.py")


def test_summary_is_mean_and_sample_std_over_seeds():
    runs = {"albef": {"0": {"tr1": 1.0, "itm_all": 50.0}, "1": {"tr1": 3.0, "itm_all": 52.0}},
            "softmask": {"0": {"tr1": 4.0}}}
    summary = world_study.summarise(runs)
    assert summary["albef"]["tr1"] == pytest.approx([2.0, 2 ** 0.5, 2])
    assert summary["softmask"]["tr1"] == [4.0, 0.0, 1]
    text = world_study.table(summary, keys=("tr1", "itm_all"))
    assert text.startswith("| metric | albef (n=2) | softmask (n=1) |")
    assert "| tr1 | 2.0 ± 1.4 | 4.0 ± 0.0 |" in text and "| itm_all | 51.0 ± 1.4 | - |" in text


@pytest.mark.parametrize("variant", list(world_study.VARIANTS))
def test_every_variant_is_a_valid_world_recipe(variant):
    from softmask.config import load_config

    config = load_config(ROOT / "configs" / "pretrain" / "world_mini.yaml", world_study.VARIANTS[variant])
    assert config.method == world_study.VARIANTS[variant][0].split("=")[1]


@pytest.mark.slow
def test_a_tiny_study_runs_end_to_end(tmp_path):
    from softmask.world import generate_world

    generate_world(tmp_path / "world", images=40, size=32, seed=1)
    out = tmp_path / "study"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "world_study.py"), "--out", str(out), "--world",
           str(tmp_path / "world"), "--config", str(ROOT / "configs" / "pretrain" / "tiny.yaml"),
           "--variants", "albef", "--seeds", "0", "--steps", "2", "--k", "2", "--grounding-captions", "3",
           "--mlm-captions", "4", "--shortcut-pairs", "5", "train.batch_size=4"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1200)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((out / "study.json").read_text())
    assert result["settings"]["steps"] == 2 and result["settings"]["failed_runs"] == []
    assert result["settings"]["evaluation"] == {"grounding_captions": 3, "mlm_captions": 4, "shortcut_pairs": 5}
    metrics = result["runs"]["albef"]["0"]
    assert {"tr1", "ir1", "r_mean", "itm_all", "pointing_all"} <= set(metrics)
    assert result["summary"]["albef"]["tr1"][2] == 1
    last = json.loads((out / "albef_s0" / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["train_loss_itc"] == pytest.approx(last["loss_itc"])  # 2 steps: only step 2 is logged
    assert "| tr1 |" in (out / "study.md").read_text()


def write_fake_study(path: Path, runs: dict, overrides=("train.lr_peak=1e-3", "train.log_every=50"), steps=600,
                     evaluation=None):
    settings = {"evaluation": evaluation, "config": "/somewhere/configs/pretrain/tiny.yaml", "world": "/w", "variants":
                {v: world_study.VARIANTS[v] for v in runs}, "seeds": sorted({int(s) for r in runs.values() for s in r}),
                "overrides": list(overrides), "parallel": 2, "k": 16, "steps": steps, "failed_runs": []}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"settings": settings, "summary": world_study.summarise(runs), "runs": runs}))
    return path


@pytest.mark.slow
def test_merging_studies_pools_seeds_and_variants(tmp_path):
    a = write_fake_study(tmp_path / "a" / "study.json", {"softmask": {"0": {"tr1": 1.0}}, "albef": {"0": {"tr1": 2.0}}})
    b = write_fake_study(tmp_path / "b" / "study.json", {"albef": {"2": {"tr1": 4.0}, "1": {"tr1": 3.0}}},
                         overrides=("train.lr_peak=1e-3", "train.log_every=100"))
    settings, per_run = world_study.merge_studies([a, b])
    assert list(per_run) == ["albef", "softmask"]  # the order of VARIANTS, not of the files
    assert list(per_run["albef"]) == ["0", "1", "2"]
    assert settings["seeds"] == [0, 1, 2] and settings["steps"] == 600 and len(settings["merged_from"]) == 2
    assert world_study.summarise(per_run)["albef"]["tr1"] == [3.0, 1.0, 3]

    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "world_study.py"), "--out", str(tmp_path / "m"),
                           "--merge", str(a), str(b)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr
    merged = json.loads((tmp_path / "m" / "study.json").read_text())
    assert merged["summary"]["albef"]["tr1"] == [3.0, 1.0, 3]
    assert "| tr1 | 3.0 ± 1.0 | 1.0 ± 0.0 |" in (tmp_path / "m" / "study.md").read_text()
    # A merged study merged again brings its own sources: none is lost.
    c = write_fake_study(tmp_path / "c" / "study.json", {"softmask": {"1": {"tr1": 5.0}}})
    settings, _ = world_study.merge_studies([tmp_path / "m" / "study.json", c])
    assert [source["study"] for source in settings["merged_from"]] == [str(a), str(b), str(c)]


@pytest.mark.parametrize("change, message", [
    ({"overrides": ("train.lr_peak=3e-4",)}, "overrides"),
    ({"steps": 1200}, "steps"),
    ({"evaluation": {"grounding_captions": 300, "mlm_captions": 300, "shortcut_pairs": 200}}, "evaluation"),
    ({"runs": {"albef": {"0": {"tr1": 9.0}}}}, "albef seed 0 is also in an earlier study"),
])
def test_merging_refuses_studies_that_differ_or_overlap(tmp_path, change, message):
    a = write_fake_study(tmp_path / "a.json", {"albef": {"0": {"tr1": 2.0}}})
    kwargs = {"overrides": change.get("overrides", ("train.lr_peak=1e-3",)), "steps": change.get("steps", 600),
              "evaluation": change.get("evaluation")}
    b = write_fake_study(tmp_path / "b.json", change.get("runs", {"albef": {"1": {"tr1": 2.0}}}), **kwargs)
    with pytest.raises(ValueError, match=message) as err:
        world_study.merge_studies([a, b])
    assert str(b) in str(err.value)


def test_merging_fills_in_training_losses_from_the_run_folders(tmp_path):
    a = write_fake_study(tmp_path / "a" / "study.json", {"albef": {"0": {"tr1": 2.0}}})
    rows = [{"step": 50 * i, "loss_itc": float(i), "loss_itm": 0.6, "loss_mlm": 3.0, "temp": 0.05}
            for i in (1, 2, 3, 4)]
    (tmp_path / "a" / "albef_s0").mkdir()
    (tmp_path / "a" / "albef_s0" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    _, per_run = world_study.merge_studies([a])
    metrics = per_run["albef"]["0"]
    assert metrics["train_loss_itc"] == pytest.approx(3.0)  # the mean of the last three logged steps
    assert metrics["train_temp"] == pytest.approx(0.05) and "train_loss_itm_soft" not in metrics  # albef logs none
    assert "| train_loss_itc | 3.000 ± 0.000 |" in world_study.table(world_study.summarise(per_run))


def test_merging_adds_training_keys_a_study_did_not_record_and_keeps_those_it_did(tmp_path):
    a = write_fake_study(tmp_path / "a" / "study.json", {"softmask": {"0": {"tr1": 2.0, "train_loss_itc": 9.0}}})
    rows = [{"step": 50 * i, "loss_itc": 1.0, "loss_itm": 0.5, "loss_itm_pairs": 0.6 + 0.01 * i} for i in (1, 2, 3, 4)]
    (tmp_path / "a" / "softmask_s0").mkdir()
    (tmp_path / "a" / "softmask_s0" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    metrics = world_study.merge_studies([a])[1]["softmask"]["0"]
    assert metrics["train_loss_itc"] == 9.0  # what the study recorded wins
    assert metrics["train_loss_itm_pairs"] == pytest.approx(0.63)  # added: the mean of the last three


def test_merging_names_a_file_that_is_not_a_study(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"runs": {}}')
    with pytest.raises(ValueError, match="bad.json: not a study.json"):
        world_study.merge_studies([bad])
