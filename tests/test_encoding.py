"""Corpus encoding: the saved layout, agreement with the in-process encoder, resume after a crash, dtype choice.

All with the tiny random BERT (a real tokenizer and forward pass) and a one-device CPU Lightning Trainer; the
2-process run is in test_evaluate_ddp.py.
"""

from __future__ import annotations

import glob
import logging
import os

import numpy as np
import pytest
import torch

from embedder.modeling.encoder import DualEncoder
from embedder.retrieval.encode import (
    EmbeddingStore,
    EncodeJob,
    StoreMismatch,
    encode_to_stores,
    load_encode,
    make_predict_trainer,
    resolve_dtype,
)
from embedder.retrieval.encode.model import encoder_overrides

TEXTS = [("lorem ipsum " * (i % 9 + 1)) + f"doc {i}" for i in range(37)]  # varied lengths, 37 = 4 shards of 10


@pytest.fixture(scope="module")
def encoder(tiny_bert):
    return DualEncoder(tiny_bert, pooling="mean")


def _trainer():
    return make_predict_trainer(None, accelerator="cpu", devices=1, enable_progress_bar=False)


def _job(path, texts=TEXTS, **kw):
    return EncodeJob("corpus", texts, str(path), kind="key", max_length=24, shard_size=10, **kw)


def test_layout_and_agreement_with_encode_texts(encoder, tmp_path):
    (store,) = encode_to_stores(encoder, [_job(tmp_path / "s")], _trainer(), batch_size=4)
    files = sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "s" / "*")))
    assert files == ["meta.json", "shard-00000.npy", "shard-00001.npy", "shard-00002.npy", "shard-00003.npy"]
    assert [len(store.shard_rows(s)) for s in range(4)] == [10, 10, 10, 7]
    assert store.meta["dim"] == encoder.dim and store.meta["num_rows"] == len(TEXTS)
    emb = load_encode(str(tmp_path / "s"))
    assert emb.shape == (len(TEXTS), encoder.dim) and emb.dtype == np.float32
    # same rows as the plain in-process encoder (length-sorted batches of its own): only float noise differs
    ref = encoder.encode_texts(TEXTS, kind="key", max_length=24, batch_size=4).numpy()
    np.testing.assert_allclose(emb, ref, atol=1e-5)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)  # normalize=True


def test_resume_after_an_interrupted_shard(encoder, tmp_path, monkeypatch):
    full = tmp_path / "full"
    encode_to_stores(encoder, [_job(full)], _trainer(), batch_size=4)

    real_write = EmbeddingStore.write_shard
    written: list[int] = []

    def crash_after_two(self, s, emb):
        if len(written) == 2:
            raise RuntimeError("simulated crash while encoding")
        real_write(self, s, emb)
        written.append(s)

    monkeypatch.setattr(EmbeddingStore, "write_shard", crash_after_two)
    with pytest.raises(RuntimeError, match="simulated crash"):
        encode_to_stores(encoder, [_job(tmp_path / "r")], _trainer(), batch_size=4)
    store = EmbeddingStore(str(tmp_path / "r"))
    assert store.done_shards() == written and len(written) == 2
    assert not [p for p in os.listdir(tmp_path / "r") if "tmp" in p]  # no half-written file left behind
    with pytest.raises(FileNotFoundError, match="incomplete"):
        load_encode(str(tmp_path / "r"))

    resumed: list[int] = []

    def count(self, s, emb):
        resumed.append(s)
        real_write(self, s, emb)

    monkeypatch.setattr(EmbeddingStore, "write_shard", count)
    encode_to_stores(encoder, [_job(tmp_path / "r")], _trainer(), batch_size=4)
    assert sorted(resumed) == sorted(set(range(4)) - set(written))  # finished shards were not redone
    np.testing.assert_array_equal(load_encode(str(tmp_path / "r")), load_encode(str(full)))

    resumed.clear()  # a third run finds everything done and runs no model at all
    encode_to_stores(encoder, [_job(tmp_path / "r")], _trainer(), batch_size=4)
    assert resumed == []


