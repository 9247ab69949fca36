"""softmask pretrain-vision: box pooling, the world and folder data, learning, and loading the result
as model.vision.init."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from softmask.cli import main
from softmask.config import ConfigError, load_config
from softmask.data.labelled_images import image_folder
from softmask.tasks.image_pretrain import box_pool, load_image_encoder, pretrain_vision
from softmask.world.objects import OBJECT_ATTRIBUTES, presence_names, world_objects

from helpers import load_benchmark

VISION = ["model.vision.image_size=32", "model.vision.patch_size=8", "model.vision.width=48", "model.vision.depth=2",
          "model.vision.num_heads=2", "model.vision.mlp_dim=96"]


@pytest.fixture(scope="module")
def vision_world(tmp_path_factory):
    from softmask.world import generate_world

    out = tmp_path_factory.mktemp("vision_world")
    generate_world(out, images=400, size=32, seed=11, workers=1)
    return out


def test_box_pool_weights_patches_by_the_share_the_box_covers():
    tokens = torch.arange(16, dtype=torch.float32).view(1, 16, 1)  # a 4 x 4 grid of 8-px patches (32 px)
    boxes = torch.tensor([[[8.0, 0.0, 16.0, 8.0],     # exactly patch (row 0, column 1)
                           [0.0, 8.0, 16.0, 16.0],    # patches (1, 0) and (1, 1)
                           [4.0, 0.0, 16.0, 8.0],     # half of patch 0, all of patch 1
                           [0.0, 0.0, 0.0, 0.0]]])    # empty: zeros
    pooled = box_pool(tokens, boxes, image_size=32)[0, :, 0]
    assert pooled.tolist() == pytest.approx([1.0, 4.5, (0.5 * 0 + 1.0 * 1) / 1.5, 0.0])


def test_box_pool_refuses_a_grid_that_is_not_square():
    with pytest.raises(ValueError, match="square"):
        box_pool(torch.zeros(1, 15, 4), torch.zeros(1, 1, 4), 32)


def test_world_objects_labels_match_objects_json(vision_world):
    data = world_objects(vision_world, "test", image_size=64)
    scenes = [s for s in json.loads((vision_world / "annotations" / "objects.json").read_text())
              if s["split"] == "test"]
    assert len(data) == len(scenes) and data.images.shape[1:] == (3, 64, 64)
    first = scenes[0]
    for k, obj in enumerate(first["objects"]):
        for i, attr in enumerate(OBJECT_ATTRIBUTES):
            assert data.classes[attr][int(data.labels["objects"][0, k, i])] == obj[attr]
        assert data.labels["boxes"][0, k].tolist() == [2.0 * v for v in obj["box"]]  # 32 px -> 64 px
        names = presence_names()
        assert data.labels["presence"][0, names.index(f"{obj['colour']} {obj['shape']}")] == 1
    assert (data.labels["objects"][0, len(first["objects"]):] == -100).all()


def test_excluded_pairs_leave_out_every_image_holding_one(vision_world):
    every = world_objects(vision_world, "train", 32)
    pair = ("red", "circle")
    kept = world_objects(vision_world, "train", 32, exclude_pairs={pair})
    names = presence_names()
    assert 0 < len(kept) < len(every)
    assert kept.labels["presence"][:, names.index("red circle")].sum() == 0


@pytest.mark.slow
def test_pretrain_vision_learns_and_loads_as_model_vision_init(vision_world, tmp_path, caplog, capsys):
    out = tmp_path / "vit"
    cfg = load_config(None, [f"world={vision_world}", f"output_dir={out}", *VISION, "train.batch_size=32",
                             "train.max_steps=100", "train.warmup_steps=5", "train.lr_peak=2e-3", "train.log_every=10",
                             "train.save_every=100", "data.num_workers=0"])
    metrics = pretrain_vision(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < 0.8 * rows[0]["loss"]
    assert rows[-1]["loss_objects"] < rows[0]["loss_objects"]
    # Above chance on held-out images: colour has 8 values, so chance is 12.5 %.
    assert metrics["acc_colour"] > 40.0
    assert metrics["images"] == 40
    assert json.loads((out / "metrics_test.json").read_text()) == metrics
    # Shape accuracy split by whether training showed the object's colour-shape pair, computed again here.
    from softmask.data.transforms import EvalTransform
    from softmask.world.objects import heldout_pairs_of

    held_out = world_objects(vision_world, "test", 32)
    encoder = load_image_encoder(out / "model").eval()
    with torch.no_grad():
        shape = encoder(EvalTransform(32)(held_out.images), held_out.labels["boxes"])["shape"].argmax(-1)
    objects = held_out.labels["objects"]
    valid = objects[..., 0] != -100
    pairs, colours, shapes = heldout_pairs_of(vision_world), held_out.classes["colour"], held_out.classes["shape"]
    unseen = torch.tensor([[h >= 0 and (colours[c], shapes[h]) in pairs for h, c in row[:, :2].tolist()]
                           for row in objects])
    unseen &= valid
    right = shape == objects[..., 0]
    assert unseen.any() and (valid & ~unseen).any()
    assert metrics["acc_shape_unseen_pairs"] == pytest.approx(100 * right[unseen].float().mean().item())
    assert metrics["acc_shape_seen_pairs"] == pytest.approx(100 * right[valid & ~unseen].float().mean().item())
    # The same numbers from the script that scores an encoder on any world's split.
    bench = load_benchmark("encoder_on_world.py")
    assert bench.main(["--encoder", str(out / "model"), "--world", str(vision_world), "--unseen-from",
                       str(vision_world)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("acc_shape", "acc_shape_seen_pairs", "acc_shape_unseen_pairs", "acc_colour", "images"):
        assert printed[key] == pytest.approx(metrics[key], abs=0.01)

    # The checkpoint loads into a vision-language model through the timm/DeiT path, with a clean report.
    from softmask.models.loading import load_vision_checkpoint
    from softmask.models.vlp import VisionLanguageModel

    model_cfg = load_config(None, [*VISION, "model.text.hidden_size=32", "model.text.num_layers=2",
                                   "model.text.fusion_layer=1", "model.text.num_heads=2",
                                   "model.text.intermediate_size=64", "model.text.max_positions=40"]).model
    vlp = VisionLanguageModel(model_cfg)
    report = load_vision_checkpoint(vlp, out / "model")
    assert report.fmt == "timm-vit" and not report.missing and not report.unexpected
    assert set(report.ignored.values()) == {"ImageNet classifier head"}
    encoder = load_image_encoder(out / "model")
    for key, value in encoder.visual_encoder.state_dict().items():
        assert torch.equal(vlp.visual_encoder.state_dict()[key], value)


@pytest.mark.slow
def test_pretrain_vision_on_an_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for name, colour in (("reds", (220, 30, 30)), ("blues", (30, 30, 220))):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(24):
            pixels = np.clip(np.array(colour) + rng.integers(-30, 30, (20, 20, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / name / f"{i}.png")
    (tmp_path / "data" / "reds" / "broken.jpg").write_text("not an image")
    train, held = image_folder(tmp_path / "data", 32, val_share=0.25)
    assert train.classes == {"label": ["blues", "reds"]}
    assert len(train) + len(held) == 48  # the unreadable file skipped (and logged)
    assert 10 <= len(held) <= 12 and not any("broken" in p for p in train.paths + held.paths)
    out = tmp_path / "run"
    code = main(["pretrain-vision", f"image_pretrain.folder={tmp_path / 'data'}", f"output_dir={out}", *VISION,
                 "train.batch_size=8", "train.max_steps=30", "train.warmup_steps=3", "train.lr_peak=1e-3",
                 "train.save_every=30", "data.augment.enabled=false"])
    assert code == 0
    assert json.loads((out / "metrics_test.json").read_text())["acc"] == 100.0


def test_pretrain_vision_needs_one_source(vision_world, capsys):
    assert main(["pretrain-vision", *VISION]) == 2
    assert "exactly one of world=DIR" in capsys.readouterr().err
    assert main(["pretrain-vision", f"world={vision_world}", "image_pretrain.folder=/x", *VISION]) == 2
    assert main(["pretrain-vision", f"world={vision_world}", "image_pretrain.exclude_heldout_of=/nope",
                 *VISION]) == 2
    assert "/nope/world.json" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="image_pretrain.val_share"):
        load_config(None, ["image_pretrain.val_share=1.5"])


def test_text_init_layers_first_takes_the_first_layers_of_minilm():
    from softmask.models.vlp import create_model

    overrides = ["model.text.init=minilm", "model.text.hidden_size=384", "model.text.num_heads=12",
                 "model.text.intermediate_size=1536", "model.text.num_layers=3", "model.text.fusion_layer=1",
                 *VISION]
    with pytest.raises(Exception, match="num_layers is 3 but the checkpoint"):
        create_model(load_config(None, overrides))
    model = create_model(load_config(None, [*overrides, "model.text.init_layers=first"]))
    from transformers import BertModel

    from softmask.checkpoint_files import resolve_checkpoint

    reference = BertModel.from_pretrained(str(resolve_checkpoint("minilm")))
    # MiniLM layer 2 is our second fusion layer; layers 3-5 are reported as ignored.
    assert torch.equal(model.fusion_encoder.layers[1].attn.out.weight,
                       reference.encoder.layer[2].attention.output.dense.weight)
    words = reference.embeddings.word_embeddings.weight
    assert torch.equal(model.text_encoder.embeddings.word_embeddings.weight, words)


def test_a_conv_stem_encoder_loads_as_model_vision_init_and_a_patch_stem_model_refuses_it(tmp_path):
    from softmask.checkpoint_files import CheckpointError
    from softmask.models.loading import load_vision_checkpoint
    from softmask.models.vlp import VisionLanguageModel
    from softmask.tasks.image_pretrain import ImageEncoderWithHeads

    text = ["model.text.hidden_size=32", "model.text.num_layers=2", "model.text.fusion_layer=1",
            "model.text.num_heads=2", "model.text.intermediate_size=64", "model.text.max_positions=40"]
    conv = load_config(None, [*VISION, "model.vision.stem=conv", *text]).model
    torch.manual_seed(0)
    ImageEncoderWithHeads(conv.vision, {"label": ["a", "b"]}).save_pretrained(tmp_path / "enc")
    vlp = VisionLanguageModel(conv)
    report = load_vision_checkpoint(vlp, tmp_path / "enc")
    assert not report.missing and not report.unexpected
    encoder = load_image_encoder(tmp_path / "enc")
    stem_keys = [k for k in encoder.visual_encoder.state_dict() if k.startswith("patch_embed.stem.")]
    assert len(stem_keys) == 3 * 3  # three stride-2 levels for 8-px patches: conv weight, norm weight and bias
    for key, value in encoder.visual_encoder.state_dict().items():
        assert torch.equal(vlp.visual_encoder.state_dict()[key], value), key
    patch = VisionLanguageModel(load_config(None, [*VISION, *text]).model)
    with pytest.raises(CheckpointError, match=r"model.vision.stem is patch .* a convolutional stem"):
        load_vision_checkpoint(patch, tmp_path / "enc")
    # A deeper, wider stem loads into its own config and is refused, naming both structures, by another.
    deep = load_config(None, [*VISION, "model.vision.stem=conv", "model.vision.stem_convs_per_level=2",
                              "model.vision.stem_channels=32", *text]).model
    ImageEncoderWithHeads(deep.vision, {"label": ["a", "b"]}).save_pretrained(tmp_path / "deep")
    stem_keys = [k for k in load_image_encoder(tmp_path / "deep").visual_encoder.state_dict()
                 if k.startswith("patch_embed.stem.") and k.endswith(".weight")]
    assert len(stem_keys) == 2 * 3 * 2  # two convolutions per level, each a conv and a norm weight
    report = load_vision_checkpoint(VisionLanguageModel(deep), tmp_path / "deep")
    assert not report.missing and not report.unexpected
    with pytest.raises(CheckpointError, match=r"stem_convs_per_level/stem_channels/patch_size is 1/0/8 \(3 3x3 "
                                              r"convolutions with 8, 12, 24 channels\) but the checkpoint .*deep has "
                                              r"6 3x3 convolutions with 8, 8, 16, 16, 32, 32 channels"):
        load_vision_checkpoint(vlp, tmp_path / "deep")


@pytest.mark.slow
def test_position_loss_and_the_relation_probe(vision_world, tmp_path):
    out = tmp_path / "vit"
    cfg = load_config(None, [f"world={vision_world}", f"output_dir={out}", *VISION, "train.batch_size=32",
                             "train.max_steps=30", "train.warmup_steps=5", "train.lr_peak=2e-3", "train.log_every=10",
                             "train.save_every=100", "data.num_workers=0", "image_pretrain.position_weight=1"])
    metrics = pretrain_vision(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss_position"] < rows[0]["loss_position"]
    assert 0.0 <= metrics["relation_probe"] <= 100.0


@pytest.mark.slow
def test_pair_relations_and_a_linear_probe_by_hand():
    from softmask.eval.probe import RELATIONS, linear_probe_accuracy, pair_relations

    # Object 1 lies right of object 0 and object 2 below it; object 3 is absent; 0 vs 1 in x only.
    boxes = torch.tensor([[[0, 0, 10, 10], [20, 0, 30, 10], [0, 30, 10, 40], [0, 0, 0, 0]]], dtype=torch.float)
    present = torch.tensor([[True, True, True, False]])
    image, a, b, label = pair_relations(boxes, present, margin=4.0)
    found = {(int(x), int(y)): RELATIONS[int(z)] for x, y, z in zip(a, b, label, strict=True)}
    # 1 -> 2: dx -20, dy +30: vertical by a clear margin, so "below".
    assert found == {(0, 1): "right", (1, 0): "left", (0, 2): "below", (2, 0): "above", (1, 2): "below",
                     (2, 1): "above"}
    assert (image == 0).all()
    # A diagonal pair (|dx| == |dy|) and a pair closer than the margin have no clear relation.
    boxes = torch.tensor([[[0, 0, 10, 10], [20, 20, 30, 30], [2, 1, 12, 11]]], dtype=torch.float)
    assert pair_relations(boxes, torch.ones(1, 3, dtype=torch.bool), margin=4.0)[0].numel() == 0
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 6, generator=gen)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()  # linearly separable, 4 classes
    assert linear_probe_accuracy(x, y, 4) > 90.0
    assert linear_probe_accuracy(torch.randn(400, 6, generator=gen), y, 4) < 45.0  # features that carry nothing
    # More features than training rows: many separating solutions, so where a probe starts would show. The
    # global random state does not change the probe.
    wide, coin = torch.randn(60, 64, generator=gen), torch.randint(0, 2, (60,), generator=gen)
    scores = []
    for seed in (1, 2, 3, 4):
        torch.manual_seed(seed)
        scores.append(linear_probe_accuracy(wide, coin, 2))
    assert len(set(scores)) == 1, scores


def test_colourless_images_keep_their_shapes_and_lose_their_colour_and_presence_labels():
    from softmask.tasks.image_pretrain import attribute_losses, without_colour

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=g)
    rows = torch.tensor([False, True, False, True])
    out = without_colour(images, rows, g)
    assert torch.equal(out[~rows], images[~rows])
    grey = out[rows].int()
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 0], grey[:, 2])  # no colour left
    lo, hi = images[rows].int().amin(1), images[rows].int().amax(1)
    assert bool(((grey[:, 0] >= lo) & (grey[:, 0] <= hi)).all())  # a mix of the pixel's own channels
    # The loss ignores the colour logits and presence logits of colourless images, and only those.
    cfg = load_config(None, [])
    k, values = 2, {a: 5 for a in OBJECT_ATTRIBUTES}
    logits = {a: torch.randn(4, k, n, generator=g) for a, n in values.items()}
    logits["presence"] = torch.randn(4, 7, generator=g)
    batch = {"objects": torch.randint(0, 5, (4, k, 4), generator=g), "presence": torch.rand(4, 7, generator=g).round(),
             "colourless": rows}
    base = attribute_losses(logits, batch, cfg)["loss"]
    changed = {**logits, "colour": logits["colour"].clone(), "presence": logits["presence"].clone()}
    changed["colour"][rows] += 5 * torch.randn(2, k, 5, generator=g)
    changed["presence"][rows] += 5
    assert attribute_losses(changed, batch, cfg)["loss"] == base
    changed["colour"][0] += torch.randn(k, 5, generator=g)
    assert attribute_losses(changed, batch, cfg)["loss"] != base
    with pytest.raises(ConfigError, match=r"colourless_share must be in \[0, 1\)"):
        load_config(None, ["image_pretrain.colourless_share=1"])
