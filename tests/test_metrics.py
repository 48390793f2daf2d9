"""Ranking metrics against pytrec_eval on randomised runs, plus DPR answer recall on hand-made passages."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from embedder.evaluation.metrics import compute_metrics, per_query_metrics
from embedder.retrieval.nq_answer import SimpleTokenizer, answer_recall, has_answer

CUTOFFS = (1, 3, 5, 10)
METRICS = ("mrr", "recall", "ndcg", "map", "precision")
TREC_NAME = {"recall": "recall_{k}", "ndcg": "ndcg_cut_{k}", "map": "map_cut_{k}", "precision": "P_{k}"}


def trec_order(run: dict[str, float]) -> list[str]:
    """trec_eval's ranking: score descending, ties broken by docno descending (as strings)."""
    return sorted(run, key=lambda d: (run[d], d), reverse=True)


def random_case(seed: int, n_queries: int = 60, n_docs: int = 30):
    """A scored run with ties, our ranked preds (with duplicates and -1 inserted), and labels.

    Covers: several relevant docs, no relevant doc (empty list or absent from labels), no predictions (empty list or
    absent from preds), score ties, repeated predictions and -1 padding.
    """
    rng = np.random.default_rng(seed)
    runs: dict[str, dict[str, float]] = {}
    preds: dict[str, list[int]] = {}
    labels: dict[str, list[int]] = {}
    for q in range(n_queries):
        qid = f"q{q}"
        n_rel = int(rng.integers(0, 5))
        if n_rel or rng.random() < 0.5:  # half of the no-relevant queries appear with an empty label list
            labels[qid] = [int(d) for d in rng.choice(n_docs, size=n_rel, replace=False)]
            if rng.random() < 0.2 and labels[qid]:
                labels[qid].append(labels[qid][0])  # a repeated label counts once
        n_ret = int(rng.integers(0, 16))
        if n_ret == 0 and rng.random() < 0.5:
            continue  # absent from preds altogether
        docs = rng.choice(n_docs, size=n_ret, replace=False)
        scores = np.round(rng.random(n_ret), 1)  # one decimal: plenty of ties
        runs[qid] = {str(d): float(s) for d, s in zip(docs, scores)}
        ranked = [int(d) for d in trec_order(runs[qid])]
        noisy: list[int] = []
        for d in ranked:
            noisy.append(d)
            if rng.random() < 0.25:
                noisy.append(-1)
            if noisy and rng.random() < 0.3:
                noisy.append(int(rng.choice([x for x in noisy])))  # repeat something already ranked (or -1)
        preds[qid] = noisy
    return runs, preds, labels


def pytrec_means(runs: dict, labels: dict) -> dict[str, float]:
    pytrec_eval = pytest.importorskip("pytrec_eval")
    qrels = {q: {str(d): 1 for d in docs} for q, docs in labels.items() if docs}
    cut = ",".join(map(str, CUTOFFS))
    measures = {f"P.{cut}", f"recall.{cut}", f"ndcg_cut.{cut}", f"map_cut.{cut}"}
    full = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(runs)
    mrr_eval = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"})
    out = {}
    for k in CUTOFFS:
        truncated = {q: {d: run[d] for d in trec_order(run)[:k]} for q, run in runs.items()}
        cut_res = mrr_eval.evaluate(truncated)
        # queries in qrels but missing from the result (no run) count as 0, like trec_eval -c
        out[f"mrr@{k}"] = float(np.mean([cut_res.get(q, {}).get("recip_rank", 0.0) for q in qrels]))
        for name, trec in TREC_NAME.items():
            out[f"{name}@{k}"] = float(np.mean([full.get(q, {}).get(trec.format(k=k), 0.0) for q in qrels]))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_agrees_with_pytrec_eval_on_random_runs(seed):
    runs, preds, labels = random_case(seed)
    ours = compute_metrics(preds, labels, METRICS, CUTOFFS)
    expected = pytrec_means(runs, labels)
    assert set(ours) == set(expected)
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, abs=1e-12), key


def test_excluded_queries_are_reported():
    runs, preds, labels = random_case(0)
    result = per_query_metrics(preds, labels, ["ndcg"], [10])
    no_rel = {q for q, docs in labels.items() if not docs} | {q for q in preds if not labels.get(q)}
    assert set(result.excluded) == no_rel and len(result.excluded) == len(no_rel) > 0
    assert set(result.qids) == {q for q, docs in labels.items() if docs}
    assert result.values["ndcg@10"].shape == (len(result.qids),)


def test_excluded_count_is_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="embedder"):
        compute_metrics({"a": [1], "b": [2], "c": [3]}, {"a": [1], "b": []}, ["mrr"], [1])
    assert "2 of 3 queries have no relevant document" in caplog.text


def test_duplicates_keep_first_occurrence_and_minus_one_is_dropped():
    # distinct ranking is [5, 7, 9]: both relevant docs in the top 2
    m = compute_metrics({"q": [5, 5, -1, 7, 5, 9]}, {"q": [5, 7]}, METRICS, [2, 3])
    assert m["recall@2"] == 1.0 and m["ndcg@2"] == 1.0 and m["precision@2"] == 1.0 and m["map@2"] == 1.0
    assert m["precision@3"] == pytest.approx(2 / 3)


