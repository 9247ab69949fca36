"""Caption cleaning, special tokens, annotation validation, and image decoding of every Pillow mode."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from softmask.config import ConfigError
from softmask.data.annotations import AnnotationError, Record, load_annotations
from softmask.data.images import BadSample, decode_image, load_image, to_tensor
from softmask.data.text import load_tokenizer, pre_caption, special_token_ids

# --------------------------------------------------------------------------------------------------
# Captions and tokens
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "max_words", "expected"),
    [
        ("A Man, riding a Horse!", 30, "a man riding a horse"),
        ("black-and-white/photo of a dog.", 30, "black and white photo of a dog"),
        ("<person> throws a frisbee", 30, "person throws a frisbee"),
        ('He said: "hi" (twice) *#~; ok?', 30, "he said hi twice ok"),
        ("it's  a \n\t  cat  ", 30, "its a cat"),
        ("one two three four five", 3, "one two three"),
        ("?!...  ,;:", 30, ""),
        ("", 30, ""),
    ],
)
def test_pre_caption(raw, max_words, expected):
    assert pre_caption(raw, max_words) == expected


def test_special_token_ids_are_the_bert_base_uncased_ids():
    ids = special_token_ids(load_tokenizer())
    assert ids == {"cls": 101, "sep": 102, "pad": 0, "mask": 103, "unk": 100}


# --------------------------------------------------------------------------------------------------
# Annotations
# --------------------------------------------------------------------------------------------------


def write_json(path, data) -> str:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def test_load_annotations_joins_paths_and_keeps_records(tmp_path):
    a = write_json(tmp_path / "a.json", [{"image": "x/1.jpg", "caption": "one"},
                                         {"image": "/abs/2.png", "caption": ["two", "deux"], "image_id": 7}])
    b = write_json(tmp_path / "b.json", [{"image": "3.jpg", "caption": "three"}])
    records = load_annotations([a, b], "/data/root")
    assert records == [
        Record(image="/data/root/x/1.jpg", captions=["one"], source=a, index=0),
        Record(image="/abs/2.png", captions=["two", "deux"], source=a, index=1),
        Record(image="/data/root/3.jpg", captions=["three"], source=b, index=0),
    ]
    assert load_annotations([a], "")[0].image == "x/1.jpg"  # no root: relative to the working directory


GOOD = {"image": "ok.jpg", "caption": "fine"}


@pytest.mark.parametrize(
    ("content", "index", "problem"),
    [
        ('"a string"', None, "must be a JSON list of records, got str"),
        ({"image": "a.jpg", "caption": "c"}, None, "must be a JSON list of records, got object"),
        ([GOOD, "oops"], 1, "must be an object with 'image' and 'caption', got str"),
        ([GOOD, {"caption": "c"}], 1, "missing 'image'"),
        ([{"image": "a.jpg"}], 0, "missing 'caption'"),
        ([GOOD, GOOD, {"image": 12, "caption": "c"}], 2, "'image' must be a non-empty string, got int"),
        ([{"image": "  ", "caption": "c"}], 0, "'image' must be a non-empty string, got an empty string"),
        ([GOOD] * 17 + [{"image": "a.jpg", "caption": 5}], 17,
         "'caption' must be a string or a list of strings, got int"),
        ([{"image": "a.jpg", "caption": []}], 0, "'caption' must be a string or a non-empty list of strings"),
        ([{"image": "a.jpg", "caption": ["ok", None]}], 0,
         "'caption' must be a string or a list of strings, got null at caption 1"),
        ([{"image": "a.jpg", "caption": {"text": "c"}}], 0, "got object"),
    ],
)
def test_annotation_errors_name_file_record_and_problem(tmp_path, content, index, problem):
    path = write_json(tmp_path / "pretrain.json", content)
    with pytest.raises(AnnotationError) as info:
        load_annotations([path], str(tmp_path))
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    if index is not None:
        assert f"{path}: record {index}: " in message
    assert problem in message
    assert isinstance(info.value, ConfigError)


def test_annotation_error_example_message(tmp_path):
    path = write_json(tmp_path / "pretrain.json", [GOOD] * 17 + [{"image": "a.jpg", "caption": 3}])
    with pytest.raises(AnnotationError, match=r"pretrain\.json: record 17: 'caption' must be a string or a list "
                                              r"of strings, got int$"):
        load_annotations([path], "")


def test_annotation_missing_file_and_invalid_json(tmp_path):
    with pytest.raises(AnnotationError, match="nope.json: annotation file not found"):
        load_annotations([str(tmp_path / "nope.json")], "")
    bad = write_json(tmp_path / "bad.json", '[{"image": "a.jpg", "caption": "x"},\n {"image": }]')
    with pytest.raises(AnnotationError, match=r"bad\.json: not valid JSON \(line 2, column 12\)"):
        load_annotations([bad], "")


def test_every_file_is_validated_before_returning(tmp_path):
    good = write_json(tmp_path / "good.json", [GOOD] * 3)
    bad = write_json(tmp_path / "later.json", [GOOD, {"image": "a.jpg", "caption": 1.5}])
    with pytest.raises(AnnotationError, match=r"later\.json: record 1: .*got float"):
        load_annotations([good, bad], "")


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------

BIG = 10**8


def saved(img: Image.Image, path, **kwargs) -> str:
    img.save(path, **kwargs)
    return str(path)


def test_grey_palette_cmyk_and_bilevel_load_as_rgb(tmp_path):
    grey = load_image(saved(Image.new("L", (5, 4), 77), tmp_path / "l.png"), BIG)
    assert grey.mode == "RGB" and grey.size == (5, 4) and grey.getpixel((0, 0)) == (77, 77, 77)

    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([200, 10, 10, 10, 200, 10] + [0] * 762)
    palette.putpixel((1, 1), 1)
    img = load_image(saved(palette, tmp_path / "p.png"), BIG)
    assert img.getpixel((0, 0)) == (200, 10, 10) and img.getpixel((1, 1)) == (10, 200, 10)

    cmyk = load_image(saved(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), tmp_path / "c.tif"), BIG)
    assert cmyk.mode == "RGB" and cmyk.getpixel((2, 2)) == (255, 0, 0)
    cmyk_jpeg = load_image(saved(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / "c.jpg"), BIG)
    assert np.abs(np.array(cmyk_jpeg, dtype=int) - [255, 0, 0]).max() <= 8

    bilevel = load_image(saved(Image.new("1", (4, 4), 1), tmp_path / "b.png"), BIG)
    assert bilevel.getpixel((0, 0)) == (255, 255, 255)


def test_transparency_is_composited_onto_white(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((1, 1), (0, 0, 255, 255))  # opaque blue
    rgba.putpixel((2, 2), (0, 0, 0, 128))  # half-transparent black
    img = load_image(saved(rgba, tmp_path / "rgba.png"), BIG)
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == (255, 255, 255)
    assert img.getpixel((1, 1)) == (0, 0, 255)
    assert all(abs(v - 127) <= 1 for v in img.getpixel((2, 2)))

    la = Image.new("LA", (4, 4), (10, 0))
    la.putpixel((3, 3), (10, 255))
    img = load_image(saved(la, tmp_path / "la.png"), BIG)
    assert img.getpixel((0, 0)) == (255, 255, 255) and img.getpixel((3, 3)) == (10, 10, 10)

    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((0, 0), 1)
    palette.info["transparency"] = 0  # palette entry 0 (red) is transparent
    for name in ("pt.png", "pt.gif"):
        img = load_image(saved(palette, tmp_path / name, transparency=0), BIG)
        assert img.getpixel((0, 0)) == (0, 255, 0) and img.getpixel((1, 1)) == (255, 255, 255)


def test_high_bit_depth_is_scaled_not_clipped(tmp_path):
    values = np.array([[65535, 32768], [0, 257]], dtype=np.uint16)
    img16 = Image.fromarray(values)
    assert img16.mode == "I;16"
    img = load_image(saved(img16, tmp_path / "g16.png"), BIG)
    assert img.mode == "RGB"
    assert [img.getpixel(xy)[0] for xy in ((0, 0), (1, 0), (0, 1), (1, 1))] == [255, 128, 0, 1]

    img32 = Image.fromarray(np.array([[65535, 40000]], dtype=np.int32))
    assert img32.mode == "I"
    img = load_image(saved(img32, tmp_path / "i.tif"), BIG)
    assert img.getpixel((0, 0)) == (255, 255, 255) and img.getpixel((1, 0))[0] == round(40000 / 257)

    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    img = load_image(saved(unit, tmp_path / "f.tif"), BIG)
    assert [img.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]
    wide = Image.fromarray(np.array([[3.0, 200.0, 999.0, -4.0]], dtype=np.float32))
    img = load_image(saved(wide, tmp_path / "f2.tif"), BIG)
    assert [img.getpixel((x, 0))[0] for x in range(4)] == [3, 200, 255, 0]


def test_broken_files_raise_bad_sample_naming_the_path(tmp_path):
    missing = str(tmp_path / "missing.jpg")
    with pytest.raises(BadSample, match=f"^{missing}: file not found"):
        load_image(missing, BIG)

    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image")
    with pytest.raises(BadSample, match="notes.jpg: not an image"):
        load_image(str(text), BIG)

    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for ext in ("jpg", "png"):
        whole = tmp_path / f"whole.{ext}"
        Image.fromarray(noise).save(whole)
        cut = tmp_path / f"cut.{ext}"
        cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
        with pytest.raises(BadSample, match=f"cut.{ext}: "):
            load_image(str(cut), BIG)


def test_too_large_images_are_rejected_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 50)).save(path)
    with pytest.raises(BadSample, match=r"big.png: 100x50 = 5000 pixels exceeds the limit of 4999"):
        load_image(str(path), 4999)
    assert load_image(str(path), 5000).size == (100, 50)
    # only the header is read: a truncated file that is too large is reported as too large
    cut = tmp_path / "cut.png"
    cut.write_bytes(path.read_bytes()[:60])
    with pytest.raises(BadSample, match="exceeds the limit"):
        load_image(str(cut), 10)


def test_pillow_decompression_bomb_error_becomes_bad_sample(tmp_path, monkeypatch):
    path = saved(Image.new("RGB", (40, 40)), tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow errors above twice this
    with pytest.raises(BadSample, match="bomb.png: too large"):
        load_image(path, BIG)


def test_decode_image_from_bytes_and_draft(tmp_path):
    path = tmp_path / "photo.jpg"
    Image.new("RGB", (400, 300), (30, 60, 90)).save(path, quality=95)
    img = decode_image(path.read_bytes(), "shard#key", BIG, draft_size=64)
    assert img.mode == "RGB" and min(img.size) >= 64 and img.size[0] < 400  # decoded at a reduced scale
    with pytest.raises(BadSample, match="^shard#key: "):
        decode_image(b"\x89PNG broken", "shard#key", BIG)


def test_to_tensor_squashes_to_a_uint8_square():
    img = Image.new("RGB", (60, 20), (10, 20, 30))
    tensor = to_tensor(img, 16)
    assert tensor.shape == (3, 16, 16) and tensor.dtype == torch.uint8
    assert tensor[:, 5, 5].tolist() == [10, 20, 30]
    assert to_tensor(Image.new("L", (16, 16), 9), 16).shape == (3, 16, 16)
