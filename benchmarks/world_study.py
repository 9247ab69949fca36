"""The world study: ALBEF vs SoftMask vs each SoftMask part alone, several seeds, same budget.

    python benchmarks/world_study.py --out runs/study [--world DIR | --images 10000 --size 64]
        [--config configs/pretrain/world.yaml] [--variants albef,softmask,...] [--seeds 0,1,2]
        [--steps N | --budget-s SECONDS] [--parallel P] [--k 16] [--grounding-captions 500]
        [--mlm-captions 600] [--shortcut-pairs 200] [key=value ...]

Every (variant, seed) pretrains with `softmask pretrain` in its own process (P at a time, sharing the
machine), then `softmask evaluate world` scores it on the world's test split (``--k`` and the three counts
are its options of the same names). With ``--budget-s``
the number of steps is chosen first: all runs go for ``--calibrate-steps`` steps side by side, and the
slowest run's step time sets the steps that fit the budget (the same for every run). Writes
``OUT/study.json`` (settings, per-run metrics, mean and sample standard deviation per variant) and
``OUT/study.md`` (the table and the commands).

    python benchmarks/world_study.py --out OUT --merge A/study.json B/study.json ...

combines studies trained the same way (same config file name, world, steps, k and overrides apart from
logging; e.g. more seeds or variants run later) into one ``OUT/study.json`` and ``OUT/study.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from softmask.config import ConfigError, merge_overrides, override_key, refuse_repeated_keys
from softmask.side_by_side import run_side_by_side, softmask_command
from softmask.world.vocab import EDIT_ATTRIBUTES

ROOT = Path(__file__).resolve().parents[1]

# Each variant's overrides on top of the config (method albef = every SoftMask switch off).
VARIANTS = {
    "albef": ["method=albef"],
    "softmask": ["method=softmask"],
    "soft_masks_only": ["method=albef", "softmask.soft_masks=true"],
    "focal_itc_only": ["method=albef", "itc.gamma=2.0"],
    "augmentation_only": ["method=albef", "softmask.text_masking=true", "softmask.image_distortion=true"],
    # The readings of the soft masks (docs/method.md): which ITM pairs they enter (the default, "all", is
    # `softmask` above) and where they are applied.
    "softmask_masked_positives": ["method=softmask", "softmask.masked_pairs=positives"],
    "softmask_patch_embeddings": ["method=softmask", "softmask.masked_pairs=positives",
                                  "softmask.apply_to=patch_embeddings"],
    "softmask_masked_negatives": ["method=softmask", "softmask.masked_pairs=negative_captions"],
    "softmask_all_patch_embeddings": ["method=softmask", "softmask.apply_to=patch_embeddings"],
    "softmask_added": ["method=softmask", "softmask.masked_loss=added"],
    # SoftMask without its soft masks (focal ITC and the augmentation): what a reading of the masks adds to.
    "softmask_without_masks": ["method=softmask", "softmask.soft_masks=false"],
}
DEFAULT_VARIANTS = ("albef", "softmask", "soft_masks_only", "focal_itc_only", "augmentation_only")
# The metrics of the table, in order (keys of `softmask evaluate world`).
# Training metrics averaged over the last logged steps of each run, added to its metrics as train_<key>.
# loss_itm_pairs: ITM on ordinary pairs only (positives and hard negatives; logged when soft masks add pairs).
TRAIN_KEYS = ("loss_itc", "loss_itm", "loss_itm_pairs", "loss_itm_soft", "loss_mlm", "temp")
TABLE_KEYS = ("tr1", "tr5", "tr10", "ir1", "ir5", "ir10", "r_mean", "itc_tr1", "itc_tr10", "itc_ir1", "itc_ir10",
              "itc_r_mean", "itm_all", "itm_salient", "itm_secondary",
              "itm_heldout", *(f"itm_attr_{a}" for a in EDIT_ATTRIBUTES), "itc_all", "itc_salient", "itc_secondary",
              "itc_heldout", *(f"itc_attr_{a}" for a in EDIT_ATTRIBUTES), "pointing_all", "pointing_salient",
              "pointing_secondary", "energy_all", "energy_salient", "energy_secondary",
              "itm_shortcut", "itm_mismatched_masked", "itm_mismatched", "itm_masked_own",
              *(f"mlm_{g}_{c}" for g in ("colour", "shape", "size", "pattern", "relation")
                for c in ("right", "shuffled", "gap")),
              *(f"train_{k}" for k in TRAIN_KEYS))
# Keys the study sets for every run itself (from its options).
OWNED_KEYS = ("world", "seed", "output_dir", "train.max_steps", "method", "resume")
# Overrides that change what is logged or saved, not what is trained: studies may differ in them and still merge.
LOGGING_KEYS = ("train.log_every", "train.save_every")


def pretrain_commands(args, runs: list[tuple[str, int]], out: Path, steps: int, extra: list[str]):
    commands = []
    for variant, seed in runs:
        run_dir = out / f"{variant}_s{seed}"
        # A rerun after Ctrl-C continues each run from its checkpoint (resume=auto); a finished run stays finished.
        overrides = merge_overrides([f"world={args.world}", *VARIANTS[variant], f"seed={seed}", f"output_dir={run_dir}",
                                     f"train.max_steps={steps}", f"train.save_every={steps}", "resume=auto"],
                                    extra, args.overrides)
        commands.append((softmask_command("pretrain", "--config", args.config, *overrides),
                         run_dir.with_suffix(".log")))
    return commands


def step_seconds(run_dir: Path, batch_size: int) -> float:
    """The median seconds per step over a run's logged intervals after the first (metrics.jsonl)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [row["pairs_per_s"] for row in rows[1:]] or [row["pairs_per_s"] for row in rows]
    return batch_size / statistics.median(rates)


