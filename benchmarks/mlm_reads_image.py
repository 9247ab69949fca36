"""What a pretrained model's fusion reads from the image (:mod:`softmask.eval.mlm_reads`; ``softmask evaluate
world`` reports the same as ``mlm_<group>_right`` / ``_shuffled`` / ``_gap``), for one checkpoint alone.

    python benchmarks/mlm_reads_image.py --checkpoint RUN --world WORLD [--per-group 600] [--seed 0]

Printed as JSON: ``<group>_right`` and ``<group>_shuffled`` (% right with the own / a random other test
image), ``<group>_gap`` (right - shuffled, in points) and ``<group>_n``, for colour, shape, size, pattern
and relation words.
"""

from __future__ import annotations

import argparse
import json

from softmask.config import ConfigError
from softmask.eval.mlm_reads import masked_word_accuracy
from softmask.inference import load_for_world


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a `softmask pretrain` run folder or checkpoint")
    parser.add_argument("--world", required=True, help="a folder written by `softmask world`")
    parser.add_argument("--per-group", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        model, enc, test = load_for_world(args.checkpoint, args.world)
    except ConfigError as err:
        parser.error(str(err))
    print(json.dumps(masked_word_accuracy(model, enc, test, args.per_group, args.seed)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
