"""World evaluation end to end on a small generated world and a tiny random model."""

from pathlib import Path

import pytest
import torch

from softmask import create_model
from softmask.eval.world import evaluate_world, minimal_edit_accuracy
from softmask.world import generate_world

from helpers import tiny_model_config


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    generate_world(out, images=40, size=64, seed=3)
    return out


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model(tiny_model_config("text.vocab_size=30522", "text.max_positions=40", "vision.image_size=64",
                                          "vision.patch_size=16")).eval()


@pytest.mark.slow
def test_world_metrics_are_complete_and_in_range(world, model):
    metrics = evaluate_world(model, world, k=4, max_grounding_captions=10, mlm_captions=20)
    for key in ("tr1", "ir1", "r_mean", "itm_all", "itc_all", "itm_salient", "itm_secondary", "itm_heldout",
                "pointing_all", "energy_all",
                *(f"mlm_{g}_{c}" for g in ("colour", "shape", "size", "pattern", "relation")
                  for c in ("right", "shuffled"))):
        assert 0.0 <= metrics[key] <= 100.0, key
    assert metrics["mlm_colour_gap"] == pytest.approx(metrics["mlm_colour_right"] - metrics["mlm_colour_shuffled"])
    assert not any(key.startswith("mlm_") for key in evaluate_world(model, world, k=4, max_grounding_captions=1,
                                                                     mlm_captions=0))
    assert metrics["grounding_captions"] == 10
    assert metrics["itm_test_loss"] > 0 and 0 <= metrics["itm_test_accuracy"] <= 100
    for key in ("tr1", "tr10", "ir1", "ir10", "r_mean"):
        assert 0.0 <= metrics[f"itc_{key}"] <= 100.0, key


def test_itc_only_recall_equals_the_reranked_recall_when_itm_agrees_with_itc(world, model, monkeypatch):
    from softmask.eval import retrieval

    def itm_as_itc(model, feats, pairs, batch_size=256, amp=True):
        return (feats.image_feat[pairs[:, 0]] * feats.text_feat[pairs[:, 1]]).sum(-1)

    monkeypatch.setattr(retrieval, "itm_scores", itm_as_itc)
    metrics = evaluate_world(model, world, k=16, max_grounding_captions=1)
    for key in ("tr1", "tr5", "tr10", "ir1", "ir5", "ir10", "r_mean"):
        assert metrics[key] == pytest.approx(metrics[f"itc_{key}"]), key


def test_minimal_edits_count_every_distractor(world, model, monkeypatch):
    import json

    from softmask.eval import world as world_eval

    items = json.loads((world / "annotations" / "minimal_edits.json").read_text())[:5]
    # A scorer that always prefers the true caption (scores: true pairs 1, distractors 0) -> 100%.
    true_rows = set()
    for item in items:
        true_rows.add(item["caption"])

    def fake_itm(model, feats, pairs, batch_size=256, amp=True):
        return torch.tensor([1.0 if captions[int(c)] in true_rows else 0.0 for _, c in pairs.tolist()])

    captions = [c for item in items for c in [item["caption"]] + [d["caption"] for d in item["distractors"]]]
    monkeypatch.setattr(world_eval, "itm_scores", fake_itm)
    enc = world_eval.WorldEncoder(model, world)
    metrics = minimal_edit_accuracy(model, enc, items)
    assert metrics["itm_all"] == 100.0


