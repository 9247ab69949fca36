"""Visual entailment fine-tuning and evaluation end to end on a tiny generated world."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from softmask.cli import main
from softmask.config import load_config
from softmask.data.annotations import AnnotationError
from softmask.data.dataset import Collator, TaskDataset
from softmask.models.loading import CheckpointError
from softmask.objectives.distill import distilled_cross_entropy
from softmask.tasks import ve
from softmask.tasks.classify import accuracy_metrics
from softmask.tasks.finetune import load_task_model

from helpers import TINY

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "finetune" / "ve_tiny.yaml")


@pytest.fixture(scope="module")
def world(task_world) -> Path:
    return task_world


@pytest.fixture(scope="module")
def run(world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "ve"
    assert main(["-q", "finetune", "ve", f"world={world}", f"output_dir={out}", "--config", CONFIG]) == 0
    return out


@pytest.mark.slow
def test_finetune_writes_metrics_predictions_and_a_ve_model(run, world):
    for split in ("val", "test"):
        n = len(json.loads((world / "annotations" / f"ve_{split}.json").read_text()))
        metrics = json.loads((run / f"metrics_{split}.json").read_text())
        assert 0.0 <= metrics["acc"] <= 100.0 and metrics["count"] == n and metrics["skipped"] == 0
        assert sum(metrics[f"count_{name}"] for name in ve.LABELS) == n
        predictions = json.loads((run / f"ve_predictions_{split}.json").read_text())
        assert len(predictions) == n
        correct = sum(p["label"] == p["prediction"] for p in predictions)
        assert metrics["acc"] == pytest.approx(100.0 * correct / n)
    assert "task: ve" in (run / "model" / "config.yaml").read_text()
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 4 and all(math.isfinite(s["loss"]) and 0 <= s["acc"] <= 1 for s in steps)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["run", "model folder"])
def test_evaluate_the_finetuned_model_reproduces_its_metrics(run, world, tmp_path, where):
    checkpoint = run if where == "run" else run / "model"
    out = tmp_path / "eval.json"
    assert main(["-q", "evaluate", "ve", "--checkpoint", str(checkpoint), "--config", CONFIG, "--world", str(world),
                 "--json", str(out), "--out", str(tmp_path / "files")]) == 0
    results = json.loads(out.read_text())
    for split in ("val", "test"):
        assert results[split] == json.loads((run / f"metrics_{split}.json").read_text())
    assert (tmp_path / "files" / "ve_predictions_test.json").is_file()


def test_a_pretrained_model_is_refused(world, tmp_path, capsys):
    folder = tmp_path / "pretrained"
    assert main(["-q", "export", "--config", TINY, "--out", str(folder)]) == 0
    cfg = load_config(CONFIG, ["finetune.task=ve", f"world={world}"])
    with pytest.raises(CheckpointError, match="a pretrained model, not fine-tuned; evaluating ve needs a model"):
        load_task_model(cfg, folder)
    capsys.readouterr()
    assert main(["-q", "evaluate", "ve", "--checkpoint", str(folder), "--config", CONFIG, "--world", str(world),
                 "--out", str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err
    assert "softmask finetune ve" in err and "Traceback" not in err


def test_bad_labels_name_file_record_and_value(world, tmp_path):
    good = {"image": "images/000000.png", "sentence": "A red square.", "label": "entailment"}
    bad = tmp_path / "ve_bad.json"
    bad.write_text(json.dumps([good, good, {**good, "label": "Entailment"}]))
    cfg = load_config(CONFIG, ["finetune.task=ve", f"world={world}", f"finetune.train=[{bad}]",
                               f"finetune.test=[{bad}]"])
    message = r"ve_bad\.json: record 2: 'label' must be one of entailment, neutral, contradiction, got 'Entailment'"
    with pytest.raises(AnnotationError, match=message):
        ve.build_train_data(cfg, 0, 1)
    with pytest.raises(AnnotationError, match=message):
        ve.evaluate(cfg, ve.build_model(cfg), "test", None)
    bad.write_text(json.dumps([{"image": "images/000000.png", "sentence": "A red square."}]))
    with pytest.raises(AnnotationError, match=r"ve_bad\.json: record 0: missing 'label'"):
        ve.build_train_data(cfg, 0, 1)


def test_distillation_loss_mixes_hard_and_soft_targets():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    teacher = torch.tensor([[0.0, 3.0, 0.0], [1.0, 1.0, -2.0]])
    labels = torch.tensor([0, 2])
    hard = F.cross_entropy(logits, labels)
    soft = -(teacher.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean()
    assert torch.allclose(distilled_cross_entropy(logits, labels), hard)
    assert torch.allclose(distilled_cross_entropy(logits, labels, teacher, 0.0), hard)
    assert torch.allclose(distilled_cross_entropy(logits, labels, teacher, 0.4), 0.6 * hard + 0.4 * soft)


def test_metrics_per_label():
    metrics = accuracy_metrics([0, 1, 1, 2, 0], [0, 1, 2, 2, 1], ve.LABELS)
    assert metrics["acc"] == pytest.approx(60.0) and metrics["count"] == 5
    assert (metrics["acc_entailment"], metrics["acc_neutral"], metrics["acc_contradiction"]) == (100.0, 50.0, 50.0)
    assert metrics["count_neutral"] == 2


@pytest.mark.slow
def test_loss_falls_on_a_fixed_batch(world):
    cfg = load_config(CONFIG, ["finetune.task=ve", f"world={world}", "data.augment.enabled=false",
                               "model.text.dropout=0", "model.text.attention_dropout=0", "distill.alpha=0.4",
                               "distill.momentum=0.5", "distill.alpha_warmup_steps=1"])
    torch.manual_seed(0)
    records = ve.load_records(cfg.finetune.train, cfg.data.image_root, ve.FIELDS)[:6]
    dataset = TaskDataset(records, cfg, "sentence", extras=ve._label_index)
    batch = Collator.for_config(cfg)([dataset[i] for i in range(len(dataset))])
    assert sorted(set(batch["label"].tolist())) == [0, 1, 2]
    task = ve.build_objective(cfg, ve.build_model(cfg), batches_per_epoch=10)
    assert task.momentum_model is not None and not task.model.backbone.itm_head.weight.requires_grad
    optimizer = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-3)
    losses, accs = [], []
    for step in range(20):
        out = task(batch, step)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss_ce"].item())
        accs.append(out["acc"].item())
    assert losses[0] > math.log(3) - 0.2
    assert sum(losses[-3:]) / 3 < 0.6 * losses[0] and accs[-1] >= 5 / 6


def test_an_albef_ve_checkpoint_loads_and_gives_its_classifiers_outputs(world, tmp_path, capsys):
    """A checkpoint in the layout of ALBEF's VE script ({"model": ...}: a BertModel text encoder, cls_head.0/2,
    momentum copies, no projections or ITM head) loads for evaluation; its logits are the file's
    classifier on the fused [CLS] of the file's backbone."""
    from softmask.models.loading import load_model_checkpoint
    from softmask.models.vlp import create_model
    from softmask.tasks.finetune import load_task_model

    from helpers import albef_state_dict, tiny_model_config

    model_cfg = tiny_model_config()
    sd = {k.replace("text_encoder.bert.", "text_encoder."): v for k, v in albef_state_dict(model_cfg).items()
          if not k.startswith(("text_encoder.cls.", "text_encoder_m.cls.", "vision_proj", "text_proj", "itm_head"))
          and k not in ("temp", "image_queue", "text_queue", "queue_ptr")}
    g = torch.Generator().manual_seed(3)
    d = model_cfg.text.hidden_size
    head = {"cls_head.0.weight": torch.randn(d, d, generator=g), "cls_head.0.bias": torch.randn(d, generator=g),
            "cls_head.2.weight": torch.randn(3, d, generator=g), "cls_head.2.bias": torch.randn(3, generator=g)}
    sd.update(head)
    sd.update({k.replace("cls_head.", "cls_head_m."): v.clone() for k, v in head.items()})
    path = tmp_path / "ALBEF_ve.pth"
    torch.save({"model": sd, "epoch": 4}, path)
    cfg = load_config(CONFIG, [f"world={world}", "finetune.task=ve"])
    cfg.model = model_cfg
    model = load_task_model(cfg, path).eval()
    pixels, ids = torch.randn(2, 3, 32, 32), torch.randint(5, 120, (2, 7))
    mask = torch.ones_like(ids)
    backbone = create_model(model_cfg).eval()
    load_model_checkpoint(backbone, path)
    with torch.no_grad():
        cls = backbone.fuse(backbone.encode_text(ids, mask), mask, backbone.encode_image(pixels))[:, 0]
        expected = F.relu(cls @ head["cls_head.0.weight"].T + head["cls_head.0.bias"]) @ head["cls_head.2.weight"].T \
            + head["cls_head.2.bias"]
        assert torch.allclose(model(pixels, ids, mask), expected, atol=1e-5)
    # A pretraining checkpoint (no cls_head) is not a VE checkpoint: one line naming what is missing.
    pre = tmp_path / "ALBEF_4M.pth"
    torch.save({"model": albef_state_dict(model_cfg)}, pre)
    with pytest.raises(CheckpointError, match=r"does not fit the ve model .* not in the file .*cls_head"):
        load_task_model(cfg, pre)


