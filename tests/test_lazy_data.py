"""Real data in bounded memory: lazy training files, cached indexes, parquet and JSON-lines corpora that agree,
and mine.py / evaluate on a parquet corpus giving the same results as on the same corpus in JSON lines."""

from __future__ import annotations

import json
import os
import pickle
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedder.data import index_cache
from embedder.data.corpus import JsonlCorpus, ParquetCorpus, open_corpus, prefixed, texts_fingerprint
from embedder.data.jsonl import JsonlRecords
from embedder.data.queries import load_queries
from embedder.data.train_files import load_train_file
from embedder.errors import DataError
from embedder.record_kinds import build_record_kinds
from tests.conftest import compose, read_jsonl
from tests.test_mining import toy_corpus, write_toy

TASKS = build_record_kinds({"qa": {"loss": {"contrastive_weight": 1.0, "distill_weight": 0.0}}}, group_size=4)


def _write(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    return str(path)


def _record(i: int, n_neg: int = 20, words: int = 60) -> dict:
    rng = np.random.default_rng(i)
    passage = lambda: " ".join(f"w{x}" for x in rng.integers(0, 5000, size=words))  # noqa: E731
    return {"query": f"query {i}", "pos": [passage()], "neg": [passage() for _ in range(n_neg)],
            "teacher_scores": [float(x) for x in rng.normal(size=n_neg + 1)], "task": "qa"}


def _write_parquet(folder, rows, shards=2, row_group_size=4):
    """Rows split into `shards` files (named so that sorted order = row order), several row groups each."""
    os.makedirs(folder, exist_ok=True)
    bounds = np.linspace(0, len(rows), shards + 1).astype(int)
    for s in range(shards):
        part = rows[bounds[s]:bounds[s + 1]]
        table = pa.table({k: [r.get(k) for r in part] for k in rows[0]})
        pq.write_table(table, os.path.join(folder, f"part-{s:05d}.parquet"), row_group_size=row_group_size)
    return str(folder)


# ---------------------------------------------------------------------------------------------------------------------
# training files
# ---------------------------------------------------------------------------------------------------------------------

def test_training_records_are_read_lazily_and_match_the_file(tmp_path):
    rows = [_record(i) for i in range(30)]
    rows[7]["neg"], rows[7]["pos"], rows[7]["teacher_scores"] = [], ["only a positive"], [1.0]  # dropped by design
    path = _write(tmp_path / "qa" / "train.json", rows[:10] + [""] + rows[10:])  # a blank line is skipped
    f = load_train_file(path, TASKS)
    assert isinstance(f.records, JsonlRecords) and f.records.offsets.dtype == np.int64
    kept = [r for i, r in enumerate(rows) if i != 7]
    assert len(f.records) == 29 and f.total == 30 and f.dropped == {"no negatives": 1}
    assert list(f.records) == kept and f.records[-1] == kept[-1] and f.records[3:5] == kept[3:5]
    clone = pickle.loads(pickle.dumps(f.records))  # what a DataLoader worker receives
    assert clone[12] == kept[12] and len(pickle.dumps(f.records)) < 2000


def test_validation_memory_does_not_grow_with_the_file(tmp_path):
    """Python allocations while validating a ~12 MB file stay far below its size: only offsets are kept."""
    path = _write(tmp_path / "big" / "train.json", [_record(i, n_neg=40, words=50) for i in range(800)])
    size = os.path.getsize(path)
    tracemalloc.start()
    f = load_train_file(path, TASKS, use_cache=False)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(f.records) == 800 and size > 10e6
    assert peak < size / 20, f"peak {peak / 1e6:.1f} MB of Python allocations for a {size / 1e6:.1f} MB file"


def test_the_index_is_cached_and_invalidated_when_the_file_changes(tmp_path, monkeypatch):
    path = _write(tmp_path / "qa" / "train.json", [_record(i) for i in range(5)])
    load_train_file(path, TASKS)
    import embedder.data.train_files as tf

    def no_scan(*a, **k):
        raise AssertionError("the file was read again although its index is cached")

    monkeypatch.setattr(tf, "_scan", no_scan)
    f = load_train_file(path, TASKS)  # from the cache: memory-mapped offsets, same records
    assert isinstance(f.records.offsets, np.memmap) and len(f.records) == 5 and f.records[4] == _record(4)
    _write(path, [_record(i) for i in range(6)])  # new content: the cache entry no longer applies
    with pytest.raises(AssertionError, match="read again"):
        load_train_file(path, TASKS)
    other = build_record_kinds({"qa": {"sampling": {"max_sample_num": 2},
                                        "loss": {"contrastive_weight": 1.0, "distill_weight": 0.0}}}, group_size=4)
    with pytest.raises(AssertionError, match="read again"):  # other settings keep other records: another entry
        load_train_file(path, other)


def test_a_damaged_cache_entry_is_rebuilt(tmp_path):
    path = _write(tmp_path / "qa" / "train.json", [_record(i) for i in range(3)])
    load_train_file(path, TASKS)
    folder = os.path.join(index_cache.cache_root(), "train")
    for name in os.listdir(folder):
        if name.endswith(".npy"):
            open(os.path.join(folder, name), "wb").close()  # truncated
    assert len(load_train_file(path, TASKS).records) == 3


@pytest.mark.parametrize("bad, field", [("NaN", "teacher_scores"), ("Infinity", "teacher_scores")])
def test_non_finite_teacher_scores_are_refused(tmp_path, bad, field):
    good = json.dumps(_record(0, n_neg=2))
    poisoned = good.replace(str(_record(0, n_neg=2)["teacher_scores"][1]), bad)
    path = _write(tmp_path / "qa" / "train.json", [good, poisoned])
    with pytest.raises(DataError, match=rf"train.json, line 2, field '{field}'.*non-finite"):
        load_train_file(path, TASKS)


def test_a_fit_reads_the_lazy_records_through_dataloader_workers(tmp_path, tiny_bert):
    """A real 2-step fit with 2 DataLoader worker processes reading records by offset."""
    from embedder.training import run_train
    from tests.conftest import quick_overrides

    path = _write(tmp_path / "data" / "qa" / "train.json", [_record(i, n_neg=6, words=12) for i in range(12)])
    cfg = compose(quick_overrides(tmp_path, tiny_bert, [
        "task=msmarco", f"train_data=[{path}]", "data.num_workers=2", "eval={}", "export=false",
        "record_kinds.qa.losses=[{_target_:embedder.losses.KLDistillLoss,weight:1.0}]"]))
    run_train(cfg)
    assert os.path.isfile(f"{tmp_path}/out/metrics.json")


def test_num_workers_auto_tokenises_in_workers_on_a_gpu_only():
    """data.num_workers=auto (the default): 0 on a CPU (its cores run the model); on a GPU up to 4 per rank, within
    the CPUs the node's ranks share, one left to each rank's loop; a number is taken as it is."""
    from embedder.data.workers import ENCODE_MAX_WORKERS, resolve_num_workers

    assert resolve_num_workers("auto", on_gpu=False, cpus=64) == 0
    assert resolve_num_workers("auto", on_gpu=True, ranks_per_node=1, cpus=16) == 4
    assert resolve_num_workers("auto", on_gpu=True, ranks_per_node=8, cpus=32) == 3  # 4 CPUs per rank, 1 kept
    assert resolve_num_workers("auto", on_gpu=True, ranks_per_node=8, cpus=8) == 0  # 1 CPU per rank: none to spare
    assert resolve_num_workers(2, on_gpu=False) == 2 and resolve_num_workers("0", on_gpu=True) == 0
    assert resolve_num_workers("auto", on_gpu=True, ranks_per_node=1, cap=ENCODE_MAX_WORKERS, cpus=16) == 8  # encoding
    with pytest.raises(ValueError, match="num_workers=-1"):
        resolve_num_workers(-1, on_gpu=False)


def test_train_loader_resolves_auto_from_the_trainer(tmp_path, tiny_bert, monkeypatch):
    """The training loader asks the trainer where it runs (its strategy's root device, as the encode loader does):
    `auto` under a CPU trainer gives 0 workers, and on a CUDA device (stubbed: this machine has none) the count for
    the node's devices. The encode loader's rule (its own cap) comes from the same call."""
    from types import SimpleNamespace

    import torch

    from embedder.data import workers
    from embedder.data.datamodule import RetrievalDataModule, load_train_files
    from embedder.modeling.encoder import DualEncoder
    from embedder.record_kinds import build_record_kinds

    path = _write(tmp_path / "data" / "qa" / "train.json", [_record(i, n_neg=6, words=12) for i in range(8)])
    tasks = build_record_kinds({"qa": {"losses": [{"_target_": "embedder.losses.InfoNCELoss", "weight": 1.0}]}}, 4)
    files = load_train_files([str(path)], None, tasks)
    module = RetrievalDataModule(files, tasks, DualEncoder(tiny_bert).tokenizer, batch_size=4)
    assert module.num_workers == "auto"
    monkeypatch.setattr(workers.os, "sched_getaffinity", lambda _: range(16))
    for device, devices, train_expected, encode_expected in (("cpu", 1, 0, 0), ("cuda", 2, 4, 7),
                                                              ("cuda", 8, 1, 1)):
        trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)), num_devices=devices,
                                  global_rank=0, world_size=1)  # the sampler's share: one rank's is enough here
        module.trainer = trainer
        assert module.train_dataloader().num_workers == train_expected
        assert workers.trainer_num_workers("auto", trainer, workers.ENCODE_MAX_WORKERS) == encode_expected
    assert workers.trainer_num_workers("auto", None) == 0 and workers.trainer_num_workers(3, None) == 3


