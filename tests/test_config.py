from pathlib import Path

import pytest

from softmask.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

YAML = """
model:
  embed_dim: 32
  vision: {image_size: 64, patch_size: 8, width: 64, depth: 2, num_heads: 2, mlp_dim: 128}
  text: {hidden_size: 64, num_layers: 4, fusion_layer: 2, num_heads: 2, intermediate_size: 128}
seed: 3
"""


@pytest.fixture
def cfg_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(YAML)
    return path


def test_load_yaml_and_typed_values(cfg_file):
    cfg = load_config(cfg_file)
    assert cfg.model.embed_dim == 32 and cfg.seed == 3
    assert cfg.model.vision.width == 64 and cfg.model.text.fusion_layer == 2
    assert cfg.model.text.vocab_size == 30522  # default kept
    assert cfg.model.text.num_fusion_layers == 2


def test_overrides_are_parsed_as_yaml(cfg_file):
    cfg = load_config(cfg_file, ["model.text.fusion_layer=3", "model.vision.layer_norm_eps=1e-5",
                                 "model.text.init=minilm", "output_dir=/tmp/x", "model.temp=0.1"])
    assert cfg.model.text.fusion_layer == 3
    assert cfg.model.vision.layer_norm_eps == pytest.approx(1e-5)
    assert cfg.model.text.init == "minilm" and cfg.output_dir == "/tmp/x"
    assert cfg.model.temp == pytest.approx(0.1)


def test_defaults_without_file():
    cfg = load_config(None)
    assert cfg.model.vision.image_size == 256 and cfg.model.text.num_layers == 12


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.vision.widht=3", "unknown key 'model.vision.widht'.*did you mean 'model.vision.width'"),
        ("modle.embed_dim=3", "unknown key 'modle'"),
        ("model.text.num_layers=abc", "model.text.num_layers must be an integer, got 'abc'"),
        ("model.text.num_layers=true", "model.text.num_layers must be an integer"),
        ("model.text.fusion_layer=4", r"model.text.fusion_layer must be in \[0, model.text.num_layers\)"),
        ("model.vision.patch_size=7", "model.vision.image_size .* must be a multiple of model.vision.patch_size"),
        ("model.text.num_heads=3", "model.text.hidden_size .* must be divisible by model.text.num_heads"),
        ("model.vision=3", "model.vision is a section"),
        ("model.embed_dim.x=1", "'model.embed_dim' is a value, not a section"),
        ("model.text.dropout=1.5", r"model.text.dropout must be in \[0, 1\)"),
        ("model.embed_dim", "must look like section.key=value"),
        ("model.temp=2", r"model.temp must be in \[0.001, 0.5\]"),
        ("model.text_pooling=max", "model.text_pooling must be one of cls, mean, got 'max'"),
        ("itm.easy_negatives_steps=-1", "itm.weight, itm.easy_negatives_steps and itm.negative_temp_min must be >= 0"),
        ("itm.negative_temp_min=-0.1", "itm.negative_temp_min must be >= 0"),
        ("image_pretrain.position_weight=-1", "image_pretrain.position_weight must be >= 0"),
        ("model.vision.stem=resnet", "model.vision.stem must be one of patch, conv, got 'resnet'"),
        ("finetune.answer_ranking=once", "finetune.answer_ranking must be one of albef, sequence, got 'once'"),
        ("finetune.vqa_rules=2019", "finetune.vqa_rules must be one of 2021, 2017, got '2019'"),
    ],
)
def test_bad_values_name_the_key(cfg_file, override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(cfg_file, [override])


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  embed_dim: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml \(line \d+, column \d+\): not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(listy)


def test_error_from_file_names_file(cfg_file):
    cfg_file.write_text(YAML + "bogus: 1\n")
    with pytest.raises(ConfigError, match=f"{cfg_file.name}: unknown key 'bogus'"):
        load_config(cfg_file)


@pytest.mark.parametrize("name", ["tiny", "small", "4m"])
def test_shipped_configs_validate(name):
    cfg = load_config(CONFIGS / "pretrain" / f"{name}.yaml")
    assert cfg.model.text.fusion_layer < cfg.model.text.num_layers


def test_list_overrides_keep_brace_patterns_and_quotes(cfg_file):
    cfg = load_config(cfg_file, ["data.train=[/d/cc3m-{000000..000331}.tar, /d/sbu-{0..9}.tar]"])
    assert cfg.data.train == ["/d/cc3m-{000000..000331}.tar", "/d/sbu-{0..9}.tar"]
    cfg = load_config(cfg_file, ["data.train=[a.json,'b,c.json']", "data.augment.crop_scale=[0.5, 1]"])
    assert cfg.data.train == ["a.json", "b,c.json"] and cfg.data.augment.crop_scale == [0.5, 1.0]
    assert load_config(cfg_file, ["data.train=one.json"]).data.train == ["one.json"]


def test_every_shipped_config_validates():
    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.rglob("*.yaml"))
    assert {"world_mini.yaml", "world_vit.yaml", "tiny.yaml", "4m.yaml"} <= {f.name for f in files}
    for path in files:
        task = path.stem.split("_")[0] if path.parent.name == "finetune" else ""
        load_config(path, [f"finetune.task={task}"] if task else [])  # raises ConfigError on a bad value


