"""Shared fixtures: tiny models and a small world built by the tests themselves. The helpers the test
modules import are in ``helpers.py``."""

from __future__ import annotations

import pytest
import torch

from helpers import tiny_model_config


@pytest.fixture
def tiny_cfg():
    return tiny_model_config()


@pytest.fixture
def tiny_model(tiny_cfg):
    from softmask import create_model

    torch.manual_seed(0)
    return create_model(tiny_cfg).eval()


@pytest.fixture(scope="session")
def task_world(tmp_path_factory):
    """A small synthetic world (60 images at 32 px) shared by the fine-tuning tests; read-only."""
    from softmask.world import generate_world

    out = tmp_path_factory.mktemp("task_world")
    generate_world(out, images=60, size=32, seed=0)
    return out