def test_dataloader_workers_give_the_same_embeddings(encoder, tmp_path):
    encode_to_stores(encoder, [_job(tmp_path / "w0")], _trainer(), batch_size=4)
    encode_to_stores(encoder, [_job(tmp_path / "w2")], _trainer(), batch_size=4, num_workers=2)  # shards split
    np.testing.assert_allclose(load_encode(str(tmp_path / "w2")), load_encode(str(tmp_path / "w0")), atol=1e-5)  # batches differ: float rounding
    # each worker tokenises a slice of every shard; with a token budget too
    encode_to_stores(encoder, [_job(tmp_path / "w3")], _trainer(), batch_size=4, num_workers=3, batch_tokens=64)
    np.testing.assert_allclose(load_encode(str(tmp_path / "w3")), load_encode(str(tmp_path / "w0")), atol=1e-5)


def test_token_budget_batches_give_the_same_embeddings_in_order(encoder, tmp_path, caplog):
    """Token-budget batches (sorted by length, filled to a budget) vs fixed counts, packed vs padded: same rows."""
    padded = DualEncoder(encoder.model_name_or_path, pooling="mean", unpadded="false")
    padded.load_state_dict(encoder.state_dict())
    encode_to_stores(padded, [_job(tmp_path / "count")], _trainer(), batch_size=4)
    with caplog.at_level(logging.INFO, logger="embedder.retrieval.encode"):
        encode_to_stores(encoder, [_job(tmp_path / "budget")], _trainer(), batch_size=4, batch_tokens=64)
    assert "batches of up to 64 tokens" in caplog.text
    np.testing.assert_allclose(load_encode(str(tmp_path / "budget")), load_encode(str(tmp_path / "count")), atol=1e-5)
    sizes = []
    from embedder.retrieval.encode.predict import _BatchStream

    job = EncodeJob("corpus", TEXTS, str(tmp_path / "x"), kind="key", max_length=128, shard_size=100)
    stream = _BatchStream([(0, 0)], [job], [[range(0, 37)]], encoder.tokenizer, 4, batch_tokens=256)
    for batch in stream:
        sizes.append(tuple(batch["input_ids"].shape))
    assert all(n * width <= 256 for n, width in sizes) and sum(n for n, _ in sizes) == 37
    assert sizes[-1][0] > sizes[0][0]  # short texts go in larger batches


def test_store_refuses_other_texts_or_shard_size(encoder, tmp_path):
    encode_to_stores(encoder, [_job(tmp_path / "s")], _trainer(), batch_size=8)
    with pytest.raises(StoreMismatch, match="fingerprint"):
        encode_to_stores(encoder, [_job(tmp_path / "s", texts=TEXTS[:-1] + ["changed"])], _trainer())
    with pytest.raises(StoreMismatch, match="shard_size"):
        EmbeddingStore.create(str(tmp_path / "s"), len(TEXTS), 5, _job(tmp_path / "s").fingerprint())


def test_queries_and_corpus_in_one_call_use_their_encoders(tiny_bert, tmp_path):
    untied = DualEncoder(tiny_bert, key_model_name_or_path=tiny_bert, tie_encoders=False, pooling="cls")
    with torch.no_grad():
        for p in untied.key_model.parameters():
            p.add_(0.05)  # make the key encoder differ
    texts = TEXTS[:12]
    jobs = [EncodeJob("q", texts, str(tmp_path / "q"), kind="query", max_length=24, shard_size=5),
            EncodeJob("k", texts, str(tmp_path / "k"), kind="key", max_length=24, shard_size=5)]
    q_store, k_store = encode_to_stores(untied, jobs, _trainer(), batch_size=3)
    q_ref = untied.encode_texts(texts, kind="query", max_length=24).numpy()
    k_ref = untied.encode_texts(texts, kind="key", max_length=24).numpy()
    np.testing.assert_allclose(q_store.load(), q_ref, atol=1e-5)
    np.testing.assert_allclose(k_store.load(), k_ref, atol=1e-5)
    assert not np.allclose(q_ref, k_ref, atol=1e-3)


def test_dtype_resolution():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype("model", torch.device("cpu")) is None
    with pytest.raises(ValueError, match="valid"):
        resolve_dtype("int8", torch.device("cpu"))


def test_bf16_encoding_restores_the_encoder(encoder, tmp_path):
    encode_to_stores(encoder, [_job(tmp_path / "b", texts=TEXTS[:6])], _trainer(), dtype="bf16")
    assert next(encoder.parameters()).dtype == torch.float32  # the caller's encoder is left as it was
    emb, ref = load_encode(str(tmp_path / "b")), encoder.encode_texts(TEXTS[:6], kind="key", max_length=24).numpy()
    assert np.abs(emb - ref).max() < 0.05  # bf16 is close, not exact


