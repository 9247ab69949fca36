"""``generate_world``: draw the images and write every annotation file of the synthetic world.

Layout of ``out_dir`` (image paths in every file are relative to it, so ``data.image_root=out_dir``):

- ``images/NNNNNN.png``: image ``i`` (0-based); split by ``i % 10``: 8 -> val, 9 -> test, else train.
- ``annotations/pretrain.json``: train images, ``{"image", "caption": [5 captions]}`` (ALBEF pretrain).
- ``annotations/retrieval_{train,val,test}.json``: train ``{"image", "caption": str, "image_id": int}``
  per caption; val/test ``{"image", "caption": [5 captions]}`` per image.
- ``annotations/vqa_{split}.json``: ``{"question_id", "question", "answer": [10], "image", "dataset":
  "vqa", "type", "query"}``; ``answer_list.json``: every possible answer.
- ``annotations/ve_{split}.json``: ``{"image", "sentence", "label", "claim"}`` (labels: see
  :mod:`softmask.world.task_items`).
- ``annotations/nlvr_{split}.json``: ``{"images": [left, right], "sentence", "label": "True"|"False",
  "claim"}``; ``nlvr_ta.json``: train pairs ``{"images", "sentence", "label": 0|1|2}``.
- ``annotations/minimal_edits.json``: test images only, see :func:`tasks.minimal_edit_items`.
- ``annotations/objects.json``: every image's scene (:func:`scene.make_scene`) with its captions
  (:mod:`softmask.world.captions`: text, kind, ``links`` word -> object/attribute, ``refs``, ``relations``).
- ``world.json``: the summary returned by :func:`generate_world`.

All JSON is compact with sorted keys; extra keys (``type``, ``query``, ``claim``) are ignored by ALBEF-style
readers and give each item's meaning for analysis.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

from softmask.data.workers import pool_worker_signals
from softmask.world import vocab
from softmask.world.captions import make_captions
from softmask.world.pairs import nlvr_items, text_assignment_items
from softmask.world.render import encode_png
from softmask.world.scene import (
    HELD_OUT_PAIRS,
    MAX_OBJECTS,
    SPLIT_NAMES,
    heldout_pairs,
    image_random,
    make_scene,
    world_random,
)
from softmask.world.task_items import minimal_edit_items, ve_items, vqa_items
from softmask.world.vocab import SHAPES

FORMAT_VERSION = 1
MIN_SIZE = 32
PARALLEL_FROM = 200  # fewer images than this are made in-process
NLVR_STREAM = {"train": 1, "val": 2, "test": 3}
TA_STREAM = 4


def _dumps(data) -> str:
    """Compact JSON with sorted keys (same data -> same text)."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _fragment(items: list) -> str:
    """Items as the inside of a compact JSON list (joining fragments with "," gives the whole list)."""
    return ",".join(_dumps(item) for item in items)


def _slim(scene: dict) -> dict:
    """What the two-image tasks need of a scene: attributes, relations, captions' meaning."""
    keys = ("id", "shape", "colour", "size", "pattern")
    return {
        "image": scene["image"], "split": scene["split"], "relations": scene["relations"],
        "objects": [{key: obj[key] for key in keys} for obj in scene["objects"]],
        "captions": [{key: c[key] for key in ("caption", "refs", "relations")} for c in scene["captions"]],
    }


def _image_job(job: tuple) -> dict:
    """Draw, write and annotate one image (runs in a worker process).

    Returns the scene's slim form (for the two-image tasks) and, serialised here to spread the work, its
    records of every per-image annotation file as JSON list fragments.
    """
    out_dir, seed, index, size, heldout, max_objects = job
    r = image_random(seed, index)
    scene, pixels = make_scene(r, index, size, heldout, max_objects)
    Path(out_dir, scene["image"]).write_bytes(encode_png(pixels))
    split = scene["split"]
    forbidden = frozenset() if split == "test" else frozenset(heldout)
    scene["captions"] = make_captions(scene, r)
    texts = [c["caption"] for c in scene["captions"]]
    if split == "train":
        retrieval = [{"image": scene["image"], "caption": text, "image_id": index} for text in texts]
    else:
        retrieval = [{"image": scene["image"], "caption": texts[:5]}]
    records = {
        "vqa": vqa_items(scene, r, forbidden),
        "ve": ve_items(scene, r, forbidden),
        "edits": minimal_edit_items(scene, r) if split == "test" else [],
        "retrieval": retrieval,
        "pretrain": [{"image": scene["image"], "caption": texts}] if split == "train" else [],
        "objects": [scene],
    }
    return {"scene": _slim(scene), "json": {key: _fragment(items) for key, items in records.items()},
            "counts": {key: len(items) for key, items in records.items()}}


