"""``softmask demo`` (what ``make demo`` runs): generate a synthetic world, pretrain the tiny model twice
(``method: albef`` and ``method: softmask``, same seed and budget, side by side in two processes),
evaluate both on the world's test split, and write ``OUT/report.md`` with the metrics side by side, a
loss-curve plot and Grad-CAM grids comparing what the two models look at.

With its defaults the demo is seed 0 of the CPU study in docs/results.md (the same world, recipe and
budget): the smallest setting in which we saw the tiny model align images with text.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import time
from pathlib import Path

from softmask.config import load_config
from softmask.side_by_side import run_side_by_side, softmask_command, threads_per_process
from softmask.train.loop import TrainingError
from softmask.world.vocab import EDIT_ATTRIBUTES

log = logging.getLogger("softmask")

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "pretrain" / "tiny.yaml"
METHODS = ("albef", "softmask")
# As configs/pretrain/world.yaml: mean-pooled text features (the tiny model's random [CLS] is nearly one
# vector for every caption, docs/results.md), no flips (captions say "left of"), crops that keep most of
# the scene, none of RandAugment's colour-changing operations (colours are what captions name).
WORLD_OVERRIDES = ("model.text_pooling=mean", "data.augment.hflip=false", "data.augment.crop_scale=[0.8,1.0]",
                   "data.augment.randaug_exclude=[auto_contrast,equalize,brightness]")
# The CPU study's recipe on top of tiny.yaml (docs/results.md): a larger learning rate and queue.
RECIPE_OVERRIDES = ("train.lr_peak=1e-3", "itc.queue_size=1024")
# The defaults of run_demo, which are the CPU study's seed 0 (its world is `softmask world --seed 5`).
DEFAULTS = {"images": 8000, "size": 64, "steps": 600, "batch_size": 64, "seed": 0, "world_seed": 5}
REPORT_KEYS = [
    ("tr1", "text retrieval R@1"), ("tr10", "text retrieval R@10"), ("ir1", "image retrieval R@1"),
    ("ir10", "image retrieval R@10"), ("r_mean", "retrieval mean recall"),
    ("itc_tr10", "text retrieval R@10, ITC alone"), ("itc_ir10", "image retrieval R@10, ITC alone"),
    ("itm_all", "minimal edits, ITM"), ("itm_salient", "  ... edited object salient"),
    ("itm_secondary", "  ... edited object secondary"), ("itm_heldout", "  ... held-out combination"),
    ("itc_all", "minimal edits, ITC"), ("itc_salient", "  ... edited object salient"),
    ("itc_secondary", "  ... edited object secondary"), ("itc_heldout", "  ... held-out combination"),
    *((f"itc_attr_{a}", f"  ... {a} edited") for a in EDIT_ATTRIBUTES),
    ("pointing_all", "pointing game"), ("pointing_secondary", "  ... secondary objects"),
    ("energy_all", "energy in box"), ("energy_secondary", "  ... secondary objects"),
]


def plot_losses(runs: dict[str, Path], out: Path) -> Path:
    """loss, loss_itc, loss_itm, loss_mlm against step for every run, one panel each."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3))
    keys = ("loss", "loss_itc", "loss_itm", "loss_mlm")
    for panel, key in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), panel + 1)
        for name, run in runs.items():
            rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=name)
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.axes[0].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    return out


