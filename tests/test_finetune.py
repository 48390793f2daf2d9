"""`task=beir`: one command from a BEIR folder to a mined, fine-tuned, evaluated model (embedder/finetune.py), on a
BEIR folder built from the bundled sample data; the split, the cache, the negative merge and the margin filter."""

from __future__ import annotations

import gzip
import json
import logging
import os

import numpy as np
import pytest

from embedder.data.beir import prepare_beir, split_query_ids
from embedder.errors import DataError
from embedder.mining.negatives import NegativeRule, fill_with_random, merge_negatives, random_rows, select_negatives
from tests.conftest import compose, quick_overrides
from tests.test_train import _metrics_rows

SAMPLE_QA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "embedder", "sample_data", "qa")


def write_sample_beir(folder, n_train: int = 40, n_test: int = 12, with_test: bool = True) -> str:
    """A BEIR folder (gzipped corpus, no dev split) from the bundled qa sample: its corpus, train and test queries."""
    os.makedirs(os.path.join(folder, "qrels"), exist_ok=True)
    with open(os.path.join(SAMPLE_QA, "corpus.json")) as f:
        docs = [json.loads(line) for line in f]
    with gzip.open(os.path.join(folder, "corpus.jsonl.gz"), "wt") as f:
        f.writelines(json.dumps({"_id": f"doc{i}", "title": d["title"], "text": d["text"]}) + "\n"
                     for i, d in enumerate(docs))
    queries, qrels = [], {"train": [], "test": []}
    for split, name, n in (("train", "train.json", n_train), ("test", "test.json", n_test)):
        with open(os.path.join(SAMPLE_QA, name)) as f:
            for line in list(f)[:n]:
                rec = json.loads(line)
                qid = f"{split}-{rec['query_id']}"
                queries.append({"_id": qid, "text": rec["query"]})
                qrels[split] += [f"{qid}\tdoc{row}\t1" for row in rec["pos_index"]]
    with open(os.path.join(folder, "queries.jsonl"), "w") as f:
        f.writelines(json.dumps(q) + "\n" for q in queries)
    for split, rows in qrels.items():
        if split == "test" and not with_test:
            continue
        with open(os.path.join(folder, "qrels", f"{split}.tsv"), "w") as f:
            f.write("query-id\tcorpus-id\tscore\n" + "\n".join(rows) + "\n")
    return str(folder)


def test_the_dev_split_is_seeded_and_independent_of_input_order():
    ids = [str(i) for i in range(100)]
    train, dev = split_query_ids(ids, 0.2, seed=42)
    assert len(dev) == 20 and len(train) == 80 and not set(train) & set(dev)
    assert split_query_ids(list(reversed(ids)), 0.2, seed=42) == (train, dev)  # same split whatever the order
    assert split_query_ids(ids, 0.2, seed=7)[1] != dev
    with pytest.raises(ValueError, match="dev_fraction"):
        split_query_ids(ids, 1.5, seed=42)


def test_prepare_holds_out_dev_reads_gzip_and_is_cached(tmp_path, caplog):
    folder = write_sample_beir(tmp_path / "beir")
    caplog.set_level(logging.INFO, logger="embedder.data.beir")
    first = prepare_beir(folder, str(tmp_path / "data"), dev_fraction=0.25, seed=1)
    assert first["counts"] == {"documents": 1280, "train": 30, "dev": 10, "test": 12}
    assert first["dev_held_out_from_train"] == 10
    with open(first["paths"]["train"]) as f:
        rec = json.loads(f.readline())
    with open(first["paths"]["corpus"]) as f:
        corpus = [json.loads(line) for line in f]
    row = rec["pos_index"][0]  # the positive's text is its corpus row's "{title} {text}"
    assert rec["pos"][0] == f"{corpus[row]['title']} {corpus[row]['text']}" and corpus[row]["id"] == f"doc{row}"
    with open(first["paths"]["dev"]) as f:
        dev = [json.loads(line) for line in f]
    assert all(d["query_id"].startswith("train-") and d["pos_relevance"] == [1] for d in dev)
    stamps = {k: os.path.getmtime(p) for k, p in first["paths"].items()}
    caplog.clear()
    again = prepare_beir(folder, str(tmp_path / "data"), dev_fraction=0.25, seed=1)
    assert again["paths"] == first["paths"] and "reusing it" in caplog.text
    assert {k: os.path.getmtime(p) for k, p in again["paths"].items()} == stamps  # nothing rewritten
    other = prepare_beir(folder, str(tmp_path / "data"), dev_fraction=0.5, seed=1)  # a new setting: redone
    assert other["counts"]["dev"] == 20


def test_a_folder_without_train_qrels_names_what_is_there(tmp_path):
    folder = write_sample_beir(tmp_path / "beir")
    os.remove(os.path.join(folder, "qrels", "train.tsv"))
    with pytest.raises(FileNotFoundError, match=r"qrels/train.tsv not found \(qrels present: \['test.tsv'\]\)"):
        prepare_beir(folder, str(tmp_path / "data"))