def test_encoder_overrides_read_saved_models(tiny_bert, tmp_path):
    enc = DualEncoder(tiny_bert, pooling="mean", normalize=False)
    enc.save(str(tmp_path / "trained"))
    ours = encoder_overrides(str(tmp_path / "trained"))
    assert ours["pooling"] == "mean" and ours["normalize"] is False and ours["tie_encoders"] is True
    os.remove(tmp_path / "trained" / "embedder_config.json")  # now only the sentence-transformers metadata is left
    st = encoder_overrides(str(tmp_path / "trained"))
    assert st["pooling"] == "mean" and st["normalize"] is False
    assert encoder_overrides("BAAI/bge-base-en") == {"model_name_or_path": "BAAI/bge-base-en",
                                                     "key_model_name_or_path": None, "tokenizer_name_or_path": None}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_encoding_runs_in_bf16_and_matches_cpu(encoder, tmp_path):
    """dtype=auto on a GPU is bf16: close to the fp32 CPU embeddings, and the same store layout."""
    texts = TEXTS[:20]
    cpu_trainer = _trainer()
    gpu_trainer = make_predict_trainer(None, accelerator="gpu", devices=1, enable_progress_bar=False)
    (cpu,) = encode_to_stores(encoder, [_job(tmp_path / "cpu", texts=texts)], cpu_trainer)
    (gpu,) = encode_to_stores(encoder, [_job(tmp_path / "gpu", texts=texts)], gpu_trainer)
    a, b = cpu.load(), gpu.load()
    assert a.shape == b.shape and sorted(os.listdir(tmp_path / "cpu")) == sorted(os.listdir(tmp_path / "gpu"))
    cos = (a * b).sum(axis=1)  # both are unit vectors
    assert cos.min() > 0.99
    assert next(encoder.parameters()).dtype == torch.float32  # restored after the bf16 run


def test_a_zero_byte_store_meta_names_the_file_and_how_to_rebuild(tmp_path):
    from embedder.errors import DataError
    from embedder.retrieval.encode.store import EmbeddingStore

    (tmp_path / "corpus-0123").mkdir()
    (tmp_path / "corpus-0123" / "meta.json").write_bytes(b"")
    with pytest.raises(DataError, match=r"corpus-0123/meta\.json: corrupt embedding-store metadata(?s:.*)delete the "
                                        r"folder .*corpus-0123"):
        EmbeddingStore(str(tmp_path / "corpus-0123"))


@pytest.mark.parametrize("names,want", [(("bf16", "bfloat16", "BF16", "torch.bfloat16"), "bfloat16"),
                                        (("fp16", "float16", "half"), "float16"),
                                        (("fp32", "float32", "float"), "float32")])
def test_one_dtype_resolver_takes_every_spelling(names, want):
    from embedder.dtypes import resolve_dtype

    for name in names:
        assert resolve_dtype(name) == getattr(torch, want), name
    assert resolve_dtype("auto", "cpu") == torch.float32 and resolve_dtype("model") is None
    with pytest.raises(ValueError, match="valid: auto, model, bf16"):
        resolve_dtype("int8")


def test_token_budget_encoding_logs_texts_done_with_an_eta(encoder, tmp_path, caplog):
    """Outside a terminal LogProgress counts texts (token-budget batches have no count in advance), with an ETA."""
    from embedder.callbacks import LogProgress

    trainer = make_predict_trainer(None, accelerator="cpu", devices=1, enable_progress_bar=False,
                                   callbacks=[LogProgress(every_s=0, always=True)])
    with caplog.at_level(logging.INFO, logger="embedder"):
        encode_to_stores(encoder, [_job(tmp_path / "p")], trainer, batch_size=4, batch_tokens=64)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("encoding: ")]
    assert lines and all("/37 texts" in line and "ETA" in line and "?" not in line for line in lines)
    assert lines[-1].startswith("encoding: 37/37 texts (100%)")


