"""The synthetic world: determinism, file formats, and annotations checked against the pixels and scenes.

The checks re-derive the truth independently where they can (pixels from the PNGs, relations from the
geometry, answers and labels from the object attributes) instead of trusting the generator's own logic.
"""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from softmask.cli import main
from softmask.data.annotations import load_annotations
from softmask.data.text import find_vocab, pre_caption
from softmask.world import generate_world
from softmask.world.render import object_layers, visible_masks
from softmask.world.vocab import INVERSE, SIZES, VALUES, naming_words

IMAGES, SIZE, SEED = 60, 64, 0
SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    generate_world(out, images=IMAGES, size=SIZE, seed=SEED)
    return out


def _load(world: Path, name: str):
    return json.loads((world / "annotations" / name).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def scenes(world) -> dict[str, dict]:
    return {scene["image"]: scene for scene in _load(world, "objects.json")}


@pytest.fixture(scope="module")
def meta(world) -> dict:
    return json.loads((world / "world.json").read_text())


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- independent truth


def _matches(ref: dict, obj: dict) -> bool:
    return all(obj[key] == value for key, value in ref.items())


def _found(ref: dict, scene: dict) -> list[dict]:
    return [obj for obj in scene["objects"] if _matches(ref, obj)]


def _geometric_relations(a: dict, b: dict, size: int) -> set[str]:
    """Relations re-derived from centres, boxes and sizes (the documented margins)."""
    found = set()
    margin = 0.12 * size
    for axis, before, after in ((0, "left of", "right of"), (1, "above", "below")):
        deltas = (b["center"][axis] - a["center"][axis],
                  (b["box"][axis] + b["box"][axis + 2]) / 2 - (a["box"][axis] + a["box"][axis + 2]) / 2)
        if min(deltas) >= margin:
            found.add(before)
        elif max(deltas) <= -margin:
            found.add(after)
    order = list(SIZES)
    for x, y, name in ((a, b, "bigger than"), (b, a, "smaller than")):
        if (order.index(x["size"]) > order.index(y["size"]) and x["area"] >= 1.5 * y["area"]
                and x["visible_area"] > y["visible_area"]):
            found.add(name)
    return found


def _relation_holds(scene: dict, subject: dict, relation: str, obj: dict) -> bool:
    (a,), (b,) = _found(subject, scene), _found(obj, scene)  # references must be unique
    return relation in _geometric_relations(a, b, scene["size"])


# ---------------------------------------------------------------- determinism, CLI, formats


def test_same_seed_same_bytes_and_other_seed_differs(world, tmp_path):
    again = tmp_path / "again"
    generate_world(again, images=IMAGES, size=SIZE, seed=SEED)
    first, second = _tree(world), _tree(again)
    assert first.keys() == second.keys()
    assert [name for name in first if first[name] != second[name]] == []
    other = tmp_path / "other"
    generate_world(other, images=IMAGES, size=SIZE, seed=SEED + 1)
    third = _tree(other)
    assert third["annotations/objects.json"] != first["annotations/objects.json"]
    assert sum(third[name] != first[name] for name in first if name.startswith("images/")) > IMAGES // 2


def test_parallel_generation_is_identical_to_serial(tmp_path):
    generate_world(tmp_path / "one", images=200, size=32, seed=3, workers=1)
    generate_world(tmp_path / "two", images=200, size=32, seed=3, workers=2)
    assert _tree(tmp_path / "one") == _tree(tmp_path / "two")


def test_cli_writes_a_world(tmp_path, capsys):
    assert main(["-q", "world", "--out", str(tmp_path), "--images", "20", "--size", "64"]) == 0
    assert "wrote 20 images" in capsys.readouterr().out
    assert len(list((tmp_path / "images").glob("*.png"))) == 20
    assert main(["-q", "world", "--out", str(tmp_path / "x"), "--images", "0"]) == 2
    assert "images must be >= 1" in capsys.readouterr().err


def test_max_objects_caps_the_scenes_and_keeps_every_task_file(world, scenes, tmp_path, capsys):
    assert main(["-q", "world", "--out", str(tmp_path / "one"), "--images", "40", "--size", str(SIZE),
                 "--seed", str(SEED), "--max-objects", "1"]) == 0
    easy = {scene["image"]: scene for scene in _load(tmp_path / "one", "objects.json")}
    assert {len(s["objects"]) for s in easy.values()} == {1}
    assert {len(s["objects"]) for s in scenes.values()} != {1}  # the default world has crowded scenes
    names = {p.name for p in (tmp_path / "one" / "annotations").iterdir()}
    assert names == {p.name for p in (world / "annotations").iterdir()}
    # Scenes that had one object anyway come out the same (the count is drawn, then capped).
    same = [image for image in easy if len(scenes[image]["objects"]) == 1]
    assert same and all(easy[i]["objects"] == scenes[i]["objects"] for i in same)
    assert main(["-q", "world", "--out", str(tmp_path / "bad"), "--images", "4", "--max-objects", "5"]) == 2
    assert "max_objects must be in [1, 4]" in capsys.readouterr().err


def test_shards_hold_the_pretraining_pairs(tmp_path):
    summary = generate_world(tmp_path, images=20, size=32, seed=1, shards=True)
    members = []
    for path in summary["shards"]:
        with tarfile.open(tmp_path / path) as tar:
            members += tar.getnames()
    assert sum(name.endswith(".png") for name in members) == summary["splits"]["train"]
    assert sum(name.endswith(".json") for name in members) == summary["splits"]["train"]


def test_every_file_parses_and_has_its_format(world, meta, scenes):
    names = sorted(p.name for p in (world / "annotations").glob("*.json"))
    expected = {"pretrain.json", "answer_list.json", "nlvr_ta.json", "minimal_edits.json", "objects.json"}
    expected |= {f"{task}_{split}.json" for task in ("retrieval", "vqa", "ve", "nlvr") for split in SPLITS}
    assert set(names) == expected
    for name in names:
        assert len(_load(world, name)) == meta["records"][name]
    records = load_annotations([str(world / "annotations" / "pretrain.json")], str(world))
    assert len(records) == meta["splits"]["train"] and all(Path(r.image).is_file() for r in records)
    assert all(scenes[f"images/{Path(r.image).name}"]["split"] == "train" for r in records)
    assert meta["splits"] == {"train": 48, "val": 6, "test": 6}
    for item in _load(world, "retrieval_train.json"):
        assert isinstance(item["caption"], str) and isinstance(item["image_id"], int)
    for split in ("val", "test"):
        items = _load(world, f"retrieval_{split}.json")
        assert len(items) == meta["splits"][split]
        assert all(len(item["caption"]) == 5 and all(isinstance(c, str) for c in item["caption"]) for item in items)
        assert all(scenes[item["image"]]["split"] == split for item in items)
    for split in SPLITS:
        assert {item["label"] for item in _load(world, f"ve_{split}.json")} == {
            "entailment", "neutral", "contradiction"}
        assert {item["label"] for item in _load(world, f"nlvr_{split}.json")} <= {"True", "False"}
        assert all((world / path).is_file() for item in _load(world, f"nlvr_{split}.json") for path in item["images"])
    assert {item["label"] for item in _load(world, "nlvr_ta.json")} == {0, 1, 2}


def test_all_words_are_whole_bert_words_and_captions_are_short(world, scenes):
    vocab = set(find_vocab().read_text(encoding="utf-8").split("\n"))
    texts = [c["caption"] for s in scenes.values() for c in s["captions"]]
    for split in SPLITS:
        texts += [q["question"] for q in _load(world, f"vqa_{split}.json")]
        texts += [v["sentence"] for v in _load(world, f"ve_{split}.json")]
        texts += [n["sentence"] for n in _load(world, f"nlvr_{split}.json")]
    texts += [a for q in _load(world, "vqa_train.json") for a in q["answer"]]
    words = {word for text in texts for word in pre_caption(text, 30).split()}
    assert words - vocab == set()
    assert max(len(c.split()) for s in scenes.values() for c in (x["caption"] for x in s["captions"])) <= 25


# ---------------------------------------------------------------- scenes against pixels


def test_boxes_areas_and_colours_match_the_pixels(world, scenes):
    for scene in scenes.values():
        with Image.open(world / scene["image"]) as image:
            pixels = np.asarray(image.convert("RGB"))
        assert pixels.shape == (SIZE, SIZE, 3)
        layers = [object_layers(obj, SIZE) for obj in scene["objects"]]  # drawing order = list order
        visible = visible_masks([full for full, _ in layers])
        assert [obj["id"] for obj in scene["objects"]] == scene["depth_order"] == list(range(len(layers)))
        for obj, (full, pattern), seen in zip(scene["objects"], layers, visible, strict=True):
            ys, xs = np.nonzero(seen)
            box = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert np.abs(np.array(box) - np.array(obj["box"])).max() <= 1, (scene["image"], obj["id"])
            assert obj["visible_area"] == seen.sum() and obj["area"] == full.sum()
            assert obj["visible_fraction"] >= 0.4
            assert (pixels[seen & ~pattern] == obj["rgb"]).all()
            assert (pixels[seen & pattern] == obj["pattern_rgb"]).all()
            if obj["pattern"] != "plain" and (seen & pattern).any():
                assert obj["pattern_rgb"] != obj["rgb"]


def test_unique_colour_shape_pairs_saliency_and_relations(scenes):
    counts = Counter(len(s["objects"]) for s in scenes.values())
    assert set(counts) <= {1, 2, 3, 4} and len(counts) >= 3
    for scene in scenes.values():
        objects = scene["objects"]
        assert len({(o["colour"], o["shape"]) for o in objects}) == len(objects)
        best = max(objects, key=lambda o: (o["visible_area"], o["contrast"]))
        assert scene["salient"] == best["id"] and best["saliency_rank"] == 0
        stored = {(r["subject"], r["object"]): set() for r in scene["relations"]}
        for rel in scene["relations"]:
            stored[rel["subject"], rel["object"]].add(rel["relation"])
        for a in objects:
            for b in objects:
                if a is not b:
                    assert stored.get((a["id"], b["id"]), set()) == _geometric_relations(a, b, SIZE)


def test_backgrounds_vary(scenes):
    assert {s["background"]["kind"] for s in scenes.values()} == {"plain", "gradient", "noise", "stripes"}


# ---------------------------------------------------------------- captions


def test_word_links_name_their_objects(scenes):
    kinds = Counter()
    for scene in scenes.values():
        objects = scene["objects"]
        for caption in scene["captions"]:
            kinds[caption["kind"]] += 1
            words = pre_caption(caption["caption"], 30).split()
            for link in caption["links"]:
                obj = objects[link["object"]]
                assert words[link["word"]] in naming_words(link["attribute"], obj[link["attribute"]]), caption
            for ref in caption["refs"]:  # each stated attribute is linked, and only those
                linked = {k["attribute"] for k in caption["links"] if k["object"] == ref["object"]}
                assert linked == set(ref["attributes"]) and _matches(ref["attributes"], objects[ref["object"]])
            for rel in caption["relations"]:
                assert rel["words"] and max(rel["words"]) < len(words)
                assert rel["relation"] in _geometric_relations(objects[rel["subject"]], objects[rel["object"]], SIZE)
        plan = [c["kind"] for c in scene["captions"]]
        assert len(plan) == 5 and plan[0] == "full"
        assert scene["captions"][0]["objects"] == sorted(o["id"] for o in objects)
        assert scene["captions"][1]["objects"] == [scene["salient"]]
        for caption in scene["captions"]:
            if caption["kind"] == "secondary":
                assert caption["objects"] != [scene["salient"]]
    assert set(kinds) == {"full", "salient", "secondary", "relation"}


def test_single_object_references_are_unique(scenes):
    for scene in scenes.values():
        for caption in scene["captions"]:
            if caption["kind"] in ("salient", "secondary"):
                (ref,) = caption["refs"]
                assert [o["id"] for o in _found(ref["attributes"], scene)] == [ref["object"]]


# ---------------------------------------------------------------- held-out combinations


def _stated_pairs(ref: dict) -> set[tuple[str, str]]:
    return {(ref["colour"], ref["shape"])} if "colour" in ref and "shape" in ref else set()


def test_heldout_pairs_only_in_test(world, meta, scenes):
    heldout = {tuple(pair) for pair in meta["heldout_pairs"]}
    assert len(heldout) >= 3
    seen = {split: set() for split in SPLITS}
    for scene in scenes.values():
        pairs = {(o["colour"], o["shape"]) for o in scene["objects"]}
        seen[scene["split"]] |= pairs
        assert scene["heldout"] == bool(pairs & heldout)
    assert not (seen["train"] | seen["val"]) & heldout
    assert seen["test"] & heldout
    # no train/val text states a held-out pair, not even as a negative
    for split in ("train", "val"):
        for q in _load(world, f"vqa_{split}.json"):
            refs = [q["query"][k] for k in ("ref", "subject", "object") if k in q["query"]]
            assert not set().union(*map(_stated_pairs, refs)) & heldout
        for v in _load(world, f"ve_{split}.json"):
            claim = v["claim"]
            refs = claim.get("refs", []) + [claim[k] for k in ("ref", "subject", "object") if k in claim]
            assert not set().union(*map(_stated_pairs, refs)) & heldout
        for n in _load(world, f"nlvr_{split}.json"):
            assert not _stated_pairs(n["claim"]["ref"]) & heldout
    edits = _load(world, "minimal_edits.json")
    assert any(item["heldout_image"] for item in edits)
    assert all(item["heldout_image"] == scenes[item["image"]]["heldout"] for item in edits)


# ---------------------------------------------------------------- tasks


def _one_change(truth: dict, false: dict) -> tuple[str, str, str]:
    """(attribute, from, to) of the single difference between two claims; fails otherwise."""
    if truth["type"] == "relation":
        others = [{k: v for k, v in claim.items() if k != "relation"} for claim in (truth, false)]
        assert others[0] == others[1]
        assert false["relation"] == INVERSE[truth["relation"]]
        return "relation", truth["relation"], false["relation"]
    (a,), (b,) = truth["refs"], false["refs"]
    assert a.keys() == b.keys()
    (key,) = [k for k in a if a[k] != b[k]]
    return key, a[key], b[key]


def test_minimal_edits_change_exactly_one_thing(world, scenes):
    items = _load(world, "minimal_edits.json")
    assert {scenes[item["image"]]["split"] for item in items} == {"test"}
    assert {item["image"] for item in items} == {s["image"] for s in scenes.values() if s["split"] == "test"}
    assert {d["attribute"] for item in items for d in item["distractors"]} == {
        "colour", "shape", "size", "pattern", "relation"}
    for item in items:
        scene = scenes[item["image"]]
        assert item["salient"] == (item["object"] == scene["salient"])
        assert item["object"] in item["objects"]
        truth = item["claim"]
        if truth["type"] == "exists":
            (ref,) = truth["refs"]
            assert ref == {k: scene["objects"][item["object"]][k] for k in ("colour", "shape", "size", "pattern")}
            assert item["heldout_object"] == scene["objects"][item["object"]]["heldout"]
        else:
            assert _relation_holds(scene, truth["subject"], truth["relation"], truth["object"])
        for distractor in item["distractors"]:
            assert _one_change(truth, distractor["claim"]) == (
                distractor["attribute"], distractor["from"], distractor["to"])
            assert distractor["caption"] != item["caption"]
            old, new = item["caption"].split(), distractor["caption"].split()
            assert len(old) == len(new) and sum(x != y for x, y in zip(old, new, strict=True)) == 1
            if truth["type"] == "exists":
                assert not _found(distractor["claim"]["refs"][0], scene)  # false: nothing matches
            else:
                false = distractor["claim"]
                assert _relation_holds(scene, false["subject"], INVERSE[false["relation"]], false["object"])


def _vqa_truth(query: dict, scene: dict) -> str:
    kind = query["type"]
    if kind in VALUES:
        (obj,) = _found(query["ref"], scene)
        return obj[kind]
    if kind == "count":
        return str(len(_found(query["ref"], scene)))
    if kind == "exists":
        return "yes" if _found(query["ref"], scene) else "no"
    if kind == "relation":
        return "yes" if _relation_holds(scene, query["subject"], query["relation"], query["object"]) else "no"
    (side,) = [c for c in query["choices"] if _relation_holds(scene, query["subject"], c, query["object"])]
    return side.split()[0]


def test_vqa_answers_and_majority(world, scenes):
    answers = set(_load(world, "answer_list.json"))
    ids, types = set(), Counter()
    for split in SPLITS:
        for item in _load(world, f"vqa_{split}.json"):
            assert item["dataset"] == "vqa" and item["question"].endswith("?")
            assert len(item["answer"]) == 10 and set(item["answer"]) <= answers
            majority, count = Counter(item["answer"]).most_common(1)[0]
            assert count >= 8 and majority == _vqa_truth(item["query"], scenes[item["image"]])
            assert scenes[item["image"]]["split"] == split and item["question_id"] not in ids
            ids.add(item["question_id"])
            types[item["type"]] += 1
    assert set(types) >= {"colour", "shape", "count", "exists", "relation", "side"}


def test_ve_labels_follow_the_scene(world, scenes):
    for split in SPLITS:
        for item in _load(world, f"ve_{split}.json"):
            scene, claim = scenes[item["image"]], item["claim"]
            if item["label"] == "neutral":
                assert claim["type"] == "unrendered" and len(_found(claim["ref"], scene)) == 1
                assert claim["property"] in item["sentence"]
                continue
            if claim["type"] == "exists":
                truth = all(_found(ref, scene) for ref in claim["refs"])
            else:
                truth = _relation_holds(scene, claim["subject"], claim["relation"], claim["object"])
                assert truth or _relation_holds(scene, claim["subject"], INVERSE[claim["relation"]], claim["object"])
            assert truth == (item["label"] == "entailment"), item


def _nlvr_truth(claim: dict, left: dict, right: dict) -> bool:
    counts = [len(_found(claim["ref"], scene)) for scene in (left, right)]
    if "side" in claim:
        mine, other = counts if claim["side"] == "left" else counts[::-1]
    kind = claim["type"]
    return {"more": lambda: mine > other, "fewer": lambda: mine < other, "exactly": lambda: mine == claim["count"],
            "only": lambda: mine > 0 and other == 0, "both": lambda: min(counts) > 0,
            "neither": lambda: max(counts) == 0}[kind]()


def test_nlvr_labels_follow_the_scenes(world, scenes):
    labels = Counter()
    for split in SPLITS:
        for item in _load(world, f"nlvr_{split}.json"):
            left, right = (scenes[path] for path in item["images"])
            assert left["split"] == right["split"] == split and left is not right
            assert item["label"] == str(_nlvr_truth(item["claim"], left, right)), item
            labels[item["label"]] += 1
    assert labels["True"] > 0.3 * sum(labels.values()) and labels["False"] > 0.3 * sum(labels.values())


def _caption_true(caption: dict, scene: dict) -> bool:
    refs = {ref["object"]: ref["attributes"] for ref in caption["refs"]}
    if not all(_found(ref, scene) for ref in refs.values()):
        return False
    return all(_relation_holds(scene, refs[r["subject"]], r["relation"], refs[r["object"]])
               for r in caption["relations"])


def test_text_assignment_labels(world, scenes):
    captions = {c["caption"]: c for s in scenes.values() if s["split"] == "train" for c in s["captions"]}
    for item in _load(world, "nlvr_ta.json"):
        pair = [scenes[path] for path in item["images"]]
        assert all(scene["split"] == "train" for scene in pair)
        caption = captions[item["sentence"]]
        truths = [_caption_true(caption, scene) for scene in pair]
        assert truths == [[True, False], [False, True], [False, False]][item["label"]], item
