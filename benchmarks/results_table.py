"""Markdown tables of a world study's results file (``docs/results/*.json``, the layout
``benchmarks/world_study.py`` writes: settings, summary, runs): mean ± sample std over seeds per variant,
one row per metric of a named row set.

    python benchmarks/results_table.py STUDY.json [--rows headline] [--variants albef,softmask,...]

README.md and docs/results.md show its output, each table under an HTML comment holding the command
that made it (``<!-- results-table: python benchmarks/results_table.py ... -->``); the test of the
results files checks that every such table still equals the command's output. To show new results,
run the command on the new file and paste the table under a comment with the new command.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

NAMES = {"albef": "ALBEF", "softmask": "SoftMask", "soft_masks_only": "soft masks only",
         "focal_itc_only": "focal ITC only", "augmentation_only": "augmentation only",
         "softmask_masked_negatives": "SoftMask + masked negatives (ours)",
         "softmask_patch_embeddings": "SoftMask, masks on the patch embeddings",
         "softmask_masked_positives": "SoftMask, masked positives only (the paper, as we read it)"}
# Each row: the metric keys tried in order (the first a variant has is shown) and the row's label; no keys
# (None) is a row that says no variant has such a number. "Ordinary pairs" (an image with its caption and
# hard negatives) are all of ITM's pairs without soft masks.
ITM_PAIRS = ("train_loss_itm_pairs", "train_loss_itm")
ROWS = {
    "headline": [
        (ITM_PAIRS, "ITM training loss on ordinary pairs (prior 0.637; lower = learned)"),
        (("tr1",), "text R@1, ITC's top 16 re-ranked by ITM (chance 0.125)"),
        (("ir1",), "image R@1, re-ranked (chance 0.125)"),
        (("itm_all",), "minimal edits rejected by ITM (chance 50)"),
        (("itm_attr_colour",), "... colour edits"),
        (("itm_attr_shape",), "... shape edits"),
        (("pointing_all",), "pointing game: word Grad-CAM peak in the named object's box"),
        (("pointing_secondary",), "... secondary objects"),
        (None, "real benchmarks (COCO, Flickr30K, VQA, NLVR2, SNLI-VE)"),
    ],
    "itm": [
        (ITM_PAIRS, "ITM training loss, ordinary pairs (prior 0.637)"),
        (("train_loss_itm",), "ITM training loss, all pairs"),
        (("train_loss_itm_soft",), "ITM training loss, soft-masked pairs"),
        (("itm_all",), "minimal edits by ITM, all"),
        (("itm_attr_colour",), "... colour"),
        (("train_loss_itc",), "ITC training loss"),
    ],
    "objects": [
        (("itc_salient",), "minimal edits by ITC, salient object edited"),
        (("itc_secondary",), "... secondary object edited"),
        (("itm_salient",), "minimal edits by ITM, salient object edited"),
        (("itm_secondary",), "... secondary object edited"),
        (("pointing_salient",), "pointing game, salient objects"),
        (("pointing_secondary",), "... secondary objects"),
        (("energy_secondary",), "Grad-CAM energy in the box, secondary objects"),
    ],
    "attributes": [
        (("itm_attr_colour",), "minimal edits by ITM: colour"),
        (("itm_attr_shape",), "... shape"),
        (("itm_attr_size",), "... size"),
        (("itm_attr_pattern",), "... pattern"),
        (("itm_attr_relation",), "... relation"),
        (("itc_attr_colour",), "minimal edits by ITC: colour"),
        (("itc_attr_shape",), "... shape"),
    ],
    "retrieval": [
        (("tr1",), "text R@1, re-ranked by ITM"),
        (("itc_tr1",), "text R@1, ITC alone"),
        (("ir1",), "image R@1, re-ranked by ITM"),
        (("itc_ir1",), "image R@1, ITC alone"),
        (("tr10",), "text R@10, re-ranked"),
        (("ir10",), "image R@10, re-ranked"),
    ],
}


def cell(summary: dict, keys: tuple[str, ...] | None) -> str:
    """``mean ± std`` of the first of ``keys`` in a variant's summary (losses to 0.001, % to 0.1; the value
    alone for one seed), - when the variant has none of them, "not measured" for no keys."""
    if keys is None:
        return "not measured"
    key = next((k for k in keys if k in summary), None)
    if key is None:
        return "-"
    mean, std, n = summary[key]
    digits = 3 if key.startswith("train_") else 1
    return f"{mean:.{digits}f}" if n == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def table(study: dict, rows: str = "headline", variants: list[str] | None = None) -> str:
    """The markdown table of ``study`` (a parsed results file) for the row set ``rows``."""
    summary = study["summary"]
    variants = variants or list(summary)
    missing = [v for v in variants if v not in summary]
    if missing:
        raise ValueError(f"variants not in this study: {', '.join(missing)} (it has {', '.join(summary)})")
    seeds = {v: max(n for _, _, n in summary[v].values()) for v in variants}
    same = len(set(seeds.values())) == 1
    corner = f"%, mean ± std over {seeds[variants[0]]} seeds" if same else "%, mean ± std over seeds"
    header = [NAMES.get(v, v) + ("" if same else f" (n={seeds[v]})") for v in variants]
    lines = [f"| {corner} | " + " | ".join(header) + " |", "|---" * (len(variants) + 1) + "|"]
    for keys, label in ROWS[rows]:
        lines.append(f"| {label} | " + " | ".join(cell(summary[v], keys) for v in variants) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", help="a results file (docs/results/*.json)")
    parser.add_argument("--rows", choices=list(ROWS), default="headline", help="which metrics (default headline)")
    parser.add_argument("--variants", default="", help="comma-separated variants in order (default: all)")
    return parser.parse_args(argv)


def table_of_command(command: str, root: Path) -> str:
    """The table a ``python benchmarks/results_table.py ...`` command line prints, paths from ``root``."""
    words = shlex.split(command)
    args = parse_args(words[words.index("benchmarks/results_table.py") + 1:])
    study = json.loads((root / args.study).read_text())
    return table(study, args.rows, [v for v in args.variants.split(",") if v] or None)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    study = json.loads(Path(args.study).read_text())
    print(table(study, args.rows, [v for v in args.variants.split(",") if v] or None))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
