"""`softmask explore` without a browser: the model work (session) and the HTTP routes (in-process)."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from softmask.config import ConfigError
from softmask.data.text import open_tokenizer, pre_caption, save_vocab
from softmask.eval.retrieval import evaluate_retrieval
from softmask.explore.session import (
    ExploreError,
    Explorer,
    load_models,
    open_gallery,
    rank_gallery,
)
from softmask.models.vlp import create_model
from softmask.viz.gradcam import model_view

from helpers import tiny_model_config

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "the", "is", "of", "left", "right", "above", "below",
         "red", "green", "blue", "yellow", "purple", "orange", "white", "gray", "square", "circle", "triangle",
         "star", "small", "large", "and", "##s", "##er"]


def save_tiny_model(folder, seed: int, vocab) -> str:
    torch.manual_seed(seed)
    model = create_model(tiny_model_config(f"text.vocab_size={len(WORDS)}"))
    model.save_pretrained(folder)
    save_vocab(vocab, folder)
    return str(folder)


@pytest.fixture(scope="module")
def explore_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("explore_models")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(WORDS) + "\n")
    return [save_tiny_model(root / "a", 0, vocab), save_tiny_model(root / "b", 1, vocab)]


@pytest.fixture(scope="module")
def explorer(explore_models, task_world):
    return Explorer(load_models(explore_models), open_gallery(task_world))


def decoded(uri: str) -> Image.Image:
    assert uri.startswith("data:image/jpeg;base64,")
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


def test_gallery_of_a_world_is_its_test_split_and_of_a_folder_its_images(task_world, tmp_path):
    gallery = open_gallery(task_world)
    test = json.loads((task_world / "annotations" / "retrieval_test.json").read_text())
    assert gallery.world and gallery.names == [r["image"] for r in test]
    assert gallery.path(gallery.names[0]).is_file()
    with pytest.raises(ExploreError, match="no image '../secret.png' in the gallery"):
        gallery.path("../secret.png")  # only listed names are served
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (20, 10)).save(tmp_path / "sub" / "b.jpg")
    Image.new("RGB", (20, 10)).save(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("not an image")
    plain = open_gallery(tmp_path)
    assert not plain.world and plain.names == ["a.png", "sub/b.jpg"]
    with pytest.raises(ConfigError, match="no such folder"):
        open_gallery(tmp_path / "missing")
    with pytest.raises(ConfigError, match="a.png: is a file; give a folder"):
        open_gallery(tmp_path / "a.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no .png/.jpg/.jpeg/.webp file"):
        open_gallery(tmp_path / "empty")
    assert open_gallery(None).names == []


def test_analyse_gives_each_model_scores_and_one_overlay_per_word(explorer):
    name = explorer.gallery.names[0]
    out = explorer.analyse(name, "A red square, left of the blue circles!")
    assert out["caption"] == "a red square left of the blue circles"
    assert len(out["results"]) == 2
    words = out["results"][0]["words"]
    assert words == ["a", "red", "square", "left", "of", "the", "blue", "circles"]  # circle + ##s: one word
    for result in out["results"]:
        assert result["words"] == words and len(result["overlays"]) == len(words)
        assert 0.0 <= result["itm_prob"] <= 1.0 and -1.0 <= result["itc_sim"] <= 1.0
        assert result["layer"] == 0  # default: the third fusion layer, here (2 fusion layers) the last but one
        overlay = np.asarray(decoded(result["overlays"][0]))
        assert overlay.shape == (224, 224, 3) and overlay.std() > 0
    assert out["results"][0]["itm_prob"] != out["results"][1]["itm_prob"]  # two different models
    assert decoded(out["image"]).size == (224, 224)


def test_analyse_matches_the_models_own_forward(explorer):
    """The page's numbers are the model's: ITM softmax and the cosine of the ITC features."""
    name = explorer.gallery.names[3]
    result = explorer.analyse(name, "the green triangle", layer=0)["results"][0]
    entry = explorer.models[0]
    pixels, _ = model_view(explorer.image(name), entry.image_size)
    ids, mask = entry.tokenizer.encode(["the green triangle"])
    model = entry.model
    with torch.no_grad():
        image_embeds = model.encode_image(pixels)
        text_embeds = model.encode_text(ids, mask)
        prob = model.itm_logits(model.fuse(text_embeds, mask, image_embeds), mask).softmax(-1)[0, 1]
        cosine = (model.image_feat(image_embeds) * model.text_feat(text_embeds, mask)).sum()
    assert result["itm_prob"] == pytest.approx(float(prob), abs=1e-5)
    assert result["itc_sim"] == pytest.approx(float(cosine), abs=1e-5)


def test_the_layer_changes_the_maps_and_a_bad_request_is_a_message(explorer):
    name = explorer.gallery.names[1]
    zero = explorer.analyse(name, "a red square", layer=0)["results"][0]
    one = explorer.analyse(name, "a red square", layer=1)["results"][0]
    assert zero["layer"] == 0 and one["layer"] == 1
    assert zero["itm_prob"] == pytest.approx(one["itm_prob"], abs=1e-6)  # same pair, same score
    assert zero["overlays"][1] != one["overlays"][1]
    with pytest.raises(ExploreError, match=r"layer must be a fusion layer in \[0, 2\), got 5"):
        explorer.analyse(name, "a red square", layer=5)
    with pytest.raises(ExploreError, match="nothing is left of the caption"):
        explorer.analyse(name, "?!...")
    with pytest.raises(ExploreError, match="no image 'nope.png'"):
        explorer.analyse("nope.png", "a red square")
    with pytest.raises(ExploreError, match="map source must be one of"):
        explorer.analyse(name, "a red square", source="magic")


def test_uploads_of_any_size_are_used_and_bad_files_get_a_message(explorer):
    buffer = io.BytesIO()
    Image.new("RGB", (300, 77), (200, 30, 30)).save(buffer, format="JPEG")
    image_id = explorer.add_upload(buffer.getvalue(), "wide.jpg")
    assert image_id.startswith("upload:")
    out = explorer.analyse(image_id, "a red square")
    assert len(out["results"][0]["overlays"]) == 3
    with pytest.raises(ExploreError, match=r"broken\.png: .*upload a PNG or JPEG image"):
        explorer.add_upload(b"\x89PNG\r\n\x1a\n this is not really a png", "broken.png")
    with pytest.raises(ExploreError, match="empty.png: the file is empty"):
        explorer.add_upload(b"", "empty.png")
    with pytest.raises(ExploreError, match="no longer kept"):
        explorer.image("upload:0000")


def test_retrieval_ranks_the_gallery_as_the_world_evaluation_does(explorer):
    """Top 5 of the page = the caption's row of evaluate_retrieval (ITC top-16 re-ranked by ITM)."""
    caption = "a blue circle above a red square"
    out = explorer.retrieve(caption)
    assert [r["label"] for r in out["results"]] == [m.label for m in explorer.models]
    for entry, result in zip(explorer.models, out["results"], strict=True):
        names = explorer.gallery.names
        pixels = torch.cat([model_view(explorer.image(n), entry.image_size)[0] for n in names])
        ids, mask = entry.tokenizer.encode([pre_caption(caption, 64)])
        n = len(names)  # the caption once per image, so that every image has one (recall needs it)
        reference = evaluate_retrieval(entry.model, pixels, ids.expand(n, -1), mask.expand(n, -1), np.arange(n), k=16)
        expected = np.argsort(-reference.t2i[0], kind="stable")[:5]
        assert [hit["image"] for hit in result["top"]] == [names[i] for i in expected]
        assert all(0.0 <= hit["itm_prob"] <= 1.0 for hit in result["top"])
        logits = [hit["itm_logit"] for hit in result["top"]]
        assert logits == sorted(logits, reverse=True)  # ranked by the match logit, as ALBEF ranks
        ranked = rank_gallery(entry.model, entry.gallery_features, lambda rows, p=pixels: p[rows], ids, mask, 16)
        assert sorted(i for i, _, _, _ in ranked) == list(range(n))  # a gallery smaller than 16: all of it, once


