"""Visual question answering (VQA 2.0 + Visual Genome QA), ALBEF's way: an answer decoder generates
the answer from the fused question-image states.

- **Model** (:class:`VQAModel`): the pretrained backbone encodes the image and the question and fuses
  them; an :class:`~softmask.models.answer_decoder.AnswerDecoder` initialised from the fusion layers
  decodes ``[CLS] answer [SEP]``.
- **Training** (:class:`VQAObjective`): every distinct human answer of a question is a target; its loss is
  the decoder's summed token NLL weighted by the answer's share of the human answers (count / total;
  ALBEF gives a Visual Genome question's single answer the weight :data:`VG_ANSWER_WEIGHT`), summed
  per question and averaged over questions. With ``distill.alpha > 0`` the targets are mixed with a
  momentum decoder's predictions (ALBEF's momentum distillation; alpha ramped over the first epoch).
- **Inference** (:func:`rank_answers`): the decoder's first step scores the first token of every
  answer of ``finetune.answer_list``; the ``finetune.answer_candidates`` best answers are scored whole
  and the best one is the answer. ``finetune.answer_ranking``: ``albef`` (the default) scores an answer
  as ALBEF does, its log-likelihood plus its first token's log-probability a second time;
  ``sequence`` by its log-likelihood alone.
- **Evaluation**: VQA accuracy with the official evaluator's rules (:func:`vqa_metrics`, from
  :mod:`softmask.eval.vqa_official`), overall and per answer type; results written as
  ``vqa_{split}_results.json`` in the evaluation server's format. Test records may lack answers.

Record format (ALBEF's): ``{"question_id", "question", "answer": [str, ...] or str, "image",
"dataset": "vqa" | "vg"}``; ``type`` or ``answer_type`` (optional) gives per-type accuracies.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from softmask.config import ANSWER_RANKINGS, Config, ConfigError
from softmask.data.annotations import AnnotationError, Field, _read_json, _type_name, load_records
from softmask.data.dataset import TaskDataset, eval_loader, train_loader
from softmask.data.text import load_tokenizer, open_tokenizer, tokenize
from softmask.data.transforms import EvalTransform, training_transform
from softmask.eval.vqa_official import question_accuracy
from softmask.models.answer_decoder import AnswerDecoder, build_answer_decoder, token_log_probs
from softmask.models.key_maps import Ignore, bert_rule
from softmask.tasks.finetune import TaskModel
from softmask.tasks.momentum import DistilledObjective
from softmask.train import dist
from softmask.train.loop import inference_autocast
from softmask.train.schedule import alpha_warmup_steps

log = logging.getLogger("softmask")

VG_ANSWER_WEIGHT = 0.5  # ALBEF: the one answer of a Visual Genome question weighs 0.5 (a VQA question's sum to 1)
RANK_CHUNK = 256  # answer sequences scored per decoder pass at inference (bounds the (n, L, vocab) logits)


# --------------------------------------------------------------------------------------------------
# Accuracy
# --------------------------------------------------------------------------------------------------


def _slug(value: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", value.lower()).strip("_") or "none"


def vqa_metrics(rows: list[dict], rules: str = "2021") -> dict:
    """Metrics in % of rows ``{"prediction", "answers": [str] | None, "qtype": str | None}``, with the
    official evaluator's ``rules`` (``"2021"`` or ``"2017"``; :mod:`softmask.eval.vqa_official`: answer
    normalisation, 10-choose-9): ``acc`` over the questions with human answers, ``acc_<type>`` per answer
    type (the record's ``answer_type`` or ``type``), the counts ``questions`` and ``scored``, and
    ``rules``. Accuracies are left out when no row has human answers (a test split). ``softmask score
    vqa --rules`` gives the same ``acc`` from the results file and the official question and annotation
    files."""
    scored = [(row, question_accuracy(row["prediction"], row["answers"], rules)) for row in rows if row["answers"]]
    metrics: dict = {}
    if scored:
        metrics["acc"] = 100.0 * sum(acc for _, acc in scored) / len(scored)
        for qtype in sorted({r["qtype"] for r, _ in scored if r["qtype"]}):
            group = [acc for r, acc in scored if r["qtype"] == qtype]
            metrics[f"acc_{_slug(qtype)}"] = 100.0 * sum(group) / len(group)
    metrics["questions"] = len(rows)
    metrics["scored"] = len(scored)
    metrics["rules"] = rules
    return metrics


# --------------------------------------------------------------------------------------------------
# Records, answers and their weights
# --------------------------------------------------------------------------------------------------


def _answer_problem(value: object) -> str | None:
    """None when ``value`` is a non-empty answer string or a non-empty list of them, else the problem."""
    answers = [value] if isinstance(value, str) else value
    if not isinstance(answers, list) or not answers:
        return f"must be a non-empty list of answer strings (or one string), got {value!r}"
    bad = [a for a in answers if not isinstance(a, str) or not a.strip()]
    if bad:
        return f"must hold non-empty answer strings, got {bad[0]!r} ({_type_name(bad[0])})"
    return None


def _question_problem(value: object) -> str | None:
    return None if str(value).strip() else "is empty"


QUESTION = Field("question", (str,), _question_problem)
TRAIN_FIELDS = (QUESTION, Field("answer", (list, str), _answer_problem))
EVAL_FIELDS = (QUESTION, Field("question_id", (int, str)))


def check_optional_answers(records: list[dict]) -> None:
    """Eval records may lack ``answer`` (VQA's test split); one that has it must be well formed."""
    for record in records:
        if "answer" in record:
            problem = _answer_problem(record["answer"])
            if problem:
                raise AnnotationError(f"{record['_source']}: 'answer' {problem}")


def human_answers(record: dict) -> list[str] | None:
    """The record's human answers as a list of stripped strings (None when it has none)."""
    value = record.get("answer")
    if value is None:
        return None
    return [a.strip() for a in ([value] if isinstance(value, str) else value)]


def answer_weights(answers: list[str], dataset: str = "vqa") -> tuple[list[str], list[float]]:
    """Distinct answers (first-seen order) and their weights: count / total (ALBEF), times
    :data:`VG_ANSWER_WEIGHT` for a Visual Genome record (``dataset == "vg"``)."""
    counts = Counter(answers)
    scale = VG_ANSWER_WEIGHT if dataset == "vg" else 1.0
    distinct = list(counts)
    return distinct, [scale * counts[a] / len(answers) for a in distinct]


def _train_extras(record: dict) -> dict:
    answers, weights = answer_weights(human_answers(record), str(record.get("dataset", "vqa")))
    return {"answers": answers, "weights": weights}


def _eval_extras(record: dict) -> dict:
    qtype = record.get("answer_type", record.get("type"))
    return {"question_id": record["question_id"], "answers": human_answers(record),
            "qtype": qtype if isinstance(qtype, str) else None}


def load_eval_records(cfg: Config, split: str) -> list[dict]:
    """The checked records of ``finetune.<split>`` (``answer`` optional)."""
    records = load_records(getattr(cfg.finetune, split), cfg.data.image_root, EVAL_FIELDS,
                                key=f"finetune.{split}")
    check_optional_answers(records)
    return records


# --------------------------------------------------------------------------------------------------
# The answer list
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnswerList:
    """Candidate answers and their ``[CLS] answer [SEP]`` tokens: ids and mask (A, L), padded."""

    answers: list[str]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


def read_answer_list(path: str) -> list[str]:
    """A JSON list of non-empty answer strings; AnnotationError naming the file and the entry."""
    if not path:
        raise ConfigError("finetune.answer_list is not set (a JSON list of candidate answers; `world=DIR` fills it)")
    data = _read_json(path)
    if not isinstance(data, list) or not data:
        raise AnnotationError(f"{path}: must be a non-empty JSON list of answer strings, got {_type_name(data)}")
    for index, answer in enumerate(data):
        if not isinstance(answer, str) or not answer.strip():
            raise AnnotationError(f"{path}: entry {index} must be a non-empty answer string, got {answer!r}")
    return [a.strip() for a in data]


@functools.lru_cache(maxsize=4)
def _cached_answer_list(path: str, mtime: float, tokenizer: str, max_tokens: int) -> AnswerList:
    answers = read_answer_list(path)
    ids, mask = open_tokenizer(tokenizer, max_tokens).encode(answers)
    return AnswerList(answers, ids, mask)


def load_answer_list(cfg: Config) -> AnswerList:
    """``finetune.answer_list`` read and tokenised once (cached while the file is unchanged)."""
    path = cfg.finetune.answer_list
    mtime = os.path.getmtime(path) if path and os.path.exists(path) else 0.0
    return _cached_answer_list(path, mtime, cfg.data.tokenizer, cfg.finetune.max_answer_tokens)


# --------------------------------------------------------------------------------------------------
# Losses and ranking (pure functions of logits / a decoder)
# --------------------------------------------------------------------------------------------------


def sequence_nll(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 teacher_logits: torch.Tensor | None = None, alpha: float = 0.0) -> torch.Tensor:
    """Per-answer loss summed over its tokens after [CLS] ([SEP] included).

    Args:
        logits: (N, L, V) decoder logits (position t scores token t + 1).
        input_ids, attention_mask: (N, L) the answers ``[CLS] answer [SEP]``, padded.
        teacher_logits: (N, L, V), optional: a momentum decoder's logits; each token's loss is then
            ``(1 - alpha) * NLL + alpha * CE(softmax(teacher), prediction)`` (ALBEF's distillation).
        alpha: the teacher's weight.

    Returns:
        (N,) summed token losses.
    """
    nll = -token_log_probs(logits, input_ids, attention_mask).sum(1)
    if teacher_logits is None or alpha == 0.0:
        return nll
    soft = F.softmax(teacher_logits[:, :-1].float(), dim=-1)
    cross = -(soft * F.log_softmax(logits[:, :-1].float(), dim=-1)).sum(-1)  # (N, L - 1)
    cross = cross.masked_fill(attention_mask[:, 1:] == 0, 0.0).sum(1)
    return (1.0 - alpha) * nll + alpha * cross


def weighted_question_loss(answer_losses: torch.Tensor, weights: torch.Tensor, num_questions: int) -> torch.Tensor:
    """sum_n weight_n * loss_n / num_questions: each question's weighted answer losses summed, then
    averaged over questions. ``answer_losses`` and ``weights`` are (N,) over all answers of the batch."""
    return (answer_losses * weights.to(answer_losses.dtype)).sum() / max(1, num_questions)


def flatten_answers(answers: list[list[str]], weights: list[list[float]]) -> tuple[list[str], torch.Tensor,
                                                                                    torch.Tensor]:
    """Per-question answer lists -> all answers (N), their weights (N,) and question index (N,) long."""
    flat = [a for group in answers for a in group]
    flat_weights = torch.tensor([w for group in weights for w in group], dtype=torch.float32)
    index = torch.tensor([q for q, group in enumerate(answers) for _ in group], dtype=torch.long)
    return flat, flat_weights, index


@torch.no_grad()
def rank_answers(decoder, states: torch.Tensor, states_mask: torch.Tensor, answer_ids: torch.Tensor,
                 answer_mask: torch.Tensor, k: int, chunk: int = RANK_CHUNK, ranking: str = "albef"
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ALBEF's answer ranking: shortlist by the first token, then score the shortlisted answers whole.

    Args:
        decoder: ``decoder(ids (n, L), mask (n, L), states, states_mask, states_index=None)`` ->
            logits (n, L, V) (an :class:`AnswerDecoder`).
        states: (B, Q, D) fused question tokens; states_mask: (B, Q), 1 = token.
        answer_ids, answer_mask: (A, L) every candidate answer as ``[CLS] answer [SEP]``, padded.
        k: answers shortlisted per question by the log-probability of their first token (at most A).
        chunk: answer sequences per decoder pass in the second step.
        ranking: ``"sequence"``: a shortlisted answer's score is its log-likelihood (each token once,
            [SEP] included); ``"albef"``: ALBEF's formula, that log-likelihood plus the first token's
            log-probability once more (ALBEF adds the shortlist step's first-token term to a loss that
            already holds it), which can change the chosen answer.

    Returns:
        best (B,) the index of the chosen answer; shortlist (B, k) answer indices; scores (B, k) their
        scores under ``ranking``.
    """
    if ranking not in ANSWER_RANKINGS:
        raise ValueError(f"ranking must be {' or '.join(map(repr, ANSWER_RANKINGS))}, got {ranking!r}")
    b, device = states.shape[0], states.device
    answer_ids, answer_mask = answer_ids.to(device), answer_mask.to(device)
    k = min(k, answer_ids.shape[0])
    start = answer_ids[:1, :1].expand(b, 1)  # [CLS], the start token
    first = decoder(start, torch.ones_like(start), states, states_mask)[:, 0]  # (B, V)
    first_lp = F.log_softmax(first.float(), dim=-1)[:, answer_ids[:, 1]]  # (B, A)
    top_lp, shortlist = first_lp.topk(k, dim=1)  # (B, k)
    ids, mask = answer_ids[shortlist.reshape(-1)], answer_mask[shortlist.reshape(-1)]  # (B k, L)
    length = int(mask.sum(1).max())
    ids, mask = ids[:, :length], mask[:, :length]
    question = torch.arange(b, device=device).repeat_interleave(k)
    first_kept = 0 if ranking == "albef" else 1  # albef: the first token's term once more
    rest = []
    for s in range(0, ids.shape[0], chunk):
        part = slice(s, s + chunk)
        logits = decoder(ids[part], mask[part], states, states_mask, question[part])
        rest.append(token_log_probs(logits, ids[part], mask[part])[:, first_kept:].sum(1))
    scores = top_lp + torch.cat(rest).view(b, k)
    best = shortlist.gather(1, scores.argmax(1, keepdim=True)).squeeze(1)
    return best, shortlist, scores


# --------------------------------------------------------------------------------------------------
# Model and training objective
# --------------------------------------------------------------------------------------------------


class VQAModel(TaskModel):
    """The backbone and an answer decoder initialised from its fusion layers, text embeddings and MLM
    head. The backbone's ITC projections, ITM and MLM heads and temperature are unused and frozen (so
    that DDP sees no trainable parameter without a gradient)."""

    task_name = "vqa"
    unused_modules = ("vision_proj", "text_proj", "itm_head", "mlm_head")

    def __init__(self, backbone: nn.Module):
        super().__init__(backbone)
        self.decoder, self.decoder_left_random = build_answer_decoder(backbone)
        self.freeze_unused()  # after the decoder is copied from the MLM head: the copy stays trainable

    def albef_head_rule(self, key: str):
        """ALBEF's answer decoder (``text_decoder.*``: a BertLMHeadModel whose every layer cross-attends to
        the fused question) -> ``decoder.*``; its momentum copy is skipped."""
        if key.startswith("text_decoder_m."):
            return Ignore("momentum copy of the answer decoder (used by distillation in fine-tuning only)")
        if not key.startswith("text_decoder."):
            return None
        target = bert_rule(0)(key[len("text_decoder."):])  # fusion_layer 0: every layer cross-attends
        if not isinstance(target, tuple):
            return target
        name, part = target
        for ours, theirs in (("text_encoder.embeddings.", "decoder.embeddings."),
                             ("fusion_encoder.layers.", "decoder.layers."), ("mlm_head.", "decoder.head.")):
            if name.startswith(ours):
                return theirs + name[len(ours):], part
        return None

    def fit_albef_checkpoint(self, state: dict[str, torch.Tensor]) -> None:
        """The decoder takes the file's depth (ALBEF's has 6 layers whatever the fusion encoder's)."""
        depth = len({int(m[1]) for k in state if (m := re.match(r"text_decoder\.bert\.encoder\.layer\.(\d+)\.", k))})
        if depth and depth != len(self.decoder.layers):
            self.decoder = AnswerDecoder(self.config.text, num_layers=depth)

    def encode_questions(self, pixels: torch.Tensor, input_ids: torch.Tensor,
                         attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels and (B, T) question ids/mask -> (B, T, D) fused question tokens."""
        bb = self.backbone
        return bb.fuse(bb.encode_text(input_ids, attention_mask), attention_mask, bb.encode_image(pixels))

    @torch.no_grad()
    def predict(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                answers: AnswerList, k: int, ranking: str = "albef") -> torch.Tensor:
        """(B,) indices into ``answers.answers`` of the chosen answers (:func:`rank_answers`)."""
        states = self.encode_questions(pixels, input_ids, attention_mask)
        best, _, _ = rank_answers(self.decoder, states, attention_mask, answers.input_ids,
                                  answers.attention_mask, k, ranking=ranking)
        return best


class VQAObjective(DistilledObjective):
    """The weighted answer NLL (with optional momentum distillation) around a :class:`VQAModel`."""

    def __init__(self, cfg: Config, model: VQAModel, alpha_warmup_steps: int):
        self.distill = cfg.distill.alpha > 0
        super().__init__(cfg, model, alpha_warmup_steps, momentum=self.distill)
        self.augment = training_transform(cfg.model.vision.image_size, cfg.data.augment)
        self.tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.finetune.max_answer_tokens)

    def forward(self, batch: dict, step: int, micro: int = 0) -> dict[str, torch.Tensor]:
        """One micro-batch: ``images`` uint8 (B, 3, S, S), question ``input_ids``/``attention_mask`` (B, T),
        ``answers``/``weights`` (per question, lists). Returns ``loss`` and the detached parts."""
        model = self.model
        device = model.backbone.temp.device
        ids = batch["input_ids"].to(device, non_blocking=True)
        mask = batch["attention_mask"].to(device, non_blocking=True)
        pixels = self.augment(batch["images"].to(device, non_blocking=True))
        b = ids.shape[0]  # the loop may trim a batch's tensors to a size common to all ranks; not its lists
        answers, weights, question = flatten_answers(batch["answers"][:b], batch["weights"][:b])
        answer_ids, answer_mask = (t.to(device) for t in tokenize(self.tokenizer, answers))
        question = question.to(device)
        alpha = self.alpha(step)

        states = model.encode_questions(pixels, ids, mask)
        logits = model.decoder(answer_ids, answer_mask, states, mask, question)
        teacher = None
        if self.distill:
            with torch.no_grad():
                mm = self.momentum_model
                states_m = mm.encode_questions(pixels, ids, mask)
                teacher = mm.decoder(answer_ids, answer_mask, states_m, mask, question)
        losses = sequence_nll(logits, answer_ids, answer_mask, teacher, alpha)
        loss = weighted_question_loss(losses, weights.to(device), b)
        return {"loss": loss, "loss_vqa": loss.detach(), "alpha": torch.tensor(alpha),
                "answers_per_question": torch.tensor(len(answers) / max(1, b))}


# --------------------------------------------------------------------------------------------------
# The task definition (softmask.tasks.finetune.TaskDefinition)
# --------------------------------------------------------------------------------------------------


def build_model(cfg: Config) -> VQAModel:
    """The backbone with ``model.init`` (and the vision/text inits) loaded, and the answer decoder copied
    from it."""
    from softmask.models.vlp import create_model

    model = VQAModel(create_model(cfg))
    if model.decoder_left_random:
        log.info(f"answer decoder: {len(model.decoder_left_random)} tensors start random (no fusion tensor of "
                 f"that shape): {', '.join(model.decoder_left_random[:4])}"
                 f"{' ...' if len(model.decoder_left_random) > 4 else ''}")
    return model


def build_objective(cfg: Config, model: VQAModel, batches_per_epoch: int | None) -> VQAObjective:
    return VQAObjective(cfg, model, alpha_warmup_steps(cfg, batches_per_epoch))


def build_train_data(cfg: Config, rank: int, world_size: int):
    """Checks the training records, the evaluation splits' records and the answer list (before any
    model is built), and returns the training batches."""
    from softmask.data.sources import LoaderSource

    records = load_records(cfg.finetune.train, cfg.data.image_root, TRAIN_FIELDS)
    splits = [s for s in cfg.finetune.eval_splits if getattr(cfg.finetune, s)]
    for split in splits:
        load_eval_records(cfg, split)
    if splits:
        load_answer_list(cfg)
    dataset = TaskDataset(records, cfg, "question", extras=_train_extras)
    return LoaderSource(*train_loader(cfg, dataset, rank, world_size))


def _as_list(values) -> list:
    return values.tolist() if torch.is_tensor(values) else list(values)


def _result_id(question_id):
    """A question id as the evaluation server wants it: an int when it is one."""
    if isinstance(question_id, str) and question_id.strip().lstrip("-").isdigit():
        return int(question_id)
    return question_id


@torch.no_grad()
def predict_split(cfg: Config, model: VQAModel, split: str) -> tuple[list[dict], int]:
    """Every rank's predictions on ``finetune.<split>``, gathered: rows ``{"index", "question_id",
    "prediction", "answers", "qtype"}`` in record order, and the number of questions skipped (bad images)."""
    records = load_eval_records(cfg, split)
    answers = load_answer_list(cfg)
    dataset = TaskDataset(records, cfg, "question", extras=_eval_extras)
    device = next(model.parameters()).device
    transform = EvalTransform(cfg.model.vision.image_size).to(device)
    model.eval()
    rows, skipped = [], 0
    for batch in eval_loader(cfg, dataset, dist.rank(), dist.world_size()):
        skipped += batch["skipped"]
        if not len(batch["indices"]):
            continue
        pixels = transform(batch["images"].to(device))
        with inference_autocast(cfg.train.precision, device):
            best = model.predict(pixels, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                 answers, cfg.finetune.answer_candidates, cfg.finetune.answer_ranking)
        for i, index in enumerate(_as_list(batch["indices"])):
            rows.append({"index": index, "question_id": _as_list(batch["question_id"])[i],
                         "prediction": answers.answers[int(best[i])], "answers": batch["answers"][i],
                         "qtype": batch["qtype"][i]})
    rows = sorted(dist.gather_objects(rows), key=lambda r: r["index"])
    skipped = int(sum(dist.gather_objects([skipped])))
    return rows, skipped


def write_results(rows: list[dict], path: Path) -> Path:
    """The evaluation server's format: a JSON list of ``{"question_id": int, "answer": str}``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    results = [{"question_id": _result_id(r["question_id"]), "answer": r["prediction"]} for r in rows]
    path.write_text(json.dumps(results))
    return path


def evaluate(cfg: Config, model: VQAModel, split: str, out_dir: Path | None) -> dict:
    """VQA accuracy on ``finetune.<split>`` (omitted when its records have no answers) and, on the main
    process with ``out_dir``, ``out_dir/vqa_{split}_results.json``."""
    rows, skipped = predict_split(cfg, model, split)
    metrics = vqa_metrics(rows, cfg.finetune.vqa_rules)
    if skipped:
        metrics["skipped"] = skipped
    if out_dir is not None and dist.rank() == 0:
        path = write_results(rows, Path(out_dir) / f"vqa_{split}_results.json")
        log.info(f"wrote {path}")
    return metrics


__all__ = ["AnswerList", "VQAModel", "VQAObjective", "answer_weights", "build_model", "build_objective",
           "build_train_data", "evaluate", "flatten_answers", "rank_answers", "read_answer_list", "sequence_nll",
           "vqa_metrics", "weighted_question_loss"]
