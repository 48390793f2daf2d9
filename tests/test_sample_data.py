"""Fast checks of the sample data shipped in embedder/sample_data (no model is loaded)."""

from __future__ import annotations

import os

import pytest

import embedder
from tests.conftest import read_jsonl

ROOT = os.path.join(os.path.dirname(embedder.__file__), "sample_data")
ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository (tools/)

FILES = ["qa/train.json", "qa/test.json", "qa/corpus.json",
         "tool/train.json", "tool/test.json", "tool/corpus.json",
         "convsearch/train.json", "convsearch/test.json", "convsearch/corpus.json",
         "icl/train.json", "chat/train.json", "lrlm/train.json"]

TRAIN_FIELDS = {
    "qa": {"query", "query_id", "answers", "pos", "neg", "pos_index", "neg_index", "task", "teacher_scores"},
    "tool": {"query", "qid", "pos", "neg", "task"},
    "convsearch": {"query", "answers", "pos_index", "query_id", "task", "pos", "neg", "neg_index"},
    "icl": {"query", "pos", "neg", "teacher_scores", "task"},
    "chat": {"history", "query", "query_id", "answers", "task", "teacher_scores"},
    "lrlm": {"query_id", "query", "answers", "pos", "neg", "context", "task", "teacher_scores"},
}
TEST_FIELDS = {
    "qa": {"query", "query_id", "pos_index", "answers", "task"},
    "tool": {"query", "query_id", "pos_index", "task"},
    "convsearch": {"query", "query_id", "pos_index", "answers", "task"},
}
KEY_TEMPLATE = {"qa": "{title} {text}", "tool": "{text}", "convsearch": "{text}"}


def load(rel: str) -> list[dict]:
    return read_jsonl(os.path.join(ROOT, rel))


@pytest.mark.parametrize("rel", FILES)
def test_every_file_parses_and_is_nonempty(rel):
    records = load(rel)
    assert len(records) > 0
    if not rel.endswith("corpus.json"):
        task = rel.split("/")[0]
        assert {r["task"] for r in records} == {task}


def test_record_counts():
    n = {rel: len(load(rel)) for rel in FILES}
    assert n["qa/train.json"] >= 250 and n["qa/test.json"] >= 50 and 600 <= n["qa/corpus.json"] <= 1500
    assert n["tool/train.json"] >= 120 and n["tool/test.json"] >= 30 and 150 <= n["tool/corpus.json"] <= 250
    assert n["convsearch/train.json"] >= 120 and n["convsearch/test.json"] >= 30
    for rel in ("icl/train.json", "chat/train.json", "lrlm/train.json"):
        assert 60 <= n[rel] <= 100


def test_total_size_is_small():
    total = sum(os.path.getsize(os.path.join(ROOT, rel)) for rel in FILES)
    assert total < 3.2 * 1024 * 1024


@pytest.mark.parametrize("task", sorted(TRAIN_FIELDS))
def test_train_fields_and_teacher_scores(task):
    for r in load(f"{task}/train.json"):
        assert set(r) == TRAIN_FIELDS[task], (task, set(r) ^ TRAIN_FIELDS[task])
        assert isinstance(r["query"], str) and r["query"]
        if "teacher_scores" in r:
            ts = r["teacher_scores"]
            assert all(isinstance(s, float) and s <= 0 for s in ts)
            if task == "chat":
                assert len(ts) == len(r["history"])
            else:
                assert len(ts) == len(r["pos"]) + len(r["neg"])
        if task == "qa":
            assert isinstance(r["query_id"], int) and len(r["pos"]) == 1 and 15 <= len(r["neg"]) <= 30
            assert len(r["pos_index"]) == len(r["pos"]) and len(r["neg_index"]) == len(r["neg"])
        elif task == "tool":
            assert isinstance(r["qid"], str) and r["pos"] and 10 <= len(r["neg"]) <= 20
        elif task == "convsearch":
            assert len(r["pos_index"]) == len(r["pos"]) == 1 and len(r["neg_index"]) == len(r["neg"]) >= 10
        elif task == "icl":
            ts = r["teacher_scores"]
            assert len(r["pos"]) == 3 and len(ts) == 15 and ts == sorted(ts, reverse=True)
        elif task == "chat":
            assert 6 <= len(r["history"]) <= 10 and len(r["answers"]) == 1
            assert all(h.startswith("Speaker 1: ") and "\nSpeaker 2: " in h for h in r["history"])
        elif task == "lrlm":
            ts = r["teacher_scores"]
            assert r["pos"] == [] and r["context"] == "" and 16 <= len(r["neg"]) <= 24 and len(r["answers"]) == 1
            assert -2.9 <= min(ts) and max(ts) <= -1.8 and max(ts) - min(ts) >= 0.1


