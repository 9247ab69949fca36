"""VQA accuracy with the official evaluator's rules, each rule against hand-computed expectations, and
`softmask score vqa` on official-format files (agreeing with `softmask evaluate vqa`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from softmask.cli import main
from softmask.eval.vqa_official import (
    digits_and_articles,
    normalize_prediction,
    question_accuracy,
    read_official_files,
    score,
    strip_punctuation,
)


@pytest.mark.parametrize("text, expected", [
    ("yes!", "yes "),  # a mark touching no space becomes a space
    ("hi , there", "hi  there"),  # a mark touching a space is deleted
    ("t-shirt", "t shirt"), ("black/white", "black white"), ("black / white", "black  white"),
    ("1,000", "1000"),  # a digit-comma-digit group: every mark of the text is deleted
    ("a,b 1,2", "ab 12"),
    ("2.5", "2.5"), ("end.", "end"), ("3.5 km.", "3.5 km"),  # a decimal point stays, other periods go
    ("." * 40, "." * 8),  # at most 32 periods are deleted
    ("(left)", " left "), ("don't", "don't"),  # apostrophes are not punctuation here
])
def test_punctuation(text, expected):
    assert strip_punctuation(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("Two", "2"), ("none", "0"), ("ten dogs", "10 dogs"), ("eleven", "eleven"),  # number words 0-10 only
    ("the cat", "cat"), ("an apple and a pear", "apple and pear"),  # articles dropped
    ("dont", "don't"), ("whats up", "what's up"), ("Ive", "ive"),  # the list's capitalised keys never match
    ("  Red   Car ", "red car"),
])
def test_digits_articles_and_contractions(text, expected):
    assert digits_and_articles(text) == expected


def test_a_prediction_is_normalised_by_every_rule():
    assert normalize_prediction("\tThe Two Dogs!\n") == "2 dogs"
    assert normalize_prediction("1,000 people.") == "1000 people"


def test_question_accuracy_averages_over_the_ten_humans_left_out():
    humans = ["yes"] * 3 + ["no"] * 2 + ["maybe"] + ["2"] * 4
    # m matching humans of 10: (m * min((m - 1) / 3, 1) + (10 - m) * min(m / 3, 1)) / 10
    assert question_accuracy("purple", humans) == 0.0
    assert question_accuracy("maybe", humans) == pytest.approx(0.3)
    assert question_accuracy("no", humans) == pytest.approx(0.6)
    assert question_accuracy("Yes.", humans) == pytest.approx(0.9)
    assert question_accuracy("two", humans) == 1.0  # "two" -> "2"
    assert question_accuracy("tree", ["tree"]) == 0.0  # one human: nobody else to agree, as officially


def test_human_answers_are_normalised_only_when_the_humans_disagree():
    # They disagree: punctuation is stripped from theirs ("t-shirt" -> "t shirt"), as from the prediction.
    assert question_accuracy("t-shirt", ["t-shirt"] * 3 + ["shirt"] * 7) == pytest.approx(0.9)
    # All ten agree: theirs is compared as written, so a written "t-shirt" never matches a prediction.
    assert question_accuracy("t-shirt", ["t-shirt"] * 10) == 0.0
    assert question_accuracy("T shirt", ["t shirt"] * 10) == 1.0
    # Only punctuation is applied to theirs: a human's "two" stays "two" while the prediction becomes "2".
    assert question_accuracy("two", ["two"] * 5 + ["three"] * 5) == 0.0


def _files(tmp_path, predictions, annotations):
    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"question_id": q, "answer": a} for q, a in predictions.items()]))
    questions = tmp_path / "questions.json"
    questions.write_text(json.dumps({"questions": [{"question_id": q, "image_id": 1, "question": "?"}
                                                   for q in annotations]}))
    anns = tmp_path / "annotations.json"
    anns.write_text(json.dumps({"annotations": [
        {"question_id": q, "image_id": 1, "question_type": qt, "answer_type": at,
         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]}
        for q, (answers, qt, at) in annotations.items()]}))
    return results, questions, anns


ANNOTATIONS = {
    1: (["yes"] * 10, "is the", "yes/no"),  # 1.0 for "yes"
    2: (["2"] + ["3"] * 9, "how many", "number"),  # 0.3 for "2"
    3: (["red"] * 2 + ["blue"] * 8, "what color", "other"),  # 0.6 for "red"
}
PREDICTIONS = {1: "Yes", 2: "two", 3: "the red"}


def test_score_is_the_mean_per_question_and_per_type_in_percent():
    predictions, annotations = PREDICTIONS, {q: {"answers": a, "question_type": qt, "answer_type": at}
                                             for q, (a, qt, at) in ANNOTATIONS.items()}
    result = score(predictions, annotations)
    assert result["overall"] == pytest.approx(round(100 * (1 + 0.3 + 0.6) / 3, 2)) == 63.33
    assert result["perAnswerType"] == {"number": 30.0, "other": 60.0, "yes/no": 100.0}
    assert result["perQuestionType"] == {"how many": 30.0, "is the": 100.0, "what color": 60.0}
    with pytest.raises(ValueError, match="no answer for 1 annotated question"):
        score({1: "yes", 2: "2"}, annotations)
    with pytest.raises(ValueError, match="not in the annotations, e.g. 9"):
        score({**predictions, 9: "x"}, annotations)


def test_score_vqa_command_prints_and_writes_the_official_numbers(tmp_path, capsys):
    results, questions, anns = _files(tmp_path, PREDICTIONS, ANNOTATIONS)
    out = tmp_path / "score.json"
    assert main(["score", "vqa", "--results", str(results), "--questions", str(questions), "--annotations", str(anns),
                 "--json", str(out)]) == 0
    assert "overall accuracy 63.33  (3 questions)" in capsys.readouterr().out
    written = json.loads(out.read_text())
    assert written["overall"] == 63.33 and written["perAnswerType"]["number"] == 30.0
    # A results file that misses a question: one line.
    results.write_text(json.dumps([{"question_id": 1, "answer": "yes"}]))
    assert main(["score", "vqa", "--results", str(results), "--questions", str(questions),
                 "--annotations", str(anns)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no answer for 2 annotated question(s)" in err and str(results) in err


def test_malformed_official_files_name_the_file_and_record(tmp_path):
    from softmask.config import ConfigError

    results, questions, anns = _files(tmp_path, PREDICTIONS, ANNOTATIONS)
    data = json.loads(anns.read_text())
    del data["annotations"][1]["answer_type"]
    anns.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"annotations.json: annotation 1: missing 'answer_type'"):
        read_official_files(results, questions, anns)
    results.write_text(json.dumps([{"question_id": 1, "answer": "yes"}, {"question_id": 1, "answer": "no"}]))
    with pytest.raises(ConfigError, match="question 1 is answered twice"):
        read_official_files(results, questions, anns)


def test_evaluate_vqa_reports_what_score_vqa_gives_on_its_results_file(tmp_path, capsys):
    from softmask.world import generate_world

    world = tmp_path / "world"
    generate_world(world, images=24, size=32, seed=0)
    config = str(Path(__file__).resolve().parents[1] / "configs" / "finetune" / "vqa_tiny.yaml")
    out = tmp_path / "run"
    assert main(["-q", "finetune", "vqa", f"world={world}", f"output_dir={out}", "train.max_steps=2",
                 "model.vision.image_size=32", "--config", config]) == 0
    records = json.loads((world / "annotations" / "vqa_val.json").read_text())
    annotations = {r["question_id"]: (r["answer"], r["type"], r["type"]) for r in records}
    predictions = {r["question_id"]: r["answer"] for r in json.loads((out / "vqa_val_results.json").read_text())}
    results, questions, anns = _files(tmp_path, predictions, annotations)
    assert main(["-q", "score", "vqa", "--results", str(results), "--questions", str(questions),
                 "--annotations", str(anns), "--json", str(tmp_path / "s.json")]) == 0
    official = json.loads((tmp_path / "s.json").read_text())
    ours = json.loads((out / "metrics_val.json").read_text())
    assert round(ours["acc"], 2) == official["overall"]
    for kind, value in official["perAnswerType"].items():
        assert round(ours[f"acc_{kind}"], 2) == value
