"""Hard-negative mining: the negative rules by hand, then mine.py end to end (dense and bm25s) on a small corpus.

The corpus has 10 topics x 3 passages plus one passage that repeats a positive's text under another row, so the
by-text positive filter has something to catch. Dense runs use the tiny random BERT (real tokenizer and forward
pass); the Lucene backend is in test_mining_bm25.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from collections import Counter

import pytest

from embedder.errors import DataError
from embedder.mining import NegativeRule, load_queries, open_corpus, select_negatives
from tests.conftest import compose, read_jsonl

TOPICS = {
    "paris": ["Paris is the capital of France", "Paris hosts the Louvre museum", "Paris sits on the Seine river"],
    "berlin": ["Berlin is the capital of Germany", "Berlin has a famous wall", "Berlin lies on the Spree river"],
    "tokyo": ["Tokyo is the capital of Japan", "Tokyo has busy train stations", "Tokyo hosted the olympics"],
    "banana": ["Banana is a yellow fruit", "Banana plants grow in the tropics", "Banana bread is sweet"],
    "apple": ["Apple is a red or green fruit", "Apple trees blossom in spring", "Apple pie is a dessert"],
    "guitar": ["Guitar has six strings", "Guitar music fills the hall", "Guitar players use picks"],
    "piano": ["Piano has eighty eight keys", "Piano lessons start early", "Piano concertos are long"],
    "soccer": ["Soccer is played with a ball", "Soccer teams have eleven players", "Soccer World Cup is popular"],
    "tennis": ["Tennis uses a racket", "Tennis courts can be grass", "Tennis matches have sets"],
    "python": ["Python is a programming language", "Python code uses indentation", "Python has many libraries"],
}
DUPLICATE_ROW = 30  # same text as row 0 (paris, first passage)
needs_bm25s = pytest.mark.skipif(importlib.util.find_spec("bm25s") is None, reason="needs bm25s (pip install bm25s)")


def toy_corpus() -> list[dict]:
    rows = [{"title": topic.capitalize(), "text": text} for topic, texts in TOPICS.items() for text in texts]
    rows.append(dict(rows[0]))  # row 30 duplicates row 0
    return rows


def toy_queries() -> list[dict]:
    out = []
    for t, (topic, texts) in enumerate(TOPICS.items()):
        out.append({"query": f"what about {topic} {texts[0].split()[-1]}", "query_id": f"q{t}", "task": "qa",
                    "pos": [f"{topic.capitalize()} {texts[0]}"], "pos_index": [3 * t],
                    "neg": ["stale negative"], "neg_index": [99], "answers": [texts[1].split()[-1]],
                    "teacher_scores": [1.0, 0.0]})
    return out


def write_toy(folder) -> tuple[str, str]:
    """Write `corpus.json` and `train.json` (JSON lines) under `folder`; returns their paths."""
    os.makedirs(folder, exist_ok=True)
    corpus, train = os.path.join(folder, "corpus.json"), os.path.join(folder, "train.json")
    for path, rows in ((corpus, toy_corpus()), (train, toy_queries())):
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return corpus, train


def mine_cfg(tmp_path, extra=(), tiny_bert=None):
    data = tmp_path / "data"
    write_toy(data / "qa" / "toy")
    overrides = [f"data_root={data}", "input_data=llm-embedder:qa/toy/train.json",
                 "corpus=llm-embedder:qa/toy/corpus.json", f"output_dir={tmp_path}/out", "trainer=cpu",
                 "+trainer.enable_progress_bar=false", "query_max_length=128",
                 "key_max_length=128", "hits=20", "max_neg_num=5"]
    if tiny_bert:
        overrides += ["model=tiny_bert", f"model.model_name_or_path={tiny_bert}", "retriever.batch_size=8"]
    return compose(overrides + list(extra), config_name="mine")


# ---------------------------------------------------------------------------------------------------------------------
# the rules, by hand
# ---------------------------------------------------------------------------------------------------------------------

TEXTS = ["pos text", "a", "b", "Pos   TEXT", "c", "a", "the answer is 1984", "d"]


def test_positives_excluded_by_index_and_by_text():
    # the reference's filter `i != pos_index` (int vs list) never removed row 0; here it goes, and so does row 3,
    # whose text equals the positive after whitespace and case folding
    neg_index, neg, dropped = select_negatives([0, 1, 2, 3, 4], TEXTS, NegativeRule(), pos_index=[0], pos=["pos text"])
    assert neg_index == [1, 2, 4] and neg == ["a", "b", "c"]
    assert dropped == Counter({"positive (pos_index)": 1, "positive (same text as pos)": 1})


def test_rank_range_cap_duplicates_and_missing_results():
    rule = NegativeRule(rank_range=(2, 7), max_neg_num=3)
    neg_index, _, dropped = select_negatives([1, 2, -1, 4, 5, 7, 6, 0], TEXTS, rule)
    # positions 0-1 skipped, -1 ignored, row 5 repeats row 1's text... but row 1 was skipped, so 5 is kept
    assert neg_index == [4, 5, 7] and dropped["above rank range"] == 2
    neg_index, _, dropped = select_negatives([1, 5, 2], TEXTS, NegativeRule())
    assert neg_index == [1, 2] and dropped["duplicate text"] == 1


def test_rank_range_of_filtered_counts_only_the_hits_left_after_the_filters():
    """rank_range=(1, 3): over the ranking, positions 1-2 are a positive and row 5 (its text's first copy, row 1, is
    above the range), so one negative is left;
    over the filtered hits (sentence-transformers' range_min/range_max), the first passing hit is skipped and the
    next two are kept, however many positives and repeats rank among them."""
    ranked = [1, 0, 5, 3, 2, 4, 7]  # a, pos, a (repeat), Pos TEXT, b, c, d
    by_ranking = NegativeRule(rank_range=(1, 3))
    assert select_negatives(ranked, TEXTS, by_ranking, pos_index=[0], pos=["pos text"])[0] == [5]
    filtered = NegativeRule(rank_range=(1, 3), rank_range_of="filtered")
    neg_index, _, dropped = select_negatives(ranked, TEXTS, filtered, pos_index=[0], pos=["pos text"])
    assert neg_index == [2, 4]  # "a" is the first passing hit (skipped), then b and c; d is beyond hi
    assert dropped == Counter({"above rank range": 1, "positive (pos_index)": 1, "duplicate text": 1,
                               "positive (same text as pos)": 1})
    with pytest.raises(ValueError, match="rank_range_of"):
        NegativeRule(rank_range_of="positions")


def test_rank_range_of_filtered_mines_what_sentence_transformers_mines():
    """The same queries, corpus and model (the bundled all-MiniLM-L6-v2): `rank_range_of="filtered"` with
    rank_range [2, 5) keeps the very negatives `mine_hard_negatives(range_min=2, num_negatives=3, sampling top)`
    keeps, for queries with one and with several positives; counting over the ranking keeps others."""
    import numpy as np
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    from embedder.bundled import minilm_path

    corpus = [t for texts in TOPICS.values() for t in texts]
    positives = {"What is the capital of France?": [0, 1, 2], "Which fruit is yellow?": [9],
                 "How many strings does a guitar have?": [15, 16], "Where do banana plants grow?": [10]}
    model = SentenceTransformer(minilm_path(), device="cpu")
    pairs = Dataset.from_dict({"anchor": [q for q, rows in positives.items() for _ in rows],
                               "positive": [corpus[r] for rows in positives.values() for r in rows]})
    mined = mine_hard_negatives(pairs, model, corpus=corpus, range_min=2, num_negatives=3, sampling_strategy="top",
                                output_format="n-tuple", use_faiss=False, verbose=False)
    theirs = {row["anchor"]: [row[f"negative_{i}"] for i in (1, 2, 3)] for row in mined}
    q = model.encode(list(positives), normalize_embeddings=True)
    d = model.encode(corpus, normalize_embeddings=True)
    ours, over_ranking = {}, {}
    for query, qv in zip(positives, q):
        scores = d @ qv
        ranked = np.argsort(-scores)
        pos = [corpus[r] for r in positives[query]]
        for out, of in ((ours, "filtered"), (over_ranking, "ranking")):
            rule = NegativeRule(rank_range=(2, len(corpus)), rank_range_of=of, max_neg_num=3)
            out[query] = select_negatives(ranked, corpus, rule, pos_index=positives[query], pos=pos,
                                          scores=scores[ranked])[1]
    assert ours == theirs
    assert over_ranking != theirs  # France's 3 positives rank on top: counting them gives other negatives


def test_answer_filter_substring_and_token():
    ranked = [6, 1]
    assert select_negatives(ranked, TEXTS, NegativeRule(filter_answers=True), answers=["198"])[0] == [1]
    assert select_negatives(ranked, TEXTS, NegativeRule(filter_answers=True, answer_match="token"),
                            answers=["198"])[0] == [6, 1]  # "198" is not a whole token of "1984"
    assert select_negatives(ranked, TEXTS, NegativeRule(filter_answers=False), answers=["1984"])[0] == [6, 1]


def test_rule_validation():
    with pytest.raises(ValueError, match="rank_range"):
        NegativeRule(rank_range=(5, 5))
    with pytest.raises(ValueError, match="max_neg_num"):
        NegativeRule(max_neg_num=0)


# ---------------------------------------------------------------------------------------------------------------------
# bad input: file, line, field
# ---------------------------------------------------------------------------------------------------------------------

def _write(path, rows):
    with open(path, "w") as f:
        f.writelines((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    return str(path)


def test_bad_corpus_lines(tmp_path):
    dup = _write(tmp_path / "dup.json", [{"id": "a", "text": "x"}, {"id": "b", "text": "y"}, {"id": "a", "text": "z"}])
    with pytest.raises(DataError, match=r"dup.json, line 3, field 'id'.*duplicate document id 'a' \(first on line 1\)"):
        open_corpus(dup, "{text}")
    missing = _write(tmp_path / "missing.json", [{"title": "t", "text": "x"}, {"text": "no title"}])
    with pytest.raises(DataError, match=r"missing.json, line 2, field 'title'.*key_template"):
        open_corpus(missing, "{title} {text}")


def test_bad_query_lines_error_or_are_skipped_and_counted(tmp_path, caplog):
    path = _write(tmp_path / "train.json", [
        {"query": "fine", "pos_index": [1]},
        {"query": "   ", "pos_index": [0]},
        {"query": "outside", "pos_index": [0, 7]},
        {"query": "fine too"},
    ])
    with pytest.raises(DataError, match=r"train.json, line 2, field 'query': query is empty"):
        load_queries(path, corpus_size=5)
    with pytest.raises(DataError, match=r"t2.json, line 1, field 'pos_index'.*\[7\] outside the corpus \(5 documents"):
        load_queries(_write(tmp_path / "t2.json", [{"query": "x", "pos_index": [0, 7]}]), corpus_size=5)
    qf = load_queries(path, corpus_size=5, skip_bad=True)
    assert [r.line for r in qf.records] == [1, 4] and qf.total == 4
    assert qf.skipped == Counter({"empty query": 1, "pos_index outside the corpus": 1})
    assert "2 skipped (1 empty query, 1 pos_index outside the corpus)" in qf.report()


def test_mine_reports_bad_input_before_loading_a_model(tmp_path):
    cfg = mine_cfg(tmp_path, ["model.model_name_or_path=/nonexistent/model"])
    rows = read_jsonl(cfg.data_root + "/qa/toy/train.json")
    rows[4]["pos_index"] = [31]  # the corpus has rows 0..30
    _write(cfg.data_root + "/qa/toy/train.json", rows)
    from embedder.mining.run import run_mine

    with pytest.raises(DataError, match=r"train.json, line 5, field 'pos_index'"):
        run_mine(cfg)


# ---------------------------------------------------------------------------------------------------------------------
# mine.py end to end
# ---------------------------------------------------------------------------------------------------------------------

def _check_mined(cfg, out, lo, hi, max_neg):
    """The checks every mined file must pass, against the saved ranking."""
    originals = {r["query_id"]: r for r in toy_queries()}
    ranking = {r["query_id"]: r["pred"] for r in read_jsonl(out["result"])}
    corpus = open_corpus(cfg.data_root + "/qa/toy/corpus.json", cfg.key_template)
    mined = read_jsonl(out["output"])
    assert len(mined) == out["written"] > 0
    for rec in mined:
        orig = originals[rec["query_id"]]
        assert "teacher_scores" not in rec  # stale: they scored the old negatives
        assert {k: v for k, v in rec.items() if k not in ("neg", "neg_index")} == \
            {k: v for k, v in orig.items() if k not in ("neg", "neg_index", "teacher_scores")}
        assert 0 < len(rec["neg"]) <= max_neg and len(rec["neg"]) == len(rec["neg_index"])
        assert rec["neg"] == [corpus.texts[i] for i in rec["neg_index"]]
        assert not set(rec["neg_index"]) & set(rec["pos_index"])  # positives by index
        assert not {" ".join(t.split()).lower() for t in rec["neg"]} & {p.lower() for p in rec["pos"]}  # by text
        positions = [ranking[rec["query_id"]].index(i) for i in rec["neg_index"]]
        assert all(lo <= p < hi for p in positions) and positions == sorted(positions)  # rank range, in order


def test_dense_mining_end_to_end(tmp_path, tiny_bert):
    from embedder.mining.run import run_mine

    cfg = mine_cfg(tmp_path, ["save_name=tiny", "rank_range=[2,15]"], tiny_bert=tiny_bert)
    out = run_mine(cfg)
    assert out["output"] == cfg.data_root + "/qa/toy/train.neg.tiny.json"  # next to the input, reference name
    assert out["result"] == f"{tmp_path}/out/train.result.tiny.json"
    _check_mined(cfg, out, lo=2, hi=15, max_neg=5)
    meta = json.load(open(f"{tmp_path}/out/train.neg.tiny.meta.json"))
    assert meta["retriever"] == "dense" and meta["rank_range"] == [2, 15] and meta["written"] == out["written"]
    assert os.path.isdir(f"{tmp_path}/out/encode")
    assert any(p.endswith(".faiss") for p in os.listdir(f"{tmp_path}/out/index"))


@needs_bm25s
def test_bm25s_mining_catches_the_duplicate_positive(tmp_path):
    from embedder.mining.run import run_mine

    cfg = mine_cfg(tmp_path, ["retriever=bm25", "retriever.backend=bm25s", "save_to_output=true",
                              "save_name=bm25"])
    out = run_mine(cfg)
    assert out["output"] == f"{tmp_path}/out/train.neg.bm25.json"  # save_to_output
    _check_mined(cfg, out, lo=0, hi=20, max_neg=5)
    # query 0 retrieves row 0 and its twin (row 30) at the top; the twin is dropped by text, not kept as a negative
    ranking = read_jsonl(out["result"])[0]["pred"]
    assert {0, DUPLICATE_ROW} <= set(ranking[:3])
    assert out["dropped_candidates"]["positive (same text as pos)"] >= 1
    assert out["dropped_candidates"]["positive (pos_index)"] == 10


@needs_bm25s
def test_mining_resumes_finished_search_shards(tmp_path, monkeypatch):
    from embedder.mining.run import run_mine
    from embedder.retrieval import bm25

    cfg = mine_cfg(tmp_path, ["retriever=bm25", "retriever.backend=bm25s", "query_shard_size=3", "save_name=r"])
    calls: list[range] = []
    real = bm25.BM25sBM25.search

    def crash_on_third(self, rows, k):
        calls.append(rows)
        if len(calls) == 3:
            raise RuntimeError("simulated crash while searching")
        return real(self, rows, k)

    monkeypatch.setattr(bm25.BM25sBM25, "search", crash_on_third)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_mine(cfg)
    assert not os.path.exists(cfg.data_root + "/qa/toy/train.neg.r.json")  # no partial output
    calls.clear()
    monkeypatch.setattr(bm25.BM25sBM25, "search", lambda self, rows, k: calls.append(rows) or real(self, rows, k))
    out = run_mine(cfg)
    assert calls == [range(6, 9), range(9, 10)]  # shards 0 and 1 were loaded from disk, not searched again
    _check_mined(cfg, out, lo=0, hi=20, max_neg=5)


@needs_bm25s
def test_records_without_negatives_are_skipped_and_counted(tmp_path):
    from embedder.mining.run import run_mine

    cfg = mine_cfg(tmp_path, ["retriever=bm25", "retriever.backend=bm25s", "rank_range=[19,20]", "save_name=x"])
    out = run_mine(cfg)  # position 19 is a miss (score 0) for most queries: nothing left for them
    assert out["written"] + out["skipped_no_negatives"] == 10 and out["skipped_no_negatives"] > 0


@needs_bm25s
@pytest.mark.parametrize("extra, advice", [
    (["rank_range=[19,20]"], r"widen rank_range=\[19, 20\] or hits, or set random_fill"),
    (["relative_margin=0.99"], "relative_margin=0.99 dropped most candidates.*Set relative_margin=null"),
    ([], None)])
def test_many_queries_left_without_negatives_get_a_warning_that_names_the_filter(tmp_path, caplog, extra, advice):
    """Over 10% of the queries leaving training is worth a warning that says which setting to loosen: the margin
    filter when it dropped most candidates (a retriever whose scores barely separate documents), else the range."""
    import logging

    from embedder.mining.run import run_mine

    cfg = mine_cfg(tmp_path, ["retriever=bm25", "retriever.backend=bm25s", "save_name=x", *extra])
    with caplog.at_level(logging.WARNING, logger="embedder.mining.run"):
        out = run_mine(cfg)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if advice is None:  # the defaults on the toy data: every query keeps negatives
        assert out["skipped_no_negatives"] == 0 and not warnings
        return
    assert out["skipped_no_negatives"] > 1
    assert len(warnings) == 1 and re.search(rf"{out['skipped_no_negatives']} of 10 queries \(\d+%\) have no negatives "
                                            rf"left and leave training: {advice}", warnings[0]), warnings


def test_rank_range_beyond_hits_is_an_error(tmp_path):
    from embedder.mining.run import run_mine

    with pytest.raises(ValueError, match="beyond hits=20"):
        run_mine(mine_cfg(tmp_path, ["rank_range=[0,50]", "retriever=bm25"]))


def test_rank_range_forms_resolve_to_one_rule_for_mining_and_remining():
    """`mine.py` and re-mining during training build their rule with one helper: the same forms, the same check."""
    from embedder.mining.negatives import NegativeRule
    from embedder.remine import RemineNegatives

    assert NegativeRule.for_hits(100, None).rank_range == (0, 100)
    assert NegativeRule.for_hits(100, [10]).rank_range == (10, 100)
    assert NegativeRule.for_hits(100, [10, None]).rank_range == (10, 100)
    assert NegativeRule.for_hits(100, [3, 60], max_neg_num=7).max_neg_num == 7
    cb = RemineNegatives([1], "q.json", "out", hits=50, rank_range=[5, 30], random_fill=2)
    assert cb.rule == NegativeRule.for_hits(50, [5, 30], random_fill=2)
    cb = RemineNegatives([1], "q.json", "out", hits=50, rank_range=[5, 30], rank_range_of="filtered")
    assert cb.rule == NegativeRule.for_hits(50, [5, 30], rank_range_of="filtered") != NegativeRule.for_hits(50, [5, 30])
    with pytest.raises(ValueError, match="beyond hits=20"):
        RemineNegatives([1], "q.json", "out", hits=20, rank_range=[0, 50])


@pytest.mark.slow
def test_mine_py_defaults_use_the_bundled_sample_and_minilm(tmp_path):
    """`python mine.py` with no arguments: bundled sample data, bundled MiniLM, written under output_dir."""
    from embedder.mining.run import SAMPLE_DATA, run_mine

    if not os.path.isfile(os.path.join(SAMPLE_DATA, "qa", "train.json")):
        pytest.skip("the bundled sample data has not been generated yet")
    cfg = compose([f"output_dir={tmp_path}/out", "trainer=cpu"], config_name="mine")
    assert cfg.model.model_name_or_path.endswith("model") and cfg.retriever.name == "dense"
    out = run_mine(cfg)
    assert out["output"] == f"{tmp_path}/out/train.neg.json"  # never written inside the installed package
    mined = read_jsonl(out["output"])
    assert len(mined) == out["written"] > 0 and all("teacher_scores" not in r for r in mined)
    assert all(not set(r["neg_index"]) & set(r.get("pos_index", [])) for r in mined)


@pytest.mark.parametrize("config_name", ["mine", "eval"])
@pytest.mark.parametrize("retriever", ["dense", "bm25"])
def test_mine_and_eval_configs_compose(config_name, retriever):
    cfg = compose([f"retriever={retriever}"], config_name=config_name)
    assert cfg.retriever.name == retriever and cfg.output_dir
    if retriever == "bm25":
        assert (cfg.retriever.k1, cfg.retriever.b) == (0.82, 0.68)  # the reference's BM25 parameters


@pytest.mark.parametrize("index", ["flat", "hnsw", "ivf", "ivfpq"])
def test_index_configs_are_valid_faiss_factories(index):
    faiss = pytest.importorskip("faiss")
    cfg = compose([f"index={index}"], config_name="mine")
    built = faiss.index_factory(384, cfg.index.factory, faiss.METRIC_INNER_PRODUCT)  # MiniLM's dimension
    assert built.d == 384 and cfg.index.similarity == "auto"
    for name, value in cfg.index.search_params.items():
        faiss.ParameterSpace().set_index_parameter(built, name, value)


def test_one_run_at_a_time_per_corpus_cache_entry(tmp_path, caplog):
    """A second single-process run on the same corpus cache entry waits for the first (then reuses its stores);
    ranks of one distributed job never wait on each other."""
    import threading
    from types import SimpleNamespace

    from filelock import FileLock, Timeout

    from embedder.retrieval.dense import DenseRetriever, lock_path

    store = str(tmp_path / "encode" / "corpus-0123")
    held = DenseRetriever._cache_lock(SimpleNamespace(trainer=None), store)
    with held:
        with pytest.raises(Timeout):
            FileLock(lock_path(store)).acquire(timeout=0.2)
        got = []

        def second_run():
            with DenseRetriever._cache_lock(SimpleNamespace(trainer=None), store):
                got.append(True)

        waiter = threading.Thread(target=second_run)
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive() and not got  # the second run waits ...
    waiter.join(5)
    assert got  # ... and goes on once the first is done
    ddp = DenseRetriever._cache_lock(SimpleNamespace(trainer=SimpleNamespace(world_size=2)), store)
    with ddp, FileLock(lock_path(store)).acquire(timeout=0):
        pass  # no lock taken under DDP


class WordOverlapRetriever:
    """A retriever from outside the package, as a user adds one: documents ranked by the words they share with the
    query. It is its module plus a `retriever:` config naming it by `_target_`; mining needs nothing else."""

    name = "overlap"

    def __init__(self, work_dir: str, lowercase: bool = True):
        self.work_dir, self.lowercase = work_dir, lowercase

    def prepare(self, corpus_texts, queries) -> bool:
        norm = (lambda t: set(t.lower().split())) if self.lowercase else (lambda t: set(t.split()))
        self.docs, self.queries = [norm(t) for t in corpus_texts], [norm(q) for q in queries]
        return True

    def search(self, rows: range, k: int):
        import numpy as np

        scores = np.array([[len(self.queries[r] & d) for d in self.docs] for r in rows], np.float32)  # (n, N)
        ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, ids, 1), ids.astype(np.int64)

    def describe(self) -> dict:
        return {"retriever": self.name, "lowercase": self.lowercase}


def test_a_retriever_of_ones_own_is_a_config_entry(tmp_path):
    from omegaconf import OmegaConf, open_dict

    from embedder.mining.run import run_mine

    cfg = mine_cfg(tmp_path, ["save_name=overlap"])
    with open_dict(cfg):  # what configs/retriever/overlap.yaml would hold
        cfg.retriever = OmegaConf.create({"_target_": "tests.test_mining.WordOverlapRetriever", "_partial_": True,
                                          "name": "overlap", "uses_model": False, "lowercase": True})
    out = run_mine(cfg)
    _check_mined(cfg, out, lo=0, hi=20, max_neg=5)
    ranking = read_jsonl(out["result"])[0]["pred"]
    assert ranking[0] == 0 or DUPLICATE_ROW in ranking[:2]  # the query's own document (or its twin) shares most words
    assert not os.path.isdir(f"{tmp_path}/out/encode")  # no model was loaded, nothing was encoded