def training_summary(run_dir: Path, last: int = 3) -> dict[str, float]:
    """``train_<key>``: the mean of each of TRAIN_KEYS over the run's last ``last`` logged steps."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    tail = rows[-last:]
    return {f"train_{key}": statistics.fmean(row[key] for row in tail) for key in TRAIN_KEYS
            if tail and all(key in row for row in tail)}


def calibrate(args, runs, env) -> tuple[int, dict]:
    """Steps that fit ``--budget-s`` when all runs share the machine as they will."""
    from softmask.config import load_config

    batch = load_config(args.config, [f"world={args.world}", *args.overrides]).train.batch_size
    out = Path(args.out) / "calibration"
    steps = args.calibrate_steps
    start = time.perf_counter()
    codes = run_side_by_side(pretrain_commands(args, runs, out, steps, ["train.log_every=10"]), args.parallel, env,
                             cwd=ROOT)
    if any(codes):
        raise SystemExit(f"calibration runs failed (codes {codes}); see the logs in {out}")
    wall = time.perf_counter() - start
    per_step = max(step_seconds(out / f"{v}_s{s}", batch) for v, s in runs)
    overhead = max(0.0, wall - per_step * steps)  # start-up, saving: paid again by the real runs
    fit = int((args.budget_s - overhead) / per_step)
    fit = max(args.calibrate_steps, fit // 50 * 50)
    info = {"calibration_steps": steps, "calibration_wall_s": round(wall, 1),
            "slowest_step_s": round(per_step, 4), "startup_s": round(overhead, 1), "steps_chosen": fit}
    print(f"calibration: {json.dumps(info)}", flush=True)
    return fit, info


def summarise(per_run: dict[str, dict[str, dict]]) -> dict[str, dict[str, list[float]]]:
    """{variant: {metric: [mean, std, n]}} over the seeds (sample std; 0 with one seed)."""
    summary = {}
    for variant, seeds in per_run.items():
        summary[variant] = {}
        for key in sorted({k for metrics in seeds.values() for k in metrics}):
            values = [metrics[key] for metrics in seeds.values() if key in metrics]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            summary[variant][key] = [statistics.fmean(values), std, len(values)]
    return summary


def table(summary: dict, keys=TABLE_KEYS) -> str:
    """Markdown: one row per metric, ``mean ± std`` per variant (percentages to 0.1, training metrics to 0.001)."""
    variants = list(summary)
    header = [f"{v} (n={max((cell[2] for cell in summary[v].values()), default=0)})" for v in variants]
    lines = ["| metric | " + " | ".join(header) + " |", "|---" * (len(variants) + 1) + "|"]
    for key in keys:
        if not any(key in summary[v] for v in variants):
            continue
        digits = 3 if key.startswith("train_") else 1
        cells = [f"{summary[v][key][0]:.{digits}f} ± {summary[v][key][1]:.{digits}f}" if key in summary[v] else "-"
                 for v in variants]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def training_settings(settings: dict) -> dict:
    """What must agree for two studies' runs to be comparable: everything but seeds, variants and logging."""
    overrides = [o for o in settings["overrides"] if o.split("=", 1)[0] not in LOGGING_KEYS]
    return {"config": Path(settings["config"]).name, "world": settings["world"], "steps": settings["steps"],
            "k": settings["k"], "evaluation": settings.get("evaluation"), "overrides": overrides}


