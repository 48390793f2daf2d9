"""Evaluation with encoding sharded over 2 CPU processes (gloo, Lightning ddp_spawn) equals the one-process run:
the same embeddings bit for bit, the same rankings, the same metrics."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch.distributed as dist

from embedder.evaluation.run import run_evaluate
from embedder.retrieval.encode import load_encode
from tests.test_evaluate import eval_cfg


def _stores(out_dir: str) -> dict[str, np.ndarray]:
    base = os.path.join(out_dir, "encode")
    return {d.split("-")[0]: load_encode(os.path.join(base, d)) for d in sorted(os.listdir(base))}


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_processes_give_identical_results(tmp_path, tiny_bert):
    # small shards, so both ranks encode corpus and query shards: corpus 31 rows = 4 shards, queries 10 = 2 shards
    common = ["retriever.shard_size=8", "metrics=[mrr,recall,ndcg,map,nq]"]
    one = run_evaluate(eval_cfg(tmp_path, tiny_bert, [f"output_dir={tmp_path}/one", *common]))
    cfg_two = eval_cfg(tmp_path, tiny_bert, [f"output_dir={tmp_path}/two", "trainer=ddp_sim", *common])
    assert cfg_two.trainer.devices == 2 and cfg_two.trainer.strategy == "ddp_spawn"
    two = run_evaluate(cfg_two)
    assert one == two  # exact, not approximate

    s1, s2 = _stores(f"{tmp_path}/one"), _stores(f"{tmp_path}/two")
    assert s1.keys() == s2.keys() == {"corpus", "queries"}
    for name in s1:
        np.testing.assert_array_equal(s1[name], s2[name])
    # the layout does not depend on the world size: same shard files
    for base in ("one", "two"):
        dirs = sorted(os.listdir(f"{tmp_path}/{base}/encode"))
        assert [sorted(os.listdir(f"{tmp_path}/{base}/encode/{d}")) for d in dirs] == [
            ["meta.json"] + [f"shard-{i:05d}.npy" for i in range(4)],  # corpus
            ["meta.json"] + [f"shard-{i:05d}.npy" for i in range(2)],  # queries
        ]
    r1 = [json.loads(x) for x in open(f"{tmp_path}/one/toy.result.json")]
    r2 = [json.loads(x) for x in open(f"{tmp_path}/two/toy.result.json")]
    assert r1 == r2
