"""The SoftMask method inside the pretraining step: switches, Grad-CAM correctness, no gradient
through the mask, and end-to-end runs (one process and torchrun)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from softmask.config import ConfigError, load_config
from softmask.models.vlp import create_model
from softmask.objectives.softmask import gradcam_maps
from softmask.tasks.pretrain import build_objective, min_pairwise_cosine, pretrain

from helpers import TINY, make_world
from helpers import pretrain_overrides as overrides
from helpers import read_metrics as metrics
from helpers import torchrun_pretrain as _torchrun

ALL_OFF = ("softmask.soft_masks=false", "softmask.text_masking=false", "softmask.image_distortion=false",
           "itc.gamma=0")


def _batch(b: int = 6, seed: int = 0) -> dict:
    from softmask.data.text import load_tokenizer, tokenize

    g = torch.Generator().manual_seed(seed)
    captions = ["a red square on the left", "a skateboarding dog", "two blue discs", "the yellow square",
                "an unbelievable green disc", "a small red disc above a square"][:b]
    ids, mask = tokenize(load_tokenizer(max_tokens=30), captions)
    return {"images": torch.randint(0, 256, (b, 3, 64, 64), dtype=torch.uint8, generator=g),
            "input_ids": ids, "attention_mask": mask, "skipped": 0}


def _losses(*extra: str, steps: int = 2) -> list[dict]:
    cfg = load_config(TINY, ["itc.queue_size=16", *extra])
    torch.manual_seed(0)
    objective = build_objective(cfg, create_model(cfg), alpha_warmup_steps=2).train()
    out = []
    for step in range(steps):
        torch.manual_seed(100 + step)  # dropout and augmentation draws
        result = objective(_batch(), step)
        result["loss"].backward()
        out.append({k: float(v.detach()) for k, v in result.items()})
    return out


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_identical_text_features_are_warned_about(pooling, caplog):
    # The tiny model's randomly initialised [CLS] is nearly the same vector for every caption
    # (docs/results.md); its mean over the tokens is not.
    with caplog.at_level(logging.WARNING, logger="softmask"):
        _losses(f"model.text_pooling={pooling}", steps=1)
    warned = "all have nearly the same text feature" in caplog.text
    assert warned == (pooling == "cls")
    if warned:
        assert "set model.text_pooling=mean" in caplog.text and "min cosine " in caplog.text


def test_min_pairwise_cosine():
    feats = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    assert min_pairwise_cosine(feats) == pytest.approx(0.0, abs=1e-7)
    assert min_pairwise_cosine(feats[:2]) == pytest.approx(1.0)
    assert min_pairwise_cosine(feats[:1]) == 1.0  # no pair
    # Pairs marked as identical captions are left out: here everything but rows 0 and 1.
    third = torch.tensor([[False, False, True], [False, False, True], [True, True, False]])
    assert min_pairwise_cosine(feats, exclude=third) == pytest.approx(1.0)
    assert min_pairwise_cosine(feats, exclude=torch.ones(3, 3, dtype=torch.bool)) == 1.0


@pytest.mark.slow
def test_albef_and_softmask_with_every_part_off_are_identical():
    albef = _losses("method=albef")
    off = _losses("method=softmask", *ALL_OFF)
    assert albef == off
    assert "loss_itm_soft" not in albef[0]


@pytest.mark.slow
def test_softmask_logs_its_parts():
    out = _losses("method=softmask")
    for row in out:
        assert np.isfinite(row["loss"]) and np.isfinite(row["loss_itm_soft"])
        assert row["soft_mask_share"] == 1.0  # every caption of the batch has an eligible word
        assert row["mask_weight_fraction"] == pytest.approx(0.5, abs=1e-5)


# Dropout off and ALBEF's augmentation off: then the global random stream changes no loss, so a switch that
# only drew random numbers (and did nothing with them) would change nothing here.
NO_RANDOM_LOSS = ("model.text.dropout=0", "model.text.attention_dropout=0", "data.augment.enabled=false")
PARTS = ("loss_itc", "loss_itm", "loss_mlm")


@pytest.mark.slow
@pytest.mark.parametrize(("switch", "base", "changed"), [
    ("softmask.soft_masks=true", (), {"loss_itm"}),  # extra ITM positives
    ("softmask.text_masking=true", (), {"loss_itc", "loss_itm"}),  # MLM already saw the masked caption
    ("softmask.image_distortion=true", (), {"loss_itc", "loss_itm", "loss_mlm"}),
    ("itc.gamma=2", (), {"loss_itc"}),
    ("softmask.mask_source=attention", ("softmask.soft_masks=true",), {"loss_itm"}),
    ("softmask.apply_to=patch_embeddings", ("softmask.soft_masks=true",), {"loss_itm"}),
    ("softmask.masked_negatives=true", ("softmask.soft_masks=true",), {"loss_itm"}),
    ("softmask.masked_pairs=positives", ("softmask.soft_masks=true",), {"loss_itm"}),  # the default is "all"
    ("softmask.masked_loss=added", ("softmask.soft_masks=true",), {"loss_itm"}),
    ("itc.focal=positive", ("itc.gamma=1",), {"loss_itc"}),  # from step 1, when alpha > 0 gives soft targets
])
def test_each_switch_alone_changes_the_losses_it_acts_on_and_no_other(switch, base, changed):
    steps = 2 if switch.startswith("itc.focal") else 1
    before = _losses("method=albef", *NO_RANDOM_LOSS, *base, steps=steps)
    after = _losses("method=albef", *NO_RANDOM_LOSS, *base, switch, steps=steps)
    assert all(np.isfinite(row["loss"]) for row in after)
    for part in PARTS:
        differs = any(a[part] != b[part] for a, b in zip(after, before, strict=True))
        assert differs == (part in changed), f"{switch}: {part} {'changed' if differs else 'did not change'}"


@pytest.mark.slow
def test_masked_negatives_pair_each_masked_image_with_its_negative_caption():
    plain = _losses("method=albef", "softmask.soft_masks=true", "softmask.masked_pairs=positives", steps=1)[0]
    masked = _losses("method=albef", "softmask.soft_masks=true", "softmask.masked_negatives=true", steps=1)[0]
    b = 6  # every caption has an eligible word, and every row a hard negative (6 distinct captions)
    assert plain["itm_pairs"] == b + 2 * b + b and masked["itm_pairs"] == plain["itm_pairs"] + b
    assert np.isfinite(masked["loss"]) and masked["loss_itm"] != plain["loss_itm"]
    # Only the new pairs differ: the soft-masked pairs' loss now counts b positives and b negatives.
    assert masked["loss_itm_soft"] != plain["loss_itm_soft"]
    with pytest.raises(ConfigError, match="masked_negatives needs softmask.soft_masks"):
        load_config(TINY, ["method=albef", "softmask.masked_negatives=true"])
    # masked_negatives is masked_pairs=negative_captions: the same pairs, the same losses
    same = _losses("method=albef", "softmask.soft_masks=true", "softmask.masked_pairs=negative_captions", steps=1)[0]
    assert same == masked
    # The default reading is "all" (docs/method.md); masked_negatives alone still means negative_captions.
    assert load_config(TINY, ["method=softmask"]).softmask.masked_pairs == "all"
    assert load_config(TINY, ["method=softmask", "softmask.masked_negatives=true"]).softmask.masked_pairs \
        == "negative_captions"
    with pytest.raises(ConfigError, match="set only masked_pairs"):
        load_config(TINY, ["method=softmask", "softmask.masked_negatives=true", "softmask.masked_pairs=all"])


@pytest.mark.slow
@pytest.mark.parametrize("apply_to", ["features", "patch_embeddings"])
def test_masked_pairs_all_mirrors_every_ordinary_pair_with_its_image_masked_by_its_own_caption(apply_to,
                                                                                             monkeypatch):
    from softmask.objectives.softmask import apply_soft_mask
    from softmask.tasks import pretrain as module

    base = ("method=albef", "softmask.soft_masks=true", f"softmask.apply_to={apply_to}")
    captions = _losses(*base, "softmask.masked_pairs=negative_captions", steps=1)[0]
    seen = {}
    real = module.PretrainObjective._masked_negative_images

    def spy(self, s, soft, negatives):
        rows, images = real(self, s, soft, negatives)
        seen.update(rows=rows, images=images, soft=soft, negatives=negatives, s=s)
        return rows, images

    monkeypatch.setattr(module.PretrainObjective, "_masked_negative_images", spy)
    every = _losses(*base, "softmask.masked_pairs=all", steps=1)[0]
    b = 6  # every caption has a word and a hard negative: b more pairs, all labelled no match
    assert every["itm_pairs"] == captions["itm_pairs"] + b and seen["rows"].all()
    assert every["loss_itm"] != captions["loss_itm"] and np.isfinite(every["loss"])
    # Each caption's negative image carries that image's own mask (as its own soft-masked positive did).
    soft, negatives, s = seen["soft"], seen["negatives"], seen["s"]
    index = negatives.image_index
    assert (index != torch.arange(b)).all()  # never the caption's own image
    if apply_to == "features":
        assert torch.equal(seen["images"], apply_soft_mask(s.image_embeds[index], soft.weights[index]))
        assert torch.equal(seen["images"][0], soft.images[int(index[0])])  # = that image's masked positive
    else:
        assert torch.allclose(seen["images"], soft.images[index], atol=1e-5)


@pytest.mark.parametrize("masked_pairs", ["positives", "all"])
def test_masked_loss_pools_every_itm_pair_or_adds_the_two_kinds_means(masked_pairs):
    base = ("method=albef", "softmask.soft_masks=true", f"softmask.masked_pairs={masked_pairs}")
    pooled = _losses(*base, steps=1)[0]
    added = _losses(*base, "softmask.masked_loss=added", steps=1)[0]
    ordinary = 3 * 6  # each of the 6 captions: its positive and two hard negatives
    masked = pooled["itm_pairs"] - ordinary
    assert masked == (6 if masked_pairs == "positives" else ordinary)
    # The same pairs and logits; only how their cross-entropies are averaged differs.
    assert added["loss_itm_pairs"] == pooled["loss_itm_pairs"] and added["loss_itm_soft"] == pooled["loss_itm_soft"]
    assert pooled["loss_itm"] == pytest.approx(
        (ordinary * pooled["loss_itm_pairs"] + masked * pooled["loss_itm_soft"]) / pooled["itm_pairs"], rel=1e-5)
    assert added["loss_itm"] == pytest.approx(added["loss_itm_pairs"] + added["loss_itm_soft"], rel=1e-5)
    assert load_config(TINY, ["method=softmask"]).softmask.masked_loss == "pooled"
    with pytest.raises(ConfigError, match="masked_loss must be"):
        load_config(TINY, ["method=softmask", "softmask.masked_loss=mean"])


def _reference_gradcam(model, pixels, ids, mask, layer):
    """Grad-CAM from a full forward and a full backward, with the attention's .grad retained."""
    model.zero_grad()
    image = model.encode_image(pixels)
    fused, attn = model.fuse(model.encode_text(ids, mask), mask, image, attention_layer=layer)
    attn.retain_grad()
    model.itm_logits(fused)[:, 1].sum().backward()
    return (attn * attn.grad.clamp(min=0))[..., 1:].mean(dim=1).detach(), attn.detach(), attn.grad.detach()


