"""`python -m embedder.evaluate`: standalone evaluation equals the in-training evaluation, writes its files, reuses
cached embeddings, evaluates saved models, task eval sets, rerank mode and BM25."""

from __future__ import annotations

import importlib.util
import json
import logging
import os

import pytest

from embedder.data.kinds import Instruction
from embedder.evaluation.eval_set import EvalSet
from embedder.evaluation.run import run_evaluate
from embedder.modeling.encoder import DualEncoder
from tests.conftest import compose
from tests.test_mining import write_toy

TOOL_QUERY = "Transform this user request for fetching helpful tool descriptions: "
TOOL_KEY = "Transform this tool description for retrieval: "


def eval_cfg(tmp_path, tiny_bert, extra=()):
    data = tmp_path / "data"
    write_toy(data / "toy")
    return compose([f"data_root={data}", "eval_data=llm-embedder:toy/train.json", "corpus=llm-embedder:toy/corpus.json",
                    "eval_name=toy", f"output_dir={tmp_path}/out", "model=tiny_bert",
                    f"model.model_name_or_path={tiny_bert}", "trainer=cpu", "+trainer.enable_progress_bar=false",
                    "query_max_length=128", "key_max_length=128", "metrics=[mrr,recall,ndcg,map,nq]", "cutoffs=[1,5,10]",
                    "hits=10", "instruction_kind=tool", "task=tool", "retriever.batch_size=8", *extra], "eval")


def test_standalone_equals_in_training_evaluation(tmp_path, tiny_bert):
    cfg = eval_cfg(tmp_path, tiny_bert)
    metrics = run_evaluate(cfg)

    encoder = DualEncoder(tiny_bert, pooling="cls")
    in_training = EvalSet("toy", f"{cfg.data_root}/toy/train.json", f"{cfg.data_root}/toy/corpus.json",
                          Instruction(TOOL_QUERY, TOOL_KEY), data_root=None,
                          metrics=["mrr", "recall", "ndcg", "map", "nq"], cutoffs=[1, 5, 10], hits=10,
                          query_max_length=128, key_max_length=128, batch_size=8)
    expected = in_training.evaluate(encoder)
    assert len({tuple(p) for p in in_training.preds.values()}) > 1  # real rankings (the queries' lists differ)
    assert set(metrics) == {f"toy/{k}" for k in expected}
    for k, v in expected.items():
        assert metrics[f"toy/{k}"] == pytest.approx(v, abs=1e-9), k
    assert {k: v for k, v in in_training.preds.items()} == \
        {r["query_id"]: r["pred"] for r in map(json.loads, open(f"{tmp_path}/out/toy.result.json"))}

    saved = json.load(open(f"{tmp_path}/out/metrics.json"))
    assert saved["toy"] == pytest.approx({k[len("toy/"):]: v for k, v in metrics.items()})
    assert saved["_run"]["model"] == tiny_bert and saved["_run"]["version"] == "llm-embedder"
    rows = [json.loads(x) for x in open(f"{tmp_path}/out/toy.result.json")]
    assert len(rows) == 10 and all(len(r["pred"]) == len(r["scores"]) == 10 for r in rows)
    assert all(r["scores"] == sorted(r["scores"], reverse=True) for r in rows)


def test_second_run_reuses_corpus_embeddings_and_index(tmp_path, tiny_bert, caplog):
    cfg = eval_cfg(tmp_path, tiny_bert)
    first = run_evaluate(cfg)
    with caplog.at_level(logging.INFO):
        second = run_evaluate(eval_cfg(tmp_path, tiny_bert, ["cutoffs=[1,3]"]))
    assert "every shard is already encoded" in caplog.text and "reusing the faiss index" in caplog.text
    assert second["toy/mrr@1"] == first["toy/mrr@1"]


