"""BEIR folders: a hand-written fixture loaded directly and through the converter, graded nDCG against pytrec_eval,
bad files named with their lines, and `embedder.evaluate` on the folder."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random

import pytest

from embedder.data.beir import convert_beir, load_beir, main, read_qrels
from embedder.errors import DataError
from embedder.evaluation.metrics import graded_ndcg
from tests.conftest import compose

CORPUS = [
    {"_id": "d1", "title": "Aspirin", "text": "Aspirin reduces fever and pain."},
    {"_id": "d2", "title": "Ibuprofen", "text": "Ibuprofen is an anti-inflammatory drug."},
    {"_id": "d3", "title": "Vitamin C", "text": "Vitamin C is found in oranges."},
    {"_id": "d4", "title": "", "text": "Oranges and lemons are citrus fruits."},
    {"_id": "d5", "title": "Sleep", "text": "Adults need seven hours of sleep."},
    {"_id": "q3", "title": "Coffee", "text": "Coffee contains caffeine which keeps you awake."},  # id = a query id
]
QUERIES = [
    {"_id": "q1", "text": "what drug reduces fever"},
    {"_id": "q2", "text": "which fruits contain vitamin c"},
    {"_id": "q3", "text": "coffee caffeine awake"},
    {"_id": "q4", "text": "a query without qrels in the test split"},
]
QRELS_TEST = "query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\td2\t1\nq2\td3\t2\nq2\td4\t1\nq2\td5\t0\nq3\tq3\t1\nq3\td9\t1\n"


def write_beir(folder) -> str:
    os.makedirs(os.path.join(folder, "qrels"), exist_ok=True)
    for name, rows in (("corpus.jsonl", CORPUS), ("queries.jsonl", QUERIES)):
        with open(os.path.join(folder, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(folder, "qrels", "test.tsv"), "w") as f:
        f.write(QRELS_TEST)
    with open(os.path.join(folder, "qrels", "dev.tsv"), "w") as f:
        f.write("query-id\tcorpus-id\tscore\nq4\td5\t1\n")
    return str(folder)


def test_load_maps_ids_to_rows_and_keeps_grades(tmp_path, caplog):
    data = load_beir(write_beir(tmp_path / "beir"), "test")
    assert list(data.doc_ids) == ["d1", "d2", "d3", "d4", "d5", "q3"]
    assert data.corpus[3] == "Oranges and lemons are citrus fruits."  # "{title} {text}", the empty title stripped
    assert data.queries == [
        {"query_id": "q1", "query": "what drug reduces fever", "pos_index": [0, 1], "pos_relevance": [2, 1]},
        {"query_id": "q2", "query": "which fruits contain vitamin c", "pos_index": [2, 3], "pos_relevance": [2, 1]},
        {"query_id": "q3", "query": "coffee caffeine awake", "pos_index": [5], "pos_relevance": [1]},
    ]  # q4 has no test qrels; d5's grade 0 is not relevant; d9 is not in the corpus (counted)
    assert data.skipped == {"qrels document not in corpus.jsonl": 1}
    assert "1 qrels document not in corpus.jsonl" in caplog.text
    assert [q["query_id"] for q in load_beir(str(tmp_path / "beir"), "dev").queries] == ["q4"]


def test_converter_writes_our_formats(tmp_path, capsys):
    main([write_beir(tmp_path / "beir"), str(tmp_path / "conv"), "--split", "test"])
    assert "corpus=" in capsys.readouterr().out
    corpus = [json.loads(x) for x in open(tmp_path / "conv" / "corpus.json")]
    evals = [json.loads(x) for x in open(tmp_path / "conv" / "test.json")]
    assert [c["id"] for c in corpus] == ["d1", "d2", "d3", "d4", "d5", "q3"] and len(evals) == 3
    assert evals[0]["pos_index"] == [0, 1] and evals[0]["query_id"] == "q1"


def test_bad_beir_files_name_file_and_line(tmp_path):
    folder = write_beir(tmp_path / "beir")
    with open(os.path.join(folder, "corpus.jsonl"), "a") as f:
        f.write(json.dumps({"_id": "d2", "text": "again"}) + "\n")
    with pytest.raises(DataError, match=r"corpus.jsonl, line 7, field '_id'.*duplicate document id 'd2' "
                                        r"\(first on line 2\)"):
        load_beir(folder)
    with open(tmp_path / "bad.tsv", "w") as f:
        f.write("query-id\tcorpus-id\tscore\nq1\td1\n")
    with pytest.raises(DataError, match=r"bad.tsv, line 2.*3 tab-separated columns"):
        read_qrels(str(tmp_path / "bad.tsv"))
    with pytest.raises(FileNotFoundError, match=r"qrels splits present: \['dev.tsv', 'test.tsv'\]"):
        load_beir(write_beir(tmp_path / "b2"), "train")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_graded_ndcg_agrees_with_pytrec_eval(seed):
    pytrec_eval = pytest.importorskip("pytrec_eval")
    rng = random.Random(seed)
    qrels, preds = {}, {}
    for q in range(30):
        judged = rng.sample(range(60), rng.randint(1, 8))
        qrels[f"q{q}"] = {d: rng.choice([0, 1, 2, 3]) for d in judged}
        preds[f"q{q}"] = rng.sample(range(60), rng.randint(0, 25))
    cutoffs = [1, 3, 10, 20]
    ours = graded_ndcg(preds, qrels, cutoffs)
    run = {q: {str(d): float(100 - i) for i, d in enumerate(p)} for q, p in preds.items()}
    trec_qrels = {q: {str(d): int(g) for d, g in g_.items()} for q, g_ in qrels.items()}
    evaluator = pytrec_eval.RelevanceEvaluator(trec_qrels, {f"ndcg_cut.{','.join(map(str, cutoffs))}"})
    res = evaluator.evaluate(run)
    evaluated = [q for q in qrels if any(g > 0 for g in qrels[q].values())]
    for k in cutoffs:
        # pytrec_eval omits queries with an empty run; they score 0 (trec_eval -c), as in our mean
        ref = sum(res[q][f"ndcg_cut_{k}"] if q in res else 0.0 for q in evaluated) / len(evaluated)
        assert ours[f"ndcg@{k}"] == pytest.approx(ref, abs=1e-9)
    assert math.isnan(graded_ndcg({}, {"q": {1: 0}}, [5])["ndcg@5"])


@pytest.mark.skipif(importlib.util.find_spec("bm25s") is None, reason="needs bm25s (pip install bm25s)")
def test_evaluate_on_a_beir_folder_matches_the_converted_files(tmp_path):
    from embedder.evaluation.run import run_evaluate

    folder = write_beir(tmp_path / "beir")
    common = ["retriever=bm25", "retriever.backend=bm25s", "version=none", "metrics=[ndcg,recall]",
              "cutoffs=[1,3]", "hits=5"]
    direct = run_evaluate(compose([f"eval_data={folder}", f"output_dir={tmp_path}/o1", *common], "eval"))
    paths = convert_beir(folder, str(tmp_path / "conv"))
    converted = run_evaluate(compose([f"eval_data={paths['eval_data']}", f"corpus={paths['corpus']}",
                                      "eval_name=beir", f"output_dir={tmp_path}/o2", *common], "eval"))
    assert direct.keys() == converted.keys() == {"beir/ndcg@1", "beir/ndcg@3", "beir/recall@1", "beir/recall@3"}
    assert direct == pytest.approx(converted, abs=1e-12)
    # graded gains: q1 ranks d1 (grade 2) first -> ndcg@1 = 1; q2's ideal is d3 (2) then d4 (1)
    result = {r["query_id"]: r["pred"] for r in map(json.loads, open(tmp_path / "o1" / "beir.result.json"))}
    assert result["q1"][0] == 0 and result["q3"][0] == 5

    # MTEB-style: a document whose id equals the query id is never a result (d "q3" for query q3)
    ignored = run_evaluate(compose([f"eval_data={folder}", f"output_dir={tmp_path}/o3", "ignore_identical_ids=true",
                                    *common], "eval"))
    result = {r["query_id"]: r["pred"] for r in map(json.loads, open(tmp_path / "o3" / "beir.result.json"))}
    assert 5 not in result["q3"] and ignored["beir/recall@3"] < direct["beir/recall@3"]


@pytest.mark.slow
def test_minilm_on_beir_equals_an_mteb_style_computation(tmp_path):
    """The MTEB recipe offline: sentence-transformers `encode` of all-MiniLM-L6-v2 (mean pooling, normalised, max length
    256, no instruction), cosine top 100, pytrec_eval `ndcg_cut_10`, on a BEIR folder made from the bundled tool set.
    `python -m embedder.evaluate eval_data=<folder> version=none` must give the same nDCG@10: this is what makes our
    number comparable with MTEB's published one (docs/retrieval.md shows how to check that on SciFact)."""
    import numpy as np
    from sentence_transformers import SentenceTransformer

    from embedder.bundled import minilm_path
    from embedder.evaluation.run import run_evaluate
    from embedder.mining.run import SAMPLE_DATA

    pytrec_eval = pytest.importorskip("pytrec_eval")
    tool = os.path.join(SAMPLE_DATA, "tool")
    if not os.path.isfile(os.path.join(tool, "test.json")):
        pytest.skip("the bundled sample data has not been generated yet")
    folder = tmp_path / "beir"
    os.makedirs(folder / "qrels")
    docs = [json.loads(x) for x in open(os.path.join(tool, "corpus.json"))]
    queries = [json.loads(x) for x in open(os.path.join(tool, "test.json"))]
    with open(folder / "corpus.jsonl", "w") as f:
        f.writelines(json.dumps({"_id": f"d{i}", "title": "", "text": d["text"]}) + "\n" for i, d in enumerate(docs))
    with open(folder / "queries.jsonl", "w") as f:
        f.writelines(json.dumps({"_id": f"q{i}", "text": q["query"]}) + "\n" for i, q in enumerate(queries))
    qrels = {f"q{i}": {f"d{d}": 1 for d in q["pos_index"]} for i, q in enumerate(queries)}
    with open(folder / "qrels" / "test.tsv", "w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        f.writelines(f"{q}\t{d}\t1\n" for q, ds in qrels.items() for d in ds)

    st = SentenceTransformer(minilm_path(), device="cpu")
    st.max_seq_length = 256
    c = st.encode([d["text"] for d in docs], batch_size=64, normalize_embeddings=True)  # (N, 384)
    q = st.encode([x["query"] for x in queries], batch_size=64, normalize_embeddings=True)  # (Q, 384)
    scores = q @ c.T  # (Q, N) cosine
    top = np.argsort(-scores, axis=1)[:, :100]
    run = {f"q{i}": {f"d{j}": float(scores[i, j]) for j in row} for i, row in enumerate(top)}
    mteb_style = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10"}).evaluate(run)
    expected = sum(v["ndcg_cut_10"] for v in mteb_style.values()) / len(mteb_style)

    ours = run_evaluate(compose([f"eval_data={folder}", "eval_name=tool", f"output_dir={tmp_path}/out", "version=none",
                                 "model=minilm", "trainer=cpu", "query_max_length=256", "key_max_length=256",
                                 "metrics=[ndcg]", "cutoffs=[10]", "hits=100"], "eval"))
    print(f"ours {ours['tool/ndcg@10']:.6f} mteb-style {expected:.6f}")
    assert ours["tool/ndcg@10"] == pytest.approx(expected, abs=1e-3)