# ---------------------------------------------------------------------------------------------------------------------
# corpora: JSON lines and parquet agree
# ---------------------------------------------------------------------------------------------------------------------

def test_parquet_and_jsonl_corpora_agree(tmp_path):
    rows = [dict(id=f"d{i}", **r) for i, r in enumerate(toy_corpus()[:30])]
    jl = open_corpus(_write(tmp_path / "corpus.json", rows), "{title} {text}")
    pqc = open_corpus(_write_parquet(tmp_path / "shards", rows, shards=3, row_group_size=4), "{title} {text}")
    assert isinstance(jl, JsonlCorpus) and isinstance(pqc, ParquetCorpus)
    expected = [f"{r['title']} {r['text']}" for r in rows]
    assert len(jl) == len(pqc) == 30
    assert list(jl) == list(pqc) == expected
    assert jl[5:17] == pqc[5:17] == expected[5:17] and jl[-1] == pqc[-1] == expected[-1]
    assert pqc.take([29, 0, 13, 13]) == {29: expected[29], 0: expected[0], 13: expected[13]}
    assert list(jl.ids) == list(pqc.ids) == [r["id"] for r in rows]
    with pytest.raises(IndexError):
        pqc[30]
    # one parquet file works too, and the fingerprint follows content and template, not the object
    single = tmp_path / "one.parquet"
    pq.write_table(pa.table({"title": [r["title"] for r in rows], "text": [r["text"] for r in rows]}), single)
    assert list(open_corpus(str(single), "{title} {text}")) == expected
    assert open_corpus(str(single), "{text}").fingerprint() != open_corpus(str(single), "{title} {text}").fingerprint()
    assert pickle.loads(pickle.dumps(pqc))[7] == expected[7]
    view = prefixed(pqc, "passage: ")
    assert view[2] == "passage: " + expected[2] and view[:2] == ["passage: " + t for t in expected[:2]]
    assert texts_fingerprint(view) != texts_fingerprint(pqc)


