"""BERT split in two: a text encoder (self-attention + FFN) and a fusion encoder (bidirectional
self-attention, cross-attention to image tokens, FFN), plus BERT's MLM prediction head.

Post-norm layers exactly as BERT: ``x = LN(x + Dropout(Sublayer(x)))``. Attention uses
``F.scaled_dot_product_attention`` except in the one fusion layer asked to return its
cross-attention probabilities, which computes them explicitly (inside the autograd graph) so that
Grad-CAM can differentiate with respect to them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from softmask.config import TextConfig


def additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, T) with 1 = keep, 0 = padding -> (B, 1, 1, T) additive mask (0 or the dtype's minimum)."""
    keep = attention_mask[:, None, None, :].to(torch.bool)
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, L, D) -> (B, heads, L, D / heads)."""
    b, n, d = x.shape
    return x.view(b, n, num_heads, d // num_heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, L, d) -> (B, L, heads * d)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class TextEmbeddings(nn.Module):
    """Word + absolute position + token-type (always type 0) embeddings, LayerNorm, dropout."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_positions, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, D)."""
        t = input_ids.shape[1]
        limit = self.position_embeddings.num_embeddings
        if t > limit:
            raise ValueError(f"text has {t} tokens, more than model.text.max_positions ({limit})")
        positions = torch.arange(t, device=input_ids.device)
        x = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
             + self.token_type_embeddings.weight[0])
        return self.dropout(self.norm(x))


class SelfAttention(nn.Module):
    """Multi-head self-attention with a padding mask: (B, T, D) -> (B, T, D). Bidirectional, or with
    ``causal`` (a decoder's) each position attends only to itself and the positions before it."""

    def __init__(self, cfg: TextConfig, causal: bool = False):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.dropout = cfg.attention_dropout
        self.causal = causal
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        q, k, v = (_split_heads(t, self.num_heads) for t in self.qkv(x).chunk(3, dim=-1))
        mask = additive_mask(attention_mask, q.dtype)
        if self.causal:  # (B, 1, 1, T) -> (B, 1, T, T): query i never sees key j > i
            t = x.shape[1]
            future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
            mask = mask.masked_fill(future, torch.finfo(q.dtype).min)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out(_merge_heads(out))


class CrossAttention(nn.Module):
    """Text queries attend to image tokens; keys and values project from the image width.

    (B, T, D) text and (B, 1 + N, Dv) image -> (B, T, D), and optionally the attention
    probabilities (B, heads, T, 1 + N) after softmax and before dropout.
    """

    def __init__(self, cfg: TextConfig, image_width: int):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.dropout = cfg.attention_dropout
        self.q = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.kv = nn.Linear(image_width, 2 * cfg.hidden_size)
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, image: torch.Tensor, return_probs: bool = False,
                image_index: torch.Tensor | None = None, image_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``image_index`` (B,), optional: ``image`` holds U distinct images (U, 1 + N, Dv) and row b of
        ``x`` attends to image ``image_index[b]``; keys and values are then projected once per image.
        ``image_mask`` (B, 1 + N), optional: 1 = attend, 0 = padding never attended (per row of ``x``,
        i.e. already indexed); e.g. when the keys are a padded question's fused tokens."""
        q = _split_heads(self.q(x), self.num_heads)
        kv = self.kv(image)
        if image_index is not None:
            kv = kv[image_index]
        k, v = (_split_heads(t, self.num_heads) for t in kv.chunk(2, dim=-1))
        drop = self.dropout if self.training else 0.0
        mask = None if image_mask is None else additive_mask(image_mask, q.dtype)
        if not return_probs:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
            return self.out(_merge_heads(out)), None
        scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        if mask is not None:
            scores = scores + mask
        probs = scores.softmax(dim=-1)
        out = torch.matmul(F.dropout(probs, drop, self.training), v)
        return self.out(_merge_heads(out)), probs


class FeedForward(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class BertLayer(nn.Module):
    """One post-norm BERT layer; with ``image_width`` set it also cross-attends to image tokens; with
    ``causal`` its self-attention is causal (a decoder layer)."""

    def __init__(self, cfg: TextConfig, image_width: int | None = None, causal: bool = False):
        super().__init__()
        self.attn = SelfAttention(cfg, causal=causal)
        self.attn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.has_cross_attention = image_width is not None
        if image_width is not None:
            self.cross_attn = CrossAttention(cfg, image_width)
            self.cross_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.ffn = FeedForward(cfg)
        self.ffn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor, image: torch.Tensor | None = None,
                return_probs: bool = False, image_index: torch.Tensor | None = None,
                image_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``image_mask`` (B, 1 + N), optional: padding of the cross-attention keys (see CrossAttention)."""
        x = self.attn_norm(x + self.dropout(self.attn(x, attention_mask)))
        probs = None
        if self.has_cross_attention:
            if image is None:
                raise ValueError("a fusion layer needs the image tokens")
            attended, probs = self.cross_attn(x, image, return_probs, image_index, image_mask)
            x = self.cross_norm(x + self.dropout(attended))
        x = self.ffn_norm(x + self.dropout(self.ffn(x)))
        return x, probs


def init_bert_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT's initialisation: normal(0, 0.02) weights, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class TextEncoder(nn.Module):
    """BERT layers [0, fusion_layer): (B, T) ids and mask -> (B, T, D)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embeddings = TextEmbeddings(cfg)
        self.layers = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.fusion_layer))
        init_bert_weights(self)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(input_ids)
        for layer in self.layers:
            x, _ = layer(x, attention_mask)
        return x


class FusionEncoder(nn.Module):
    """BERT layers [fusion_layer, num_layers), each with cross-attention to the image tokens."""

    def __init__(self, cfg: TextConfig, image_width: int):
        super().__init__()
        self.layers = nn.ModuleList(BertLayer(cfg, image_width) for _ in range(cfg.num_fusion_layers))
        init_bert_weights(self)

    def forward(self, text_embeds: torch.Tensor, attention_mask: torch.Tensor, image_embeds: torch.Tensor,
                attention_layer: int | None = None, image_index: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T, D) text, (B, T) mask, (B, 1 + N, Dv) image -> (B, T, D) fused, and the
        cross-attention probabilities (B, heads, T, 1 + N) of fusion layer ``attention_layer``
        (0-based within the fusion encoder) when it is given, else None. With ``image_index`` (B,),
        ``image_embeds`` holds U distinct images (U, 1 + N, Dv) shared by the rows that index them."""
        n = len(self.layers)
        if attention_layer is not None and not 0 <= attention_layer < n:
            raise ValueError(f"attention_layer must be a fusion-layer index in [0, {n}), got {attention_layer}")
        x, kept = text_embeds, None
        for i, layer in enumerate(self.layers):
            x, probs = layer(x, attention_mask, image_embeds, return_probs=i == attention_layer,
                             image_index=image_index)
            if i == attention_layer:
                kept = probs
        return x, kept


class MLMHead(nn.Module):
    """BERT's prediction head; the decoder weight is the word-embedding matrix (tied), passed in."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        init_bert_weights(self)

    def forward(self, hidden: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, vocab) logits."""
        return F.linear(self.norm(F.gelu(self.dense(hidden))), word_embeddings, self.bias)
