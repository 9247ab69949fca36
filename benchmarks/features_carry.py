"""What a world model's features carry about each object, by linear probes: where between the pixels and the
answer an attribute gets lost.

    python benchmarks/features_carry.py --world WORLD --checkpoint RUN [--checkpoint RUN ...]
        [--encoder VISION_RUN/model] [--max-items 6000]

Three places, each a linear probe (softmax regression on a random half, scored on the other half;
:func:`softmask.eval.probe.linear_probe_accuracy`) of every test object's shape, colour, size and pattern:

1. ``image_box_<attribute>``: the image encoder's output tokens averaged over the object's box (what the
   pretrained encoder's heads read), for ``--encoder`` (a `softmask pretrain-vision` folder) and for each
   checkpoint's image encoder after vision-language pretraining;
2. ``image_centre_<attribute>``: the one output token at the object's centre (what a cross-attention that
   picks one patch sees);
3. ``fused_<attribute>_own`` / ``_shuffled``: the fusion encoder's output at the caption's shape word, for
   the test captions that name the object's shape but not the probed attribute (so the text cannot carry
   it), with the caption's own image and with a random other one; ``fused_<attribute>_n`` items. Own well
   above shuffled: the fusion brings that attribute of the named object from the image into the caption;
4. ``edit_probe_<attribute>`` against ``edit_head_<attribute>``: the world's minimal edits (a true caption
   and the same caption with one attribute or relation changed, on the same image). ITM's match logit (what
   it ranks by) is linear in the fused summary it reads (``fused_summary``), so its head rejects an edit
   when the head's direction separates the two summaries; ``edit_probe`` is a fresh linear probe of their difference
   (random sign, trained on half the edits, scored on the other half), ``edit_head`` the trained head on
   the same edits. A probe far above the head: the fused summary tells the edit apart, but ITM's training
   never asked it to (its negatives rarely differ in that attribute alone).

Printed as one JSON line per model. Chance: shape 16.7, colour 12.5, size and pattern 33.3 (each a little
higher for a probe that learns the values' frequencies).
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

import torch

from softmask.checkpoint_files import CheckpointError
from softmask.config import ConfigError
from softmask.data.labelled_images import LabelledImages
from softmask.data.transforms import EvalTransform
from softmask.eval.probe import linear_probe_accuracy
from softmask.eval.world import WorldEncoder
from softmask.inference import load_model
from softmask.runs import tokenizer_source
from softmask.tasks.image_pretrain import box_pool, load_image_encoder
from softmask.world.objects import OBJECT_ATTRIBUTES, world_objects

FUSED_ATTRIBUTES = ("colour", "size", "pattern")  # probed at the shape word: every caption names the shape


def _probe(features: torch.Tensor, labels: torch.Tensor, classes: int, seed: int = 0) -> float | None:
    """Held-out accuracy (%) of a linear probe, to 0.1; None with fewer than 4 rows."""
    accuracy = linear_probe_accuracy(features, labels, classes, steps=500, seed=seed)
    return None if math.isnan(accuracy) else round(accuracy, 1)


def centre_tokens(patch_tokens: torch.Tensor, boxes: torch.Tensor, image_size: int) -> torch.Tensor:
    """The patch token under each box's centre: (B, N, D) tokens of a g x g grid (row-major), (B, K, 4)
    ``[x0, y0, x1, y1]`` boxes in pixels of an ``image_size`` square -> (B, K, D)."""
    grid = int(round(patch_tokens.shape[1] ** 0.5))
    patch = image_size / grid
    cx = ((boxes[..., 0] + boxes[..., 2]) / 2 / patch).long().clamp(0, grid - 1)
    cy = ((boxes[..., 1] + boxes[..., 3]) / 2 / patch).long().clamp(0, grid - 1)
    index = (cy * grid + cx)[..., None].expand(-1, -1, patch_tokens.shape[-1])
    return torch.gather(patch_tokens, 1, index)


@torch.no_grad()
def object_features(visual_encoder, data: LabelledImages, batch_size: int = 200
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(box-pooled (M, D), centre token (M, D), labels (M, 4))`` of every object of ``data``; labels are
    the value indices of :data:`OBJECT_ATTRIBUTES` in that order."""
    size = visual_encoder.cfg.image_size
    transform = EvalTransform(size)
    pooled, centres, labels = [], [], []
    for start in range(0, len(data), batch_size):
        rows = slice(start, start + batch_size)
        tokens = visual_encoder(transform(data.images[rows]))[:, 1:]
        boxes = data.labels["boxes"][rows].to(tokens.dtype)
        objects = data.labels["objects"][rows]
        valid = objects[..., 0] != -100
        pooled.append(box_pool(tokens, boxes, size)[valid])
        centres.append(centre_tokens(tokens, boxes, size)[valid])
        labels.append(objects[valid])
    return torch.cat(pooled), torch.cat(centres), torch.cat(labels)