def _jsonl(path, *records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_merged_negatives_alternate_between_retrievers_without_duplicates(tmp_path):
    train = _jsonl(tmp_path / "train.json", *({"query_id": q, "query": q, "pos": ["p"]} for q in "1234"))
    a = _jsonl(tmp_path / "a.json", {"query_id": "1", "query": "q", "pos": ["p"], "neg": ["x", "y"], "neg_index": [5, 6]},
               {"query_id": "2", "query": "r", "pos": ["p"], "neg": ["u"], "neg_index": [1]})
    b = _jsonl(tmp_path / "b.json", {"query_id": "1", "query": "q", "pos": ["p"], "neg": ["z", "x"], "neg_index": [7, 5]},
               {"query_id": "4", "query": "s", "pos": ["p"], "neg": ["v"], "neg_index": [2]})
    merged = list(merge_negatives(train, [a, b], max_neg_num=10))
    assert [m["query_id"] for m in merged] == ["1", "2", "4"]  # query 3 has no negatives anywhere: left out
    assert merged[0]["neg_index"] == [5, 7, 6] and merged[0]["neg"] == ["x", "z", "y"]
    assert merged[1]["neg_index"] == [1]  # only the first retriever found negatives for query 2
    assert merged[2]["neg_index"] == [2] and merged[2]["query"] == "s"  # only the second for query 4
    assert list(merge_negatives(train, [a, b], max_neg_num=2))[0]["neg_index"] == [5, 7]


def test_negatives_mined_from_another_train_file_are_refused(tmp_path):
    train = _jsonl(tmp_path / "train.json", {"query_id": "1", "query": "q", "pos": ["p"]})
    stale = _jsonl(tmp_path / "a.json", {"query_id": "9", "query": "q", "pos": ["p"], "neg": ["x"], "neg_index": [5]})
    with pytest.raises(DataError, match="out of step with the train file"):
        list(merge_negatives(train, [stale], max_neg_num=10))


def test_the_relative_margin_drops_candidates_scoring_close_to_the_positive():
    texts = {i: f"doc {i}" for i in range(6)}
    ranked, scores = [3, 0, 4, 1, 5, 2], [0.90, 0.85, 0.83, 0.70, 0.50, 0.40]  # row 0 is the positive
    rule = NegativeRule(max_neg_num=10, relative_margin=0.05)  # ceiling 0.85 * 0.95 = 0.8075
    neg_index, _, dropped = select_negatives(ranked, texts, rule, pos_index=[0], scores=scores)
    assert neg_index == [1, 5, 2]
    assert dropped["within the margin of a positive (likely false negative)"] == 2  # rows 3 and 4
    assert select_negatives(ranked, texts, NegativeRule(max_neg_num=10), pos_index=[0])[0] == [3, 4, 1, 5, 2]
    # the positive was not retrieved: no score to compare with, nothing dropped by the margin
    assert select_negatives([3, 4], texts, rule, pos_index=[0], scores=[0.9, 0.8])[0] == [3, 4]
    with pytest.raises(ValueError, match="relative_margin"):
        NegativeRule(relative_margin=1.0)


def test_a_short_negative_list_is_filled_with_random_passages_that_are_not_positives():
    texts = {0: "The positive.", 1: "a doc", 2: "  the POSITIVE. ", 3: "A  DOC", 4: "other", 5: "more", 6: "last"}
    neg_index, neg = [1], ["a doc"]
    # row 0 is a positive by row, row 2 by text, row 1 is already a negative, row 3 repeats its text
    added = fill_with_random(neg_index, neg, 3, [0, 1, 2, 3, 4, 5, 6], texts, pos_index=[0], pos=["the positive."])
    assert added == 2 and neg_index == [1, 4, 5] and neg == ["a doc", "other", "more"]
    assert fill_with_random(neg_index, neg, 3, [6], texts) == 0  # already full: untouched
    few_index, few = [], []
    assert fill_with_random(few_index, few, 5, [0, 6], texts, pos_index=[0]) == 1 and few_index == [6]  # ran out
    # the draw: distinct rows, the same for a record whatever block or rerun draws it, different across records
    draw = random_rows(1000, record_row=7, need=2, n_pos=3, seed=42)
    assert len(draw) == len(set(draw.tolist())) == 13 and draw.max() < 1000
    assert random_rows(1000, 7, 2, 3, 42).tolist() == draw.tolist()
    assert random_rows(1000, 8, 2, 3, 42).tolist() != draw.tolist()
    assert sorted(random_rows(5, 7, 2, 3, 42).tolist()) == [0, 1, 2, 3, 4]  # a corpus smaller than the draw: all
    with pytest.raises(ValueError, match="random_fill"):
        NegativeRule(max_neg_num=3, random_fill=4)


def _mine_bm25(folder, prepared, out: str, *overrides: str, retrievers: str = "[bm25]") -> str:
    """`task=beir`'s mining step on `folder`'s prepared split with `beir.negatives.*` overrides: the mined file."""
    from embedder.config import compose as compose_config
    from embedder.recipes.beir import mine_negatives

    cfg = compose_config("train", ["task=beir", f"beir.folder={folder}", f"beir.negatives.retrievers={retrievers}",
                                   *(f"beir.negatives.{o}" for o in overrides), f"output_dir={out}-out"])
    return mine_negatives(cfg, prepared, out)


def test_random_fill_keeps_queries_that_mining_left_without_negatives(tmp_path, caplog):
    """BM25 mining from the top hit only: where that hit is the positive the query has no negative and leaves the
    training file; beir.negatives.random_fill=2 keeps every query, each with 2 negatives that are not positives,
    counts the filled queries, and changes the cache key (so switching it re-mines)."""

    folder = write_sample_beir(tmp_path / "beir")
    prepared = prepare_beir(folder, str(tmp_path / "prepared"))
    n_train = sum(1 for _ in open(prepared["paths"]["train"]))
    caplog.set_level(logging.INFO)
    mined = {}
    for fill in ("null", "2"):
        path = _mine_bm25(folder, prepared, str(tmp_path / "mine"), "hits=1", "rank_range=[0,1]", f"random_fill={fill}")
        mined[fill] = [json.loads(line) for line in open(path)]
        stats = json.loads(open(path[:-len(".json")] + ".stats.json").read())
        if fill == "null":
            assert stats["skipped_no_negatives"] > 0 and stats["random_negatives"] == 0
        else:
            assert stats["skipped_no_negatives"] == 0 and stats["filled_with_random"] == n_train
    assert 0 < len(mined["null"]) < n_train == len(mined["2"])
    assert "already mined" not in caplog.text  # the second setting was mined again, not reused
    assert "filled with" in caplog.text
    with open(prepared["paths"]["corpus"]) as f:
        corpus = [json.loads(line) for line in f]
    for rec in mined["2"]:
        assert len(rec["neg_index"]) == 2 and not set(rec["neg_index"]) & set(rec["pos_index"])
        assert rec["neg"] == [f"{corpus[i]['title']} {corpus[i]['text']}" for i in rec["neg_index"]]
    kept = {r["query"]: r["neg_index"] for r in mined["null"]}
    for rec in mined["2"]:  # a query that had its BM25 negative keeps it first
        if rec["query"] in kept:
            assert rec["neg_index"][0] == kept[rec["query"]][0]

    # several retrievers: each list is mined unfilled and the merged list is filled, with the same per-query draw
    # (the same retriever twice merges to its own list, so the result equals the single retriever's)
    path = _mine_bm25(folder, prepared, str(tmp_path / "mine"), "hits=1", "rank_range=[0,1]", "random_fill=2",
                      retrievers="[bm25,bm25]")
    assert path.endswith("train.neg.bm25+bm25.json")
    assert [json.loads(line) for line in open(path)] == mined["2"]
    stats = json.loads(open(path[:-len(".json")] + ".stats.json").read())
    assert stats["records"] == n_train and stats["filled_with_random"] == n_train


@pytest.mark.slow
def test_one_command_from_a_beir_folder_to_an_evaluated_model(tmp_path, tiny_bert, caplog):
    """train.py task=beir: split, mine (dense + BM25, merged), train, evaluate dev and test before/after, export;
    a rerun reuses the prepared and mined files."""
    from embedder.training import run_train

    folder = write_sample_beir(tmp_path / "beir")
    overrides = quick_overrides(tmp_path, tiny_bert, [
        "task=beir", f"beir.folder={folder}", "beir.negatives.retrievers=[dense,bm25]", "trainer.max_steps=4", "trainer.max_epochs=-1", "export=true", "report=false",
        "callbacks.log_progress.every_s=0"])
    caplog.set_level(logging.INFO)
    metrics = run_train(compose(overrides))
    out = tmp_path / "out"
    data = out / "data"
    mined = data / "train.neg.dense+bm25.json"
    assert mined.is_file() and (data / "mine-dense" / "train.neg.dense.json").is_file()
    with open(mined) as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 32 and all(r["neg"] and not set(r["neg_index"]) & set(r["pos_index"]) for r in records)
    saved = json.loads((out / "metrics.json").read_text())
    for split in ("dev", "test"):  # both evaluated, before and after
        assert f"val/{split}/ndcg@10" in saved["before"] and f"val/{split}/ndcg@10" in metrics
    assert (out / "model.safetensors").is_file() and (out / "modules.json").is_file()  # the export
    assert "train: step" in caplog.text  # the progress line outside a terminal (every_s=0: every step)

    kept = (data / "corpus.json", data / "mine-dense" / "train.neg.dense.json", data / "mine-bm25" / "train.neg.bm25.json")
    stamps = {p: os.path.getmtime(p) for p in kept}
    caplog.clear()
    run_train(compose(overrides))
    assert "already prepared" in caplog.text and "already mined" in caplog.text
    assert {p: os.path.getmtime(p) for p in kept} == stamps  # reused, not rewritten


def test_mining_without_the_margin_filter(tmp_path):
    """beir.negatives.relative_margin=null (no false-negative filter) reaches mining as null, not as the string
    "None" (which stopped the run with a TypeError), and keeps more candidates than the default 0.05."""

    folder = write_sample_beir(tmp_path / "beir")
    prepared = prepare_beir(folder, str(tmp_path / "prepared"))
    kept = {}
    for margin in ("null", "0.05"):
        mined = _mine_bm25(folder, prepared, str(tmp_path / f"mine-{margin}"), f"relative_margin={margin}",
                           "max_neg_num=100")
        kept[margin] = sum(len(json.loads(line)["neg"]) for line in open(mined))
    assert kept["null"] > kept["0.05"] > 0


def test_an_open_ended_rank_range_reaches_mining(tmp_path):
    """beir.negatives.rank_range=[3, null] (to the last hit, as mine.py takes it) mines from rank 3 to `hits`; it
    stopped the run with a TypeError (int(None)) before. rank_range_of=filtered reaches mining too, as a setting of
    its own (another cache entry, other negatives)."""

    folder = write_sample_beir(tmp_path / "beir")
    prepared = prepare_beir(folder, str(tmp_path / "prepared"))
    negatives = {}
    for of in ("ranking", "filtered"):
        mined = _mine_bm25(folder, prepared, str(tmp_path / "mine"), "rank_range=[3,null]", "hits=20",
                           f"rank_range_of={of}")
        meta = json.load(open(os.path.join(os.path.dirname(mined), "train.neg.bm25.meta.json")))
        assert meta["rank_range"] == [3, 20] and meta["rank_range_of"] == of
        negatives[of] = [json.loads(line)["neg"] for line in open(mined)]
        assert sum(map(len, negatives[of])) > 0
    assert negatives["ranking"] != negatives["filtered"]


@pytest.mark.parametrize("overrides, message", [
    (["beir.negatives.remine_merge=true"], "nothing is re-mined"),
    (["beir.negatives.remine_after_epochs=[1]", "beir.eval_splits=[test]"], "dev is not evaluated"),
    (["beir.negatives.remine_after_epochs=[1]", "beir.teacher.lm=smollm2"], "no teacher scores to distil"),
    (["beir.negatives.remine_after_epochs=[1]", "beir.negatives.remine_merge=true", "beir.negatives.retrievers=[]"],
     "retrievers=\\[\\] mined none"),
])
def test_re_mining_settings_that_cannot_work_are_refused_before_mining(tmp_path, overrides, message):
    """Each conflicting re-mining setting stops the run with a DataError naming the field, before anything is
    prepared or mined (mining a large folder takes an hour)."""
    from embedder.config import compose as compose_config
    from embedder.recipes.beir import prepare

    folder = write_sample_beir(tmp_path / "beir")
    cfg = compose_config("train", ["task=beir", f"beir.folder={folder}", f"output_dir={tmp_path}/out", *overrides])
    with pytest.raises(DataError, match=message) as info:
        prepare(cfg)
    assert info.value.field.startswith("beir.negatives.")
    assert not (tmp_path / "out" / "data").exists()


def test_a_teacher_scores_the_candidates_and_training_distils_them(tmp_path, tiny_bert, caplog, monkeypatch):
    """beir.teacher.lm: the mined candidates get the LM's query likelihoods (positives first, cut to max_candidates),
    the beir kind's distillation weight is set, a rerun reuses the scores and new teacher settings rescore. Rank 0
    of a torchrun launch prepares alone: its mining and scoring do not split work across the waiting ranks."""
    from embedder.recipes.beir import prepare
    from embedder.training import run_train

    folder = write_sample_beir(tmp_path / "beir", n_train=12, n_test=0, with_test=False)
    overrides = quick_overrides(tmp_path, tiny_bert, [
        "task=beir", f"beir.folder={folder}", "beir.negatives.retrievers=[dense]", "beir.teacher.lm=tiny",
        "beir.teacher.max_candidates=3", "beir.eval_splits=[]", "evaluate_before=false", "export=false",
        "report=false", "data.group_size=3"])
    caplog.set_level(logging.INFO)
    cfg = compose(overrides)
    with monkeypatch.context() as env:  # as torchrun sets it on rank 0 of 2
        env.setenv("WORLD_SIZE", "2")
        env.setenv("RANK", "0")
        cfg = prepare(cfg)
        assert os.environ["WORLD_SIZE"] == "2"  # restored after the preparation
    (scored,) = cfg.train_data
    assert "score-tiny" in scored and [(x._target_, x.weight) for x in cfg.record_kinds.beir.losses] == [
        ("embedder.losses.InfoNCELoss", 1.0), ("embedder.losses.KLDistillLoss", 1.0)]
    with open(scored) as f:
        records = [json.loads(line) for line in f]
    assert records and all(len(r["teacher_scores"]) == len(r["pos"]) + len(r["neg"]) <= 3 for r in records)
    assert all(r["answers"] == [r["query"]] for r in records)  # query likelihood: the query is what is scored
    assert all(np.isfinite(r["teacher_scores"]).all() for r in records)
    run_train(compose(overrides))  # a real fit with the distillation loss on
    distill = [float(r["train/loss_distill"]) for r in _metrics_rows(tmp_path) if r.get("train/loss_distill")]
    assert "already scored" in caplog.text and distill and np.isfinite(distill).all() and max(distill) > 0
    assert "val/dev/ndcg@10 is not computed during training" in caplog.text  # best_checkpoint monitors nothing
    caplog.clear()
    prepare(compose([*overrides, "beir.teacher.max_candidates=2"]))
    assert "scoring again" in caplog.text


def test_task_beir_without_a_folder_says_what_to_pass(tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    proc = subprocess.run([sys.executable, "train.py", "task=beir", f"output_dir={tmp_path}/out"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "task=beir needs the BEIR folder" in proc.stderr and not (tmp_path / "out" / "model.safetensors").exists()


STAGE_CALLS: list[str] = []


def qa_only_stage(cfg, kind: str):
    """A preparation stage of a test's own: records its call and points training at the bundled qa file only."""
    from omegaconf import open_dict

    STAGE_CALLS.append(kind)
    with open_dict(cfg):
        cfg.train_data = [f"{cfg.data_root}/{kind}/train.json"]
    return cfg


def test_run_train_runs_the_stages_a_config_lists(tmp_path, tiny_bert):
    """`prepare:` is generic: run_train calls whatever stages the config lists, in order, and trains on what they
    return (here a stage from outside the package, with its own argument); it names no recipe."""
    import inspect

    from embedder import training
    from embedder.training import run_train

    STAGE_CALLS.clear()
    stage = "{_target_:tests.test_finetune.qa_only_stage,_partial_:true,kind:qa}"
    cfg = compose(quick_overrides(tmp_path, tiny_bert, [f"prepare=[{stage},{stage}]", "eval=null", "export=false",
                                                        "report=false"]))
    run_train(cfg)
    assert STAGE_CALLS == ["qa", "qa"]
    metrics = (tmp_path / "out").rglob("metrics.csv")
    assert any("train/loss" in p.read_text() for p in metrics)
    assert "beir" not in inspect.getsource(training)  # no recipe is named by the training loop's module


def test_the_beir_command_checks_its_keys():
    from embedder.config import CONFIG_DIR
    from embedder.config_check import check_overrides

    assert check_overrides(CONFIG_DIR, "train", ["task=beir", "beir.folder=/data/x"]) is None  # a ??? key is a key
    msg = check_overrides(CONFIG_DIR, "train", ["task=beir", "beir.folderr=/data/x"])
    assert "Did you mean 'beir.folder'" in msg


def test_other_ranks_wait_for_rank_0s_prepared_run(tmp_path, monkeypatch):
    """Under torchrun/SLURM rank > 0 waits for rank 0's marker of the same settings (a stale one is ignored) and never
    runs the step itself; rank 0 runs it once with the launcher's rank variables hidden."""
    import threading

    from embedder.atomic import write_json
    from embedder.distributed import prepare_once

    marker = str(tmp_path / "data" / "run.json")
    os.makedirs(os.path.dirname(marker))
    write_json(marker, {"key": "stale", "train_file": "old.json", "paths": {}})
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    timer = threading.Timer(0.3, write_json, (marker, {"key": "k1", "train_file": "t.json", "paths": {}}))
    timer.start()
    never = lambda: pytest.fail("rank 1 must not prepare")  # noqa: E731
    assert prepare_once(marker, "k1", never, "test", poll_s=0.05)["train_file"] == "t.json"
    timer.join()
    monkeypatch.setenv("RANK", "0")
    seen = []
    result = prepare_once(marker, "k2", lambda: seen.append(os.environ.get("RANK")) or {"n": 1}, "test")
    assert result == {"key": "k2", "n": 1} and seen == [None] and os.environ["RANK"] == "0"
    with open(marker) as f:
        assert json.load(f) == result


def _counting_retrieve(real_retrieve, evaluated: list, forced_dev: dict):
    """An `EvalSet._retrieve` that appends (set name, step) to `evaluated` and, for the n-th dev evaluation listed in
    `forced_dev` (1-based), ranks the relevant documents first ("best") or drops them ("worst"): the tiny random
    model's dev scores are near 0 at every state, so which state wins a selection is set here."""
    def count_retrieve(self, encoder, metric, step, ident):
        evaluated.append((self.name, step))
        preds = real_retrieve(self, encoder, metric, step, ident)
        force = forced_dev.get([n for n, _ in evaluated].count("dev")) if self.name == "dev" else None
        if force:
            labels = {q.qid: q.labels for q in self.evaluator.queries}
            preds = {qid: ([i for i in labels[qid] if i not in rows] + rows if force == "best" else
                           [i for i in rows if i not in labels[qid]]) for qid, rows in preds.items()}
        return preds
    return count_retrieve


def test_evaluation_costs_what_it_must_and_the_best_state_is_exported(tmp_path, tiny_bert, monkeypatch):
    """task=beir over 2 epochs: dev and test share one corpus encoding per set of weights; test is evaluated before
    and after training only; the final state's `after` re-encodes nothing (3 corpus encodings in all, not 7); with
    export_state=best the export holds the best checkpoint's weights (an earlier state than the last: the dev scores are
    set so) and `after` evaluates them again."""
    import torch
    from safetensors.torch import load_file

    import embedder.evaluation.eval_set as eval_set
    import embedder.retrieval.dense as dense
    from embedder.training import run_train

    encoded, evaluated = [], []
    real_encode, real_retrieve = dense.encode_in_lockstep, eval_set.EvalSet._retrieve

    def count_encode(encoder, jobs, units_per_rank, r, **kw):
        encoded.extend(jobs[j].name for j, _ in units_per_rank[r])
        return real_encode(encoder, jobs, units_per_rank, r, **kw)

    forced_dev = {}  # dev evaluation number (1-based) -> "best" (relevant documents ranked first) or "worst" (none)
    count_retrieve = _counting_retrieve(real_retrieve, evaluated, forced_dev)

    monkeypatch.setenv("EMBEDDER_CACHE", str(tmp_path / "cache"))  # the untrained stores of no earlier test
    monkeypatch.setattr(dense, "encode_in_lockstep", count_encode)
    monkeypatch.setattr(eval_set.EvalSet, "_retrieve", count_retrieve)
    folder = write_sample_beir(tmp_path / "beir")

    def run(out: str, export_state: str):
        encoded.clear()
        evaluated.clear()
        overrides = quick_overrides(tmp_path, tiny_bert, [
            "task=beir", f"beir.folder={folder}", "beir.negatives.retrievers=[]", "data.group_size=1",
            "trainer.max_steps=-1", "trainer.max_epochs=2", "+trainer.limit_train_batches=3", "optimizer.lr=1e-3",
            "export=true", "report=false", f"output_dir={out}", f"export_state={export_state}"])
        return run_train(compose(overrides))

    after = run(str(tmp_path / "last"), "last")
    # before: dev encodes the corpus, test reuses it; epochs 1 and 2: dev only; after: the last epoch's stores
    assert encoded.count("dev corpus") + encoded.count("test corpus") == 3, encoded
    names = [name for name, _ in evaluated]
    assert names.count("test") == 2  # before and after only, never at a validation during training
    assert names.count("dev") == 3  # before, epochs 1 and 2; `after` of the same weights reuses epoch 2's metrics
    assert "val/test/ndcg@10" in after and not os.path.exists(tmp_path / "last" / "eval-encode")

    # dev evaluations: 1 before, 2 after epoch 1 (made the best), 3 after epoch 2 (made the worst), 4 `after`: the
    # exported state, evaluated for real
    forced_dev.update({2: "best", 3: "worst"})
    best = run(str(tmp_path / "best"), "best")
    rows = _metrics_rows_at(tmp_path / "best")
    trained_dev = [float(r["val/dev/ndcg@10"]) for r in rows if r.get("val/dev/ndcg@10") and int(r["step"]) > 0]
    assert trained_dev[0] > 0.5 and trained_dev[1] == 0.0, trained_dev
    # `after` evaluates the exported (epoch 1) weights again rather than reusing the last validation's metrics
    assert [n for n, _ in evaluated].count("dev") == 4 and "val/dev/ndcg@10" in best, evaluated
    ckpt = torch.load(tmp_path / "best" / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    exported = load_file(str(tmp_path / "best" / "model.safetensors"))
    prefix = "encoder.query_model."  # one model for queries and keys (shared weights)
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    common = [k for k in exported if k in state]
    assert common and all(torch.equal(exported[k], state[k]) for k in common)
    last = torch.load(tmp_path / "best" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] < last["global_step"]  # the epoch-1 state, not the last
    assert any(not torch.equal(exported[k], last["state_dict"][prefix + k]) for k in common)


def test_dense_mining_and_the_first_evaluation_share_one_corpus_encoding(tmp_path, tiny_bert, monkeypatch):
    """task=beir with dense negatives: the mining encodes the corpus with the untrained encoder into the cache the
    training run's "before" evaluation reads, so that evaluation encodes no corpus; only the trained weights' one
    validation does (1 corpus encoding by the evaluation in all, not 2), with the same "before" metrics as a run
    whose evaluation encoded the corpus itself."""
    import embedder.retrieval.dense as dense
    from embedder.training import run_train

    encoded = []
    real_encode = dense.encode_in_lockstep

    def count_encode(encoder, jobs, units_per_rank, r, **kw):
        encoded.extend(jobs[j].name for j, _ in units_per_rank[r])
        return real_encode(encoder, jobs, units_per_rank, r, **kw)

    monkeypatch.setattr(dense, "encode_in_lockstep", count_encode)
    folder = write_sample_beir(tmp_path / "beir")

    def run(name: str, retrievers: str) -> dict:
        monkeypatch.setenv("EMBEDDER_CACHE", str(tmp_path / f"cache-{name}"))  # no earlier test's stores
        encoded.clear()
        run_train(compose(quick_overrides(tmp_path / name, tiny_bert, [
            "task=beir", f"beir.folder={folder}", f"beir.negatives.retrievers={retrievers}", "data.group_size=2",
            "trainer.max_steps=-1", "trainer.max_epochs=1", "+trainer.limit_train_batches=2", "export=false",
            "report=false"])))
        return json.load(open(tmp_path / name / "out" / "metrics.json"))["before"]

    before = run("dense", "[dense]")
    assert encoded.count("dev corpus") + encoded.count("test corpus") == 1, encoded  # the epoch's validation only
    assert os.listdir(tmp_path / "cache-dense" / "eval-encode")  # the mined corpus store, reused by "before"
    reference = run("bm25", "[bm25]")  # mined without the model: "before" encodes the corpus itself
    assert encoded.count("dev corpus") + encoded.count("test corpus") == 2, encoded
    assert before.keys() == reference.keys() and before
    assert all(abs(before[k] - reference[k]) < 1e-6 for k in before), (before, reference)


def _metrics_rows_at(out):
    import csv
    import glob

    (path,) = glob.glob(str(out / "csv" / "version_*" / "metrics.csv"))
    with open(path) as f:
        return list(csv.DictReader(f))


def test_remining_with_the_model_being_trained_reuses_dev_encoding_and_resumes(tmp_path, tiny_bert, caplog,
                                                                                 monkeypatch):
    """beir.negatives.remine_after_epochs=[1]: after epoch 1's validation the train queries are ranked with the
    current weights over dev's corpus stores (only the queries are encoded), the negatives are picked by the same
    rules (no positives), epoch 2 trains on that file, the checkpoint remembers it, and a resumed run trains on it."""
    import torch

    from embedder.training import run_train

    folder = write_sample_beir(tmp_path / "beir", n_train=24, n_test=0, with_test=False)
    overrides = quick_overrides(tmp_path, tiny_bert, [
        "task=beir", f"beir.folder={folder}", "beir.negatives.retrievers=[bm25]", "trainer.max_steps=-1",
        "trainer.max_epochs=2", "beir.negatives.remine_after_epochs=[1]", "beir.negatives.random_fill=2",
        "data.group_size=3", "data.batch_size=4", "export=false", "report=false", "evaluate_before=false"])
    caplog.set_level(logging.INFO)
    from embedder.data.datamodule import RetrievalDataModule

    loaders = []  # the file each train loader the trainer builds serves
    build = RetrievalDataModule.train_dataloader
    monkeypatch.setattr(RetrievalDataModule, "train_dataloader",
                        lambda self: loaders.append(self.files[0].path) or build(self))
    run_train(compose(overrides))
    out = tmp_path / "out"
    remined = out / "data" / "remine" / "train.neg.epoch1.json"
    assert loaders == [str(out / "data" / "mine-bm25" / "train.neg.bm25.json"), str(remined)]  # epoch 1, epoch 2
    records = [json.loads(line) for line in open(remined)]
    n_train = sum(1 for _ in open(out / "data" / "train.json"))
    assert len(records) == n_train  # random_fill=2 keeps every query
    assert all(len(r["neg"]) >= 2 and not set(r["neg_index"]) & set(r["pos_index"]) for r in records)
    bm25 = {r["query"]: r["neg_index"] for r in map(json.loads, open(out / "data" / "mine-bm25" / "train.neg.bm25.json"))}
    assert any(r["neg_index"] != bm25.get(r["query"]) for r in records)  # the trained model ranks otherwise
    assert "re-mining negatives for" in caplog.text and "the next epochs train on" in caplog.text
    remine_log = caplog.text[caplog.text.index("re-mining negatives for"):]
    assert "reused from" in remine_log.split("\n")[1]  # dev's corpus stores: only the queries were encoded
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["callbacks"]
    (saved,) = [v for k, v in state.items() if "RemineNegatives" in k]
    assert saved == {"mined": {"1": str(remined)}}

    caplog.clear()  # a resumed run (one more epoch) trains on the re-mined file from its first step
    loaders.clear()
    run_train(compose([*overrides, "trainer.max_epochs=3", "ckpt_path=last"]))
    # (Lightning builds a loader from the original file to size the schedule before callbacks are restored; the
    # loader the epoch runs on is built after)
    assert f"the next epochs train on {remined}" in caplog.text and loaders[-1] == str(remined)
    assert "re-mining negatives for" not in caplog.text  # epoch 1 was re-mined already


def test_remining_merged_with_the_first_minings_negatives(tmp_path, tiny_bert):
    """beir.negatives.remine_merge=true: epoch 2's file alternates each query's re-mined negatives (first) with its
    BM25 ones, de-duplicated and capped at max_neg_num; the re-mined list alone is kept beside it."""
    from embedder.training import run_train

    folder = write_sample_beir(tmp_path / "beir", n_train=24, n_test=0, with_test=False)
    run_train(compose(quick_overrides(tmp_path, tiny_bert, [
        "task=beir", f"beir.folder={folder}", "beir.negatives.retrievers=[bm25]", "trainer.max_steps=-1",
        "trainer.max_epochs=2", "beir.negatives.remine_after_epochs=[1]", "beir.negatives.remine_merge=true",
        "beir.negatives.max_neg_num=6", "data.group_size=3", "data.batch_size=4", "export=false", "report=false",
        "evaluate_before=false"])))
    out = tmp_path / "out" / "data"
    read = lambda p: {r["query_id"]: r for r in map(json.loads, open(p))}  # noqa: E731
    merged, remined = read(out / "remine" / "train.neg.epoch1.json"), read(out / "remine" / "train.neg.epoch1.remined.json")
    bm25 = read(out / "mine-bm25" / "train.neg.bm25.json")
    assert set(merged) == set(remined) | set(bm25)
    for qid, rec in merged.items():
        a, b = remined.get(qid, {}).get("neg_index", []), bm25.get(qid, {}).get("neg_index", [])
        expected = []
        for i in range(max(len(a), len(b))):
            for row in (a[i:i + 1] + b[i:i + 1]):
                if row not in expected and len(expected) < 6:
                    expected.append(row)
        assert rec["neg_index"] == expected
        assert not set(rec["neg_index"]) & set(rec["pos_index"])
    assert any(set(r["neg_index"]) - set(bm25.get(q, {}).get("neg_index", [])) for q, r in merged.items())


@pytest.mark.slow
def test_remining_on_two_ranks(tmp_path, tiny_bert):
    """Re-mining under DDP (2 gloo processes): both ranks take part in the search over their corpus shards, rank 0
    writes the file, both train epoch 2 on it; the run ends with the re-mined file recorded in the checkpoint."""
    import torch

    from embedder.training import run_train

    folder = write_sample_beir(tmp_path / "beir", n_train=24, n_test=0, with_test=False)
    run_train(compose(quick_overrides(tmp_path, tiny_bert, [
        "task=beir", f"beir.folder={folder}", "beir.negatives.retrievers=[bm25]", "trainer=ddp_sim",
        "trainer.max_steps=-1", "trainer.max_epochs=2", "beir.negatives.remine_after_epochs=[1]",
        "beir.negatives.random_fill=2", "data.group_size=3", "data.batch_size=2", "export=false", "report=false",
        "evaluate_before=false", "callbacks.rich_progress_bar=null"])))
    out = tmp_path / "out"
    remined = out / "data" / "remine" / "train.neg.epoch1.json"
    records = [json.loads(line) for line in open(remined)]
    assert len(records) == sum(1 for _ in open(out / "data" / "train.json"))
    assert all(len(r["neg"]) >= 2 and not set(r["neg_index"]) & set(r["pos_index"]) for r in records)
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["global_step"] > 0
    (saved,) = [v for k, v in state["callbacks"].items() if "RemineNegatives" in k]
    assert saved == {"mined": {"1": str(remined)}}


def test_a_resumed_run_reports_the_first_runs_before(tmp_path, tiny_bert, recwarn):
    """The `before` evaluation is stored beside metrics.json when training starts (not in checkpoints/, where a file
    makes Lightning warn that the checkpoint folder "exists and is not empty" on every fresh run); a run resumed with
    ckpt_path=last does not evaluate the untrained model again but reports the stored numbers as its `before`."""
    from embedder.training import run_train

    folder = write_sample_beir(tmp_path / "beir", n_train=16, n_test=6)
    overrides = quick_overrides(tmp_path, tiny_bert, [
        "task=beir", f"beir.folder={folder}", "beir.negatives.retrievers=[]", "data.group_size=1",
        "trainer.max_steps=-1", "trainer.max_epochs=1", "export=false", "report=false"])
    run_train(compose(overrides))
    out = tmp_path / "out"
    first = json.loads((out / "metrics.json").read_text())
    assert json.loads((out / "metrics_before.json").read_text()) == first["before"]
    assert "val/dev/ndcg@10" in first["before"] and "val/test/ndcg@10" in first["before"]
    assert not (out / "checkpoints" / "metrics_before.json").exists()
    assert not [w for w in recwarn if "exists and is not empty" in str(w.message)]
    (out / "metrics.json").unlink()
    stored = {**first["before"], "val/dev/ndcg@10": 0.125}  # marked: the resumed run must read it, not re-evaluate
    (out / "metrics_before.json").write_text(json.dumps(stored))
    run_train(compose([*overrides, "trainer.max_epochs=2", "ckpt_path=last"]))
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["before"] == stored and set(resumed["after"]) == set(first["after"])


def test_the_merge_weight_is_chosen_on_dev_and_test_is_never_evaluated_for_it(tmp_path, tiny_bert, monkeypatch):
    """merge_base_weight=[0,0.3] (LM-Cocktail's share chosen on dev): each share is evaluated on dev only, the best
    by dev nDCG@10 is exported and evaluated by `after`, and metrics.json says what was tried. Which share wins is
    set by forcing dev's rankings (the tiny random model scores near 0 everywhere): the merge in one run, no merge
    in the other."""
    import torch
    from safetensors.torch import load_file

    import embedder.evaluation.eval_set as eval_set
    from embedder.atomic import read_json
    from embedder.training import run_train

    calls, forced_dev = [], {}
    monkeypatch.setenv("EMBEDDER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(eval_set.EvalSet, "_retrieve", _counting_retrieve(eval_set.EvalSet._retrieve, calls, forced_dev))

    def names() -> list[str]:
        return [n for n, _ in calls]
    folder = write_sample_beir(tmp_path / "beir")
    base = load_file(f"{tiny_bert}/model.safetensors")

    def run(name: str, forced: dict[int, str]):
        calls.clear()
        forced_dev.clear()
        forced_dev.update(forced)
        out = tmp_path / name
        after = run_train(compose(quick_overrides(tmp_path, tiny_bert, [
            "task=beir", f"beir.folder={folder}", "beir.negatives.retrievers=[]", "data.group_size=1",
            "trainer.max_steps=-1", "trainer.max_epochs=2", "+trainer.limit_train_batches=3", "optimizer.lr=1e-3",
            "export=true", "report=false", f"output_dir={out}", "export_state=last", "merge_base_weight=[0.3,0]"])))
        last = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
        prefix = "encoder.query_model."
        last = {k[len(prefix):]: v for k, v in last.items() if k.startswith(prefix)}
        exported = load_file(str(out / "model.safetensors"))
        common = [k for k in exported if k in last and k in base and last[k].is_floating_point()]
        assert common and any(not torch.allclose(last[k], base[k]) for k in common)  # training moved the weights
        return after, read_json(str(out / "metrics.json")), exported, last, common

    # dev evaluations: 1 before, 2-3 epochs 1-2, share 0 reuses epoch 2's metrics (the same weights), 4 share 0.3
    after, metrics, exported, last, common = run("merged", {3: "worst", 4: "best"})
    assert names().count("test") == 2, names()  # before and after: never for the choice
    assert names().count("dev") == 4, names()  # `after` of the chosen (last scored) weights reuses their metrics
    choice = metrics["merge_base_weight"]
    assert choice["chosen"] == 0.3 and choice["metric"] == "val/dev/ndcg@10"
    assert choice["tried"]["0.3"] > 0.5 and choice["tried"]["0"] == 0.0, choice
    assert after["val/dev/ndcg@10"] == choice["tried"]["0.3"]  # `after` evaluated the merged weights
    assert all(torch.allclose(exported[k], 0.7 * last[k] + 0.3 * base[k], atol=1e-6) for k in common)

    # 5: `after`, of the restored unmerged weights (share 0.3 was scored last, so they are evaluated again)
    after, metrics, exported, last, common = run("unmerged", {3: "best", 4: "worst", 5: "best"})
    assert names().count("test") == 2 and names().count("dev") == 5, names()
    assert metrics["merge_base_weight"]["chosen"] == 0.0 and metrics["merge_base_weight"]["tried"]["0.3"] == 0.0
    assert all(torch.equal(exported[k], last[k]) for k in common)  # no merge: the trained weights, restored
    assert after["val/dev/ndcg@10"] > 0.5
