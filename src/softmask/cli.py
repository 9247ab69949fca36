"""The ``softmask`` command line.

    softmask info   --config FILE [key=value ...]            resolved config, sizes, checkpoint loading
    softmask export --config FILE --out DIR [key=value ...]  build (loading init checkpoints), save_pretrained
    softmask pretrain --config FILE [key=value ...]          pretrain into output_dir (torchrun for many GPUs)
    softmask pretrain-vision --config FILE world=DIR [key=value ...]   the image encoder alone (the
                                                     world's ImageNet), or image_pretrain.folder=DIR
    softmask bench step --config FILE [--methods albef] [--steps N] [--json]   step speed, memory, MFU
    softmask finetune TASK --config FILE [key=value ...]    TASK: retrieval, ve, vqa, nlvr2; then evaluation
    softmask evaluate TASK --checkpoint PATH --config FILE [--split S] [--json OUT] [key=value ...]
    softmask evaluate world --checkpoint PATH --world DIR [--json OUT]   zero-shot probes of the world
    softmask demo   [--out DIR] [--images N] [--steps N]    world, albef vs softmask, evaluation, report
    softmask gradcam --checkpoint PATH --image FILE --text "..." --out DIR [--layer L]
                     [--source gradcam|attention] [--compare PATH2]   word Grad-CAM figures
    softmask explore --checkpoint PATH [--compare PATH2] [--images DIR] [--host H] [--port N]
                     a local web page: per-word Grad-CAM, match scores, retrieval (the explore extra)
    softmask world  --out DIR [--images N] [--size PX] [--seed S] [--shards]   the synthetic world
    softmask text-assignment --config FILE --out FILE [--seed S] [key=value ...]   NLVR2's text-assignment
                     records made from the config's data.train image-caption files
    softmask score vqa --results R --questions Q --annotations A [--rules 2021|2017] [--json OUT]

Errors in configs or checkpoints print one line naming the file and key, and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shlex
import signal
import sys
import threading
from pathlib import Path

import yaml

from softmask.config import (
    EVAL_SPLITS,
    FINETUNE_TASKS,
    MAP_SOURCES,
    VQA_RULES,
    ConfigError,
    load_config,
    override_key,
    refuse_repeated_keys,
    to_dict,
)
from softmask.config.files import packaged_config
from softmask.models.loading import CheckpointError
from softmask.runs import CHECKPOINT_DIR
from softmask.train.loop import TrainingError

log = logging.getLogger("softmask")


def _add_config_args(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    parser.add_argument("--config", default=default, required=default is None, help="YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. model.text.fusion_layer=3 or data.train=[a.json,b.json]")


def cmd_info(args: argparse.Namespace) -> int:
    from softmask.models.vlp import create_model

    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip())
    model = create_model(cfg)
    total = sum(p.numel() for p in model.parameters())
    print(f"\nparameters: {total / 1e6:.2f}M")
    for name, child in model.named_children():
        print(f"  {name:16s} {sum(p.numel() for p in child.parameters()) / 1e6:8.2f}M")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from softmask.data.text import save_vocab
    from softmask.models.vlp import create_model

    cfg = load_config(args.config, args.overrides)
    model = create_model(cfg)
    out = model.save_pretrained(args.out)
    vocab = save_vocab(cfg.data.tokenizer, out)  # the folder names its own tokenizer
    print(f"wrote {out / 'config.yaml'}, {out / 'model.safetensors'} and {vocab}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from softmask.tasks.pretrain import pretrain

    state = pretrain(load_config(args.config, args.overrides))
    print(f"done: {state.step} steps, {state.skipped_samples} bad samples skipped")
    return 0


def cmd_pretrain_vision(args: argparse.Namespace) -> int:
    from softmask.tasks.image_pretrain import pretrain_vision

    cfg = load_config(args.config, args.overrides)
    metrics = pretrain_vision(cfg)
    print("held-out accuracy (%):")
    for key, value in metrics.items():
        print(f"  {key:14s} {value:8.2f}" if key != "images" else f"  {key:14s} {value:8.0f}")
    saved = Path(cfg.output_dir) / "model"
    print(f"image encoder in {saved} (use: model.vision.init={saved})")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from softmask.bench import main_step

    return main_step(args)


def _write_json(path: str, metrics: dict | list) -> None:
    import json

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(metrics, indent=2))
    print(f"wrote {path}")


def _task_config(args: argparse.Namespace):
    """The config of ``softmask finetune/evaluate TASK``: the file, ``finetune.task=TASK``, the overrides."""
    return load_config(args.config, [f"finetune.task={args.task}", *args.overrides])


def _print_results(results: dict) -> None:
    for split, metrics in results.items():
        print(f"[{split}]")
        for key, value in metrics.items():
            print(f"  {key:20s} {value:8.2f}" if isinstance(value, float) else f"  {key:20s} {value}")


def cmd_finetune(args: argparse.Namespace) -> int:
    from softmask.tasks.finetune import finetune

    cfg = _task_config(args)
    results = finetune(cfg)
    _print_results(results)
    what = "metrics and model" if results else "model (no evaluation split has files: no metrics)"
    print(f"{what} in {cfg.output_dir}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    if args.task == "world":
        from softmask.eval.world import evaluate_world
        from softmask.inference import load_model
        from softmask.runs import tokenizer_source

        if args.overrides or args.config:
            raise ConfigError("evaluate world takes --world DIR and its own options (--k, --layer, "
                              "--grounding-captions, --mlm-captions, --shortcut-pairs), not a config")
        if not args.world:
            raise ConfigError("evaluate world needs --world DIR (a folder written by `softmask world`)")
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, run_cfg = load_model(args.checkpoint, device=device)
        examples: list = []
        metrics = evaluate_world(model, args.world, k=args.k, layer=args.layer, examples_out=examples,
                                 max_grounding_captions=args.grounding_captions, mlm_captions=args.mlm_captions,
                                 soft_mask=run_cfg.softmask if run_cfg is not None else None,
                                 shortcut_pairs=args.shortcut_pairs, tokenizer=tokenizer_source(args.checkpoint),
                                 itm_batch=max(2, run_cfg.train.batch_size) if run_cfg is not None else 32)
        for key, value in metrics.items():
            print(f"{key:24s} {value:8.2f}")
        if args.json:
            _write_json(args.json, metrics)
        if args.examples:
            _write_json(args.examples, examples)
        return 0
    from softmask.tasks.finetune import evaluate_task

    if not args.config:
        raise ConfigError(f"evaluate {args.task} needs --config FILE (e.g. configs/finetune/{args.task}_tiny.yaml)")
    if args.world:
        args.overrides = [f"world={args.world}", *args.overrides]
    cfg = _task_config(args)
    splits = [args.split] if args.split else [s for s in cfg.finetune.eval_splits if getattr(cfg.finetune, s)]
    explicit = args.out or next((o.partition("=")[2] for o in args.overrides if override_key(o) == "output_dir"), "")
    out = Path(explicit) if explicit else evaluation_folder(args.checkpoint, args.task)
    existing = [out / f"metrics_{split}.json" for split in splits if (out / f"metrics_{split}.json").is_file()]
    if explicit and existing and not args.overwrite:
        raise ConfigError(f"{existing[0]} exists (another evaluation's or a run's own results); give --overwrite "
                          f"to replace it, or another --out")
    results = evaluate_task(cfg, args.checkpoint, splits, out_dir=out)
    _print_results(results)
    print(f"metrics in {out}")
    if args.json:
        _write_json(args.json, results)  # always {split: metrics}, one split or several
    return 0


def evaluation_folder(checkpoint: str | Path, task: str) -> Path:
    """Where ``evaluate TASK`` writes by default: inside the evaluated model's own folder, so that it
    never replaces another run's results. A run or saved-model folder: ``FOLDER/eval/TASK``; a checkpoint
    file: ``RUN/eval/TASK_STEP`` (for a file outside a run, next to it)."""
    path = Path(checkpoint).expanduser()
    if path.is_file():
        owner = path.parent.parent if path.parent.name == CHECKPOINT_DIR else path.parent
        return owner / "eval" / f"{task}_{path.stem}"
    return path / "eval" / task


def cmd_demo(args: argparse.Namespace) -> int:
    from softmask.demo import BUDGETS, run_demo

    settings = {key: getattr(args, key) for key in BUDGETS[args.budget]}
    report = run_demo(Path(args.out), args.budget, overrides=args.overrides,
                      **{key: value for key, value in settings.items() if value is not None})
    print(f"report: {report}")
    return 0


def cmd_explore(args: argparse.Namespace) -> int:
    from softmask.explore import need_web_libraries

    need_web_libraries()  # before any model is loaded
    from softmask.explore.app import serve
    from softmask.explore.session import Explorer, load_models, open_gallery

    gallery = open_gallery(args.images)
    models = load_models([args.checkpoint] + ([args.compare] if args.compare else []))
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn shuts down on Ctrl-C, then re-raises it
        serve(Explorer(models, gallery), args.host, args.port)
    print("softmask explore: stopped", file=sys.stderr)
    return 0


def cmd_gradcam(args: argparse.Namespace) -> int:
    from softmask.data.images import BadSample
    from softmask.viz.gradcam import gradcam_figures

    checkpoints = [args.checkpoint] + ([args.compare] if args.compare else [])
    try:
        results, written = gradcam_figures(checkpoints, args.image, args.text, args.out, args.layer, args.source)
    except BadSample as exc:  # an unreadable image: one line, not the data.on_bad_sample advice
        print(f"softmask: error: {exc}", file=sys.stderr)
        return 2
    for label, result in results:
        print(f"ITM match probability {result['itm_prob']:.4f}  {label}  "
              f"({result['source']}, fusion layer {result['layer']})")
    for path in written:
        print(f"wrote {path}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from softmask.eval.vqa_official import read_official_files, score

    predictions, annotations = read_official_files(args.results, args.questions, args.annotations)
    try:
        result = score(predictions, annotations, rules=args.rules)
    except ValueError as exc:
        raise ConfigError(f"{args.results}: {exc}") from None
    print(f"overall accuracy {result['overall']:.2f}  ({result['questions']} questions, the official "
          f"evaluator's {args.rules} rules)")
    for section, title in (("perAnswerType", "answer type"), ("perQuestionType", "question type")):
        print(f"per {title}:")
        for name, value in result[section].items():
            print(f"  {name:32s} {value:6.2f}")
    if args.json:
        _write_json(args.json, result)
    return 0


def cmd_world(args: argparse.Namespace) -> int:
    import time

    from softmask.world import generate_world

    start = time.perf_counter()
    try:
        summary = generate_world(args.out, images=args.images, size=args.size, seed=args.seed, shards=args.shards,
                                 workers=args.workers, max_objects=args.max_objects,
                                 held_out_pairs=args.held_out_pairs)
    except ValueError as exc:  # a bad argument: one line, like the other errors
        print(f"softmask: error: {exc}", file=sys.stderr)
        return 2
    splits = ", ".join(f"{n} {name}" for name, n in summary["splits"].items())
    pairs = ", ".join(" ".join(pair) for pair in summary["heldout_pairs"]) or "no pair"
    print(f"wrote {summary['images']} images ({splits}) at {summary['size']} px to {args.out} "
          f"in {time.perf_counter() - start:.1f} s; held out of train/val: {pairs}")
    if summary["shards"]:
        print(f"wrote {len(summary['shards'])} shard(s) under {Path(args.out) / 'shards'}")
    return 0


def cmd_text_assignment(args: argparse.Namespace) -> int:
    import json

    from softmask.data.annotations import load_annotations
    from softmask.data.dataset import expand_entries, is_shard_entry
    from softmask.data.text_assignment import text_assignment_records

    cfg = load_config(args.config, args.overrides)
    files = expand_entries(cfg.data.train)
    if not files:
        raise ConfigError("data.train is empty: give data.train=[FILE.json,...], the image-caption files to draw from")
    shards = [entry for entry in files if is_shard_entry(entry)]
    if shards:
        raise ConfigError(f"text-assignment reads JSON annotation files, not shards ({shards[0]})")
    records = load_annotations(files, cfg.data.image_root, cfg.data.path_map)
    items = text_assignment_records(records, args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(items))
    print(f"wrote {len(items)} text-assignment records from {len(records)} image-caption records to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="softmask", description=__doc__.split("\n\n")[0])
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="print the resolved config, parameter counts and checkpoint loading")
    _add_config_args(info)
    info.set_defaults(func=cmd_info)

    export = sub.add_parser("export", help="build the model (loading its init checkpoints) and save_pretrained it")
    _add_config_args(export)
    export.add_argument("--out", required=True, help="output folder")
    export.set_defaults(func=cmd_export)

    pretrain = sub.add_parser("pretrain", help="pretrain (ALBEF objectives) on JSON annotations or shards")
    _add_config_args(pretrain)
    pretrain.set_defaults(func=cmd_pretrain)

    vision = sub.add_parser("pretrain-vision", help="pretrain the image encoder alone on labelled images "
                            "(a world's objects, or an ImageNet-style folder); the result loads as model.vision.init")
    _add_config_args(vision, default=str(packaged_config("vision/world_vit.yaml")))
    vision.set_defaults(func=cmd_pretrain_vision)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    step = bench_sub.add_parser("step", help="training-step time, pairs/s, peak memory and MFU per method")
    _add_config_args(step)
    step.add_argument("--methods", default="albef", help="comma-separated methods, e.g. albef,softmask")
    step.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    step.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    step.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    step.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    step.add_argument("--text-fill", type=float, default=1.0,
                      help="about the share of real tokens in the padded captions (1 = no padding; the world's "
                           "captions padded to the longest of a batch of 32: 0.5)")
    step.add_argument("--json", action="store_true", help="print one JSON object")
    step.set_defaults(func=cmd_bench)

    finetune = sub.add_parser("finetune", help="fine-tune a pretrained model on a task, then evaluate it")
    finetune.add_argument("task", choices=FINETUNE_TASKS, help="the downstream task")
    _add_config_args(finetune)
    finetune.set_defaults(func=cmd_finetune)

    evaluate = sub.add_parser("evaluate", help="evaluate a checkpoint on a task, or on the world's probes")
    evaluate.add_argument("task", choices=("world", *FINETUNE_TASKS),
                          help="world (zero-shot retrieval, minimal edits, grounding) or a downstream task")
    evaluate.add_argument("--checkpoint", required=True, help="run folder, checkpoint file or save_pretrained folder")
    evaluate.add_argument("--config", default=None, help="the task's YAML config (not for world)")
    evaluate.add_argument("--world", default="", help="a folder written by `softmask world`")
    evaluate.add_argument("--split", choices=EVAL_SPLITS, default=None,
                          help="one split (default: finetune.eval_splits)")
    evaluate.add_argument("--out", default=None,
                          help="a task's folder for metrics_SPLIT.json and result files (default: inside the "
                               "evaluated model's folder, eval/TASK/; output_dir=DIR works as --out DIR)")
    evaluate.add_argument("--overwrite", action="store_true",
                          help="a task: replace metrics files already in --out")
    evaluate.add_argument("--k", type=int, default=16, help="world: retrieval candidates re-ranked by ITM (>= 1)")
    evaluate.add_argument("--layer", type=int, default=None, help="world: Grad-CAM fusion layer for grounding")
    evaluate.add_argument("--grounding-captions", type=int, default=500,
                          help="world: how many test captions the grounding metrics score (the first N)")
    evaluate.add_argument("--mlm-captions", type=int, default=600,
                          help="world: captions per word group for what the fusion reads (MLM with the own vs a "
                               "shuffled image; 0 skips it)")
    evaluate.add_argument("--shortcut-pairs", type=int, default=200,
                          help="world: mismatched pairs that score itm_shortcut (does a soft-masked image alone make "
                               "ITM say match; 0 skips it)")
    evaluate.add_argument("--json", default="", help="also write the metrics to this JSON file: {split: metrics} "
                                                      "for a task (one split too), the flat metrics for world")
    evaluate.add_argument("--device", default=None, help="world: cpu or cuda (default: cuda when available)")
    evaluate.add_argument("--examples", default="",
                          help="world: write the top-5 images retrieved for a few test captions to this JSON file")
    evaluate.add_argument("overrides", nargs="*", metavar="key=value", help="a task's config overrides")
    evaluate.set_defaults(func=cmd_evaluate)

    from softmask.demo import BUDGETS

    demo = sub.add_parser("demo", help="worlds -> image encoder -> pretrain albef and softmask -> evaluate -> "
                          "report.md")
    demo.add_argument("--out", default="runs/demo", help="output folder (a rerun reuses its worlds)")

    def default(key: str) -> str:
        ours, full = BUDGETS["default"][key], BUDGETS["full"][key]
        return f"{ours}" + (f"; {full} with --budget full" if full != ours else "")

    demo.add_argument("--budget", choices=list(BUDGETS), default="default",
                      help="default: about 19 min on 2 cores; full: the recipe of docs/results.md, seed 0 "
                      "(about 28 min: twice the vision-language steps, a larger evaluation)")
    for option, key, what in (
            ("--images", "images", "world size"), ("--size", "size", "image side in pixels"),
            ("--steps", "steps", "training steps per method"), ("--batch-size", "batch_size", "pairs per step"),
            ("--seed", "seed", "training seed"), ("--world-seed", "world_seed", "world seed (the study's world)"),
            ("--vision-images", "vision_images", "size of the image encoder's world"),
            ("--vision-steps", "vision_steps", "image-encoder pretraining steps"),
            ("--vision-batch-size", "vision_batch_size", "images per image-encoder step"),
            ("--vision-world-seed", "vision_world_seed", "the image encoder's world seed"),
            ("--eval-k", "eval_k", "retrieval candidates re-ranked by ITM"),
            ("--grounding-captions", "grounding_captions", "test captions the grounding metrics score"),
            ("--mlm-captions", "mlm_captions", "test captions per word group for what the fusion reads"),
            ("--shortcut-pairs", "shortcut_pairs", "mismatched test pairs that score the ITM shortcut")):
        demo.add_argument(option, type=int, dest=key, help=f"{what} (default {default(key)})")
    demo.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for both runs")
    demo.set_defaults(func=cmd_demo)
    gradcam = sub.add_parser("gradcam", help="word-level Grad-CAM of the ITM match logit: one overlay per word")
    gradcam.add_argument("--checkpoint", required=True,
                         help="a run folder, a checkpoint file in its checkpoints/, or a save_pretrained folder")
    gradcam.add_argument("--image", required=True, help="image file")
    gradcam.add_argument("--text", required=True, help="the caption")
    gradcam.add_argument("--out", required=True, help="output folder for the PNGs")
    gradcam.add_argument("--layer", type=int, default=None,
                         help="fusion layer, 0-based (default: the run's softmask.layer, else the 3rd fusion layer)")
    gradcam.add_argument("--source", choices=MAP_SOURCES, default=MAP_SOURCES[0],
                         help="Grad-CAM of the ITM match logit, or the plain cross-attention")
    gradcam.add_argument("--compare", default=None, metavar="PATH2",
                         help="a second model: also write compare.png with a row per model")
    gradcam.set_defaults(func=cmd_gradcam)

    explore = sub.add_parser("explore", help="a local web page: per-word Grad-CAM, ITM/ITC scores and retrieval for "
                                             "your image and caption, one model or two side by side")
    explore.add_argument("--checkpoint", required=True,
                         help="a run folder, a checkpoint file in its checkpoints/, or a save_pretrained folder")
    explore.add_argument("--compare", default=None, metavar="PATH2", help="a second model, shown beside the first")
    explore.add_argument("--images", default=None, metavar="DIR",
                         help="images to pick from: a `softmask world` folder (its test split; enables top-5 "
                              "retrieval) or any folder of PNG/JPEG files; uploads work either way")
    explore.add_argument("--host", default="127.0.0.1",
                         help="address to listen on (default 127.0.0.1: this machine only; the page has no login)")
    explore.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    explore.set_defaults(func=cmd_explore)

    score_cmd = sub.add_parser("score", help="score a results file as the official evaluator does (VQA)")
    score_cmd.add_argument("task", choices=("vqa",))
    score_cmd.add_argument("--results", required=True,
                           help="results in the evaluation server's format: [{question_id, answer}, ...]")
    score_cmd.add_argument("--questions", required=True, help="the VQA questions file ({questions: [...]})")
    score_cmd.add_argument("--annotations", required=True, help="the VQA annotations file ({annotations: [...]})")
    score_cmd.add_argument("--rules", choices=VQA_RULES, default=VQA_RULES[0],
                           help="the official evaluator's version: 2021 (its repository's current code, the "
                                "default) or 2017 (its v2.0 release, which most codebases copy)")
    score_cmd.add_argument("--json", default="",
                           help="also write {overall, perAnswerType, perQuestionType, questions, rules} here")
    score_cmd.set_defaults(func=cmd_score)

    ta = sub.add_parser("text-assignment", help="NLVR2's text-assignment records (ALBEF's three-way task: the "
                        "caption describes image 1, image 2 or neither) made from data.train's image-caption files")
    _add_config_args(ta)
    ta.add_argument("--out", required=True, help="the JSON file to write ({images, sentence, label} records)")
    ta.add_argument("--seed", type=int, default=0, help="seed of the random draws (default 0)")
    ta.set_defaults(func=cmd_text_assignment)

    world = sub.add_parser("world", help="generate the synthetic image-caption world (images and annotations)")
    world.add_argument("--out", required=True, help="output folder (images/, annotations/, world.json)")
    world.add_argument("--images", type=int, default=10000, help="number of images (80/10/10 train/val/test)")
    world.add_argument("--size", type=int, default=128, help="image side in pixels")
    world.add_argument("--seed", type=int, default=0, help="world seed (same seed, same bytes)")
    world.add_argument("--shards", action="store_true", help="also write webdataset shards of the pretraining pairs")
    world.add_argument("--workers", type=int, default=None, help="drawing processes (default: up to 2)")
    world.add_argument("--max-objects", type=int, default=4,
                       help="at most this many objects per image, 1-4 (an easier world for a first curriculum stage)")
    world.add_argument("--held-out-pairs", type=int, default=4, metavar="N",
                       help="(colour, shape) pairs kept out of train/val, 0-6 (0: every pair is trained on, as for "
                            "the world that pretrains the image encoder)")
    world.set_defaults(func=cmd_world)
    return parser


def _continue_command(argv: list[str], resume_override: str) -> str:
    """The command line that continues an interrupted one: the same words, with ``resume_override``
    in place of any ``resume=`` given."""
    words = ["softmask", *(a for a in argv if not a.startswith("resume="))]
    return shlex.join([*words, resume_override] if resume_override else words)


def _first_bad_sample(exc: Exception) -> str:
    """The "path: reason" of a BadSample, also when a DataLoader worker re-raised it with its traceback."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    last = lines[-1] if lines else type(exc).__name__
    return last.split("BadSample: ", 1)[-1]


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def parse_command_line(argv: list[str]) -> argparse.Namespace:
    """The command line's arguments, parsed without running anything (argparse exits on an error)."""
    parser = build_parser()
    # TASK and the key=value overrides are both positionals, which argparse fills before the first option:
    # overrides given after --config come back as extras, appended here in order.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(item.startswith("-") or "=" not in item for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    from softmask.data.images import BadSample
    from softmask.train.stop import Interrupted

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_command_line(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    # SIGTERM (what clusters send before preempting a job) ends a command like Ctrl-C does; training
    # catches both itself, to stop at a step boundary with a checkpoint.
    previous_sigterm = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        refuse_repeated_keys(getattr(args, "overrides", []))
        return args.func(args)
    except (ConfigError, CheckpointError, FileNotFoundError, TrainingError) as exc:
        print(f"softmask: error: {exc}", file=sys.stderr)
        return 2
    except BadSample as exc:  # an unreadable image: in training, with data.on_bad_sample=raise
        training = args.command in ("pretrain", "pretrain-vision", "finetune")
        hint = (" (data.on_bad_sample=raise stops at the first bad sample; 'skip' skips and counts them)"
                if training else "")
        print(f"softmask: error: {_first_bad_sample(exc)}{hint}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        how = (f"to continue exactly: {_continue_command(argv, exc.resume_override)}" if exc.resume_override
               else f"to continue, run the same command again: {_continue_command(argv, '')}")
        print(f"softmask: {exc}; {how}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("softmask: interrupted (a second Ctrl-C, or before training started): nothing more was saved; a "
              "training run continues from its newest checkpoint with resume=auto", file=sys.stderr)
        return 130
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous_sigterm)


if __name__ == "__main__":
    sys.exit(main())
