"""FaissIndex against numpy brute force, save/load, backend logging, and merge_topk over shards."""

from __future__ import annotations

import json
import logging
import os
import sys

import numpy as np
import pytest

pytest.importorskip("faiss")

from embedder.retrieval.faiss_index import FaissIndex, import_faiss, merge_topk  # noqa: E402

N, Q, D, K = 300, 12, 16, 10


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    corpus = rng.standard_normal((N, D)).astype(np.float32)  # (N, D)
    queries = rng.standard_normal((Q, D)).astype(np.float32)  # (Q, D)
    return corpus, queries


def brute_force(corpus: np.ndarray, queries: np.ndarray, k: int, metric: str):
    """Exact top-k, best first: (scores (Q, k), ids (Q, k))."""
    if metric == "cos":
        corpus = corpus / np.linalg.norm(corpus, axis=1, keepdims=True)
        queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    if metric == "l2":
        scores = ((queries[:, None, :] - corpus[None, :, :]) ** 2).sum(-1)  # (Q, N) squared distances
        ids = np.argsort(scores, axis=1, kind="stable")[:, :k]
    else:
        scores = queries @ corpus.T  # (Q, N)
        ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, ids, axis=1), ids


def assert_best_first(scores: np.ndarray, metric: str):
    diffs = np.diff(scores, axis=1)
    assert (diffs >= 0).all() if metric == "l2" else (diffs <= 0).all()


@pytest.mark.parametrize("metric", ["cos", "ip", "l2"])
def test_flat_is_exact(data, metric):
    corpus, queries = data
    scores, ids = FaissIndex("Flat", metric, use_gpu=False).build(corpus).search(queries, K)
    exp_scores, exp_ids = brute_force(corpus, queries, K, metric)
    assert scores.shape == ids.shape == (Q, K) and scores.dtype == np.float32 and ids.dtype == np.int64
    np.testing.assert_array_equal(ids, exp_ids)
    np.testing.assert_allclose(scores, exp_scores, rtol=1e-4, atol=1e-4)
    assert_best_first(scores, metric)


@pytest.mark.parametrize("metric", ["cos", "ip", "l2"])
def test_ivf_with_all_lists_probed_is_exact(data, metric):
    corpus, queries = data
    index = FaissIndex("IVF4,Flat", metric, use_gpu=False, search_params={"nprobe": 4})
    index.build(corpus, train_sample=200, seed=1)  # trained on a 200-row sample
    assert index.faiss_index.is_trained and index.ntotal == N
    scores, ids = index.search(queries, K)
    np.testing.assert_array_equal(ids, brute_force(corpus, queries, K, metric)[1])
    assert_best_first(scores, metric)


@pytest.mark.parametrize("metric", ["cos", "ip", "l2"])
def test_hnsw_is_close(data, metric):
    corpus, queries = data
    index = FaissIndex("HNSW16", metric, use_gpu=False, search_params={"efSearch": 128}).build(corpus)
    scores, ids = index.search(queries, K)
    exp_ids = brute_force(corpus, queries, K, metric)[1]
    recall = np.mean([len(set(a) & set(b)) / K for a, b in zip(ids, exp_ids)])
    assert recall >= 0.9
    assert_best_first(scores, metric)


@pytest.mark.parametrize("metric", ["cos", "l2"])
def test_missing_results_come_last(data, metric):
    corpus, queries = data
    scores, ids = FaissIndex("Flat", metric, use_gpu=False).build(corpus[:3]).search(queries, 5)
    assert (ids[:, 3:] == -1).all() and (ids[:, :3] >= 0).all()
    assert np.isinf(scores[:, 3:]).all() and (scores[:, 3:] > 0).all() == (metric == "l2")


def test_add_continues_ids_and_accepts_torch(data):
    torch = pytest.importorskip("torch")
    corpus, queries = data
    index = FaissIndex("Flat", "ip", use_gpu=False).build(corpus[:100])
    index.add(torch.from_numpy(corpus[100:]))
    assert index.ntotal == N
    np.testing.assert_array_equal(index.search(queries, K)[1], brute_force(corpus, queries, K, "ip")[1])