def _run_jobs(jobs: list[tuple], workers: int) -> list[dict]:
    """Results of :func:`_image_job` in job order, on ``workers`` processes."""
    if workers <= 1 or len(jobs) < PARALLEL_FROM:
        return [_image_job(job) for job in jobs]
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    chunk = max(1, min(64, len(jobs) // (workers * 8)))
    with context.Pool(workers, initializer=pool_worker_signals) as pool:
        return list(pool.imap(_image_job, jobs, chunksize=chunk))


def _joined(results: list[dict], key: str, split: str | None = None) -> tuple[str, int]:
    """(JSON text, record count) of a whole list from the results' fragments (of one split, or all)."""
    chosen = [res for res in results if split is None or res["scene"]["split"] == split]
    text = "[" + ",".join(res["json"][key] for res in chosen if res["json"][key]) + "]"
    return text, sum(res["counts"][key] for res in chosen)


def _listed(items: list) -> tuple[str, int]:
    return _dumps(items), len(items)


def _annotation_files(results: list[dict], seed: int, heldout: list[tuple]) -> dict[str, tuple[str, int]]:
    """Every annotation file's (JSON text, record count), by file name."""
    scenes = [result["scene"] for result in results]
    files = {"pretrain.json": _joined(results, "pretrain", "train")}
    for split in SPLIT_NAMES:
        forbidden = frozenset() if split == "test" else frozenset(heldout)
        in_split = [scene for scene in scenes if scene["split"] == split]
        files[f"retrieval_{split}.json"] = _joined(results, "retrieval", split)
        files[f"vqa_{split}.json"] = _joined(results, "vqa", split)
        files[f"ve_{split}.json"] = _joined(results, "ve", split)
        files[f"nlvr_{split}.json"] = _listed(nlvr_items(in_split, world_random(seed, NLVR_STREAM[split]), forbidden))
    train = [scene for scene in scenes if scene["split"] == "train"]
    files["nlvr_ta.json"] = _listed(text_assignment_items(train, world_random(seed, TA_STREAM)))
    files["answer_list.json"] = _listed(vocab.answer_list())
    files["minimal_edits.json"] = _joined(results, "edits")
    files["objects.json"] = _joined(results, "objects")
    return files


def _write_shards(out: Path, pretrain: list[dict], samples_per_shard: int) -> list[str]:
    """Webdataset shards of the pretraining pairs (see :func:`softmask.data.shards.write_shards`)."""
    from softmask.data.annotations import Record
    from softmask.data.shards import write_shards

    records = [Record(image=str(out / item["image"]), captions=item["caption"], source="pretrain.json", index=i)
               for i, item in enumerate(pretrain)]
    paths = write_shards(records, str(out / "shards"), samples_per_shard)
    return [os.path.relpath(path, out) for path in paths]


def _check_arguments(images: int, size: int, seed: int, workers: int | None) -> None:
    if images < 1:
        raise ValueError(f"images must be >= 1, got {images}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be >= {MIN_SIZE} pixels, got {size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")


def generate_world(out_dir: str | os.PathLike, images: int = 10000, size: int = 128, seed: int = 0,
                   shards: bool = False, workers: int | None = None, samples_per_shard: int = 1000,
                   max_objects: int = MAX_OBJECTS, held_out_pairs: int = HELD_OUT_PAIRS) -> dict:
    """Generate the synthetic image-caption world into ``out_dir``.

    Writes ``images/NNNNNN.png``, ``annotations/*.json`` (pretrain, retrieval, VQA, VE, NLVR, text
    assignment, minimal edits, objects, answer list), ``world.json`` (this summary) and, with
    ``shards``, webdataset shards of the pretraining pairs under ``shards/``. The same arguments give
    byte-identical files whatever ``workers`` is.

    Args:
        out_dir: output folder (created); image paths in the annotations are relative to it.
        images: number of images; image ``i`` is in val if ``i % 10 == 8``, test if ``9``, else train.
        size: image side in pixels (>= 32).
        seed: world seed (>= 0); image ``i`` draws from ``numpy.random.default_rng([seed, i])``.
        shards: also write ``shards/shard-NNNNNN.tar`` (one train image and its captions per sample).
        workers: processes drawing images (default: up to 2, by CPU count).
        samples_per_shard: samples per shard file.
        max_objects: at most this many objects per image (1-4; fewer makes an easier world, e.g. a
            first curriculum stage); the default 4 keeps the full world. Other images stay the same:
            each image's count is drawn as usual and then capped.
        held_out_pairs: how many (colour, shape) pairs appear only in test images (0-6; distinct colours
            and shapes). 0 shows every pair in training: a world for pretraining the image encoder,
            the stand-in for ImageNet, which has seen every combination a caption can name.

    Returns:
        A summary: seed, size, images per split, the held-out (colour, shape) pairs, records per file,
        the vocabulary, and the shard paths (relative to ``out_dir``).
    """
    _check_arguments(images, size, seed, workers)
    if not 1 <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"max_objects must be in [1, {MAX_OBJECTS}], got {max_objects}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    if not 0 <= held_out_pairs <= len(SHAPES):
        raise ValueError(f"held_out_pairs must be in [0, {len(SHAPES)}], got {held_out_pairs}")
    heldout = heldout_pairs(seed, held_out_pairs)
    workers = workers or max(1, min(2, os.cpu_count() or 1))
    results = _run_jobs([(str(out), seed, index, size, heldout, max_objects) for index in range(images)], workers)
    files = _annotation_files(results, seed, heldout)
    for name, (text, _) in files.items():
        (out / "annotations" / name).write_text(text + "\n", encoding="utf-8")
    splits = {name: sum(r["scene"]["split"] == name for r in results) for name in SPLIT_NAMES}
    pretrain = json.loads(files["pretrain.json"][0])
    summary = {
        "format_version": FORMAT_VERSION, "seed": seed, "size": size, "images": images, "splits": splits,
        "max_objects": max_objects,
        "heldout_pairs": [list(pair) for pair in heldout],
        "records": {name: count for name, (_, count) in files.items()},
        "vocabulary": {key: list(values) for key, values in vocab.VALUES.items()},
        "shards": _write_shards(out, pretrain, samples_per_shard) if shards else [],
    }
    (out / "world.json").write_text(_dumps(summary) + "\n", encoding="utf-8")
    return summary
