"""NLVR2: the two-image model expanded from a single-image one, the pair augmentation, the label
checks, and both stages (text assignment, then fine-tuning from it) plus evaluation through the CLI."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from softmask.cli import main
from softmask.config import AugmentConfig, load_config
from softmask.data.annotations import AnnotationError
from softmask.data.transforms import TrainAugment
from softmask.models.loading import CheckpointError
from softmask.models.nlvr2 import TwoImageModel, two_image_state
from softmask.models.vit import resize_pos_embed
from softmask.models.vlp import create_model
from softmask.objectives.distill import momentum_copy
from softmask.tasks import nlvr2
from softmask.tasks.classify import transform_images

from helpers import text_batch, tiny_model_config

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "finetune" / "nlvr2_tiny.yaml")
DROPPED = {"vision_proj", "text_proj", "itm_head", "mlm_head", "temp"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for this module: on a CPU shared with other processes, two spinning OpenMP
    threads made these tiny steps 10x slower. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(task_world) -> Path:
    return task_world


@pytest.fixture(scope="module")
def single_folder(tmp_path_factory) -> Path:
    """A single-image model of the tiny config's architecture, saved at 32 px (4x4 patches); the
    tiny NLVR2 config runs at 64 px, so loading it interpolates the position embeddings."""
    cfg = load_config(CONFIG, ["model.vision.image_size=32"])
    torch.manual_seed(1)
    return create_model(cfg).save_pretrained(tmp_path_factory.mktemp("single") / "model")


def _single_and_two():
    torch.manual_seed(0)
    single = create_model(tiny_model_config()).eval()
    return single, TwoImageModel.from_single(single).eval()


def _source_key(key: str) -> str:
    """The single-image key a two-image key was copied from."""
    return re.sub(r"^(fusion_encoder\.layers\.\d+)\.(first|second)\.", r"\1.", key)


def _inputs(cfg, b: int = 3, t: int = 9, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(b, t, cfg.text.hidden_size, generator=g)
    _, mask = text_batch(b=b, t=t)
    n = 1 + (cfg.vision.image_size // cfg.vision.patch_size) ** 2
    image1, image2 = torch.randn(2, b, n, cfg.vision.width, generator=g)
    return text, mask, image1, image2


# --------------------------------------------------------------------------------------------------
# The two-image model
# --------------------------------------------------------------------------------------------------


def test_expansion_copies_every_weight_and_shares_kv():
    single, two = _single_and_two()
    source, target = single.state_dict(), two.state_dict()
    for key, tensor in target.items():
        assert torch.equal(tensor, source[_source_key(key)]), key
    copied = {_source_key(k) for k in target}
    assert {k.split(".")[0] for k in set(source) - copied} == DROPPED
    assert {k.split(".")[0] for k in two_image_state(source)[1]} == DROPPED
    for layer in two.fusion_encoder.layers:
        assert layer.second.cross_attn.kv is layer.first.cross_attn.kv
        assert layer.second.cross_attn.q.weight.data_ptr() != layer.first.cross_attn.q.weight.data_ptr()
        assert layer.second.ffn.fc1.weight.data_ptr() != layer.first.ffn.fc1.weight.data_ptr()
    assert not [k for k in target if ".second.cross_attn.kv." in k]  # the shared K/V is saved once
    assert len(two.fusion_encoder.layers) == single.config.text.num_fusion_layers


def test_two_image_fusion_runs_each_single_layer_on_image1_then_image2():
    single, two = _single_and_two()
    text, mask, image1, image2 = _inputs(single.config)

    def composed(first, second):
        x = text
        for layer in single.fusion_encoder.layers:
            x, _ = layer(x, mask, first)
            x, _ = layer(x, mask, second)
        return x

    with torch.no_grad():
        fused = two.fuse(text, mask, image1, image2)
        assert torch.allclose(fused, composed(image1, image2), atol=1e-6)
        same = two.fuse(text, mask, image1, image1)  # identical images: each layer runs twice on it
        assert torch.allclose(same, composed(image1, image1), atol=1e-6)
        assert (same - single.fuse(text, mask, image1)).abs().max() > 1e-3  # not the single-image output
        # Order matters (small at initialisation: random cross-attention weights have std 0.02).
        assert (fused - two.fuse(text, mask, image2, image1)).abs().max() > 1e-5


def test_shared_kv_survives_momentum_copy_and_every_parameter_gets_a_gradient():
    _, two = _single_and_two()
    mm = momentum_copy(two)
    for online, copy in zip(two.fusion_encoder.layers, mm.fusion_encoder.layers, strict=True):
        assert copy.second.cross_attn.kv is copy.first.cross_attn.kv
        assert copy.first.cross_attn.kv is not online.first.cross_attn.kv
    # The shared K/V feeds the second block: changing it changes that block's output.
    layer = two.fusion_encoder.layers[0]
    text, mask, image1, image2 = _inputs(two.config)
    with torch.no_grad():
        before = layer.second(text, mask, image2)[0]
        layer.first.cross_attn.kv.weight.mul_(2.0)
        assert (layer.second(text, mask, image2)[0] - before).abs().max() > 1e-4
    # No unused parameter (DDP rejects them): a projection of the fused [CLS] reaches every one.
    size = two.config.vision.image_size
    ids, mask = text_batch(b=2)
    fused = two(torch.randn(2, 2, 3, size, size), ids, mask)[:, 0]
    (fused * torch.randn_like(fused)).sum().backward()
    assert [n for n, p in two.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []


def test_forward_takes_pairs_and_rejects_single_images():
    _, two = _single_and_two()
    cfg = two.config
    size = cfg.vision.image_size
    ids, mask = text_batch(b=2)
    pixels = torch.randn(2, 2, 3, size, size)
    with torch.no_grad():
        fused = two(pixels, ids, mask)
        images = two.encode_image(pixels.flatten(0, 1)).unflatten(0, (2, 2))
        direct = two.fuse(two.encode_text(ids, mask), mask, images[:, 0], images[:, 1])
    assert fused.shape == (2, ids.shape[1], cfg.text.hidden_size)
    assert torch.allclose(fused, direct, atol=1e-6)
    with pytest.raises(ValueError, match="pairs"):
        two(pixels[:, 0], ids, mask)


def test_pair_augmentation_draws_once_per_pair():
    torch.manual_seed(0)
    augment = TrainAugment(32, AugmentConfig(crop_scale=[0.2, 1.0]))
    image = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)
    pairs = image.expand(4, 2, 3, 40, 40).contiguous()  # every pair: the same image twice
    out = transform_images(augment, pairs)
    assert out.shape == (4, 2, 3, 32, 32) and out.dtype == torch.float32
    assert torch.equal(out[:, 0], out[:, 1])  # one draw per pair, both images
    assert not torch.equal(out[0, 0], out[1, 0])  # another draw for the next pair


# --------------------------------------------------------------------------------------------------
# Annotations
# --------------------------------------------------------------------------------------------------


def _write(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records))
    return path


def test_labels_map_to_classes():
    assert nlvr2._finetune_label({"label": "True"}) == {"label": 1}
    assert nlvr2._finetune_label({"label": "False"}) == {"label": 0}
    assert nlvr2._finetune_label({"label": True}) == {"label": 1}
    assert nlvr2._ta_label({"label": 2}) == {"label": 2}
    assert nlvr2.num_classes("finetune") == 2 and nlvr2.num_classes("text_assignment") == 3


def test_malformed_records_name_file_and_record(world, tmp_path, capsys):
    notes = world / "annotations"
    records = json.loads((notes / "nlvr_train.json").read_text())[:3]
    records[1] = dict(records[1], label="maybe")
    bad = _write(tmp_path / "nlvr_bad.json", records)
    cfg = load_config(CONFIG, ["finetune.task=nlvr2", f"world={world}", f"finetune.train=[{bad}]"])
    with pytest.raises(AnnotationError, match=r"nlvr_bad\.json: record 1: 'label' must be \"True\" or \"False\""):
        nlvr2.build_train_data(cfg, 0, 1)

    three = dict(records[0], images=records[0]["images"] * 2)
    cfg.finetune.train = [str(_write(tmp_path / "nlvr_three.json", [records[0], records[2], three]))]
    with pytest.raises(AnnotationError, match=r"nlvr_three\.json: record 2: 'images' must list exactly 2"):
        nlvr2.build_train_data(cfg, 0, 1)

    ta = json.loads((notes / "nlvr_ta.json").read_text())[:2]
    ta[0] = dict(ta[0], label=3)
    bad_ta = _write(tmp_path / "ta_bad.json", ta)
    cfg = load_config(CONFIG, ["finetune.task=nlvr2", "finetune.stage=text_assignment", f"finetune.train=[{bad_ta}]"])
    with pytest.raises(AnnotationError, match=r"ta_bad\.json: record 0: 'label' must be 0 \(image 1\)"):
        nlvr2.build_train_data(cfg, 0, 1)

    rc = main(["finetune", "nlvr2", f"world={world}", f"finetune.train=[{bad}]", f"output_dir={tmp_path / 'run'}",
               "--config", CONFIG])
    assert rc == 2 and "nlvr_bad.json: record 1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # failed before any training


# --------------------------------------------------------------------------------------------------
# Loading: a single-image folder, an NLVR2 run
# --------------------------------------------------------------------------------------------------


def test_single_image_folder_as_init_is_expanded(single_folder, caplog):
    saved = load_file(str(single_folder / "model.safetensors"))
    cfg = load_config(CONFIG, ["finetune.task=nlvr2", f"model.init={single_folder}"])
    with caplog.at_level(logging.INFO, logger="softmask"):
        model = nlvr2.build_model(cfg)
    assert "position embeddings resized from a 4x4 to a 8x8 patch grid" in caplog.text
    assert model.num_classes == 2 and model.cls_head[2].out_features == 2
    state = model.state_dict()
    for key, tensor in state.items():
        if key.startswith("backbone.") and not key.endswith("pos_embed"):
            assert torch.equal(tensor, saved[_source_key(key[len("backbone."):])]), key
    expected = resize_pos_embed(saved["visual_encoder.pos_embed"], 8)
    assert torch.equal(state["backbone.visual_encoder.pos_embed"], expected)
    ta_cfg = load_config(CONFIG, ["finetune.task=nlvr2", "finetune.stage=text_assignment",
                                  f"model.init={single_folder}"])
    assert nlvr2.build_model(ta_cfg).cls_head[2].out_features == 3


def _metrics(path: Path) -> dict:
    return json.loads(path.read_text())


# In the CLI calls the overrides come right after the task: Python 3.11's argparse does not take
# positionals after an option as overrides ("unrecognized arguments").
@pytest.mark.slow
def test_text_assignment_then_finetune_then_evaluate(world, single_folder, tmp_path, caplog, capsys):
    ta, ft = tmp_path / "ta", tmp_path / "ft"
    # Stage 1: text assignment from the single-image folder (3-way, nlvr_ta.json).
    assert main(["finetune", "nlvr2", f"world={world}", f"output_dir={ta}", "finetune.stage=text_assignment",
                 f"model.init={single_folder}", "train.max_steps=2", "--config", CONFIG]) == 0
    ta_weights = load_file(str(ta / "model" / "model.safetensors"))
    assert ta_weights["cls_head.2.weight"].shape[0] == 3
    assert "task: nlvr2" in (ta / "model" / "config.yaml").read_text()
    assert not list(ta.glob("metrics_*.json"))  # the world's text-assignment set has no val/test

    # The fine-tuning model built from the TA run: every backbone tensor as saved, a new 2-way head.
    cfg = load_config(CONFIG, ["finetune.task=nlvr2", f"model.init={ta}"])
    with caplog.at_level(logging.INFO, logger="softmask"):
        model = nlvr2.build_model(cfg)
    assert "dropped the saved 3-way head" in caplog.text
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in ta_weights.items() if k.startswith("backbone."))
    assert set(state) == set(ta_weights) and state["cls_head.2.weight"].shape[0] == 2
    # At another image size (ALBEF: text assignment at 256 px, fine-tuning at 384) the position
    # embeddings are interpolated; the same stage keeps the saved head.
    cfg = load_config(CONFIG, ["finetune.task=nlvr2", "finetune.stage=text_assignment", "model.vision.image_size=32",
                             f"model.init={ta / 'model'}"])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="softmask"):
        small = nlvr2.build_model(cfg).state_dict()
    assert "resized from a 8x8 to a 4x4" in caplog.text and "dropped" not in caplog.text
    pos = "backbone.visual_encoder.pos_embed"
    assert torch.equal(small[pos], resize_pos_embed(ta_weights[pos], 4))
    assert torch.equal(small["cls_head.2.weight"], ta_weights["cls_head.2.weight"])

    # Stage 2: fine-tuning from the TA run's model folder, then val/test evaluation.
    assert main(["finetune", "nlvr2", f"world={world}", f"output_dir={ft}", f"model.init={ta / 'model'}",
                 "train.max_steps=2", "--config", CONFIG]) == 0
    test_metrics = _metrics(ft / "metrics_test.json")
    assert 0.0 <= test_metrics["acc"] <= 100.0 and test_metrics["count"] == 12 and test_metrics["skipped"] == 0
    assert test_metrics["count_true"] + test_metrics["count_false"] == 12
    predictions = json.loads((ft / "nlvr2_predictions_test.json").read_text())
    assert len(predictions) == 12 and {p["prediction"] for p in predictions} <= {"true", "false"}
    correct = sum(p["prediction"] == p["label"] for p in predictions)
    assert test_metrics["acc"] == pytest.approx(100.0 * correct / 12)

    # Evaluation alone reproduces the run's test accuracy.
    out = tmp_path / "eval.json"
    assert main(["evaluate", "nlvr2", "--checkpoint", str(ft), "--config", CONFIG, "--world", str(world),
                 "--split", "test", "--json", str(out), "--out", str(tmp_path / "eval")]) == 0
    assert (tmp_path / "eval" / "metrics_test.json").is_file()
    assert _metrics(out)["test"]["acc"] == pytest.approx(test_metrics["acc"])  # {split: metrics}
    # A fine-tuned (2-way) model does not pass for a text-assignment one.
    capsys.readouterr()
    assert main(["evaluate", "nlvr2", "finetune.stage=text_assignment", "--checkpoint", str(ft), "--config", CONFIG,
                 "--world", str(world), "--out", str(tmp_path / "eval_ta")]) == 2
    assert "cls_head.2" in capsys.readouterr().err


def test_init_of_another_task_is_refused(tmp_path, single_folder):
    folder = tmp_path / "ve_model"
    folder.mkdir()
    (folder / "config.yaml").write_text("task: ve\nmodel: {}\n")
    cfg = load_config(CONFIG, ["finetune.task=nlvr2", f"model.init={folder}"])
    with pytest.raises(CheckpointError, match="fine-tuned on 've'"):
        nlvr2.build_model(cfg)


def test_shipped_configs_follow_the_recipe():
    root = Path(CONFIG).parent
    ta = load_config(root / "nlvr2_ta.yaml", ["finetune.task=nlvr2"])
    ft = load_config(root / "nlvr2.yaml", ["finetune.task=nlvr2"])
    recipe = [(c.finetune.stage, c.train.epochs, c.train.batch_size * 8, c.train.lr_peak, c.model.vision.image_size)
              for c in (ta, ft)]
    assert recipe == [("text_assignment", 1, 256, 2e-5, 256), ("finetune", 10, 128, 2e-5, 384)]
    assert ta.distill.alpha == 0.0 and ft.distill.alpha > 0 and ft.model.init
    four_m = load_config(root.parent / "pretrain" / "4m.yaml")
    assert nlvr2._architecture(ta.model) == nlvr2._architecture(ft.model) == nlvr2._architecture(four_m.model)
    tiny = load_config(CONFIG, ["finetune.task=nlvr2", "world=/w", "finetune.stage=text_assignment"])
    assert tiny.finetune.train == ["/w/annotations/nlvr_ta.json"] and tiny.finetune.val == []


def test_an_albef_nlvr2_checkpoint_loads_its_paired_layers_and_head(task_world, tmp_path):
    """ALBEF's NLVR2 layout: its BERT holds fusion layers in pairs (fusion_layer + 2i for image 1, + 2i + 1
    for image 2, the second's cross-attention key/value tied to the first's) and a D-wide cls_head."""
    import torch.nn.functional as F

    from softmask.tasks.finetune import load_task_model

    from helpers import albef_state_dict

    model_cfg = tiny_model_config()
    fusion, layers = model_cfg.text.fusion_layer, model_cfg.text.num_layers
    single = albef_state_dict(model_cfg, momentum=False)
    sd = {k: v for k, v in single.items() if k.startswith("visual_encoder.")}
    g = torch.Generator().manual_seed(5)
    for key, value in single.items():
        m = re.fullmatch(r"text_encoder\.bert\.(encoder\.layer\.(\d+)\.(.+))", key)
        if m is None:
            if key.startswith("text_encoder.bert.embeddings."):
                sd[key.replace("text_encoder.bert.", "text_encoder.")] = value
            continue
        j, rest = int(m[2]), m[3]
        if j < fusion:
            sd[f"text_encoder.encoder.layer.{j}.{rest}"] = value
            continue
        first, second = fusion + 2 * (j - fusion), fusion + 2 * (j - fusion) + 1
        sd[f"text_encoder.encoder.layer.{first}.{rest}"] = value
        tied = rest.startswith(("crossattention.self.key.", "crossattention.self.value."))
        sd[f"text_encoder.encoder.layer.{second}.{rest}"] = value if tied else value + torch.randn(
            value.shape, generator=g)
    d = model_cfg.text.hidden_size
    head = {"cls_head.0.weight": torch.randn(d, d, generator=g), "cls_head.0.bias": torch.randn(d, generator=g),
            "cls_head.2.weight": torch.randn(2, d, generator=g), "cls_head.2.bias": torch.randn(2, generator=g)}
    sd.update(head)
    path = tmp_path / "ALBEF_nlvr.pth"
    torch.save({"model": sd}, path)
    cfg = load_config(CONFIG, [f"world={task_world}", "finetune.task=nlvr2"])
    cfg.model = model_cfg
    model = load_task_model(cfg, path).eval()
    blocks = model.backbone.fusion_encoder.layers
    t = "text_encoder.encoder.layer."
    assert torch.equal(blocks[1].first.ffn.fc2.weight, sd[f"{t}{fusion + 2}.output.dense.weight"])
    assert torch.equal(blocks[1].second.ffn.fc2.weight, sd[f"{t}{fusion + 3}.output.dense.weight"])
    assert torch.equal(blocks[0].second.cross_attn.q.weight, sd[f"{t}{fusion + 1}.crossattention.self.query.weight"])
    kv = torch.cat([sd[f"{t}{fusion + 2}.crossattention.self.{n}.weight"] for n in ("key", "value")])
    assert torch.equal(blocks[1].first.cross_attn.kv.weight, kv) and blocks[1].second.cross_attn.kv is \
        blocks[1].first.cross_attn.kv
    assert len(blocks) == layers - fusion
    pixels, (ids, mask) = torch.randn(2, 2, 3, 32, 32), text_batch(b=2)
    with torch.no_grad():
        cls = model.backbone(pixels, ids, mask)[:, 0]
        expected = F.relu(cls @ head["cls_head.0.weight"].T + head["cls_head.0.bias"]) @ head["cls_head.2.weight"].T \
            + head["cls_head.2.bias"]
        assert torch.allclose(model(pixels, ids, mask), expected, atol=1e-5)
