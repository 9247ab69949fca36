"""Markdown tables of a world study's results file (``docs/results/*.json``, the layout
``benchmarks/world_study.py`` writes: settings, summary, runs): mean ± sample std over seeds per variant,
one row per metric of a named row set.

    python benchmarks/results_table.py STUDY.json [--rows headline] [--variants albef,softmask,...]
        [--paired albef] [--seeds 0,1,2]

``--paired BASELINE`` adds, for every other variant, its mean paired difference from BASELINE over the
seeds both ran (the same seed trains both on the same world and encoder) with a 95 % Student's t interval.
``--seeds`` keeps only those seeds' runs (e.g. to compare variants over the seeds they all ran).

README.md and docs/results.md show its output, each table under an HTML comment holding the command
that made it (``<!-- results-table: python benchmarks/results_table.py ... -->``); the test of the
results files checks that every such table still equals the command's output. To show new results,
run the command on the new file and paste the table under a comment with the new command.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import shlex
import statistics
from pathlib import Path

NAMES = {"albef": "ALBEF", "softmask": "SoftMask", "soft_masks_only": "soft masks only",
         "focal_itc_only": "focal ITC only", "augmentation_only": "augmentation only",
         "softmask_masked_negatives": "SoftMask + masked negatives (ours)",
         "softmask_patch_embeddings": "SoftMask, masked positives only, on the patch embeddings",
         "softmask_all_patch_embeddings": "SoftMask, on the patch embeddings",
         "softmask_masked_positives": "SoftMask, masked positives only (the paper, as we read it)",
         "softmask_added": "SoftMask, masked_loss added", "softmask_without_masks": "SoftMask without soft masks"}
# Each row: the metric keys tried in order (the first a variant has is shown) and the row's label; no keys
# (None) is a row that says no variant has such a number. "Ordinary pairs" (an image with its caption and
# hard negatives) are all of ITM's pairs without soft masks.
ITM_PAIRS = ("train_loss_itm_pairs", "train_loss_itm")
ATTRIBUTES = ("colour", "shape", "size", "pattern", "relation")


def attribute_rows(key: str, label: str, attributes: tuple[str, ...] = ATTRIBUTES) -> list:
    """One row per attribute: ``key`` with ``{a}`` for the attribute, the first labelled ``label`` + attribute,
    the others "... attribute"."""
    return [((key.format(a=a),), (label if i == 0 else "... ") + a) for i, a in enumerate(attributes)]

ROWS = {
    "headline": [
        (ITM_PAIRS, "ITM training loss on ordinary pairs (prior 0.637; lower = learned)"),
        (("tr1",), "text R@1, ITC's top {k} re-ranked by ITM (chance 0.125)"),
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
    # The paper's question: does a method use more than the most salient object and attribute?
    "question": [
        (ITM_PAIRS, "ITM training loss, ordinary pairs"),
        (("itm_shortcut",), "`itm_shortcut`"),
        (("itm_salient",), "minimal edits by ITM, salient object"),
        (("itm_secondary",), "... secondary object"),
        (("itc_salient",), "minimal edits by ITC, salient object"),
        (("itc_secondary",), "... secondary object"),
        *attribute_rows("itm_attr_{a}", "ITM edits: "),
        *attribute_rows("itc_attr_{a}", "ITC edits: "),
        (("pointing_salient",), "pointing game, salient objects"),
        (("pointing_secondary",), "... secondary objects"),
        (("tr1",), "text R@1 re-ranked by ITM"),
        (("itc_tr1",), "text R@1, ITC alone"),
        (("ir1",), "image R@1 re-ranked by ITM"),
        (("itc_ir1",), "image R@1, ITC alone"),
        *attribute_rows("mlm_{a}_gap", "MLM own minus shuffled image: "),
    ],
    # The readings of the soft masks: the shortcut, whether ordinary pairs are learned, and what it buys.
    "readings": [
        (ITM_PAIRS, "ITM training loss, ordinary pairs (prior 0.637)"),
        (("train_loss_itm_soft",), "ITM training loss, soft-masked pairs"),
        (("itm_shortcut",), "`itm_shortcut`"),
        (("itm_all",), "minimal edits by ITM, all"),
        (("itm_secondary",), "... secondary object"),
        (("pointing_all",), "pointing game, all"),
        (("pointing_secondary",), "... secondary objects"),
        (("tr1",), "text R@1 re-ranked by ITM"),
        (("itc_tr1",), "text R@1, ITC alone"),
        (("ir1",), "image R@1 re-ranked by ITM"),
        (("itc_ir1",), "image R@1, ITC alone"),
        *attribute_rows("mlm_{a}_gap", "MLM own minus shuffled image: ", ATTRIBUTES[:4]),
    ],
    # Whether ITM learned ordinary pairs: in training (each recipe its own, augmented batches) and on the same
    # unaugmented test pairs for every model (the test loss's negatives come from each model's ITC).
    "ordinary": [
        (ITM_PAIRS, "ITM training loss, ordinary pairs (prior 0.637)"),
        (("itm_test_loss",), "ITM loss on the test split's ordinary pairs (prior 0.637)"),
        (("itm_test_accuracy",), "... pairs labelled right (a head at the prior: 66.7)"),
        (("itm_shortcut",), "`itm_shortcut`"),
        (("itm_all",), "minimal edits by ITM, all"),
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


def digits(key: str) -> int:
    """Decimals a metric is shown with: losses 3, ``itm_shortcut`` (a difference of probabilities) 2, % 1."""
    return 3 if key.startswith("train_") or key == "itm_test_loss" else 2 if key == "itm_shortcut" else 1


def cell(summary: dict, keys: tuple[str, ...] | None) -> str:
    """``mean ± std`` of the first of ``keys`` in a variant's summary (losses to 0.001, % to 0.1; the value
    alone for one seed), - when the variant has none of them, "not measured" for no keys."""
    if keys is None:
        return "not measured"
    key = next((k for k in keys if k in summary), None)
    if key is None:
        return "-"
    mean, std, n = summary[key]
    d = digits(key)
    return f"{mean:.{d}f}" if n == 1 else f"{mean:.{d}f} ± {std:.{d}f}"


def paired_difference(baseline: dict[str, dict], other: dict[str, dict], keys: tuple[str, ...] | None) -> str:
    """``mean [low, high]``: ``other - baseline`` over the seeds both ran (per-run metrics keyed by seed), with
    its 95 % Student's t interval (n - 1 degrees of freedom); the mean alone for one seed, - for none. Each
    run's value is its first of ``keys`` (as :func:`cell` shows it): e.g. a SoftMask run's ordinary-pair
    ITM loss against ALBEF's ITM loss, which has no other pairs."""
    from scipy import stats

    if keys is None:
        return "not measured"

    def value(metrics: dict) -> tuple[str, float] | None:
        key = next((k for k in keys or () if k in metrics), None)
        return None if key is None else (key, metrics[key])

    pairs = [(value(baseline[s]), value(other[s])) for s in baseline if s in other]
    diffs = [(b[0], o[1] - b[1]) for b, o in pairs if b is not None and o is not None]
    if not diffs:
        return "-"
    d = digits(diffs[0][0])
    values = [diff for _, diff in diffs]
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{d}f}"
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return f"{mean:.{d}f} [{mean - half:.{d}f}, {mean + half:.{d}f}]"


