"""The two-image model of NLVR2, built from a single-image model.

ALBEF's scheme, as its released code does it (``NLVR.py`` / ``model_nlvr.py``): the fusion encoder's
BERT is made deeper, each single-image fusion layer ``L`` becoming two consecutive blocks, both
initialised from ``L``: the first block's cross-attention attends to image 1, the second block's to
image 2, and the two blocks share the key/value projection of their cross-attention (ALBEF ties the
``key`` and ``value`` linears of layers ``6 + 2i`` and ``7 + 2i``). Everything else (self-attention,
the query and output projections of the cross-attention, the FFN and the LayerNorms) is a separate
copy. The text and image encoders are the single-image ones, unchanged.

Why this scheme rather than "two cross-attentions per layer, their outputs averaged" (BLIP's NLVR
model, which merges the second half of its layers with an extra linear layer): it is the one the
ALBEF recipe this project follows was published with, and it needs no new randomly initialised
weight. A true property of it, tested: right after the expansion, fusing text with (image 1, image 2)
equals applying every single-image fusion layer twice in a row, first with image 1 and then with
image 2 (with both images identical, each layer simply runs twice on that image; it does *not*
reproduce the single-image output).

The single-image model's ITC projections, ITM head, MLM head and temperature are not part of the
two-image model (NLVR2 never uses them; DDP would reject parameters without gradients); the task adds
its own classifier, :func:`classifier_head`.

Shapes: B batch, T text tokens, N image patches, D text width, Dv image width, S image side.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from softmask.config import ModelConfig, TextConfig
from softmask.models.bert import BertLayer, CrossAttention, TextEncoder, init_bert_weights
from softmask.models.vit import VisionTransformer
from softmask.models.vlp import VisionLanguageModel

_FUSION_KEY = re.compile(r"^fusion_encoder\.layers\.(\d+)\.(.+)$")
SHARED_PREFIX = "cross_attn.kv."  # the second block's cross-attention uses the first block's K/V
KEPT_PREFIXES = ("visual_encoder.", "text_encoder.")


class SharedKVCrossAttention(CrossAttention):
    """A cross-attention with its own query and output projections whose key/value projection is
    that of another :class:`CrossAttention` (``source``). The shared linear is not registered here,
    so the state dict holds it once (under its owner); ``copy.deepcopy`` keeps the sharing."""

    def __init__(self, cfg: TextConfig, image_width: int, source: CrossAttention):
        super().__init__(cfg, image_width)
        del self.kv  # the registered copy made by CrossAttention.__init__
        object.__setattr__(self, "_kv_source", source)  # a plain attribute, not a submodule

    @property
    def kv(self) -> nn.Linear:
        """The owner's (Dv -> 2D) key/value projection."""
        return self._kv_source.kv


class PairedFusionLayer(nn.Module):
    """One single-image fusion layer replicated into two blocks: ``first`` attends to image 1,
    ``second`` to image 2, sharing the cross-attention's key/value projection."""

    def __init__(self, cfg: TextConfig, image_width: int):
        super().__init__()
        self.first = BertLayer(cfg, image_width)
        self.second = BertLayer(cfg, image_width)
        self.second.cross_attn = SharedKVCrossAttention(cfg, image_width, self.first.cross_attn)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor, image1: torch.Tensor,
                image2: torch.Tensor) -> torch.Tensor:
        """(B, T, D) text, (B, T) mask, two (B, 1 + N, Dv) images -> (B, T, D)."""
        x, _ = self.first(x, attention_mask, image1)
        x, _ = self.second(x, attention_mask, image2)
        return x