def image_probes(visual_encoder, data: LabelledImages) -> dict[str, float | None]:
    """``image_box_<attribute>`` and ``image_centre_<attribute>`` (%, see the module docstring)."""
    pooled, centres, labels = object_features(visual_encoder, data)
    out = {}
    for kind, features in (("box", pooled), ("centre", centres)):
        for i, attribute in enumerate(OBJECT_ATTRIBUTES):
            out[f"image_{kind}_{attribute}"] = _probe(features, labels[:, i], int(labels[:, i].max()) + 1)
    return out


def shape_word_items(scenes: list[dict]) -> list[dict]:
    """One item per shape word of each test caption: ``image``, ``caption``, ``word`` (the shape word as
    written), ``object`` (that object's attribute values) and ``named`` (the attributes the caption names
    for that object)."""
    items = []
    for scene in scenes:
        if scene["split"] != "test":
            continue
        objects = {o["id"]: o for o in scene["objects"]}
        for caption in scene["captions"]:
            words = caption["caption"].lower().rstrip(".").split()
            for link in caption["links"]:
                if link["attribute"] != "shape":
                    continue
                named = {other["attribute"] for other in caption["links"] if other["object"] == link["object"]}
                items.append({"image": scene["image"], "caption": caption["caption"],
                              "word": words[link["word"]].strip(",.;"), "object": objects[link["object"]],
                              "named": named})
    return items


def fused_batches(model, enc: WorldEncoder, images: list[str], captions: list[str], batch_size: int = 128):
    """Each chunk of ``(image, caption)`` pairs fused: yields ``(ids (b, T), mask (b, T), fused (b, T, D))``."""
    for start in range(0, len(captions), batch_size):
        ids, mask = enc.text(captions[start:start + batch_size])
        image = model.encode_image(enc.pixels(images[start:start + batch_size]))
        yield ids, mask, model.fuse(model.encode_text(ids, mask), mask, image)


@torch.no_grad()
def fused_word_features(model, enc: WorldEncoder, items: list[dict], images: list[str]) -> torch.Tensor:
    """(M, D): the fusion encoder's output at each item's shape word (its first occurrence), the caption
    fused with ``images[i]`` (its own image, or another)."""
    vocab = enc.tokenizer.wordpiece.get_vocab()
    words = torch.tensor([vocab[item["word"]] for item in items])
    features, start = [], 0
    for ids, _, fused in fused_batches(model, enc, images, [item["caption"] for item in items]):
        positions = (ids == words[start:start + len(ids), None]).int().argmax(1)
        features.append(fused[torch.arange(len(ids)), positions])
        start += len(ids)
    return torch.cat(features)


def fused_probes(model, enc: WorldEncoder, items: list[dict], seed: int = 0) -> dict[str, float | None]:
    """``fused_<attribute>_own`` / ``_shuffled`` (%; None with fewer than 4 items) and ``fused_<attribute>_n``
    (see the module docstring)."""
    rng = random.Random(seed)
    pool = sorted({item["image"] for item in items})
    shown = {"own": [item["image"] for item in items],
             "shuffled": [rng.choice([i for i in pool if i != item["image"]] or pool) for item in items]}
    out: dict[str, float | None] = {}
    for condition, images in shown.items():
        features = fused_word_features(model, enc, items, images)
        for attribute in FUSED_ATTRIBUTES:
            keep = [i for i, item in enumerate(items) if attribute not in item["named"]]
            values = sorted({items[i]["object"][attribute] for i in keep})
            labels = torch.tensor([values.index(items[i]["object"][attribute]) for i in keep], dtype=torch.long)
            out[f"fused_{attribute}_{condition}"] = _probe(features[keep], labels, max(2, len(values)), seed)
            out[f"fused_{attribute}_n"] = len(keep)
    return out


