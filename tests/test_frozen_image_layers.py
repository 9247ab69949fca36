"""``train.frozen_image_layers``: the lowest image-encoder layers stay as loaded through training steps (online
and momentum copies), the layers above them train, and a count beyond the encoder is a config error."""

from __future__ import annotations

import pytest
import torch

from softmask import create_model, load_config
from softmask.bench import synthetic_batch
from softmask.config import ConfigError
from softmask.tasks.pretrain import build_objective
from softmask.train.schedule import make_optimizer

from helpers import TINY


def _trained(frozen: int, method: str = "albef", steps: int = 2):
    cfg = load_config(TINY, ["train.warmup_steps=0", "train.lr_start=1e-2", "itc.queue_size=16",
                             f"method={method}", f"train.frozen_image_layers={frozen}"])
    torch.manual_seed(0)
    task = build_objective(cfg, create_model(cfg), alpha_warmup_steps=1).train()
    before = {k: v.detach().clone() for k, v in task.model.visual_encoder.named_parameters()}
    optimizer = make_optimizer(task, cfg.train)
    batch = synthetic_batch(cfg, 4)
    for step in range(steps):
        task(batch, step)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        task.momentum_update()
    return task, before


def _changed(task, before) -> set[str]:
    return {k for k, v in task.model.visual_encoder.named_parameters() if not torch.equal(v, before[k])}


@pytest.mark.parametrize("method", ["albef", "softmask"])
def test_frozen_image_layers_stay_as_loaded_and_the_rest_trains(method):
    task, before = _trained(2, method)
    changed = _changed(task, before)
    frozen = {k for k in before if k.startswith(("patch_embed.", "blocks.0.")) or k in ("pos_embed", "cls_token")}
    assert frozen and not changed & frozen
    assert {k for k in changed if k.startswith("blocks.1.")}  # the block above them trains
    momentum = dict(task.momentum_model.visual_encoder.named_parameters())
    assert all(torch.equal(momentum[k], before[k]) for k in frozen)
    # nothing frozen: the stem trains too
    task, before = _trained(0, method)
    assert {k for k in _changed(task, before) if k.startswith("patch_embed.")}


def test_freezing_only_the_stem_leaves_the_position_embeddings_training():
    task, before = _trained(1)
    changed = _changed(task, before)
    assert not {k for k in changed if k.startswith("patch_embed.")}
    assert "pos_embed" in changed and any(k.startswith("blocks.0.") for k in changed)


def test_frozen_image_layers_beyond_the_encoder_is_a_config_error():
    depth = load_config(TINY).model.vision.depth
    load_config(TINY, [f"train.frozen_image_layers={depth + 1}"])
    with pytest.raises(ConfigError, match="frozen_image_layers"):
        load_config(TINY, [f"train.frozen_image_layers={depth + 2}"])
    with pytest.raises(ConfigError, match="frozen_image_layers"):
        load_config(TINY, ["train.frozen_image_layers=-1"])