@pytest.mark.slow
def test_mlm_reads_masks_one_group_word_per_caption_and_scores_it(world, model, monkeypatch):
    import json
    import random
    from collections import Counter

    from softmask.data.text import open_tokenizer
    from softmask.eval import mlm_reads as bench
    from softmask.eval.world import WorldEncoder

    test = json.loads((world / "annotations" / "retrieval_test.json").read_text())
    items = bench.masked_items(test, 50, random.Random(1))
    for group in ("colour", "shape", "size", "pattern", "relation"):
        assert 0 < len(items[group]) <= 50
        assert all(word in bench.WORD_GROUPS[group] and word in caption.lower() for _, caption, word in items[group])
    # A model whose MLM always prefers the commonest masked colour: right exactly on the items whose masked
    # word it is, with either image.
    top, count = Counter(word for _, _, word in items["colour"]).most_common(1)[0]
    assert count < len(items["colour"])
    tokenizer = open_tokenizer("")
    vocab = tokenizer.wordpiece.get_vocab()
    top_id = vocab[top]
    real = model.mlm_logits

    def prefer_top(fused):  # ... and "big" among the size words: right wherever the masked word names "large"
        logits = real(fused)
        logits[..., top_id] = 1e6
        logits[..., vocab["big"]] = 1e6
        return logits

    seen_ids = []
    real_text = model.encode_text

    def record_text(ids, mask):
        seen_ids.append(ids.clone())
        return real_text(ids, mask)

    monkeypatch.setattr(model, "mlm_logits", prefer_top)
    monkeypatch.setattr(model, "encode_text", record_text)
    result = bench.masked_word_accuracy(model, WorldEncoder(model, world), test, per_group=50, seed=1)
    # One word masked per caption.
    assert all(((ids == tokenizer.special["mask"]).sum(1) == 1).all() for ids in seen_ids)
    assert {g: result[f"{g}_n"] for g in items} == {g: len(v) for g, v in items.items()}
    share = round(100.0 * count / len(items["colour"]), 1)
    assert result["colour_right"] == result["colour_shuffled"] == share and result["colour_gap"] == 0.0
    large = sum(word in ("large", "big") for _, _, word in items["size"])
    assert 0 < large < len(items["size"]) and any(word == "large" for _, _, word in items["size"])
    assert result["size_right"] == result["size_shuffled"] == round(100.0 * large / len(items["size"]), 1)


@pytest.mark.parametrize("script", ["mlm_reads_image.py", "text_retrieval_misses.py"])
def test_a_checkpoint_benchmark_names_a_wrong_world_or_checkpoint(world, tmp_path, capsys, script):
    from helpers import load_benchmark

    bench = load_benchmark(script)
    missing = tmp_path / "none"
    for argv, message in ((["--checkpoint", str(tmp_path), "--world", str(tmp_path)], "not a folder written by"),
                          (["--checkpoint", str(missing), "--world", str(world)], f"checkpoint {missing}: ")):
        with pytest.raises(SystemExit) as stop:
            bench.main(argv)
        assert stop.value.code == 2 and message in capsys.readouterr().err


