"""Whole-model checkpoints (ALBEF/TCL format, softmask folders) and the loaders' error handling."""

import logging

import pytest
import torch

from softmask import CheckpointError, create_model
from softmask.models.loading import (
    compact_keys,
    detect_format,
    load_model_checkpoint,
    load_text_checkpoint,
    load_vision_checkpoint,
    read_state_dict,
)

from helpers import albef_state_dict, tiny_config, tiny_model_config


@pytest.fixture
def albef_file(tmp_path, tiny_cfg):
    sd = albef_state_dict(tiny_cfg)
    path = tmp_path / "ALBEF_tiny.pth"
    torch.save({"model": sd, "epoch": 29, "config": {"batch_size": 64}, "optimizer": {"state": {}}}, path)
    return path, sd


def test_albef_checkpoint_imports(albef_file, tiny_cfg):
    path, sd = albef_file
    assert detect_format(sd) == "albef"
    model = create_model(tiny_cfg)
    report = load_model_checkpoint(model, path)
    assert report.missing == [] and report.unexpected == []
    own = model.state_dict()
    b = "text_encoder.bert.encoder.layer."
    qkv = torch.cat([sd[b + f"1.attention.self.{n}.weight"] for n in ("query", "key", "value")])
    assert torch.equal(own["text_encoder.layers.1.attn.qkv.weight"], qkv)
    kv = torch.cat([sd[b + f"3.crossattention.self.{n}.bias"] for n in ("key", "value")])
    assert torch.equal(own["fusion_encoder.layers.1.cross_attn.kv.bias"], kv)
    q = sd[b + "2.crossattention.self.query.weight"]
    assert torch.equal(own["fusion_encoder.layers.0.cross_attn.q.weight"], q)
    assert torch.equal(own["fusion_encoder.layers.0.ffn.fc2.weight"], sd[b + "2.output.dense.weight"])
    assert torch.equal(own["visual_encoder.blocks.1.attn.qkv.weight"], sd["visual_encoder.blocks.1.attn.qkv.weight"])
    assert torch.equal(own["mlm_head.bias"], sd["text_encoder.cls.predictions.bias"])
    assert torch.equal(own["itm_head.weight"], sd["itm_head.weight"])
    assert float(model.temp.detach()) == pytest.approx(0.05)
    reasons = set(report.ignored.values())
    assert any("momentum" in r for r in reasons) and "image_queue" in report.ignored
    assert "visual_encoder_m.blocks.{0-1}" in report.summary()


def test_albef_import_through_config_and_forward(albef_file, tiny_cfg):
    path, sd = albef_file
    model = create_model(tiny_model_config(f"init={path}")).eval()
    # model.init was applied: every tensor is the one the explicit loader puts there (none is random).
    direct = create_model(tiny_cfg)
    load_model_checkpoint(direct, path)
    for key, value in direct.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert torch.equal(model.itm_head.weight, sd["itm_head.weight"])
    assert float(model.temp.detach()) == pytest.approx(0.05)
    pixels, ids = torch.randn(2, 3, 32, 32), torch.randint(5, 120, (2, 6))
    mask = torch.ones_like(ids)
    assert torch.isfinite(model.itm_logits(model.fuse(model.encode_text(ids, mask), mask,
                                                       model.encode_image(pixels)))).all()


def test_albef_with_other_fusion_layer_is_refused(albef_file):
    path, _ = albef_file
    model = create_model(tiny_model_config("text.fusion_layer=1"))
    expected = r"model.text.fusion_layer is 1 but .* has 2 \(cross-attention from layer\)"
    with pytest.raises(CheckpointError, match=expected):
        load_model_checkpoint(model, path)


def test_albef_at_higher_resolution_interpolates(albef_file):
    path, sd = albef_file
    model = create_model(tiny_model_config("vision.image_size=48"))
    report = load_model_checkpoint(model, path)
    assert model.visual_encoder.pos_embed.shape == (1, 37, 48)
    assert any("4x4 to a 6x6" in note for note in report.notes)