@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat", "HNSW16"])
def test_save_load_round_trip(data, tmp_path, factory):
    corpus, queries = data
    index = FaissIndex(factory, "l2", use_gpu=False, search_params={"nprobe": 2} if "IVF" in factory else None)
    index.build(corpus)
    before = index.search(queries, K)
    path = str(tmp_path / "sub" / "corpus.faiss")
    index.save(path)
    meta = json.loads(open(path + ".json").read())
    assert meta["factory"] == factory and meta["metric"] == "l2" and meta["dim"] == D and meta["ntotal"] == N
    loaded = FaissIndex.load(path, use_gpu=False)
    assert (loaded.factory, loaded.metric, loaded.dim, loaded.ntotal) == (factory, "l2", D, N)
    after = loaded.search(queries, K)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_array_equal(before[0], after[0])


def test_load_needs_sidecar(data, tmp_path):
    path = str(tmp_path / "x.faiss")
    FaissIndex("Flat", "cos", use_gpu=False).build(data[0]).save(path)
    (tmp_path / "x.faiss.json").unlink()
    with pytest.raises(FileNotFoundError, match="sidecar"):
        FaissIndex.load(path)


def test_one_backend_log_line(data, caplog):
    with caplog.at_level(logging.INFO, logger="embedder.retrieval.faiss_index"):
        FaissIndex("Flat", "cos").build(data[0])
    records = [r for r in caplog.records if r.name == "embedder.retrieval.faiss_index"]
    assert len(records) == 1 and "backend" in records[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="embedder.retrieval.faiss_index"):
        index = FaissIndex("Flat", "cos", use_gpu=False).build(data[0])
    assert index.backend == "cpu"
    assert [r.getMessage() for r in caplog.records if r.name == "embedder.retrieval.faiss_index"] == \
        ["faiss index 'Flat' (metric cos): CPU backend (use_gpu=False)"]


def test_bad_arguments(data):
    with pytest.raises(ValueError, match="metric"):
        FaissIndex("Flat", "dot")
    with pytest.raises(ValueError, match="factory"):
        FaissIndex("NoSuchIndex", "ip", use_gpu=False).build(data[0])
    index = FaissIndex("Flat", "ip", use_gpu=False).build(data[0])
    with pytest.raises(ValueError, match="dimension"):
        index.search(data[1][:, :4], 3)
    with pytest.raises(RuntimeError, match="build"):
        FaissIndex().search(data[1], 3)


def test_missing_faiss_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        import_faiss()


# ---------------------------------------------------------------------------------------------- merge_topk
@pytest.mark.parametrize("metric", ["cos", "ip", "l2"])
def test_merge_topk_equals_global_search(data, metric):
    corpus, queries = data
    bounds = [0, 70, 71, 200, N]  # uneven shards, one with a single document (so it pads with -1)
    shards, offsets = [], []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        shards.append(FaissIndex("Flat", metric, use_gpu=False).build(corpus[lo:hi]).search(queries, K))
        offsets.append(lo)
    scores, ids = merge_topk(shards, K, metric, offsets)
    exp_scores, exp_ids = brute_force(corpus, queries, K, metric)
    np.testing.assert_array_equal(ids, exp_ids)
    np.testing.assert_allclose(scores, exp_scores, rtol=1e-4, atol=1e-4)
    if metric == "l2":  # the reference's descending merge would keep the farthest documents instead
        wrong = np.argsort(-np.concatenate([s for s, _ in shards], axis=1), axis=1)[:, :K]
        assert not np.array_equal(np.take_along_axis(np.concatenate(
            [np.where(i < 0, -1, i + o) for (_, i), o in zip(shards, offsets)], axis=1), wrong, axis=1), exp_ids)


