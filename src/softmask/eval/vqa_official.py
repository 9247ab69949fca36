"""VQA accuracy with the official evaluator's semantics (the VQA challenge's Python evaluation tools),
in either of its two published versions (``rules``):

* ``"2021"`` (the default): the official repository's current code, since its 2021 fix of how answers
  are processed;
* ``"2017"``: its code as released with VQA v2.0, which most vision-language codebases copy.

What the official evaluation does, rule by rule, and so what this module does:

1. Newlines and tabs in the predicted answer become spaces and its ends are stripped. 2021: the same
   is done to every human answer; 2017: the human answers are used as written.
2. When the ten human answers (after step 1) are not all the same, each goes through
   :func:`strip_punctuation`; 2021 also applies :func:`digits_and_articles` to them. The prediction goes
   through both in 2017 always, in 2021 only when the humans disagree: when all ten agree, 2021 compares
   the prediction as given (so ``"Yes"`` scores 0 against ten ``"yes"``), 2017 compares the normalised
   prediction with the humans' answer as written.
3. For each human answer left out in turn, the accuracy is min(1, humans among the other nine who gave
   the prediction / 3); a question's accuracy is the mean of these ten values (so 3 matching humans
   give 0.9, 4 or more give 1).
4. ``overall`` is the mean over questions; ``perQuestionType`` and ``perAnswerType`` are the means over
   the questions of each type; all in percent, rounded to 2 decimals.

:func:`strip_punctuation` follows the official rules exactly, including two of their quirks: whether a
punctuation mark is deleted or replaced by a space is decided on the original text (deleted when it
touches a space anywhere, or when the text holds a digit-comma-digit group such as ``1,000``), and a
period is deleted unless a digit follows it (``2.5`` keeps its decimal point), at most 32 of them.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from softmask.config import VQA_RULES, ConfigError, describe_choices

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
MAX_PERIODS_REMOVED = 32


def _contractions() -> dict[str, str]:
    """Apostrophe-less spellings -> the contraction (``dont`` -> ``don't``), as the official list has them."""
    pairs = """aint ain't|arent aren't|cant can't|couldve could've|couldnt couldn't|couldn'tve couldn't've|
    couldnt've couldn't've|didnt didn't|doesnt doesn't|dont don't|hadnt hadn't|hadnt've hadn't've|
    hadn'tve hadn't've|hasnt hasn't|havent haven't|hed he'd|hed've he'd've|he'dve he'd've|hes he's|
    howd how'd|howll how'll|hows how's|Id've I'd've|I'dve I'd've|Im I'm|Ive I've|isnt isn't|itd it'd|
    itd've it'd've|it'dve it'd've|itll it'll|let's let's|maam ma'am|mightnt mightn't|mightnt've mightn't've|
    mightn'tve mightn't've|mightve might've|mustnt mustn't|mustve must've|neednt needn't|notve not've|
    oclock o'clock|oughtnt oughtn't|ow's'at 'ow's'at|'ows'at 'ow's'at|'ow'sat 'ow's'at|shant shan't|
    shed've she'd've|she'dve she'd've|she's she's|shouldve should've|shouldnt shouldn't|
    shouldnt've shouldn't've|shouldn'tve shouldn't've|somebody'd somebodyd|somebodyd've somebody'd've|
    somebody'dve somebody'd've|somebodyll somebody'll|somebodys somebody's|someoned someone'd|
    someoned've someone'd've|someone'dve someone'd've|someonell someone'll|someones someone's|
    somethingd something'd|somethingd've something'd've|something'dve something'd've|
    somethingll something'll|thats that's|thered there'd|thered've there'd've|there'dve there'd've|
    therere there're|theres there's|theyd they'd|theyd've they'd've|they'dve they'd've|theyll they'll|
    theyre they're|theyve they've|twas 'twas|wasnt wasn't|wed've we'd've|we'dve we'd've|weve we've|
    werent weren't|whatll what'll|whatre what're|whats what's|whatve what've|whens when's|whered where'd|
    wheres where's|whereve where've|whod who'd|whod've who'd've|who'dve who'd've|wholl who'll|whos who's|
    whove who've|whyll why'll|whyre why're|whys why's|wont won't|wouldve would've|wouldnt wouldn't|
    wouldnt've wouldn't've|wouldn'tve wouldn't've|yall y'all|yall'll y'all'll|y'allll y'all'll|
    yall'd've y'all'd've|y'alld've y'all'd've|y'all'dve y'all'd've|youd you'd|youd've you'd've|
    you'dve you'd've|youll you'll|youre you're|youve you've"""
    return dict(pair.split() for pair in pairs.split("|"))


CONTRACTIONS = _contractions()


def strip_punctuation(text: str) -> str:
    """The official punctuation rule (see the module docstring): each mark of :data:`PUNCTUATION` is deleted
    when it touches a space in ``text`` or ``text`` holds a digit-comma-digit group, else replaced by a
    space; then periods not followed by a digit are deleted (at most 32)."""
    out = text
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in PUNCTUATION:
        if delete_all or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=MAX_PERIODS_REMOVED)


