"""Fast retrieval evaluation vs a plain per-query re-rank, on the same model and data, in one run.

    python benchmarks/retrieval_eval.py [--images 1000] [--k 32] [--config configs/pretrain/tiny.yaml]
                                        [--checkpoint PATH] [--repeats 3] [--device cuda] [--fp32] [--fast-only]
                                        [--json]

Data: a synthetic world of ``--images`` images (``softmask world``), each with its five captions
(1,000 images x 5,000 captions by default). Model: ``--checkpoint`` (any path ``softmask.inference``
loads), else the config's model with random weights (speed does not depend on the weights).

Both evaluations start from the same unimodal features (computed once, not timed: the plain way of
ALBEF's code also encodes each image and caption once) and time the re-ranking:
- plain: for each image query, one fusion pass over its top-k captions; for each caption query, one
  over its top-k images; fp32 under ``torch.no_grad`` (ALBEF's loop, written straightforwardly);
- fast: ``softmask.eval.retrieval``: the candidate pairs of both directions deduplicated, many pairs per
  fusion pass, ``torch.inference_mode`` (and bf16 autocast on GPUs).
Reports medians over ``--repeats`` and whether both give the same recalls.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def world_data(images: int, size: int, tmp: Path):
    from softmask.data.images import load_image, to_tensor
    from softmask.data.text import load_tokenizer, pre_caption, tokenize
    from softmask.data.transforms import EvalTransform
    from softmask.world import generate_world

    generate_world(tmp, images=images, size=size, seed=0)
    scenes = json.loads((tmp / "annotations" / "objects.json").read_text())
    pixels = torch.stack([to_tensor(load_image(str(tmp / s["image"]), 10**8), size) for s in scenes])
    captions = [c["caption"] for s in scenes for c in s["captions"][:5]]
    ids, mask = tokenize(load_tokenizer(max_tokens=30), [pre_caption(c, 30) for c in captions])
    return EvalTransform(size)(pixels), ids, mask, np.repeat(np.arange(len(scenes)), 5)


@torch.no_grad()
def plain_rerank(model, feats, k: int):
    """ALBEF's loop: one fusion pass per query over its top-k candidates, both directions."""
    sim = feats.image_feat @ feats.text_feat.T
    num_images, num_texts = sim.shape
    i2t = torch.full((num_images, num_texts), float("-inf"))
    t2i = torch.full((num_texts, num_images), float("-inf"))
    for i in range(num_images):
        top = sim[i].topk(k).indices
        fused = model.fuse(feats.text_embeds[top], feats.text_mask[top],
                           feats.image_embeds[i:i + 1].expand(k, -1, -1))
        i2t[i, top] = model.itm_logits(fused)[:, 1].float().cpu()
    for c in range(num_texts):
        top = sim[:, c].topk(k).indices
        fused = model.fuse(feats.text_embeds[c:c + 1].expand(k, -1, -1), feats.text_mask[c:c + 1].expand(k, -1),
                           feats.image_embeds[top])
        t2i[c, top] = model.itm_logits(fused)[:, 1].float().cpu()
    return i2t.numpy(), t2i.numpy()


def fast_rerank(model, feats, k: int, batch_size: int, amp: bool = True):
    from softmask.eval.retrieval import candidate_pairs, itm_scores

    sim = feats.image_feat @ feats.text_feat.T
    pairs = candidate_pairs(sim, k, k)
    match = itm_scores(model, feats, pairs, batch_size, amp=amp)
    full = torch.full_like(sim, float("-inf"))
    full[pairs[:, 0], pairs[:, 1]] = match
    in_i2t = torch.zeros_like(sim, dtype=torch.bool).scatter_(1, sim.topk(k, dim=1).indices, True)
    in_t2i = torch.zeros_like(sim, dtype=torch.bool).scatter_(0, sim.topk(k, dim=0).indices, True)
    inf = torch.tensor(float("-inf"), device=full.device)
    return (torch.where(in_i2t, full, inf).cpu().numpy(), torch.where(in_t2i, full, inf).T.cpu().numpy(),
            len(pairs))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _max_finite_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest |a - b| where both are finite (non-candidates are -inf in both)."""
    both = np.isfinite(a) & np.isfinite(b)
    return float(np.abs(a[both] - b[both]).max()) if both.any() else 0.0


def main(argv=None) -> int:
    sys.path.insert(0, str(ROOT / "src"))
    from softmask.config import load_config
    from softmask.eval.retrieval import compute_features, recall_at_k
    from softmask.inference import load_model
    from softmask.models.vlp import create_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--config", default=str(ROOT / "configs" / "pretrain" / "tiny.yaml"))
    parser.add_argument("--checkpoint", default="")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fp32", action="store_true",
                        help="fast path without bf16 autocast on GPUs (then only float rounding separates "
                             "its scores from the plain path's)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--fast-only", action="store_true",
                        help="time only the fast evaluation, features included (the plain one takes hours at "
                             "COCO-5k size: 5,000 images x 25,000 captions, k 256)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    torch.manual_seed(0)
    model = load_model(args.checkpoint)[0] if args.checkpoint else create_model(load_config(args.config)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        pixels, ids, mask, text_to_image = world_data(args.images, model.config.vision.image_size, Path(tmp))
    model.to(device)
    start = time.perf_counter()
    feats = compute_features(model, pixels, ids, mask, batch_size=256)
    _sync(device)
    features_s = time.perf_counter() - start
    fast_times, plain_times = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        fast_i2t, fast_t2i, num_pairs = fast_rerank(model, feats, args.k, args.batch_size, amp=not args.fp32)
        _sync(device)
        fast_times.append(time.perf_counter() - start)
        if args.fast_only:
            continue
        start = time.perf_counter()
        plain_i2t, plain_t2i = plain_rerank(model, feats, args.k)
        _sync(device)
        plain_times.append(time.perf_counter() - start)
    fast = recall_at_k(fast_i2t, fast_t2i, text_to_image)
    if args.fast_only:
        result = {"features_s": features_s, "fast_s": statistics.median(fast_times),
                  "evaluation_s": features_s + statistics.median(fast_times), "images": int(pixels.shape[0]),
                  "captions": int(ids.shape[0]), "k": args.k, "pairs_fused_fast": num_pairs, "device": str(device),
                  "fast_bf16": device.type == "cuda" and not args.fp32 and torch.cuda.is_bf16_supported()}
        print(json.dumps(result) if args.json else "\n".join(f"{k:18s} {v}" for k, v in result.items()))
        return 0
    plain = recall_at_k(plain_i2t, plain_t2i, text_to_image)
    result = {"features_s": features_s, "fast_s": statistics.median(fast_times),
              "plain_s": statistics.median(plain_times),
              "speedup": statistics.median(plain_times) / statistics.median(fast_times),
              "recalls_equal": fast == plain, "images": int(pixels.shape[0]), "captions": int(ids.shape[0]),
              "k": args.k, "pairs_fused_fast": num_pairs,
              "pairs_fused_plain": args.k * (pixels.shape[0] + ids.shape[0]),
              "max_score_diff": _max_finite_diff(fast_i2t, plain_i2t), "device": str(device),
              "fast_bf16": device.type == "cuda" and not args.fp32 and torch.cuda.is_bf16_supported()}
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:18s} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