def test_gradcam_equals_full_backward_and_finite_differences():
    cfg = load_config(TINY, ["model.text.dropout=0", "model.text.attention_dropout=0"])
    torch.manual_seed(0)
    model = create_model(cfg).eval()
    batch = _batch(3)
    pixels = torch.randn(3, 3, 64, 64)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    ref, attn_ref, grad_ref = _reference_gradcam(model, pixels, ids, mask, layer=0)
    assert ref.abs().sum() > 0
    # The training step's path: a partial backward to the attention only.
    fused, attn = model.fuse(model.encode_text(ids, mask), mask, model.encode_image(pixels), attention_layer=0)
    (grad,) = torch.autograd.grad(model.itm_logits(fused)[:, 1].sum(), attn)
    assert torch.allclose(gradcam_maps(attn.detach(), grad), ref, atol=1e-6)

    # Finite differences: nudge one attention probability of the kept layer and watch the logit (in the
    # padded layout, which the nudging forward below reads; the maps above came from the packed one).
    model.text_encoder.pack_tokens = model.fusion_encoder.pack_tokens = False
    cross = model.fusion_encoder.layers[0].cross_attn
    original = type(cross).forward
    nudge = {}

    def forward(self, x, image, return_probs=False, image_index=None, image_mask=None, packing=None):
        assert packing is None
        out, probs = original(self, x, image, True, image_index, image_mask)
        if "delta" in nudge:  # recompute the output with the nudged probabilities
            q = self.kv(image)
            v = q.chunk(2, dim=-1)[1]
            v = v.view(v.shape[0], v.shape[1], self.num_heads, -1).transpose(1, 2)
            p = probs + nudge["delta"]
            merged = torch.matmul(p, v).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
            out = self.out(merged)
        return out, (probs if return_probs else None)

    cross.forward = forward.__get__(cross)
    with torch.no_grad():
        image, text = model.encode_image(pixels), model.encode_text(ids, mask)
        base = model.itm_logits(model.fuse(text, mask, image))[:, 1].sum()
        eps = 1e-3
        for index in [(0, 0, 1, 5), (1, 1, 2, 17), (2, 0, 3, 40)]:
            assert grad_ref[index] != 0
            delta = torch.zeros_like(attn_ref)
            delta[index] = eps
            nudge["delta"] = delta
            moved = model.itm_logits(model.fuse(text, mask, image))[:, 1].sum()
            assert (moved - base) / eps == pytest.approx(float(grad_ref[index]), rel=2e-2, abs=1e-4)


