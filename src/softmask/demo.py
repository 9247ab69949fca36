"""``softmask demo`` (what ``make demo`` runs): generate a small synthetic world, pretrain the tiny model
twice (``method: albef`` and ``method: softmask``, same seed and budget), evaluate both on the world's
test split, and write ``OUT/report.md`` with the metrics side by side, a loss-curve plot and Grad-CAM
grids comparing what the two models look at.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from softmask.config import load_config

log = logging.getLogger("softmask")

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "pretrain" / "tiny.yaml"
METHODS = ("albef", "softmask")
# As configs/pretrain/world.yaml: mean-pooled text features (the tiny model's random [CLS] is nearly one
# vector for every caption, docs/results.md), no flips (captions say "left of"), crops that keep most of
# the scene, none of RandAugment's colour-changing operations (colours are what captions name).
WORLD_OVERRIDES = ("model.text_pooling=mean", "data.augment.hflip=false", "data.augment.crop_scale=[0.8,1.0]",
                   "data.augment.randaug_exclude=[auto_contrast,equalize,brightness]")
REPORT_KEYS = [
    ("tr1", "text retrieval R@1"), ("tr5", "text retrieval R@5"), ("ir1", "image retrieval R@1"),
    ("ir5", "image retrieval R@5"), ("r_mean", "retrieval mean recall"),
    ("itm_all", "minimal edits, ITM"), ("itm_salient", "  ... edited object salient"),
    ("itm_secondary", "  ... edited object secondary"), ("itm_heldout", "  ... held-out combination"),
    ("itc_all", "minimal edits, ITC"), ("itc_secondary", "  ... edited object secondary"),
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


def _report(out: Path, world: Path, runs: dict[str, Path], metrics: dict[str, dict], figures: list[Path],
            settings: dict, seconds: float) -> Path:
    lines = [
        "# softmask demo", "",
        f"A synthetic world of {settings['images']} images ({settings['size']} px), the tiny model pretrained "
        f"for {settings['steps']} steps of {settings['batch_size']} pairs with each method (seed "
        f"{settings['seed']}), evaluated on the world's test split. Total time {seconds / 60:.1f} min.", "",
        "Read with care: one seed, a tiny model trained for minutes from random initialisation; differences "
        "smaller than a few points are within what another seed would change. `docs/results.md` holds the "
        "study with several seeds.", "",
        "| metric (%) | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs),
    ]
    for key, label in REPORT_KEYS:
        if all(key in m for m in metrics.values()):
            lines.append(f"| {label} | " + " | ".join(f"{metrics[name][key]:.1f}" for name in runs) + " |")
    lines += ["", "Chance levels: minimal edits 50%; retrieval R@1 about 100 / (number of test images).", "",
              "## Training losses", "", "![losses](losses.png)", "", "## Where the models look", "",
              "Word Grad-CAM of each model (rows) for each word of a test caption (columns):", ""]
    lines += [f"![gradcam]({fig.relative_to(out)})" for fig in figures]
    lines += ["", "## Reproduce", "", "```", f"softmask world --out {world} --images {settings['images']} "
              f"--size {settings['size']} --seed {settings['seed']}"]
    for name, run in runs.items():
        lines.append(f"softmask pretrain --config configs/pretrain/tiny.yaml method={name} "
                     f"data.train=[{world}/annotations/pretrain.json] data.image_root={world} output_dir={run} "
                     f"train.max_steps={settings['steps']} train.batch_size={settings['batch_size']} "
                     + " ".join(WORLD_OVERRIDES))
        lines.append(f"softmask evaluate world --checkpoint {run} --world {world}")
    lines += ["```", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def run_demo(out: Path, images: int = 1200, size: int = 64, steps: int = 600, batch_size: int = 16,
             seed: int = 0, config: str | Path = CONFIG, overrides: list[str] = ()) -> Path:
    """The whole demo; returns the report's path."""
    from softmask.eval.world import evaluate_world
    from softmask.inference import load_model
    from softmask.tasks.pretrain import pretrain
    from softmask.viz.gradcam import gradcam_figures
    from softmask.world import generate_world

    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    world = out / "world"
    log.info(f"[1/4] generating a world of {images} images at {size} px in {world}")
    generate_world(world, images=images, size=size, seed=seed)
    runs: dict[str, Path] = {}
    for i, method in enumerate(METHODS):
        run = out / method
        log.info(f"[2/4] pretraining the tiny model, method={method} ({i + 1}/{len(METHODS)}), {steps} steps")
        cfg = load_config(config, [f"method={method}", f"data.train=[{world / 'annotations' / 'pretrain.json'}]",
                                   f"data.image_root={world}", f"output_dir={run}", f"seed={seed}",
                                   f"train.max_steps={steps}", f"train.batch_size={batch_size}",
                                   f"train.save_every={steps}", *WORLD_OVERRIDES, *overrides])
        pretrain(cfg)
        runs[method] = run
    metrics = {}
    for method, run in runs.items():
        log.info(f"[3/4] evaluating {method}")
        metrics[method] = evaluate_world(load_model(run)[0], world)
        (run / "eval_world.json").write_text(json.dumps(metrics[method], indent=2))
    log.info("[4/4] writing the report")
    plot_losses(runs, out / "losses.png")
    scenes = [s for s in json.loads((world / "annotations" / "objects.json").read_text()) if s["split"] == "test"]
    figures = []
    for n, scene in enumerate(scenes[:3]):
        caption = next(c["caption"] for c in scene["captions"] if c["kind"] in ("full", "relation"))
        _, paths = gradcam_figures([runs[m] for m in METHODS], world / scene["image"], caption,
                                   out / "gradcam" / f"{n:02d}")
        figures += [p for p in paths if p.name == "compare.png"]
    settings = {"images": images, "size": size, "steps": steps, "batch_size": batch_size, "seed": seed}
    report = _report(out, world, runs, metrics, figures, settings, time.perf_counter() - start)
    log.info(f"wrote {report}")
    return report