def test_training_progress_leaves_validation_out_of_the_rate(monkeypatch, caplog):
    """The training line's rate and ETA restart after a validation: 10 steps in 10 s, a 10-minute validation, 10
    more steps in 10 s give "ETA 1m20s" for the 80 steps left (not hours), and 4 queries/s."""
    from types import SimpleNamespace

    from embedder import callbacks

    clock = [0.0]
    monkeypatch.setattr(callbacks.time, "monotonic", lambda: clock[0])
    trainer = SimpleNamespace(global_step=0, estimated_stepping_batches=100, world_size=1, is_global_zero=True,
                              current_epoch=0)
    cb = callbacks.LogProgress(every_s=10, always=True)
    batch = {"query": {"input_ids": torch.zeros(4, 3)}}
    cb.on_train_start(trainer, None)

    def steps(n: int) -> None:
        for _ in range(n):
            clock[0] += 1.0
            trainer.global_step += 1
            cb.on_train_batch_end(trainer, None, {"loss": torch.tensor(0.5)}, batch, trainer.global_step)

    with caplog.at_level(logging.INFO, logger="embedder"):
        steps(10)
        cb.on_validation_start(trainer, None)
        clock[0] += 600.0
        cb.on_validation_end(trainer, None)
        steps(10)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train: ")]
    assert len(lines) == 2 and "ETA 1m30s" in lines[0]
    assert "step 20/100" in lines[1] and "ETA 1m20s" in lines[1] and "4.0 queries/s" in lines[1], lines[1]


def test_pad_batch_equals_the_tokenizers_own_padding(tiny_bert):
    """The array-built batches equal `tokenizer(..., padding=True)` for the same rows, on either padding side."""
    from transformers import AutoTokenizer

    from embedder.data.encode_batches import pad_batch, pad_id_of, tokenize_compact

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    texts = TEXTS[:9]
    ids, types = tokenize_compact(tok, texts, 24, chunk=4)  # three chunks
    assert types is not None and all(x.dtype == np.int32 for x in ids)
    pos = np.array([7, 2, 5, 0])
    for side in ("right", "left"):
        tok.padding_side = side
        ref = tok([texts[p] for p in pos], padding=True, truncation=True, max_length=24, return_tensors="pt")
        got = pad_batch(ids, types, pos, *pad_id_of(tok))
        assert set(got) == {"input_ids", "attention_mask", "token_type_ids"}
        for k in got:
            assert torch.equal(got[k], ref[k]), (side, k)


def test_sorted_batches_take_every_row_once_longest_first():
    from embedder.data.encode_batches import sorted_batches

    lengths = np.random.default_rng(0).integers(1, 200, size=101)
    for batch_size, batch_tokens in ((8, 0), (8, 512)):
        batches = list(sorted_batches(lengths, batch_size, batch_tokens))
        assert sorted(np.concatenate(batches).tolist()) == list(range(101))
        flat = lengths[np.concatenate(batches)]
        assert (np.diff(flat) <= 0).all()  # longest first, across and within batches
        if batch_tokens:
            assert all(len(b) * lengths[b].max() <= batch_tokens or len(b) == 1 for b in batches)
            assert len(batches[-1]) > len(batches[0])
        else:
            assert [len(b) for b in batches] == [8] * 12 + [5]


def test_encode_texts_with_a_token_budget_keeps_the_order(encoder):
    fixed = encoder.encode_texts(TEXTS, kind="key", max_length=24, batch_size=4)
    budget = encoder.encode_texts(TEXTS, kind="key", max_length=24, batch_tokens=64)
    np.testing.assert_allclose(budget.numpy(), fixed.numpy(), atol=1e-5)
    alone = encoder.encode_texts([TEXTS[5]], kind="key", max_length=24)
    np.testing.assert_allclose(alone[0].numpy(), fixed[5].numpy(), atol=1e-5)
    assert encoder.encode_texts([], kind="key").shape == (0, encoder.dim)


def _lockstep(encoder, path, units_per_rank, rank, **kw):
    from embedder.retrieval.encode.predict import encode_in_lockstep

    job = _job(path)
    EmbeddingStore.create(job.store_path, len(job.texts), job.shard_size, job.fingerprint())
    encode_in_lockstep(encoder, [job], units_per_rank, rank, **kw)


def test_in_training_encoding_with_a_token_budget_and_workers(encoder, tmp_path):
    """In-training evaluation's encoder (`encode_in_lockstep`): token-budget batches tokenised by DataLoader workers
    give the embeddings of `encode_to_stores`' fixed batches, in order."""
    encoder.train()
    encode_to_stores(encoder, [_job(tmp_path / "ref")], _trainer(), batch_size=4)
    assert encoder.training  # the caller's mode is restored
    units = [(0, s) for s in range(4)]
    _lockstep(encoder, tmp_path / "budget", [units], 0, batch_size=4, batch_tokens=64, num_workers=2)
    np.testing.assert_allclose(load_encode(str(tmp_path / "budget")), load_encode(str(tmp_path / "ref")), atol=1e-5)
    assert encoder.training  # the caller's mode is restored


