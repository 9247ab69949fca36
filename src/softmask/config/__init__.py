"""Typed configuration: dataclasses, YAML files and dotted command-line overrides.

A config is a tree of dataclasses. ``load_config(path, overrides)`` reads a YAML file, applies
``section.key=value`` overrides (values parsed as YAML, so ``data.train=[a.json,b.json]`` is a
list), converts the result into the dataclasses with type checks, and validates value ranges. Every
error is a :class:`ConfigError` whose message names the dotted key (and the file), raised before any
model or data work starts.

The schema (the dataclasses and their checks) is :mod:`softmask.config.schema`, the choices its settings
take :mod:`softmask.config.choices`; reading files and
overrides is :mod:`softmask.config.parse`. Everything is importable from ``softmask.config``.
"""

from softmask.config.choices import (
    ANSWER_RANKINGS,
    BAD_SAMPLE_POLICIES,
    EVAL_SPLITS,
    FINETUNE_TASKS,
    FOCAL_TERMS,
    MAP_SOURCES,
    METHODS,
    RANDAUG_OPERATIONS,
    RETRIEVAL_SCORES,
    TEXT_POOLING,
    VQA_RULES,
    choices,
    describe_choices,
)
from softmask.config.parse import (
    apply_override,
    config_from_dict,
    load_config,
    merge_overrides,
    model_config_from_dict,
    override_key,
    parse_override_value,
    read_yaml,
    refuse_repeated_keys,
    save_config,
    to_dict,
)
from softmask.config.schema import (
    METHOD_DEFAULTS,
    WORLD_FILES,
    AugmentConfig,
    Config,
    ConfigError,
    DataConfig,
    DistillConfig,
    FinetuneConfig,
    ITCConfig,
    ITMConfig,
    MLMConfig,
    ModelConfig,
    SoftMaskConfig,
    TextConfig,
    TrainConfig,
    VisionConfig,
    default_gradcam_layer,
)

__all__ = [
    "ANSWER_RANKINGS", "BAD_SAMPLE_POLICIES", "EVAL_SPLITS", "FINETUNE_TASKS", "FOCAL_TERMS", "MAP_SOURCES",
    "METHODS", "METHOD_DEFAULTS", "RANDAUG_OPERATIONS", "RETRIEVAL_SCORES", "TEXT_POOLING", "VQA_RULES",
    "WORLD_FILES", "AugmentConfig", "Config", "ConfigError", "DataConfig", "DistillConfig", "FinetuneConfig",
    "ITCConfig", "ITMConfig", "MLMConfig", "ModelConfig", "SoftMaskConfig", "TextConfig", "TrainConfig",
    "VisionConfig", "apply_override", "choices", "config_from_dict", "default_gradcam_layer", "describe_choices",
    "load_config", "merge_overrides", "model_config_from_dict", "override_key", "parse_override_value",
    "read_yaml", "refuse_repeated_keys", "save_config", "to_dict",
]
