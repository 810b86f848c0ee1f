"""`aiflow evaluate`: the bundled weights scored on fresh held-out scenes, from the command line."""

from __future__ import annotations

import json

from aiflow.cli import main


def test_evaluate_scores_every_decoding_on_fresh_heldout_scenes(capsys):
    assert main(["evaluate", "--count", "8", "--seed", "11", "-o", "json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    for name in ("large", "small", "speculative"):
        assert scores[name]["count"] == 8
        for metric in ("bleu4", "cider", "rouge_l", "exact_match"):
            assert 0.0 <= scores[name][metric] <= (1000.0 if metric == "cider" else 100.0)
    # greedy acceptance: speculation returns exactly the large decoder's captions
    assert scores["speculative"]["identical_to_large"] is True
    assert scores["speculative"]["exact_match"] == scores["large"]["exact_match"]
    # the bundled weights are trained: most fresh held-out scenes are captioned exactly
    assert scores["large"]["exact_match"] >= 75.0


def test_evaluate_refuses_a_directory_without_weights(tmp_path, capsys):
    assert main(["evaluate", "--weights", str(tmp_path), "--count", "2"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "config.json" in err
