"""Every set of choices a config setting takes, declared once as a ``Literal`` type: the schema's
annotations (:mod:`softmask.config.schema` checks values against them), and the tuples of values that
the command line's ``choices`` and the evaluators use."""

from __future__ import annotations

import typing
from typing import Any, Literal

Method = Literal["albef", "softmask"]
VisionStem = Literal["patch", "conv"]  # model.vision.stem
InitLayers = Literal["all", "first"]  # model.text.init_layers
Pooling = Literal["cls", "mean"]  # model.text_pooling, model.fused_pooling
BadSamplePolicy = Literal["skip", "raise"]  # data.on_bad_sample
Precision = Literal["fp32", "bf16", "fp16"]  # train.precision
FocalTerms = Literal["all", "positive"]  # itc.focal
NegativesFrom = Literal["global", "local"]  # itm.negatives
MapSource = Literal["gradcam", "attention"]  # softmask.mask_source; `softmask gradcam --source`, explore
SoftMaskTarget = Literal["features", "patch_embeddings"]  # softmask.apply_to
MaskedPairs = Literal["positives", "negative_captions", "all"]  # softmask.masked_pairs
MaskedLoss = Literal["pooled", "added"]  # softmask.masked_loss
FinetuneTask = Literal["retrieval", "ve", "vqa", "nlvr2"]  # `softmask finetune/evaluate TASK`
NotSet = Literal[""]
NLVR2Stage = Literal["text_assignment", "finetune"]  # finetune.stage
RetrievalScore = Literal["itm", "itm+itc"]  # finetune.score
AnswerRanking = Literal["albef", "sequence"]  # finetune.answer_ranking (VQA)
# finetune.vqa_rules and `softmask score vqa --rules`: the official VQA evaluator's versions (the first: the default)
VQARules = Literal["2021", "2017"]
EvalSplit = Literal["val", "test"]  # finetune.eval_splits, `softmask evaluate --split`
# ALBEF's RandAugment operations, by name (softmask.data.transforms implements them in this order).
RandAugOperation = Literal["identity", "auto_contrast", "equalize", "brightness", "sharpness", "shear_x", "shear_y",
                           "translate_x", "translate_y", "rotate"]


def choices(tp: Any) -> tuple[str, ...]:
    """The values a ``Literal`` type (or a union of them) allows, in their declared order."""
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    return tuple(value for part in typing.get_args(tp) for value in choices(part))


def describe_choices(values: tuple[str, ...]) -> str:
    """``one of a, b, c`` for a message (the empty choice, "not set", left out)."""
    return "one of " + ", ".join(value for value in values if value)


METHODS = choices(Method)
FINETUNE_TASKS = choices(FinetuneTask)
TEXT_POOLING = choices(Pooling)
RANDAUG_OPERATIONS = choices(RandAugOperation)
MAP_SOURCES = choices(MapSource)
VQA_RULES = choices(VQARules)
ANSWER_RANKINGS = choices(AnswerRanking)
RETRIEVAL_SCORES = choices(RetrievalScore)
FOCAL_TERMS = choices(FocalTerms)
EVAL_SPLITS = choices(EvalSplit)
BAD_SAMPLE_POLICIES = choices(BadSamplePolicy)