def only_seeds(study: dict, seeds: list[str]) -> dict:
    """``study`` with only the runs of ``seeds`` (as the results file names them, e.g. "0") and its summary
    recomputed from them; a variant without any of them is left out."""
    spec = importlib.util.spec_from_file_location("world_study", Path(__file__).with_name("world_study.py"))
    world_study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(world_study)
    runs = {variant: {s: m for s, m in per_seed.items() if s in seeds} for variant, per_seed in study["runs"].items()}
    runs = {variant: per_seed for variant, per_seed in runs.items() if per_seed}
    if not runs:
        raise ValueError(f"no runs with seeds {', '.join(seeds)}")
    return {**study, "runs": runs, "summary": world_study.summarise(runs)}


def table(study: dict, rows: str = "headline", variants: list[str] | None = None, paired: str = "",
          seeds: list[str] | None = None, differences_only: bool = False) -> str:
    """The markdown table of ``study`` (a parsed results file) for the row set ``rows``; with ``paired`` (a
    variant), one more column per other variant: its paired difference from ``paired`` (with
    ``differences_only``, instead of that variant's own column); with ``seeds``, only those seeds' runs."""
    if seeds:
        study = only_seeds(study, seeds)
    summary = study["summary"]
    variants = variants or list(summary)
    missing = [v for v in [*variants, *([paired] if paired else [])] if v not in summary]
    if missing:
        raise ValueError(f"variants not in this study: {', '.join(missing)} (it has {', '.join(summary)})")
    if differences_only and not paired:
        raise ValueError("differences only: name the baseline with --paired")
    if paired:
        variants = [paired, *(v for v in variants if v != paired)]
    others = variants[1:] if paired else []
    shown = variants[:1] if differences_only else variants
    seeds = {v: max(n for _, _, n in summary[v].values()) for v in variants}
    same = len(set(seeds.values())) == 1
    n = seeds[variants[0]]
    corner = (f"%, mean ± std over {n} seeds" if n > 1 else "%, seed " + next(iter(study["runs"][variants[0]]))
              ) if same else "%, mean ± std over seeds"
    header = [NAMES.get(v, v) + ("" if same else f" (n={seeds[v]})") for v in shown]
    header += [f"{NAMES.get(v, v)} - {NAMES.get(paired, paired)}, 95 % interval" for v in others]
    lines = [f"| {corner} | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    for keys, label in ROWS[rows]:
        label = label.format(k=study.get("settings", {}).get("k", "k"))  # "{k}": the candidates re-ranked
        cells = [cell(summary[v], keys) for v in shown]
        cells += [paired_difference(study["runs"][paired], study["runs"][v], keys) for v in others]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", help="a results file (docs/results/*.json)")
    parser.add_argument("--rows", choices=list(ROWS), default="headline", help="which metrics (default headline)")
    parser.add_argument("--variants", default="", help="comma-separated variants in order (default: all)")
    parser.add_argument("--paired", default="", metavar="BASELINE",
                        help="add each other variant's paired difference from this one, with its 95 %% interval")
    parser.add_argument("--seeds", default="", help="comma-separated seeds: only their runs (default: all)")
    parser.add_argument("--differences-only", action="store_true",
                        help="with --paired: the baseline's column and the differences, not the other variants' own")
    return parser.parse_args(argv)


def table_of_args(args: argparse.Namespace, study: dict) -> str:
    """The table the parsed command line ``args`` asks of ``study``."""
    return table(study, args.rows, [v for v in args.variants.split(",") if v] or None, args.paired,
                 [s for s in args.seeds.split(",") if s] or None, args.differences_only)


def table_of_command(command: str, root: Path) -> str:
    """The table a ``python benchmarks/results_table.py ...`` command line prints, paths from ``root``."""
    words = shlex.split(command)
    args = parse_args(words[words.index("benchmarks/results_table.py") + 1:])
    return table_of_args(args, json.loads((root / args.study).read_text()))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    study = json.loads(Path(args.study).read_text())
    try:
        print(table_of_args(args, study))
    except ValueError as err:  # a variant or seeds the study does not hold
        raise SystemExit(f"results_table.py: {args.study}: {err}") from None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
