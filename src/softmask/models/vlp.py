"""The ALBEF-style vision-language model: ViT image encoder, BERT text encoder, cross-attention
fusion encoder, ITC projections, ITM head and a tied MLM head.

Momentum copies and feature queues belong to pretraining and are added there; the encoders and
projections they copy are the four submodules ``visual_encoder``, ``text_encoder`` (with
``fusion_encoder``), ``vision_proj`` and ``text_proj``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from softmask.checkpoint_files import write_safetensors
from softmask.config import TEXT_POOLING, Config, ModelConfig, describe_choices, model_config_from_dict, to_dict
from softmask.models.bert import FusionEncoder, MLMHead, TextEncoder, init_bert_weights
from softmask.models.vit import VisionTransformer
from softmask.runs import SAVED_CONFIG, WEIGHTS_FILE


def pool_text(text_embeds: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, T, D) tokens, (B, T) mask -> (B, D): the [CLS] token ("cls") or the masked mean ("mean")."""
    if pooling == "cls":
        return text_embeds[:, 0]
    if pooling == "mean":
        weights = attention_mask.to(text_embeds.dtype).unsqueeze(-1)
        return (text_embeds * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    raise ValueError(f"text pooling must be {describe_choices(TEXT_POOLING)}, got '{pooling}'")


def summarise_fused(fused: torch.Tensor, attention_mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """(B, T, D) fused tokens -> (B, D): the fused [CLS] ("cls", ALBEF) or the mean over the caption's
    tokens ("mean"; needs the (B, T) ``attention_mask``)."""
    if pooling == "mean" and attention_mask is None:
        raise ValueError("model.fused_pooling is 'mean': pass the attention mask of the fused tokens")
    return pool_text(fused, attention_mask, pooling)


class VisionLanguageModel(nn.Module):
    """Encoders, fusion and heads. Shapes: B batch, T text tokens, N image patches, D widths."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        text_width, image_width = cfg.text.hidden_size, cfg.vision.width
        self.visual_encoder = VisionTransformer(cfg.vision)
        self.text_encoder = TextEncoder(cfg.text)
        self.fusion_encoder = FusionEncoder(cfg.text, image_width)
        self.vision_proj = nn.Linear(image_width, cfg.embed_dim)
        self.text_proj = nn.Linear(text_width, cfg.embed_dim)
        self.itm_head = nn.Linear(text_width, 2)
        self.mlm_head = MLMHead(cfg.text)
        self.temp = nn.Parameter(torch.tensor(float(cfg.temp)))
        init_bert_weights(nn.ModuleList([self.vision_proj, self.text_proj, self.itm_head]))

    # ---- encoders ---------------------------------------------------------------------------

    def encode_image(self, pixels: torch.Tensor, patch_scale: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels -> (B, 1 + N, Dv) tokens after the final LayerNorm.
        ``patch_scale`` (B, N), optional, multiplies the patch embeddings at the input."""
        return self.visual_encoder(pixels, patch_scale)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids and (B, T) mask (1 = token, 0 = padding) -> (B, T, D), the output of the
        last text layer (BERT layer ``fusion_layer - 1``)."""
        return self.text_encoder(input_ids, attention_mask)

    def fuse(self, text_embeds: torch.Tensor, attention_mask: torch.Tensor, image_embeds: torch.Tensor,
             attention_layer: int | None = None, image_index: torch.Tensor | None = None
             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Run the fusion encoder.

        Args:
            text_embeds: (B, T, D) from :meth:`encode_text`.
            attention_mask: (B, T), 1 = token, 0 = padding.
            image_embeds: (B, 1 + N, Dv) from :meth:`encode_image`.
            attention_layer: a fusion-layer index (0-based within the fusion encoder: 2 is the third
                fusion layer, BERT layer ``fusion_layer + 2``) whose cross-attention to return.
            image_index: (B,), optional: then ``image_embeds`` holds U distinct images (U, 1 + N, Dv)
                and row b fuses with image ``image_index[b]`` (keys/values projected once per image).

        Returns:
            fused (B, T, D); with ``attention_layer`` given, the pair (fused, probs) where probs is
            that layer's cross-attention (B, heads, T, 1 + N) after softmax, inside the autograd graph.
        """
        fused, probs = self.fusion_encoder(text_embeds, attention_mask, image_embeds, attention_layer, image_index)
        return fused if attention_layer is None else (fused, probs)

    # ---- heads --------------------------------------------------------------------------------

    def fused_summary(self, fused: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, D) fused tokens -> (B, D): the fused [CLS] (``config.fused_pooling`` "cls", ALBEF), or the
        mean over the caption's tokens ("mean"; needs the (B, T) ``attention_mask``)."""
        return summarise_fused(fused, attention_mask, self.config.fused_pooling)

    def itm_logits(self, fused: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, D) fused tokens [and their (B, T) mask] -> (B, 2) [no-match, match] logits from
        :meth:`fused_summary`."""
        return self.itm_head(self.fused_summary(fused, attention_mask))

    def mlm_logits(self, fused: torch.Tensor) -> torch.Tensor:
        """(B, T, D) fused tokens -> (B, T, vocab) logits; decoder tied to the word embeddings."""
        return self.mlm_head(fused, self.text_encoder.embeddings.word_embeddings.weight)

    def image_feat(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """(B, 1 + N, Dv) -> (B, embed_dim) L2-normalised ITC feature of the image [CLS]."""
        return F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)

    def text_feat(self, text_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, D) text tokens and (B, T) mask (1 = token) -> (B, embed_dim) L2-normalised ITC feature:
        of the [CLS] token, or of the mean over the caption's tokens ([CLS] and [SEP] included, padding
        not) when ``config.text_pooling`` is "mean"."""
        return F.normalize(self.text_proj(pool_text(text_embeds, attention_mask, self.config.text_pooling)), dim=-1)

    # ---- persistence --------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.yaml`` (the model section) and ``model.safetensors`` into ``directory``."""
        return save_model_folder(self, self.config, directory)


def save_model_folder(module: nn.Module, config: ModelConfig, directory: str | Path, task: str = "") -> Path:
    """Write a saved model folder: ``config.yaml`` (``task`` when given, and the model section with its
    ``init`` fields cleared, as the weights are all in the folder: re-loading must not apply the init
    checkpoints again) and ``module``'s state as ``model.safetensors`` (written to a temporary file,
    then renamed, so an interrupted save leaves no half file)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    section = to_dict(config)
    section["init"] = section["vision"]["init"] = section["text"]["init"] = ""
    saved = {"task": task, "model": section} if task else {"model": section}
    (directory / SAVED_CONFIG).write_text(yaml.safe_dump(saved, sort_keys=False))
    write_safetensors(module.state_dict(), directory / WEIGHTS_FILE, **({"task": task} if task else {}))
    return directory


def freeze_modules(model: nn.Module, names: tuple[str, ...]) -> None:
    """Turn off the gradient of ``model``'s named submodules or parameters (kept in the model and its
    saved weights), e.g. the heads a task never uses, which DDP would otherwise reject."""
    for name in names:
        getattr(model, name).requires_grad_(False)


def create_model(cfg: Config | ModelConfig, load_weights: bool = True) -> VisionLanguageModel:
    """Build the model from a config (the whole config or its ``model`` section) and load the
    checkpoints named by ``vision.init``, ``text.init`` and ``init``, in that order."""
    model_cfg = cfg.model if isinstance(cfg, Config) else cfg
    if not isinstance(model_cfg, ModelConfig):
        raise TypeError(f"create_model takes a Config or ModelConfig, got {type(cfg).__name__}")
    model = VisionLanguageModel(model_cfg)
    if load_weights:
        from softmask.models.loading import load_init_checkpoints

        load_init_checkpoints(model)
    return model


def from_pretrained(directory: str | Path) -> VisionLanguageModel:
    """Read a folder written by :meth:`VisionLanguageModel.save_pretrained`."""
    from softmask.models.loading import load_softmask_folder

    directory = Path(directory)
    config_path = directory / SAVED_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory}: no {SAVED_CONFIG}; not a folder written by save_pretrained")
    data = yaml.safe_load(config_path.read_text()) or {}
    cfg = model_config_from_dict(data.get("model", data), where=f"{config_path}: model")
    model = VisionLanguageModel(cfg)
    load_softmask_folder(model, directory, strict=True)
    return model
