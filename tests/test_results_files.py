"""The published results: every file under docs/results/ has the one layout benchmarks/world_study.py writes
(settings, summary, runs) with a summary that is its runs' mean and std, names no machine-local path, and
every table README.md and docs/ show under a ``results-table`` comment equals what its command prints."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from helpers import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
RESULTS = sorted((ROOT / "docs" / "results").glob("*.json"))
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMENT = re.compile(r"^<!-- results-table: (python benchmarks/results_table\.py .+?) -->$")
SETTINGS = {"config", "world", "steps", "k", "overrides", "variants", "seeds"}


@pytest.mark.parametrize("path", RESULTS, ids=[p.name for p in RESULTS])
def test_results_file_has_the_study_layout(path):
    text = path.read_text()
    assert "/tmp/" not in text
    study = json.loads(text)
    assert set(study) == {"settings", "summary", "runs"}
    assert set(study["settings"]) >= SETTINGS, SETTINGS - set(study["settings"])
    runs = study["runs"]
    assert set(runs) == set(study["summary"]) and set(runs) <= set(study["settings"]["variants"])
    for variant, seeds in runs.items():
        assert seeds and all(int(seed) in study["settings"]["seeds"] for seed in seeds), variant
        for metrics in seeds.values():
            assert "tr1" in metrics and all(isinstance(v, (int, float)) for v in metrics.values())
    recomputed = load_benchmark("world_study.py").summarise(runs)
    for variant, metrics in recomputed.items():
        assert set(metrics) == set(study["summary"][variant])
        for key, (mean, std, n) in metrics.items():
            assert math.isclose(mean, study["summary"][variant][key][0], rel_tol=1e-9, abs_tol=1e-12), (variant, key)
            assert math.isclose(std, study["summary"][variant][key][1], rel_tol=1e-9, abs_tol=1e-12), (variant, key)
            assert n == study["summary"][variant][key][2]


def shown_tables() -> list[tuple[str, str, str]]:
    """(where, command, table as shown) for each results-table comment in README.md and docs/*.md."""
    found = []
    for page in PAGES:
        lines = page.read_text().splitlines()
        for number, line in enumerate(lines):
            match = COMMENT.match(line.strip())
            if match:
                rows = []
                for following in lines[number + 1:]:
                    if not following.startswith("|"):
                        break
                    rows.append(following)
                found.append((f"{page.relative_to(ROOT)}:{number + 1}", match.group(1), "\n".join(rows)))
    return found


TABLES = shown_tables()


def test_readme_and_the_results_page_show_generated_tables():
    where = {entry[0].split(":")[0] for entry in TABLES}
    assert "README.md" in where and "docs/results.md" in where, where


@pytest.mark.parametrize("where, command, shown", TABLES, ids=[entry[0] for entry in TABLES])
def test_shown_table_equals_its_command_output(where, command, shown):
    expected = load_benchmark("results_table.py").table_of_command(command, ROOT)
    assert shown == expected, f"{where}: the table differs from `{command}`; paste its output"


def test_paired_differences_use_only_the_seeds_both_variants_ran():
    results_table = load_benchmark("results_table.py")
    runs = {"albef": {"0": {"tr1": 1.0}, "1": {"tr1": 2.0}, "2": {"tr1": 4.0}, "3": {"tr1": 50.0}},
            "softmask": {"0": {"tr1": 2.0}, "1": {"tr1": 4.0}, "2": {"tr1": 5.0}}}
    # differences 1, 2, 1 (seed 3 has no pair): mean 1.33, std 0.577, t(0.975, 2 df) = 4.303, half-width 1.43
    assert results_table.paired_difference(runs["albef"], runs["softmask"], ("tr1",)) == "1.3 [-0.1, 2.8]"
    assert results_table.paired_difference(runs["albef"], {"0": {"tr1": 3.0}}, ("tr1",)) == "2.0"  # one pair
    assert results_table.paired_difference(runs["albef"], runs["softmask"], ("itm_all",)) == "-"
    study = {"summary": load_benchmark("world_study.py").summarise(runs), "runs": runs}
    text = results_table.table(study, "retrieval", ["softmask"], paired="albef")
    header = "| %, mean ± std over seeds | ALBEF (n=4) | SoftMask (n=3) | SoftMask - ALBEF, 95 % interval |"
    assert text.splitlines()[0] == header
    assert "| text R@1, re-ranked by ITM | 14.2 ± 23.9 | 3.7 ± 1.5 | 1.3 [-0.1, 2.8] |" in text


def test_a_paired_difference_takes_each_runs_own_first_key():
    results_table = load_benchmark("results_table.py")
    keys = ("train_loss_itm_pairs", "train_loss_itm")  # SoftMask logs its ordinary pairs apart; ALBEF has no other
    albef = {"0": {"train_loss_itm": 0.349}}
    softmask = {"0": {"train_loss_itm_pairs": 0.482, "train_loss_itm": 0.492}}
    assert results_table.paired_difference(albef, softmask, keys) == "0.133"


def test_seeds_keep_only_those_runs_and_recompute_the_summary():
    results_table = load_benchmark("results_table.py")
    runs = {"albef": {"0": {"tr1": 1.0}, "1": {"tr1": 3.0}, "2": {"tr1": 50.0}},
            "softmask": {"0": {"tr1": 2.0}, "1": {"tr1": 6.0}}, "focal_itc_only": {"2": {"tr1": 9.0}}}
    study = {"summary": load_benchmark("world_study.py").summarise(runs), "runs": runs}
    text = results_table.table(study, "retrieval", paired="albef", seeds=["0", "1"])
    assert text.splitlines()[0].startswith("| %, mean ± std over 2 seeds | ALBEF | SoftMask |")  # focal: no seed 0/1
    assert "| text R@1, re-ranked by ITM | 2.0 ± 1.4 | 4.0 ± 2.8 | 2.0 [-10.7, 14.7] |" in text
    assert "50" not in text and study["summary"]["albef"]["tr1"][2] == 3  # the study itself is unchanged
    text = results_table.table(study, "retrieval", paired="albef", seeds=["0", "1"], differences_only=True)
    assert text.splitlines()[0] == "| %, mean ± std over 2 seeds | ALBEF | SoftMask - ALBEF, 95 % interval |"
    assert "| text R@1, re-ranked by ITM | 2.0 ± 1.4 | 2.0 [-10.7, 14.7] |" in text
    with pytest.raises(ValueError, match="name the baseline"):
        results_table.table(study, "retrieval", differences_only=True)
    with pytest.raises(ValueError, match="no runs with seeds 7"):
        results_table.table(study, "retrieval", seeds=["7"])
