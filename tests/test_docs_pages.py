"""The user-facing pages as pages: README fits its budget, README, docs/ and BENCHMARKS.md name no
machine-local path and no development-process word, and docs/layout.md lists every benchmark script."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").rglob("*.md")),
         *sorted((ROOT / "docs" / "results").glob("*.json"))]
FORBIDDEN = re.compile(r"\bsessions? [0-9]|/tmp/|\bthis session\b|\bissue #?[0-9]", re.IGNORECASE)


def test_readme_fits_two_hundred_lines():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


def test_no_machine_paths_or_process_words_in_user_pages():
    found = [f"{page.relative_to(ROOT)}:{number}: {line.strip()[:80]}" for page in PAGES
             for number, line in enumerate(page.read_text().splitlines(), 1) if FORBIDDEN.search(line)]
    assert not found, "\n".join(found)


def test_layout_page_names_every_benchmark_script():
    layout = (ROOT / "docs" / "layout.md").read_text()
    missing = [p.name for p in sorted((ROOT / "benchmarks").iterdir()) if p.suffix in (".py", ".sh")
               and p.name not in layout]
    assert not missing, missing