def test_corpus_errors_name_file_row_and_field(tmp_path):
    rows = [{"id": "a", "text": "x"}, {"id": "b", "text": "y"}, {"id": "a", "text": "z"}]
    with pytest.raises(DataError, match=r"dup.*line 3, field 'id'.*duplicate document id 'a' \(first on line 1\)"):
        open_corpus(_write_parquet(tmp_path / "dup", rows, shards=1, row_group_size=2), "{text}")
    with pytest.raises(DataError, match=r"part-00000.parquet, field 'title'.*no column 'title'"):
        open_corpus(_write_parquet(tmp_path / "notitle", rows[:2], shards=1), "{title} {text}")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(DataError, match="no parquet files"):
        open_corpus(str(tmp_path / "empty"), "{text}")
    with pytest.raises(DataError, match=r"bad.json, line 2: malformed JSON"):
        open_corpus(_write(tmp_path / "bad.json", [{"text": "x"}, "{oops"]), "{text}")


def test_query_files_are_lazy_and_skips_are_counted(tmp_path):
    path = _write(tmp_path / "q.json", [{"query": "a", "pos_index": [1]}, {"query": ""}, {"query": "c"}])
    qf = load_queries(path, corpus_size=3, skip_bad=True)
    assert len(qf) == 2 and [r.query for r in qf] == ["a", "c"] and list(qf.queries) == ["a", "c"]
    assert qf[1].line == 3 and qf[1].query_id == 2 and dict(qf.skipped) == {"empty query": 1}


# ---------------------------------------------------------------------------------------------------------------------
# mine.py and embedder.evaluate: parquet == JSON lines
# ---------------------------------------------------------------------------------------------------------------------

def _parquet_copy_of_toy_corpus(folder) -> str:
    return _write_parquet(folder, toy_corpus(), shards=2, row_group_size=7)


