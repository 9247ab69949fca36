"""The pretraining engine end to end on a tiny model and data the tests draw themselves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from softmask.cli import main
from softmask.config import load_config
from softmask.tasks.pretrain import pretrain
from softmask.train.checkpoint import list_checkpoints, load_checkpoint

from helpers import COLOURS, SHAPES, TINY, make_world
from helpers import pretrain_overrides as overrides
from helpers import read_metrics as metrics
from helpers import torchrun_pretrain as _torchrun


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    make_world(root)
    return root


@pytest.mark.slow
def test_loss_falls(world, tmp_path):
    # Distillation off: against a random momentum teacher the soft targets' entropy (about log(vocab)
    # for MLM) is a floor the loss cannot go under in a few dozen steps from random initialisation.
    cfg = load_config(TINY, overrides(world, tmp_path, "train.batch_size=8", "train.max_steps=40",
                                      "train.lr_peak=1e-3", "distill.alpha=0", "train.save_every=100"))
    state = pretrain(cfg)
    assert state.step == 40
    losses = [m["loss"] for m in metrics(tmp_path)]
    assert len(losses) == 40 and all(np.isfinite(losses))
    assert np.mean(losses[-8:]) < np.mean(losses[:8]) - 0.3
    first = metrics(tmp_path)[0]
    for key in ("step", "loss", "loss_itc", "loss_itm", "loss_mlm", "lr", "temp", "pairs_per_s",
                "skipped_samples"):
        assert key in first
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "model" / "model.safetensors").is_file()
    assert any((tmp_path / "tensorboard").iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("stop_at", [3, 4])  # mid-epoch; the last batch of an epoch (16 pairs in batches of 4)
def test_resume_equals_uninterrupted(world, tmp_path, stop_at, caplog):
    common = ("train.batch_size=4", "train.max_steps=6", f"train.save_every={stop_at}", "train.keep_last=5")
    full = tmp_path / "full"
    pretrain(load_config(TINY, overrides(world, full, *common)))
    # Same run, "stopped" after step stop_at: remove what came later, then resume.
    part = tmp_path / "part"
    pretrain(load_config(TINY, overrides(world, part, *common)))
    for ckpt in list_checkpoints(part):
        if not ckpt.name.endswith(f"{stop_at:08d}.pt"):
            ckpt.unlink()
    caplog.set_level("INFO", logger="softmask")
    pretrain(load_config(TINY, overrides(world, part, *common, "resume=auto")))
    assert "resumed from" in caplog.text and "saved with another config" not in caplog.text
    assert [m["loss"] for m in metrics(part)] == [m["loss"] for m in metrics(full)]
    a = load_checkpoint(list_checkpoints(full)[-1])["task"]
    b = load_checkpoint(list_checkpoints(part)[-1])["task"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_bad_samples_are_skipped_and_counted(world, tmp_path):
    root = tmp_path / "data"
    make_world(root, n=8)
    records = json.loads((root / "pretrain.json").read_text())
    (root / "images" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    records[5]["image"] = "images/missing.png"
    records[6]["caption"] = "?!..."  # empty after cleaning
    (root / "pretrain.json").write_text(json.dumps(records))
    out = tmp_path / "run"
    state = pretrain(load_config(TINY, overrides(root, out, "train.batch_size=4", "train.max_steps=2")))
    assert state.skipped_samples == 3
    assert metrics(out)[-1]["skipped_samples"] == 3
    log = (out / "train.log").read_text()
    assert "missing.png" in log and "3.png" in log
    with pytest.raises(Exception, match="missing.png|3.png|empty"):
        pretrain(load_config(TINY, overrides(root, tmp_path / "raise", "train.batch_size=4", "train.max_steps=2",
                                             "data.on_bad_sample=raise")))


def test_malformed_annotations_fail_before_training(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image": "a.jpg", "caption": "fine"}, {"image": "b.jpg", "caption": 7}]))
    out = tmp_path / "run"
    code = main(["pretrain", "--config", str(TINY), f"data.train=[{bad}]", f"output_dir={out}"])
    err = capsys.readouterr().err
    assert code == 2 and "bad.json" in err and "record 1" in err and "caption" in err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("extra", [
    ("train.batch_size=1",),  # no other pair to be a hard negative
    ("train.batch_size=3", "itc.queue_size=7"),  # queue not a multiple of the batch
])
def test_edge_case_batches_train(world, tmp_path, extra):
    state = pretrain(load_config(TINY, overrides(world, tmp_path, "train.max_steps=3", *extra)))
    assert state.step == 3 and all(np.isfinite(m["loss"]) for m in metrics(tmp_path))


@pytest.mark.slow
def test_duplicate_captions_do_not_crash(tmp_path):
    root = tmp_path / "dup"
    make_world(root, n=4)
    records = [{"image": f"images/{i % 4}.png", "caption": "the same caption"} for i in range(8)]
    (root / "pretrain.json").write_text(json.dumps(records))
    state = pretrain(load_config(TINY, overrides(root, tmp_path / "run", "train.batch_size=8", "train.max_steps=2")))
    assert state.step == 2





@pytest.mark.slow
def test_two_processes_equal_one_with_the_same_global_batch(world, tmp_path):
    exact = ("model.text.dropout=0", "model.text.attention_dropout=0", "data.augment.enabled=false",
             "train.max_steps=4")
    single, double = tmp_path / "one", tmp_path / "two"
    _torchrun(1, ["--config", str(TINY), *overrides(world, single, "train.batch_size=8", *exact)], tmp_path)
    _torchrun(2, ["--config", str(TINY), *overrides(world, double, "train.batch_size=4", *exact)], tmp_path)
    one, two = metrics(single), metrics(double)
    assert len(one) == len(two) == 4
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "loss_itc", "loss_itm", "loss_mlm"):
            assert abs(a[key] - b[key]) <= 1e-5, (a["step"], key, a[key], b[key])


@pytest.mark.slow
def test_nonfinite_losses_are_skipped_then_stop_the_run(world, tmp_path, monkeypatch):
    from softmask.tasks.pretrain import PretrainObjective
    from softmask.train.loop import TrainingError

    real_forward = PretrainObjective.forward
    bad_steps = {2, 4, 5, 6}  # one isolated non-finite step, then three in a row

    def forward(self, batch, step, micro=0):
        out = real_forward(self, batch, step, micro)
        if self.calls in bad_steps:
            out["loss"] = out["loss"] * float("nan")
        self.calls += 1
        return out

    monkeypatch.setattr(PretrainObjective, "calls", 0, raising=False)
    monkeypatch.setattr(PretrainObjective, "forward", forward)
    out = tmp_path / "run"
    cfg = load_config(TINY, overrides(world, out, "train.batch_size=4", "train.max_steps=10",
                                      "train.max_nonfinite=3", "train.save_every=100"))
    with pytest.raises(TrainingError, match="3 consecutive non-finite losses"):
        pretrain(cfg)
    (ckpt,) = list_checkpoints(out)
    state = load_checkpoint(ckpt)["state"]
    assert state["step"] == 3 and state["nonfinite_steps"] == 4  # calls 0, 1, 3 were good steps
    assert all(np.isfinite(m["loss"]) for m in metrics(out))


@pytest.mark.slow
def test_pretrain_on_webdataset_shards(tmp_path):
    from softmask.data.annotations import load_annotations
    from softmask.data.shards import write_shards

    root = tmp_path / "w"
    ann = make_world(root, n=12)
    shards = write_shards(load_annotations([str(ann)], str(root)), str(tmp_path / "shards"), samples_per_shard=4)
    assert len(shards) == 3
    pattern = str(tmp_path / "shards" / "shard-{000000..000002}.tar")
    out = tmp_path / "run"
    cfg = load_config(TINY, [f"data.train=[{pattern}]", f"output_dir={out}", "data.num_workers=0",
                             "train.batch_size=4", "train.max_steps=4", "itc.queue_size=8", "train.log_every=1"])
    state = pretrain(cfg)
    assert state.step == 4 and len(metrics(out)) == 4


def test_bf16_autocast_and_grad_accumulation_run(world, tmp_path, monkeypatch):
    from softmask.models.vlp import VisionLanguageModel
    from softmask.tasks.pretrain import PretrainObjective

    micro_batches, itm_dtypes = [], []
    real_forward, real_itm_logits = PretrainObjective.forward, VisionLanguageModel.itm_logits

    def forward(self, batch, step, micro=0):
        micro_batches.append((step, micro))
        return real_forward(self, batch, step, micro)

    def itm_logits(self, fused, attention_mask=None):
        logits = real_itm_logits(self, fused, attention_mask)
        itm_dtypes.append(logits.dtype)
        return logits

    monkeypatch.setattr(PretrainObjective, "forward", forward)
    monkeypatch.setattr(VisionLanguageModel, "itm_logits", itm_logits)
    state = pretrain(load_config(TINY, overrides(world, tmp_path, "train.batch_size=2", "train.grad_accum=2",
                                                 "train.max_steps=2", "train.precision=bf16",
                                                 "train.clip_grad=1.0")))
    assert state.step == 2 and all(np.isfinite(m["loss"]) for m in metrics(tmp_path))
    assert micro_batches == [(0, 0), (0, 1), (1, 0), (1, 1)]  # two micro-batches per optimiser step
    assert itm_dtypes and set(itm_dtypes) == {torch.bfloat16}  # the forward ran under bf16 autocast


@pytest.mark.slow
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_the_momentum_model_moves_one_ema_step_per_optimiser_step(world, tmp_path, grad_accum):
    from softmask.data.sources import build_pretrain_data as build_data
    from softmask.models.vlp import create_model

    cfg = load_config(TINY, overrides(world, tmp_path, "train.batch_size=4", "train.max_steps=2",
                                      f"train.grad_accum={grad_accum}", "train.save_every=1", "train.keep_last=5",
                                      "distill.momentum=0.5"))
    torch.manual_seed(cfg.seed)  # as pretrain() does: the initial weights
    build_data(cfg, 0, 1)
    start = {k: v.detach().clone() for k, v in create_model(cfg).state_dict().items()}
    pretrain(cfg)
    first, second = (load_checkpoint(path)["task"] for path in list_checkpoints(tmp_path))
    online = {k: v for k, v in start.items() if v.is_floating_point() and not k.endswith("position_ids")}
    for key, value in online.items():
        theta1, theta2 = first[f"model.{key}"], second[f"model.{key}"]
        start_m = value.clone().mul_(0.5).add_(value, alpha=0.5)  # ALBEF's EMA of identical models at step 0
        expected1 = start_m.mul_(0.5).add_(theta1, alpha=0.5)  # one EMA step after optimiser step 1
        expected2 = expected1.clone().mul_(0.5).add_(theta2, alpha=0.5)
        assert torch.equal(first[f"momentum_model.{key}"], expected1), key
        assert torch.equal(second[f"momentum_model.{key}"], expected2), key


def test_a_run_and_its_saved_model_record_the_tokenizer_every_command_reads_them_with(world, tmp_path):
    from softmask.eval.world import WorldEncoder
    from softmask.inference import load_model
    from softmask.runs import tokenizer_source

    vocab = tmp_path / "vocab.txt"  # a vocabulary of the world's own words, not bert-base-uncased's
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "the", "is", *COLOURS, *SHAPES]
    vocab.write_text("\n".join(words) + "\n")
    out = tmp_path / "run"
    pretrain(load_config(TINY, overrides(world, out, "train.batch_size=4", "train.max_steps=1",
                                         f"data.tokenizer={vocab}")))
    assert (out / "model" / "vocab.txt").read_text() == vocab.read_text()
    for path in (out, out / "model", list_checkpoints(out)[-1]):
        assert Path(tokenizer_source(path)).read_text() == vocab.read_text(), path
        model, _ = load_model(path)
        assert WorldEncoder(model, world, tokenizer_source(path)).tokenizer.size == len(words)
    assert tokenizer_source(tmp_path / "nothing_saved_here") == ""  # the default vocabulary


@pytest.mark.slow
def test_easy_negatives_then_hard_ones_and_the_temperature_floor_of_the_draw(world, tmp_path, monkeypatch):
    """itm.easy_negatives_steps: the first steps draw negatives uniformly (equal weights); later ones by
    ITC similarity over a temperature of at least itm.negative_temp_min."""
    from softmask.tasks import contrastive

    seen = []
    original = contrastive.sample_hard_negatives

    def record(sim_i2t, sim_t2i, gen, exclude=None):
        seen.append((sim_i2t.clone(), sim_t2i.clone()))
        return original(sim_i2t, sim_t2i, gen, exclude=exclude)

    monkeypatch.setattr(contrastive, "sample_hard_negatives", record)
    pretrain(load_config(TINY, overrides(world, tmp_path, "train.batch_size=8", "train.max_steps=4",
                                         "itm.easy_negatives_steps=2", "itm.negative_temp_min=0.5")))
    assert len(seen) == 4
    for sim_i2t, sim_t2i in seen[:2]:
        assert torch.count_nonzero(sim_i2t) == 0 and torch.count_nonzero(sim_t2i) == 0
    for sim_i2t, sim_t2i in seen[2:]:  # cosines over a temperature of 0.5 (the learned one is 0.07)
        assert 0 < sim_i2t.abs().max() <= 2.0 + 1e-5 and 0 < sim_t2i.abs().max() <= 2.0 + 1e-5
    seen.clear()
    pretrain(load_config(TINY, overrides(world, tmp_path / "albef", "train.batch_size=8", "train.max_steps=1")))
    assert seen[0][0].abs().max() > 2.0  # without the options (ALBEF): the learned temperature, 0.07


def test_a_resumed_run_is_told_what_it_now_trains_differently():
    from softmask.config import to_dict
    from softmask.train.checkpoint import config_changes

    now = to_dict(load_config(TINY, ["method=softmask", "train.max_steps=20"]))
    saved = to_dict(load_config(TINY, ["method=softmask", "train.max_steps=10", "itc.gamma=1.0"]))
    del saved["softmask"]["masked_pairs"]  # a run saved before the option existed
    training, length = config_changes(saved, now)
    assert training == ["itc.gamma: 1.0 -> 2.0", "softmask.masked_pairs: 'positives' -> 'all' (not in the saved "
                        "config: the value before the option existed)"]
    assert length == ["train.max_steps: 10 -> 20"]
    assert config_changes(now, now) == ([], [])
    albef = to_dict(load_config(TINY, ["method=albef"]))
    older = {**albef, "softmask": {k: v for k, v in albef["softmask"].items() if k != "masked_pairs"}}
    assert config_changes(older, albef) == ([], [])  # no soft masks: the masked pairs change nothing


@pytest.mark.slow
def test_resuming_with_another_config_warns_before_the_saved_one_is_overwritten(world, tmp_path, caplog):
    pretrain(load_config(TINY, overrides(world, tmp_path, "train.batch_size=4", "train.max_steps=2")))
    caplog.set_level("INFO", logger="softmask")
    pretrain(load_config(TINY, overrides(world, tmp_path, "train.batch_size=4", "train.max_steps=3",
                                         "itm.weight=2.0", "resume=auto")))
    assert "which was saved with another config" in caplog.text and "itm.weight: 1.0 -> 2.0" in caplog.text
    assert "resuming with train.max_steps: 2 -> 3" in caplog.text
    assert load_config(tmp_path / "config.yaml").itm.weight == 2.0  # the run's config now says what it continued with
