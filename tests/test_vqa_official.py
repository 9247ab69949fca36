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


@pytest.mark.parametrize("rules", ["2021", "2017"])
def test_question_accuracy_averages_over_the_ten_humans_left_out(rules):
    humans = ["yes"] * 3 + ["no"] * 2 + ["maybe"] + ["2"] * 4
    # m matching humans of 10: (m * min((m - 1) / 3, 1) + (10 - m) * min(m / 3, 1)) / 10
    assert question_accuracy("purple", humans, rules) == 0.0
    assert question_accuracy("maybe", humans, rules) == pytest.approx(0.3)
    assert question_accuracy("no", humans, rules) == pytest.approx(0.6)
    assert question_accuracy("Yes.", humans, rules) == pytest.approx(0.9)
    assert question_accuracy("two", humans, rules) == 1.0  # "two" -> "2"
    assert question_accuracy("tree", ["tree"], rules) == 0.0  # one human: nobody else to agree, as officially


def test_2017_rules_normalise_the_humans_punctuation_only_when_they_disagree():
    # They disagree: punctuation is stripped from theirs ("t-shirt" -> "t shirt"), as from the prediction.
    assert question_accuracy("t-shirt", ["t-shirt"] * 3 + ["shirt"] * 7, "2017") == pytest.approx(0.9)
    # All ten agree: theirs is compared as written, with the normalised prediction.
    assert question_accuracy("t-shirt", ["t-shirt"] * 10, "2017") == 0.0
    assert question_accuracy("T shirt", ["t shirt"] * 10, "2017") == 1.0
    assert question_accuracy("Yes.", ["yes"] * 10, "2017") == 1.0
    # Only punctuation is applied to theirs: a human's "two" stays "two" while the prediction becomes "2";
    # articles and whitespace stay in theirs.
    assert question_accuracy("two", ["two"] * 5 + ["three"] * 5, "2017") == 0.0
    assert question_accuracy("the red", ["a red"] * 3 + ["blue"] * 7, "2017") == 0.0
    assert question_accuracy("yes", ["yes "] * 10, "2017") == 0.0


def test_2021_rules_compare_as_given_when_the_humans_agree_and_normalise_both_sides_when_not():
    # Unanimous humans: the prediction is compared as given (only whitespace trimmed on both sides).
    assert question_accuracy("Yes", ["yes"] * 10, "2021") == 0.0
    assert question_accuracy("yes.", ["yes"] * 10, "2021") == 0.0
    assert question_accuracy(" yes\n", ["yes"] * 10, "2021") == 1.0
    assert question_accuracy("t-shirt", ["t-shirt"] * 10, "2021") == 1.0
    assert question_accuracy("yes", ["yes "] * 10, "2021") == 1.0  # the humans' whitespace is trimmed
    # Disagreeing humans: number words, articles, case and punctuation are normalised on both sides.
    assert question_accuracy("two", ["two"] * 5 + ["three"] * 5, "2021") == 1.0
    assert question_accuracy("the red", ["a red"] * 3 + ["blue"] * 7, "2021") == pytest.approx(0.9)
    assert question_accuracy("Yes", ["Yes"] * 4 + ["no"] * 6, "2021") == 1.0
    assert question_accuracy("t-shirt", ["t-shirt"] * 3 + ["shirt"] * 7, "2021") == pytest.approx(0.9)
    # Whitespace alone can make humans agree: ["yes", "yes "] are unanimous after trimming.
    assert question_accuracy("Yes", ["yes"] * 2 + ["yes "] * 8, "2021") == 0.0
    assert question_accuracy("Yes", ["yes"] * 2 + ["yes "] * 8, "2017") == pytest.approx(0.6)  # "yes " != "yes"
    with pytest.raises(ValueError, match="one of 2021, 2017"):
        question_accuracy("yes", ["yes"], "2019")