def test_mining_a_parquet_corpus_equals_mining_its_jsonl(tmp_path, tiny_bert):
    from embedder.mining.run import run_mine
    from tests.test_mining import mine_cfg

    outs = {}
    for kind in ("jsonl", "parquet"):
        extra = ["save_to_output=true", f"output_dir={tmp_path}/{kind}", "rank_range=[1,15]"]
        cfg = mine_cfg(tmp_path / kind, extra, tiny_bert=tiny_bert)
        if kind == "parquet":
            cfg.corpus = _parquet_copy_of_toy_corpus(tmp_path / "shards")
        out = run_mine(cfg)
        outs[kind] = (read_jsonl(out["output"]), read_jsonl(out["result"]))
    assert outs["jsonl"][0] and outs["jsonl"] == outs["parquet"]


def test_evaluating_on_a_parquet_corpus_equals_jsonl(tmp_path, tiny_bert):
    from embedder.evaluation.run import run_evaluate

    data = tmp_path / "data"
    write_toy(data / "toy")
    shards = _parquet_copy_of_toy_corpus(tmp_path / "shards")
    results = {}
    for kind, corpus in (("jsonl", f"{data}/toy/corpus.json"), ("parquet", shards)):
        cfg = compose([f"eval_data={data}/toy/train.json", f"corpus={corpus}", "eval_name=toy",
                       f"output_dir={tmp_path}/{kind}", "model=tiny_bert", f"model.model_name_or_path={tiny_bert}",
                       "trainer=cpu", "+trainer.enable_progress_bar=false", "query_max_length=128",
                       "key_max_length=128", "metrics=[mrr,recall,ndcg,nq]", "cutoffs=[1,5,10]", "hits=10",
                       "instruction_kind=tool", "task=tool", "retriever.batch_size=8"], "eval")
        results[kind] = (run_evaluate(cfg), read_jsonl(f"{tmp_path}/{kind}/toy.result.json"))
    assert results["jsonl"][0] and results["jsonl"] == results["parquet"]


def test_progress_logs_plain_lines_with_an_eta_outside_a_terminal(caplog):
    import logging

    from embedder.progress import Progress

    caplog.set_level(logging.INFO, logger="embedder")
    with Progress("validating train.json", 4_000_000, quiet_below=0) as bar:  # pytest's stderr is not a terminal
        for _ in range(4):
            bar.update(1_000_000)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("validating train.json:  25% (1.0 MB / 4.0 MB)") and "ETA" in lines[0]
    assert lines[-1].startswith("validating train.json: 100%") and "\r" not in "".join(lines)


def test_gzipped_jsonl_streams_but_is_never_read_by_offset(tmp_path):
    import gzip

    from embedder.data.jsonl import iter_jsonl

    records = [{"query": f"q{i}", "pos": [f"p{i}"]} for i in range(50)]
    path = str(tmp_path / "train.json.gz")
    with gzip.open(path, "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
    assert [r for _, r in iter_jsonl(path)] == records
    with pytest.raises(DataError, match=r"(?s)gzipped file is read by byte offset.*gunzip -k"):
        load_train_file(path, TASKS, default_task="qa")
    truncated = str(tmp_path / "cut.json.gz")
    with open(path, "rb") as src, open(truncated, "wb") as dst:
        dst.write(src.read()[:-30])
    with pytest.raises(DataError, match=r"(?s)cut.json.gz.*not a readable gzip file"):
        list(iter_jsonl(truncated))


def test_a_corpus_json_path_reads_the_reference_file_else_the_parquet_folder(tmp_path):
    """task=qrecc names `convsearch/qrecc/corpus.json` (the reference's layout); a download of parquet shards in
    `corpus/` is read when there is no corpus.json; neither: the message names both."""
    from embedder.paths import resolve_files

    folder = tmp_path / "convsearch" / "qrecc"
    (folder / "corpus").mkdir(parents=True)
    pq.write_table(pa.table({"id": ["p0", "p1"], "text": ["parquet zero", "parquet one"]}),
                   folder / "corpus" / "part-0.parquet")
    with pytest.raises(FileNotFoundError) as err:
        resolve_files("llm-embedder:convsearch/qrecc/corpus.txt.json", str(tmp_path), what="corpus", allow_dirs=True)
    assert "corpus.txt.json" in str(err.value) and "parquet shards" in str(err.value)
    (found,) = resolve_files("llm-embedder:convsearch/qrecc/corpus.json", str(tmp_path), what="corpus",
                             allow_dirs=True)
    assert found == str(folder / "corpus") and open_corpus(found, "{text}")[1] == "parquet one"
    (folder / "corpus.json").write_text("".join(json.dumps({"id": f"j{i}", "text": f"json {i}"}) + "\n"
                                                for i in range(3)))
    (found,) = resolve_files("llm-embedder:convsearch/qrecc/corpus.json", str(tmp_path), what="corpus",
                             allow_dirs=True)
    assert found == str(folder / "corpus.json") and len(open_corpus(found, "{text}")) == 3