class TwoImageFusionEncoder(nn.Module):
    """The fusion encoder for a pair of images: one :class:`PairedFusionLayer` per single-image
    fusion layer (2 x ``num_fusion_layers`` blocks)."""

    def __init__(self, cfg: TextConfig, image_width: int):
        super().__init__()
        self.layers = nn.ModuleList(PairedFusionLayer(cfg, image_width) for _ in range(cfg.num_fusion_layers))
        init_bert_weights(self)

    def forward(self, text_embeds: torch.Tensor, attention_mask: torch.Tensor, image1: torch.Tensor,
                image2: torch.Tensor) -> torch.Tensor:
        """(B, T, D) text, (B, T) mask, image tokens (B, 1 + N, Dv) of image 1 and of image 2 -> (B, T, D)."""
        x = text_embeds
        for layer in self.layers:
            x = layer(x, attention_mask, image1, image2)
        return x


class TwoImageModel(nn.Module):
    """Image encoder, text encoder and the two-image fusion encoder. ``config`` is the model section
    of the single-image architecture it was expanded from."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.visual_encoder = VisionTransformer(cfg.vision)
        self.text_encoder = TextEncoder(cfg.text)
        self.fusion_encoder = TwoImageFusionEncoder(cfg.text, cfg.vision.width)

    @classmethod
    def from_single(cls, single: VisionLanguageModel) -> TwoImageModel:
        """The two-image model with every weight taken from ``single`` (see :func:`two_image_state`)."""
        model = cls(single.config).to(next(single.parameters()).device)
        state, _ = two_image_state(single.state_dict())
        model.load_state_dict(state, strict=True)  # every tensor of the two-image model is set
        return model

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels -> (B, 1 + N, Dv)."""
        return self.visual_encoder(pixels)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids and mask -> (B, T, D), the text encoder's output."""
        return self.text_encoder(input_ids, attention_mask)

    def fuse(self, text_embeds: torch.Tensor, attention_mask: torch.Tensor, image1: torch.Tensor,
             image2: torch.Tensor) -> torch.Tensor:
        """(B, T, D) text, (B, T) mask, (B, 1 + N, Dv) tokens of each image -> (B, T, D) fused tokens."""
        return self.fusion_encoder(text_embeds, attention_mask, image1, image2)

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pairs of normalised images (B, 2, 3, S, S), tokens and mask (B, T) -> fused tokens (B, T, D).
        The 2B images go through the image encoder as one batch."""
        if pixels.dim() != 5 or pixels.shape[1] != 2:
            raise ValueError(f"expected image pairs of shape (B, 2, 3, S, S), got {tuple(pixels.shape)}")
        images = self.encode_image(pixels.flatten(0, 1)).unflatten(0, (pixels.shape[0], 2))
        return self.fuse(self.encode_text(input_ids, attention_mask), attention_mask, images[:, 0], images[:, 1])


def two_image_state(single_state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map a single-image :class:`VisionLanguageModel` state dict onto :class:`TwoImageModel`.

    ``fusion_encoder.layers.{i}.X`` goes to ``fusion_encoder.layers.{i}.first.X`` and, except the
    shared ``cross_attn.kv.*``, to ``fusion_encoder.layers.{i}.second.X``; the image and text encoders
    keep their keys. Returns (the two-image state, the single-image keys left out: projections, ITM
    and MLM heads, temperature).
    """
    state, dropped = {}, []
    for key, tensor in single_state.items():
        match = _FUSION_KEY.match(key)
        if match:
            index, rest = match.groups()
            state[f"fusion_encoder.layers.{index}.first.{rest}"] = tensor
            if not rest.startswith(SHARED_PREFIX):
                state[f"fusion_encoder.layers.{index}.second.{rest}"] = tensor
        elif key.startswith(KEPT_PREFIXES):
            state[key] = tensor
        else:
            dropped.append(key)
    return state, dropped


def classifier_head(width: int, num_classes: int) -> nn.Sequential:
    """The classifier on the fused [CLS]: (B, D) -> (B, C) through Linear(D, D), ReLU, Linear(D, C),
    BERT-initialised: ALBEF's NLVR head (``cls_head.0``/``cls_head.2``, its names)."""
    head = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, num_classes))
    init_bert_weights(head)
    return head