def digits_and_articles(text: str) -> str:
    """Lower-case, split on whitespace, number words to digits (``none`` -> ``0``), articles dropped,
    apostrophe-less contractions restored (``dont`` -> ``don't``), joined by single spaces."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def _whitespace(answer: str) -> str:
    return str(answer).replace("\n", " ").replace("\t", " ").strip()


def normalize_prediction(answer: str) -> str:
    """A predicted answer fully normalised (rules 1 and 2): whitespace, punctuation, digits and articles."""
    return digits_and_articles(strip_punctuation(_whitespace(answer)))


def check_rules(rules: str) -> str:
    if rules not in VQA_RULES:
        raise ValueError(f"VQA scoring rules must be {describe_choices(VQA_RULES)}, got {rules!r}")
    return rules


def question_accuracy(prediction: str, human_answers: Sequence[str], rules: str = "2021") -> float:
    """One question's accuracy in [0, 1] under the official ``rules`` (``"2021"`` or ``"2017"``; module
    docstring, rules 1-3): the mean over the humans of min(1, matches among the others / 3). As in the
    official code, a question with a single human answer scores 0 (no other human)."""
    check_rules(rules)
    humans = [_whitespace(a) if rules == "2021" else str(a) for a in human_answers]
    if not humans:
        raise ValueError("a question needs at least one human answer")
    disagree = len(set(humans)) > 1
    if rules == "2017":
        predicted = normalize_prediction(prediction)
        if disagree:
            humans = [strip_punctuation(answer) for answer in humans]
    elif disagree:
        predicted = normalize_prediction(prediction)
        humans = [digits_and_articles(strip_punctuation(answer)) for answer in humans]
    else:
        predicted = _whitespace(prediction)
    matches = sum(answer == predicted for answer in humans)
    # Leaving out human i removes one match when i gave the prediction.
    return sum(min(1.0, (matches - (answer == predicted)) / 3.0) for answer in humans) / len(humans)


def _percent_mean(values: Sequence[float], digits: int) -> float:
    return round(100.0 * sum(values) / len(values), digits)


def score(predictions: dict[int, str], annotations: dict[int, dict], digits: int = 2, rules: str = "2021") -> dict:
    """The official numbers for predictions of the annotated questions, under ``rules`` (``"2021"`` or
    ``"2017"``, see the module docstring).

    Args:
        predictions: question id -> predicted answer, for exactly the annotated questions.
        annotations: question id -> ``{"answers": [str, ...], "question_type": str, "answer_type": str}``.
        digits: rounding of the percentages (the official evaluation rounds to 2).

    Returns:
        ``{"overall": %, "perQuestionType": {type: %}, "perAnswerType": {type: %}, "questions": n,
        "rules": rules}``.

    Raises:
        ValueError: the predicted and annotated question ids differ, or there is none; unknown rules.
    """
    check_rules(rules)
    missing, extra = set(annotations) - set(predictions), set(predictions) - set(annotations)
    if missing or extra:
        detail = []
        if missing:
            detail.append(f"no answer for {len(missing)} annotated question(s), e.g. {min(missing)}")
        if extra:
            detail.append(f"{len(extra)} answered question(s) not in the annotations, e.g. {min(extra)}")
        raise ValueError("the results do not cover exactly the annotated questions: " + "; ".join(detail))
    if not annotations:
        raise ValueError("no annotated questions")
    per_question, by_qtype, by_atype = [], defaultdict(list), defaultdict(list)
    for qid, ann in annotations.items():
        acc = question_accuracy(predictions[qid], ann["answers"], rules)
        per_question.append(acc)
        by_qtype[ann["question_type"]].append(acc)
        by_atype[ann["answer_type"]].append(acc)
    return {"overall": _percent_mean(per_question, digits),
            "perQuestionType": {k: _percent_mean(v, digits) for k, v in sorted(by_qtype.items())},
            "perAnswerType": {k: _percent_mean(v, digits) for k, v in sorted(by_atype.items())},
            "questions": len(per_question), "rules": rules}


def _read_json(path: str | Path, what: str):
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: not found ({what})")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({what}): {exc}") from None


def read_official_files(results: str | Path, questions: str | Path, annotations: str | Path
                        ) -> tuple[dict[int, str], dict[int, dict]]:
    """(predictions, annotations) for :func:`score` from the official files: a results file in the
    evaluation server's format (``[{"question_id", "answer"}]``), a questions file (``{"questions":
    [{"question_id", ...}]}``) and an annotations file (``{"annotations": [{"question_id", "answers":
    [{"answer", ...}], "question_type", "answer_type", ...}]}``).

    Raises:
        ConfigError: a missing or malformed file, naming it, the record and the problem; a results file
            with a question twice, or one the questions file does not hold.
    """
    res = _read_json(results, "a results file: a JSON list of {question_id, answer}")
    if not isinstance(res, list):
        raise ConfigError(f"{results}: must be a JSON list of {{question_id, answer}} objects")
    predictions: dict[int, str] = {}
    for i, item in enumerate(res):
        if not isinstance(item, dict) or "question_id" not in item or not isinstance(item.get("answer"), str):
            raise ConfigError(f"{results}: record {i} must be an object with question_id and a string answer, "
                              f"got {str(item)[:80]}")
        if item["question_id"] in predictions:
            raise ConfigError(f"{results}: question {item['question_id']} is answered twice (record {i})")
        predictions[item["question_id"]] = item["answer"]
    qs = _read_json(questions, "a VQA questions file")
    if not isinstance(qs, dict) or not isinstance(qs.get("questions"), list):
        raise ConfigError(f"{questions}: must be an object with a 'questions' list (a VQA questions file)")
    question_ids = {q.get("question_id") for q in qs["questions"] if isinstance(q, dict)}
    anns = _read_json(annotations, "a VQA annotations file")
    if not isinstance(anns, dict) or not isinstance(anns.get("annotations"), list):
        raise ConfigError(f"{annotations}: must be an object with an 'annotations' list (a VQA annotations file)")
    table: dict[int, dict] = {}
    for i, ann in enumerate(anns["annotations"]):
        where = f"{annotations}: annotation {i}"
        if not isinstance(ann, dict):
            raise ConfigError(f"{where}: must be an object")
        for key in ("question_id", "answers", "question_type", "answer_type"):
            if key not in ann:
                raise ConfigError(f"{where}: missing '{key}'")
        answers = ann["answers"]
        if not isinstance(answers, list) or not answers or not all(
                isinstance(a, dict) and isinstance(a.get("answer"), str) for a in answers):
            raise ConfigError(f"{where}: 'answers' must be a non-empty list of {{answer: str}} objects")
        if ann["question_id"] not in question_ids:
            raise ConfigError(f"{where}: question {ann['question_id']} is not in {questions}")
        table[ann["question_id"]] = {"answers": [a["answer"] for a in answers],
                                     "question_type": str(ann["question_type"]),
                                     "answer_type": str(ann["answer_type"])}
    return predictions, table