def _report(out: Path, runs: dict[str, Path], metrics: dict[str, dict], figures: list[Path], settings: dict,
            commands: list[list[str]], test_images: int, seconds: float) -> Path:
    """``OUT/report.md``: the settings, the metrics side by side, the figures and the exact commands."""
    lines = [
        "# softmask demo", "",
        f"A synthetic world of {settings['images']} images ({settings['size']} px, world seed "
        f"{settings['world_seed']}), the tiny model pretrained for {settings['steps']} steps of "
        f"{settings['batch_size']} pairs with each method (seed {settings['seed']}), evaluated on the world's "
        f"test split ({test_images} images). Total time {seconds / 60:.1f} min.", "",
    ]
    if {k: settings[k] for k in DEFAULTS} == DEFAULTS and not settings["overrides"]:
        lines += ["These are the settings of seed 0 of the CPU study in `docs/results.md`. There, over 3 seeds, "
                  "both methods begin to align images and text almost only through colour (distractors that "
                  "change a colour are rejected far more often than any other), ITM has not started, and "
                  "SoftMask makes no measurable difference to what is aligned at this budget.", ""]
    lines += [
        "Read with care: one seed, a tiny model trained for minutes from random initialisation; differences "
        "smaller than a few points are within what another seed would change.", "",
        "| metric (%) | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs),
    ]
    for key, label in REPORT_KEYS:
        if all(key in m for m in metrics.values()):
            lines.append(f"| {label} | " + " | ".join(f"{metrics[name][key]:.1f}" for name in runs) + " |")
    lines += ["", f"Chance: minimal edits 50; retrieval R@1 {100 / max(1, test_images):.2f}, R@10 "
              f"{min(100.0, 1000 / max(1, test_images)):.2f} (one right answer among {test_images} images; "
              "text retrieval counts any of the image's captions).", "",
              "## Training losses", "", "![losses](losses.png)", "", "## Where the models look", "",
              "Word Grad-CAM of each model (rows) for each word of a test caption (columns). A panel of one "
              "flat colour is an all-zero map: no patch has positive Grad-CAM evidence for that word "
              "(frequent while ITM is untrained, more so with soft masks; docs/results.md).", ""]
    lines += [f"![gradcam]({fig.relative_to(out)})" for fig in figures]
    lines += ["", "## Reproduce", "", "```"]
    for cmd in commands:
        args = cmd[cmd.index("softmask") + 1:]
        lines.append(shlex.join(["softmask", *(args[1:] if args[:1] == ["-q"] else args)]))
    lines += ["```", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


class _Progress:
    """Logs each run's last logged step, a few losses and the time left, from its metrics.jsonl."""

    def __init__(self, runs: dict[str, Path], steps: int, batch_size: int):
        self.runs, self.steps, self.batch_size = runs, steps, batch_size

    def __call__(self) -> None:
        parts, left = [], 0.0
        for name, run in self.runs.items():
            row = _last_row(run / "metrics.jsonl")
            if row is None:
                parts.append(f"{name}: starting")
                continue
            parts.append(f"{name}: step {row['step']}/{self.steps} (ITC {row['loss_itc']:.2f}, "
                         f"ITM {row['loss_itm']:.3f})")
            if row.get("pairs_per_s"):
                left = max(left, (self.steps - row["step"]) * self.batch_size / row["pairs_per_s"])
        log.info("  " + " | ".join(parts) + (f"; about {left / 60:.0f} min left" if left else ""))


def _last_row(path: Path) -> dict | None:
    """The last complete JSON line of a metrics.jsonl that a running child may be writing (None if none)."""
    lines = path.read_text().splitlines() if path.is_file() else []
    for line in reversed(lines):
        try:
            return json.loads(line)
        except json.JSONDecodeError:  # a line still being written
            continue
    return None


def run_demo(out: Path, images: int = DEFAULTS["images"], size: int = DEFAULTS["size"],
             steps: int = DEFAULTS["steps"], batch_size: int = DEFAULTS["batch_size"], seed: int = DEFAULTS["seed"],
             world_seed: int = DEFAULTS["world_seed"], config: str | Path = CONFIG, overrides: list[str] = (),
             progress_every_s: float = 30.0) -> Path:
    """The whole demo; returns the report's path.

    The two pretraining runs (and the two evaluations) run side by side as ``softmask`` child processes,
    each with half of this machine's cores; their logs are ``OUT/METHOD.log`` and ``OUT/METHOD/eval.log``.
    Raises ``ConfigError`` for bad settings before anything is computed, ``TrainingError`` naming the
    log when a child fails.
    """
    from softmask.viz.gradcam import gradcam_figures
    from softmask.world import generate_world

    start = time.perf_counter()
    out = Path(out).resolve()
    world = out / "world"
    runs = {method: out / method for method in METHODS}
    train_cmds = []
    for method, run in runs.items():
        method_overrides = [f"world={world}", f"method={method}", f"output_dir={run}", f"seed={seed}",
                            f"train.max_steps={steps}", f"train.batch_size={batch_size}", f"train.save_every={steps}",
                            *WORLD_OVERRIDES, *RECIPE_OVERRIDES, *overrides]
        load_config(config, [o for o in method_overrides if not o.startswith("world=")])  # fail before any work
        train_cmds.append(softmask_command("pretrain", "--config", str(config), *method_overrides, quiet=False))
    out.mkdir(parents=True, exist_ok=True)
    log.info(f"[1/4] generating a world of {images} images at {size} px (seed {world_seed}) in {world}")
    generate_world(world, images=images, size=size, seed=world_seed)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads_per_process(len(METHODS))), "PYTHONUNBUFFERED": "1"}
    log.info(f"[2/4] pretraining the tiny model with {' and '.join(METHODS)} side by side, {steps} steps of "
             f"{batch_size} each ({env['OMP_NUM_THREADS']} thread(s) per run; logs: {out}/METHOD.log)")
    train_logs = [out / f"{method}.log" for method in METHODS]
    codes = run_side_by_side(list(zip(train_cmds, train_logs, strict=True)), len(METHODS), env,
                             poll=_Progress(runs, steps, batch_size), poll_every_s=progress_every_s)
    _raise_on_failure("pretraining", codes, train_logs)
    log.info("[3/4] evaluating both models on the test split")
    eval_cmds = [softmask_command("evaluate", "world", "--checkpoint", str(run), "--world", str(world), "--json",
                                  str(run / "eval_world.json")) for run in runs.values()]
    eval_logs = [run / "eval.log" for run in runs.values()]
    _raise_on_failure("evaluation", run_side_by_side(list(zip(eval_cmds, eval_logs, strict=True)), len(METHODS),
                                                      env), eval_logs)
    metrics = {method: json.loads((run / "eval_world.json").read_text()) for method, run in runs.items()}
    log.info("[4/4] writing the report")
    plot_losses(runs, out / "losses.png")
    scenes = [s for s in json.loads((world / "annotations" / "objects.json").read_text()) if s["split"] == "test"]
    figures = []
    for n, scene in enumerate(scenes[:3]):
        caption = next(c["caption"] for c in scene["captions"] if c["kind"] in ("full", "relation"))
        _, paths = gradcam_figures(list(runs.values()), world / scene["image"], caption, out / "gradcam" / f"{n:02d}")
        figures += [p for p in paths if p.name == "compare.png"]
    settings = {"images": images, "size": size, "steps": steps, "batch_size": batch_size, "seed": seed,
                "world_seed": world_seed, "overrides": list(overrides)}
    world_cmd = ["softmask", "world", "--out", str(world), "--images", str(images), "--size", str(size), "--seed",
                 str(world_seed)]
    report = _report(out, runs, metrics, figures, settings, [world_cmd, *train_cmds, *eval_cmds], len(scenes),
                     time.perf_counter() - start)
    log.info(f"wrote {report}")
    return report


def _raise_on_failure(what: str, codes: list[int], logs: list[Path]) -> None:
    for code, log_file in zip(codes, logs, strict=True):
        if code != 0:
            tail = "\n".join(Path(log_file).read_text().splitlines()[-15:])
            raise TrainingError(f"{what} failed (exit code {code}); the end of {log_file}:\n{tail}")