def merge_studies(paths: list[Path]) -> tuple[dict, dict[str, dict[str, dict]]]:
    """Combine the runs of several ``study.json`` files made with the same settings (e.g. more seeds later).

    Returns ``(settings, per_run)`` as a single study would have them; raises ``ValueError`` naming the
    file when a study was trained differently from the first or repeats a (variant, seed).
    """
    first = first_config = None
    per_run: dict[str, dict[str, dict]] = {}
    variants: dict[str, list[str]] = {}
    sources, failed = [], []
    for path in paths:
        try:
            study = json.loads(Path(path).read_text())
            settings = study["settings"]
            own = training_settings(settings)
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: not a study.json written by world_study.py ({err!r})") from None
        if first is None:
            first, first_config = own, settings["config"]
        for key, value in own.items():
            if value != first[key]:
                raise ValueError(f"{path}: {key} is {value!r}, but {paths[0]} has {first[key]!r}; "
                                 "only studies trained the same way can be merged")
        for variant, seeds in study["runs"].items():
            for seed, metrics in seeds.items():
                if seed in per_run.get(variant, {}):
                    raise ValueError(f"{path}: run {variant} seed {seed} is also in an earlier study")
                run_dir = Path(path).parent / f"{variant}_s{seed}"
                if (run_dir / "metrics.jsonl").is_file():  # training keys a study written before TRAIN_KEYS lacks
                    metrics = {**training_summary(run_dir), **metrics}
                per_run.setdefault(variant, {})[seed] = metrics
        variants.update(settings["variants"])
        failed += settings.get("failed_runs", [])
        # A merged study brings the studies it was merged from, so that a merge of merges keeps every source.
        sources += settings.get("merged_from") or [{
            "study": str(path), "variants": list(settings["variants"]), "seeds": settings["seeds"],
            "overrides": settings["overrides"], "train_wall_s": settings.get("train_wall_s"),
            "total_wall_s": settings.get("total_wall_s")}]
    if first is None:
        raise ValueError("no studies to merge")
    order = [v for v in VARIANTS if v in per_run] + [v for v in per_run if v not in VARIANTS]
    per_run = {v: dict(sorted(per_run[v].items(), key=lambda item: int(item[0]))) for v in order}
    seeds = sorted({int(s) for runs in per_run.values() for s in runs})
    settings = {**first, "config": first_config,
                "variants": {v: variants[v] for v in order if v in variants}, "seeds": seeds,
                "failed_runs": failed, "merged_from": sources}
    return settings, per_run


