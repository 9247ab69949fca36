"""Time the parts of `softmask evaluate world` for one checkpoint: ITM re-ranked retrieval, minimal edits,
Grad-CAM grounding (per 100 captions), what the fusion reads (MLM, per 100 captions per group) and the
ITM shortcut (per 100 pairs).

    OMP_NUM_THREADS=1 python benchmarks/world_eval_parts.py --checkpoint RUN --world DIR [--k 16]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from softmask.config import SoftMaskConfig, default_gradcam_layer
from softmask.eval import world as W
from softmask.eval.mlm_reads import masked_word_accuracy
from softmask.eval.retrieval import evaluate_retrieval
from softmask.eval.shortcut import itm_shortcut
from softmask.inference import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--world", required=True)
    parser.add_argument("--k", type=int, default=16)
    args = parser.parse_args()
    model, _ = load_model(args.checkpoint)
    model.eval()
    world = Path(args.world)
    enc = W.WorldEncoder(model, world)
    test = W._read(world, "retrieval_test.json")
    captions = [c for r in test for c in r["caption"]]
    text_to_image = np.repeat(np.arange(len(test)), [len(r["caption"]) for r in test])
    ids, mask = enc.text(captions)
    pixels = enc.pixels([r["image"] for r in test])
    times = {"threads": torch.get_num_threads()}
    start = time.perf_counter()
    evaluate_retrieval(model, pixels, ids, mask, text_to_image, k=args.k)
    times["retrieval_s"] = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    W.minimal_edit_accuracy(model, enc, W._read(world, "minimal_edits.json"))
    times["minimal_edits_s"] = round(time.perf_counter() - start, 1)
    scenes = [s for s in W._read(world, "objects.json") if s["split"] == "test"]
    start = time.perf_counter()
    W.grounding(model, enc, scenes, default_gradcam_layer(model.config.text.num_fusion_layers), max_captions=100)
    times["grounding_100_captions_s"] = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    masked_word_accuracy(model, enc, test, per_group=100)
    times["mlm_100_captions_per_group_s"] = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    itm_shortcut(model, enc, test, SoftMaskConfig(), default_gradcam_layer(model.config.text.num_fusion_layers), 100)
    times["shortcut_100_pairs_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(times))


if __name__ == "__main__":
    main()
