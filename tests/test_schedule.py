"""Optimiser parameter groups: weight decay, and the optional learning-rate scale of the cross-attention."""

from __future__ import annotations

import pytest

from softmask import create_model, load_config
from softmask.train.schedule import param_groups

from helpers import tiny_model_config


def _names(model, group):
    ids = {id(p) for p in group["params"]}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def test_one_rate_for_all_by_default_with_decay_on_matrices_only():
    model = create_model(tiny_model_config())
    groups = param_groups(model, 0.02)
    assert [(g["weight_decay"], g["lr_scale"]) for g in groups] == [(0.02, 1.0), (0.0, 1.0)]
    decay, no_decay = (_names(model, g) for g in groups)
    assert decay | no_decay == {n for n, _ in model.named_parameters()} and not decay & no_decay
    assert "temp" in no_decay and "visual_encoder.pos_embed" in no_decay
    assert all(n.endswith("weight") for n in decay)


def test_cross_attention_lr_scale_gives_the_new_layers_their_own_rate():
    model = create_model(tiny_model_config())
    groups = param_groups(model, 0.02, cross_attention_lr_scale=5.0)
    scaled = set().union(*(_names(model, g) for g in groups if g["lr_scale"] == 5.0))
    assert scaled == {n for n, _ in model.named_parameters()
                      if ".cross_attn." in n or ".cross_norm." in n or n.startswith("itm_head.")}
    with pytest.raises(Exception, match="cross_attention_lr_scale"):
        load_config(None, ["train.cross_attention_lr_scale=0"])