class OfficialEvaluator:
    """The official evaluation loop as the test's own oracle, written from its published rules: human answers
    as mutable records with ids, normalised in place, each left out by identity. Independent of the module's
    per-question arithmetic (shared: the punctuation and digit/article helpers, tested alone above)."""

    def __init__(self, version: str):
        self.version = version

    def accuracy(self, prediction: str, answers: list[str]) -> float:
        records = [{"answer": a, "answer_id": i + 1} for i, a in enumerate(answers)]
        res = prediction.replace("\n", " ").replace("\t", " ").strip()
        if self.version == "2021":
            for r in records:
                r["answer"] = r["answer"].replace("\n", " ").replace("\t", " ").strip()
        else:
            res = digits_and_articles(strip_punctuation(res))
        if len({r["answer"] for r in records}) > 1:
            for r in records:
                r["answer"] = strip_punctuation(r["answer"])
                if self.version == "2021":
                    r["answer"] = digits_and_articles(r["answer"])
            if self.version == "2021":
                res = digits_and_articles(strip_punctuation(res))
        values = []
        for left_out in records:
            others = [r for r in records if r != left_out]
            values.append(min(1, len([r for r in others if r["answer"] == res]) / 3))
        return sum(values) / len(values)


def _noisy_fixture(n: int, seed: int):
    """n questions with 10 human answers each, written as people write them, and predictions as a model might."""
    import random

    rng = random.Random(seed)
    base = ["yes", "no", "2", "two", "red", "a red", "the dog", "dog", "t-shirt", "t shirt", "1,000", "1000",
            "3.5", "none", "0", "black/white", "black and white", "don't know", "dont know", "tennis"]
    noisy = base + ["Yes", "yes.", "yes ", " no", "Two", "Red!", "DOG", "tennis\t", "(red)"]
    annotations, predictions = {}, {}
    for q in range(n):
        pool = rng.sample(noisy, rng.choice([1, 1, 2, 3]))
        humans = [rng.choice(pool) for _ in range(10)]
        annotations[q] = {"answers": humans, "question_type": rng.choice(["what", "how many", "is the"]),
                          "answer_type": rng.choice(["yes/no", "number", "other"])}
        predictions[q] = rng.choice(noisy + humans)
    return predictions, annotations


@pytest.mark.parametrize("rules", ["2021", "2017"])
def test_score_agrees_with_the_official_loop_of_each_version_on_a_generated_fixture(rules):
    from collections import defaultdict

    predictions, annotations = _noisy_fixture(300, seed=3)
    oracle = OfficialEvaluator(rules)
    per_q = {q: oracle.accuracy(predictions[q], a["answers"]) for q, a in annotations.items()}
    result = score(predictions, annotations, rules=rules)
    assert result["rules"] == rules and result["questions"] == 300
    assert result["overall"] == round(100 * sum(per_q.values()) / len(per_q), 2)
    for section, key in (("perQuestionType", "question_type"), ("perAnswerType", "answer_type")):
        groups = defaultdict(list)
        for q, a in annotations.items():
            groups[a[key]].append(per_q[q])
        assert result[section] == {t: round(100 * sum(v) / len(v), 2) for t, v in groups.items()}
    # The fixture holds the cases where the versions differ, and they differ on it.
    other = score(predictions, annotations, rules="2017" if rules == "2021" else "2021")
    assert abs(other["overall"] - result["overall"]) > 1.0


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
    result = score(predictions, annotations, rules="2017")
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
    assert "overall accuracy 30.00  (3 questions, the official evaluator's 2021 rules)" in capsys.readouterr().out
    written = json.loads(out.read_text())
    # 2021: "Yes" against ten "yes" is compared as given (0); "the red" against disagreeing humans is "red" (0.6).
    assert written["overall"] == 30.0 and written["perAnswerType"] == {"number": 30.0, "other": 60.0, "yes/no": 0.0}
    assert written["rules"] == "2021"
    assert main(["score", "vqa", "--results", str(results), "--questions", str(questions), "--annotations", str(anns),
                 "--rules", "2017", "--json", str(out)]) == 0
    assert "overall accuracy 63.33  (3 questions, the official evaluator's 2017 rules)" in capsys.readouterr().out
    assert json.loads(out.read_text())["rules"] == "2017"
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


@pytest.mark.slow
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