def test_world_mini_recipe_starts_from_the_pretrained_encoders():
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "world_mini.yaml")
    vit = load_config(Path(__file__).resolve().parents[1] / "configs" / "vision" / "world_vit.yaml")
    assert cfg.model.vision == vit.model.vision  # the image encoder pretrain-vision makes fits it
    assert cfg.model.text.init == "minilm" and cfg.model.text.init_layers == "first"
    assert cfg.model.text_pooling == "mean" and cfg.model.fused_pooling == "mean"


def test_retrieval_ranks_by_the_itm_logit_alone_as_albef_by_default_and_in_every_shipped_config():
    from softmask.config import Config

    assert Config().finetune.score == "itm"
    for name in ("retrieval_coco", "retrieval_flickr", "retrieval_tiny"):
        assert load_config(CONFIGS / "finetune" / f"{name}.yaml").finetune.score == "itm", name


def _choice_fields(section, prefix=""):
    """(dotted key, declared choices, is a list) of every Literal-typed field of the config tree."""
    import dataclasses
    import typing

    from softmask.config import choices

    hints = typing.get_type_hints(type(section))
    for item in dataclasses.fields(section):
        key, tp = f"{prefix}{item.name}", hints[item.name]
        if dataclasses.is_dataclass(getattr(section, item.name)):
            yield from _choice_fields(getattr(section, item.name), key + ".")
        elif typing.get_origin(tp) is list and choices(typing.get_args(tp)[0]):
            yield key, choices(typing.get_args(tp)[0]), True
        elif choices(tp):
            yield key, choices(tp), False


def test_every_declared_choice_is_accepted_and_nothing_else():
    from softmask.config import Config

    fields = list(_choice_fields(Config()))
    assert {"method", "model.vision.stem", "train.precision", "softmask.mask_source", "finetune.vqa_rules",
            "finetune.eval_splits", "data.augment.randaug_exclude"} <= {key for key, _, _ in fields}
    for key, allowed, is_list in fields:
        for value in allowed:
            cfg = load_config(None, [f"{key}=[{value}]" if is_list else f"{key}={value}"])
            section = cfg
            for part in key.split("."):
                section = getattr(section, part)
            assert section == ([value] if is_list else value), key
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, [f"{key}=[nope]" if is_list else f"{key}=nope"])


def test_resolve_fills_the_defaults_and_validate_only_checks():
    from softmask.config import Config, to_dict

    cfg = Config(method="softmask")
    with pytest.raises(ConfigError, match="itc.gamma is not resolved"):
        cfg.validate()  # the switches method sets are left at None until resolve()
    cfg.resolve()
    assert cfg.itc.gamma == 2.0 and cfg.softmask.soft_masks is True and cfg.softmask.layer == 2
    resolved = to_dict(cfg)
    cfg.validate()
    assert to_dict(cfg) == resolved
    cfg.softmask.text_masking = False  # a switch given explicitly wins over method's
    assert cfg.resolve().softmask.text_masking is False