def test_softmask_folder_as_model_init(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "pre")
    model = create_model(tiny_model_config(f"init={tmp_path / 'pre'}"))
    for (k, a), b in zip(tiny_model.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


@pytest.mark.parametrize(
    ("loader", "expected"),
    [(load_vision_checkpoint, "looks like a Hugging Face BERT checkpoint; expected a ViT/DeiT"),
     (load_model_checkpoint, "looks like a Hugging Face BERT checkpoint; expected an ALBEF/TCL")],
)
def test_wrong_architecture_is_a_clear_error(tmp_path, tiny_model, loader, expected):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(tmp_path / "bert")
    with pytest.raises(CheckpointError, match=expected):
        loader(tiny_model, tmp_path / "bert")


def test_vit_given_as_text_init(tmp_path, tiny_model):
    sd = {k[len("visual_encoder."):]: v for k, v in tiny_model.state_dict().items() if k.startswith("visual_encoder.")}
    torch.save(sd, tmp_path / "vit.pth")
    with pytest.raises(CheckpointError, match="model.text.init: .* looks like a timm/DeiT ViT state dict"):
        load_text_checkpoint(tiny_model, tmp_path / "vit.pth")


def test_shape_mismatch_names_key_and_both_shapes(tmp_path, tiny_cfg):
    sd = albef_state_dict(tiny_cfg, momentum=False)
    sd["itm_head.weight"] = torch.randn(3, tiny_cfg.text.hidden_size)
    torch.save(sd, tmp_path / "bad.pth")
    expected = r"shape mismatch for 'itm_head.weight' .*checkpoint \(3, 32\), model \(2, 32\)"
    with pytest.raises(CheckpointError, match=expected):
        load_model_checkpoint(create_model(tiny_cfg), tmp_path / "bad.pth")


class NotATensor:  # pickled as a class reference: weights_only loading must refuse it
    pass


def test_pickled_code_is_never_executed(tmp_path, tiny_model):
    torch.save({"model": {"w": torch.zeros(1)}, "payload": NotATensor()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="never executes pickled code"):
        read_state_dict(tmp_path / "evil.pth")


def test_unreadable_and_missing_files(tmp_path, tiny_model):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth"):
        read_state_dict(tmp_path / "junk.pth")
    with pytest.raises(CheckpointError, match="model.init: checkpoint not found"):
        load_model_checkpoint(tiny_model, tmp_path / "nope.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no weights file"):
        read_state_dict(tmp_path / "empty")


def test_ddp_prefix_and_nesting_are_unwrapped(tmp_path):
    torch.save({"state_dict": {"module.a.weight": torch.ones(2)}}, tmp_path / "ddp.pth")
    assert list(read_state_dict(tmp_path / "ddp.pth")) == ["a.weight"]


def test_compact_keys():
    keys = [f"blocks.{i}.attn.{p}" for i in range(3) for p in ("weight", "bias")] + ["norm.weight", "head.5.x.w"]
    assert compact_keys(keys) == "blocks.{0-2}.attn.{bias,weight}, head.5.x.w, norm.weight"


def _pretrain_objective(init: str, queue_size: int = 64):
    from softmask.tasks.pretrain import PretrainObjective, continue_from_albef

    cfg = tiny_config(f"model.init={init}", f"itc.queue_size={queue_size}")
    torch.manual_seed(0)
    objective = PretrainObjective(cfg, create_model(cfg.model), {"cls": 1, "sep": 2, "pad": 0, "mask": 3}, 10)
    continue_from_albef(objective, init)
    return objective


def test_continued_pretraining_starts_from_the_checkpoints_momentum_encoders_and_queues(tmp_path, tiny_cfg,
                                                                                       caplog):
    sd = albef_state_dict(tiny_cfg)
    g = torch.Generator().manual_seed(1)
    for key in [k for k in sd if k.split(".")[0].endswith("_m")]:  # a trained momentum model differs
        sd[key] = sd[key] + 0.1 * torch.randn(sd[key].shape, generator=g)
    c = "text_encoder_m.cls.predictions."  # tied in ALBEF's checkpoints, as in the online copy
    sd[c + "decoder.bias"] = sd[c + "bias"]
    sd[c + "decoder.weight"] = sd["text_encoder_m.bert.embeddings.word_embeddings.weight"]
    sd["queue_ptr"] = torch.tensor([24])
    path = tmp_path / "ALBEF_tiny.pth"
    torch.save({"model": sd}, path)
    caplog.set_level(logging.INFO, logger="softmask")
    task = _pretrain_objective(str(path))
    online, momentum = task.model.state_dict(), task.momentum_model.state_dict()
    assert torch.equal(online["visual_encoder.blocks.1.attn.qkv.weight"], sd["visual_encoder.blocks.1.attn.qkv.weight"])
    assert torch.equal(momentum["visual_encoder.blocks.1.attn.qkv.weight"],
                       sd["visual_encoder_m.blocks.1.attn.qkv.weight"])
    b = "text_encoder_m.bert.encoder.layer.3.crossattention.self."
    assert torch.equal(momentum["fusion_encoder.layers.1.cross_attn.kv.weight"],
                       torch.cat([sd[b + "key.weight"], sd[b + "value.weight"]]))
    assert torch.equal(momentum["text_proj.weight"], sd["text_proj_m.weight"])
    assert torch.equal(momentum["mlm_head.bias"], sd["text_encoder_m.cls.predictions.bias"])
    assert torch.equal(momentum["itm_head.weight"], online["itm_head.weight"])  # ALBEF keeps no momentum ITM head
    assert torch.equal(task.image_queue.feats, sd["image_queue"].t())
    assert torch.equal(task.text_queue.feats, sd["text_queue"].t())
    assert int(task.image_queue.ptr) == int(task.text_queue.ptr) == 24 and int(task.image_queue.filled) == 64
    assert "model.init (momentum model): loaded" in caplog.text and "queue_ptr (24) taken" in caplog.text
    # Another queue size: the queues are not taken (and the log says why); the momentum model still is.
    other = _pretrain_objective(str(path), queue_size=32)
    assert "queues: not taken" in caplog.text and int(other.image_queue.ptr) == 0
    assert torch.equal(other.momentum_model.state_dict()["text_proj.weight"], sd["text_proj_m.weight"])


def test_continued_pretraining_reads_the_albef_file_once(tmp_path, tiny_cfg, monkeypatch):
    from softmask.models import loading

    path = tmp_path / "ALBEF_tiny.pth"
    torch.save({"model": albef_state_dict(tiny_cfg)}, path)
    reads = []
    real = loading.read_state_dict
    monkeypatch.setattr(loading, "read_state_dict", lambda p: reads.append(p) or real(p))
    twice = _pretrain_objective(str(path))
    assert len(reads) == 2  # the online weights, then the momentum encoders and queues
    with loading.read_each_file_once():
        once = _pretrain_objective(str(path))
    assert len(reads) == 3 and loading._read_once is None  # one more read, and nothing kept after the block
    for a, b in ((twice.model, once.model), (twice.momentum_model, once.momentum_model)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert torch.equal(twice.image_queue.feats, once.image_queue.feats)


def test_a_checkpoint_without_momentum_encoders_keeps_the_online_copy(tmp_path, tiny_cfg):
    path = tmp_path / "ALBEF_finetuned.pth"
    torch.save({"model": albef_state_dict(tiny_cfg, momentum=False)}, path)
    task = _pretrain_objective(str(path))
    online, momentum = task.model.state_dict(), task.momentum_model.state_dict()
    assert all(torch.equal(online[k], momentum[k]) for k in online)