def test_zero3_lockstep_pads_to_the_busiest_rank(tiny_bert, tmp_path, caplog):
    """Under ZeRO-3 (parameters marked as DeepSpeed partitions) every rank runs as many forward passes as the rank
    with the most batches, with batch_size batches even when a token budget is asked for."""
    enc = DualEncoder(tiny_bert, pooling="mean")
    for i, p in enumerate(enc.parameters()):
        p.ds_id = i  # what DeepSpeed ZeRO-3 sets on a partitioned parameter
    calls = []
    enc.key_model.register_forward_hook(lambda *a: calls.append(1))
    units = [[(0, 0), (0, 2)], [(0, 1), (0, 3)]]  # 20 rows = 6 batches of 4, and 17 rows = 5 batches
    with caplog.at_level(logging.INFO, logger="embedder"):
        _lockstep(enc, tmp_path / "z", units, 1, batch_size=4, batch_tokens=64)
        assert len(calls) == 6 and "ZeRO-3" in caplog.text  # 5 batches + 1 padding pass
        _lockstep(enc, tmp_path / "z", units, 0, batch_size=4, batch_tokens=64)
        assert len(calls) == 12
    ref = enc.encode_texts(TEXTS, kind="key", max_length=24, batch_size=4).numpy()
    np.testing.assert_allclose(load_encode(str(tmp_path / "z")), ref, atol=1e-5)


def test_token_cache_skips_tokenising_the_same_texts_again(encoder, tmp_path, monkeypatch):
    """The second encode of the same texts (here: by other weights, so into another store) reads the cached token
    ids; the embeddings equal an encode without the cache. Another length limit is another cache entry."""
    import embedder.data.encode_batches as eb

    calls = []
    real = eb.tokenize_compact
    monkeypatch.setattr(eb, "tokenize_compact", lambda *a, **k: calls.append(1) or real(*a, **k))
    texts = [t + " cached" for t in TEXTS]  # texts no other test has cached
    encode_to_stores(encoder, [_job(tmp_path / "first", texts=texts)], _trainer(), batch_size=4, batch_tokens=64)
    assert len(calls) == 4  # one chunk per shard
    other = DualEncoder(encoder.model_name_or_path, pooling="mean")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01)
    encode_to_stores(other, [_job(tmp_path / "again", texts=texts)], _trainer(), batch_size=4, batch_tokens=64)
    assert len(calls) == 4  # read, not tokenised
    encode_to_stores(other, [_job(tmp_path / "plain", texts=texts)], _trainer(), batch_size=4, batch_tokens=64,
                     token_cache=False)
    assert len(calls) == 8
    np.testing.assert_array_equal(load_encode(str(tmp_path / "again")), load_encode(str(tmp_path / "plain")))
    encode_to_stores(other, [EncodeJob("corpus", texts, str(tmp_path / "short"), kind="key", max_length=8,
                                       shard_size=10)], _trainer(), batch_size=4)
    assert len(calls) == 12  # another max_length: tokenised (and cached) anew


def test_cached_tokens_equal_the_tokenizer(tiny_bert):
    from transformers import AutoTokenizer

    from embedder.data.corpus import texts_fingerprint
    from embedder.data.encode_batches import cached_tokens, token_cache_key, tokenize_compact

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    texts = [t + " types" for t in TEXTS]
    key = token_cache_key(tok, texts_fingerprint(texts), 24)
    ref_ids, ref_types = tokenize_compact(tok, texts, 24, rows=range(3, 20))
    for _ in range(2):  # built, then read back memory-mapped
        ids, types = cached_tokens(tok, texts, 24, range(3, 20), key)
        assert [x.tolist() for x in ids] == [x.tolist() for x in ref_ids]
        assert [x.tolist() for x in types] == [x.tolist() for x in ref_types]
    assert ids[0].dtype == np.uint16  # a 109-token vocabulary fits 16 bits
    assert token_cache_key(tok, texts_fingerprint(texts), 32) != key
    assert token_cache_key(tok, texts_fingerprint(texts[:-1]), 24) != key
    tok(texts, truncation=True, max_length=5, padding="max_length")  # leaves its settings in the backend's state
    assert token_cache_key(tok, texts_fingerprint(texts), 24) == key