def test_last_fusion_layer_is_refused_for_gradcam_masks():
    from softmask.config import ConfigError

    assert load_config(TINY, ["method=softmask"]).softmask.layer == 0  # 2 fusion layers: the first
    assert load_config(TINY, ["method=softmask", "model.text.num_layers=8", "model.text.fusion_layer=2"]
                       ).softmask.layer == 2  # the 3rd fusion layer, as ALBEF's BERT layer 8
    with pytest.raises(ConfigError, match="last fusion layer.*zero"):
        load_config(TINY, ["method=softmask", "softmask.layer=1"])
    load_config(TINY, ["method=softmask", "softmask.layer=1", "softmask.mask_source=attention"])


def test_no_gradient_reaches_the_model_through_the_mask():
    cfg = load_config(TINY, ["method=softmask", "itc.queue_size=16"])
    torch.manual_seed(0)
    objective = build_objective(cfg, create_model(cfg), alpha_warmup_steps=2).train()
    model = objective.model
    batch = _batch()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pixels = objective.augment(batch["images"])
    image_embeds = model.encode_image(pixels)
    fused, attn = model.fuse(model.encode_text(ids, mask), mask, image_embeds, attention_layer=cfg.softmask.layer)
    logits = model.itm_logits(fused)
    gen = torch.Generator().manual_seed(0)
    step = SimpleNamespace(ids=ids, text_ids=ids, mask=mask, images=pixels, image_embeds=image_embeds)
    masked = objective._soft_masked_images(step, logits, attn, gen)
    soft, rows = masked.images, masked.rows
    assert rows.all()
    # The soft-masked tokens depend on the attention only through the (detached) mask: no path.
    (through_attn,) = torch.autograd.grad(soft.sum(), attn, retain_graph=True, allow_unused=True)
    assert through_attn is None
    # ... while the image tokens themselves still get a gradient.
    (through_image,) = torch.autograd.grad(soft.sum(), image_embeds, retain_graph=True)
    assert through_image.abs().sum() > 0


@pytest.mark.slow
def test_softmask_pretrains_end_to_end(tmp_path):
    root = tmp_path / "w"
    make_world(root, n=8)
    out = tmp_path / "run"
    state = pretrain(load_config(TINY, overrides(root, out, "method=softmask", "train.batch_size=4",
                                                 "train.max_steps=3")))
    assert state.step == 3
    rows = metrics(out)
    assert all(np.isfinite(r["loss_itm_soft"]) for r in rows)
    assert {"soft_mask_share", "mask_weight_fraction"} <= set(rows[0])


@pytest.mark.slow
def test_softmask_under_torchrun_two_processes(tmp_path):
    root = tmp_path / "w"
    make_world(root, n=8)
    out = tmp_path / "run"
    _torchrun(2, ["--config", str(TINY), *overrides(root, out, "method=softmask", "train.batch_size=2",
                                                     "train.max_steps=2")], tmp_path)
    assert len(metrics(out)) == 2 and all(np.isfinite(r["loss"]) for r in metrics(out))
