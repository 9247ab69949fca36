"""Held-out accuracy of a pretrained image encoder (`softmask pretrain-vision`) on any world's split, with
shape split by whether the encoder's training showed each object's colour-shape pair.

    python benchmarks/encoder_on_world.py --encoder RUN/model --world WORLD [--split train] \
        --unseen-from VISION_WORLD [--unseen-from WORLD ...]

Use it to see what the encoder gives a vision-language run: e.g. the demo's encoder on the demo's
vision-language world (`--world runs/demo/world --unseen-from runs/demo/vision_world --unseen-from
runs/demo/world`: the pairs the encoder's world held out and those it left out for the other world).
"""

from __future__ import annotations

import argparse
import json

from softmask.tasks.image_pretrain import evaluate_image_encoder, load_image_encoder
from softmask.world.objects import heldout_pairs_of, world_objects


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", required=True, help="a pretrain-vision model folder (RUN/model)")
    parser.add_argument("--world", required=True, help="a folder written by `softmask world`")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--unseen-from", action="append", default=[], metavar="WORLD",
                        help="a world whose held-out pairs the encoder's training never showed (repeatable)")
    args = parser.parse_args(argv)
    encoder = load_image_encoder(args.encoder)
    data = world_objects(args.world, args.split, encoder.config.image_size)
    unseen = set().union(*(heldout_pairs_of(w) for w in args.unseen_from)) if args.unseen_from else set()
    metrics = evaluate_image_encoder(encoder, data, unseen_pairs=unseen)
    print(json.dumps({"world": args.world, "split": args.split, **{k: round(v, 2) for k, v in metrics.items()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
