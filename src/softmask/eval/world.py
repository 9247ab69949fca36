"""Evaluations on a synthetic world (``softmask world``): zero-shot retrieval on its test split,
minimal-edit accuracy (true caption vs one-attribute distractors, by ITM and by ITC), grounding of
word Grad-CAM against the object boxes (pointing game, energy in box), what the fusion reads from
the image (:mod:`softmask.eval.mlm_reads`), whether ITM took the soft masks' shortcut
(:mod:`softmask.eval.shortcut`), and the ITM loss of ordinary test pairs (:mod:`softmask.eval.itm_pairs`).

Each metric is split by whether the object concerned is the scene's most salient one or a secondary
one, and by whether the image holds a held-out (colour, shape) combination, since the paper's claim is
that soft masks make a model learn more than the most discriminative region.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from softmask.config import ConfigError, SoftMaskConfig, default_gradcam_layer
from softmask.data.images import load_image, to_tensor
from softmask.data.text import open_tokenizer, pre_caption
from softmask.data.transforms import EvalTransform
from softmask.eval.grounding import energy_in_box, pointing_hit
from softmask.eval.itm_pairs import itm_test_loss
from softmask.eval.retrieval import compute_features, evaluate_retrieval, itm_scores, recall_at_k
from softmask.models.vlp import VisionLanguageModel

MAX_WORDS = 30


def _read(world: Path, name: str):
    path = world / "annotations" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; is {world} a folder written by `softmask world`?")
    return json.loads(path.read_text())


class WorldEncoder:
    """Loads images and captions for one model, each image once."""

    def __init__(self, model: VisionLanguageModel, world: Path, tokenizer: str = ""):
        self.world, self.size = world, model.config.vision.image_size
        self.transform = EvalTransform(self.size)
        self.tokenizer = open_tokenizer(tokenizer, max_tokens=MAX_WORDS)  # with its word tables
        self.cache: dict[str, torch.Tensor] = {}

    def pixels(self, paths: list[str]) -> torch.Tensor:
        """(len(paths), 3, S, S) normalised."""
        for path in paths:
            if path not in self.cache:
                self.cache[path] = to_tensor(load_image(str(self.world / path), 10**8), self.size)
        return self.transform(torch.stack([self.cache[p] for p in paths]))

    def text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokenizer.encode([pre_caption(c, MAX_WORDS) for c in captions])


def _accuracy(hits: dict[str, list[bool]]) -> dict[str, float]:
    return {key: 100.0 * float(np.mean(values)) for key, values in hits.items() if values}


def minimal_edit_accuracy(model: VisionLanguageModel, enc: WorldEncoder, items: list[dict],
                          batch_size: int = 256) -> dict[str, float]:
    """How often the true caption scores above each one-attribute (or one-relation) distractor, by ITM
    match logit and by ITC similarity; overall and split by salient/secondary object, held-out image,
    and edited attribute. Returns percentages keyed ``{itm,itc}_{all,salient,secondary,heldout,seen,
    attr_<name>}``."""
    images = sorted({item["image"] for item in items})
    image_index = {path: i for i, path in enumerate(images)}
    captions, pairs, comparisons = [], [], []
    for item in items:
        i = image_index[item["image"]]
        captions.append(item["caption"])
        pairs.append((i, len(captions) - 1))
        true_pair = len(pairs) - 1
        for distractor in item["distractors"]:
            captions.append(distractor["caption"])
            pairs.append((i, len(captions) - 1))
            comparisons.append((true_pair, len(pairs) - 1, item, distractor))
    ids, mask = enc.text(captions)
    feats = compute_features(model, enc.pixels(images), ids, mask, batch_size)
    pair_tensor = torch.tensor(pairs, device=feats.image_feat.device)
    itm = itm_scores(model, feats, pair_tensor, batch_size).cpu().numpy()
    itc = (feats.image_feat[pair_tensor[:, 0]] * feats.text_feat[pair_tensor[:, 1]]).sum(-1).cpu().numpy()
    hits: dict[str, list[bool]] = defaultdict(list)
    for true_pair, false_pair, item, distractor in comparisons:
        groups = ["all", "salient" if item["salient"] else "secondary",
                  "heldout" if item.get("heldout_object", item["heldout_image"]) else "seen",
                  f"attr_{distractor['attribute']}"]
        for name, scores in (("itm", itm), ("itc", itc)):
            for group in groups:
                hits[f"{name}_{group}"].append(bool(scores[true_pair] > scores[false_pair]))
    return _accuracy(hits)


def grounding(model: VisionLanguageModel, enc: WorldEncoder, scenes: list[dict], layer: int,
              source: str = "gradcam", max_captions: int | None = None) -> dict[str, float]:
    """Pointing game (%) and mean energy in box of each linked word's map against its object's box,
    overall and split by salient/secondary object."""
    from softmask.eval.word_gradcam import word_gradcam

    hits: dict[str, list[bool]] = defaultdict(list)
    energy: dict[str, list[float]] = defaultdict(list)
    done = 0
    for scene in scenes:
        objects = {obj["id"]: obj for obj in scene["objects"]}
        pixels = enc.pixels([scene["image"]])
        for caption in scene["captions"]:
            if max_captions is not None and done >= max_captions:
                break
            words = pre_caption(caption["caption"], MAX_WORDS).split()
            ids, mask = enc.text([caption["caption"]])
            result = word_gradcam(model, pixels, ids, mask, layer, source,
                                  **enc.tokenizer.word_tables())
            if result["words"] != words:  # segmentation disagrees: skip rather than misattribute
                continue
            done += 1
            for link in caption["links"]:
                obj = objects[link["object"]]
                word_map = result["maps"][link["word"]].numpy()
                groups = ["all", "salient" if obj["id"] == scene["salient"] else "secondary"]
                for group in groups:
                    hits[group].append(pointing_hit(word_map, obj["box"], scene["size"]))
                    energy[group].append(energy_in_box(word_map, obj["box"], scene["size"]))
    out = {f"pointing_{k}": v for k, v in _accuracy(hits).items()}
    out.update({f"energy_{k}": 100.0 * float(np.mean(v)) for k, v in energy.items() if v})
    out["grounding_captions"] = float(done)
    return out


def retrieval_examples(t2i: np.ndarray, captions: list[str], images: list[str], text_to_image: np.ndarray,
                       count: int, top: int = 5) -> list[dict]:
    """For ``count`` captions spread evenly over the test split (the first caption of every
    ``len(images) / count``-th image): the caption, its image and the ``top`` images ranked first by
    the final scores ``t2i`` (C, I)."""
    first_caption = {int(img): c for c, img in reversed(list(enumerate(text_to_image)))}
    picks = np.linspace(0, len(images) - 1, num=min(count, len(images))).round().astype(int) if count > 0 else []
    out = []
    for img in picks:
        c = first_caption[int(img)]
        ranked = np.argsort(-t2i[c], kind="stable")[:top]
        out.append({"caption": captions[c], "image": images[int(img)], "top": [images[int(i)] for i in ranked]})
    return out


def evaluate_world(model: VisionLanguageModel, world: str | Path, k: int = 16, layer: int | None = None,
                   max_grounding_captions: int | None = 500, batch_size: int = 256,
                   examples_out: list | None = None, examples: int = 6, tokenizer: str = "",
                   mlm_captions: int = 600, soft_mask: SoftMaskConfig | None = None,
                   shortcut_pairs: int = 200, itm_batch: int = 32) -> dict[str, float]:
    """All world metrics for one model on the world's test split (percentages). With ``examples_out`` (a
    list), :func:`retrieval_examples` of ``examples`` captions are appended to it. ``tokenizer``: the
    vocabulary the model was trained with (:func:`softmask.runs.tokenizer_source`; "" the default).
    ``mlm_captions``: captions per word group for ``mlm_<group>_right`` / ``_shuffled`` / ``_gap``
    (:func:`softmask.eval.mlm_reads.masked_word_accuracy`; 0 skips them). ``soft_mask``: the run's
    ``softmask`` section, how :func:`softmask.eval.shortcut.itm_shortcut` makes the masks (default: the
    paper's, at the Grad-CAM layer); ``shortcut_pairs`` mismatched pairs score it (0 skips it). ``itm_batch``:
    the batch within which :func:`softmask.eval.itm_pairs.itm_test_loss` draws ITM's hard negatives (the
    run's training batch size, to score ordinary pairs as in training)."""
    world = Path(world)
    fusion = model.config.text.num_fusion_layers
    if layer is not None and not 0 <= layer < fusion:  # checked before any work
        raise ConfigError(f"the Grad-CAM layer (--layer) must be a fusion-layer index in [0, {fusion}) for this "
                          f"model, got {layer}")
    if k < 1:
        raise ConfigError(f"k (--k), the retrieval candidates ITM re-ranks, must be at least 1, got {k}")
    if shortcut_pairs < 0:
        raise ConfigError(f"shortcut_pairs (--shortcut-pairs) must be >= 0 (0 skips itm_shortcut), "
                          f"got {shortcut_pairs}")
    if mlm_captions < 0:
        raise ConfigError(f"mlm_captions (--mlm-captions) must be >= 0 (0 skips the MLM reading), got {mlm_captions}")
    if itm_batch < 2:
        raise ConfigError(f"itm_batch, the batch ITM's test negatives are drawn from, must be >= 2, got {itm_batch}")
    if max_grounding_captions is not None and max_grounding_captions < 1:
        raise ConfigError("max_grounding_captions (--grounding-captions), the captions grounding scores, must be "
                          f"at least 1, got {max_grounding_captions}")
    model.eval()
    enc = WorldEncoder(model, world, tokenizer)
    test = _read(world, "retrieval_test.json")
    images = [record["image"] for record in test]
    captions = [c for record in test for c in record["caption"]]
    text_to_image = np.repeat(np.arange(len(test)), [len(r["caption"]) for r in test])
    ids, mask = enc.text(captions)
    retrieval = evaluate_retrieval(model, enc.pixels(images), ids, mask, text_to_image, k=k, batch_size=batch_size)
    metrics = dict(retrieval.metrics)
    if examples_out is not None:
        examples_out.extend(retrieval_examples(retrieval.t2i, captions, images, text_to_image, examples))
    # ITC alone (no re-ranking), as itc_tr1 ... itc_r_mean: re-ranking by an ITM head at chance shuffles ITC's top-k.
    metrics.update({f"itc_{key}": value for key, value in
                    recall_at_k(retrieval.itc, retrieval.itc.T, text_to_image).items()})
    metrics.update(minimal_edit_accuracy(model, enc, _read(world, "minimal_edits.json"), batch_size))
    metrics.update(itm_test_loss(model, enc, test, itm_batch))
    if layer is None:
        layer = default_gradcam_layer(model.config.text.num_fusion_layers)
    scenes = [s for s in _read(world, "objects.json") if s["split"] == "test"]
    metrics.update(grounding(model, enc, scenes, layer, max_captions=max_grounding_captions))
    if mlm_captions:
        from softmask.eval.mlm_reads import masked_word_accuracy

        reads = masked_word_accuracy(model, enc, test, mlm_captions)
        metrics.update({f"mlm_{key}": float(value) for key, value in reads.items() if not key.endswith("_n")})
    if shortcut_pairs:
        from softmask.eval.shortcut import itm_shortcut

        soft_mask = soft_mask or SoftMaskConfig()
        shortcut_layer = soft_mask.layer if soft_mask.layer is not None else default_gradcam_layer(fusion)
        metrics.update(itm_shortcut(model, enc, test, soft_mask, shortcut_layer, shortcut_pairs))
    return metrics