def test_routes_answer_json_and_user_errors_are_400(explorer):
    from fastapi.testclient import TestClient

    from softmask.explore.app import create_app

    client = TestClient(create_app(explorer))
    page = client.get("/")
    assert page.status_code == 200 and 'id="caption"' in page.text
    info = client.get("/api/info").json()
    assert [m["fusion_layers"] for m in info["models"]] == [2, 2] and info["world"] is True
    assert info["images"] == explorer.gallery.names
    thumb = client.get("/api/thumbnail", params={"name": info["images"][0]})
    assert thumb.status_code == 200 and Image.open(io.BytesIO(thumb.content)).size == (32, 32)
    assert client.get("/api/thumbnail", params={"name": "/etc/passwd"}).status_code == 404
    out = client.post("/api/analyse", json={"image": info["images"][0], "caption": "a red square", "layer": "default"})
    assert out.status_code == 200 and len(out.json()["results"][0]["overlays"]) == 3
    assert out.json()["elapsed_ms"] > 0
    bad = client.post("/api/analyse", json={"image": info["images"][0], "caption": "a red square", "layer": "x"})
    assert bad.status_code == 400 and bad.json() == {"error": "the layer must be a whole number, got 'x'"}
    upload = client.post("/api/upload", files={"file": ("junk.jpg", b"GIF89a not a jpeg", "image/jpeg")})
    assert upload.status_code == 400 and "junk.jpg" in upload.json()["error"]
    good = io.BytesIO()
    Image.new("RGB", (40, 40), (0, 0, 200)).save(good, format="PNG")
    upload = client.post("/api/upload", files={"file": ("blue.png", good.getvalue(), "image/png")})
    assert upload.status_code == 200 and upload.json()["image_id"].startswith("upload:")
    top = client.post("/api/retrieve", json={"caption": "a blue square"}).json()
    assert [len(r["top"]) for r in top["results"]] == [5, 5]


def test_a_model_whose_tokenizer_does_not_fit_is_refused_before_serving(tmp_path):
    torch.manual_seed(0)
    create_model(tiny_model_config()).save_pretrained(tmp_path / "m")  # 120 embeddings, no vocab.txt saved
    with pytest.raises(ConfigError, match=r"m: the model's text.vocab_size is 120"):
        load_models([str(tmp_path / "m")])
    assert open_tokenizer("").size == 30522  # the default vocabulary it would have been read with


def test_the_command_checks_its_arguments_before_serving(tmp_path, capsys):
    from softmask.cli import main

    assert main(["-q", "explore", "--checkpoint", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["-q", "explore", "--checkpoint", str(tmp_path), "--images", str(tmp_path / "gone")]) == 2
    assert capsys.readouterr().err.strip() == f"softmask: error: --images {tmp_path / 'gone'}: no such folder"


def test_without_the_explore_extra_the_command_says_what_to_install(monkeypatch):
    import builtins

    from softmask.explore import need_web_libraries

    real_import = builtins.__import__

    def no_uvicorn(name, *args, **kwargs):
        if name == "uvicorn":
            raise ImportError("No module named 'uvicorn'", name="uvicorn")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_uvicorn)
    with pytest.raises(ConfigError, match=r"needs the 'explore' extra \(uvicorn is not installed\): "
                                          r"pip install 'softmask\[explore\]'"):
        need_web_libraries()