@torch.no_grad()
def fused_summaries(model, enc: WorldEncoder, images: list[str], captions: list[str]) -> torch.Tensor:
    """(M, D): what ITM's head reads (``fused_summary``) for each (image, caption) pair."""
    return torch.cat([model.fused_summary(fused, mask) for _, mask, fused in fused_batches(model, enc, images,
                                                                                              captions)])


def edit_probes(model, enc: WorldEncoder, edits: list[dict], per_attribute: int = 600, seed: int = 0
                ) -> dict[str, float | None]:
    """``edit_probe_<attribute>``, ``edit_head_<attribute>`` (%) and ``edit_<attribute>_n`` for the first
    ``per_attribute`` minimal edits of each attribute (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    pairs: dict[str, list[tuple[str, str, str]]] = {}
    for item in edits:
        for distractor in item["distractors"]:
            chosen = pairs.setdefault(distractor["attribute"], [])
            if len(chosen) < per_attribute:
                chosen.append((item["image"], item["caption"], distractor["caption"]))
    head = model.itm_head.weight[1]  # the match logit's direction (ITM ranks by the match logit)
    out: dict[str, float | None] = {}
    for attribute, chosen in pairs.items():
        images = [image for image, _, _ in chosen]
        true = fused_summaries(model, enc, images, [caption for _, caption, _ in chosen])
        edited = fused_summaries(model, enc, images, [caption for _, _, caption in chosen])
        difference = true - edited  # (M, D)
        sign = torch.randint(0, 2, (len(chosen),), generator=gen)  # one orientation per edit: no pair in both halves
        out[f"edit_probe_{attribute}"] = _probe(difference * (2 * sign[:, None] - 1), sign, 2, seed)
        out[f"edit_head_{attribute}"] = round(100.0 * float((difference @ head > 0).float().mean()), 1)
        out[f"edit_{attribute}_n"] = len(chosen)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", required=True, help="a folder written by `softmask world`")
    parser.add_argument("--checkpoint", action="append", default=[], help="a `softmask pretrain` run (repeatable)")
    parser.add_argument("--encoder", default="", help="a `softmask pretrain-vision` model folder (RUN/model)")
    parser.add_argument("--max-items", type=int, default=6000, help="shape words probed in the fused tokens")
    parser.add_argument("--edits", type=int, default=600, help="minimal edits per attribute")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.checkpoint and not args.encoder:
        parser.error("give --checkpoint RUN or --encoder VISION_RUN/model (or both)")
    world = Path(args.world)
    annotations = world / "annotations" / "objects.json"
    if not annotations.is_file():
        parser.error(f"--world {world}: no annotations/objects.json (not a folder written by `softmask world`)")
    items = shape_word_items(json.loads(annotations.read_text()))
    edits = json.loads((world / "annotations" / "minimal_edits.json").read_text())
    items = random.Random(args.seed).sample(items, min(args.max_items, len(items)))
    data = {}

    def objects(size: int) -> LabelledImages:
        if size not in data:
            data[size] = world_objects(world, "test", size)
        return data[size]

    if args.encoder:
        try:
            encoder = load_image_encoder(args.encoder).eval()
        except (FileNotFoundError, CheckpointError, OSError) as err:
            parser.error(f"--encoder {args.encoder}: {err}")
        visual = encoder.visual_encoder
        print(json.dumps({"model": args.encoder, **image_probes(visual, objects(visual.cfg.image_size))}), flush=True)
    for checkpoint in args.checkpoint:
        try:
            model = load_model(checkpoint)[0].eval()
        except (CheckpointError, ConfigError, OSError) as err:
            parser.error(f"--checkpoint {checkpoint}: {err}")
        visual = model.visual_encoder
        enc = WorldEncoder(model, world, tokenizer_source(checkpoint))
        print(json.dumps({"model": checkpoint, **image_probes(visual, objects(visual.cfg.image_size)),
                          **fused_probes(model, enc, items, args.seed),
                          **edit_probes(model, enc, edits, args.edits, args.seed)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
