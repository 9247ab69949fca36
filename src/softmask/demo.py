"""A short smoke run of the whole model on a handful of drawn images and captions.

It builds the model from a config, tokenises captions with the bert-base-uncased vocabulary, runs
every part of the public API (encoders, fusion with cross-attention probabilities, ITM, MLM, ITC
features), takes a few optimiser steps on a plain ITC + ITM cross-entropy to show that gradients
flow (the real ALBEF/SoftMask objectives belong to the pretraining engine), and checks that
``save_pretrained`` / ``from_pretrained`` give back the same model. It writes ``summary.json`` and
the saved model into the output folder.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from softmask.config import load_config
from softmask.data.text import load_tokenizer, tokenize
from softmask.models.vlp import create_model, from_pretrained

log = logging.getLogger("softmask")

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
SCENES = [("red", "square", "left"), ("blue", "circle", "right"), ("green", "circle", "left"),
          ("yellow", "square", "right")]
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)


def draw_scene(colour: str, shape: str, side: str, size: int) -> np.ndarray:
    """(size, size, 3) uint8: one coloured shape on a grey background, on the left or right half."""
    image = np.full((size, size, 3), 128, dtype=np.uint8)
    yy, xx = np.mgrid[0:size, 0:size]
    cx, cy, r = (size // 4 if side == "left" else 3 * size // 4), size // 2, size // 6
    inside = (np.abs(xx - cx) <= r) & (np.abs(yy - cy) <= r) if shape == "square" else \
        (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    image[inside] = COLOURS[colour]
    return image


def to_pixels(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) images -> (B, 3, H, W) normalised float pixels."""
    batch = torch.stack([torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im in images])
    return (batch - MEAN) / STD


def smoke_loss(model, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Plain ITC (in-batch) + ITM (each image with its own and with the next caption) cross-entropy."""
    image_embeds = model.encode_image(pixels)
    text_embeds = model.encode_text(ids, mask)
    sim = model.image_feat(image_embeds) @ model.text_feat(text_embeds).T / model.temp
    targets = torch.arange(len(ids))
    itc = (F.cross_entropy(sim, targets) + F.cross_entropy(sim.T, targets)) / 2
    shifted = torch.roll(torch.arange(len(ids)), 1)
    fused = model.fuse(torch.cat([text_embeds, text_embeds[shifted]]), torch.cat([mask, mask[shifted]]),
                       torch.cat([image_embeds, image_embeds]))
    labels = torch.cat([torch.ones(len(ids)), torch.zeros(len(ids))]).long()
    return itc + F.cross_entropy(model.itm_logits(fused), labels)


def run_smoke(config: str, out: Path, overrides: list[str] = (), steps: int = 8) -> dict:
    cfg = load_config(config, overrides)
    torch.manual_seed(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = create_model(cfg)
    size = cfg.model.vision.image_size
    captions = [f"a {c} {s} on the {side}" for c, s, side in SCENES]
    pixels = to_pixels([draw_scene(c, s, side, size) for c, s, side in SCENES])
    ids, mask = tokenize(load_tokenizer(max_tokens=cfg.model.text.max_positions), captions)
    params = sum(p.numel() for p in model.parameters())
    log.info(f"model built in {time.perf_counter() - t0:.1f}s: {params / 1e6:.2f}M parameters")

    model.eval()
    with torch.no_grad():
        image_embeds = model.encode_image(pixels)
        text_embeds = model.encode_text(ids, mask)
        fused, attn = model.fuse(text_embeds, mask, image_embeds, attention_layer=0)
        match = model.itm_logits(fused).softmax(-1)[:, 1]
        mlm = model.mlm_logits(fused)
    log.info(f"image tokens {tuple(image_embeds.shape)}, text tokens {tuple(text_embeds.shape)}, "
             f"cross-attention {tuple(attn.shape)}, MLM logits {tuple(mlm.shape)}")

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    losses, step_times = [], []
    for step in range(steps):
        start = time.perf_counter()
        loss = smoke_loss(model, pixels, ids, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step_times.append(time.perf_counter() - start)
        losses.append(loss.item())
        log.info(f"smoke step {step + 1}/{steps}: loss {loss.item():.4f} ({step_times[-1]:.2f}s)")

    model.eval()
    saved = model.save_pretrained(out / "model")
    reloaded = from_pretrained(saved).eval()
    with torch.no_grad():
        a = model.fuse(model.encode_text(ids, mask), mask, model.encode_image(pixels))
        b = reloaded.fuse(reloaded.encode_text(ids, mask), mask, reloaded.encode_image(pixels))
    roundtrip = float((a - b).abs().max())
    summary = {
        "config": str(config), "parameters": params, "captions": captions,
        "itm_match_probability_before_training": [round(float(p), 4) for p in match],
        "smoke_losses": [round(v, 4) for v in losses],
        "median_step_s": round(float(np.median(step_times)), 4),
        "save_load_max_abs_diff": roundtrip, "saved_model": str(saved),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info(f"saved and reloaded {saved}: max abs difference {roundtrip:.2e}")
    log.info(f"wrote {out / 'summary.json'}")
    if not np.isfinite(losses).all() or roundtrip > 1e-5:
        raise RuntimeError(f"smoke run failed: losses {losses}, save/load difference {roundtrip}")
    return summary
