"""A run that must learn: a tiny model on a tiny world learns ITM well below its prior and ITC above
chance, judged on images it never trained on. A change that breaks learning (a fusion encoder that no
longer reads the image, a loss that no longer reaches the head, negatives that are not negatives) fails
here; the second test cuts the cross-attention off and checks that the same criteria then fail, so the
first test's thresholds are known to be able to fail.

One run is about 35 s on one core of a quiet machine: 300 steps of 16 pairs, a 16-token vocabulary of the
world's words, ITM with uniform in-batch negatives (``itm.easy_negatives_steps``), MLM and distillation
off, mean-pooled text features. Measured margins (2026-12-03): training ITM loss 0.24, held-out ITM loss
0.33 and accuracy 0.83, ITC top-1 0.50 against the bars below.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from softmask.config import load_config
from softmask.data.text import open_tokenizer
from softmask.data.transforms import EvalTransform
from softmask.inference import load_model
from softmask.objectives.itm import itm_labels, itm_loss
from softmask.tasks.pretrain import pretrain

from helpers import COLOURS, SHAPES, TINY, make_world, pretrain_overrides

pytestmark = pytest.mark.slow  # trains two tiny models for 300 steps each

STEPS = 300
# ITM's prior with one positive and two negatives per image: the entropy of (1/3, 2/3).
ITM_PRIOR = -(np.log(1 / 3) / 3 + 2 * np.log(2 / 3) / 3)


@pytest.fixture(scope="module")
def worlds(tmp_path_factory) -> tuple[Path, Path]:
    """(training world of 64 images, a held-out world of 64 others), one coloured shape per image."""
    train, test = tmp_path_factory.mktemp("learn_train"), tmp_path_factory.mktemp("learn_test")
    make_world(train, n=64, seed=0)
    make_world(test, n=64, seed=1)
    vocab = train / "vocab.txt"  # the world's own words: no 30,522-row embedding to train
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "the", "is", *COLOURS, *SHAPES])
                     + "\n")
    return train, test


def train_tiny(world: Path, out: Path) -> list[dict]:
    cfg = load_config(TINY, pretrain_overrides(
        world, out, f"data.tokenizer={world / 'vocab.txt'}", "model.text.vocab_size=16", "train.batch_size=16",
        f"train.max_steps={STEPS}", f"train.save_every={STEPS}", "train.lr_peak=1e-3", "train.log_every=10",
        f"itm.easy_negatives_steps={STEPS}", "mlm.weight=0", "distill.alpha=0", "model.text_pooling=mean"))
    pretrain(cfg)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@torch.no_grad()
def held_out_scores(run: Path, world: Path) -> dict[str, float]:
    """On the held-out world: the ITM loss of each image with its caption and two captions of other
    (colour, shape) pairs (the training prior's setting), ITM's accuracy on those pairs, and ITC's
    image-to-caption top-1 accuracy among the 8 distinct captions."""
    model, _ = load_model(run / "model")
    tokenizer = open_tokenizer(run / "model" / "vocab.txt")
    records = json.loads((world / "pretrain.json").read_text())
    images = torch.stack([torch.from_numpy(np.array(Image.open(world / r["image"]).convert("RGB"))).permute(2, 0, 1)
                          for r in records])
    truth = [r["caption"][0] for r in records]  # "a {colour} {shape}"
    captions = [f"a {c} {s}" for c, s in itertools.product(COLOURS, SHAPES)]
    image_embeds = model.encode_image(EvalTransform(model.config.vision.image_size)(images))
    ids, mask = tokenizer.encode(captions)
    text_embeds = model.encode_text(ids, mask)
    itc = model.image_feat(image_embeds) @ model.text_feat(text_embeds, mask).T  # (images, 8)
    right = torch.tensor([captions.index(t) for t in truth])
    itc_top1 = float((itc.argmax(1) == right).float().mean())
    # Each image with its caption and two others, chosen deterministically.
    wrong = [(int(r) + k) % len(captions) for r in right for k in (1, 5)]
    rows = torch.cat([torch.arange(len(right)), torch.arange(len(right)).repeat_interleave(2)])
    cols = torch.cat([right, torch.tensor(wrong)])
    fused = model.fuse(text_embeds[cols], mask[cols], image_embeds[rows])
    logits = model.itm_logits(fused, mask[cols])
    labels = itm_labels(len(right), 2 * len(right))
    return {"itm_loss": float(itm_loss(logits, labels)),
            "itm_accuracy": float((logits.argmax(1) == labels).float().mean()),
            "itc_top1": itc_top1}


def learned(rows: list[dict], scores: dict[str, float]) -> list[str]:
    """What did not reach the bar (empty = the run learned)."""
    failures = []
    train_itm = float(np.mean([r["loss_itm"] for r in rows[-3:]]))
    if train_itm > 0.45:
        failures.append(f"training ITM loss {train_itm:.3f} (prior {ITM_PRIOR:.3f}, bar 0.45)")
    if scores["itm_loss"] > 0.45:
        failures.append(f"held-out ITM loss {scores['itm_loss']:.3f} (prior {ITM_PRIOR:.3f}, bar 0.45)")
    if scores["itm_accuracy"] < 0.75:
        failures.append(f"held-out ITM accuracy {scores['itm_accuracy']:.2f} (bar 0.75; a constant 'no': 0.67)")
    if scores["itc_top1"] < 0.3:
        failures.append(f"held-out ITC top-1 {scores['itc_top1']:.2f} among 8 captions (chance 0.125, bar 0.30)")
    return failures


def test_a_tiny_model_learns_itm_and_itc(worlds, tmp_path):
    train, test = worlds
    rows = train_tiny(train, tmp_path / "run")
    scores = held_out_scores(tmp_path / "run", test)
    assert not learned(rows, scores), (learned(rows, scores), scores)


def test_the_bar_fails_when_the_fusion_cannot_see_the_image(worlds, tmp_path, monkeypatch):
    """The same run with every cross-attention's output zeroed: the fusion never reads the image, so ITM
    cannot leave its prior, and the learning test's criteria must say so."""
    from softmask.models import bert

    original = bert.CrossAttention.forward

    def blind(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        return (out[0] * 0, *out[1:]) if isinstance(out, tuple) else out * 0

    monkeypatch.setattr(bert.CrossAttention, "forward", blind)
    train, test = worlds
    rows = train_tiny(train, tmp_path / "run")
    scores = held_out_scores(tmp_path / "run", test)
    failures = learned(rows, scores)
    assert any(f.startswith("training ITM loss") for f in failures), (failures, scores)
    assert scores["itm_loss"] > ITM_PRIOR - 0.05, scores