def test_evaluate_ve_takes_an_albef_checkpoint_from_the_command_line(world, tmp_path):
    from helpers import albef_state_dict

    model_cfg = load_config(CONFIG, [f"world={world}"]).model
    d = model_cfg.text.hidden_size
    sd = {k.replace("text_encoder.bert.", "text_encoder."): v for k, v in albef_state_dict(model_cfg).items()
          if k.startswith(("visual_encoder.", "text_encoder.")) and ".cls." not in k}
    sd.update({"cls_head.0.weight": torch.randn(d, d), "cls_head.0.bias": torch.zeros(d),
               "cls_head.2.weight": torch.randn(3, d), "cls_head.2.bias": torch.zeros(3)})
    path = tmp_path / "ALBEF_ve.pth"
    torch.save({"model": sd}, path)
    out = tmp_path / "eval.json"
    assert main(["-q", "evaluate", "ve", "--checkpoint", str(path), "--config", CONFIG, "--world", str(world),
                 "--split", "test", "--json", str(out)]) == 0
    metrics = json.loads(out.read_text())["test"]
    assert 0 <= metrics["acc"] <= 100 and metrics["count"] > 0
    assert (tmp_path / "eval" / "ve_ALBEF_ve" / "metrics_test.json").is_file()  # next to the file it evaluated
