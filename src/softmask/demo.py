"""``softmask demo`` (what ``make demo`` runs): the paper's recipe in miniature on two synthetic worlds.

1. two worlds: one for vision-language pretraining and evaluation, one for the image encoder;
2. ``softmask pretrain-vision``: the ViT pretrained alone on the second world's objects (our ImageNet);
3. ``softmask pretrain`` with ``method: albef`` and ``method: softmask`` (configs/pretrain/world_mini.yaml:
   that ViT and the first layers of the MiniLM BERT), same seed and budget, side by side;
4. ``softmask evaluate world`` of both on the first world's test split;
5. ``OUT/report.md``: the metrics side by side, the loss curves with the ITM prior (and the ordinary pairs'
   loss of a run with soft masks), the top-5 images each model retrieves for a few captions, and Grad-CAM
   grids comparing what the two models look at.

With `--budget full` the demo runs the study's recipe (docs/results.md), seed 0; the default takes about 19
minutes on 2 cores.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import time
from pathlib import Path

from softmask.config import ConfigError, load_config, override_key
from softmask.config.files import packaged_config
from softmask.runs import run_config
from softmask.side_by_side import run_side_by_side, softmask_command, threads_per_process
from softmask.train.loop import TrainingError
from softmask.train.stop import Interrupted
from softmask.world.scene import HELD_OUT_PAIRS
from softmask.world.vocab import EDIT_ATTRIBUTES

log = logging.getLogger("softmask")

CONFIG = packaged_config("pretrain/world_mini.yaml")
VISION_CONFIG = packaged_config("vision/world_vit.yaml")
METHODS = ("albef", "softmask")
# The demo's budgets. "full": the recipe of the study in docs/results.md (the world of `softmask world --seed 5`,
# its image encoder pretrained on another world, seed 105, that shows every colour-shape pair).
# "default": the same worlds and encoder cut to fit a fresh 2-core machine in under 20 minutes: half the
# vision-language steps, and an evaluation that re-ranks the top 10 instead of 16,
# grounds 300 captions instead of 500 and reads 300 instead of 600 with MLM. Times: BENCHMARKS.md.
_FULL = {"images": 8000, "size": 64, "steps": 600, "batch_size": 28, "seed": 0, "world_seed": 5,
         "vision_images": 8000, "vision_steps": 700, "vision_batch_size": 64, "vision_world_seed": 105,
         "eval_k": 16, "grounding_captions": 500, "mlm_captions": 600, "shortcut_pairs": 200}
BUDGETS = {"default": {**_FULL, "steps": 300, "eval_k": 10, "grounding_captions": 300,
                       "mlm_captions": 300},
           "full": _FULL}
# Settings the demo makes itself, with the option that changes them.
DEMO_KEYS = {"world": "--out", "output_dir": "--out", "method": "(both methods run)", "seed": "--seed",
             "train.max_steps": "--steps / --vision-steps", "train.batch_size": "--batch-size / --vision-batch-size",
             "model.vision.init": "(the image encoder of stage 2)", "resume": "(a rerun resumes by itself)"}
REPORT_KEYS = [
    ("tr1", "text retrieval R@1"), ("tr10", "text retrieval R@10"), ("ir1", "image retrieval R@1"),
    ("ir10", "image retrieval R@10"), ("r_mean", "retrieval mean recall"),
    ("itc_tr1", "text retrieval R@1, ITC alone"), ("itc_tr10", "text retrieval R@10, ITC alone"),
    ("itc_ir1", "image retrieval R@1, ITC alone"), ("itc_ir10", "image retrieval R@10, ITC alone"),
    ("itm_all", "minimal edits, ITM"), ("itm_salient", "  ... edited object salient"),
    ("itm_secondary", "  ... edited object secondary"), ("itm_heldout", "  ... held-out combination"),
    ("itc_all", "minimal edits, ITC"), ("itc_salient", "  ... edited object salient"),
    ("itc_secondary", "  ... edited object secondary"), ("itc_heldout", "  ... held-out combination"),
    *((f"itc_attr_{a}", f"  ... {a} edited") for a in EDIT_ATTRIBUTES),
    ("pointing_all", "pointing game"), ("pointing_secondary", "  ... secondary objects"),
    ("energy_all", "energy in box"), ("energy_secondary", "  ... secondary objects"),
]


# Chance of each word group's measures: the image encoder's classifier and MLM's pick among the group's
# values (uniform guess), and a minimal edit (the true caption vs one distractor: 50).
GROUP_VALUES = {"colour": 8, "shape": 6, "size": 3, "pattern": 3, "relation": 6}


def attribute_table(vision: dict[str, float], metrics: dict[str, dict[str, float]]) -> list[str]:
    """The report's table per attribute (colour, shape, size, pattern, relation): what the image encoder names
    (``vision``: its held-out accuracy on the vision-language world's test objects, ``acc_<attribute>`` and
    ``relation_probe``), what each model's fusion reads (MLM with the own / a shuffled image,
    ``mlm_<group>_right`` / ``_shuffled``) and how often its ITM and ITC reject a minimal edit of that
    attribute (``itm_attr_<a>``, ``itc_attr_<a>``), with chance stated on each row. A cell whose metric a
    model lacks reads "-"."""
    names = list(metrics)

    def cell(values: dict[str, float], *keys: str) -> str:
        return " / ".join(f"{values[k]:.1f}" for k in keys) if all(k in values for k in keys) else "-"

    header = ["attribute (chance: encoder, MLM, edits)", "image encoder names it",
              *(f"{name}: MLM own / shuffled image" for name in names),
              *(f"{name}: ITM rejects edits" for name in names), *(f"{name}: ITC rejects edits" for name in names)]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for group, values in GROUP_VALUES.items():
        chance = 100.0 / values
        encoder_chance = "25" if group == "relation" else f"{chance:.1f}"
        encoder_key = "relation_probe" if group == "relation" else f"acc_{group}"
        row = [f"{group} ({encoder_chance}, {chance:.1f}, 50)", cell(vision, encoder_key),
               *(cell(metrics[n], f"mlm_{group}_right", f"mlm_{group}_shuffled") for n in names),
               *(cell(metrics[n], f"itm_attr_{group}") for n in names),
               *(cell(metrics[n], f"itc_attr_{group}") for n in names)]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _entropy(p: float) -> float:
    return 0.0 if p in (0.0, 1.0) else float(-(p * math.log(p) + (1 - p) * math.log(1 - p)))


def itm_prior(soft_share: float = 0.0, masked_pairs: str = "positives", masked_loss: str = "pooled") -> float:
    """The ITM loss of a head that only knows how often pairs match: entropy (nats) of the share of
    positives. Per image ALBEF fuses 1 positive and 2 hard negatives (1/3 positive, 0.6365); soft masks add
    ``soft_share`` soft-masked pairs per image and pair: with ``masked_pairs`` "positives" only the masked
    positive, with "negative_captions" also a masked negative, with "all" a masked copy of all three. With
    ``masked_loss`` "added" the loss is the ordinary pairs' mean plus the soft-masked pairs' mean, so the
    prior is the sum of the two kinds' priors."""
    masked_negatives = {"positives": 0.0, "negative_captions": 1.0, "all": 2.0}[masked_pairs]
    if masked_loss == "added":
        return _entropy(1.0 / 3.0) + (_entropy(1.0 / (1.0 + masked_negatives)) if soft_share > 0 else 0.0)
    return _entropy((1.0 + soft_share) / (3.0 + soft_share + masked_negatives * soft_share))


