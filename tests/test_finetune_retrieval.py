"""Retrieval fine-tuning and evaluation end to end on a tiny generated world, and its id-aware ITC."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from softmask.cli import main
from softmask.config import load_config
from softmask.data.annotations import AnnotationError
from softmask.data.dataset import Collator, TaskDataset
from softmask.objectives.itc import itc_targets
from softmask.objectives.itm import sample_hard_negatives
from softmask.tasks import retrieval
from softmask.tasks.contrastive import ContrastiveObjective

from helpers import TINY

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "finetune" / "retrieval_tiny.yaml")
KEYS = {"tr1", "tr5", "tr10", "ir1", "ir5", "ir10", "r_mean"}


@pytest.fixture(scope="module")
def world(task_world) -> Path:
    return task_world


@pytest.fixture(scope="module")
def run(world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "retrieval"
    assert main(["-q", "finetune", "retrieval", f"world={world}", f"output_dir={out}", "--config", CONFIG]) == 0
    return out


def _recalls(metrics: dict) -> dict:
    return {k: metrics[k] for k in KEYS}


@pytest.mark.slow
def test_finetune_writes_metrics_and_a_model(run, world):
    for split in ("val", "test"):
        records = json.loads((world / "annotations" / f"retrieval_{split}.json").read_text())
        metrics = json.loads((run / f"metrics_{split}.json").read_text())
        assert set(metrics) >= KEYS and all(isinstance(v, (int, float)) for v in metrics.values())
        assert all(0.0 <= metrics[k] <= 100.0 for k in KEYS)
        assert metrics["r_mean"] == pytest.approx(sum(metrics[k] for k in KEYS - {"r_mean"}) / 6)
        assert metrics["images"] == len(records) and metrics["texts"] == 5 * len(records) and metrics["k"] == 4
    saved = (run / "model" / "config.yaml").read_text()
    assert "task:" not in saved  # a plain softmask model folder
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3, 4] and all(math.isfinite(s["loss_itc"]) for s in steps)


@pytest.mark.slow
def test_evaluate_the_finetuned_run_reproduces_its_metrics(run, world, tmp_path):
    out = tmp_path / "eval.json"
    assert main(["-q", "evaluate", "retrieval", "--checkpoint", str(run), "--config", CONFIG, "--world", str(world),
                 "--json", str(out), "--out", str(tmp_path / "eval")]) == 0
    results = json.loads(out.read_text())
    for split in ("val", "test"):
        assert _recalls(results[split]) == _recalls(json.loads((run / f"metrics_{split}.json").read_text()))


def test_zero_shot_on_a_pretrained_model_folder(world, tmp_path, capsys):
    folder = tmp_path / "pretrained"
    assert main(["-q", "export", "--config", TINY, "--out", str(folder)]) == 0
    out = tmp_path / "zero_shot.json"
    assert main(["-q", "evaluate", "retrieval", "finetune.k_test=2", "--checkpoint", str(folder), "--config", CONFIG,
                 "--world", str(world), "--split", "test", "--json", str(out), f"output_dir={tmp_path / 'eval'}"]) == 0
    assert (tmp_path / "eval" / "metrics_test.json").is_file()
    written = json.loads(out.read_text())
    assert list(written) == ["test"]  # {split: metrics}, one split too
    metrics = written["test"]
    assert set(metrics) >= KEYS and metrics["k"] == 2


def test_id_aware_targets_count_every_caption_of_the_image_in_batch_and_queue(world):
    cfg = load_config(CONFIG, ["finetune.task=retrieval", f"world={world}", "itc.queue_size=4"])
    objective = retrieval.build_objective(cfg, retrieval.build_model(cfg), batches_per_epoch=10)
    objective.image_queue.enqueue(torch.zeros(3, cfg.model.embed_dim), torch.tensor([5, 3, 7]))  # a slot left: -1
    ids = torch.tensor([3, 5, 3])
    step = SimpleNamespace(image_ids=ids, image_ids_all=ids, rows=torch.arange(3))  # candidates: batch, then queue
    sims = torch.zeros(3, 7)
    positives = objective.itc_positives(step, sims)
    t_i2t, t_t2i = itc_targets(sims, sims, positives, alpha=0.0)
    expected = torch.tensor([[1, 0, 1, 0, 1, 0, 0], [0, 1, 0, 1, 0, 0, 0], [1, 0, 1, 0, 1, 0, 0]]).float()
    assert torch.equal(positives, expected)
    assert torch.allclose(t_i2t, expected / expected.sum(1, keepdim=True)) and torch.equal(t_i2t, t_t2i)
    # With distillation: alpha * softmax(momentum similarities) + (1 - alpha) * normalised positives.
    sim_m = torch.arange(21.0).reshape(3, 7) / 10
    t_i2t, t_t2i = itc_targets(sim_m, -sim_m, objective.itc_positives(step, sim_m), alpha=0.25)
    hard = expected / expected.sum(1, keepdim=True)
    assert torch.allclose(t_i2t, 0.25 * sim_m.softmax(1) + 0.75 * hard)
    assert torch.allclose(t_t2i, 0.25 * (-sim_m).softmax(1) + 0.75 * hard)
    assert torch.allclose(t_i2t.sum(1), torch.ones(3))


def test_hard_negatives_never_pair_captions_of_the_same_image():
    image_ids = torch.tensor([0, 0, 1, 1, 2, 2])
    tokens = torch.arange(6).reshape(6, 1).repeat(1, 4)
    tokens[5] = tokens[3]  # an identical caption of another image is not a negative either
    step = SimpleNamespace(ids_all=tokens, mask_all=torch.ones(6, 4, dtype=torch.long), image_ids_all=image_ids)
    exclude = ContrastiveObjective.never_negatives(step)
    assert exclude[0, 1] and exclude[3, 5] and exclude[5, 3] and not exclude[0, 2]
    sim = torch.randn(6, 6) * 5
    for seed in range(20):
        neg_text, neg_image, valid = sample_hard_negatives(sim, sim.T, torch.Generator().manual_seed(seed), exclude)
        assert valid.all()
        rows = torch.arange(6)
        assert not exclude[rows, neg_text].any() and not exclude[neg_image, rows].any()


def _write(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records))
    return path


def test_missing_or_bad_annotations_name_file_and_record(world, tmp_path):
    good = {"image": "images/000000.png", "caption": "a red square", "image_id": 0}
    bad = _write(tmp_path / "train.json", [good, {"image": "images/000001.png", "caption": "a blue disc"}])
    cfg = load_config(CONFIG, ["finetune.task=retrieval", f"world={world}", f"finetune.train=[{bad}]"])
    with pytest.raises(AnnotationError, match=r"train\.json: record 1: missing 'image_id'"):
        retrieval.build_train_data(cfg, 0, 1)
    _write(bad, [good, {**good, "image_id": ""}])
    with pytest.raises(AnnotationError, match=r"train\.json: record 1: 'image_id' must not be empty"):
        retrieval.build_train_data(cfg, 0, 1)
    val = _write(tmp_path / "val.json", [{"image": "images/000000.png", "caption": ["fine", 3]}])
    cfg = load_config(CONFIG, ["finetune.task=retrieval", f"world={world}", f"finetune.val=[{val}]"])
    with pytest.raises(AnnotationError, match=r"val\.json: record 0: 'caption' item 1 must be a non-empty string"):
        retrieval.evaluate(cfg, None, "val", None)


def test_string_image_ids_map_to_dense_indices():
    records = [{"image_id": "coco_9"}, {"image_id": 4}, {"image_id": "coco_9"}]
    assert retrieval.dense_image_ids(records) == {"coco_9": 0, 4: 1}


@pytest.mark.slow
def test_loss_falls_on_a_fixed_batch_and_the_id_queue_fills(world):
    # A random tiny model learns only the uninformed solution in a few dozen steps (equal similarities,
    # the ITM prior), so the test checks that level: ITC reaches log(candidates), which needs targets
    # normalised per row over all the positives, and ITM the entropy of 1 positive per 2 negatives.
    cfg = load_config(CONFIG, ["finetune.task=retrieval", f"world={world}", "data.augment.enabled=false",
                               "model.text.dropout=0", "model.text.attention_dropout=0", "distill.alpha=0",
                               "distill.momentum=0.5", "itc.queue_size=8"])
    torch.manual_seed(0)
    records = [r for i, r in enumerate(retrieval.load_train_records(cfg)) if i % 5 < 2][:8]  # 4 images x 2
    dataset = TaskDataset(records, cfg, "caption", extras=retrieval._image_index)
    batch = Collator.for_config(cfg)([dataset[i] for i in range(len(dataset))])
    assert batch["image_id"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    objective = retrieval.build_objective(cfg, retrieval.build_model(cfg), batches_per_epoch=10)
    assert not any(p.requires_grad for p in objective.model.mlm_head.parameters())
    optimizer = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for step in range(24):
        out = objective(batch, step)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append({k: out[k].item() for k in ("loss", "loss_itc", "loss_itm")})
        if step == 0:
            assert objective.image_queue.all_ids()[:8].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    first, last = losses[0], losses[-4:]
    assert first["loss_itc"] > math.log(16) + 0.5
    assert max(x["loss_itc"] for x in last) < math.log(16) + 0.05
    prior = -(math.log(1 / 3) / 3 + 2 * math.log(2 / 3) / 3)
    assert max(x["loss_itm"] for x in last) < prior + 0.02 < first["loss_itm"]
    assert sum(x["loss"] for x in last) / 4 < first["loss"] - 1.0
