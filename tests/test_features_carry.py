"""benchmarks/features_carry.py: where between the pixels and the fused caption an attribute gets lost."""

import json

import pytest
import torch

from softmask import create_model
from softmask.eval.world import WorldEncoder
from softmask.world import generate_world
from softmask.world.vocab import SYNONYMS

from helpers import load_benchmark, tiny_model_config

carry = load_benchmark("features_carry.py")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    generate_world(out, images=40, size=64, seed=3)
    return out


def test_the_centre_token_is_the_patch_under_the_box_centre():
    tokens = torch.arange(16.0).view(1, 16, 1)  # a 4 x 4 grid of 16-px patches, each token its index
    boxes = torch.tensor([[[16.0, 32.0, 32.0, 48.0], [0.0, 0.0, 10.0, 6.0], [50.0, 60.0, 64.0, 64.0]]])
    # centres (24, 40) -> row 2, column 1; (5, 3) -> 0, 0; (57, 62) -> 3, 3
    assert carry.centre_tokens(tokens, boxes, 64).flatten().tolist() == [9.0, 0.0, 15.0]


def test_shape_word_items_name_the_linked_object_and_what_the_caption_says_of_it(world):
    scenes = json.loads((world / "annotations" / "objects.json").read_text())
    items = carry.shape_word_items(scenes)
    links = sum(link["attribute"] == "shape" for s in scenes if s["split"] == "test" for c in s["captions"]
                for link in c["links"])
    assert len(items) == links > 0
    for item in items:
        assert item["word"] in SYNONYMS["shape"][item["object"]["shape"]], item
        assert "shape" in item["named"] and item["named"] <= {"shape", "colour", "size", "pattern"}
    assert any("size" not in item["named"] for item in items) and any("size" in item["named"] for item in items)


@pytest.mark.slow
def test_probes_cover_every_place_and_count_only_captions_silent_on_the_attribute(world):
    torch.manual_seed(0)
    model = create_model(tiny_model_config("text.vocab_size=30522", "text.max_positions=40", "vision.image_size=64",
                                           "vision.patch_size=16")).eval()
    items = carry.shape_word_items(json.loads((world / "annotations" / "objects.json").read_text()))[:60]
    fused = carry.fused_probes(model, WorldEncoder(model, world), items)
    for attribute in carry.FUSED_ATTRIBUTES:
        n = fused[f"fused_{attribute}_n"]
        assert n == sum(attribute not in item["named"] for item in items)
        for condition in ("own", "shuffled"):
            value = fused[f"fused_{attribute}_{condition}"]
            assert value is None if n < 4 else 0.0 <= value <= 100.0, (attribute, n, value)
    edits = json.loads((world / "annotations" / "minimal_edits.json").read_text())
    edit = carry.edit_probes(model, WorldEncoder(model, world), edits, per_attribute=8)
    assert {k[len("edit_probe_"):] for k in edit if k.startswith("edit_probe_")} <= {
        "colour", "shape", "size", "pattern", "relation"}
    for attribute in ("colour", "shape", "size", "pattern"):
        assert edit[f"edit_{attribute}_n"] == 8 and 0.0 <= edit[f"edit_probe_{attribute}"] <= 100.0
    # The head's share is ITM's own minimal-edit test: the match logit of the true caption above the edit's.
    from softmask.eval.world import minimal_edit_accuracy

    chosen = [dict(item, distractors=[d for d in item["distractors"] if d["attribute"] == "colour"])
              for item in edits]
    chosen = [item for item in chosen if item["distractors"]][:8]
    assert edit["edit_head_colour"] == pytest.approx(minimal_edit_accuracy(model, WorldEncoder(model, world),
                                                                           chosen)["itm_all"], abs=0.06)
    from softmask.world.objects import world_objects

    image = carry.image_probes(model.visual_encoder, world_objects(world, "test", 64))
    assert set(image) == {f"image_{k}_{a}" for k in ("box", "centre") for a in ("shape", "colour", "size", "pattern")}
    assert all(0.0 <= v <= 100.0 for v in image.values())


def test_it_names_a_wrong_world_or_checkpoint(world, tmp_path, capsys):
    for argv, message in ((["--world", str(world)], "give --checkpoint"),
                          (["--world", str(tmp_path), "--checkpoint", str(tmp_path)], "not a folder written by"),
                          (["--world", str(world), "--checkpoint", str(tmp_path / "none")], "--checkpoint"),
                          (["--world", str(world), "--encoder", str(tmp_path)], "--encoder")):
        with pytest.raises(SystemExit) as stop:
            carry.main(argv)
        assert stop.value.code == 2 and message in capsys.readouterr().err, argv