def _soft_mask_reading(run: Path) -> tuple[str, str]:
    """``(softmask.masked_pairs, softmask.masked_loss)`` of a run's saved config: which ITM pairs its
    soft-masked images entered and how their loss was weighed."""
    if not (run / "config.yaml").exists():
        return "positives", "pooled"
    sm = run_config(run).softmask
    return sm.masked_pairs, sm.masked_loss


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def itm_extra_lines(name: str, rows: list[dict], reading: tuple[str, str] = ("positives", "pooled")
                    ) -> list[tuple[str, list[int], list[float], str]]:
    """What the ITM panel draws for a run besides its loss: ``(label, steps, values, linestyle)``, with no
    steps for a horizontal line. Always the run's prior (:func:`itm_prior`, dashed); for a run with soft
    masks (it logs ``loss_itm_pairs``) also the loss on its ordinary pairs (dotted), whose prior is ALBEF's:
    its total falls under its own prior through the soft-masked pairs alone."""
    shares = [r.get("soft_mask_share", 0.0) for r in rows]
    prior = itm_prior(sum(shares) / max(1, len(shares)), *reading)
    lines = [(f"{name}: prior {prior:.3f}", [], [prior], "--")]
    if rows and all("loss_itm_pairs" in r for r in rows):
        lines.append((f"{name}: ordinary pairs (prior {itm_prior(0.0):.3f})", [r["step"] for r in rows],
                      [r["loss_itm_pairs"] for r in rows], ":"))
    return lines


