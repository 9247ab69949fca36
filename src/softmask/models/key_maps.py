"""Key-name mapping rules from other projects' checkpoints to softmask's parameter names.

A rule takes a source key and returns ``(target key, part)`` (``part`` is the index of a piece that is
concatenated into a fused tensor, e.g. query/key/value into ``qkv``; None for a whole tensor),
:class:`Ignore` with the reason for a known tensor softmask does not use, or None for a key it does
not understand. Key names are facts of the formats (timm/DeiT, Hugging Face ViT/DeiT/BERT, ALBEF/TCL).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

Target = tuple[str, int | None]


@dataclass(frozen=True)
class Ignore:
    reason: str


def strip_prefix(key: str, prefixes: tuple[str, ...]) -> str:
    """``key`` without the first of ``prefixes`` it starts with."""
    for prefix in prefixes:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


_PARAM = r"(?P<p>weight|bias)"


def vit_rule(prefix: str) -> Callable[[str], Target | Ignore | None]:
    """timm/DeiT names (also ALBEF's ``visual_encoder.*``) -> ``{prefix}`` + the same name."""
    keep = re.compile(r"(cls_token|pos_embed|patch_embed\.proj\.(weight|bias)|patch_embed\.stem\.\d+\.(weight|bias)|"
                      r"norm\.(weight|bias)|"
                      r"blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias))$")

    def rule(key: str) -> Target | Ignore | None:
        if keep.fullmatch(key):
            return prefix + key, None
        if key == "dist_token":
            return Ignore("DeiT distillation token (dropped with its position embedding)")
        if re.match(r"(head|head_dist|fc_norm|pre_logits)\.", key):
            return Ignore("ImageNet classifier head")
        return None

    return rule


def _layer_target(table: list[tuple[str, str, int | None]], rest: str, stack: str) -> Target | None:
    """Map the part of a key after its layer index by a (pattern, target, part) table; the stack is
    the target layer's prefix, e.g. ``visual_encoder.blocks.3``."""
    for pattern, target, part in table:
        match = re.fullmatch(pattern, rest)
        if match:
            return f"{stack}.{target}.{match['p']}", part
    return None


_HF_VIT_LAYER = [
    (r"attention\.attention\.query\." + _PARAM, "attn.qkv", 0),
    (r"attention\.attention\.key\." + _PARAM, "attn.qkv", 1),
    (r"attention\.attention\.value\." + _PARAM, "attn.qkv", 2),
    (r"attention\.q_proj\." + _PARAM, "attn.qkv", 0),  # transformers >= 5 module names
    (r"attention\.k_proj\." + _PARAM, "attn.qkv", 1),
    (r"attention\.v_proj\." + _PARAM, "attn.qkv", 2),
    (r"attention\.output\.dense\." + _PARAM, "attn.proj", None),
    (r"attention\.o_proj\." + _PARAM, "attn.proj", None),
    (r"intermediate\.dense\." + _PARAM, "mlp.fc1", None),
    (r"output\.dense\." + _PARAM, "mlp.fc2", None),
    (r"mlp\.fc1\." + _PARAM, "mlp.fc1", None),
    (r"mlp\.fc2\." + _PARAM, "mlp.fc2", None),
    (r"layernorm_before\." + _PARAM, "norm1", None),
    (r"layernorm_after\." + _PARAM, "norm2", None),
]


def hf_vit_rule(prefix: str) -> Callable[[str], Target | Ignore | None]:
    """Hugging Face ViT/DeiT names (optionally under ``vit.``/``deit.``) -> our ViT."""

    def rule(key: str) -> Target | Ignore | None:
        key = strip_prefix(key, ("vit.", "deit."))
        simple = {
            "embeddings.cls_token": "cls_token",
            "embeddings.position_embeddings": "pos_embed",
            "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
            "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
            "layernorm.weight": "norm.weight",
            "layernorm.bias": "norm.bias",
        }
        if key in simple:
            return prefix + simple[key], None
        if key == "embeddings.distillation_token":
            return Ignore("DeiT distillation token (dropped with its position embedding)")
        if key == "embeddings.mask_token":
            return Ignore("masked-image-modelling token")
        if re.match(r"(pooler|classifier|cls_classifier|distillation_classifier)\.", key):
            return Ignore("pooler / classifier head")
        m = re.fullmatch(r"(?:encoder\.layer|layers)\.(?P<i>\d+)\.(?P<rest>.+)", key)
        if m:
            return _layer_target(_HF_VIT_LAYER, m["rest"], f"{prefix}blocks.{m['i']}")
        return None

    return rule


_BERT_LAYER = [
    (r"attention\.self\.query\." + _PARAM, "attn.qkv", 0),
    (r"attention\.self\.key\." + _PARAM, "attn.qkv", 1),
    (r"attention\.self\.value\." + _PARAM, "attn.qkv", 2),
    (r"attention\.output\.dense\." + _PARAM, "attn.out", None),
    (r"attention\.output\.LayerNorm\." + _PARAM, "attn_norm", None),
    (r"crossattention\.self\.query\." + _PARAM, "cross_attn.q", None),
    (r"crossattention\.self\.key\." + _PARAM, "cross_attn.kv", 0),
    (r"crossattention\.self\.value\." + _PARAM, "cross_attn.kv", 1),
    (r"crossattention\.output\.dense\." + _PARAM, "cross_attn.out", None),
    (r"crossattention\.output\.LayerNorm\." + _PARAM, "cross_norm", None),
    (r"intermediate\.dense\." + _PARAM, "ffn.fc1", None),
    (r"output\.dense\." + _PARAM, "ffn.fc2", None),
    (r"output\.LayerNorm\." + _PARAM, "ffn_norm", None),
]

_BERT_SIMPLE = {
    "embeddings.word_embeddings.weight": "text_encoder.embeddings.word_embeddings.weight",
    "embeddings.position_embeddings.weight": "text_encoder.embeddings.position_embeddings.weight",
    "embeddings.token_type_embeddings.weight": "text_encoder.embeddings.token_type_embeddings.weight",
    "embeddings.LayerNorm.weight": "text_encoder.embeddings.norm.weight",
    "embeddings.LayerNorm.bias": "text_encoder.embeddings.norm.bias",
    "cls.predictions.transform.dense.weight": "mlm_head.dense.weight",
    "cls.predictions.transform.dense.bias": "mlm_head.dense.bias",
    "cls.predictions.transform.LayerNorm.weight": "mlm_head.norm.weight",
    "cls.predictions.transform.LayerNorm.bias": "mlm_head.norm.bias",
    "cls.predictions.bias": "mlm_head.bias",
    "cls.predictions.decoder.bias": "mlm_head.bias",
}


def bert_rule(fusion_layer: int, keep_layers: int | None = None) -> Callable[[str], Target | Ignore | None]:
    """Hugging Face BERT names (optionally under ``bert.``; ALBEF's ``crossattention`` included).
    ``keep_layers``: layers from this index on are ignored (``model.text.init_layers=first``)."""

    def rule(key: str) -> Target | Ignore | None:
        key = strip_prefix(key, ("bert.",))
        if key in _BERT_SIMPLE:
            return _BERT_SIMPLE[key], None
        if key == "embeddings.position_ids":
            return Ignore("position-id buffer")
        if key == "cls.predictions.decoder.weight":
            return Ignore("MLM decoder, tied to the word embeddings")
        if key.startswith("pooler."):
            return Ignore("BERT pooler, not used")
        if key.startswith("cls.seq_relationship."):
            return Ignore("next-sentence-prediction head")
        m = re.fullmatch(r"encoder\.layer\.(?P<i>\d+)\.(?P<rest>.+)", key)
        if m:
            i = int(m["i"])
            if keep_layers is not None and i >= keep_layers:
                return Ignore("beyond model.text.num_layers (model.text.init_layers=first)")
            stack = f"text_encoder.layers.{i}" if i < fusion_layer else f"fusion_encoder.layers.{i - fusion_layer}"
            return _layer_target(_BERT_LAYER, m["rest"], stack)
        return None

    return rule


_ALBEF_MOMENTUM = re.compile(r"(visual_encoder_m|text_encoder_m|vision_proj_m|text_proj_m)\.")
_ALBEF_QUEUES = {"image_queue", "text_queue", "queue_ptr", "idx_queue"}


def albef_rule(fusion_layer: int) -> Callable[[str], Target | Ignore | None]:
    vit, bert = vit_rule("visual_encoder."), bert_rule(fusion_layer)
    heads = re.compile(r"(vision_proj|text_proj|itm_head)\.(weight|bias)|temp")

    def rule(key: str) -> Target | Ignore | None:
        if key.startswith("visual_encoder."):
            return vit(key[len("visual_encoder."):])
        if key.startswith("text_encoder."):
            return bert(key[len("text_encoder."):])
        if heads.fullmatch(key):
            return key, None
        if _ALBEF_MOMENTUM.match(key) or key in _ALBEF_QUEUES:
            return Ignore("momentum copy / feature queue, not part of the model (pretraining continues from them)")
        return None

    return rule


def albef_paired_rule(fusion_layer: int) -> Callable[[str], Target | Ignore | None]:
    """ALBEF's NLVR2 checkpoints: their BERT has two layers per fusion layer, ``fusion_layer + 2i``
    (attending to image 1) and ``fusion_layer + 2i + 1`` (image 2), which become our
    ``fusion_encoder.layers.{i}.first`` and ``.second``; the second's cross-attention key/value is
    tied to the first's (one tensor here). Everything else as :func:`albef_rule`."""
    single = albef_rule(fusion_layer)
    fusion_key = re.compile(r"text_encoder\.(?:bert\.)?encoder\.layer\.(?P<j>\d+)\.(?P<rest>.+)")

    def rule(key: str) -> Target | Ignore | None:
        m = fusion_key.fullmatch(key)
        if m is None or int(m["j"]) < fusion_layer:
            return single(key)
        i, second = divmod(int(m["j"]) - fusion_layer, 2)
        if second and re.match(r"crossattention\.self\.(key|value)\.", m["rest"]):
            return Ignore("the second block's cross-attention key/value, tied to the first block's")
        return _layer_target(_BERT_LAYER, m["rest"], f"fusion_encoder.layers.{i}.{'second' if second else 'first'}")

    return rule
