"""RetrievalEvaluator with a bag-of-words fake encoder on a corpus small enough to score by hand."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

pytest.importorskip("faiss")

from embedder.errors import DataError  # noqa: E402
from embedder.evaluation import RetrievalEvaluator  # noqa: E402

VOCAB = ["paris", "berlin", "tokyo", "banana", "apple", "capital", "france", "germany", "japan", "yellow", "red",
         "fruit"]


class BagOfWords:
    """encode(texts, kind) -> (N, |VOCAB|) one-hot word indicators; remembers every call."""

    def __init__(self):
        self.calls: list[tuple[str, list[str]]] = []

    def __call__(self, texts: list[str], kind: str) -> np.ndarray:
        self.calls.append((kind, list(texts)))
        out = np.zeros((len(texts), len(VOCAB)), dtype=np.float32)  # (N, V)
        for row, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                if word in VOCAB:
                    out[row, VOCAB.index(word)] = 1.0
        return out


CORPUS = [
    {"title": "Paris", "text": "capital of France"},  # 0
    {"title": "Berlin", "text": "capital of Germany"},  # 1
    {"title": "Tokyo", "text": "capital of Japan"},  # 2
    {"title": "Banana", "text": "yellow fruit"},  # 3
    {"title": "Apple", "text": "red fruit"},  # 4
]

# cosine scores worked out by hand (vectors: doc0 = {paris, capital, france}, ...):
# "a": {capital, france}            -> doc0 2/√6, doc1 = doc2 1/√6, doc3 = doc4 0      -> label 0 at rank 1
# "b": {yellow, fruit}              -> doc3 2/√6, doc4 1/√6, others 0                  -> label 4 at rank 2
#  2 : {tokyo, japan, capital, germany} -> doc2 3/√12, doc1 2/√12, doc0 1/√12, others 0 -> labels 2, 0 at ranks 1, 3
#  3 : {apple}                      -> doc4 first; no pos_index: left out of mrr/recall/ndcg
QUERIES = [
    {"query_id": "a", "query": "capital of france", "pos_index": [0], "answers": ["Paris"]},
    {"qid": "b", "query": "yellow fruit", "pos_index": [4], "answers": ["banana"]},
    {"query": "tokyo japan capital germany", "pos_index": [2, 0], "answers": ["Berlin"]},
    {"query": "apple", "answers": ["red fruit"]},
]


def rank_by_hand(evaluator: RetrievalEvaluator, encode) -> dict:
    """Every query against the whole corpus by cosine, best first, ties by row: what embedder.retrieval's faiss
    search returns for a real model (tests/test_faiss_index.py checks it against brute force)."""
    q = encode([x.text for x in evaluator.queries], "query")  # (Q, V)
    k = encode(evaluator.corpus_texts, "key")  # (N, V)
    q, k = (m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12) for m in (q, k))
    order = np.argsort(-(q @ k.T), axis=1, kind="stable")[:, :evaluator.hits]  # (Q, min(hits, N))
    return {x.qid: [int(i) for i in row] for x, row in zip(evaluator.queries, order)}


def test_retrieval_metrics_by_hand():
    encode = BagOfWords()
    evaluator = RetrievalEvaluator(None, QUERIES, CORPUS, metrics=["mrr", "recall", "ndcg", "nq"], cutoffs=[1, 5],
                                   hits=10, corpus_path="corpus.json")
    preds = rank_by_hand(evaluator, encode)
    metrics = evaluator.score(preds)

    assert set(preds) == {"a", "b", 2, 3}  # query_id, then qid, then the 0-based row
    assert preds["a"][0] == 0 and preds["b"][:2] == [3, 4] and preds[2][:3] == [2, 1, 0] and preds[3][0] == 4
    assert all(len(p) == 5 for p in preds.values())  # hits=10 > corpus

    ndcg_b = 1 / math.log2(3)
    ndcg_c = (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    expected = {
        "mrr@1": 2 / 3, "mrr@5": (1 + 0.5 + 1) / 3,
        "recall@1": (1 + 0 + 0.5) / 3, "recall@5": 1.0,
        "ndcg@1": 2 / 3, "ndcg@5": (1 + ndcg_b + ndcg_c) / 3,
        # Paris: doc0 rank 1; banana: doc3 rank 1; Berlin: doc1 rank 2; "red fruit": doc4 rank 1
        "answer_recall@1": 3 / 4, "answer_recall@5": 1.0,
    }
    assert metrics.keys() == expected.keys()
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-6), key

    kinds = [kind for kind, _ in encode.calls]
    assert sorted(kinds) == ["key", "query"]
    keys = next(texts for kind, texts in encode.calls if kind == "key")
    assert keys[0] == "Paris capital of France"  # key_template "{title} {text}"


def test_a_retrieval_set_is_searched_by_the_retrieval_package():
    with pytest.raises(ValueError, match="embedder.retrieval.*score"):
        RetrievalEvaluator(BagOfWords(), QUERIES[:2], CORPUS, metrics=["mrr"], cutoffs=[1]).evaluate()


def test_rerank_mode():
    records = [
        # cos: cand0 {red, fruit, apple} 1/√6, cand1 {yellow, fruit, banana} 2/√6, cand2 0 -> [3, 4, 2]
        {"query": "yellow fruit", "key": ["red fruit apple", "yellow fruit banana", "capital of Japan"],
         "key_index": [4, 3, 2], "pos_index": [3], "answers": ["banana"]},
        # no key_index: preds are positions in `key`; the positive (position 0) is ranked 2nd
        {"query": "capital germany", "key": ["capital of France", "Berlin capital of Germany"], "pos_index": [0],
         "answers": ["France"]},
        {"query": "capital", "key": [], "pos_index": [], "answers": ["x"]},  # no candidates, no positives
    ]
    encode = BagOfWords()
    evaluator = RetrievalEvaluator(encode, records, mode="rerank", metrics=["mrr", "nq"], cutoffs=[1, 5])
    metrics, preds = evaluator.evaluate()
    assert preds == {0: [3, 4, 2], 1: [1, 0], 2: []}
    assert metrics == pytest.approx({"mrr@1": 0.5, "mrr@5": 0.75,
                                     "answer_recall@1": 1 / 3, "answer_recall@5": 2 / 3})
    assert ("key", ["red fruit apple", "yellow fruit banana", "capital of Japan", "capital of France",
                    "Berlin capital of Germany"]) in encode.calls

    _, preds = RetrievalEvaluator(BagOfWords(), records, mode="rerank", metrics=["mrr"], hits=1).evaluate()
    assert preds == {0: [3], 1: [1], 2: []}


def test_from_files_and_real_line_numbers(tmp_path):
    root = tmp_path / "data"
    (root / "qa").mkdir(parents=True)
    (root / "qa" / "test.json").write_text("\n".join(json.dumps(q) for q in QUERIES[:2]) + "\n")
    (root / "qa" / "corpus.json").write_text("\n".join(json.dumps(c) for c in CORPUS) + "\n")
    evaluator = RetrievalEvaluator.from_files(None, "llm-embedder:qa/test.json", "llm-embedder:qa/corpus.json",
                                              data_root=str(root), metrics=["mrr"], cutoffs=[5])
    assert evaluator.score(rank_by_hand(evaluator, BagOfWords())) == pytest.approx({"mrr@5": 0.75})

    bad = CORPUS[:2] + [{"text": "no title here"}] + CORPUS[3:]
    (root / "qa" / "corpus.json").write_text("\n" + "\n".join(json.dumps(c) for c in bad) + "\n")  # blank line 1
    with pytest.raises(DataError) as err:
        RetrievalEvaluator.from_files(BagOfWords(), "llm-embedder:qa/test.json", "llm-embedder:qa/corpus.json",
                                      data_root=str(root))
    assert "corpus.json, line 4, field 'title'" in str(err.value) and "key_template" in str(err.value)


# ---------------------------------------------------------------------------------------------- DataError cases
def test_corpus_missing_template_field():
    with pytest.raises(DataError, match=r"corpus\.json, line 2, field 'title'"):
        RetrievalEvaluator(BagOfWords(), QUERIES, [CORPUS[0], {"text": "x"}], corpus_path="corpus.json")
    RetrievalEvaluator(BagOfWords(), QUERIES[:1], [CORPUS[0], {"text": "x"}], key_template="{text}")  # fine


@pytest.mark.parametrize("query", ["", "   ", None, ["a list"]])
def test_empty_query(query):
    records = [QUERIES[0], {"query": query, "pos_index": [1]}]
    with pytest.raises(DataError, match=r"test\.json, line 2, field 'query'"):
        RetrievalEvaluator(BagOfWords(), records, CORPUS, queries_path="test.json")


def test_pos_index_outside_corpus():
    records = [QUERIES[0], QUERIES[1], {"query": "paris", "pos_index": [1, 5]}]
    with pytest.raises(DataError, match=r"test\.json, line 3, field 'pos_index'.*\[5\] outside the corpus"):
        RetrievalEvaluator(BagOfWords(), records, CORPUS, queries_path="test.json")
    with pytest.raises(DataError, match="line 1, field 'pos_index'.*candidates"):
        RetrievalEvaluator(BagOfWords(), [{"query": "q", "key": ["k"], "pos_index": [1]}], mode="rerank")


def test_other_record_errors():
    with pytest.raises(DataError, match="line 1, field 'key_index'"):
        RetrievalEvaluator(BagOfWords(), [{"query": "q", "key": ["a", "b"], "key_index": [0]}], mode="rerank",
                           metrics=["mrr"])
    with pytest.raises(DataError, match="line 2, field 'query_id'"):
        RetrievalEvaluator(BagOfWords(), [QUERIES[0], QUERIES[0]], CORPUS)
    with pytest.raises(DataError, match="need 'pos_index'"):
        RetrievalEvaluator(BagOfWords(), [QUERIES[3]], CORPUS, metrics=["ndcg"])
    with pytest.raises(DataError, match="non-empty corpus"):
        RetrievalEvaluator(BagOfWords(), QUERIES, [])


def test_encode_with_wrong_shape():
    with pytest.raises(ValueError, match="shape"):
        RetrievalEvaluator(lambda texts, kind: np.zeros((1, 3)), [{"query": "q", "key": ["a", "b"], "pos_index": [0]}],
                           mode="rerank").evaluate()