def plot_losses(runs: dict[str, Path], out: Path) -> Path:
    """loss, loss_itc, loss_itm, loss_mlm against step for every run, one panel each; the ITM panel
    adds each run's prior and, with soft masks, its ordinary pairs' loss (:func:`itm_extra_lines`)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.4))
    keys = ("loss", "loss_itc", "loss_itm", "loss_mlm")
    for panel, key in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), panel + 1)
        for name, run in runs.items():
            rows = _rows(run / "metrics.jsonl")
            line, = ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=name)
            if key == "loss_itm":
                for label, steps, values, style in itm_extra_lines(name, rows, _soft_mask_reading(run)):
                    if steps:
                        ax.plot(steps, values, color=line.get_color(), linestyle=style, linewidth=1, label=label)
                    else:
                        ax.axhline(values[0], color=line.get_color(), linestyle=style, linewidth=1, label=label)
        ax.set_title(key)
        ax.set_xlabel("step")
        if key == "loss_itm":  # below the panel: inside, it would hide the curves near the prior
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=1)
    fig.axes[0].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    return out


def plot_retrieval(examples: dict[str, list[dict]], world: Path, out: Path) -> Path:
    """For each example caption, a row per model: the top-5 images it retrieves, the right one framed in
    green (a caption with no green frame: its image is not in that model's top 5)."""
    from matplotlib.figure import Figure
    from PIL import Image

    names = list(examples)
    captions = examples[names[0]]
    top = max(len(e["top"]) for e in captions)
    rows = len(captions) * len(names)
    fig = Figure(figsize=(1.3 * (top + 1) + 2.4, 1.25 * rows + 0.3 * len(captions)))
    grid = fig.add_gridspec(rows, top + 1, width_ratios=[3.2] + [1] * top)
    for c, example in enumerate(captions):
        for m, name in enumerate(names):
            row = c * len(names) + m
            found = examples[name][c]
            label = fig.add_subplot(grid[row, 0])
            label.axis("off")
            text = (f"\"{example['caption']}\"\n" if m == 0 else "") + f"{name}:"
            label.text(1.0, 0.5, text, ha="right", va="center", fontsize=7, wrap=True)
            for k, path in enumerate(found["top"]):
                ax = fig.add_subplot(grid[row, k + 1])
                ax.imshow(Image.open(world / path).convert("RGB"))
                ax.set_xticks([])
                ax.set_yticks([])
                right = path == found["image"]
                for spine in ax.spines.values():
                    spine.set_edgecolor("limegreen" if right else "lightgrey")
                    spine.set_linewidth(4 if right else 1)
                if row == 0:
                    ax.set_title(f"#{k + 1}", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    return out


def encoder_on_world(vision_run: Path, world: Path) -> dict[str, float]:
    """The pretrained image encoder's accuracy on ``world``'s test objects (what the vision-language runs are
    given), also written to ``VISION_RUN/metrics_vl_world.json``; cached there for a rerun."""
    path = vision_run / "metrics_vl_world.json"
    if path.is_file() and path.stat().st_mtime >= (vision_run / "model" / "model.safetensors").stat().st_mtime:
        return json.loads(path.read_text())
    from softmask.tasks.image_pretrain import evaluate_image_encoder, load_image_encoder
    from softmask.world.objects import world_objects

    encoder = load_image_encoder(vision_run / "model")
    metrics = evaluate_image_encoder(encoder, world_objects(world, "test", encoder.config.image_size))
    path.write_text(json.dumps(metrics, indent=2))
    return metrics


def _report(out: Path, runs: dict[str, Path], metrics: dict[str, dict], figures: list[Path], settings: dict,
            commands: list[list[str]], test_images: int, seconds: float, vision: dict[str, float]) -> Path:
    """``OUT/report.md``: the settings, the metrics side by side, the figures and the exact commands."""
    finals = {name: _final_losses(run) for name, run in runs.items()}
    lines = [
        "# softmask demo", "",
        f"The paper's recipe in miniature. An image encoder (a ViT) is first pretrained alone on a world of "
        f"{settings['vision_images']} images that shows every colour-shape pair (world seed "
        f"{settings['vision_world_seed']}; our ImageNet) to name each object's "
        f"shape, colour, size and pattern, {settings['vision_steps']} steps; then, starting from it and from the "
        f"MiniLM BERT, vision-language pretraining runs on another world of {settings['images']} images "
        f"({settings['size']} px, world seed {settings['world_seed']}) for {settings['steps']} steps of "
        f"{settings['batch_size']} pairs with each method (seed {settings['seed']}). Both are evaluated on "
        f"that world's test split ({test_images} images, never trained on): retrieval re-ranks ITC's top "
        f"{settings['eval_k']} of every query by ITM, grounding scores the first {settings['grounding_captions']} "
        f"captions. {_budget_words(settings)}; total time {seconds / 60:.1f} min.", "",
        *_itm_verdicts(finals, metrics), "",
        "## What each part sees, per attribute", "",
        "The image encoder's accuracy on this world's test objects (relation: a linear probe on two objects' "
        "features); what each model's fusion reads from the image (MLM restores a masked word of that group with "
        "the caption's own image / a shuffled one: equal numbers mean it is guessed from the text); how often ITM "
        "and ITC score the true caption above a one-word edit of that attribute. %, chance in brackets.", "",
        *attribute_table(vision, metrics), "",
        "Image encoder, all held-out measures (%): " + ", ".join(
            f"{key[4:] if key.startswith('acc_') else key} {value:.1f}" for key, value in vision.items()
            if key != "images"), "",
        "## All metrics", "",
        "Read with care: one seed, small models trained for minutes; differences smaller than a few points are "
        "within what another seed would change (docs/results.md has the study over 3 seeds).", "",
        "| metric (%) | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs),
    ]
    for key, label in REPORT_KEYS:
        if all(key in m for m in metrics.values()):
            lines.append(f"| {label} | " + " | ".join(f"{metrics[name][key]:.1f}" for name in runs) + " |")
    lines.append("| ITM training loss (last logged steps) | " + " | ".join(
        f"{finals[name]['loss_itm']:.3f} (prior {finals[name]['prior']:.3f})" for name in runs) + " |")
    lines += ["", f"Chance: minimal edits 50; retrieval R@1 {100 / max(1, test_images):.2f}, R@10 "
              f"{min(100.0, 1000 / max(1, test_images)):.2f} (one right answer among {test_images} images; "
              "text retrieval counts any of the image's captions). The ITM prior is the loss of a head that only "
              "knows how often pairs match.", "",
              "## Training losses", "", "![losses](losses.png)", "",
              "In the ITM panel, dashed: each run's prior; dotted: the loss of a run with soft masks on its ordinary "
              "pairs (each image with its caption and two hard negatives), whose prior is ALBEF's.", "",
              "## What each model retrieves", "",
              "For a few test captions, the five images each model ranks first (ITC candidates re-ranked by ITM); "
              "the caption's own image is framed in green.", "", "![retrieval](retrieval.png)", "",
              "## Where the models look", "",
              "Word Grad-CAM of each model (rows) for each word of a test caption (columns). A panel of one "
              "flat colour is an all-zero map: no patch has positive Grad-CAM evidence for that word.", ""]
    lines += [f"![gradcam]({fig.relative_to(out)})" for fig in figures]
    lines += ["", "## Reproduce", "", "```"]
    for cmd in commands:
        args = cmd[cmd.index("softmask") + 1:]
        lines.append(shlex.join(["softmask", *(args[1:] if args[:1] == ["-q"] else args)]))
    lines += ["```", "", "## Try your own captions", "",
              "A local page with both models side by side: per-word Grad-CAM, the match scores as you edit a",
              "word, and the top-5 test images each model retrieves (the `explore` extra; `make setup` installs it):",
              "", "```", shlex.join(explore_command(runs, out / "world")), "```", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _budget_words(settings: dict) -> str:
    """"Budget `default` (...)" with the settings changed from it, for the report's first paragraph."""
    budget = settings["budget"]
    changed = ", ".join(f"{key} {value}" for key, value in settings.items()
                        if key in BUDGETS[budget] and value != BUDGETS[budget][key])
    what = ("the recipe of the study in docs/results.md" if budget == "full" else
            "`--budget full` runs the recipe of the study in docs/results.md: more steps, a larger evaluation")
    return f"Budget `{budget}` ({what})" + (f", changed: {changed}" if changed else "")


def _final_losses(run: Path, last: int = 3) -> dict[str, float]:
    """Mean of the last ``last`` logged values of a run's loss_itm (and of loss_itm_soft, the soft-masked
    pairs' part, where logged) and the run's ITM prior."""
    rows = _rows(run / "metrics.jsonl")[-last:]
    share = sum(r.get("soft_mask_share", 0.0) for r in rows) / max(1, len(rows))
    out = {"loss_itm": sum(r["loss_itm"] for r in rows) / max(1, len(rows)),
           "prior": itm_prior(share, *_soft_mask_reading(run))}
    for key in ("loss_itm_soft", "loss_itm_pairs"):
        if rows and all(key in r for r in rows):
            out[key] = sum(r[key] for r in rows) / len(rows)
    return out


# How far under its prior a training ITM loss must be for the report's first lines to call ITM "learned"
# (ALBEF at the world recipe: 0.15 under after 300 steps, 0.28 after 600) or to say it "barely left its
# prior" (SoftMask's default after 300 steps: 0.02 under, and re-ranking by it lowers R@1; docs/results.md).
ITM_LEARNED_MARGIN = 0.10
ITM_BARELY_MARGIN = 0.02
# A soft-masked pairs' loss under this is the shortcut (docs/results.md: ~0.001-0.01 when it happens).
ITM_SHORTCUT_LOSS = 0.1
# An itm_shortcut above this: a soft-masked image alone makes ITM say "match" (the bar for none: 0.1).
ITM_SHORTCUT_BAR = 0.1


def itm_verdict(loss: float, prior: float) -> str:
    """"learned", "barely left its prior" or "did not learn": how far the training ITM ``loss`` lies under
    its ``prior`` (:data:`ITM_LEARNED_MARGIN`, :data:`ITM_BARELY_MARGIN`)."""
    if loss < prior - ITM_LEARNED_MARGIN:
        return "learned"
    return "barely left its prior" if loss < prior - ITM_BARELY_MARGIN else "did not learn"


def _itm_verdicts(finals: dict[str, dict[str, float]], metrics: dict[str, dict[str, float]]) -> list[str]:
    """One line per run (``finals``: each run's :func:`_final_losses`): did ITM leave its prior on ordinary
    pairs (positives and hard negatives; the training loss of the last logged steps)? With soft masks the
    total also holds the soft-masked pairs, which a head can learn apart from any pair (docs/results.md),
    so the verdict reads the ordinary pairs' loss against ALBEF's prior; the evaluation's ``itm_test_loss``
    (the same kind of pairs for every model, unaugmented test images) follows. Then whether it has the shortcut
    (``itm_shortcut`` of the evaluation: a soft-masked image with a wrong caption, its match probability
    minus the plain image's)."""
    lines = []
    for name, final in finals.items():
        loss, prior = final["loss_itm"], final["prior"]
        which = "training loss"
        if "loss_itm_pairs" in final:
            loss, prior, which = final["loss_itm_pairs"], itm_prior(0.0), "training loss on ordinary pairs"
        line = f"- **ITM {itm_verdict(loss, prior)}** ({name}): {which} {loss:.3f} against its prior {prior:.3f}"
        if "loss_itm_soft" in final:
            soft = final["loss_itm_soft"]
            reading = ("near 0: the head tells masked images apart rather than pairs; "
                       if soft < ITM_SHORTCUT_LOSS else "")
            line += (f"; on the soft-masked pairs {soft:.3f} ({reading}all pairs {final['loss_itm']:.3f}, "
                     f"prior {final['prior']:.3f})")
        test_loss = metrics.get(name, {}).get("itm_test_loss")
        if test_loss is not None:  # the same kind of pairs for every model: no augmentation, no soft masks
            line += f"; on the test split's ordinary pairs {test_loss:.3f}"
        shortcut = metrics.get(name, {}).get("itm_shortcut")
        if shortcut is not None:
            has = shortcut > ITM_SHORTCUT_BAR
            line += (f". **{'Shortcut' if has else 'No shortcut'}**: itm_shortcut {shortcut:+.2f} (a soft-masked image "
                     f"with a wrong caption: match probability {metrics[name]['itm_mismatched_masked']:.2f} against "
                     f"{metrics[name]['itm_mismatched']:.2f} unmasked{'; masking alone says match' if has else ''})")
        lines.append(line + ".")
    return lines


class _Progress:
    """Logs each run's last logged step, some losses and the time left, from its metrics.jsonl; only when
    a run has logged something new since the last line (a step can take longer than the tick)."""

    def __init__(self, runs: dict[str, Path], steps: int, batch_size: int, keys: dict[str, str]):
        self.runs, self.steps, self.batch_size, self.keys = runs, steps, batch_size, keys
        self._last = ""

    def __call__(self) -> None:
        parts, left = [], 0.0
        for name, run in self.runs.items():
            row = _last_row(run / "metrics.jsonl")
            if row is None:
                parts.append(f"{name}: starting")
                continue
            losses = ", ".join(f"{label} {row[key]:.3f}" for key, label in self.keys.items() if key in row)
            parts.append(f"{name}: step {row['step']}/{self.steps} ({losses})")
            if row.get("pairs_per_s"):
                left = max(left, (self.steps - row["step"]) * self.batch_size / row["pairs_per_s"])
        line = " | ".join(parts)
        if line != self._last:
            self._last = line
            log.info("  " + line + (f"; about {max(1, round(left / 60))} min left" if left else ""))


def _last_row(path: Path) -> dict | None:
    """The last complete JSON line of a metrics.jsonl that a running child may be writing (None if none)."""
    lines = path.read_text().splitlines() if path.is_file() else []
    for line in reversed(lines):
        try:
            return json.loads(line)
        except json.JSONDecodeError:  # a line still being written
            continue
    return None


def _world(out: Path, images: int, size: int, seed: int, held_out_pairs: int = HELD_OUT_PAIRS) -> None:
    """Generate a world into ``out``, or keep the one there if it was made with the same settings."""
    from softmask.world import generate_world

    done = out / "world.json"
    if done.is_file():
        try:
            made = json.loads(done.read_text())
            if (made.get("images"), made.get("size"), made.get("seed"), len(made.get("heldout_pairs", ()))) == (
                    images, size, seed, held_out_pairs):
                log.info(f"      reusing {out} ({images} images, seed {seed})")
                return
        except json.JSONDecodeError:
            pass
    pairs = f"{held_out_pairs} colour-shape pairs held out of training" if held_out_pairs else "every pair in training"
    log.info(f"      {out}: {images} images at {size} px, world seed {seed}, {pairs}")
    generate_world(out, images=images, size=size, seed=seed, held_out_pairs=held_out_pairs)


def run_demo(out: Path, budget: str = "default", config: str | Path = CONFIG, vision_config: str | Path = VISION_CONFIG,
             overrides: list[str] = (), vision_overrides: list[str] = (), progress_every_s: float = 30.0,
             **settings: int) -> Path:
    """The whole demo; returns the report's path.

    The image-encoder pretraining runs as one ``softmask`` child process with every core; the two
    vision-language runs (and the two evaluations) run side by side, each with half of the cores. Logs:
    ``OUT/vision.log``, ``OUT/METHOD.log`` and ``OUT/METHOD/eval.log``. Raises ``ConfigError`` for bad
    settings before anything is computed, ``TrainingError`` naming the log when a child fails.

    Args:
        budget: a key of :data:`BUDGETS` ("default" takes about 19 minutes on 2 cores, "full" is the study's seed 0).
        settings: any of the budget's keys (``steps=50``, ``eval_k=4`` ...) to change that one setting.
    """
    if budget not in BUDGETS:
        raise ConfigError(f"--budget must be one of {', '.join(BUDGETS)}, got '{budget}'")
    unknown = sorted(set(settings) - set(BUDGETS[budget]))
    if unknown:
        raise TypeError(f"run_demo() got unknown settings {unknown}; known: {sorted(BUDGETS[budget])}")
    settings = {**BUDGETS[budget], **settings}
    images, size, steps, batch_size, seed, world_seed = (settings[key] for key in (
        "images", "size", "steps", "batch_size", "seed", "world_seed"))
    vision_images, vision_steps, vision_batch_size, vision_world_seed = (settings[key] for key in (
        "vision_images", "vision_steps", "vision_batch_size", "vision_world_seed"))
    for key in ("eval_k", "grounding_captions", "mlm_captions", "shortcut_pairs"):
        if settings[key] < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be at least 1, got {settings[key]}")
    from softmask.viz.gradcam import draw_gradcam, load_for_gradcam

    if vision_world_seed == world_seed:
        raise ConfigError("the image encoder must be pretrained on another world than the one it is evaluated "
                          f"on: vision_world_seed and world_seed are both {world_seed}")
    given = {override_key(o) for o in (*overrides, *vision_overrides)}
    owned = [key for key in DEMO_KEYS if key in given]
    if owned:
        raise ConfigError(f"the demo sets {owned[0]} itself: use {DEMO_KEYS[owned[0]]}")
    start = time.perf_counter()
    out = Path(out).resolve()
    world, vision_world, vision_run = out / "world", out / "vision_world", out / "vision"
    runs = {method: out / method for method in METHODS}
    vision_args = [f"world={vision_world}", f"output_dir={vision_run}", f"seed={seed}",
                   f"train.max_steps={vision_steps}", f"train.batch_size={vision_batch_size}",
                   f"train.save_every={vision_steps}", "resume=auto", *vision_overrides]
    load_config(vision_config, [o for o in vision_args if not o.startswith("world=")])
    vision_cmd = softmask_command("pretrain-vision", "--config", str(vision_config), *vision_args, quiet=False)
    train_cmds = []
    for method, run in runs.items():
        method_overrides = [f"world={world}", f"method={method}", f"output_dir={run}", f"seed={seed}",
                            f"model.vision.init={vision_run / 'model'}", f"train.max_steps={steps}",
                            f"train.batch_size={batch_size}", f"train.save_every={steps}", "resume=auto",
                            *overrides]
        # Fail on bad settings before any work (the world and the image encoder do not exist yet).
        load_config(config, [o for o in method_overrides if not o.startswith(("world=", "model.vision.init="))])
        train_cmds.append(softmask_command("pretrain", "--config", str(config), *method_overrides, quiet=False))
    out.mkdir(parents=True, exist_ok=True)
    try:
        log.info("[1/5] the worlds: one for vision-language pretraining and evaluation, one for the image encoder")
        _world(world, images, size, world_seed)
        _world(vision_world, vision_images, size, vision_world_seed, held_out_pairs=0)
        threads = os.cpu_count() or 1
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
        log.info(f"[2/5] pretraining the image encoder alone on the second world's objects, {vision_steps} steps "
                 f"({threads} thread(s); log: {out / 'vision.log'})")
        codes = run_side_by_side([(vision_cmd, out / "vision.log")], 1, env,
                                 poll=_Progress({"image encoder": vision_run}, vision_steps, vision_batch_size,
                                                {"loss_objects": "objects", "loss_presence": "presence",
                                                 "loss_position": "position"}),
                                 poll_every_s=progress_every_s)
        _raise_on_failure("image-encoder pretraining", codes, [out / "vision.log"])
        vision_metrics = encoder_on_world(vision_run, world)
        log.info("      on the first world's test objects: " + ", ".join(
            f"{k[4:] if k.startswith('acc_') else k} {v:.1f}%" for k, v in vision_metrics.items() if k != "images"))
        env["OMP_NUM_THREADS"] = str(threads_per_process(len(METHODS)))
        train_logs = [out / f"{method}.log" for method in METHODS]
        log.info(f"[3/5] vision-language pretraining with {' and '.join(METHODS)} side by side, {steps} steps of "
                 f"{batch_size} each ({env['OMP_NUM_THREADS']} thread(s) per run; logs: "
                 f"{', '.join(str(p) for p in train_logs)})")
        codes = run_side_by_side(list(zip(train_cmds, train_logs, strict=True)), len(METHODS), env,
                                 poll=_Progress(runs, steps, batch_size, {"loss_itc": "ITC", "loss_itm": "ITM"}),
                                 poll_every_s=progress_every_s)
        _raise_on_failure("pretraining", codes, train_logs)
        log.info("[4/5] evaluating both models on the test split")
        eval_cmds = [softmask_command("evaluate", "world", "--checkpoint", str(run), "--world", str(world), "--json",
                                      str(run / "eval_world.json"), "--examples", str(run / "retrieval_examples.json"),
                                      "--k", str(settings["eval_k"]),
                                      "--grounding-captions", str(settings["grounding_captions"]),
                                      "--mlm-captions", str(settings["mlm_captions"]),
                                      "--shortcut-pairs", str(settings["shortcut_pairs"]))
                     for run in runs.values()]
        eval_logs = [run / "eval.log" for run in runs.values()]
        _raise_on_failure("evaluation", run_side_by_side(list(zip(eval_cmds, eval_logs, strict=True)), len(METHODS),
                                                          env), eval_logs)
        metrics = {method: json.loads((run / "eval_world.json").read_text()) for method, run in runs.items()}
        log.info("[5/5] writing the report")
        plot_losses(runs, out / "losses.png")
        plot_retrieval({m: json.loads((run / "retrieval_examples.json").read_text()) for m, run in runs.items()},
                       world, out / "retrieval.png")
        scenes = [s for s in json.loads((world / "annotations" / "objects.json").read_text()) if s["split"] == "test"]
        figures = []
        loaded = load_for_gradcam(list(runs.values()), labels=list(runs))
        for n, scene in enumerate(scenes[:3]):  # the comparison only: the report shows nothing else
            caption = next(c["caption"] for c in scene["captions"] if c["kind"] in ("full", "relation"))
            _, paths = draw_gradcam(loaded, world / scene["image"], caption, out / "gradcam" / f"{n:02d}",
                                    overlays=False)
            figures += paths
        settings = {**settings, "budget": budget}
        world_cmds = [["softmask", "world", "--out", str(w), "--images", str(n), "--size", str(size), "--seed", str(s),
                       *extra] for w, n, s, extra in ((world, images, world_seed, []),
                                                      (vision_world, vision_images, vision_world_seed,
                                                       ["--held-out-pairs", "0"]))]
        report = _report(out, runs, metrics, figures, settings, [*world_cmds, vision_cmd, *train_cmds, *eval_cmds],
                         len(scenes), time.perf_counter() - start, vision_metrics)
        log.info(f"wrote {report}")
        log.info(f"to try your own captions and images on both models: {shlex.join(explore_command(runs, world))}")
        return report
    except KeyboardInterrupt:  # Ctrl-C (or SIGTERM): the children got it too and saved checkpoints
        raise Interrupted(f"the demo stopped; its training runs saved checkpoints in {out}",
                          resume_override="") from None


def explore_command(runs: dict[str, Path], world: Path) -> list[str]:
    """``softmask explore`` on the demo's two models (SoftMask first) and its world's test split."""
    return ["softmask", "explore", "--checkpoint", str(runs["softmask"]), "--compare", str(runs["albef"]),
            "--images", str(world)]


def _raise_on_failure(what: str, codes: list[int], logs: list[Path]) -> None:
    for code, log_file in zip(codes, logs, strict=True):
        if code != 0:
            tail = "\n".join(Path(log_file).read_text().splitlines()[-15:])
            raise TrainingError(f"{what} failed (exit code {code}); the end of {log_file}:\n{tail}")