def test_qa_positive_is_usually_the_teachers_favourite():
    records = load("qa/train.json")
    top = sum(r["teacher_scores"][0] == max(r["teacher_scores"]) for r in records)
    assert 0.8 * len(records) <= top < len(records)  # usually, but not always


def test_chat_relevant_turn_scores_highest_and_is_unique():
    for r in load("chat/train.json"):
        ts = r["teacher_scores"]
        assert sorted(ts)[-1] - sorted(ts)[-2] >= 0.1


@pytest.mark.parametrize("task", ["qa", "convsearch"])
def test_indexed_texts_equal_corpus_rows(task):
    corpus = load(f"{task}/corpus.json")
    assert all(set(c) == {"title", "text"} for c in corpus)
    keys = [KEY_TEMPLATE[task].format(**c) for c in corpus]
    assert len(set(keys)) == len(keys)
    for r in load(f"{task}/train.json"):
        assert r["pos"] == [keys[i] for i in r["pos_index"]]
        assert r["neg"] == [keys[i] for i in r["neg_index"]]
        assert not set(r["pos_index"]) & set(r["neg_index"])


def test_tool_texts_come_from_the_corpus():
    corpus = load("tool/corpus.json")
    assert all(set(c) == {"text"} for c in corpus)
    texts = [c["text"] for c in corpus]
    assert len(set(texts)) == len(texts)
    known = set(texts)
    assert all(t.count(", ") >= 3 and "required_params: [" in t and "optional_params: [" in t for t in texts)
    for r in load("tool/train.json"):
        assert set(r["pos"]) <= known and set(r["neg"]) <= known and not set(r["pos"]) & set(r["neg"])


@pytest.mark.parametrize("task", sorted(TEST_FIELDS))
def test_eval_sets_are_valid_and_held_out(task):
    corpus = load(f"{task}/corpus.json")
    train = load(f"{task}/train.json")
    test = load(f"{task}/test.json")
    ids = set()
    for r in test:
        assert set(r) == TEST_FIELDS[task]
        assert r["pos_index"] and all(0 <= i < len(corpus) for i in r["pos_index"])
        ids.add(r["query_id"])
    assert len(ids) == len(test)
    test_queries = [r["query"] for r in test]
    assert len(set(test_queries)) == len(test_queries)
    assert not set(test_queries) & {r["query"] for r in train}


def test_qa_test_entities_never_appear_as_training_positives():
    corpus = load("qa/corpus.json")
    train_titles = {corpus[i]["title"] for r in load("qa/train.json") for i in r["pos_index"]}
    test_titles = {corpus[i]["title"] for r in load("qa/test.json") for i in r["pos_index"]}
    assert not train_titles & test_titles


def test_build_is_deterministic_and_matches_committed_files(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_sample_data", os.path.join(ROOT_DIR, "tools",
                                                                                   "build_sample_data.py"))
    sample_build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sample_build)
    counts = sample_build.build(str(tmp_path))
    assert sorted(counts) == sorted(FILES)
    for rel in FILES:
        with open(os.path.join(ROOT, rel), "rb") as a, open(os.path.join(tmp_path, rel), "rb") as b:
            assert a.read() == b.read(), f"{rel} differs; rerun `python tools/build_sample_data.py`"
