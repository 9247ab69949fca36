"""load_model (run folders, checkpoint files, save_pretrained folders), word Grad-CAM and ``softmask gradcam``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from softmask import CheckpointError, create_model
from softmask.cli import main
from softmask.config import config_from_dict, save_config, to_dict
from softmask.data.text import continuation_table, load_tokenizer, special_token_ids, tokenize, vocab_strings
from softmask.data.transforms import EvalTransform
from softmask.eval.word_gradcam import group_words, word_gradcam
from softmask.inference import load_model
from softmask.objectives.softmask import gradcam_maps
from softmask.viz.gradcam import safe_name

from helpers import tiny_model_config

CAPTION = "a giraffe near a skateboard"  # giraffe -> gi ##raf ##fe, skateboard -> skate ##board
WORDS = ["a", "giraffe", "near", "a", "skateboard"]


def real_vocab_config(*overrides: str):
    """The tiny model with the bert-base-uncased vocabulary size and 3 fusion layers."""
    return tiny_model_config("text.vocab_size=30522", "text.max_positions=40", "text.num_layers=5", *overrides)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model(real_vocab_config()).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(max_tokens=40)


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    """The model as (a) a save_pretrained folder and (b) a run folder with one checkpoint."""
    root = tmp_path_factory.mktemp("models")
    pretrained = model.save_pretrained(root / "pretrained")
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    cfg = config_from_dict({"model": to_dict(model.config), "method": "albef", "softmask": {"layer": 1}})
    save_config(cfg, run / "config.yaml")
    task = {"model." + k: v.clone() for k, v in model.state_dict().items()}
    task["momentum_model.temp"] = torch.tensor(0.5)  # the rest of a task state dict is ignored
    torch.save({"task": task, "state": {"step": 1}}, run / "checkpoints" / "step_00000001.pt")
    return {"pretrained": pretrained, "run": run, "checkpoint": run / "checkpoints" / "step_00000001.pt"}


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    pixels[10:30, 5:25] = (200, 30, 30)
    path = tmp_path_factory.mktemp("images") / "scene.png"
    Image.fromarray(pixels).convert("P").save(path)  # a palette image: load_image converts it to RGB
    return path


def assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# ---- load_model --------------------------------------------------------------------------------


def test_load_model_round_trips(model, saved):
    loaded, cfg = load_model(saved["pretrained"])
    assert cfg is None and not loaded.training
    assert_same(model, loaded)
    for key in ("run", "checkpoint"):
        loaded, cfg = load_model(saved[key])
        assert not loaded.training
        assert_same(model, loaded)
        assert cfg.softmask.layer == 1 and cfg.model.init == cfg.model.vision.init == cfg.model.text.init == ""


def test_load_model_run_without_checkpoints_uses_model_folder(model, saved, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text((saved["run"] / "config.yaml").read_text())
    model.save_pretrained(run / "model")
    loaded, cfg = load_model(run)
    assert cfg is not None
    assert_same(model, loaded)


def test_load_model_clear_errors(saved, tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_model(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="not a training run folder"):
        load_model(tmp_path)
    stray = tmp_path / "step_00000001.pt"
    stray.write_bytes(saved["checkpoint"].read_bytes())
    with pytest.raises(CheckpointError, match="checkpoints/ folder"):
        load_model(stray)
    run = tmp_path / "wrong"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text((saved["run"] / "config.yaml").read_text())
    torch.save({"task": {"model.temp": torch.tensor(0.07)}}, run / "checkpoints" / "step_00000002.pt")
    with pytest.raises(CheckpointError, match="missing"):
        load_model(run)


# ---- word Grad-CAM -----------------------------------------------------------------------------


def test_group_words_merges_pieces(tokenizer):
    ids, mask = tokenize(tokenizer, [CAPTION])
    special = special_token_ids(tokenizer)
    words, positions = group_words(ids[0], mask[0], continuation_table(tokenizer.get_vocab()),
                                   (special["cls"], special["sep"], special["pad"]), vocab_strings(tokenizer))
    assert words == WORDS
    assert [len(p) for p in positions] == [1, 3, 1, 1, 2]


@pytest.mark.parametrize("source", ["gradcam", "attention"])
def test_word_gradcam_maps(model, tokenizer, source):
    ids, mask = tokenize(tokenizer, [CAPTION])
    special = special_token_ids(tokenizer)
    pixels = EvalTransform(32)(torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8))
    params_before = [p.grad for p in model.parameters()]
    with torch.no_grad():  # word_gradcam turns gradients on for itself
        result = word_gradcam(model, pixels, ids, mask, layer=0, source=source,
                              special_ids=(special["cls"], special["sep"], special["pad"]),
                              continuation=continuation_table(tokenizer.get_vocab()),
                              vocab=vocab_strings(tokenizer))
    assert result["words"] == WORDS
    g = 32 // 8
    assert result["maps"].shape == (len(WORDS), g, g) and result["sentence_map"].shape == (g, g)
    assert (result["maps"] >= 0).all() and result["maps"].sum() > 0
    assert torch.allclose(result["sentence_map"], result["maps"].mean(0))
    assert 0.0 < result["itm_prob"] < 1.0
    assert all(p is None for p in params_before) and all(p.grad is None for p in model.parameters())
    assert not model.training
    if source == "gradcam":  # the same as Grad-CAM through an ordinary backward pass ("giraffe": 3 pieces)
        fused, attn = model.fuse(model.encode_text(ids, mask), mask, model.encode_image(pixels), attention_layer=0)
        attn.retain_grad()
        model.itm_logits(fused)[0, 1].backward()
        expected = gradcam_maps(attn, attn.grad)[0, 2:5].mean(0).view(g, g)
        model.zero_grad(set_to_none=True)
        assert torch.allclose(result["maps"][1], expected.detach(), atol=1e-6)


def test_safe_names():
    assert safe_name("dog") == "dog" and safe_name("&") == "word" and safe_name("a&b") == "a_b"


# ---- the command line --------------------------------------------------------------------------


def test_cli_gradcam_writes_word_figures(saved, image_file, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["-q", "gradcam", "--checkpoint", str(saved["run"]), "--image", str(image_file),
            "--text", "A giraffe, near a skateboard!", "--out", str(out)]
    assert main(argv) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["01_a.png", "02_giraffe.png", "03_near.png", "04_a.png", "05_skateboard.png",
                     "grid.png", "sentence.png"]
    for name in names:
        with Image.open(out / name) as img:
            assert img.format == "PNG" and img.size[0] > 32
    printed = capsys.readouterr().out
    assert "ITM match probability" in printed and "fusion layer 1" in printed and "grid.png" in printed


def test_cli_gradcam_attention_and_compare(saved, image_file, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["-q", "gradcam", "--checkpoint", str(saved["checkpoint"]), "--image", str(image_file),
            "--text", CAPTION, "--out", str(out), "--source", "attention", "--compare", str(saved["pretrained"])]
    assert main(argv) == 0
    assert (out / "compare.png").is_file() and (out / "grid.png").is_file() and (out / "05_skateboard.png").is_file()
    printed = capsys.readouterr().out
    assert printed.count("ITM match probability") == 2
    assert str(saved["pretrained"]) in printed and "attention" in printed
    # save_pretrained folders have no run config: the default layer is the last but one of 3 = 1
    assert "fusion layer 1" in printed


def test_cli_gradcam_errors_are_one_line(saved, image_file, tmp_path, capsys):
    base = ["gradcam", "--text", CAPTION, "--out", str(tmp_path / "out")]
    assert main(base + ["--checkpoint", str(saved["run"]), "--image", str(tmp_path / "missing.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("softmask: error: image not found") and "missing.png" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert main(base + ["--checkpoint", str(tmp_path / "norun"), "--image", str(image_file)]) == 2
    err = capsys.readouterr().err
    assert "checkpoint not found" in err and err.count("\n") == 1
    assert main(base + ["--checkpoint", str(saved["run"]), "--image", str(image_file), "--layer", "7"]) == 2
    assert "--layer must be a fusion-layer index in [0, 3)" in capsys.readouterr().err
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    assert main(base + ["--checkpoint", str(saved["run"]), "--image", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "broken.png" in err and err.count("\n") == 1