def test_truncate_dims_report_each_size_from_one_encoding(tmp_path):
    """truncate_dims=[384,64,16] (a Matryoshka model's sizes) with the real MiniLM (the random tiny BERT embeds
    every text alike, so its rankings are ties): each size scored from the one stored encoding (one corpus store),
    equal to a separate run whose encoder truncates (model.truncate_dim, sentence-transformers' truncate_dim); the
    full size equals the plain result, and 16 dimensions rank differently."""
    from embedder.bundled import minilm_path

    minilm = [minilm_path(), "model.pooling=mean"]
    metrics = run_evaluate(eval_cfg(tmp_path / "a", minilm[0], [minilm[1], "truncate_dims=[384,64,16]"]))
    assert {k.split("/")[1] for k in metrics if k.count("/") == 2} == {"dim384", "dim64", "dim16"}
    stores = [d for d in os.listdir(tmp_path / "a" / "out" / "encode") if d.startswith("corpus-")]
    assert len(stores) == 1
    keys = ("mrr@10", "ndcg@10", "recall@5", "map@10")
    assert all(metrics[f"toy/dim384/{k}"] == pytest.approx(metrics[f"toy/{k}"], abs=1e-9) for k in keys)
    alone = run_evaluate(eval_cfg(tmp_path / "b", minilm[0], [minilm[1], "model.truncate_dim=16"]))
    for k, v in alone.items():
        assert metrics[k.replace("toy/", "toy/dim16/")] == pytest.approx(v, abs=1e-6), k
    preds = {}
    for run in ("a", "b"):
        preds[run] = [json.loads(x)["pred"] for x in open(tmp_path / run / "out" / "toy.result.json")]
    assert preds["a"] != preds["b"]  # 16 dimensions rank the corpus differently from 384
    saved = json.load(open(f"{tmp_path}/a/out/metrics.json"))
    assert list(saved)[:4] == ["toy", "toy/dim384", "toy/dim64", "toy/dim16"]


def test_a_saved_training_output_evaluates_like_the_in_memory_model(tmp_path, tiny_bert):
    encoder = DualEncoder(tiny_bert, pooling="mean", normalize=False)  # differs from the model config on purpose
    encoder.save(str(tmp_path / "trained"))
    from_folder = run_evaluate(eval_cfg(tmp_path, tiny_bert, [f"model_path={tmp_path}/trained",
                                                              f"output_dir={tmp_path}/o1", "metrics=[ndcg]"]))
    in_training = EvalSet("toy", f"{tmp_path}/data/toy/train.json", f"{tmp_path}/data/toy/corpus.json",
                          Instruction(TOOL_QUERY, TOOL_KEY), data_root=None, metrics=["ndcg"], cutoffs=[1, 5, 10],
                          hits=10, query_max_length=128, key_max_length=128, batch_size=8)
    expected = in_training.evaluate(encoder)  # ip metric, since normalize=False
    assert from_folder == pytest.approx({f"toy/{k}": v for k, v in expected.items()}, abs=1e-9)


def test_task_eval_sets_with_their_instructions(tmp_path, tiny_bert):
    data = tmp_path / "data"
    corpus, train = write_toy(data / "tool" / "toolbench")
    os.rename(train, data / "tool" / "toolbench" / "test.json")
    cfg = compose([f"data_root={data}", "task=tool", f"output_dir={tmp_path}/out", "model=tiny_bert",
                   f"model.model_name_or_path={tiny_bert}", "trainer=cpu", "+trainer.enable_progress_bar=false",
                   "query_max_length=128", "key_max_length=128"], "eval")
    metrics = run_evaluate(cfg)
    assert set(metrics) == {f"tool/{m}@{k}" for m in ("mrr", "recall", "ndcg") for k in (1, 3, 5)}  # task=tool's set
    # the instructions came from tasks.tool (version=llm-embedder): the cached query store holds them
    encode_dir = f"{tmp_path}/out/encode"
    metas = [json.load(open(f"{encode_dir}/{d}/meta.json")) for d in os.listdir(encode_dir)]
    assert {m["info"]["kind"] for m in metas} == {"query", "key"}


