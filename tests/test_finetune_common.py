"""What every downstream task shares: the `world` key, task records, the command line, loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from softmask.cli import main
from softmask.config import ConfigError, load_config
from softmask.data.annotations import AnnotationError, Field, load_records
from softmask.data.dataset import Collator, TaskDataset
from softmask.models.loading import CheckpointError
from softmask.tasks.finetune import get_task, load_task_model

from helpers import TINY

ROOT = Path(__file__).resolve().parents[1]


def test_world_key_fills_image_root_and_the_task_files(tmp_path):
    cfg = load_config(TINY, [f"world={tmp_path}", "finetune.task=vqa"])
    notes = tmp_path / "annotations"
    assert cfg.data.image_root == str(tmp_path)
    assert cfg.finetune.train == [str(notes / "vqa_train.json")]
    assert cfg.finetune.test == [str(notes / "vqa_test.json")]
    assert cfg.finetune.answer_list == str(notes / "answer_list.json")
    ta = load_config(TINY, [f"world={tmp_path}", "finetune.task=nlvr2", "finetune.stage=text_assignment"])
    assert ta.finetune.train == [str(notes / "nlvr_ta.json")] and ta.finetune.val == []
    # Given lists win; without a task the world fills the pretraining data.
    mine = load_config(TINY, [f"world={tmp_path}", "finetune.task=ve", "finetune.train=[a.json]"])
    assert mine.finetune.train == ["a.json"] and mine.finetune.val == [str(notes / "ve_val.json")]
    assert load_config(TINY, [f"world={tmp_path}"]).data.train == [str(notes / "pretrain.json")]


@pytest.mark.parametrize("override, key", [("finetune.task=captioning", "finetune.task"),
                                           ("finetune.score=itc", "finetune.score"),
                                           ("finetune.stage=pretrain", "finetune.stage"),
                                           ("finetune.eval_splits=[train]", "finetune.eval_splits")])
def test_bad_finetune_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(TINY, [override])


def _write(path: Path, records) -> str:
    path.write_text(json.dumps(records))
    return str(path)


def test_task_records_are_checked_with_file_and_record(tmp_path):
    fields = [Field("sentence", (str,)), Field("label", (str,), lambda v: None if v in ("a", "b") else f"is {v!r}")]
    good = {"image": "x.png", "sentence": "a cat", "label": "a"}
    records = load_records([_write(tmp_path / "ok.json", [good])], str(tmp_path), fields)
    assert records[0]["image"] == str(tmp_path / "x.png") and records[0]["_source"].endswith("record 0")
    cases = [([good, {"image": "y.png", "label": "a"}], r"bad.json: record 1: missing 'sentence'"),
             ([good, good, {**good, "label": "c"}], r"bad.json: record 2: 'label' is 'c'"),
             ([{**good, "sentence": 3}], r"record 0: 'sentence' must be a string, got int"),
             ({"image": "x"}, r"bad.json: the top level must be a JSON list"),
             ([{**good, "image": ""}], r"record 0: 'image' must hold non-empty path strings")]
    for content, message in cases:
        with pytest.raises(AnnotationError, match=message):
            load_records([_write(tmp_path / "bad.json", content)], "", fields)
    with pytest.raises(AnnotationError, match="missing.json: annotation file not found"):
        load_records([str(tmp_path / "missing.json")], "", fields)


def test_task_samples_skip_bad_images_and_collate_extras(tmp_path):
    from PIL import Image

    Image.new("RGB", (20, 10), (200, 10, 10)).save(tmp_path / "a.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    records = load_records([_write(tmp_path / "t.json", [
        {"images": ["a.png", "a.png"], "sentence": "Two red boxes!", "label": 1},
        {"images": ["a.png", "broken.png"], "sentence": "broken", "label": 0},
    ])], str(tmp_path), [Field("sentence", (str,)), Field("label", (int,))], image_key="images")
    cfg = load_config(TINY, ["model.vision.image_size=16", "model.vision.patch_size=8"])
    dataset = TaskDataset(records, cfg, "sentence", extras=lambda r: {"label": r["label"], "tag": [r["label"]]},
                          image_key="images")
    batch = Collator.for_config(cfg)([dataset[0], dataset[1]])
    assert batch["images"].shape == (1, 2, 3, 16, 16) and batch["skipped"] == 1
    assert "broken.png" in batch["skipped_samples"][0]
    assert batch["texts"] == ["two red boxes"] and batch["label"].tolist() == [1] and batch["tag"] == [[1]]
    assert batch["input_ids"][0, 0].item() == 101  # [CLS]


def test_overrides_may_follow_the_options_on_the_command_line(tmp_path, capsys):
    # `softmask finetune TASK --config F key=value`: argparse alone would reject the trailing overrides.
    bad = tmp_path / "bad.json"
    bad.write_text("[1]")
    code = main(["-q", "finetune", "ve", "--config", str(ROOT / "configs" / "finetune" / "ve_tiny.yaml"),
                 f"finetune.train=[{bad}]", f"finetune.val=[{bad}]", f"finetune.test=[{bad}]",
                 f"output_dir={tmp_path / 'run'}"])
    assert code == 2
    assert "bad.json: record 0: must be an object" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["finetune", "ve", "--config", "x.yaml", "--no-such-option"])


def test_unknown_task_and_missing_checkpoint_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown task 'ocr'"):
        get_task("ocr")
    cfg = load_config(TINY, ["finetune.task=ve"])
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_task_model(cfg, tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    expected = "not a training run folder .*, a checkpoint file .* or a saved model folder"
    with pytest.raises(CheckpointError, match=expected):
        load_task_model(cfg, tmp_path / "empty")


@pytest.mark.parametrize("name, task", [("retrieval_coco", "retrieval"), ("retrieval_flickr", "retrieval"),
                                        ("ve", "ve"), ("vqa", "vqa"), ("nlvr2_ta", "nlvr2"), ("nlvr2", "nlvr2")])
def test_full_size_finetune_configs_validate(name, task):
    cfg = load_config(ROOT / "configs" / "finetune" / f"{name}.yaml", [f"finetune.task={task}", "model.init="])
    assert cfg.model.text.hidden_size == 768 and cfg.model.vision.width == 768
    assert cfg.model.vision.image_size == (256 if name == "nlvr2_ta" else 384)
    assert cfg.train.batch_size * 8 == {"nlvr2": 128}.get(name, 256)  # per GPU x 8 GPUs, the paper's batch


@pytest.mark.slow
def test_full_size_ve_model_runs_one_step_at_384_px():
    import torch

    from softmask.tasks import ve

    cfg = load_config(ROOT / "configs" / "finetune" / "ve.yaml",
                      ["finetune.task=ve", "model.init=", "train.precision=fp32", "data.augment.enabled=false"])
    torch.manual_seed(0)
    task = ve.build_objective(cfg, ve.build_model(cfg), batches_per_epoch=10)
    batch = {"images": torch.randint(0, 256, (1, 3, 384, 384), dtype=torch.uint8),
             "input_ids": torch.randint(1000, 30000, (1, 20)), "attention_mask": torch.ones(1, 20, dtype=torch.long),
             "label": torch.tensor([2])}
    out = task(batch, step=0)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and task.model.cls_head[0].weight.grad is not None
    assert task.model.backbone.visual_encoder.pos_embed.shape[1] == 1 + 24 * 24