def test_text_retrieval_misses_classifies_every_test_image_once(world, model, monkeypatch, capsys):
    import json

    from helpers import load_benchmark

    bench = load_benchmark("text_retrieval_misses.py")
    from softmask.eval.world import WorldEncoder

    test = json.loads((world / "annotations" / "retrieval_test.json").read_text())
    monkeypatch.setattr(bench, "load_for_world",
                        lambda checkpoint, where: (model, WorldEncoder(model, Path(where)), test))
    assert bench.main(["--checkpoint", "unused", "--world", str(world), "--hubs", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert sum(out["first_ranked"].values()) == out["images"] == 4 and out["captions"] == 20
    assert out["itc_tr1"] == pytest.approx(100.0 * out["first_ranked"]["own"] / 4)
    assert len(out["hubs"]) <= 2 and sum(hub["images"] for hub in out["hubs"]) <= 4


def test_itm_shortcut_masks_as_training_does_and_measures_the_masked_minus_the_plain_match(world, model, monkeypatch):
    import json

    from softmask.config import SoftMaskConfig
    from softmask.eval import shortcut
    from softmask.eval.world import WorldEncoder
    from softmask.objectives.softmask import apply_soft_mask

    enc = WorldEncoder(model, world)
    test = json.loads((world / "annotations" / "retrieval_test.json").read_text())
    pixels = enc.pixels([r["image"] for r in test[:3]])
    ids, mask = enc.text([r["caption"][0] for r in test[:3]])
    tables, mask_id = enc.tokenizer.word_tables(), enc.tokenizer.special["mask"]
    soft = SoftMaskConfig(ratio=0.5)
    plain, masked, has_word = shortcut.soft_masked_image_tokens(model, pixels, ids, mask, soft, 0, tables, mask_id,
                                                                torch.Generator().manual_seed(0))
    assert has_word.all() and torch.equal(plain, model.encode_image(pixels))
    weights = masked[:, 1:, 0] / plain[:, 1:, 0]  # the soft mask, read back from the scaled tokens
    assert torch.allclose(masked, apply_soft_mask(plain, weights), atol=1e-6)
    assert torch.allclose(weights.sum(1), torch.full((3,), 0.5 * weights.shape[1]), atol=1e-3)  # half-compensated
    assert weights.min() < 0.5 < weights.max()  # a map, not a uniform scale
    # apply_to=patch_embeddings: the image re-encoded with its patch embeddings scaled by the same kind of mask
    _, re_encoded, _ = shortcut.soft_masked_image_tokens(model, pixels, ids, mask,
                                                         SoftMaskConfig(apply_to="patch_embeddings"), 0, tables,
                                                         mask_id, torch.Generator().manual_seed(0))
    assert re_encoded.shape == plain.shape and not torch.allclose(re_encoded, plain)

    real = shortcut.itm_shortcut(model, enc, test, soft, layer=0, pairs=4, batch_size=3)
    assert real["itm_shortcut_pairs"] == 4 and -1.0 <= real["itm_shortcut"] <= 1.0
    assert real["itm_shortcut"] == pytest.approx(real["itm_mismatched_masked"] - real["itm_mismatched"])
    # A head that says "match" to masked images whatever the caption: the measure reads its shortcut.
    spied = []
    make_masks = shortcut.soft_masked_image_tokens

    def spy(*args, **kwargs):
        out = make_masks(*args, **kwargs)
        spied.append(out[1])
        return out

    def head(model, image_embeds, ids, mask):
        return torch.full((len(ids),), 0.95 if any(image_embeds is m for m in spied) else 0.1)

    monkeypatch.setattr(shortcut, "soft_masked_image_tokens", spy)
    monkeypatch.setattr(shortcut, "match_probability", head)
    faked = shortcut.itm_shortcut(model, enc, test, soft, layer=0, pairs=4, batch_size=3)
    assert faked["itm_shortcut"] == pytest.approx(0.85) and faked["itm_masked_own"] == pytest.approx(0.95)


def test_itm_test_loss_pairs_each_image_with_its_caption_and_two_hard_negatives(world, model, monkeypatch):
    import json
    import math

    from softmask.eval.itm_pairs import itm_test_loss
    from softmask.eval.world import WorldEncoder

    enc = WorldEncoder(model, world)
    test = json.loads((world / "annotations" / "retrieval_test.json").read_text())
    assert len(test) == 4
    fused_inputs = []
    fuse = model.fuse

    def spy(text_embeds, mask, image_embeds, **kwargs):
        fused_inputs.append((text_embeds, image_embeds))
        return fuse(text_embeds, mask, image_embeds, **kwargs)

    monkeypatch.setattr(model, "fuse", spy)
    real = itm_test_loss(model, enc, test, batch_size=3)
    assert real["itm_test_pairs"] == 3 * 3  # batches of 3 and 1: the batch of one has no negative
    assert real["itm_test_loss"] > 0 and 0 <= real["itm_test_accuracy"] <= 100
    (texts, images), = fused_inputs  # 3 positives, 3 captions with another image, 3 images with another caption
    own_texts, own_images = texts[:3], images[:3]
    assert not any(torch.equal(images[3 + i], own_images[i]) for i in range(3))
    assert not any(torch.equal(texts[6 + i], own_texts[i]) for i in range(3))
    assert torch.equal(texts[3:6], own_texts) and torch.equal(images[6:], own_images)
    # A head that only knows the prior (a third of the pairs match) scores the prior's loss and labels every
    # pair "no match" (right two times in three).
    prior = torch.tensor([math.log(2 / 3), math.log(1 / 3)])
    monkeypatch.setattr(model, "itm_logits", lambda fused, mask: prior.expand(len(fused), 2))
    flat = itm_test_loss(model, enc, test, batch_size=3)
    assert flat["itm_test_loss"] == pytest.approx(-(math.log(1 / 3) + 2 * math.log(2 / 3)) / 3, abs=1e-6)
    assert flat["itm_test_accuracy"] == pytest.approx(200 / 3)
    with pytest.raises(ValueError, match="batch_size must be >= 2"):
        itm_test_loss(model, enc, test, batch_size=1)


def test_world_evaluation_rejects_an_itm_batch_of_one_before_any_work(world, model):
    from softmask.config import ConfigError

    with pytest.raises(ConfigError, match="itm_batch"):
        evaluate_world(model, world, k=4, itm_batch=1)
