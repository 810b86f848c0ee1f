"""Caption metrics: perfect captions score 100, wrong ones less, exact match is exact."""

import pytest

from aiflow.model.quality import normalise, score

REFS = ["a large red circle left of a small blue square", "a small green cross", "a large cyan triangle above a small red circle"]


def test_perfect_captions_score_full_marks():
    q = score(list(REFS), REFS)
    assert q.bleu4 == pytest.approx(100, abs=1e-3) and q.rouge_l == pytest.approx(100)
    assert q.exact_match == 100 and q.count == 3 and q.cider > 0


def test_one_wrong_word_costs_points_and_the_exact_match():
    preds = [REFS[0].replace("red", "blue"), REFS[1], REFS[2]]
    q = score(preds, REFS)
    assert q.exact_match == pytest.approx(200 / 3)
    assert q.bleu4 < 100 and q.rouge_l < 100 and q.cider < score(list(REFS), REFS).cider


def test_normalisation_ignores_case_and_punctuation():
    assert normalise("A Large, red circle.") == "a large red circle"
    assert score(["A small GREEN cross."], ["a small green cross"]).exact_match == 100


def test_empty_prediction_scores_zero_without_crashing():
    q = score([""], ["a small green cross"])
    assert q.exact_match == 0 and q.bleu4 < 1e-3


def test_mismatched_lengths_are_rejected():
    with pytest.raises(ValueError, match="one reference set per prediction"):
        score(["a"], [])