def test_chunks_are_dealt_to_workers_and_counted(encoder, tmp_path, monkeypatch):
    """Shards cut into several token chunks, dealt round-robin to 3 DataLoader workers: every row once, the batch
    count known in advance (fixed-count batches), the embeddings those of one process."""
    from torch.utils.data import DataLoader

    import embedder.retrieval.encode.predict as predict

    monkeypatch.setattr(predict, "TOKEN_CHUNK", 4)  # 10-row shards: chunks of 4, 4 and 2 rows
    encode_to_stores(encoder, [_job(tmp_path / "one")], _trainer(), batch_size=3)
    encode_to_stores(encoder, [_job(tmp_path / "three")], _trainer(), batch_size=3, num_workers=3)
    np.testing.assert_allclose(load_encode(str(tmp_path / "three")), load_encode(str(tmp_path / "one")), atol=1e-5)
    job = _job(tmp_path / "x")
    rows = [range(s * 10, min(s * 10 + 10, 37)) for s in range(4)]
    stream = predict._BatchStream([(0, s) for s in range(4)], [job], [rows], encoder.tokenizer, 3, num_workers=3)
    batches = list(DataLoader(stream, batch_size=None, num_workers=3))
    assert len(batches) == len(stream)
    seen = sorted((int(b["shard"]), int(p)) for b in batches for p in b["positions"])
    assert seen == [(s, p) for s in range(4) for p in range(len(rows[s]))]


def test_batch_tokens_auto_is_per_device():
    from embedder.data.encode_batches import CPU_BATCH_TOKENS, GPU_BATCH_TOKENS, resolve_batch_tokens

    assert resolve_batch_tokens("auto", "cpu") == CPU_BATCH_TOKENS == 4096
    assert resolve_batch_tokens("auto", torch.device("cuda", 1)) == GPU_BATCH_TOKENS == 32768
    assert resolve_batch_tokens(None, "cpu") == CPU_BATCH_TOKENS
    assert resolve_batch_tokens(0, "cuda") == 0 and resolve_batch_tokens("8192", "cpu") == 8192
    for bad in ("lots", -1):
        with pytest.raises(ValueError, match="valid: auto"):
            resolve_batch_tokens(bad, "cpu")


def test_an_unwritable_token_cache_warns_once_and_encodes(encoder, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("EMBEDDER_CACHE", str(blocker / "cache"))
    with caplog.at_level(logging.WARNING, logger="embedder.data"):
        encode_to_stores(encoder, [_job(tmp_path / "a")], _trainer(), batch_size=4)  # 4 chunks, none cached
        encode_to_stores(encoder, [_job(tmp_path / "b")], _trainer(), batch_size=4, token_cache=False)
    assert caplog.text.count("could not cache token ids") == 1
    np.testing.assert_array_equal(load_encode(str(tmp_path / "a")), load_encode(str(tmp_path / "b")))


def test_sharded_search_in_query_chunks_equals_one_search(encoder, tmp_path):
    """Queries are searched and merged a chunk at a time (re-mining 500k training queries never holds them all at
    once): chunks of 3 over query shards of 4 give the one-chunk ranking exactly, over a 2-shard corpus."""
    from embedder.retrieval.dense import sharded_search

    corpus = [f"passage {i} about {'alpha beta gamma delta'.split()[i % 4]} and item {i * 7}" for i in range(11)]
    queries = [f"which item is {i * 7} about {'alpha beta gamma'.split()[i % 3]}" for i in range(10)]
    common = dict(identity={"test": 1}, name="t", metric="cos", hits=5, rank=0, world=1, barrier=lambda: None,
                  all_gather=lambda x: [x], shard_size=4, batch_size=4)
    one_scores, one_ids = sharded_search(encoder, corpus, queries, str(tmp_path / "a"), **common)
    scores, ids = sharded_search(encoder, corpus, queries, str(tmp_path / "b"), query_chunk=3, **common)
    assert one_ids.shape == (10, 5) and (one_ids >= 0).all()
    np.testing.assert_array_equal(ids, one_ids)
    np.testing.assert_array_equal(scores, one_scores)
    expected = np.argsort(-(encoder.encode_texts(queries, kind="query").numpy() @
                            encoder.encode_texts(corpus, kind="key").numpy().T), axis=1, kind="stable")[:, :5]
    assert (ids[:, 0] == expected[:, 0]).mean() >= 0.9  # the search ranks by the model's own similarity