@pytest.mark.skipif(importlib.util.find_spec("bm25s") is None, reason="needs bm25s (pip install bm25s)")
def test_rerank_mode_and_bm25(tmp_path, tiny_bert):
    data = tmp_path / "data"
    corpus, train = write_toy(data / "toy")
    rows = [json.loads(x) for x in open(train)]
    corpus_rows = [json.loads(x) for x in open(corpus)]
    with open(data / "toy" / "rerank.json", "w") as f:
        for r in rows:  # candidates: the positive and two other rows, positive last
            cand = [(r["pos_index"][0] + 3) % 30, (r["pos_index"][0] + 6) % 30, r["pos_index"][0]]
            f.write(json.dumps({**r, "key": [f"{corpus_rows[c]['title']} {corpus_rows[c]['text']}" for c in cand],
                                "key_index": cand}) + "\n")
    reranked = run_evaluate(eval_cfg(tmp_path, tiny_bert, [
        "eval_data=llm-embedder:toy/rerank.json", "corpus=null", "mode=rerank", "metrics=[mrr,recall]", "cutoffs=[3]",
        "eval_name=rerank"]))
    assert reranked["rerank/recall@3"] == 1.0  # all three candidates are returned

    bm25 = run_evaluate(compose([f"data_root={data}", "eval_data=llm-embedder:toy/train.json",
                                 "corpus=llm-embedder:toy/corpus.json", f"output_dir={tmp_path}/bm25", "retriever=bm25",
                                 "retriever.backend=bm25s", "metrics=[mrr,ndcg]", "cutoffs=[1,10]"], "eval"))
    assert bm25["train/mrr@10"] > 0.5  # lexical overlap finds the right topic


def test_nothing_to_evaluate_is_explained(tmp_path):
    with pytest.raises(ValueError, match="nothing to evaluate"):
        run_evaluate(compose(["task=msmarco", f"output_dir={tmp_path}"], "eval"))


def test_graded_qrels_give_one_ndcg_in_training_and_standalone(tmp_path, tiny_bert):
    """Graded qrels (BEIR scores 1 and 2): the in-training EvalSet and `embedder.evaluate` both report trec_eval's
    graded nDCG, the same number; it is not the binary nDCG of the same rankings."""
    from embedder.evaluation.metrics import compute_metrics, graded_ndcg

    cfg = eval_cfg(tmp_path, tiny_bert, extra=["metrics=[ndcg,recall]"])
    path = f"{cfg.data_root}/toy/train.json"
    records = [json.loads(x) for x in open(path)]
    n_corpus = sum(1 for _ in open(f"{cfg.data_root}/toy/corpus.json"))
    for i, rec in enumerate(records):  # several relevant rows per query, graded 2 (directly relevant) or 1
        rec["pos_index"] = sorted({*rec["pos_index"], (i * 7 + 3) % n_corpus, (i * 5 + 11) % n_corpus})
        rec["pos_relevance"] = [2 if j % 2 == 0 else 1 for j in range(len(rec["pos_index"]))]
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)

    standalone = run_evaluate(cfg)
    in_training = EvalSet("toy", path, f"{cfg.data_root}/toy/corpus.json", Instruction(TOOL_QUERY, TOOL_KEY),
                          data_root=None, metrics=["ndcg", "recall"], cutoffs=[1, 5, 10], hits=10,
                          query_max_length=128, key_max_length=128, batch_size=8)
    metrics = in_training.evaluate(DualEncoder(tiny_bert, pooling="cls"))
    for k, v in metrics.items():
        assert standalone[f"toy/{k}"] == pytest.approx(v, abs=1e-9), k
    qrels = {r["query_id"]: dict(zip(r["pos_index"], r["pos_relevance"])) for r in records}
    graded = graded_ndcg(in_training.preds, qrels, [1, 5, 10])
    binary = compute_metrics(in_training.preds, {q: list(g) for q, g in qrels.items()}, ["ndcg"], [1, 5, 10])
    assert metrics["ndcg@10"] == pytest.approx(graded["ndcg@10"], abs=1e-12)
    assert abs(metrics["ndcg@10"] - binary["ndcg@10"]) > 1e-4  # the grades change the number


def test_bad_pos_relevance_is_one_line_with_file_and_line(tmp_path, tiny_bert):
    from embedder.errors import DataError

    cfg = eval_cfg(tmp_path, tiny_bert)
    path = f"{cfg.data_root}/toy/train.json"
    records = [json.loads(x) for x in open(path)]
    records[2]["pos_relevance"] = [1] * (len(records[2]["pos_index"]) + 1)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    with pytest.raises(DataError) as err:
        EvalSet("toy", path, f"{cfg.data_root}/toy/corpus.json", Instruction("", ""), data_root=None)
    assert "pos_relevance" in str(err.value) and "train.json, line 3" in str(err.value)