def write_study(out: Path, settings: dict, per_run: dict[str, dict[str, dict]], command: str) -> None:
    """``OUT/study.json`` (settings, per-run metrics, summary) and ``OUT/study.md`` (the table), printed too."""
    summary = summarise(per_run)
    (out / "study.json").write_text(json.dumps({"settings": settings, "summary": summary, "runs": per_run},
                                               indent=2))
    seeds = {v: sorted(int(s) for s in runs) for v, runs in per_run.items()}
    (out / "study.md").write_text(f"# World study\n\n`{command}`\n\n{settings['steps']} steps per run; "
                                  f"seeds per variant {seeds}; mean ± sample std over seeds.\n\n"
                                  f"{table(summary)}\n")
    print(table(summary))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--world", default="", help="a `softmask world` folder (default: generate OUT/world)")
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--world-seed", type=int, default=0)
    parser.add_argument("--max-objects", type=int, default=4, help="objects per image at most (1 = the easiest world)")
    parser.add_argument("--config", default=str(ROOT / "configs" / "pretrain" / "world.yaml"))
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=0, help="training steps per run (or --budget-s)")
    parser.add_argument("--budget-s", type=float, default=0.0, help="wall seconds for all training runs")
    parser.add_argument("--calibrate-steps", type=int, default=40)
    parser.add_argument("--parallel", type=int, default=0, help="runs at a time (default: all)")
    parser.add_argument("--k", type=int, default=16, help="retrieval candidates re-ranked by ITM")
    parser.add_argument("--grounding-captions", type=int, default=500, help="test captions the grounding "
                        "metrics score (`softmask evaluate world`'s option)")
    parser.add_argument("--mlm-captions", type=int, default=600, help="test captions per word group for what "
                        "the fusion reads")
    parser.add_argument("--shortcut-pairs", type=int, default=200, help="mismatched pairs that score the ITM "
                        "shortcut")
    parser.add_argument("--merge", nargs="+", default=[], metavar="STUDY_JSON",
                        help="instead of training: combine these study.json files (same settings) into OUT")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    args = parser.parse_args()
    if args.merge:
        try:
            settings, per_run = merge_studies([Path(p) for p in args.merge])
        except ValueError as err:
            parser.error(str(err))
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_study(out, settings, per_run, " ".join(["python", *sys.argv]))
        return 0

    try:
        refuse_repeated_keys(args.overrides)
    except ConfigError as err:
        parser.error(str(err))
    owned = [o for o in args.overrides if override_key(o) in OWNED_KEYS]
    if owned:
        parser.error(f"{owned[0]}: the study sets {override_key(owned[0])} itself (--world, --seeds, --steps, "
                     "--variants, --out)")
    for name in ("k", "grounding_captions", "mlm_captions", "shortcut_pairs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    runs = [(v, s) for v in variants for s in seeds]
    args.parallel = args.parallel or len(runs)
    if bool(args.steps) == bool(args.budget_s):
        parser.error("give exactly one of --steps and --budget-s")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    args.out = str(out)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    if not args.world:
        args.world = str(out / "world")
        cmd = softmask_command("world", "--out", args.world, "--images", str(args.images), "--size", str(args.size),
                           "--seed", str(args.world_seed), "--workers", str(min(16, os.cpu_count() or 1)),
                           "--max-objects", str(args.max_objects))
        subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    settings = {"config": args.config, "world": args.world, "variants": {v: VARIANTS[v] for v in variants},
                "seeds": seeds, "overrides": args.overrides, "parallel": args.parallel, "k": args.k,
                "evaluation": {"grounding_captions": args.grounding_captions, "mlm_captions": args.mlm_captions,
                               "shortcut_pairs": args.shortcut_pairs}}
    steps = args.steps
    if args.budget_s:
        steps, settings["calibration"] = calibrate(args, runs, env)
    settings["steps"] = steps
    train_start = time.perf_counter()
    codes = run_side_by_side(pretrain_commands(args, runs, out, steps, []), args.parallel, env, cwd=ROOT)
    settings["train_wall_s"] = round(time.perf_counter() - train_start, 1)
    evals = []
    for (variant, seed), code in zip(runs, codes, strict=True):
        run_dir = out / f"{variant}_s{seed}"
        if code == 0:
            evals.append((softmask_command("evaluate", "world", "--checkpoint", str(run_dir), "--world", args.world,
                                       "--k", str(args.k), "--grounding-captions", str(args.grounding_captions),
                                       "--mlm-captions", str(args.mlm_captions),
                                       "--shortcut-pairs", str(args.shortcut_pairs),
                                       "--json", str(run_dir / "eval_world.json")),
                          run_dir / "eval.log"))
    run_side_by_side(evals, args.parallel, env, cwd=ROOT)
    per_run: dict[str, dict[str, dict]] = {}
    failed = []
    for variant, seed in runs:
        result = out / f"{variant}_s{seed}" / "eval_world.json"
        if result.is_file():
            per_run.setdefault(variant, {})[str(seed)] = {**json.loads(result.read_text()),
                                                           **training_summary(result.parent)}
        else:
            failed.append(f"{variant}_s{seed}")
    settings["total_wall_s"] = round(time.perf_counter() - started, 1)
    settings["failed_runs"] = failed
    write_study(out, settings, per_run, " ".join(["python", *sys.argv]))
    print(json.dumps({"steps": steps, "failed_runs": failed, "total_wall_s": settings["total_wall_s"]}))
    return 1 if failed else 0


def interruptible_main() -> int:
    """main(), with Ctrl-C (or SIGTERM) ending in one line: the training children got the signal too,
    finished their step and saved a checkpoint; the same command again continues them."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return main()
    except KeyboardInterrupt:
        print("world_study: stopped; the training runs saved checkpoints: run the same command again to continue",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(interruptible_main())