def test_merge_topk_missing_results_and_padding():
    ip_shards = [(np.array([[0.9, -np.inf]]), np.array([[3, -1]])), (np.array([[0.95, 0.1]]), np.array([[0, 1]]))]
    scores, ids = merge_topk(ip_shards, 5, "ip", offsets=[0, 10])
    np.testing.assert_array_equal(ids, [[10, 3, 11, -1, -1]])
    np.testing.assert_array_equal(scores, np.array([[0.95, 0.9, 0.1, -np.inf, -np.inf]], dtype=np.float32))
    l2_shards = [(np.array([[0.5, np.inf]]), np.array([[3, -1]])), (np.array([[0.2, 2.0]]), np.array([[0, 1]]))]
    scores, ids = merge_topk(l2_shards, 3, "l2", offsets=[0, 10])
    np.testing.assert_array_equal(ids, [[10, 3, 11]])
    np.testing.assert_array_equal(scores, np.array([[0.2, 0.5, 2.0]], dtype=np.float32))
    with pytest.raises(ValueError, match="offsets"):
        merge_topk(l2_shards, 3, "l2", offsets=[0])


def _fake_gpu(monkeypatch, cloner):
    """Make the installed (CPU) faiss look like a GPU build with one GPU; `cloner` plays index_cpu_to_gpu."""
    faiss = import_faiss()

    class Options:
        useFloat16 = False

    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: object(), raising=False)
    monkeypatch.setattr(faiss, "GpuClonerOptions", Options, raising=False)
    monkeypatch.setattr(faiss, "GpuParameterSpace", faiss.ParameterSpace, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", cloner, raising=False)
    monkeypatch.setattr(faiss, "index_gpu_to_cpu", lambda index: index, raising=False)


def test_gpu_path_is_taken_when_faiss_sees_a_gpu(data, tmp_path, monkeypatch, caplog):
    corpus, queries = data
    _fake_gpu(monkeypatch, lambda res, device, index, options: index)
    with caplog.at_level(logging.INFO, logger="embedder.retrieval.faiss_index"):
        index = FaissIndex("Flat", "cos", device=0).build(corpus)
    assert index.backend == "gpu:0"
    assert [r.getMessage() for r in caplog.records if r.name == "embedder.retrieval.faiss_index"] == \
        ["faiss index 'Flat' (metric cos): GPU backend on device 0"]
    np.testing.assert_array_equal(index.search(queries, K)[1], brute_force(corpus, queries, K, "cos")[1])
    index.save(str(tmp_path / "g.faiss"))
    assert FaissIndex.load(str(tmp_path / "g.faiss"), use_gpu=False).backend == "cpu"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="embedder.retrieval.faiss_index"):
        assert FaissIndex("Flat", "cos", use_gpu=False).build(corpus).backend == "cpu"


def test_gpu_clone_failure_falls_back_to_cpu(data, monkeypatch, caplog):
    def refuse(res, device, index, options):
        raise RuntimeError("Error in ...: index type not supported on GPU")

    _fake_gpu(monkeypatch, refuse)
    with caplog.at_level(logging.INFO, logger="embedder.retrieval.faiss_index"):
        index = FaissIndex("HNSW16", "ip", use_gpu=True).build(data[0])
    assert index.backend == "cpu"
    records = [r for r in caplog.records if r.name == "embedder.retrieval.faiss_index"]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    assert "cannot put 'HNSW16' on a GPU" in records[0].getMessage()


def test_stale_search_temp_files_are_removed_fresh_ones_kept(tmp_path):
    import time

    from embedder.retrieval.base import remove_stale_temp_files

    old = tmp_path / ".search-00000.tmp-4242.npz"
    fresh = tmp_path / ".search-00001.tmp-4343.npz"
    old.write_bytes(b"x")
    fresh.write_bytes(b"x")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    assert remove_stale_temp_files(str(tmp_path), ".search-*.tmp-*.npz") == 1
    assert not old.exists() and fresh.exists()


def test_a_mixed_cpu_and_gpu_faiss_install_is_named():
    from embedder.retrieval.faiss_index import faiss_distributions, mixed_install_message

    assert "faiss-cpu" in faiss_distributions()  # this machine's install
    assert mixed_install_message(["faiss-cpu"]) is None and mixed_install_message(["faiss-gpu-cu12"]) is None
    msg = mixed_install_message(["faiss-cpu", "faiss-gpu-cu12"])
    assert "pip uninstall -y faiss-cpu faiss-gpu-cu12 && pip install faiss-gpu-cu12" in msg
