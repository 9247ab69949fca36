"""``data.path_map``: ALBEF-style annotation files with absolute paths of another machine are read as they
are, their images found under the user's folders, and a path that maps to no file stops the run up front
with one line naming the file and the record. And ``softmask text-assignment`` on such files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from softmask.cli import main
from softmask.config import ConfigError, load_config, save_config
from softmask.data.annotations import AnnotationError, load_annotations
from softmask.data.dataset import build_pretrain_loader
from softmask.data.path_map import PathMap

from helpers import TINY

CLUSTER_COCO = "/export/share/datasets/vision/coco/images/"  # as in ALBEF's released pretraining files
CLUSTER_VG = "/export/share/datasets/vision/visual-genome/image/"


def albef_world(root: Path) -> tuple[Path, dict[str, str]]:
    """Images under the user's own folders and an ALBEF pretraining JSON naming them by the cluster's
    absolute paths; returns the JSON and the path map that finds them."""
    rng = np.random.default_rng(0)
    records = []
    for i in range(6):
        coco = i % 2 == 0
        folder = root / ("my_coco/train2014" if coco else "my_vg")
        folder.mkdir(parents=True, exist_ok=True)
        name = f"COCO_train2014_{i:012d}.jpg" if coco else f"{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(folder / name)
        where = f"{CLUSTER_COCO}train2014/{name}" if coco else f"{CLUSTER_VG}{name}"
        records.append({"image": where, "caption": [f"picture number {i}", f"the {i} image"]})
    ann = root / "albef_pretrain.json"
    ann.write_text(json.dumps(records))
    return ann, {CLUSTER_COCO: f"{root}/my_coco/", CLUSTER_VG: f"{root}/my_vg/"}


def flow_mapping(path_map: dict[str, str]) -> str:
    """The command-line form of a map: data.path_map={"a": "b", ...}."""
    return "data.path_map=" + json.dumps(path_map)


def test_albef_file_with_absolute_paths_is_read_through_the_map(tmp_path):
    ann, path_map = albef_world(tmp_path)
    cfg = load_config(TINY, [f"data.train=[{ann}]", flow_mapping(path_map), "train.batch_size=2",
                                      "data.num_workers=0"])
    assert cfg.data.path_map == path_map
    records = load_annotations([str(ann)], cfg.data.image_root, cfg.data.path_map)
    assert [r.image for r in records[:2]] == [f"{tmp_path}/my_coco/train2014/COCO_train2014_000000000000.jpg",
                                              f"{tmp_path}/my_vg/1.jpg"]
    loader, sampler = build_pretrain_loader(cfg, rank=0, world_size=1)
    sampler.set_epoch(0)
    batch = next(iter(loader))
    assert batch["images"].shape[0] == 2 and batch["skipped"] == 0  # both images found and decoded
    # The same map from a YAML config file.
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml").data.path_map == path_map


def test_the_longest_matching_prefix_wins_and_relative_paths_join_the_root():
    prefixes = PathMap({"/a/": "/x/", "/a/b/": "/y/", "img/": "photos/"})
    assert prefixes.mapped("/a/b/c.jpg") == "/y/c.jpg" and prefixes.mapped("/a/c.jpg") == "/x/c.jpg"
    assert prefixes.mapped("/z/c.jpg") is None
    assert PathMap().resolve("img/1.jpg", "/root") == ("/root/img/1.jpg", None)  # no map: joined, not checked


def test_a_path_that_maps_to_no_file_is_one_error_naming_file_and_record(tmp_path, capsys):
    ann, path_map = albef_world(tmp_path)
    records = json.loads(ann.read_text())
    (tmp_path / "my_vg" / "3.jpg").unlink()  # record 3's image is missing once mapped
    with pytest.raises(AnnotationError) as err:
        load_annotations([str(ann)], "", path_map)
    assert str(err.value) == (f"{ann}: record 3: image '{records[3]['image']}' maps to '{tmp_path}/my_vg/3.jpg', "
                              "which is not a file")
    # Through the command: one line, exit status 2, nothing trained.
    out = tmp_path / "run"
    assert main(["-q", "pretrain", "--config", str(TINY), f"data.train=[{ann}]", flow_mapping(path_map),
                 f"output_dir={out}", "data.num_workers=0"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"{ann}: record 3: image" in lines[0] and "Traceback" not in lines[0]
    assert not (out / "checkpoints").exists()
    # A path under none of the prefixes that is not a file either.
    records[1]["image"] = "/elsewhere/7.jpg"
    ann.write_text(json.dumps(records))
    with pytest.raises(AnnotationError, match=r"record 1: image '/elsewhere/7.jpg' starts with none of "
                                              r"data.path_map's prefixes .* which is not a file"):
        load_annotations([str(ann)], "", path_map)


@pytest.mark.parametrize("value, problem", [("[/a/]", "takes a mapping"), ('{"": "/x/"}', "both non-empty"),
                                            ('{"/a/": ""}', "both non-empty")])
def test_bad_maps_are_config_errors(value, problem):
    with pytest.raises(ConfigError, match=problem):
        load_config(TINY, [f"data.path_map={value}"])


def test_text_assignment_records_from_albef_files(tmp_path, capsys):
    ann, path_map = albef_world(tmp_path)
    out = tmp_path / "ta.json"
    assert main(["-q", "text-assignment", "--config", str(TINY), "--out", str(out), f"data.train=[{ann}]",
                 flow_mapping(path_map), "--seed", "3"]) == 0
    items = json.loads(out.read_text())
    records = {r.image: r.captions for r in load_annotations([str(ann)], "", path_map)}
    assert len(items) == len(records) == 6 and {item["label"] for item in items} <= {0, 1, 2}
    for item in items:
        a, b = item["images"]
        assert a != b and Path(a).is_file() and Path(b).is_file()  # mapped paths, ready to read
        owners = [image for image, captions in records.items() if item["sentence"] in captions]
        assert len(owners) == 1
        # label 0: the caption is image a's; 1: image b's; 2: neither's (a third image's)
        expected = {0: (True, False), 1: (False, True), 2: (False, False)}[item["label"]]
        assert (owners[0] == a, owners[0] == b) == expected
    # The records load as NLVR2's text-assignment stage reads them.
    from softmask.tasks.nlvr2 import load_records

    cfg = load_config("configs/finetune/nlvr2_tiny.yaml", ["finetune.stage=text_assignment",
                                                           f"finetune.train=[{out}]", "data.image_root="])
    assert len(load_records(cfg, "train")) == 6
    # Same seed, same file; and too few images is one clear error.
    assert main(["-q", "text-assignment", "--config", str(TINY), "--out", str(tmp_path / "again.json"),
                 f"data.train=[{ann}]", flow_mapping(path_map), "--seed", "3"]) == 0
    assert (tmp_path / "again.json").read_text() == out.read_text()
    two = tmp_path / "two.json"
    two.write_text(json.dumps(json.loads(ann.read_text())[:2]))
    assert main(["-q", "text-assignment", "--config", str(TINY), "--out", str(tmp_path / "x.json"),
                 f"data.train=[{two}]", flow_mapping(path_map)]) == 2
    assert "at least 3 distinct images" in capsys.readouterr().err


def test_the_path_map_example_of_the_reproduce_page_is_a_valid_data_section():
    import re

    import yaml

    page = (Path(__file__).resolve().parents[1] / "docs" / "reproduce.md").read_text()
    (block,) = [b for b in re.findall(r"^```yaml\n(.*?)^```", page, re.MULTILINE | re.DOTALL) if "path_map" in b]
    data = yaml.safe_load(block)["data"]
    cfg = load_config("configs/pretrain/4m.yaml", ["data.train=[" + ",".join(data["train"]) + "]",
                                                   flow_mapping(data["path_map"])])
    assert cfg.data.path_map == data["path_map"] and len(cfg.data.train) == 5
