"""Every select_positive / select_negative mode, padding, filters, stable sort and per-epoch resampling."""

from __future__ import annotations

import numpy as np
import pytest

from embedder.data.sampling import SamplingConfig, keep_record, sample_group, sort_negatives_by_teacher

REC = {"query": "q", "pos": ["p0", "p1", "p2"], "neg": ["n0", "n1", "n2", "n3", "n4"],
       "teacher_scores": [0.5, 0.9, 0.1, -1.0, 2.0, -3.0, 0.0, 1.5]}


def rng(seed=0):
    return np.random.default_rng(seed)


def test_first_positive_and_first_negatives():
    g = sample_group(REC, SamplingConfig("first", "first", group_size=4), rng())
    assert g["keys"] == ["p0", "n0", "n1", "n2"]
    assert g["teacher_scores"] == [0.5, -1.0, 2.0, -3.0]


def test_random_positive_draws_each_positive():
    seen = {sample_group(REC, SamplingConfig("random", "first", group_size=2), rng(s))["keys"][0] for s in range(50)}
    assert seen == {"p0", "p1", "p2"}


def test_teacher_pos_takes_best_positive():
    g = sample_group(REC, SamplingConfig("teacher-pos", "first", group_size=3), rng())
    assert g["keys"][0] == "p1" and g["teacher_scores"][0] == 0.9
    assert g["keys"][1:] == ["n0", "n1"]  # unused positives never become negatives


def test_teacher_promotes_a_negative():
    # argmax over all keys is n1 (2.0): it becomes the positive and leaves the negative pool
    g = sample_group(REC, SamplingConfig("teacher", "first", group_size=5), rng())
    assert g["keys"] == ["n1", "n0", "n2", "n3", "n4"]
    assert g["teacher_scores"] == [2.0, -1.0, -3.0, 0.0, 1.5]


def test_teacher_without_scores_falls_back_to_first():
    rec = {k: v for k, v in REC.items() if k != "teacher_scores"}
    g = sample_group(rec, SamplingConfig("teacher", "random", group_size=3), rng())
    assert g["keys"][0] == "p0" and g["teacher_scores"] is None


@pytest.mark.parametrize("mode,expected", [("teacher-", ["n2", "n0", "n3"]), ("teacher+", ["n1", "n4", "n3"])])
def test_teacher_negative_selection(mode, expected):
    g = sample_group(REC, SamplingConfig("first", mode, group_size=4), rng())
    assert g["keys"][1:] == expected


def test_random_negatives_without_replacement_and_aligned_scores():
    for s in range(20):
        g = sample_group(REC, SamplingConfig("first", "random", group_size=5), rng(s))
        negs = g["keys"][1:]
        assert len(set(negs)) == 4
        score_of = dict(zip(REC["pos"] + REC["neg"], REC["teacher_scores"]))
        assert g["teacher_scores"] == [score_of[k] for k in g["keys"]]


def test_short_negative_pool_is_padded_by_repetition():
    rec = {"query": "q", "pos": ["p"], "neg": ["a", "b"], "teacher_scores": [1.0, 0.5, 0.2]}
    g = sample_group(rec, SamplingConfig("first", "first", group_size=6), rng())
    assert g["keys"] == ["p", "a", "b", "a", "b", "a"]
    assert g["teacher_scores"] == [1.0, 0.5, 0.2, 0.5, 0.2, 0.5]


def test_chat_history_is_the_candidate_pool():
    rec = {"query": "q", "history": ["t0", "t1", "t2", "t3"], "teacher_scores": [-3.0, -1.0, -2.0, -4.0]}
    g = sample_group(rec, SamplingConfig("teacher", "first", group_size=3), rng())
    assert g["keys"] == ["t1", "t0", "t2"]


def test_stable_distill_sorts_negatives_keeps_positive_first():
    g = sample_group(REC, SamplingConfig("first", "first", group_size=5, stable_distill=True), rng())
    assert g["keys"][0] == "p0"
    assert g["teacher_scores"][1:] == sorted(g["teacher_scores"][1:], reverse=True)
    keys, scores = sort_negatives_by_teacher(["p", "a", "b"], [0.0, 1.0, 3.0])
    assert keys == ["p", "b", "a"] and scores == [0.0, 3.0, 1.0]


def test_filters_margin_min_and_no_negatives():
    narrow = {"query": "q", "pos": [], "neg": ["a", "b"], "teacher_scores": [-2.0, -2.05]}
    assert keep_record(narrow, SamplingConfig("teacher", "random", teacher_scores_margin=0.1)) == "teacher_scores_margin"
    assert keep_record(narrow, SamplingConfig("teacher", "random", teacher_scores_min=-1.0)) == "teacher_scores_min"
    assert keep_record(narrow, SamplingConfig("teacher", "random")) is None
    assert keep_record({"query": "q", "pos": ["p"], "neg": []}, SamplingConfig()) == "no negatives"
    assert keep_record({"query": "q", "pos": ["p"], "neg": []}, SamplingConfig(group_size=1)) is None


def test_invalid_modes_list_valid_ones():
    with pytest.raises(ValueError, match="teacher-pos"):
        SamplingConfig(select_positive="best")
    with pytest.raises(ValueError, match="teacher\\+"):
        SamplingConfig(select_negative="hard")
