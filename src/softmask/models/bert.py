"""BERT split in two: a text encoder (self-attention + FFN) and a fusion encoder (bidirectional
self-attention, cross-attention to image tokens, FFN), plus BERT's MLM prediction head.

Post-norm layers exactly as BERT: ``x = LN(x + Dropout(Sublayer(x)))``. Attention uses
``F.scaled_dot_product_attention`` except in the one fusion layer asked to return its
cross-attention probabilities, which computes them explicitly (inside the autograd graph) so that
Grad-CAM can differentiate with respect to them.

With ``text.pack_tokens`` the encoders run every per-token operation (projections, FFN, LayerNorms)
on the real tokens only, packed as (N, D) (:class:`TokenPacking`), and unpack them to the padded
(B, T, ...) layout around each attention: captions padded to the longest of their batch are about half
padding, whose outputs nothing reads (a padded key is masked, a padded query's output is never used).
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


class TokenPacking:
    """Where the real tokens of a padded (B, T) batch are: ``pack`` (B, T, ...) -> (N, ...) keeps them
    (row-major order), ``unpack`` (N, ...) -> (B, T, ...) puts them back with zeros at the padding."""

    def __init__(self, attention_mask: torch.Tensor):
        self.shape = tuple(attention_mask.shape)
        self.index = attention_mask.flatten().nonzero().squeeze(1)  # (N,)

    @property
    def full(self) -> bool:
        """True when there is no padding (packing would change nothing)."""
        return self.index.numel() == self.shape[0] * self.shape[1]

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(0, 1).index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros((self.shape[0] * self.shape[1], *x.shape[1:])).index_copy(0, self.index, x)
        return out.view(*self.shape, *x.shape[1:])


def packing_for(attention_mask: torch.Tensor, enabled: bool) -> TokenPacking | None:
    """The packing of ``attention_mask`` (B, T) when ``enabled`` and the batch has padding, else None."""
    if not enabled:
        return None
    packing = TokenPacking(attention_mask)
    return None if packing.full else packing


def _unpacked(x: torch.Tensor, packing: TokenPacking | None) -> torch.Tensor:
    return x if packing is None else packing.unpack(x)


def _packed(x: torch.Tensor, packing: TokenPacking | None) -> torch.Tensor:
    return x if packing is None else packing.pack(x)


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

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor,
                packing: TokenPacking | None = None) -> torch.Tensor:
        """``x`` (B, T, D), or (N, D) real tokens with ``packing``; the output has the same layout."""
        qkv = _unpacked(self.qkv(x), packing)
        q, k, v = (_split_heads(t, self.num_heads) for t in qkv.chunk(3, dim=-1))
        mask = additive_mask(attention_mask, q.dtype)
        if self.causal:  # (B, 1, 1, T) -> (B, 1, T, T): query i never sees key j > i
            t = qkv.shape[1]
            future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
            mask = mask.masked_fill(future, torch.finfo(q.dtype).min)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out(_packed(_merge_heads(out), packing))


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
                image_index: torch.Tensor | None = None, image_mask: torch.Tensor | None = None,
                packing: TokenPacking | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``image_index`` (B,), optional: ``image`` holds U distinct images (U, 1 + N, Dv) and row b of
        ``x`` attends to image ``image_index[b]``; keys and values are then projected once per image.
        ``image_mask`` (B, 1 + N), optional: 1 = attend, 0 = padding never attended (per row of ``x``,
        i.e. already indexed); e.g. when the keys are a padded question's fused tokens. With ``packing``,
        ``x`` and the output are (N, D) real tokens (the probabilities stay padded: zero queries at padding)."""
        q = _split_heads(_unpacked(self.q(x), packing), self.num_heads)
        kv = self.kv(image)
        if image_index is not None:
            kv = kv[image_index]
        k, v = (_split_heads(t, self.num_heads) for t in kv.chunk(2, dim=-1))
        drop = self.dropout if self.training else 0.0
        mask = None if image_mask is None else additive_mask(image_mask, q.dtype)
        if not return_probs:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
            return self.out(_packed(_merge_heads(out), packing)), None
        scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        if mask is not None:
            scores = scores + mask
        probs = scores.softmax(dim=-1)
        out = torch.matmul(F.dropout(probs, drop, self.training), v)
        return self.out(_packed(_merge_heads(out), packing)), probs


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
                image_mask: torch.Tensor | None = None, packing: TokenPacking | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x`` (B, T, D), or with ``packing`` (N, D) real tokens (the output likewise). ``image_mask``
        (B, 1 + N), optional: padding of the cross-attention keys (see CrossAttention)."""
        x = self.attn_norm(x + self.dropout(self.attn(x, attention_mask, packing)))
        probs = None
        if self.has_cross_attention:
            if image is None:
                raise ValueError("a fusion layer needs the image tokens")
            attended, probs = self.cross_attn(x, image, return_probs, image_index, image_mask, packing)
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
        self.pack_tokens = cfg.pack_tokens
        init_bert_weights(self)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, D); with ``text.pack_tokens`` zeros at the padding."""
        x = self.embeddings(input_ids)
        packing = packing_for(attention_mask, self.pack_tokens and len(self.layers) > 0)
        x = _packed(x, packing)
        for layer in self.layers:
            x, _ = layer(x, attention_mask, packing=packing)
        return _unpacked(x, packing)


class FusionEncoder(nn.Module):
    """BERT layers [fusion_layer, num_layers), each with cross-attention to the image tokens."""

    def __init__(self, cfg: TextConfig, image_width: int):
        super().__init__()
        self.layers = nn.ModuleList(BertLayer(cfg, image_width) for _ in range(cfg.num_fusion_layers))
        self.pack_tokens = cfg.pack_tokens
        init_bert_weights(self)

    def forward(self, text_embeds: torch.Tensor, attention_mask: torch.Tensor, image_embeds: torch.Tensor,
                attention_layer: int | None = None, image_index: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T, D) text, (B, T) mask, (B, 1 + N, Dv) image -> (B, T, D) fused, and the
        cross-attention probabilities (B, heads, T, 1 + N) of fusion layer ``attention_layer``
        (0-based within the fusion encoder) when it is given, else None. With ``image_index`` (B,),
        ``image_embeds`` holds U distinct images (U, 1 + N, Dv) shared by the rows that index them.
        With ``text.pack_tokens`` the fused tokens are zeros at the padding."""
        n = len(self.layers)
        if attention_layer is not None and not 0 <= attention_layer < n:
            raise ValueError(f"attention_layer must be a fusion-layer index in [0, {n}), got {attention_layer}")
        packing = packing_for(attention_mask, self.pack_tokens)
        x, kept = _packed(text_embeds, packing), None
        for i, layer in enumerate(self.layers):
            x, probs = layer(x, attention_mask, image_embeds, return_probs=i == attention_layer,
                             image_index=image_index, packing=packing)
            if i == attention_layer:
                kept = probs
        return _unpacked(x, packing), kept


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