def test_reference_definitions_by_hand():
    preds, labels = {"q": [4, 1, 8, 2]}, {"q": [1, 2, 3]}
    m = compute_metrics(preds, labels, METRICS, [1, 2, 5])
    assert m["mrr@1"] == 0.0 and m["mrr@2"] == 0.5 and m["mrr@5"] == 0.5
    assert m["recall@2"] == pytest.approx(1 / 3) and m["recall@5"] == pytest.approx(2 / 3)
    # ndcg: binary gains, IDCG over min(|label|, k)
    assert m["ndcg@2"] == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))
    idcg5 = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert m["ndcg@5"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(5)) / idcg5)
    # map divides by |label| (trec_eval), precision by k
    assert m["map@5"] == pytest.approx((1 / 2 + 2 / 4) / 3)
    assert m["precision@5"] == pytest.approx(2 / 5)


def test_no_predictions_count_as_zero_and_nan_without_labels():
    m = compute_metrics({"a": [1]}, {"a": [1], "b": [2]}, ["mrr", "recall"], [1])
    assert m == {"mrr@1": 0.5, "recall@1": 0.5}
    m = compute_metrics({"a": [1]}, {}, ["ndcg"], [1])
    assert math.isnan(m["ndcg@1"])


def test_bad_metric_names():
    with pytest.raises(ValueError, match="unknown metric"):
        compute_metrics({}, {"a": [1]}, ["mrrr"])
    with pytest.raises(ValueError, match="answer_recall"):
        compute_metrics({}, {"a": [1]}, ["nq"])
    with pytest.raises(ValueError, match="positive"):
        compute_metrics({}, {"a": [1]}, ["mrr"], [0])


# ---------------------------------------------------------------------------------------------- DPR answer recall
def test_simple_tokenizer():
    tok = SimpleTokenizer()
    assert tok.tokenize("Hello, World! U.S.-born") == ["hello", ",", "world", "!", "u", ".", "s", ".", "-", "born"]


@pytest.mark.parametrize("text, answers, expected", [
    ("He moved to New York City in 1990.", ["new york city"], True),  # multi-token, case-insensitive
    ("He moved to New York, then to the City.", ["New York City"], False),  # tokens must be contiguous
    ("Born in Yorkshire.", ["York"], False),  # whole tokens only
    ("Served in the U.S. Army", ["U.S."], True),  # punctuation tokens match
    ("Served in the US Army", ["U.S."], False),
    ("le caf\u00e9 au lait", ["Cafe\u0301"], True),  # NFC text vs NFD answer: NFD normalisation makes them equal
    ("le caf\u00e9 au lait", ["cafe"], False),  # the accent is a mark inside the token, so no accent-folding
    ("Tchaikovsky (\u0427\u0430\u0439\u043a\u043e\u0432\u0441\u043a\u0438\u0439) wrote it",
     ["\u0447\u0410\u0419\u043a\u043e\u0432\u0441\u043a\u0438\u0439"], True),  # Cyrillic, lowercased
    ("the score was 3\u20131", ["3 \u2013 1"], True),  # en dash is its own token; spacing does not matter
    ("anything at all", [""], False),  # an empty answer never matches (DPR would match everywhere)
    ("anything at all", [], False),
])
def test_has_answer(text, answers, expected):
    assert has_answer(text, answers) is expected


def test_answer_recall_by_query_id():
    corpus = ["Paris is the capital of France.", "Berlin is in Germany.", "The Eiffel Tower is in Paris.",
              "Tokyo, Japan.", "Nothing here."]
    answers = {"q1": ["Paris"], "q2": ["Tokyo"], "q3": ["Berlin"], "q4": [], "q5": ["Rome"]}
    preds = {  # deliberately in another order than `answers`
        "q3": [4, 3, 1],  # hit at rank 3
        "q1": [-1, 0, 2],  # -1 never has the answer: hit at rank 2
        "q2": [3],  # rank 1
        "q6": [0],  # no answers given: ignored
    }  # q4 has no answer (excluded), q5 has no predictions (0)
    r = answer_recall(preds, answers, corpus, cutoffs=(1, 2, 3, 100))
    assert r == {"answer_recall@1": 1 / 4, "answer_recall@2": 2 / 4, "answer_recall@3": 3 / 4,
                 "answer_recall@100": 3 / 4}


def test_answer_recall_lists_in_eval_order_and_type_mismatch():
    corpus = {10: "alpha beta", 11: "gamma"}
    assert answer_recall([[11, 10]], [["beta"]], corpus, cutoffs=[1, 2]) == \
        {"answer_recall@1": 0.0, "answer_recall@2": 1.0}
    with pytest.raises(TypeError, match="both"):
        answer_recall([[11, 10]], {"q": ["beta"]}, corpus)
