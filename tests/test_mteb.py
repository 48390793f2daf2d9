"""MTEB through `python -m embedder.evaluate mteb_tasks=[...]`, offline: a local retrieval task built from the sample
data stands in for a Hub task (mteb.get_tasks is pointed at it), run on a trained export with its prompts."""

from __future__ import annotations

import json
import os

import pytest

from tests.conftest import ROOT, compose

mteb = pytest.importorskip("mteb")

SAMPLE = os.path.join(ROOT, "embedder", "sample_data", "qa")


def local_task():
    """The sample qa test set as an MTEB retrieval task (corpus rows, queries, graded qrels)."""
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
    from mteb.abstasks.task_metadata import TaskMetadata

    corpus = [json.loads(x) for x in open(os.path.join(SAMPLE, "corpus.json"))]
    queries = [json.loads(x) for x in open(os.path.join(SAMPLE, "test.json"))][:40]
    keep = sorted({p for q in queries for p in q["pos_index"]} | set(range(40)))  # a small corpus: seconds on CPU

    class SampleQARetrieval(AbsTaskRetrieval):
        metadata = TaskMetadata(
            name="SampleQARetrieval", description="embedder's bundled sample qa set", reference=None,
            dataset={"path": "local/sample-qa", "revision": "1"}, type="Retrieval", category="t2t",
            eval_splits=["test"], eval_langs=["eng-Latn"], main_score="ndcg_at_10", date=("2026-01-01", "2026-01-01"),
            domains=[], task_subtypes=[], license="apache-2.0", annotations_creators="derived", dialect=[],
            sample_creation="created", bibtex_citation="", modalities=["text"])

        def load_data(self, **kwargs):
            split = RetrievalSplitData(
                queries=Dataset.from_list([{"id": str(q["query_id"]), "text": q["query"]} for q in queries]),
                corpus=Dataset.from_list([{"id": str(i), "title": corpus[i]["title"], "text": corpus[i]["text"]}
                                          for i in keep]),
                relevant_docs={str(q["query_id"]): {str(p): 1 for p in q["pos_index"]} for q in queries},
                top_ranked=None)
            self.dataset = {"default": {"test": split}}
            self.data_loaded = True

    return SampleQARetrieval()


def test_mteb_task_runs_on_an_export_with_its_prompts(tmp_path, tiny_bert, monkeypatch):
    from embedder.evaluation import mteb_tasks
    from embedder.evaluation.run import run_evaluate
    from embedder.training import run_train
    from tests.conftest import quick_overrides, toy_path

    run_train(compose(quick_overrides(tmp_path / "train", tiny_bert, ["task=nq", f"train_data=[{toy_path('qa')}]",
                                                                       "eval=null", "trainer.max_steps=1"])))
    export = str(tmp_path / "train" / "out")
    seen = {}
    real = mteb_tasks.sentence_transformer

    def spy(*a, **k):
        seen["model"] = real(*a, **k)
        return seen["model"]

    monkeypatch.setattr(mteb_tasks, "sentence_transformer", spy)
    monkeypatch.setattr(mteb, "get_tasks", lambda tasks: [local_task()] if tasks == ["SampleQARetrieval"] else [])
    cfg = compose(["mteb_tasks=[SampleQARetrieval]", f"model_path={export}", f"output_dir={tmp_path}/eval"], "eval")
    metrics = run_evaluate(cfg)
    assert 0 < metrics["mteb/SampleQARetrieval/main_score"] <= 1
    assert metrics["mteb/SampleQARetrieval/test/ndcg_at_10"] == metrics["mteb/SampleQARetrieval/main_score"]
    assert seen["model"].prompts["query"] == seen["model"].prompts["qa_query"] != ""  # the trained instruction
    saved = json.load(open(tmp_path / "eval" / "metrics.json"))
    assert saved["mteb"] == metrics and saved["model"] == export

    with pytest.raises(ValueError, match=r"unknown MTEB tasks \['NoSuchTask'\]"):
        run_evaluate(compose(["mteb_tasks=[NoSuchTask]", f"model_path={export}", f"output_dir={tmp_path}/e2"], "eval"))
