"""Shared fixtures: tiny configs and models built by the tests themselves."""

from __future__ import annotations

import pytest
import torch

from softmask.config import ModelConfig, model_config_from_dict

TINY = {
    "embed_dim": 16,
    "vision": {"image_size": 32, "patch_size": 8, "width": 48, "depth": 2, "num_heads": 2, "mlp_dim": 96},
    "text": {"vocab_size": 120, "hidden_size": 32, "num_layers": 4, "fusion_layer": 2, "num_heads": 2,
             "intermediate_size": 64, "max_positions": 40},
}


def tiny_model_config(**changes) -> ModelConfig:
    """The tiny model section; ``changes`` are dotted keys relative to ``model``, e.g. text__num_layers."""
    data = {"embed_dim": TINY["embed_dim"], "vision": dict(TINY["vision"]), "text": dict(TINY["text"])}
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            data[section][name] = value
        else:
            data[section] = value
    return model_config_from_dict(data)


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return tiny_model_config()


@pytest.fixture
def tiny_model(tiny_cfg):
    from softmask import create_model

    torch.manual_seed(0)
    return create_model(tiny_cfg).eval()


def text_batch(vocab: int = 120, b: int = 3, t: int = 9, seed: int = 0):
    """(B, T) ids starting with a [CLS]-like id, and a mask with padding in the later rows."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (b, t), generator=g)
    ids[:, 0] = 1
    mask = torch.ones(b, t, dtype=torch.long)
    for row in range(1, b):
        mask[row, t - 2 * row:] = 0
    return ids, mask


@pytest.fixture(scope="session")
def task_world(tmp_path_factory):
    """A small synthetic world (60 images at 32 px) shared by the fine-tuning tests; read-only."""
    from softmask.world import generate_world

    out = tmp_path_factory.mktemp("task_world")
    generate_world(out, images=60, size=32, seed=0)
    return out
