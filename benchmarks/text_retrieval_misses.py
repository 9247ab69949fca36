"""What a world model's text retrieval ranks first when it misses: its own caption, a caption with the same words
as one of its own (a tie, which R@1 counts as a miss), or another image's caption that is true of the image
too, or false of it.

    python benchmarks/text_retrieval_misses.py --checkpoint RUN --world WORLD [--hubs 5]

A world's test image has several captions, some short and generic ("A striped cross."), which are true of
many images; text R@1 counts a hit only when the image's first-ranked caption is one of its own. For every
test image, ITC ranks all test captions (as ``itc_tr1`` of ``softmask evaluate world``) and the
first-ranked caption is put in one of five classes: ``own``; ``same_words`` (another image's caption with
the same words as one of its own, or its own when another image has one with the same words: ITC scores
them equally, and R@1 counts the tie against the image); ``true_other`` (another image's caption whose
objects, attributes and relations the world's annotations find in this image too); ``false_other`` (one
they do not); ``undecided_other`` (an ambiguous reference or relation). Also: the words per caption and the
kinds (``full``: every object; ``salient`` / ``secondary``: one object; ``relation``) of the first-ranked
captions against those of all test captions, and the ``--hubs`` captions ranked first for the most images
("hubs"), each with how many. Printed as JSON; nothing is written.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

from softmask.config import ConfigError
from softmask.data.text import pre_caption
from softmask.eval.retrieval import compute_features
from softmask.eval.world import MAX_WORDS
from softmask.inference import load_for_world
from softmask.world.pairs import caption_truth

CLASSES = ("own", "same_words", "true_other", "false_other", "undecided_other")


def first_ranked_classes(sim: np.ndarray, captions: list[str], text_to_image: np.ndarray,
                         true_of: Callable[[int, int], bool | None]) -> tuple[Counter, np.ndarray]:
    """``(classes, top)``: the counts of the classes of the module docstring and the (I,) index of each
    image's first-ranked caption. ``sim``: (I, C) ITC similarities; ``captions``: (C,) normalised captions;
    ``true_of(caption, image)``: whether caption ``caption`` is true of image ``image`` (None: undecided)."""
    top = sim.argmax(1)
    images_of: dict[str, set[int]] = {}
    for c, caption in enumerate(captions):
        images_of.setdefault(caption, set()).add(int(text_to_image[c]))
    classes: Counter = Counter()
    for image, caption in enumerate(top):
        holders = images_of[captions[caption]]
        if image in holders:  # one of its own; a tie with another image's same words when others hold it too
            classes["own" if holders == {image} else "same_words"] += 1
        else:
            truth = true_of(int(caption), image)
            classes["undecided_other" if truth is None else "true_other" if truth else "false_other"] += 1
    return classes, top


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a `softmask pretrain` run folder or checkpoint")
    parser.add_argument("--world", required=True, help="a folder written by `softmask world`")
    parser.add_argument("--hubs", type=int, default=5, help="the captions ranked first most often, listed")
    args = parser.parse_args(argv)
    try:
        model, enc, test = load_for_world(args.checkpoint, args.world)
    except ConfigError as err:
        parser.error(str(err))
    raw = [c for record in test for c in record["caption"]]
    captions = [pre_caption(c, MAX_WORDS) for c in raw]
    text_to_image = np.repeat(np.arange(len(test)), [len(r["caption"]) for r in test])
    ids, mask = enc.text(raw)
    features = compute_features(model, enc.pixels([r["image"] for r in test]), ids, mask)
    sim = (features.image_feat @ features.text_feat.T).cpu().numpy()
    scenes = {scene["image"]: scene for scene in json.loads((Path(args.world) / "annotations" / "objects.json")
                                                             .read_text()) if scene["split"] == "test"}
    records = [caption for record in test for caption in scenes[record["image"]]["captions"]]
    if [r["caption"] for r in records] != raw:
        parser.error(f"--world {args.world}: objects.json's test captions differ from retrieval_test.json's")
    classes, top = first_ranked_classes(
        sim, captions, text_to_image, lambda c, image: caption_truth(records[c], scenes[test[image]["image"]]))
    words = lambda indices: round(float(np.mean([len(captions[i].split()) for i in indices])), 2)  # noqa: E731
    hubs = Counter(captions[i] for i in top).most_common(args.hubs)
    print(json.dumps({
        "images": len(test), "captions": len(captions),
        "first_ranked": {key: classes[key] for key in CLASSES},
        "itc_tr1": round(100.0 * classes["own"] / len(test), 1),
        "words_first_ranked": words(top), "words_all_captions": words(range(len(captions))),
        "kinds_first_ranked": dict(Counter(records[c]["kind"] for c in top).most_common()),
        "kinds_all_captions": dict(Counter(r["kind"] for r in records).most_common()),
        "distinct_first_ranked": len(set(top.tolist())),
        "hubs": [{"caption": caption, "images": count} for caption, count in hubs],
    }, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
