"""ALBEF's VQA answer decoder: a causal transformer decoder that generates an answer from the fused
question-image states, initialised from the pretrained fusion encoder.

Architecture (shapes: N answer sequences, L answer tokens, Q question tokens, D text width):

- its own copy of the text embeddings (word, position, token type, LayerNorm), initialised from the
  text encoder's (ALBEF's decoder is a separate BERT whose embeddings are loaded from the text
  encoder's: copied, not shared, so fine-tuning the decoder leaves the question encoder's alone);
- one decoder layer per fusion layer, each a :class:`~softmask.models.bert.BertLayer` with causal
  self-attention, cross-attention to the fused question states (keys/values of width D, the
  question's padding masked out) and the FFN, initialised from the fusion layer of the same index;
- an LM head initialised from the MLM head and tied to the decoder's own word embeddings.

An answer is decoded as ``[CLS] answer tokens [SEP]``: position t predicts token t + 1, so [CLS] is
the start token and [SEP] the end of the answer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from softmask.config import TextConfig
from softmask.models.bert import BertLayer, MLMHead, TextEmbeddings, init_bert_weights


class AnswerDecoder(nn.Module):
    """Embeddings, causal cross-attending layers and a tied LM head."""

    def __init__(self, cfg: TextConfig, num_layers: int | None = None):
        super().__init__()
        self.config = cfg
        depth = cfg.num_fusion_layers if num_layers is None else num_layers
        self.embeddings = TextEmbeddings(cfg)
        # The keys and values are fused question tokens, so the cross-attention's input width is D.
        self.layers = nn.ModuleList(BertLayer(cfg, cfg.hidden_size, causal=True) for _ in range(depth))
        self.head = MLMHead(cfg)
        init_bert_weights(self)

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, states: torch.Tensor,
               states_mask: torch.Tensor, states_index: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder states.

        Args:
            input_ids: (N, L) answer tokens, [CLS] first.
            attention_mask: (N, L), 1 = token, 0 = padding.
            states: (U, Q, D) fused question tokens; without ``states_index`` U = N (one per row).
            states_mask: (U, Q), 1 = question token, 0 = padding (never attended).
            states_index: (N,), optional: row n attends to question ``states_index[n]`` (keys and
                values are projected once per question, shared by its answers).

        Returns:
            (N, L, D).
        """
        key_mask = states_mask if states_index is None else states_mask[states_index]
        x = self.embeddings(input_ids)
        for layer in self.layers:
            x, _ = layer(x, attention_mask, states, image_index=states_index, image_mask=key_mask)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., D) decoder states -> (..., vocab) next-token logits (head tied to the word embeddings)."""
        return self.head(hidden, self.embeddings.word_embeddings.weight)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, states: torch.Tensor,
                states_mask: torch.Tensor, states_index: torch.Tensor | None = None) -> torch.Tensor:
        """(N, L) answer tokens -> (N, L, vocab) logits; position t scores token t + 1 (see :meth:`hidden`)."""
        return self.logits(self.hidden(input_ids, attention_mask, states, states_mask, states_index))

    @torch.no_grad()
    def init_from(self, backbone: nn.Module) -> list[str]:
        """Copy the backbone's text embeddings, fusion layers (decoder layer i <- fusion layer i) and MLM
        head into this decoder.

        Returns the decoder tensors left at their random initialisation because the backbone has no
        tensor of that shape: the cross-attention key/value projection when the image width differs
        from the text width (in BERT-base/ViT-B both are 768, so everything is copied), and layers
        beyond the fusion encoder's depth."""
        sources = [(self.embeddings, backbone.text_encoder.embeddings), (self.head, backbone.mlm_head)]
        sources += list(zip(self.layers, backbone.fusion_encoder.layers, strict=False))
        copied = set()
        for target, source in sources:
            prefix = _prefix_of(self, target)
            theirs = source.state_dict()
            for name, tensor in target.state_dict().items():
                if name in theirs and theirs[name].shape == tensor.shape:
                    tensor.copy_(theirs[name])
                    copied.add(prefix + name)
        return [name for name in self.state_dict() if name not in copied]


def _prefix_of(root: nn.Module, child: nn.Module) -> str:
    """The state-dict prefix of ``child`` inside ``root`` (e.g. ``"layers.0."``)."""
    for name, module in root.named_modules():
        if module is child:
            return f"{name}." if name else ""
    raise ValueError("not a submodule")


def build_answer_decoder(backbone: nn.Module) -> tuple[AnswerDecoder, list[str]]:
    """A decoder for ``backbone`` (a :class:`~softmask.models.vlp.VisionLanguageModel`), initialised
    from its fusion encoder, text embeddings and MLM head; and the names of the tensors left random."""
    decoder = AnswerDecoder(backbone.config.text)
    left_random = decoder.init_from(backbone)
    return decoder, left_random


def token_log_probs(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of each answer's tokens after [CLS].

    Args:
        logits: (N, L, V) decoder logits (position t scores token t + 1).
        input_ids: (N, L) the sequences decoded.
        attention_mask: (N, L), 1 = token, 0 = padding.

    Returns:
        (N, L - 1): log p(token t + 1 | tokens <= t), 0 at padded targets.
    """
    log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = log_probs.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return picked.masked_fill(attention_mask[:, 1:] == 0, 0.0)
