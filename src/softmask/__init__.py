"""softmask: vision-language pretraining with text-driven soft masks (Park & Han, CVPR 2023) on an
ALBEF-style model.

Public API::

    cfg = softmask.load_config("configs/pretrain/tiny.yaml", overrides=["model.embed_dim=128"])
    model = softmask.create_model(cfg)
    model.save_pretrained("out/")
    model = softmask.from_pretrained("out/")
"""

from softmask.config import Config, ConfigError, ModelConfig, TextConfig, VisionConfig, load_config
from softmask.models.loading import CheckpointError, LoadReport
from softmask.models.vlp import VisionLanguageModel, create_model, from_pretrained

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "Config",
    "ConfigError",
    "LoadReport",
    "ModelConfig",
    "TextConfig",
    "VisionConfig",
    "VisionLanguageModel",
    "create_model",
    "from_pretrained",
    "load_config",
]
